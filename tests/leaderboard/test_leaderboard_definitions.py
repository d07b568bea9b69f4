"""The leaderboard in the platform's Definitions: its source, assets, jobs and sensor; the site
depends on every clustering's metrics and on the ingest; the sensor runs the ingest only when
the queue changed since its last observation."""

from __future__ import annotations

from dagster import AssetKey, DagsterInstance, build_sensor_context

from dagster_project.definitions import defs
from mihd_assets.fusion.assets import ALL_METRICS_KEYS
from mihd_assets.leaderboard.assets import (
    INGEST_JOB_NAME,
    LEADERBOARD_SITE,
    LEADERBOARD_SUBMISSIONS,
    OBSERVE_QUEUE_JOB_NAME,
    SUBMISSION_QUEUE,
    submission_queue_sensor,
)
from mihd_relay.queue import SubmissionQueue, queue_fingerprint
from tests.leaderboard.helpers import make_bundle


def test_leaderboard_is_wired_into_the_platform():
    graph = defs.resolve_asset_graph()
    assert graph.get(SUBMISSION_QUEUE).is_observable and not graph.get(SUBMISSION_QUEUE).is_materializable
    ingest = graph.get(LEADERBOARD_SUBMISSIONS)
    assert ingest.parent_keys == {SUBMISSION_QUEUE, AssetKey(["slides", "raw_slide"])}
    site = graph.get(LEADERBOARD_SITE)
    assert site.parent_keys == {*ALL_METRICS_KEYS, LEADERBOARD_SUBMISSIONS} and site.partitions_def is None
    assert {INGEST_JOB_NAME, OBSERVE_QUEUE_JOB_NAME} <= {j.name for j in defs.resolve_all_job_defs()}
    assert defs.resolve_sensor_def("submission_queue_sensor").job_name == INGEST_JOB_NAME
    job = defs.resolve_job_def(INGEST_JOB_NAME)
    assert job.asset_layer.executable_asset_keys == {LEADERBOARD_SUBMISSIONS, LEADERBOARD_SITE}


def test_sensor_ingests_only_a_changed_queue(tmp_path, monkeypatch):
    monkeypatch.setenv("MIHD_RELAY_QUEUE", str(tmp_path / "queue"))
    instance = DagsterInstance.ephemeral()
    with build_sensor_context(instance=instance) as context:
        empty = submission_queue_sensor(context)
    assert not empty.run_requests and "empty and was never ingested" in empty.skip_reason.skip_message
    SubmissionQueue(tmp_path / "queue", max_queued=10).receive(make_bundle({"s1": {"A-1": "x"}}), "0" * 32)
    with build_sensor_context(instance=instance) as context:
        tick = submission_queue_sensor(context)
    (request,) = tick.run_requests
    (observation,) = tick.asset_events
    assert observation.asset_key == SUBMISSION_QUEUE
    assert observation.tags["dagster/data_version"] == queue_fingerprint(tmp_path / "queue")
    instance.report_runless_asset_event(observation)
    with build_sensor_context(instance=instance) as context:
        again = submission_queue_sensor(context)
    assert not again.run_requests and "unchanged (1 files)" in again.skip_reason.skip_message
