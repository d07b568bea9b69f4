"""The leaderboard family's Definitions: the queue source, the ingest and site assets, their
jobs and the queue sensor (merged by dagster_project/families.py; resources come from the
platform's: `metrics`, `anndata_io_manager`)."""

from __future__ import annotations

from dagster import Definitions

from .assets import (
    leaderboard_ingest_job,
    leaderboard_site,
    leaderboard_submissions,
    observe_queue_job,
    submission_queue,
    submission_queue_sensor,
)

defs = Definitions(
    assets=[submission_queue, leaderboard_submissions, leaderboard_site],
    jobs=[leaderboard_ingest_job, observe_queue_job],
    sensors=[submission_queue_sensor],
)


def missing_inputs(instance) -> str | None:
    """The leaderboard always runs: an empty or absent queue ingests as no submissions."""
    return None
