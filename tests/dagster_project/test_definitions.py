"""The Definitions load, every asset is documented, the sensors and automation behave."""

from dagster import AssetKey, DagsterInstance, build_sensor_context

from dagster_project.definitions import AUTOMATION_SENSOR_NAME, defs
from dagster_project.sensors import slide_discovery_sensor
from mihd_resources import StorageResource
from mihd_resources.orchestration import slides_partitions

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
    "evaluation/clustering_metrics/gene_pca__mclust",
    "reports/slide_figures",
}
SOURCES = {"slides/slide_files", "segmentation/donor_tiles", "segmentation/annotations", "segmentation/clinical_outcomes",
           "geometry/cell_dataset_files"}
# The leaderboard relay's queue folder (observed by its sensor and by `mihd materialize`).
SOURCES |= {"reports/submission_queue"}
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
    assert SOURCES <= keys
    for key in graph.get_all_asset_keys():
        node = graph.get(key)
        assert node.description and len(node.description) > 40, key
        assert node.group_name, key
        if key.to_user_string() in SOURCES:
            assert node.is_observable and not node.is_materializable, key
            continue
        assert node.code_version, key
        assert node.kinds, key
        if node.group_name in PER_SLIDE_GROUPS:
            assert node.partitions_def == slides_partitions, key


def test_blocking_check_on_raw_slide():
    graph = defs.resolve_asset_graph()
    specs = {c.key.name: c for c in defs.resolve_assets_def(AssetKey(["slides", "raw_slide"])).check_specs}
    assert specs["spots_on_tissue"].blocking
    assert not graph.get(AssetKey(["slides", "slide_qc_metrics"])).pools  # concurrent metric writes need no pool


def test_sensor_registers_valid_refuses_invalid_and_observes_changes(tiny_slides, tmp_path):
    import shutil

    from dagster_project.jobs import OBSERVE_SLIDES_JOB_NAME

    for name in ("demo_01", "new slide"):
        shutil.copytree(tiny_slides / "demo_01", tmp_path / name)
    instance = DagsterInstance.ephemeral()
    storage = StorageResource(slides_root=str(tmp_path))
    with build_sensor_context(instance=instance, resources={"storage": storage}) as ctx:
        result = slide_discovery_sensor(ctx)
    (request,) = result.dynamic_partitions_requests
    assert list(request.partition_keys) == ["demo_01"]
    (run,) = result.run_requests
    assert "demo_01" in run.tags["mihd/reason"]
    instance.add_dynamic_partitions("slides", ["demo_01"])
    observed = defs.resolve_job_def(OBSERVE_SLIDES_JOB_NAME).execute_in_process(
        instance=instance, resources={"storage": storage})
    assert observed.success
    with build_sensor_context(instance=instance, resources={"storage": storage}) as ctx:
        again = slide_discovery_sensor(ctx)
    assert not again.run_requests and not again.dynamic_partitions_requests
    # A changed file is a new fingerprint: the sensor asks for an observation again.
    (tmp_path / "demo_01" / "metadata.tsv").write_text((tmp_path / "demo_01" / "metadata.tsv").read_text() + "\n")
    with build_sensor_context(instance=instance, resources={"storage": storage}) as ctx:
        changed = slide_discovery_sensor(ctx)
    assert len(changed.run_requests) == 1 and not changed.dynamic_partitions_requests


def test_every_asset_is_under_the_nightly_automation_condition():
    sensor = defs.resolve_sensor_def(AUTOMATION_SENSOR_NAME)
    label = sensor.default_condition.get_label()
    assert label == "nightly backfill"
    graph = defs.resolve_asset_graph()
    # No asset carries a condition of its own: the sensor's default applies to all of them.
    assert all(graph.get(k).automation_condition is None for k in graph.get_all_asset_keys()
               if graph.get(k).is_materializable)
    # The backfill is automation, not a schedule; the one schedule is housekeeping that targets no asset.
    assert [s.name for s in defs.schedules] == ["weekly_metrics_prune"]
    assert not defs.resolve_job_def(defs.schedules[0].job_name).asset_layer.executable_asset_keys


def test_lineage_shows_which_embeddings_feed_which_fusion():
    graph = defs.resolve_asset_graph()
    parents = graph.get(AssetKey(["fusion", "concat__pca__uni2_standard"])).parent_keys
    assert parents == {AssetKey(["embeddings", "gene_pca"]), AssetKey(["embeddings", "vision_uni2_standard"])}
    staig = graph.get(AssetKey(["fusion", "staig_fusion__hvg__uni2_staig_strict"])).parent_keys
    assert staig == {AssetKey(["slides", "preprocessed_slide_staig"]), AssetKey(["embeddings", "vision_uni2_staig_strict"])}
    report = graph.get(AssetKey(["reports", "benchmark_report"]))
    assert report.partitions_def is None
    assert AssetKey(["evaluation", "clustering_metrics", "gene_pca__mclust"]) in report.parent_keys
    raw = graph.get(AssetKey(["slides", "raw_slide"]))
    assert raw.parent_keys == {AssetKey(["slides", "slide_files"])}
    metrics = graph.get(AssetKey(["evaluation", "clustering_metrics", "gene_pca__mclust"]))
    # One clustering's metrics need that clustering only, not the whole matrix.
    assert metrics.parent_keys == {AssetKey(["clustering", "gene_pca__mclust"]), AssetKey(["slides", "raw_slide"])}
