"""Housekeeping of the metrics folder: superseded Parquet files are deleted once a week.

Every metric write adds a new file and the views read only the newest file of each
(asset, partition), so re-materializing leaves the older files behind. They are kept for a
while because a query that started before the newer write may still be reading them; the
job below deletes the ones superseded more than ``keep_hours`` ago.
"""

# Dagster reads the op's config and resource types from real annotations: no
# `from __future__ import annotations` here.
from dagster import Config, DefaultScheduleStatus, OpExecutionContext, ScheduleDefinition, job, op

from mihd_resources.metrics_store import MetricsStore, prune_superseded

PRUNE_JOB_NAME = "metrics_prune_job"


class PruneConfig(Config):
    keep_hours: float = 24.0  # a file superseded more recently than this stays


@op(description="Delete the metric Parquet files that a newer write of the same asset partition superseded "
                "more than `keep_hours` ago. A query that is reading such a file at that moment fails and can "
                "simply be run again; the views never return their rows.")
def prune_superseded_metric_files(context: OpExecutionContext, config: PruneConfig, metrics: MetricsStore) -> int:
    if config.keep_hours < 0:
        raise ValueError(f"keep_hours must be >= 0, got {config.keep_hours}")
    deleted = prune_superseded(metrics.parquet_dir, keep_seconds=config.keep_hours * 3600)
    for path in deleted:
        context.log.debug(f"deleted {path}")
    context.log.info(f"deleted {len(deleted)} superseded metric file(s) under {metrics.parquet_dir} "
                     f"(superseded more than {config.keep_hours:g} h ago)")
    return len(deleted)


@job(name=PRUNE_JOB_NAME, description="Deletes superseded metric Parquet files (weekly; launch it from the UI any time).",
     tags={"mihd/maintenance": "metrics"})
def metrics_prune_job():
    prune_superseded_metric_files()


metrics_prune_schedule = ScheduleDefinition(
    name="weekly_metrics_prune",
    job=metrics_prune_job,
    cron_schedule="30 1 * * 0",  # Sundays 01:30 UTC, before the nightly automation window
    execution_timezone="UTC",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Deletes metric Parquet files superseded more than a day ago.",
)
