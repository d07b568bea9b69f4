"""No quiet fallbacks: a clustering with another cluster count than requested, a GPU step run
on CPU, a collapsed SCAN head and a clamped STAIG pseudo-label k are each logged at WARNING,
recorded in metadata and in the DuckDB rows, and fail their WARN asset check."""

from __future__ import annotations

import logging
import shutil

import anndata as ad
import duckdb
import numpy as np
import pytest
import torch
import yaml
from dagster import AssetKey, DagsterInstance, asset, build_asset_context, materialize
from dagster_duckdb import DuckDBResource

from mihd_assets.embeddings import assets as emb
from mihd_assets.embeddings.store import SpotEmbedding
from mihd_assets.fusion import assets as fa
from mihd_assets.fusion import clustering as cl
from mihd_assets.fusion import image_only, staig
from mihd_assets.fusion.store import SpotLabels
from mihd_assets.matrix import MATRIX
from mihd_assets.slides import assets as slides
from mihd_resources import ComputeResource, MetricsStore
from mihd_resources.clustering import ClusteringResource
from mihd_resources.compute import DEVICE_CHECK, device_check_result, gpu_expectation
from mihd_resources.orchestration import GPU_POOL, gpu_op_tags
from mihd_resources.step_executor import StepExecutor
from tests.conftest import slide_resources

GENE_PCA = next(a for a in emb.gene_embeddings if a.key == emb.gene_key("pca"))


def separated_blobs(n_blobs: int, n: int, d: int = 4, seed: int = 0) -> np.ndarray:
    """``n`` spots in ``n_blobs`` tight, far-apart groups of (nearly) equal size: with fewer
    neighbours per spot than a group has spots, the k-NN graph has one component per group,
    and Leiden never merges components."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=100.0, size=(n_blobs, d))
    return centers[np.arange(n) % n_blobs] + rng.normal(scale=0.1, size=(n, d))


@pytest.fixture
def env(tiny_slides, tmp_path, monkeypatch):
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    root = tmp_path / "root"
    shutil.copytree(tiny_slides / "demo_01", root / "demo_01")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", ["demo_01"])
    store = tmp_path / "store"
    resources = slide_resources(root, store, tmp_path / "m.duckdb")
    assert materialize([slides.raw_slide], partition_key="demo_01", instance=instance, resources=resources).success
    raw = ad.read_h5ad(store / "slides" / "raw_slide" / "demo_01.h5ad")
    return instance, resources, store, raw, tmp_path / "m.duckdb"


def _write_gene_pca(store, values, obs_names) -> None:
    path = store / "embeddings" / "gene_pca" / "demo_01.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, values=values, obs_names=np.asarray(obs_names, dtype=str), info_json=np.asarray("{}"))


def _clustering(name: str):
    return next(a for a in fa.clusterings if a.key.path[-1] == name)


def _metrics_of(key):
    return next(a for a in fa.clustering_metrics if a.key == fa.metrics_key(key))


def _warnings(instance, run_id: str) -> list[str]:
    return [e.user_message for e in instance.all_logs(run_id) if e.level >= logging.WARNING]


def _score(env, key, name: str) -> list[tuple]:
    """The clustering's metrics asset on its stored labels; its DuckDB rows (requested, found)."""
    instance, resources, store, raw, database = env
    stored = SpotLabels.load(store / "clustering" / name / "demo_01.npz")
    with build_asset_context(partition_key="demo_01", resources={"metrics": resources["metrics"]},
                             instance=instance) as context:
        _metrics_of(key)(context, labels=stored, raw=raw)
    with duckdb.connect(str(database), read_only=True) as con:
        return con.execute(
            "SELECT refinement, n_clusters, n_clusters_requested, n_clusters_found FROM clustering_metrics "
            "WHERE representation = 'gene_pca' ORDER BY refinement").fetchall()


# ---------------------------------------------------------------- 1. cluster count not reached

def test_leiden_that_misses_the_cluster_count_warns_and_says_so(caplog):
    x = separated_blobs(n_blobs=3, n=60)  # 15 neighbours stay inside a group of 20: 3 components
    with caplog.at_level(logging.WARNING, logger=cl.__name__):
        labels, info = cl.leiden_labels(x, 2, seed=0, where="slide 's1' gene_pca__leiden")
    assert cl.clusters_found(labels) == 3
    assert info["n_found"] == 3 and info["resolution_search"] == "closest"
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "slide 's1' gene_pca__leiden" in record.getMessage() and "closest, 3 clusters" in record.getMessage()


def test_leiden_cluster_count_miss_is_in_metadata_duckdb_and_fails_the_method_check(env):
    instance, resources, store, raw, _ = env
    n_blobs = raw.n_obs // 16  # groups of >= 16 spots: the 15-NN graph does not join them
    requested = fa.cluster_count("demo_01", raw.obs["truth"])[0]
    assert n_blobs > requested, (raw.n_obs, requested)
    values = separated_blobs(n_blobs, raw.n_obs)
    _write_gene_pca(store, values, raw.obs_names)
    asset = _clustering("gene_pca__leiden")
    result = materialize([slides.raw_slide, *slides.preprocessed_slides, GENE_PCA, asset], partition_key="demo_01",
                         instance=instance, resources=resources, selection=[asset.key])
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == fa.METHOD_CHECK and not check.passed
    assert check.severity.value == "WARN"
    assert f"{n_blobs} non-empty clusters found, {requested} requested" in check.description
    meta = result.asset_materializations_for_node(asset.node_def.name)[0].metadata
    assert meta["n_clusters_requested"].value == requested and meta["n_clusters_found"].value == n_blobs
    assert meta["resolution_search"].value == "closest"
    assert any("found no partition with" in m for m in _warnings(instance, result.run_id))
    rows = _score(env, asset.key, "gene_pca__leiden")
    raw_row = next(r for r in rows if r[0] == "none")
    assert raw_row[1:] == (requested, requested, n_blobs)


def test_mclust_with_an_empty_component_is_flagged(env, monkeypatch):
    instance, resources, store, raw, _ = env
    _write_gene_pca(store, np.random.default_rng(0).normal(size=(raw.n_obs, 6)), raw.obs_names)
    requested = fa.cluster_count("demo_01", raw.obs["truth"])[0]

    def mclust_leaving_one_component_empty(values, n_clusters, *args, **kwargs):
        # what Mclust's MAP classification gives when a component wins no spot
        return np.arange(values.shape[0]) % (n_clusters - 1)

    monkeypatch.setattr(cl, "mclust_labels", mclust_leaving_one_component_empty)
    asset = _clustering("gene_pca__mclust")
    result = materialize([slides.raw_slide, *slides.preprocessed_slides, GENE_PCA, asset], partition_key="demo_01",
                         instance=instance, resources=resources, selection=[asset.key])
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert not check.passed and check.metadata["n_clusters_found"].value == requested - 1
    assert any(f"mclust returned {requested - 1} non-empty clusters, {requested} were requested" in m
               for m in _warnings(instance, result.run_id))
    rows = _score(env, asset.key, "gene_pca__mclust")
    assert next(r for r in rows if r[0] == "none")[2:] == (requested, requested - 1)


def test_kmeans_that_reaches_the_count_passes_the_method_check(env):
    instance, resources, store, raw, _ = env
    _write_gene_pca(store, np.random.default_rng(0).normal(size=(raw.n_obs, 6)), raw.obs_names)
    asset = _clustering("gene_pca__kmeans")
    result = materialize([slides.raw_slide, *slides.preprocessed_slides, GENE_PCA, asset], partition_key="demo_01",
                         instance=instance, resources=resources, selection=[asset.key])
    (check,) = result.get_asset_check_evaluations()
    assert check.passed and check.description is None
    assert check.metadata["n_clusters_found"].value == check.metadata["n_clusters_requested"].value


# ---------------------------------------------------------------- 2. GPU step on CPU

GENE_MLP = next(a for a in emb.gene_embeddings if a.key == emb.gene_key("mlp"))
no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="device='auto' resolves to CUDA on this machine")


@no_cuda
def test_gpu_pool_step_on_cpu_with_no_gpu_expected_warns_records_and_passes(env):
    instance, resources, store, raw, database = env
    resources = {**resources, "compute": ComputeResource(device="auto", batch_size=32, num_workers=0)}
    pre = slides.preprocessed_key(MATRIX.gene_preset)
    result = materialize([slides.raw_slide, *slides.preprocessed_slides, GENE_MLP], partition_key="demo_01",
                         instance=instance, resources=resources, selection=[pre, GENE_MLP.key])
    assert result.success
    assert any("a step of the 'gpu' pool runs on cpu: compute.device='auto'" in m
               for m in _warnings(instance, result.run_id))
    meta = result.asset_materializations_for_node(GENE_MLP.node_def.name)[0].metadata
    assert (meta["device_requested"].value, meta["device_used"].value, meta["gpu_expected_by"].value) == (
        "auto", "cpu", "")
    (check,) = [c for c in result.get_asset_check_evaluations() if c.check_name == DEVICE_CHECK]
    assert check.passed and "no GPU was requested" in check.description
    assert check.severity.value == "WARN"

    stored = SpotEmbedding.load(store / "embeddings" / "gene_mlp" / "demo_01.npz")
    inputs = {name: stored for name in emb.embedding_runs_metrics.keys_by_input_name}
    with build_asset_context(partition_key="demo_01", resources={"metrics": resources["metrics"]},
                             instance=instance) as context:
        emb.embedding_runs_metrics(context, **inputs)
    with duckdb.connect(str(database), read_only=True) as con:
        rows = set(con.execute("SELECT device, device_requested, device_used, gpu_expected_by "
                               "FROM embedding_runs").fetchall())
    assert rows == {("cpu", "auto", "cpu", "")}


def _slurm_settings(tmp_path, gpus: int):
    path = tmp_path / "slurm.yaml"
    path.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "slurm_work"), "families": {"fusion": {"gpus": gpus}}}))
    return str(path)


@asset(key=AssetKey(["probe", "gpu_step"]), pool=GPU_POOL, op_tags=gpu_op_tags(family="fusion"))
def _gpu_probe(context, step_executor: StepExecutor) -> str:
    return gpu_expectation(context, step_executor, "fusion")


@pytest.mark.parametrize("gpus, expected", [(1, "Slurm family 'fusion' requests 1 GPU(s) (--gres=gpu)"), (0, "")])
def test_a_slurm_family_with_gpus_expects_one_and_the_local_executor_does_not(tmp_path, gpus, expected):
    slurm = StepExecutor(executor="slurm", slurm_config=_slurm_settings(tmp_path, gpus))
    with build_asset_context(resources={"step_executor": slurm}) as context:
        assert _gpu_probe(context) == expected
    with build_asset_context(resources={"step_executor": StepExecutor()}) as context:
        assert _gpu_probe(context) == ""


def test_a_kubernetes_step_pod_with_a_gpu_expects_one():
    """Runs under the k8s executor cannot execute in-process (execute_in_process swaps the
    executor), so the step's context is given as the two properties gpu_expectation reads."""
    from types import SimpleNamespace

    from dagster import in_process_executor
    from dagster_k8s import k8s_job_executor

    tags = gpu_op_tags(family="fusion")
    k8s = SimpleNamespace(job_def=SimpleNamespace(executor_def=k8s_job_executor.configured({}, name="mihd_k8s")),
                          op_def=SimpleNamespace(tags=tags))
    assert gpu_expectation(k8s, StepExecutor(), "fusion") == "the Kubernetes step pod requests 1 nvidia.com/gpu"
    local = SimpleNamespace(job_def=SimpleNamespace(executor_def=in_process_executor), op_def=SimpleNamespace(tags=tags))
    assert gpu_expectation(local, StepExecutor(), "fusion") == ""


def test_cpu_run_where_a_gpu_is_expected_warns_and_fails_the_device_check(tmp_path, caplog):
    slurm = StepExecutor(executor="slurm", slurm_config=_slurm_settings(tmp_path, 2))
    with build_asset_context(resources={"step_executor": slurm}) as context:
        expected = _gpu_probe(context)
    logger = logging.getLogger("mihd.test.step")
    # compute.device='cpu' on a node Slurm gave GPUs to; on a CUDA-less node 'auto' gives the same
    with caplog.at_level(logging.WARNING, logger=logger.name):
        facts = ComputeResource(device="cpu").settings().device_facts(logger, "fusion/x (partition 's1')", True,
                                                                         expected)
    assert facts == {"device_requested": "cpu", "device_used": "cpu", "gpu_expected_by": expected}
    (record,) = caplog.records
    assert record.levelno == logging.WARNING
    assert "runs on cpu although Slurm family 'fusion' requests 2 GPU(s)" in record.getMessage()
    check = device_check_result(AssetKey(["fusion", "x"]), facts)
    assert not check.passed and check.severity.value == "WARN"
    assert check.description == "ran on cpu although Slurm family 'fusion' requests 2 GPU(s) (--gres=gpu)"


def test_explicit_cpu_with_nothing_expecting_a_gpu_passes_the_device_check():
    facts = ComputeResource(device="cpu").settings().device_facts(logging.getLogger("x"), "x", True, "")
    check = device_check_result(AssetKey(["fusion", "x"]), facts)
    assert check.passed and check.description == "no GPU was requested: compute.device='cpu'; ran on cpu"


# ---------------------------------------------------------------- 3. SCAN collapse, STAIG pseudo-label k

def two_points(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    """``n`` spots on two distinct points: any network maps them to two outputs at most."""
    rng = np.random.default_rng(seed)
    a, b = rng.normal(size=(2, d))
    return np.where((np.arange(n) % 2 == 0)[:, None], a, b).astype(np.float32)


def test_scan_whose_head_collapses_warns_and_reports_the_clusters_found(caplog):
    with caplog.at_level(logging.WARNING, logger=image_only.__name__):
        labels, _, info = image_only.scan_clustering(two_points(40), 5, epochs=2, hidden_dim=16, n_heads=2,
                                                     n_neighbors=5, batch_size=20)
    assert info["n_clusters"] == 5 and info["n_clusters_found"] == np.unique(labels).size <= 2
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert f"in {info['n_clusters_found']} of the 5 requested clusters" in record.getMessage()


SCAN = next(a for a in fa.image_only_clusterings if a.key.path[-1] == f"image_only__scan__{MATRIX.image_only_vision}")


def test_collapsed_scan_clustering_fails_the_method_check_and_is_in_duckdb(env):
    instance, resources, store, raw, database = env
    path = store / "embeddings" / f"vision_{MATRIX.image_only_vision}" / "demo_01.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    SpotEmbedding(two_points(raw.n_obs), list(raw.obs_names), {"weights": "random"}).save(path)
    vision = emb.vision_asset_for(fa.vision_input_key(MATRIX.image_only_vision))
    result = materialize([slides.raw_slide, vision, SCAN], partition_key="demo_01", instance=instance,
                         resources=resources, selection=[SCAN.key])
    assert result.success
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    requested = fa.cluster_count("demo_01", raw.obs["truth"])[0]
    method = checks[fa.METHOD_CHECK]
    assert not method.passed and method.severity.value == "WARN"
    found = method.metadata["n_clusters_found"].value
    assert found <= 2 and method.description == f"{found} non-empty clusters found, {requested} requested"
    assert checks[DEVICE_CHECK].passed  # compute.device='cpu', nothing expects a GPU
    meta = result.asset_materializations_for_node(SCAN.node_def.name)[0].metadata
    assert meta["n_clusters_requested"].value == requested and meta["n_clusters_found"].value == found
    assert any(f"requested clusters; the labels have fewer" in m for m in _warnings(instance, result.run_id))

    stored = SpotLabels.load(store / "clustering" / SCAN.key.path[-1] / "demo_01.npz")
    with build_asset_context(partition_key="demo_01", resources={"metrics": resources["metrics"]},
                             instance=instance) as context:
        _metrics_of(SCAN.key)(context, labels=stored, raw=raw)
    with duckdb.connect(str(database), read_only=True) as con:
        row = con.execute("SELECT n_clusters_requested, n_clusters_found, device_requested, device_used "
                          "FROM clustering_metrics WHERE refinement = 'none'").fetchone()
    assert row == (requested, found, "cpu", "cpu")


def small_slide(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    pre = ad.AnnData(rng.poisson(2.0, size=(n, 12)).astype(np.float32))
    pre.obs_names = [f"spot{i}" for i in range(n)]
    pre.obsm["spatial"] = rng.uniform(0, 100, size=(n, 2))
    return pre, rng.normal(size=(n, 6))


def test_staig_pseudo_label_k_clamped_to_the_spots_warns_and_says_so(caplog):
    pre, image = small_slide(30)
    with caplog.at_level(logging.WARNING, logger=staig.__name__):
        _, info = staig.staig_fusion(pre.X, pre.obsm["spatial"], image, staig.StaigConfig(epochs=2))
    assert (info["pseudo_label_k"], info["pseudo_label_k_used"], info["n_pseudo_labels"]) == (80, 30, 30)
    (record,) = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "pseudo_label_k=80 but the slide has 30 spots" in record.getMessage()


def test_staig_asset_with_clamped_k_fails_its_check_and_the_clustering_rows_record_it(tmp_path, monkeypatch):
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    monkeypatch.setattr(fa, "DEMO_STAIG_EPOCHS", 5)
    pre, image = small_slide(30)
    # A preprocessed slide keeps its image paths (scanpy's uns["spatial"]); STAIG's image mode
    # refuses a slide without any. It reads the vision embedding, not the file.
    pre.uns["spatial"] = {"small": {"metadata": {"image_paths": {"hires": str(tmp_path / "hires.png")}}}}
    vision = SpotEmbedding(image, list(pre.obs_names), {"weights": "random"})
    (staig_asset,) = [a for a in fa.staig_fusion_embeddings if a.key == fa.fusion_key(fa.STAIG_NAME)]
    resources = {"compute": ComputeResource(device="cpu"), "step_executor": StepExecutor()}
    with build_asset_context(partition_key="small", resources=resources) as context:
        output, device_check, pseudo_check = list(staig_asset(context, pre=pre, vision=vision))
    assert device_check.check_name == DEVICE_CHECK and device_check.passed
    assert pseudo_check.check_name == fa.PSEUDO_LABEL_CHECK and not pseudo_check.passed
    assert pseudo_check.severity.value == "WARN"
    assert pseudo_check.description == "pseudo_label_k=80 clamped to 30, the slide's number of spots"
    assert output.metadata["pseudo_label_k"].value == 80 and output.metadata["pseudo_label_k_used"].value == 30

    # The clusterings of the STAIG embedding carry the facts into clustering_metrics.
    fused = output.value
    raw = ad.AnnData(np.zeros((30, 1), dtype=np.float32))
    raw.obs_names = pre.obs_names
    raw.obsm["spatial"] = pre.obsm["spatial"]
    raw.uns["spatial"] = pre.uns["spatial"]
    clustering = _clustering(f"{fa.STAIG_NAME}__kmeans")
    with build_asset_context(partition_key="small", resources={"clustering": ClusteringResource()}) as context:
        labels = next(iter(clustering(context, embedding=fused, raw=raw))).value
    metrics = MetricsStore(duckdb=DuckDBResource(database=str(tmp_path / "m.duckdb")))
    with build_asset_context(partition_key="small", resources={"metrics": metrics}) as context:
        _metrics_of(clustering.key)(context, labels=labels, raw=raw)
    with duckdb.connect(str(tmp_path / "m.duckdb"), read_only=True) as con:
        rows = set(con.execute("SELECT pseudo_label_k_requested, pseudo_label_k_used, n_pseudo_labels, "
                               "device_requested, device_used FROM clustering_metrics").fetchall())
    assert rows == {(80, 30, 30, "cpu", "cpu")}
