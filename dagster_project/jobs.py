"""Asset jobs: one per partitioning (each run targets one slide), and the slide files' observation."""

from __future__ import annotations

from dagster import AssetsDefinition, AssetSelection, define_asset_job

from mihd_assets.slides.assets import SLIDE_FILES
from mihd_resources.orchestration import slides_partitions

SLIDE_JOB_NAME = "slide_assets_job"
REPORT_JOB_NAME = "slide_reports_job"
OBSERVE_SLIDES_JOB_NAME = "slides_observe_sources_job"


def build_slide_job(assets: list[AssetsDefinition]):
    """Every slide-partitioned asset, whatever its family (slides, embeddings, fusion, ...)."""
    keys = [k for a in assets if a.partitions_def == slides_partitions for k in a.keys]
    return define_asset_job(
        SLIDE_JOB_NAME,
        selection=AssetSelection.assets(*keys),
        partitions_def=slides_partitions,
        description="Every slide-partitioned asset for one slide per run.",
    )


def build_report_job(assets: list[AssetsDefinition]):
    """The unpartitioned assets that summarise every slide (e.g. the benchmark report)."""
    keys = [k for a in assets if a.partitions_def is None for k in a.keys]
    return define_asset_job(
        REPORT_JOB_NAME,
        selection=AssetSelection.assets(*keys),
        description="Cross-slide summaries (benchmark report).",
    )


observe_slides_job = define_asset_job(
    OBSERVE_SLIDES_JOB_NAME,
    selection=[SLIDE_FILES],
    description="Observes every registered slide folder; a changed fingerprint is a new data version of "
    "`slides/slide_files` and makes that slide's `raw_slide` unsynced.",
)
