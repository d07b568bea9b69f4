"""The geometry and segmentation GPU steps say where they ran, as the embeddings do
(``tests/hardening/test_fallbacks.py``): through ``ComputeResource.run`` each records
``device_requested`` / ``device_used`` / ``gpu_expected_by`` in its metadata and in the DuckDB
rows written from it, logs a CPU run of the ``gpu`` pool at WARNING, and carries the WARN check
``device_as_requested``.

- ``compute.device='auto'`` on this CUDA-less machine, nothing expecting a GPU: the check passes
  and says that no GPU was requested.
- A GPU expected but CPU used: ``compute.device='cuda'`` without CUDA is an error (never a CPU
  run), so the case is the one compute.py records - a Slurm family with ``gpus > 0`` whose job
  runs on CPU (``compute.device='cpu'`` on the node Slurm gave GPUs to; on a CUDA-less node
  ``auto`` gives the same). The Slurm executor's job submission is replaced by an in-process
  stand-in (the step's function through cloudpickle, as the job's call file); everything before
  it - reading the family's ``gpus`` from the settings file - is the real code.
"""

from __future__ import annotations

import json
import logging

import cloudpickle
import duckdb
import pytest
import torch
import yaml
from dagster import AssetKey, DagsterInstance, materialize
from dagster_duckdb import DuckDBResource

from mihd_assets.geometry import assets as geo
from mihd_assets.geometry import evaluate as geo_evaluate
from mihd_assets.geometry.targets import assemble_training_set
from mihd_resources import ComputeResource, MetricsStore
from mihd_resources.compute import DEVICE_CHECK
from mihd_resources.geometry_store import CHECKPOINT_RECORD, TRAINING_SET, GeometryStore
from mihd_resources.step_executor import StepExecutor
from mihd_resources.weights import ModelWeightsResource
from tests.geometry.conftest import synthetic_slides
from tests.geometry.test_evaluation_checks import evaluation_frame, scores
from tests.hardening.test_incompatible_checkpoint import MICRO
from tests.segmentation.test_e0_e4_chain import chain as seg_chain  # noqa: F401 (a fixture)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="device='auto' resolves to CUDA on this machine")
NO_GPU_REQUESTED = ("no GPU was requested: compute.device='auto' found no CUDA device and no Slurm or Kubernetes "
                    "setting expects one; ran on cpu")
POOL_WARNING = "a step of the 'gpu' pool runs on cpu: compute.device='auto'"


def _warnings(instance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.level >= logging.WARNING]


def _device_checks(result) -> dict:
    return {c.asset_key: c for c in result.get_asset_check_evaluations() if c.check_name == DEVICE_CHECK}


def _facts(meta) -> tuple:
    return meta["device_requested"].value, meta["device_used"].value, meta["gpu_expected_by"].value


def _slurm_with_gpus(tmp_path, family: str, monkeypatch) -> tuple[StepExecutor, str]:
    """A Slurm step executor whose settings give ``family`` one GPU, its jobs run by an
    in-process stand-in; and what ``gpu_expectation`` says of it."""
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "slurm_work"), "families": {family: {"gpus": 1}}}))

    def run_job_here(self, context, family, fn):
        return cloudpickle.loads(cloudpickle.dumps(fn))(context.log), {"slurm_job_id": "stand-in"}

    monkeypatch.setattr(StepExecutor, "_run_slurm", run_job_here)
    return (StepExecutor(executor="slurm", slurm_config=str(path)),
            f"Slurm family '{family}' requests 1 GPU(s) (--gres=gpu)")


def _assert_fails_where_a_gpu_was_expected(result, key, instance, expected: str):
    check = _device_checks(result)[key]
    assert not check.passed and check.severity.value == "WARN"
    assert check.description == f"ran on cpu although {expected}"
    assert {k: v.value for k, v in check.metadata.items()} == {
        "device_requested": "cpu", "device_used": "cpu", "gpu_expected_by": expected}
    step = key.to_user_string()
    assert any(step in m and f"runs on cpu although {expected}" in m
               for m in _warnings(instance, result.run_id)), _warnings(instance, result.run_id)


# ---------------------------------------------------------------- geometry


@pytest.fixture
def geometry(tmp_path, monkeypatch):
    """A stored micro training set; the evaluation's metrics are a known frame (``evaluate`` is
    the only stand-in: the checkpoint trains and the evaluation loads it for real)."""
    from mihd_assets.geometry import config as geo_config

    torch.set_num_threads(1)
    monkeypatch.setitem(geo_config.SIZES, "tiny", MICRO)
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    store = GeometryStore(base_dir=str(tmp_path / "storage"))
    assemble_training_set(synthetic_slides(n_side=8), dims=2, n_sets_train=16, n_sets_heldout=2, size_min=12,
                          size_max=20, seed=0).save(store.path(TRAINING_SET))
    frame = evaluation_frame({"s2": scores(0.40, 0.41, 0.05, 0.25)}, {"s2": 1.05})
    monkeypatch.setattr(geo_evaluate, "evaluate", lambda *args, **kwargs: frame.copy())
    metrics = MetricsStore(duckdb=DuckDBResource(database=str(tmp_path / "m.duckdb")))
    return store, metrics, tmp_path / "m.duckdb"


GEOMETRY = [geo.geometry_checkpoint, geo.geometry_evaluation, geo.geometry_metrics]


def _geometry_run(store, metrics, compute, step_executor, instance):
    return materialize(GEOMETRY, instance=instance, resources={
        "compute": compute, "store": store, "step_executor": step_executor, "metrics": metrics},
        run_config={"ops": {"geometry__geometry_checkpoint": {"config": {"steps": 4}}}})


def _geometry_rows(database) -> tuple[set, set]:
    with duckdb.connect(str(database), read_only=True) as con:
        runs = set(con.execute("SELECT device, device_requested, device_used, gpu_expected_by "
                               "FROM geometry_training_runs").fetchall())
        evaluated = set(con.execute("SELECT device_requested, device_used, gpu_expected_by FROM geometry_metrics")
                        .fetchall())
    return runs, evaluated


@no_cuda
def test_geometry_gpu_steps_on_cpu_with_no_gpu_expected_warn_record_and_pass(geometry):
    store, metrics, database = geometry
    instance = DagsterInstance.ephemeral()
    result = _geometry_run(store, metrics, ComputeResource(device="auto", batch_size=8, torch_threads=1),
                           StepExecutor(), instance)
    assert result.success
    warnings = _warnings(instance, result.run_id)
    for key in (geo.CHECKPOINT_KEY, geo.EVALUATION_KEY):
        assert any(key.to_user_string() in m and POOL_WARNING in m for m in warnings), (key, warnings)
        meta = result.asset_materializations_for_node(key.to_python_identifier())[0].metadata
        assert _facts(meta) == ("auto", "cpu", "") and meta["device"].value == "cpu"
    checks = _device_checks(result)
    assert set(checks) == {geo.CHECKPOINT_KEY, geo.EVALUATION_KEY}
    for check in checks.values():
        assert check.passed and check.severity.value == "WARN"
        assert check.description == NO_GPU_REQUESTED
        assert {k: v.value for k, v in check.metadata.items()} == {
            "device_requested": "auto", "device_used": "cpu", "gpu_expected_by": ""}
    # the evaluation keeps its own three checks beside the device check
    assert {c.check_name for c in result.get_asset_check_evaluations() if c.asset_key == geo.EVALUATION_KEY} == {
        geo.BEATS_BASELINES, geo.REFINED_NOT_WORSE, geo.LOW_SIGMA_SCALE, DEVICE_CHECK}
    record = json.loads(store.path(CHECKPOINT_RECORD).read_text())
    assert (record["device"], record["device_requested"], record["device_used"], record["gpu_expected_by"],
            record["amp_dtype"]) == ("cpu", "auto", "cpu", "", "float32")
    assert _geometry_rows(database) == ({("cpu", "auto", "cpu", "")}, {("auto", "cpu", "")})


def test_geometry_steps_on_cpu_where_slurm_gives_the_family_a_gpu_fail_the_device_check(geometry, tmp_path,
                                                                                         monkeypatch):
    store, metrics, database = geometry
    slurm, expected = _slurm_with_gpus(tmp_path, "geometry", monkeypatch)
    instance = DagsterInstance.ephemeral()
    result = _geometry_run(store, metrics, ComputeResource(device="cpu", batch_size=8, torch_threads=1), slurm,
                           instance)
    assert result.success
    for key in (geo.CHECKPOINT_KEY, geo.EVALUATION_KEY):
        _assert_fails_where_a_gpu_was_expected(result, key, instance, expected)
        meta = result.asset_materializations_for_node(key.to_python_identifier())[0].metadata
        assert _facts(meta) == ("cpu", "cpu", expected) and meta["slurm_job_id"].value == "stand-in"
    assert _geometry_rows(database) == ({("cpu", "cpu", "cpu", expected)}, {("cpu", "cpu", expected)})


# ---------------------------------------------------------------- segmentation


def _seg_key(name: str) -> AssetKey:
    return AssetKey(["segmentation", name])


@pytest.fixture
def cohort(tmp_path, monkeypatch):
    """The hand-drawn five-donor cohort of the E0-E4 chain test, split, with the baseline's
    random tiny network (no GPU step so far)."""
    from mihd_assets.segmentation.definitions import all_assets
    from tests.segmentation.test_e0_e4_chain import _write_cohort

    torch.set_num_threads(1)
    root = tmp_path / "cohort"
    _write_cohort(root)
    for name, value in {"MIHD_HOME": tmp_path / "home", "MIHD_TILES_ROOT": root / "tiles",
                        "MIHD_ANNOTATIONS_ROOT": root / "annotations", "MIHD_PROFILE": "demo",
                        "MIHD_SEG_EPOCHS": "2"}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("MIHD_CELLPOSE_WEIGHTS", "MIHD_STORAGE", "MIHD_DUCKDB", "MIHD_EXECUTOR", "MIHD_SEG_MARKER_THRESHOLD"):
        monkeypatch.delenv(name, raising=False)
    resources = {"metrics": MetricsStore(duckdb=DuckDBResource(database=str(tmp_path / "m.duckdb"))),
                 "compute": ComputeResource(device="cpu"), "step_executor": StepExecutor(),
                 "weights": ModelWeightsResource(allow_random=True)}
    instance = DagsterInstance.ephemeral()
    setup = materialize(all_assets, instance=instance, resources=resources, selection=[
        _seg_key("e0_donor_split"), _seg_key("e0_training_set"), _seg_key("e1_checkpoint_baseline")])
    assert setup.success
    return all_assets, instance, resources, tmp_path / "m.duckdb"


@no_cuda
def test_segmentation_gpu_steps_on_cpu_with_no_gpu_expected_warn_record_and_pass(cohort):
    """The generic fine-tune and one donor's E5 counts: checks, metadata, the manifest, and the
    tile_counts rows."""
    from mihd_assets.segmentation import assets as seg
    from mihd_assets.segmentation.partitions import donors_partitions
    from tests.segmentation.test_e0_e4_chain import DONORS

    all_assets, instance, resources, database = cohort
    resources = {**resources, "compute": ComputeResource(device="auto")}
    generic = seg.checkpoint_key("generic")
    tuned = materialize(all_assets, instance=instance, resources=resources, selection=[generic])
    assert tuned.success
    donor = DONORS[0]
    instance.add_dynamic_partitions(donors_partitions.name, [donor])
    counted = materialize(all_assets, instance=instance, resources=resources, partition_key=donor,
                          selection=[seg.E5_COUNTS, _seg_key("e5_tile_counts_metrics")])
    assert counted.success
    for result, key in ((tuned, generic), (counted, seg.E5_COUNTS)):
        assert any(key.to_user_string() in m and POOL_WARNING in m
                   for m in _warnings(instance, result.run_id)), key
        meta = result.asset_materializations_for_node(key.to_python_identifier())[0].metadata
        assert _facts(meta) == ("auto", "cpu", "")
        check = _device_checks(result)[key]
        assert check.passed and check.severity.value == "WARN" and check.description == NO_GPU_REQUESTED
        assert {k: v.value for k, v in check.metadata.items()} == {
            "device_requested": "auto", "device_used": "cpu", "gpu_expected_by": ""}
    # the existing checks are still there
    assert {c.check_name for c in tuned.get_asset_check_evaluations() if c.asset_key == generic} == {
        seg.WEIGHTS_CHECK, seg.DROPS_CHECK, DEVICE_CHECK}
    assert {c.check_name for c in counted.get_asset_check_evaluations() if c.asset_key == seg.E5_COUNTS} == {
        seg.SKIPPED_CHECK, seg.WEIGHTS_CHECK, DEVICE_CHECK}
    manifest = seg.checkpoint_manifest("generic")
    assert (manifest["device_requested"], manifest["device_used"], manifest["gpu_expected_by"]) == ("auto", "cpu", "")
    with duckdb.connect(str(database), read_only=True) as con:
        rows = set(con.execute("SELECT model, device_requested, device_used, gpu_expected_by FROM tile_counts")
                   .fetchall())
    assert rows == {("baseline", "auto", "cpu", ""), ("finetuned", "auto", "cpu", "")}


def test_segmentation_prediction_on_cpu_where_slurm_gives_the_family_a_gpu_fails_the_device_check(
        cohort, tmp_path, monkeypatch):
    """E1 test predictions of the baseline under a Slurm family with a GPU, run on CPU: the
    check fails (WARN), and the predictions file carries the facts to the E1/E3/E4 rows."""
    from mihd_assets.segmentation import assets as seg

    all_assets, instance, resources, _ = cohort
    slurm, expected = _slurm_with_gpus(tmp_path, "segmentation", monkeypatch)
    key = seg.predictions_key("baseline")
    result = materialize(all_assets, instance=instance, selection=[key],
                         resources={**resources, "compute": ComputeResource(device="cpu"), "step_executor": slurm})
    assert result.success
    _assert_fails_where_a_gpu_was_expected(result, key, instance, expected)
    meta = result.asset_materializations_for_node(key.to_python_identifier())[0].metadata
    assert _facts(meta) == ("cpu", "cpu", expected) and meta["device"].value == "cpu"
    assert seg.prediction_device("baseline") == {"device_requested": "cpu", "device_used": "cpu",
                                                 "gpu_expected_by": expected}
    assert len(seg.load_predictions("baseline")) == meta["n_images"].value  # the facts are not a mask


def test_segmentation_benchmark_rows_carry_the_device_of_the_step_behind_them(seg_chain):
    """E0-E4 through Dagster (compute.device='cpu', nothing expects a GPU): every fine-tune,
    prediction and E2 step passes device_as_requested, and the segmentation_models /
    segmentation_metrics rows name the step's device (E3 and the E4 proxy: the generic
    predictions they score); the baseline, loaded without a GPU step, reads NULL."""
    from mihd_assets.segmentation import assets as seg
    from mihd_assets.segmentation.definitions import BENCHMARK_KEYS, all_assets
    from mihd_assets.segmentation.plan import FINE_TUNED, MODELS

    database, resources, _, _ = seg_chain
    result = materialize(all_assets, instance=DagsterInstance.ephemeral(), resources=resources,
                         selection=BENCHMARK_KEYS)
    assert result.success
    gpu_steps = {*(seg.checkpoint_key(m) for m in FINE_TUNED), *(seg.predictions_key(m) for m in MODELS), seg.E2_RUNS,
                 *([seg.E4_SWEEP] if seg.MICRO_SAM else [])}
    checks = _device_checks(result)
    assert set(checks) == gpu_steps
    assert all(c.passed and c.description == "no GPU was requested: compute.device='cpu'; ran on cpu"
               for c in checks.values())
    cpu = ("cpu", "cpu", "")
    with duckdb.connect(str(database), read_only=True) as con:
        models = {(e, m): tuple(rest) for e, m, *rest in con.execute(
            "SELECT experiment, model, device_requested, device_used, gpu_expected_by FROM segmentation_models")
            .fetchall()}
        scored = set(con.execute("SELECT experiment, device_requested, device_used, gpu_expected_by "
                                 "FROM segmentation_metrics").fetchall())
    assert models.pop(("E1", "baseline")) == (None, None, None)
    assert models and set(models.values()) == {cpu}
    assert {e for e, *_ in models} == {"E1", "E2"}
    assert scored == {(e, *cpu) for e in ("E1", "E2", "E3", "E4")}


def test_predictions_stored_before_the_device_facts_read_null(tmp_path, monkeypatch):
    import numpy as np

    from mihd_assets.segmentation import assets as seg

    monkeypatch.setenv("MIHD_HOME", str(tmp_path))
    monkeypatch.delenv("MIHD_STORAGE", raising=False)
    path = seg.store("e1", "predictions_generic.npz")
    path.parent.mkdir(parents=True)
    np.savez_compressed(path, pred_00000=np.ones((4, 4), np.int32))
    assert seg.prediction_device("generic") == {"device_requested": None, "device_used": None, "gpu_expected_by": None}
    assert len(seg.load_predictions("generic")) == 1
