"""Asset jobs: one per partitioning, so each run targets one slide (or donor)."""

from __future__ import annotations

from dagster import AssetsDefinition, AssetSelection, define_asset_job

from .partitions import slides_partitions

SLIDE_JOB_NAME = "slide_assets_job"


def slide_partitioned(assets: list[AssetsDefinition]) -> list[AssetsDefinition]:
    return [a for a in assets if a.partitions_def == slides_partitions]


def build_slide_job(assets: list[AssetsDefinition]):
    """Every slide-partitioned asset, whatever its family (slides, embeddings, fusion, ...)."""
    keys = [k for a in slide_partitioned(assets) for k in a.keys]
    return define_asset_job(
        SLIDE_JOB_NAME,
        selection=AssetSelection.assets(*keys),
        partitions_def=slides_partitions,
        description="Every slide-partitioned asset for one slide per run; runs skip fresh assets "
        "when launched by the backfill schedule.",
    )


REPORT_JOB_NAME = "slide_reports_job"


def build_report_job(assets: list[AssetsDefinition]):
    """The unpartitioned assets that summarise every slide (e.g. the benchmark report)."""
    keys = [k for a in assets if a.partitions_def is None for k in a.keys]
    return define_asset_job(
        REPORT_JOB_NAME,
        selection=AssetSelection.assets(*keys),
        description="Cross-slide summaries (benchmark report); run after the slide job.",
    )
