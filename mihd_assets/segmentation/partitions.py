"""Donor partitions (one per tile folder under ``settings.tiles_root()``), the observable
sources the segmentation family reads (tiles per donor, annotations, clinical table) and the
sensor that registers donors and observes the sources."""

from __future__ import annotations

from pathlib import Path

from dagster import (
    AssetKey,
    DagsterInstance,
    DataVersion,
    DefaultSensorStatus,
    DynamicPartitionsDefinition,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    define_asset_job,
    observable_source_asset,
    sensor,
)
from dagster._core.definitions.data_version import extract_data_version_from_entry

from mihd_assets.fileio import file_sha256, tree_fingerprint
from mihd_resources import settings
from mihd_resources.orchestration import changed_data_versions

from .tiles import annotations_root, scan_donors

donors_partitions = DynamicPartitionsDefinition(name="donors")
GROUP = "segmentation"
DONOR_TILES = AssetKey(["segmentation", "donor_tiles"])
ANNOTATIONS = AssetKey(["segmentation", "annotations"])
CLINICAL = AssetKey(["segmentation", "clinical_outcomes"])
OBSERVE_JOB_NAME = "segmentation_observe_sources_job"


def discover_donors(instance: DagsterInstance) -> tuple[list[str], list[str]]:
    """(new valid donor keys not yet registered, refusal messages)."""
    valid, refused = scan_donors(settings.tiles_root())
    known = set(instance.get_dynamic_partitions(donors_partitions.name))
    return [d for d in valid if d not in known], refused


def donor_fingerprints(instance: DagsterInstance, extra: list[str] = ()) -> dict[str, str]:
    """Fingerprints of the registered donors' folders (and of ``extra`` donors about to be registered)."""
    root = settings.tiles_root()
    donors = list(instance.get_dynamic_partitions(donors_partitions.name)) + list(extra)
    return {d: tree_fingerprint(root / d) for d in donors if (root / d).is_dir()}


def _folder_version(path: Path) -> str:
    return tree_fingerprint(path) if path.is_dir() else "absent"


def _file_version(path: Path) -> str:
    return file_sha256(path)[:16] if path.is_file() else "absent"


@observable_source_asset(
    key=DONOR_TILES, group_name=GROUP, partitions_def=donors_partitions,
    description="One donor's immunofluorescence tiles (`<tiles root>/<donor>/..._b0c0.tif` + `_b0c1.tif`). "
    "Data version: the folder's fingerprint (every file's path, size and modification time).",
)
def donor_tiles(context):
    return changed_data_versions(context.instance, DONOR_TILES, donor_fingerprints(context.instance))


@observable_source_asset(
    key=ANNOTATIONS, group_name=GROUP,
    description="The annotated instance masks E0 splits (MIHD_ANNOTATIONS_ROOT or the demo's). Data version: "
    "the folder's fingerprint.",
)
def annotations():
    return DataVersion(_folder_version(annotations_root()))


@observable_source_asset(
    key=CLINICAL, group_name=GROUP,
    description="The donors' clinical outcomes table (MIHD_CLINICAL). Data version: the file's SHA-256.",
)
def clinical_outcomes():
    return DataVersion(_file_version(settings.clinical_table()))


SOURCES = [donor_tiles, annotations, clinical_outcomes]
observe_sources_job = define_asset_job(
    OBSERVE_JOB_NAME, selection=[s.key for s in SOURCES],
    description="Observes the segmentation family's input files (new data versions make their readers unsynced).",
)


def _latest_version(instance: DagsterInstance, key: AssetKey, partition: str | None = None) -> str | None:
    record = instance.get_latest_data_version_record(key, is_source=True, partition_key=partition)
    version = extract_data_version_from_entry(record.event_log_entry) if record else None
    return version.value if version else None


def sources_changed(instance: DagsterInstance, new_donors: list[str] = ()) -> bool:
    """Whether any segmentation input differs from its last observed data version."""
    fingerprints = donor_fingerprints(instance, new_donors)
    if any(_latest_version(instance, DONOR_TILES, d) != fp for d, fp in fingerprints.items()):
        return True
    return (_latest_version(instance, ANNOTATIONS) != _folder_version(annotations_root())
            or _latest_version(instance, CLINICAL) != _file_version(settings.clinical_table()))


@sensor(
    job=observe_sources_job,
    minimum_interval_seconds=120,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers each new donor folder under the tiles root (MIHD_TILES_ROOT) as a `donors` partition "
    "(invalid folder names are refused) and, when tiles, annotations or the clinical table changed, observes "
    "them; the automation sensor then requests what became missing or unsynced.",
)
def donor_discovery_sensor(context: SensorEvaluationContext):
    new, refused = discover_donors(context.instance)
    for message in refused:
        context.log.warning(f"refused donor folder: {message}")
    if not sources_changed(context.instance, new):
        return SensorResult(skip_reason=f"no new donors or changed inputs under {settings.tiles_root()}")
    if new:
        context.log.info(f"registering {len(new)} new donor partition(s)")
    return SensorResult(
        run_requests=[RunRequest(run_key=None, tags={"mihd/reason": "inputs changed"})],
        dynamic_partitions_requests=[donors_partitions.build_add_request(new)] if new else [],
    )
