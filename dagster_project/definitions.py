"""The one Definitions object of the MIHD platform (loaded by workspace.yaml).

The slide pipeline (slides, embeddings, fusion) is assembled here; the other research
families bring their own ``Definitions`` (see ``families.py``) and are merged in.
"""

from __future__ import annotations

from dagster import Definitions, load_assets_from_modules

from mihd_assets.embeddings import assets as embedding_assets
from mihd_assets.fusion import assets as fusion_assets
from mihd_assets.reports import assets as report_assets
from mihd_assets.slides import assets as slide_assets

from .families import family_definitions
from .jobs import build_report_job, build_slide_job
from .resources import build_resources
from .schedules import slide_backfill_schedule
from .sensors import slide_discovery_sensor

all_assets = load_assets_from_modules([slide_assets, embedding_assets, fusion_assets, report_assets])

# Dagster's module loader refuses a module with two Definitions objects at module scope,
# so the slide pipeline's own Definitions is built inside the merge, never bound to a name.
defs = Definitions.merge(
    Definitions(
        assets=all_assets,
        jobs=[build_slide_job(all_assets), build_report_job(all_assets)],
        sensors=[slide_discovery_sensor],
        schedules=[slide_backfill_schedule],
        resources=build_resources(),
    ),
    *family_definitions(),
)
