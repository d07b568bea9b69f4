"""Slide discovery: every valid slide under the data root (a Visium folder, a ``<slide>.h5ad``
file, or a folder holding one ``.h5ad``) becomes a partition, and a changed one is observed (a
new data version of ``slides/slide_files``)."""

from __future__ import annotations

from dagster import (
    DagsterInstance,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)
from dagster._core.definitions.data_version import extract_data_version_from_entry

from mihd_assets.slides.assets import SLIDE_FILES, slide_input_fingerprint
from mihd_assets.slides.io import SlideInputError
from mihd_resources import StorageResource
from mihd_resources.orchestration import slides_partitions

from .jobs import observe_slides_job


def discover_slides(storage: StorageResource, instance: DagsterInstance) -> tuple[list[str], list[str]]:
    """(new valid slide keys not yet registered, refusal messages for invalid names and ambiguous slides)."""
    valid, refused = storage.scan_slides()
    known = set(instance.get_dynamic_partitions(slides_partitions.name))
    return [k for k in valid if k not in known], refused


def changed_slides(storage: StorageResource, instance: DagsterInstance, slides: list[str]) -> list[str]:
    """Slides whose input fingerprint (folder or .h5ad file) differs from the last observed data
    version of their files. A slide that is both a file and a folder is not observed: the scan
    reports it among the refused, which the sensor logs."""
    changed = []
    for slide in slides:
        try:
            source = storage.slide_source(slide)
        except SlideInputError:
            continue
        if not source.exists():
            continue
        record = instance.get_latest_data_version_record(SLIDE_FILES, is_source=True, partition_key=slide)
        version = extract_data_version_from_entry(record.event_log_entry) if record else None
        if version is None or version.value != slide_input_fingerprint(storage, slide):
            changed.append(slide)
    return changed


@sensor(
    job=observe_slides_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers each new slide under the data root (a Visium folder, a `<slide>.h5ad` file or a "
    "folder holding one `.h5ad`) as a `slides` partition (names that are not valid keys, and a slide that is "
    "both a file and a folder, are refused) and observes `slides/slide_files` when a slide is new or "
    "changed. The automation sensor then requests what became missing or unsynced.",
)
def slide_discovery_sensor(context: SensorEvaluationContext, storage: StorageResource):
    new, refused = discover_slides(storage, context.instance)
    for message in refused:
        context.log.warning(f"refused slide: {message}")
    registered = list(context.instance.get_dynamic_partitions(slides_partitions.name))
    changed = changed_slides(storage, context.instance, registered + new)
    if not changed:
        return SensorResult(skip_reason=f"no new or changed slides under {storage.slides_root}")
    if new:
        context.log.info(f"registering {len(new)} new slide partition(s): {new}")
    context.log.info(f"observing slide files of {changed}")
    return SensorResult(
        run_requests=[RunRequest(run_key=None, tags={"mihd/reason": f"slide files new or changed: {', '.join(changed)}"})],
        dynamic_partitions_requests=[slides_partitions.build_add_request(new)] if new else [],
    )
