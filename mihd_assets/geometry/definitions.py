"""The geometry family's Definitions: its assets, its job, its file store (merged by families.py)."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, load_assets_from_modules

from mihd_resources import settings
from mihd_resources.geometry_store import GeometryStore

from . import assets as geometry_assets

GEOMETRY_JOB_NAME = "geometry_job"

geometry_job = define_asset_job(
    GEOMETRY_JOB_NAME,
    selection=AssetSelection.groups(geometry_assets.GROUP),
    description="Training set -> checkpoint -> held-out evaluation -> DuckDB, across the plan's slides.",
)

defs = Definitions(
    assets=load_assets_from_modules([geometry_assets]),
    jobs=[geometry_job],
    resources={"store": GeometryStore(base_dir=str(settings.storage_root()))},
)
