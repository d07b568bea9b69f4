"""Clustering core: inputs validated before R, the real mclust runs, Leiden hits K, refinement."""

import numpy as np
import pytest
from sklearn.metrics import adjusted_rand_score

from mihd_assets.fusion import clustering as cl
from mihd_assets.fusion.metrics import agreement, chaos, pas


def blobs(n_per=40, k=3, d=5, seed=0, spread=0.6):
    rng = np.random.default_rng(seed)
    centers = rng.normal(scale=4, size=(k, d))
    x = np.concatenate([c + rng.normal(scale=spread, size=(n_per, d)) for c in centers])
    return x, np.repeat(np.arange(k), n_per)


@pytest.mark.parametrize(
    "values, k, message",
    [
        (np.ones(10), 2, "expected a 2-D"),
        (np.ones((10, 0)), 2, "shape (10, 0) has an empty dimension"),
        (np.ones((3, 4)), 5, "3 spots (shape (3, 4)) but 5 clusters"),
        (np.array([[1.0, np.nan], [2.0, 3.0], [1.0, 1.0]]), 2, "1 of 3 rows of the (3, 2) matrix have NaN"),
        (np.ones((6, 3)), 2, "every column of the (6, 3) matrix is constant"),
    ],
)
def test_inputs_are_validated_with_shapes_in_the_message(values, k, message):
    with pytest.raises(cl.ClusteringInputError) as err:
        cl.validate_for_clustering(values, k, "slide 's1' gene_pca__mclust")
    assert message in str(err.value) and "slide 's1'" in str(err.value)


def test_real_mclust_recovers_blobs_and_differs_from_kmeans():
    ok, why = cl.mclust_available()
    assert ok, f"R mclust must be installed for the tests (scripts/install_system_deps.sh): {why}"
    x, truth = blobs()
    labels = cl.mclust_labels(x, 3, "EEE", seed=1)
    assert adjusted_rand_score(truth, labels) > 0.95
    assert set(labels) == {0, 1, 2}
    again = cl.mclust_labels(x, 3, "EEE", seed=1)
    np.testing.assert_array_equal(labels, again)
    # Unequal, overlapping groups: the Gaussian mixture and k-means partition them differently,
    # which is how the asset tests tell that the real mclust ran.
    rng = np.random.default_rng(3)
    x2 = np.concatenate([rng.normal(0, 1.0, (300, 2)), rng.normal(2.2, 0.3, (40, 2))])
    assert adjusted_rand_score(cl.mclust_labels(x2, 2, "EEE", seed=1), cl.kmeans_labels(x2, 2, seed=1)) < 0.99


def test_missing_mclust_names_the_install(monkeypatch):
    monkeypatch.setattr(cl, "mclust_available", lambda: (False, "R (R version 4.2.2) has no mclust package"))
    x, _ = blobs()
    with pytest.raises(cl.MclustUnavailable) as err:
        cl.mclust_labels(x, 3, where="slide 's1' gene_pca__mclust")
    assert "r-cran-mclust" in str(err.value) and "slide 's1'" in str(err.value)


def test_leiden_finds_the_requested_number_of_clusters():
    x, truth = blobs(k=4)
    labels, info = cl.leiden_labels(x, 4, seed=0)
    assert info["n_found"] == 4 and adjusted_rand_score(truth, labels) > 0.9


def test_refinement_is_a_majority_vote_of_spatial_neighbours():
    xy = np.array([[i, j] for i in range(10) for j in range(10)], dtype=float)
    labels = (xy[:, 0] >= 5).astype(int)
    noisy = labels.copy()
    noisy[[22, 77]] = 1 - noisy[[22, 77]]  # two isolated flips inside each half
    refined = cl.refine_labels(noisy, xy, k=8)
    np.testing.assert_array_equal(refined, labels)
    with pytest.raises(cl.ClusteringInputError):
        cl.refine_labels(labels, xy[:, :1], k=8)


def test_metrics_agreement_and_spatial_continuity():
    xy = np.array([[i, j] for i in range(10) for j in range(10)], dtype=float)
    truth = np.where(xy[:, 0] >= 5, "L2", "L1").astype(object)
    truth[0] = None  # unlabelled spot is left out
    labels = (xy[:, 0] >= 5).astype(int)
    scores = agreement(truth, labels)
    assert scores["ari"] == pytest.approx(1.0) and scores["n_labelled"] == 99
    rng = np.random.default_rng(0)
    scattered = rng.integers(0, 2, size=100)
    assert chaos(labels, xy) < chaos(scattered, xy)
    assert pas(labels, xy) == 0.0 and pas(scattered, xy) > 0.2


def _subspace_cosines(a, b):
    """Cosines of the principal angles between the column spaces of two centred matrices."""
    qa, _ = np.linalg.qr(a - a.mean(axis=0))
    qb, _ = np.linalg.qr(b - b.mean(axis=0))
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def test_prepare_for_clustering_reduces_wide_inputs_by_exact_pca_and_keeps_gene_pcs():
    from sklearn.decomposition import PCA

    rng = np.random.default_rng(4)
    wide = rng.normal(size=(700, 600)).astype(np.float32)  # flat spectrum, above 500 x 500
    x, how = cl.prepare_for_clustering(wide, standardize_first=False, max_dims=64, n_pcs=30, seed=0)
    assert x.shape == (700, 30) and how == "pca30 (arpack) of 600 dims"
    exact = PCA(n_components=30, svd_solver="full").fit_transform(wide.astype(np.float64))
    assert _subspace_cosines(x, exact).min() > 0.999
    again, _ = cl.prepare_for_clustering(wide, standardize_first=False, max_dims=64, n_pcs=30, seed=7)
    assert _subspace_cosines(again, x).min() > 0.999
    # sklearn's automatic solver (randomized SVD here) misses part of that subspace.
    assert _subspace_cosines(PCA(n_components=30, random_state=0).fit_transform(wide), exact).mean() < 0.99
    # A gene PCA embedding (30 dims) reaches mclust exactly as stored: no second scaling or PCA.
    pcs = rng.normal(size=(50, 30)).astype(np.float32) * np.linspace(5, 1, 30, dtype=np.float32)
    same, how = cl.prepare_for_clustering(pcs, standardize_first=False, max_dims=64, n_pcs=30)
    assert how == "as stored (30 dims)"
    np.testing.assert_array_equal(same, pcs)
    # Narrow but wider than max_dims: ARPACK's limit (fewer components than columns) is kept.
    narrow, how = cl.prepare_for_clustering(rng.normal(size=(40, 12)), standardize_first=False, max_dims=8, n_pcs=30)
    assert narrow.shape == (40, 11) and how == "pca11 (arpack) of 12 dims"
