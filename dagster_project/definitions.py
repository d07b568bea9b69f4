"""The one Definitions object of the MIHD platform (loaded by workspace.yaml).

The slide pipeline (slides, embeddings, fusion, evaluation, reports) is assembled here; the
other research families bring their own ``Definitions`` (see ``families.py``) and are merged
in. One automation sensor applies the nightly condition to every asset, so the UI's
Automation page says why each asset partition was requested.
"""

from __future__ import annotations

from dagster import (
    AssetSelection,
    AssetsDefinition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Definitions,
    load_assets_from_modules,
)

from mihd_assets.embeddings import assets as embedding_assets
from mihd_assets.fusion import assets as fusion_assets
from mihd_assets.reports import assets as report_assets
from mihd_assets.slides import assets as slide_assets
from mihd_resources.orchestration import nightly_condition

from .families import family_definitions
from .jobs import build_report_job, build_slide_job, observe_slides_job
from .k8s_jobs import k8s_jobs
from .maintenance import metrics_prune_job, metrics_prune_schedule
from .resources import build_resources
from .sensors import slide_discovery_sensor

AUTOMATION_SENSOR_NAME = "nightly_backfill_automation"

all_assets = load_assets_from_modules([slide_assets, embedding_assets, fusion_assets, report_assets])
slide_pipeline_assets = [a for a in all_assets if isinstance(a, AssetsDefinition)]

nightly_backfill_automation = AutomationConditionSensorDefinition(
    AUTOMATION_SENSOR_NAME,
    # Assets only: their checks run in the asset's own step whenever it is requested (Dagster's
    # default condition operands such as code_version_changed() are defined for assets alone).
    target=AssetSelection.all().without_checks(),
    default_condition=nightly_condition(),
    use_user_code_server=True,
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=60,
    description="Requests new slides' and donors' assets at once, and every night (02:00-08:00 UTC) whatever "
    "Dagster reports missing or unsynced (new code version, new upstream data), children after their parents; "
    "never downstream of a failed blocking check. See each asset's Automation tab for why it was requested.",
)

# Dagster's module loader refuses a module with two Definitions objects at module scope,
# so the slide pipeline's own Definitions is built inside the merge, never bound to a name.
defs = Definitions.merge(
    Definitions(
        assets=all_assets,
        jobs=[build_slide_job(slide_pipeline_assets), build_report_job(slide_pipeline_assets), observe_slides_job,
              metrics_prune_job, *k8s_jobs()],
        schedules=[metrics_prune_schedule],
        sensors=[slide_discovery_sensor, nightly_backfill_automation],
        resources=build_resources(),
    ),
    *family_definitions(),
)
