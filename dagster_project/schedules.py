"""Nightly backfill: materialize whatever is missing or stale for every registered slide."""

from __future__ import annotations

from dagster import (
    DefaultScheduleStatus,
    RunRequest,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from mihd_resources import StorageResource

from .freshness import plan_for_graph
from .jobs import SLIDE_JOB_NAME
from .partitions import slides_partitions
from .staleness_inputs import slide_fingerprints, slide_gates


@schedule(
    job_name=SLIDE_JOB_NAME,
    cron_schedule="0 2 * * *",
    default_status=DefaultScheduleStatus.RUNNING,
    description="Every night, one run per slide partition that has missing or stale assets "
    "(only those assets are selected; fresh ones are never recomputed).",
)
def slide_backfill_schedule(context: ScheduleEvaluationContext, storage: StorageResource):
    graph = context.repository_def.asset_graph
    job = context.repository_def.get_job(SLIDE_JOB_NAME)
    keys = set(job.asset_layer.executable_asset_keys)
    tick = context.scheduled_execution_time.isoformat()
    requests, blocked = [], []
    for slide in context.instance.get_dynamic_partitions(slides_partitions.name):
        plan = plan_for_graph(
            context.instance, graph, keys, slide, slide_fingerprints(storage), slide_gates()
        )
        if plan.blocked:
            blocked.append(f"{slide}: {plan.blocked}")
        elif plan.to_materialize:
            requests.append(
                RunRequest(
                    partition_key=slide,
                    asset_selection=plan.to_materialize,
                    run_key=f"backfill:{slide}:{tick}",
                    tags={"mihd/reason": "backfill"},
                )
            )
    for message in blocked:
        context.log.warning(f"slide backfill skipped {message}")
    return requests or SkipReason(f"all slide partitions fresh ({len(blocked)} blocked)")
