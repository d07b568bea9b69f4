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
    for tau in (0.02, 0.5, 35.0):  # 0.02: the max-shifted path; 0.5, 35: the shared-block path
        fast = staig.debiased_neighbor_contrastive_loss(z1, z2, adj, same, tau)
        slow = _dense_loss(z1, z2, adj, same, tau)
        g_fast = torch.autograd.grad(fast, (z1, z2))
        g_slow = torch.autograd.grad(slow, (z1, z2))
        torch.testing.assert_close(fast, slow)
        for a, b in zip(g_fast, g_slow):
            torch.testing.assert_close(a, b)
    # A one-way adjacency (not a symmetrized graph) takes the per-direction path; same definition.
    one_way = adj & (torch.arange(n)[:, None] < torch.arange(n)[None, :])
    assert not staig.ContrastiveMasks(one_way, same).symmetric and staig.ContrastiveMasks(adj, same).symmetric
    fast = staig.debiased_neighbor_contrastive_loss(z1, z2, one_way, same, 0.5)
    slow = _dense_loss(z1, z2, one_way, same, 0.5)
    torch.testing.assert_close(fast, slow)
    for a, b in zip(torch.autograd.grad(fast, (z1, z2)), torch.autograd.grad(slow, (z1, z2))):
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


def _plain_dense_loss(z1, z2, adjacency, tau):
    """STAIG's loss without pseudo-labels, written out densely: positives are the spot in the
    other view and its graph neighbours in both views; the denominator is every similarity of
    both views except the spot with itself in its own view."""
    def one_direction(a, b):
        a, b = torch.nn.functional.normalize(a, dim=1), torch.nn.functional.normalize(b, dim=1)
        e_intra, e_inter = ((a @ a.T) / tau).exp(), ((a @ b.T) / tau).exp()
        adj = adjacency.to(a.dtype) * (1 - torch.eye(a.shape[0], dtype=a.dtype))
        numerator = e_inter.diag() + (e_intra * adj).sum(1) + (e_inter * adj).sum(1)
        denominator = e_intra.sum(1) + e_inter.sum(1) - e_intra.diag()
        return -torch.log(numerator / (2 * adj.sum(1) + 1) / denominator)
    return (0.5 * (one_direction(z1, z2) + one_direction(z2, z1))).mean()


def test_loss_without_pseudo_labels_is_the_plain_neighbour_contrastive_loss():
    torch.manual_seed(2)
    n = 30
    z1 = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 6, dtype=torch.float64, requires_grad=True)
    edges = staig.spatial_knn_edges(np.random.default_rng(1).uniform(size=(n, 2)), k=5)
    adj = torch.zeros(n, n, dtype=torch.bool)
    adj[edges[0], edges[1]] = True
    for tau in (0.5, 35.0):
        fast = staig.debiased_neighbor_contrastive_loss(z1, z2, adj, None, tau)
        slow = _plain_dense_loss(z1, z2, adj, tau)
        torch.testing.assert_close(fast, slow)
        for a, b in zip(torch.autograd.grad(fast, (z1, z2)), torch.autograd.grad(slow, (z1, z2))):
            torch.testing.assert_close(a, b)
    # Each spot being its own pseudo-label is the same loss.
    eye = torch.eye(n, dtype=torch.bool)
    torch.testing.assert_close(staig.debiased_neighbor_contrastive_loss(z1, z2, adj, eye, 35.0),
                               staig.debiased_neighbor_contrastive_loss(z1, z2, adj, None, 35.0))


def test_loss_gradients_pass_gradcheck_and_the_reused_buffer_holds_no_state():
    torch.manual_seed(3)
    n = 12
    z1 = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    z2 = torch.randn(n, 4, dtype=torch.float64, requires_grad=True)
    edges = staig.spatial_knn_edges(np.random.default_rng(2).uniform(size=(n, 2)), k=3)
    adj = torch.zeros(n, n, dtype=torch.bool)
    adj[edges[0], edges[1]] = True
    labels = torch.randint(0, 3, (n,))
    masks = staig.ContrastiveMasks(adj, labels[:, None] == labels[None, :])
    torch.autograd.gradcheck(lambda a, b: staig.debiased_neighbor_contrastive_loss(a, b, adj, None, 0.7, masks),
                             (z1, z2))
    # Small tau (1/tau > 40): exponents are shifted by each row's maximum, per direction.
    torch.autograd.gradcheck(lambda a, b: staig.debiased_neighbor_contrastive_loss(a, b, adj, None, 0.02, masks),
                             (z1, z2))
    for tau, shape in ((0.7, (3, n, n)), (0.02, (n, 2 * n))):
        first = staig.debiased_neighbor_contrastive_loss(z1, z2, adj, None, tau, masks)
        buffer = masks.buffer(shape, z1)
        buffer.fill_(float("nan"))  # whatever a previous call left there must not matter
        again = staig.debiased_neighbor_contrastive_loss(z1, z2, adj, None, tau, masks)
        assert masks.buffer(shape, z1).data_ptr() == buffer.data_ptr(), "the buffer is allocated once and reused"
        torch.testing.assert_close(first, again, rtol=0, atol=0)


def test_uniform_edge_dropping_gives_every_edge_of_a_spot_the_same_probability():
    xy, layer, _, image = layered_slide()
    edges = staig.spatial_knn_edges(xy, k=5)
    p = staig.uniform_edge_drop_probabilities(edges, len(xy))
    degree = np.bincount(edges[0], minlength=len(xy))
    np.testing.assert_allclose(p, 1.0 / degree[edges[0]])
    np.testing.assert_allclose(np.bincount(edges[0], weights=p), 1.0, atol=1e-12)
    # Unlike the image rule, edges across a layer boundary are not singled out.
    across = layer[edges[0]] != layer[edges[1]]
    same_degree = degree[edges[0]] == 5
    assert across[same_degree].any() and (~across[same_degree]).any()
    assert np.ptp(p[same_degree]) == 0  # across or within a layer, every such edge has 1/5
    p_image = staig.edge_drop_probabilities(edges, normalize.standardize(image))
    assert p_image[across].mean() > 2 * p_image[~across].mean()


def test_no_image_mode_uses_no_image_step_and_records_the_mode(monkeypatch):
    xy, layer, hvg, _ = layered_slide()

    def image_step(*args, **kwargs):
        raise AssertionError("the no-image mode must not run an image step")

    for name in ("edge_drop_probabilities", "image_components", "image_pseudo_labels"):
        monkeypatch.setattr(staig, name, image_step)
    monkeypatch.setattr(normalize, "standardize", image_step)
    uniform_calls = []
    real_uniform = staig.uniform_edge_drop_probabilities

    def spy(edges, n_spots):
        uniform_calls.append(n_spots)
        return real_uniform(edges, n_spots)

    monkeypatch.setattr(staig, "uniform_edge_drop_probabilities", spy)
    config = staig.StaigConfig(epochs=40, image_mode="none")
    out, info = staig.staig_fusion(hvg, xy, None, config)
    assert uniform_calls == [len(xy)]
    assert out.shape == (len(xy), 64) and np.isfinite(out).all()
    assert info["image_mode"] == "none" and info["image"] == "none" and info["image_dims"] == 0
    assert info["edge_dropping"] == "uniform" and info["pseudo_labels"] == "none" and info["n_pseudo_labels"] == 0
    edges = staig.spatial_knn_edges(xy, k=5)
    assert info["mean_edge_drop_probability"] == pytest.approx(real_uniform(edges, len(xy)).mean())
    assert np.isfinite(info["loss_history"]).all() and len(info["loss_history"]) == 40
    # The genes alone still separate the layers.
    assert adjusted_rand_score(layer, kmeans_labels(out, 3)) > 0.8


def test_image_mode_records_itself_and_the_modes_refuse_each_others_inputs():
    xy, _, hvg, image = layered_slide(n_side=8)
    _, info = staig.staig_fusion(hvg, xy, image, staig.StaigConfig(epochs=2, pseudo_label_k=4))
    assert info["image_mode"] == "image" and info["image"] == "embedding" and info["image_dims"] == image.shape[1]
    assert info["edge_dropping"] == "image_distance" and info["pseudo_labels"] == "kmeans_image_pcs"
    assert info["n_pseudo_labels"] == 4
    with pytest.raises(ValueError, match="image_mode='image' needs the image embedding, got None"):
        staig.staig_fusion(hvg, xy, None)
    with pytest.raises(ValueError, match=r"image_mode='none' was asked for but an image embedding \(64, 24\)"):
        staig.staig_fusion(hvg, xy, image, staig.StaigConfig(image_mode="none"))
    with pytest.raises(ValueError, match="image_mode must be one of"):
        staig.StaigConfig(image_mode="auto")


def test_too_few_spots_and_nonfinite_coordinates_fail_clearly():
    xy, _, hvg, image = layered_slide(n_side=8)
    with pytest.raises(ValueError, match=r"5 spots \(HVG \(5, 60\), coordinates \(5, 2\).*at least k \+ 1 = 6"):
        staig.staig_fusion(hvg[:5], xy[:5], image[:5])
    with pytest.raises(ValueError, match=r"5 spots .*at least k \+ 1 = 6"):
        staig.staig_fusion(hvg[:5], xy[:5], None, staig.StaigConfig(image_mode="none"))
    with pytest.raises(ValueError, match=r"coordinates \(4, 2\): need at least k \+ 1 = 6"):
        staig.spatial_knn_edges(xy[:4], k=5)
    # k + 1 spots is enough.
    out, _ = staig.staig_fusion(hvg[:6], xy[:6], None, staig.StaigConfig(epochs=2, image_mode="none"))
    assert out.shape == (6, 64) and np.isfinite(out).all()
    bad_xy = xy.copy()
    bad_xy[7, 1] = np.inf
    with pytest.raises(ValueError, match=r"coordinates matrix \(64, 2\) has 1 NaN/inf values \(first at \(7, 1\)\)"):
        staig.staig_fusion(hvg, bad_xy, None, staig.StaigConfig(image_mode="none"))
    bad_hvg = hvg.copy()
    bad_hvg[0, 0] = np.nan
    with pytest.raises(ValueError, match=r"HVG matrix \(64, 60\) has 1 NaN/inf"):
        staig.staig_fusion(bad_hvg, xy, image)
