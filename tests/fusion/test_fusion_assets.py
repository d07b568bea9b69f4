"""Clustering and metrics assets through Dagster: bad embeddings fail their own partition
with the file/shape named; a missing mclust fails unless a fallback is configured (then it is
flagged); slides without truth keep their clusterings and record why metrics were skipped."""

import shutil

import anndata as ad
import duckdb
import numpy as np
import pytest
from dagster import DagsterInstance, build_asset_context, materialize

from mihd_resources.orchestration import user_error
from mihd_assets.embeddings import assets as emb
from mihd_assets.fusion import assets as fa
from mihd_assets.fusion import clustering as cl
from mihd_assets.fusion.store import SpotLabels
from mihd_assets.slides import assets as slides
from mihd_resources import ComputeResource
from mihd_resources.clustering import ClusteringResource
from mihd_resources.step_executor import StepExecutor
from tests.conftest import slide_resources

GENE_PCA = next(a for a in emb.gene_embeddings if a.key == emb.gene_key("pca"))


def _asset(key_name):
    return next(a for a in fa.clusterings if a.key.path[-1] == key_name)


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
    return instance, resources, store, raw


def _write_embedding(store, values, obs_names):
    path = store / "embeddings" / "gene_pca" / "demo_01.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, values=values, obs_names=np.asarray(obs_names, dtype=str), info_json=np.asarray("{}"))
    return path


def _cluster(instance, resources, asset):
    return materialize([slides.raw_slide, *slides.preprocessed_slides, GENE_PCA, asset], partition_key="demo_01", instance=instance,
                       resources=resources, selection=[asset.key], raise_on_error=False)


def _error(result) -> str:
    (failure,) = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    return user_error(failure.event_specific_data.error).message


def test_nan_embedding_fails_naming_file_and_shape(env):
    instance, resources, store, raw = env
    values = np.random.default_rng(0).normal(size=(raw.n_obs, 4))
    values[3, 1] = np.nan
    path = _write_embedding(store, values, raw.obs_names)
    result = _cluster(instance, resources, _asset("gene_pca__mclust"))
    assert not result.success
    message = _error(result)
    assert str(path) in message and f"({raw.n_obs}, 4)" in message and "NaN" in message


@pytest.mark.parametrize(
    "shape_of, expected",
    [
        (lambda n: (n, 0), "has an empty dimension"),
        (lambda n: (5, 3), "5 spots (shape (5, 3)) but 7 clusters requested"),
    ],
)
def test_unclusterable_embeddings_fail_with_the_shape(env, shape_of, expected):
    instance, resources, store, raw = env
    shape = shape_of(raw.n_obs)
    _write_embedding(store, np.random.default_rng(0).normal(size=shape), raw.obs_names[: shape[0]])
    result = _cluster(instance, resources, _asset("gene_pca__kmeans"))
    assert not result.success
    message = _error(result)
    assert expected in message and "slide 'demo_01' gene_pca__kmeans" in message


def test_missing_mclust_fails_unless_fallback_is_configured(env, monkeypatch):
    instance, resources, store, raw = env
    _write_embedding(store, np.random.default_rng(0).normal(size=(raw.n_obs, 6)), raw.obs_names)
    monkeypatch.setattr(cl, "mclust_available", lambda: (False, "R (R version 4.2.2) has no mclust package"))
    asset = _asset("gene_pca__mclust")
    failed = _cluster(instance, resources, asset)
    assert not failed.success and "r-cran-mclust" in _error(failed)

    allowed = {**resources, "clustering": ClusteringResource(allow_mclust_fallback=True)}
    result = _cluster(instance, allowed, asset)
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.check_name == fa.METHOD_CHECK and not check.passed
    stored = SpotLabels.load(store / "clustering" / "gene_pca__mclust" / "demo_01.npz")
    assert stored.info["clustering_method"] == "mclust" and stored.info["clustering_method_used"] == "kmeans"
    mat = result.asset_materializations_for_node(asset.node_def.name)[0]
    assert mat.metadata["clustering_method_used"].value == "kmeans"


def test_slide_without_truth_keeps_clusterings_and_records_why(env, tmp_path):
    instance, resources, store, raw = env
    del raw.obs["truth"]
    labels = SpotLabels(list(raw.obs_names), np.arange(raw.n_obs) % 3, np.arange(raw.n_obs) % 3, {
        "representation": "gene_pca", "kind": "gene", "clustering_method": "mclust",
        "clustering_method_used": "mclust", "n_clusters": 3, "n_clusters_source": "default", "refine_k": 15,
        "weights": "none", "profile": "demo"})
    # One clustering's metrics asset, on its own: no other clustering of the matrix is needed.
    (metrics_asset,) = [a for a in fa.clustering_metrics if a.key == fa.metrics_key(fa.clustering_key("gene_pca", "mclust"))]
    assert set(metrics_asset.keys_by_input_name) == {"labels", "raw"}
    with build_asset_context(partition_key="demo_01", resources={"metrics": resources["metrics"]},
                             instance=instance) as context:
        out = metrics_asset(context, labels=labels, raw=raw)
    assert out.metadata["truth_labels"] is False
    with duckdb.connect(str(tmp_path / "m.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT ari, metrics_status, chaos, asset_key FROM clustering_metrics").fetchall()
    assert len(rows) == 2
    assert all(r[0] is None and r[1] == "skipped: slide has no truth labels" for r in rows)
    # CHAOS of the stored labels on the slide's standardized spot coordinates, by brute force:
    # mean distance from each spot to the nearest other spot of its cluster.
    xy = np.asarray(raw.obsm["spatial"], dtype=np.float64)
    xy = (xy - xy.mean(axis=0)) / xy.std(axis=0)
    dist = np.linalg.norm(xy[:, None] - xy[None], axis=-1)
    same = labels.labels[:, None] == labels.labels[None]
    np.fill_diagonal(same, False)
    expected_chaos = np.where(same, dist, np.inf).min(axis=1).mean()
    assert [r[2] for r in rows] == [pytest.approx(expected_chaos, rel=1e-9)] * 2  # raw and refined labels are equal
    assert {r[3] for r in rows} == {"evaluation/clustering_metrics/gene_pca__mclust"}


def test_staig_without_image_is_its_own_asset_and_refuses_too_few_spots():
    import anndata as ad
    from dagster import build_asset_context

    from mihd_resources import ComputeResource

    (no_image,) = [a for a in fa.staig_no_image_embeddings if a.key == fa.fusion_key("staig_fusion__hvg__none")]
    assert set(no_image.keys_by_input_name) == {"pre"}, "the no-image STAIG reads no vision embedding"
    assert fa.fusion_key(fa.STAIG_NAME) != no_image.key
    rng = np.random.default_rng(0)
    pre = ad.AnnData(rng.normal(size=(4, 12)).astype(np.float32))
    pre.obs_names = [f"spot{i}" for i in range(4)]
    pre.obsm["spatial"] = rng.uniform(0, 100, size=(4, 2))
    with build_asset_context(partition_key="four_spots", resources={"compute": ComputeResource(device="cpu"), "step_executor": StepExecutor()}) as ctx:
        with pytest.raises(ValueError, match=r"slide 'four_spots' staig_fusion__hvg__none: .*k"):
            list(no_image(ctx, pre=pre))
