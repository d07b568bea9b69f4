"""STAIG equivalent: graph, image-guided edge dropping, debiased loss, one standardization."""

import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from mihd_assets.fusion import normalize, staig
from mihd_assets.fusion.clustering import kmeans_labels


@pytest.fixture(autouse=True)
def one_thread():
    torch.set_num_threads(1)


def layered_slide(n_side=16, n_genes=60, seed=0):
    """Spots on a grid in three horizontal layers; genes and image features follow the layer."""
    rng = np.random.default_rng(seed)
    xy = np.array([[i, j] for i in range(n_side) for j in range(n_side)], dtype=float)
    layer = np.minimum((xy[:, 1] * 3 // n_side).astype(int), 2)
    centers = rng.normal(size=(3, n_genes)) * 1.5
    hvg = np.clip(centers[layer] + rng.normal(size=(len(xy), n_genes)), 0, None)
    image = rng.normal(size=(3, 24))[layer] * 5 + 100 + rng.normal(size=(len(xy), 24))  # raw: offset, large scale
    return xy, layer, hvg.astype(np.float32), image.astype(np.float32)


def test_graph_is_symmetric_knn_and_drop_probabilities_are_row_normalized():
    xy, _, _, image = layered_slide()
    edges = staig.spatial_knn_edges(xy, k=5)
    pairs = set(map(tuple, edges.T))
    assert all((j, i) in pairs for i, j in pairs) and all(i != j for i, j in pairs)
    assert np.bincount(edges[0]).min() >= 5
    p = staig.edge_drop_probabilities(edges, normalize.standardize(image))
    np.testing.assert_allclose(np.bincount(edges[0], weights=p), 1.0, atol=1e-9)
    # Edges across a layer boundary (different image) are dropped more often than within.
    _, layer, _, _ = layered_slide()
    across = layer[edges[0]] != layer[edges[1]]
    assert p[across].mean() > 2 * p[~across].mean()


def test_debiased_loss_ignores_same_pseudo_label_negatives_and_is_stable():
    torch.manual_seed(0)
    z1, z2 = torch.randn(6, 4), torch.randn(6, 4)
    adj = torch.zeros(6, 6, dtype=torch.bool)
    adj[0, 1] = adj[1, 0] = True
    same_all = torch.ones(6, 6, dtype=torch.bool)
    # With every spot sharing one pseudo-label there are no negatives: only positives remain,
    # so the loss is log(|P|) - (logsumexp(P) - logsumexp(P)) >= 0 and small.
    loss_none = staig.debiased_neighbor_contrastive_loss(z1, z2, adj, same_all, tau=0.5)
    distinct = torch.eye(6, dtype=torch.bool)
    loss_all = staig.debiased_neighbor_contrastive_loss(z1, z2, adj, distinct, tau=0.5)
    assert loss_all > loss_none
    huge = staig.debiased_neighbor_contrastive_loss(z1 * 1e20, z2 * 1e20, adj, distinct, tau=0.01)
    assert torch.isfinite(huge)


def _dense_loss(z1, z2, adjacency, same_pseudo, tau):
    """The loss written out densely, term by term (the definition the sparse version must match)."""
    def one_direction(a, b):
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        intra, inter = (a @ a.T) / tau, (a @ b.T) / tau
        eye = torch.eye(a.shape[0], dtype=torch.bool)
        pos_intra, pos_inter, neg = adjacency & ~eye, adjacency | eye, ~same_pseudo
        e_intra, e_inter = intra.double().exp(), inter.double().exp()
        pos = (e_intra * pos_intra).sum(1) + (e_inter * pos_inter).sum(1)
        n_pos = pos_intra.sum(1) + pos_inter.sum(1)
        everything = (e_intra * (pos_intra | neg)).sum(1) + (e_inter * (pos_inter | neg)).sum(1)
        return -torch.log(pos / n_pos / everything)
    return (0.5 * (one_direction(z1, z2) + one_direction(z2, z1))).mean()


def test_sparse_loss_and_gradients_match_the_dense_definition():
    torch.manual_seed(1)
    n = 40
    z1 = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 8, dtype=torch.float64, requires_grad=True)
    edges = staig.spatial_knn_edges(np.random.default_rng(0).uniform(size=(n, 2)), k=5)
    adj = torch.zeros(n, n, dtype=torch.bool)
    adj[edges[0], edges[1]] = True
    labels = torch.randint(0, 6, (n,))
    same = labels[:, None] == labels[None, :]
    for tau in (0.5, 35.0):
        fast = staig.debiased_neighbor_contrastive_loss(z1, z2, adj, same, tau)
        slow = _dense_loss(z1, z2, adj, same, tau)
        g_fast = torch.autograd.grad(fast, (z1, z2))
        g_slow = torch.autograd.grad(slow, (z1, z2))
        torch.testing.assert_close(fast, slow)
        for a, b in zip(g_fast, g_slow):
            torch.testing.assert_close(a, b)


def test_staig_learns_layers_and_standardizes_the_image_once(monkeypatch):
    xy, layer, hvg, image = layered_slide()
    calls = []
    real = normalize.standardize

    def counting(values):
        calls.append(np.asarray(values).copy())
        return real(values)

    monkeypatch.setattr(normalize, "standardize", counting)
    config = staig.StaigConfig(epochs=40, pseudo_label_k=12)
    out, info = staig.staig_fusion(hvg, xy, image, config)
    assert len(calls) == 1, "the image embedding must be standardized exactly once"
    np.testing.assert_array_equal(calls[0], image)  # and it was the raw embedding that got standardized
    assert out.shape == (len(xy), 64) and np.isfinite(out).all()
    assert info["epochs"] == 40 and np.isfinite(info["final_loss"]) and info["input_genes"] == hvg.shape[1]
    assert adjusted_rand_score(layer, kmeans_labels(out, 3)) > 0.8
    again, _ = staig.staig_fusion(hvg, xy, image, config)
    np.testing.assert_allclose(out, again, rtol=1e-5, atol=1e-5)


def test_staig_rejects_mismatched_or_nonfinite_inputs():
    xy, _, hvg, image = layered_slide()
    with pytest.raises(ValueError, match="same number of spots"):
        staig.staig_fusion(hvg[:-1], xy, image)
    bad = image.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="image embedding matrix .* NaN"):
        staig.staig_fusion(hvg, xy, bad)
