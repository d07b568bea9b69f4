"""The segmentation family's Definitions: E0-E5 assets, their input sources, jobs and the donor sensor."""

from __future__ import annotations

from dagster import AssetSelection, Definitions, define_asset_job, load_assets_from_modules

from . import assets as segmentation_assets
from .partitions import SOURCES, donor_discovery_sensor, donors_partitions, observe_sources_job

BENCHMARK_JOB_NAME = "segmentation_benchmark_job"
SUMMARY_JOB_NAME = "segmentation_summary_job"
E5_DONOR_JOB_NAME = "segmentation_e5_donor_job"

all_assets = load_assets_from_modules([segmentation_assets])
E5_DONOR_KEYS = [segmentation_assets.E5_COUNTS, segmentation_assets.seg_key("e5_tile_counts_metrics")]
SUMMARY_KEYS = [segmentation_assets.E5_STATS, segmentation_assets.REPORT]
BENCHMARK_KEYS = [
    k for a in all_assets for k in a.keys if k not in E5_DONOR_KEYS and k not in SUMMARY_KEYS
]

benchmark_job = define_asset_job(
    BENCHMARK_JOB_NAME, selection=AssetSelection.assets(*BENCHMARK_KEYS),
    description="E0-E4: split, Cellpose format, checkpoints, test predictions, budget curve, gating, AMG sweep, metrics.",
)
e5_donor_job = define_asset_job(
    E5_DONOR_JOB_NAME, selection=AssetSelection.assets(*E5_DONOR_KEYS), partitions_def=donors_partitions,
    description="E5 tile counts of one donor (baseline and fine-tuned) and their DuckDB rows.",
)
summary_job = define_asset_job(
    SUMMARY_JOB_NAME, selection=AssetSelection.assets(*SUMMARY_KEYS),
    description="E5 donor-level statistics over every donor with counts, then the E1-E5 report.",
)

defs = Definitions(
    assets=[*SOURCES, *all_assets],
    jobs=[benchmark_job, e5_donor_job, summary_job, observe_sources_job],
    sensors=[donor_discovery_sensor],
)


def missing_inputs(instance) -> str | None:
    """Why the segmentation assets cannot run here, or None."""
    from mihd_resources import settings

    if not settings.tiles_root().is_dir():
        return f"no tiles root at {settings.tiles_root()} (set MIHD_TILES_ROOT; `mihd demo` writes demo tiles)"
    return None
