"""The geometry assets through Dagster on three tiny demo slides: lineage, files, checks, DuckDB."""

from dataclasses import replace

import duckdb
import numpy as np
import pytest
from dagster import AssetKey, DagsterInstance, materialize
from dagster_duckdb import DuckDBResource

from dagster_project.definitions import defs
from mihd_assets.geometry import assets as geo
from mihd_assets.geometry import config as geo_config
from mihd_assets.geometry.targets import GeometryTrainingSet
from mihd_assets.geometry.train import read_checkpoint
from mihd_assets.slides.assets import raw_slide
from mihd_resources import AnnDataIOManager, ComputeResource, MetricsStore, StorageResource
from mihd_resources.compute import DEVICE_CHECK
from mihd_resources.geometry_store import CHECKPOINT, TRAINING_SET, GeometryStore
from mihd_resources.step_executor import StepExecutor

SLIDES = ["demo_01", "demo_02", "demo_03"]
GEOMETRY_ASSETS = [geo.geometry_training_set, geo.geometry_checkpoint, geo.geometry_evaluation, geo.geometry_metrics]
# The tiny slides have ~150 spots: sets of 24-40, a network of width 32.
MICRO = replace(geo_config.SIZES["tiny"], width=32, inducing=8, context_blocks=1, generator_blocks=1,
                denoiser_blocks=1, set_size_min=24, set_size_max=40, n_sets_train=64, n_sets_heldout=4,
                train=replace(geo_config.SIZES["tiny"].train, batch_size=8, warmup_steps=5, checkpoint_every=10, log_every=10))


@pytest.fixture(scope="module")
def geometry_home(tmp_path_factory):
    from mihd_assets.demo.visium import generate_demo_slides, tiny_spec

    root = tmp_path_factory.mktemp("geo")
    generate_demo_slides(root / "slides", n_slides=3, spec=tiny_spec())
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", SLIDES)
    resources = {
        "storage": StorageResource(slides_root=str(root / "slides")),
        "anndata_io_manager": AnnDataIOManager(base_dir=str(root / "storage")),
        "metrics": MetricsStore(duckdb=DuckDBResource(database=str(root / "mihd.duckdb"))),
        "compute": ComputeResource(device="cpu", batch_size=8, torch_threads=1),
        "step_executor": StepExecutor(),
        "store": GeometryStore(base_dir=str(root / "storage")),
    }
    for slide in SLIDES:
        assert materialize([raw_slide], partition_key=slide, resources=resources, instance=instance).success
    return root, instance, resources


def _materialize(home, steps, monkeypatch, selection=None):
    root, instance, resources = home
    monkeypatch.setitem(geo_config.SIZES, "tiny", MICRO)
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    return materialize(
        [raw_slide, *GEOMETRY_ASSETS],
        selection=selection or [a.key for a in GEOMETRY_ASSETS],
        resources=resources,
        instance=instance,
        run_config={"ops": {"geometry__geometry_checkpoint": {"config": {"steps": steps}}}},
    )


def test_definitions_wire_the_family():
    graph = defs.resolve_asset_graph()
    ts = graph.get(geo.TRAINING_SET_KEY)
    assert ts.parent_keys == {AssetKey(["slides", "raw_slide"])} and ts.partitions_def is None
    assert graph.get(geo.CHECKPOINT_KEY).pools == {"gpu"}
    assert not graph.get(geo.METRICS_KEY).pools  # metric writes need no pool (one Parquet file per write)
    assert graph.get(geo.EVALUATION_KEY).parent_keys == {geo.CHECKPOINT_KEY, geo.TRAINING_SET_KEY}
    job = defs.resolve_job_def("geometry_job")
    assert set(job.asset_layer.executable_asset_keys) == {a.key for a in GEOMETRY_ASSETS}


def test_materialize_writes_checkpoint_evaluation_and_duckdb(geometry_home, monkeypatch):
    root, instance, _ = geometry_home
    result = _materialize(geometry_home, 20, monkeypatch)
    assert result.success
    ts_meta = result.asset_materializations_for_node("geometry__geometry_training_set")[0].metadata
    assert ts_meta["train_slides"].value == ["demo_01", "demo_02"] and ts_meta["heldout_slides"].value == ["demo_03"]
    # sigma_data is the RMS of the training sets' target coordinates (held-out sets left out).
    stored_ts = GeometryTrainingSet.load(root / "storage" / "geometry" / TRAINING_SET)
    train_targets = stored_ts.train.targets[stored_ts.train.mask].astype(np.float64)
    assert ts_meta["sigma_data"].value == pytest.approx(np.sqrt((train_targets**2).mean()), abs=1e-5)
    ck_meta = result.asset_materializations_for_node("geometry__geometry_checkpoint")[0].metadata
    assert ck_meta["step"].value == 20 and ck_meta["device"].value == "cpu" and ck_meta["size"].value == "tiny"
    assert {"gen_align", "score", "total"} <= set(ck_meta["losses"].value)
    saved = read_checkpoint(root / "storage" / "geometry" / CHECKPOINT)
    assert saved["encoder"]["kind"] == "shared_pca" and len(saved["encoder"]["genes"]) > 10
    checks = {c.check_name: c for c in result.get_asset_check_evaluations() if c.asset_key == geo.EVALUATION_KEY}
    assert set(checks) == {geo.BEATS_BASELINES, geo.REFINED_NOT_WORSE, geo.LOW_SIGMA_SCALE, DEVICE_CHECK}
    # compute.device='cpu' and nothing expects a GPU: both GPU steps pass device_as_requested
    assert {c.asset_key: c.passed for c in result.get_asset_check_evaluations() if c.check_name == DEVICE_CHECK} \
        == {geo.CHECKPOINT_KEY: True, geo.EVALUATION_KEY: True}

    with duckdb.connect(str(root / "mihd.duckdb"), read_only=True) as con:
        methods = {r[0] for r in con.execute("SELECT DISTINCT method FROM geometry_metrics").fetchall()}
        assert methods == {"generator", "refined", "full_sampler", "denoiser", "random", "expression_spectral"}
        bins = con.execute("SELECT sigma_bin FROM geometry_scale_by_sigma ORDER BY sigma_lo").fetchall()
        assert [b[0] for b in bins] == ["[0.00,0.10)", "[0.10,0.30)", "[0.30,0.50)", "[0.50,1.00)", "[1.00,inf)"]
        rows = con.execute("SELECT slide_id, method, knn_jaccard, n_sets FROM geometry_methods_latest").fetchall()
        stored = dict(con.execute("SELECT method, knn_jaccard FROM geometry_metrics WHERE sigma_bin = '' "
                                  "AND slide_id = 'demo_03'").fetchall())
        low_scale = con.execute("SELECT scale_ratio FROM geometry_metrics WHERE method = 'denoiser' AND sigma_hi <= 0.1 "
                                "AND slide_id = 'demo_03'").fetchall()
        assert {r[0] for r in rows} == {"demo_03"} and all(r[3] == 4 for r in rows)
        # The view's rounded Jaccard is the stored one, and it is sorted best first.
        assert [r[2] for r in rows] == sorted((round(stored[r[1]], 4) for r in rows), reverse=True)
        run = con.execute("SELECT step, resumed_from_step, device, size FROM geometry_training_runs").fetchall()
        assert run == [(20, 0, "cpu", "tiny")]
    # The checks judge the same numbers that reached DuckDB, with their stated rules.
    assert checks[geo.BEATS_BASELINES].metadata["knn_jaccard"].value == {
        "demo_03": {m: round(stored[m], 4) for m in ("generator", "refined", "random", "expression_spectral")}}
    assert checks[geo.BEATS_BASELINES].passed == (stored["generator"] > max(stored["random"], stored["expression_spectral"]))
    assert checks[geo.REFINED_NOT_WORSE].passed == (stored["refined"] >= stored["generator"])
    assert len(low_scale) == 1 and checks[geo.LOW_SIGMA_SCALE].passed == (0.8 <= low_scale[0][0] <= 1.25)

    # More steps: the next materialization continues from the stored checkpoint.
    again = _materialize(geometry_home, 30, monkeypatch, selection=[geo.CHECKPOINT_KEY])
    meta = again.asset_materializations_for_node("geometry__geometry_checkpoint")[0].metadata
    assert meta["resumed_from_step"].value == 20 and meta["step"].value == 30


def test_evaluation_checks_pass_for_a_winning_checkpoint_and_fail_for_a_losing_one(geometry_home, monkeypatch):
    """The evaluation asset attaches the checks computed from its frame: the metrics are
    crafted (``evaluate`` returns a known frame) so the right outcome is known."""
    from mihd_assets.geometry import evaluate as geo_evaluate

    from .test_evaluation_checks import evaluation_frame, scores

    root, instance, resources = geometry_home
    if not (root / "storage" / "geometry" / CHECKPOINT).exists():  # this test run alone
        assert _materialize(geometry_home, 10, monkeypatch, selection=[geo.TRAINING_SET_KEY, geo.CHECKPOINT_KEY]).success
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    winning = evaluation_frame({"demo_03": scores(0.40, 0.41, 0.05, 0.25)}, {"demo_03": 1.05})
    losing = evaluation_frame({"demo_03": scores(0.20, 0.15, 0.05, 0.25)}, {"demo_03": 1.6})
    for frame, passed in ((winning, True), (losing, False)):
        monkeypatch.setattr(geo_evaluate, "evaluate", lambda *args, frame=frame, **kwargs: frame.copy())
        result = materialize([raw_slide, *GEOMETRY_ASSETS], selection=[geo.EVALUATION_KEY], resources=resources,
                             instance=instance)
        assert result.success
        checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
        assert checks == {geo.BEATS_BASELINES: passed, geo.REFINED_NOT_WORSE: passed, geo.LOW_SIGMA_SCALE: passed,
                          DEVICE_CHECK: True}


def test_per_slide_gene_encoders_are_refused():
    from mihd_assets.geometry.encoder import standardize_embeddings
    from mihd_assets.geometry.targets import GeometryInputError

    with pytest.raises(GeometryInputError, match="fitted per slide"):
        standardize_embeddings("pca", {}, [])
