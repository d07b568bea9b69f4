"""Cell dataset partitions (one per dataset under ``settings.cells_root()``), their observable
source, and the sensor that registers new datasets and observes changed ones."""

from __future__ import annotations

from pathlib import Path

from dagster import (
    AssetKey,
    DagsterInstance,
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

from mihd_assets.slides.versioning import source_fingerprint
from mihd_resources import settings
from mihd_resources.orchestration import changed_data_versions
from mihd_resources.storage import partition_path, validate_partition_key

from .cells import CELL_DATASETS, CellDatasetError, dataset_candidates, has_truth, scan_cell_datasets

cell_datasets_partitions = DynamicPartitionsDefinition(name=CELL_DATASETS)
GROUP = "geometry"
CELL_DATASET_FILES = AssetKey(["geometry", "cell_dataset_files"])
OBSERVE_CELLS_JOB_NAME = "geometry_observe_cell_datasets_job"


def validate_dataset_key(key: str) -> str:
    """``key`` if it can name a cell dataset partition (the same rule as every partition key)."""
    return validate_partition_key(key, CELL_DATASETS)


def scan() -> tuple[list[str], list[str]]:
    """(valid dataset keys, refusal messages) under the cells root."""
    return scan_cell_datasets(settings.cells_root(), validate_dataset_key)


def cell_dataset_source(dataset: str) -> Path:
    """The one source of ``dataset`` under the cells root; a CellDatasetError naming the dataset
    when there is none or more than one (an invalid key is refused by the partition-key rule)."""
    root = settings.cells_root()
    partition_path(root, dataset, partitions=CELL_DATASETS)
    found = dataset_candidates(root, dataset)
    if not found:
        raise CellDatasetError(f"cell dataset '{dataset}': no {dataset}.h5ad, {dataset}.h5 or {dataset}/ "
                               f"(10x MTX) under {root} (MIHD_CELLS_ROOT)")
    if len(found) > 1:
        raise CellDatasetError(f"cell dataset '{dataset}': several sources {[p.name for p in found]} under {root}; "
                               "keep one")
    return found[0]


def can_be_scored(dataset: str) -> bool:
    """Whether ``dataset`` carries hidden positions to score its placement on. A dataset that
    cannot be found counts as scoreable, so that its run fails and says why."""
    try:
        return has_truth(cell_dataset_source(dataset))
    except CellDatasetError:
        return True


def discover_cell_datasets(instance: DagsterInstance) -> tuple[list[str], list[str]]:
    """(new valid dataset keys not yet registered, refusal messages)."""
    valid, refused = scan()
    known = set(instance.get_dynamic_partitions(CELL_DATASETS))
    return [k for k in valid if k not in known], refused


def dataset_fingerprints(instance: DagsterInstance, extra: list[str] = ()) -> dict[str, str]:
    """Fingerprints (path, size, modification time) of the registered datasets that exist, and of ``extra``."""
    current = {}
    for dataset in list(instance.get_dynamic_partitions(CELL_DATASETS)) + list(extra):
        try:
            current[dataset] = source_fingerprint(cell_dataset_source(dataset))
        except CellDatasetError:
            continue  # removed from disk, or ambiguous: the scan reports the latter, the placement fails on both
    return current


@observable_source_asset(
    key=CELL_DATASET_FILES, group_name=GROUP, partitions_def=cell_datasets_partitions,
    description="One expression-only cell dataset under the cells root (MIHD_CELLS_ROOT): `<dataset>.h5ad`, "
    "`<dataset>.h5` (10x) or `<dataset>/` (10x MTX). Data version: the file's name, size and modification time "
    "(a folder: every file's); a new version makes `geometry/cell_placement` of that dataset unsynced.",
)
def cell_dataset_files(context):
    return changed_data_versions(context.instance, CELL_DATASET_FILES, dataset_fingerprints(context.instance))


observe_cell_datasets_job = define_asset_job(
    OBSERVE_CELLS_JOB_NAME, selection=[CELL_DATASET_FILES],
    description="Observes the cell datasets' files (a new data version makes their placement unsynced).",
)


def datasets_changed(instance: DagsterInstance, new: list[str] = ()) -> list[str]:
    """Datasets whose fingerprint differs from their last observed data version."""
    changed = []
    for dataset, fingerprint in dataset_fingerprints(instance, new).items():
        record = instance.get_latest_data_version_record(CELL_DATASET_FILES, is_source=True, partition_key=dataset)
        version = extract_data_version_from_entry(record.event_log_entry) if record else None
        if version is None or version.value != fingerprint:
            changed.append(dataset)
    return changed


@sensor(
    job=observe_cell_datasets_job,
    minimum_interval_seconds=60,
    default_status=DefaultSensorStatus.RUNNING,
    description="Registers each new cell dataset under the cells root (MIHD_CELLS_ROOT; a `.h5ad`, a 10x `.h5` "
    "or a 10x MTX folder) as a `cell_datasets` partition (names that are not valid partition keys, and a name "
    "with two sources, are refused) and observes `geometry/cell_dataset_files` when a dataset is new or changed.",
)
def cell_dataset_discovery_sensor(context: SensorEvaluationContext):
    new, refused = discover_cell_datasets(context.instance)
    for message in refused:
        context.log.warning(f"refused cell dataset: {message}")
    changed = datasets_changed(context.instance, new)
    if not changed:
        return SensorResult(skip_reason=f"no new or changed cell datasets under {settings.cells_root()}")
    if new:
        context.log.info(f"registering {len(new)} new cell dataset partition(s): {new}")
    return SensorResult(
        run_requests=[RunRequest(run_key=None, tags={"mihd/reason": f"cell datasets new or changed: {', '.join(changed)}"})],
        dynamic_partitions_requests=[cell_datasets_partitions.build_add_request(new)] if new else [],
    )
