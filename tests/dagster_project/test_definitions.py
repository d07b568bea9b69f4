"""The Definitions load, every asset is documented, the sensor and schedule behave."""

from datetime import datetime, timezone

from dagster import AssetKey, DagsterInstance, build_schedule_context, build_sensor_context

from dagster_project.definitions import defs
from dagster_project.partitions import slides_partitions
from dagster_project.schedules import slide_backfill_schedule
from dagster_project.sensors import slide_discovery_sensor
from mihd_resources import StorageResource

EXPECTED_ASSETS = {
    "slides/raw_slide",
    "slides/preprocessed_slide_standard",
    "slides/preprocessed_slide_staig",
    "slides/slide_qc_metrics",
    "fusion/staig_fusion__hvg__uni2_staig_strict",
    "fusion/concat__pca__uni2_standard",
    "clustering/gene_pca__mclust",
    "clustering/staig_fusion__hvg__uni2_staig_strict__mclust",
    "clustering/image_only__scan__uni2_standard",
    "evaluation/clustering_metrics",
    "reports/slide_figures",
}
# Per-slide work stays partitioned by slide; families that summarise or learn across slides
# or donors (geometry, reports, ...) may be unpartitioned and read partitions through mappings.
PER_SLIDE_GROUPS = {"slides", "embeddings"}


def test_workspace_loads_as_the_webserver_loads_it():
    """The webserver and daemon load ``workspace.yaml``; Dagster refuses a module with two
    module-scope Definitions, and the UI then shows an empty graph. Validate it the real way."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    dagster = Path(sys.executable).with_name("dagster")
    proc = subprocess.run(
        [str(dagster), "definitions", "validate", "-w", "workspace.yaml"],
        cwd=repo, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def test_asset_keys_snapshot_and_documentation():
    graph = defs.resolve_asset_graph()
    keys = {k.to_user_string() for k in graph.get_all_asset_keys()}
    assert EXPECTED_ASSETS <= keys
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and len(node.description) > 40, key
        assert node.group_name, key
        assert node.code_version, key
        assert node.kinds, key
        if node.group_name in PER_SLIDE_GROUPS:
            assert node.partitions_def == slides_partitions, key


def test_blocking_check_on_raw_slide():
    graph = defs.resolve_asset_graph()
    specs = {c.key.name: c for c in defs.resolve_assets_def(AssetKey(["slides", "raw_slide"])).check_specs}
    assert specs["spots_on_tissue"].blocking
    assert graph.get(AssetKey(["slides", "slide_qc_metrics"])).pools == {"duckdb_writer"}


def test_sensor_registers_valid_and_refuses_invalid(tiny_slides, tmp_path):
    import shutil

    for name in ("demo_01", "new slide"):
        shutil.copytree(tiny_slides / "demo_01", tmp_path / name)
    instance = DagsterInstance.ephemeral()
    storage = StorageResource(slides_root=str(tmp_path))
    with build_sensor_context(instance=instance, resources={"storage": storage}) as ctx:
        result = slide_discovery_sensor(ctx)
    (request,) = result.dynamic_partitions_requests
    assert list(request.partition_keys) == ["demo_01"]
    assert [r.partition_key for r in result.run_requests] == ["demo_01"]
    instance.add_dynamic_partitions("slides", ["demo_01"])
    with build_sensor_context(instance=instance, resources={"storage": storage}) as ctx:
        again = slide_discovery_sensor(ctx)
    assert not again.run_requests and not again.dynamic_partitions_requests


def test_schedule_requests_runs_for_missing_partitions(tiny_slides, tmp_path):
    instance = DagsterInstance.local_temp(str(tmp_path))
    instance.add_dynamic_partitions("slides", ["demo_01", "demo_02"])
    with build_schedule_context(
        instance=instance,
        repository_def=defs.get_repository_def(),
        resources={"storage": StorageResource(slides_root=str(tiny_slides))},
        scheduled_execution_time=datetime(2026, 11, 21, 2, 0, tzinfo=timezone.utc),
    ) as ctx:
        requests = list(slide_backfill_schedule.evaluate_tick(ctx).run_requests)
    assert sorted(r.partition_key for r in requests) == ["demo_01", "demo_02"]
    job = defs.resolve_job_def("slide_assets_job")
    assert set(requests[0].asset_selection) == set(job.asset_layer.executable_asset_keys)
    assert EXPECTED_ASSETS <= {k.to_user_string() for k in requests[0].asset_selection}


def test_lineage_shows_which_embeddings_feed_which_fusion():
    graph = defs.resolve_asset_graph()
    parents = graph.get(AssetKey(["fusion", "concat__pca__uni2_standard"])).parent_keys
    assert parents == {AssetKey(["embeddings", "gene_pca"]), AssetKey(["embeddings", "vision_uni2_standard"])}
    staig = graph.get(AssetKey(["fusion", "staig_fusion__hvg__uni2_staig_strict"])).parent_keys
    assert staig == {AssetKey(["slides", "preprocessed_slide_staig"]), AssetKey(["embeddings", "vision_uni2_staig_strict"])}
    report = graph.get(AssetKey(["reports", "benchmark_report"]))
    assert report.partitions_def is None and AssetKey(["evaluation", "clustering_metrics"]) in report.parent_keys
