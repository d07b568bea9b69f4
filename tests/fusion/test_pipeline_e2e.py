"""The whole slide pipeline as `mihd materialize` ran it on the tiny slides: metrics rows in
DuckDB for every clustering, the real mclust (different from k-means), the textbook scanpy
path reproduced, figures and the offline report written."""

from pathlib import Path

import anndata as ad
import duckdb
import numpy as np
import pytest
import scanpy as sc
from sklearn.metrics import adjusted_rand_score

from mihd_assets.fusion.assets import ALL_CLUSTERING_KEYS
from mihd_assets.fusion.clustering import mclust_labels
from mihd_assets.fusion.store import SpotLabels
from mihd_assets.matrix import MATRIX


def _store(env) -> Path:
    return Path(env["MIHD_HOME"]) / "storage"


def test_every_clustering_has_metric_rows(materialized_home):
    with duckdb.connect(str(Path(materialized_home["MIHD_HOME"]) / "mihd.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT slide_id, count(*), count(DISTINCT representation || clustering_method), "
            "bool_and(clustering_method_used = clustering_method) "
            "FROM clustering_latest GROUP BY slide_id ORDER BY slide_id"
        ).fetchall()
        stored_ari = {tuple(r[:5]): r[5] for r in con.execute(
            "SELECT slide_id, representation, clustering_method, refinement, coalesce(replicate, 0), ari "
            "FROM clustering_latest").fetchall()}
        leaderboard = con.execute("SELECT count(*) FROM method_leaderboard").fetchone()[0]
    assert [r[0] for r in rows] == ["demo_01", "demo_02"]
    for _, n_rows, n_methods, as_requested in rows:
        assert n_methods == len(ALL_CLUSTERING_KEYS) and n_rows == 2 * n_methods
        assert as_requested
    assert leaderboard == 2 * len(ALL_CLUSTERING_KEYS)
    # Every stored ARI is the ARI of the stored labels (raw and refined) against the slide's truth,
    # recomputed here on the labelled spots.
    store = _store(materialized_home)
    checked = 0
    for slide in ("demo_01", "demo_02"):
        truth = ad.read_h5ad(store / "slides" / "raw_slide" / f"{slide}.h5ad").obs["truth"]
        for key in ALL_CLUSTERING_KEYS:
            stored = SpotLabels.load(store.joinpath(*key.path) / f"{slide}.npz")
            spots = truth.loc[stored.obs_names]
            known = spots.notna().to_numpy()
            info = stored.info
            for refinement, values in (("none", stored.labels), (f"majority_k{info['refine_k']}", stored.refined)):
                expected = adjusted_rand_score(spots[known].astype(str), np.asarray(values)[known])
                row = (slide, info["representation"], info["clustering_method"], refinement, int(info.get("replicate", 0)))
                assert stored_ari[row] == pytest.approx(expected, abs=1e-12), row
                checked += 1
    assert checked == len(stored_ari) == 4 * len(ALL_CLUSTERING_KEYS)


def test_mclust_and_kmeans_labels_differ(materialized_home):
    store = _store(materialized_home)
    m = SpotLabels.load(store / "clustering" / "gene_pca__mclust" / "demo_01.npz")
    k = SpotLabels.load(store / "clustering" / "gene_pca__kmeans" / "demo_01.npz")
    assert m.info["clustering_method_used"] == "mclust"
    assert adjusted_rand_score(m.labels, k.labels) < 0.999


def test_gene_only_path_matches_the_textbook_scanpy_pipeline(materialized_home):
    store = _store(materialized_home)
    raw = ad.read_h5ad(store / "slides" / "raw_slide" / "demo_01.h5ad")
    truth = raw.obs["truth"].astype(str).to_numpy()
    adata = raw.copy()
    adata.X = adata.layers["counts"].copy()
    sc.pp.filter_genes(adata, min_cells=1)
    sc.pp.highly_variable_genes(adata, flavor="seurat_v3", n_top_genes=3000)
    sc.pp.normalize_total(adata, target_sum=1e4)
    sc.pp.log1p(adata)
    adata = adata[:, adata.var["highly_variable"]].copy()
    sc.pp.scale(adata)
    n_pcs = min(MATRIX.pca_components, min(adata.shape) - 1)
    sc.tl.pca(adata, n_comps=n_pcs, random_state=0)
    stored = SpotLabels.load(store / "clustering" / "gene_pca__mclust" / "demo_01.npz")
    textbook = mclust_labels(adata.obsm["X_pca"], stored.info["n_clusters"], "EEE", seed=stored.info["seed"])
    ours = adjusted_rand_score(truth, stored.labels)
    assert abs(ours - adjusted_rand_score(truth, textbook)) <= 0.02


def test_figures_and_offline_report_are_written(materialized_home):
    store = _store(materialized_home)
    pngs = sorted((store / "reports" / "slide_figures" / "demo_01").glob("*.png"))
    assert len(pngs) == len(ALL_CLUSTERING_KEYS) and all(p.read_bytes()[:4] == b"\x89PNG" for p in pngs)
    page = (store / "reports" / "benchmark_report.html").read_text()
    assert "demo_01" in page and "demo_02" in page and "RANDOM weights" in page
