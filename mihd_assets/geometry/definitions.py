"""The geometry family's Definitions: its assets, its jobs, the cell dataset sensor, its file store
(merged by families.py)."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, load_assets_from_modules

from mihd_resources import settings
from mihd_resources.geometry_store import GeometryStore

from . import assets as geometry_assets
from .cell_datasets import (
    cell_dataset_discovery_sensor,
    cell_dataset_files,
    cell_datasets_partitions,
    observe_cell_datasets_job,
)
from .placement_assets import PLACEMENT_ASSETS

GEOMETRY_JOB_NAME = "geometry_job"
CELL_PLACEMENT_JOB_NAME = "cell_placement_job"
PLACEMENT_KEYS = [a.key for a in PLACEMENT_ASSETS]

geometry_job = define_asset_job(
    GEOMETRY_JOB_NAME,
    selection=AssetSelection.groups(geometry_assets.GROUP) - AssetSelection.assets(*PLACEMENT_KEYS),
    description="Training set -> checkpoint -> held-out evaluation -> DuckDB, across the plan's slides.",
)
cell_placement_job = define_asset_job(
    CELL_PLACEMENT_JOB_NAME,
    selection=AssetSelection.assets(*PLACEMENT_KEYS),
    partitions_def=cell_datasets_partitions,
    description="One cell dataset: its placement with the geometry checkpoint, and its score on hidden positions.",
)

defs = Definitions(
    assets=[*load_assets_from_modules([geometry_assets]), cell_dataset_files, *PLACEMENT_ASSETS],
    jobs=[geometry_job, cell_placement_job, observe_cell_datasets_job],
    sensors=[cell_dataset_discovery_sensor],
    resources={"store": GeometryStore(base_dir=str(settings.storage_root()))},
)


def missing_inputs(instance) -> str | None:
    """Why the geometry assets cannot run on this instance's slides, or None."""
    from mihd_resources.orchestration import slides_partitions

    from .assets import PLAN

    registered = set(instance.get_dynamic_partitions(slides_partitions.name))
    absent = [s for s in PLAN.train_slides + PLAN.heldout_slides if s not in registered]
    if absent:
        return (f"the geometry plan's slides {absent} are not registered slide partitions; set "
                "MIHD_GEOMETRY_TRAIN_SLIDES / MIHD_GEOMETRY_HELDOUT_SLIDES to slides under the data root")
    return None
