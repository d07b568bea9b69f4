"""Gene embeddings: PCA clamp and metadata, MLP autoencoder determinism and learning, layer signal."""

import time

import anndata as ad
import numpy as np
import pytest
from sklearn.model_selection import cross_val_score
from sklearn.neighbors import KNeighborsClassifier

from mihd_assets.embeddings.gene import GeneEmbeddingInputError, mlp_autoencoder_embedding, pca_embedding


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _random_adata(n_obs, n_vars, seed=0):
    return ad.AnnData(np.random.default_rng(seed).normal(size=(n_obs, n_vars)).astype(np.float32))


def _knn_accuracy(emb, labels):
    keep = labels.notna().to_numpy()
    y = labels[keep].astype(str).to_numpy()
    scores = cross_val_score(KNeighborsClassifier(n_neighbors=5), emb[keep], y, cv=5)
    majority = max(np.mean(y == c) for c in np.unique(y))
    return float(scores.mean()), float(majority)


def test_pca_dims_and_metadata(slide):
    emb, info = pca_embedding(slide, n_components=10, seed=0)
    assert emb.shape == (slide.n_obs, 10) and emb.dtype == np.float32
    assert info["n_components"] == 10 and info["clamped"] is False
    assert len(info["explained_variance_ratio"]) == 10
    ratios = np.array(info["explained_variance_ratio"])
    assert np.all(np.diff(ratios) <= 1e-9)
    # The total is the sum of the kept components' ratios, short of 1 (10 of many components).
    assert info["explained_variance_total"] == pytest.approx(ratios.sum(), rel=1e-6) and ratios.sum() < 1
    # Raw scores: centred by PCA, variance not equalised across components.
    assert np.allclose(emb.mean(axis=0), 0, atol=1e-3)
    assert emb[:, 0].std() > emb[:, -1].std()


def test_pca_clamps_to_matrix_size_and_says_so():
    emb, info = pca_embedding(_random_adata(8, 30), n_components=50)
    assert emb.shape == (8, 7)
    assert info["clamped"] is True and info["n_components_requested"] == 50 and info["n_components"] == 7
    assert "min(n_spots, n_genes) - 1 = 7" in info["clamp_reason"]


@pytest.mark.parametrize(
    "adata, message",
    [
        (ad.AnnData(np.zeros((0, 5), dtype=np.float32)), r"empty expression matrix of shape \(0, 5\)"),
        (ad.AnnData(np.zeros((4, 0), dtype=np.float32)), r"empty expression matrix of shape \(4, 0\)"),
        (
            ad.AnnData(np.array([[1.0, np.nan], [0.0, 1.0], [2.0, 2.0]], dtype=np.float32)),
            r"1 non-finite values in matrix of shape \(3, 2\)",
        ),
        (ad.AnnData(np.ones((1, 5), dtype=np.float32)), r"shape \(1, 5\) is too small for PCA"),
    ],
)
def test_pca_rejects_bad_input_naming_the_shape(adata, message):
    with pytest.raises(GeneEmbeddingInputError, match=message):
        pca_embedding(adata)


def test_mlp_rejects_bad_input_naming_the_shape():
    bad = ad.AnnData(np.array([[np.inf, 1.0]], dtype=np.float32))
    message = r"mlp_autoencoder_embedding: 1 non-finite values in matrix of shape \(1, 2\)"
    with pytest.raises(GeneEmbeddingInputError, match=message):
        mlp_autoencoder_embedding(bad, epochs=1)


def test_mlp_deterministic_and_learns(slide):
    kwargs = dict(latent_dim=8, hidden=(32,), epochs=30, lr=1e-3, batch_size=32, seed=3)
    started = time.perf_counter()
    a, info = mlp_autoencoder_embedding(slide, **kwargs)
    elapsed = time.perf_counter() - started
    b, _ = mlp_autoencoder_embedding(slide, **kwargs)
    c, _ = mlp_autoencoder_embedding(slide, **{**kwargs, "seed": 4})
    assert a.shape == (slide.n_obs, 8) and a.dtype == np.float32
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert info["epochs"] == 30 and info["device"] == "cpu" and len(info["loss_history"]) == 30
    assert info["final_loss"] < 0.9 * info["initial_loss"]
    assert np.mean(info["loss_history"][-5:]) < np.mean(info["loss_history"][:5])
    assert 0 < info["seconds"] <= elapsed
    # Encoder n->32->8 and decoder 8->32->n, weights plus biases.
    n = slide.n_vars
    assert info["input_shape"] == [slide.n_obs, n]
    assert info["n_parameters"] == (n * 32 + 32) + (32 * 8 + 8) + (8 * 32 + 32) + (32 * n + n)


def test_mlp_leaves_global_rng_alone(slide):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    mlp_autoencoder_embedding(slide, latent_dim=4, hidden=(8,), epochs=1, seed=0)
    assert torch.equal(torch.rand(3), expected)


def test_embeddings_carry_the_layers(slide):
    pca, _ = pca_embedding(slide, n_components=10, seed=0)
    mlp, _ = mlp_autoencoder_embedding(slide, latent_dim=8, hidden=(64,), epochs=60, batch_size=32, seed=0)
    for name, emb in (("pca", pca), ("mlp", mlp)):
        acc, majority = _knn_accuracy(emb, slide.obs["truth"])
        assert acc > 0.5 and acc > majority + 0.2, (name, acc, majority)


def _subspace_cosine(a, b):
    qa, _ = np.linalg.qr(a - a.mean(axis=0))
    qb, _ = np.linalg.qr(b - b.mean(axis=0))
    return np.linalg.svd(qa.T @ qb, compute_uv=False)


def test_pca_is_exact_on_a_flat_spectrum_and_seed_free():
    """Above 500 x 500, sklearn's automatic solver is randomized SVD, which recovers only the
    leading components of a flat spectrum (like a spots x 3,000-HVG matrix) and moves with
    the seed; the embedding must be the exact (LAPACK) PCA subspace instead."""
    from sklearn.decomposition import PCA

    adata = _random_adata(900, 700, seed=3)
    emb, info = pca_embedding(adata, n_components=30, seed=0)
    assert info["svd_solver"] == "arpack"
    exact = PCA(n_components=30, svd_solver="full").fit_transform(np.asarray(adata.X, dtype=np.float64))
    assert _subspace_cosine(emb, exact).min() > 0.999
    other, _ = pca_embedding(adata, n_components=30, seed=1)
    assert _subspace_cosine(emb, other).min() > 0.999
    # What the automatic solver gives on this matrix (the previous behaviour): not exact.
    auto = PCA(n_components=30, random_state=0).fit_transform(np.asarray(adata.X))
    assert _subspace_cosine(auto, exact).mean() < 0.99


def test_pca_equals_scanpys_textbook_pca(slide):
    import scanpy as sc

    ref = slide.copy()
    sc.tl.pca(ref, n_comps=10, random_state=0)
    emb, _ = pca_embedding(slide, n_components=10, seed=0)
    np.testing.assert_allclose(np.abs(emb), np.abs(ref.obsm["X_pca"]), rtol=1e-3, atol=1e-3)
