"""Donor partitions (one per tile folder under ``settings.tiles_root()``) and their sensor."""

from __future__ import annotations

from dagster import (
    DagsterInstance,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from mihd_resources import settings

from .tiles import scan_donors

donors_partitions = DynamicPartitionsDefinition(name="donors")
E5_DONOR_JOB_NAME = "segmentation_e5_donor_job"


def discover_donors(instance: DagsterInstance) -> tuple[list[str], list[str]]:
    """(new valid donor keys not yet registered, refusal messages)."""
    valid, refused = scan_donors(settings.tiles_root())
    known = set(instance.get_dynamic_partitions(donors_partitions.name))
    return [d for d in valid if d not in known], refused


@sensor(
    job_name=E5_DONOR_JOB_NAME,
    minimum_interval_seconds=120,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers each new donor folder under the tiles root (MIHD_TILES_ROOT) as a "
    "`donors` partition and requests its E5 tile counts. Invalid folder names are refused.",
)
def donor_discovery_sensor(context: SensorEvaluationContext):
    new, refused = discover_donors(context.instance)
    for message in refused:
        context.log.warning(f"refused donor folder: {message}")
    if not new:
        return SensorResult(skip_reason=f"no new donor folders under {settings.tiles_root()}")
    context.log.info(f"registering {len(new)} new donor partition(s)")
    return SensorResult(
        run_requests=[RunRequest(partition_key=d, run_key=f"discovered:{d}") for d in new],
        dynamic_partitions_requests=[donors_partitions.build_add_request(new)],
    )
