"""The one Definitions object of the MIHD platform (loaded by workspace.yaml)."""

from __future__ import annotations

from dagster import Definitions, load_assets_from_modules

from mihd_assets.embeddings import assets as embedding_assets
from mihd_assets.slides import assets as slide_assets

from .jobs import build_slide_job
from .resources import build_resources
from .schedules import slide_backfill_schedule
from .sensors import slide_discovery_sensor

all_assets = load_assets_from_modules([slide_assets, embedding_assets])

defs = Definitions(
    assets=all_assets,
    jobs=[build_slide_job(all_assets)],
    sensors=[slide_discovery_sensor],
    schedules=[slide_backfill_schedule],
    resources=build_resources(),
)
