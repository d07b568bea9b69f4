"""Slide discovery: every valid slide folder under the data root becomes a partition."""

from __future__ import annotations

from dagster import (
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from mihd_resources import StorageResource

from .jobs import SLIDE_JOB_NAME
from .partitions import slides_partitions


def discover_slides(storage: StorageResource, instance: DagsterInstance) -> tuple[list[str], list[str]]:
    """(new valid slide keys not yet registered, refusal messages for invalid folder names)."""
    valid, refused = storage.scan_slides()
    known = set(instance.get_dynamic_partitions(slides_partitions.name))
    return [k for k in valid if k not in known], refused


@sensor(
    job_name=SLIDE_JOB_NAME,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers each new slide folder under the data root as a `slides` partition "
    "and requests its first materialization. Folder names that are not valid keys are refused.",
)
def slide_discovery_sensor(context: SensorEvaluationContext, storage: StorageResource):
    new, refused = discover_slides(storage, context.instance)
    for message in refused:
        context.log.warning(f"refused slide folder: {message}")
    if not new:
        return SensorResult(skip_reason=f"no new slides under {storage.slides_root}")
    context.log.info(f"registering {len(new)} new slide partition(s): {new}")
    return SensorResult(
        run_requests=[RunRequest(partition_key=k, run_key=f"discovered:{k}") for k in new],
        dynamic_partitions_requests=[slides_partitions.build_add_request(new)],
    )
