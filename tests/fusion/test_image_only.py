"""Image-only clustering: SCAN recovery, STEGO stability at slide scale, BYOL + GAT on synthetic patches."""

from __future__ import annotations

import contextlib
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from mihd_assets.fusion.image_only import (
    _GraphAttention,
    augment_patches,
    byol_gat_clustering,
    nearest_neighbors,
    scan_clustering,
    spatial_graph_edges,
    stego_clustering,
)
from mihd_assets.fusion.trained import FusionInputError

torch.set_num_threads(1)


def _grid(side: int, pitch: float = 100.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Spot coordinates on a side x side grid, with row and column indices."""
    rows, cols = np.meshgrid(np.arange(side), np.arange(side), indexing="ij")
    coords = np.stack([cols.ravel(), rows.ravel()], axis=1).astype(np.float32) * pitch
    return coords, rows.ravel(), cols.ravel()


def _standardize(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)


def _check_info(info: dict, method: str, epochs: int) -> None:
    assert info["method"] == method and info["epochs"] == epochs and info["device"] == "cpu"
    assert len(info["loss_history"]) == epochs and np.isfinite(info["loss_history"]).all()
    assert info["final_loss"] == info["loss_history"][-1]
    assert info["seconds"] > 0


# ---------------------------------------------------------------------------- SCAN

SCAN_SMALL = {"epochs": 30, "batch_size": 100, "n_neighbors": 10, "hidden_dim": 32, "n_heads": 3}


@pytest.fixture(scope="module")
def separated():
    """Five well-separated Gaussian clusters in 16 dimensions, standardised as the caller does."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(5), 60)
    x = 3.0 * rng.normal(size=(5, 16))[labels] + rng.normal(size=(300, 16))
    return labels, _standardize(x)


@pytest.fixture(scope="module")
def scan_run(separated):
    _, x = separated
    calls = []
    labels, embedding, info = scan_clustering(x, 5, seed=0, progress=lambda *c: calls.append(c), **SCAN_SMALL)
    return labels, embedding, info, calls


def test_scan_recovers_well_separated_clusters(separated, scan_run):
    truth, x = separated
    labels, embedding, info, calls = scan_run
    assert labels.shape == (300,) and labels.dtype.kind == "i"
    assert adjusted_rand_score(truth, labels) > 0.8
    assert embedding.shape == (300, 32) and embedding.dtype == np.float32 and np.isfinite(embedding).all()
    _check_info(info, "scan", 30)
    assert info["final_loss"] < info["loss_history"][0]
    assert len(info["head_losses"]) == 3 and info["best_head"] == int(np.argmin(info["head_losses"]))
    assert info["n_neighbors"] == 10 and info["entropy_weight"] == 5.0
    assert [c[0] for c in calls] == list(range(1, 31)) and all(c[1] == 30 for c in calls)


def test_scan_self_labelling_sharpens_confident_predictions(separated, scan_run):
    truth, x = separated
    labels, _, info = scan_clustering(x, 5, seed=0, self_label_epochs=5, confidence_threshold=0.9, **SCAN_SMALL)
    assert adjusted_rand_score(truth, labels) > 0.8
    history = info["self_label_loss_history"]
    assert len(history) == 5 and history[-1] < history[0]
    assert info["loss_history"] == scan_run[2]["loss_history"]  # same SCAN phase as without self-labelling
    assert 0 < info["confident_fraction_before_self_label"] < info["confident_fraction_after_self_label"]


def test_scan_is_deterministic_and_does_not_touch_its_input(separated, scan_run):
    _, x = separated
    before = x.copy()
    labels, embedding, info = scan_clustering(x, 5, seed=0, **SCAN_SMALL)
    np.testing.assert_array_equal(x, before)
    np.testing.assert_array_equal(labels, scan_run[0])
    np.testing.assert_array_equal(embedding, scan_run[1])
    assert info["loss_history"] == scan_run[2]["loss_history"]


def test_scan_rejects_invalid_input():
    x = np.zeros((4, 3), np.float32)
    with pytest.raises(FusionInputError, match="4 spots cannot form 5 clusters"):
        scan_clustering(x, 5)
    with pytest.raises(FusionInputError, match=r"n_neighbors .*\[1, n_spots - 1 = 3\]"):
        scan_clustering(x, 2, n_neighbors=4)
    with pytest.raises(FusionInputError, match=r"2-D .* shape \(4, 3, 1\)"):
        scan_clustering(x[..., None], 2)


def test_nearest_neighbors_excludes_self_also_with_duplicates():
    points = np.array([[0.0], [0.0], [0.0], [5.0], [5.1], [9.0]])
    neighbours = nearest_neighbors(points, 2)
    assert neighbours.shape == (6, 2)
    assert not (neighbours == np.arange(6)[:, None]).any()
    assert set(neighbours[0]) == {1, 2}
    assert neighbours[3, 0] == 4


# ---------------------------------------------------------------------------- STEGO


def test_stego_is_finite_on_a_dense_slide_with_half_precision_risky_magnitudes():
    """STEGO once went NaN on a 3,639 x 3,639 dense similarity. Here 3,600 spots x 512
    dims, values around 1e3 (past float16's range once squared and summed) and the call
    made inside a bfloat16 autocast region; the whole slide is one dense batch."""
    rng = np.random.default_rng(0)
    coords, rows, _ = _grid(60)
    domains = rows * 7 // 60
    x = _standardize(rng.normal(size=(7, 512))[domains] + 2.0 * rng.normal(size=(3600, 512))) * 1e3
    epochs = []
    with torch.autocast("cpu", dtype=torch.bfloat16):
        labels, codes, info = stego_clustering(x, coords, 7, epochs=2, code_dim=16, hidden_dim=32,
                                               progress=lambda e, total, loss: epochs.append(loss))
    assert info["dense_correlation_size"] == [3600, 3600]
    _check_info(info, "stego", 2)
    assert epochs == info["loss_history"]
    # The head trains although the caller's autocast region is active.
    assert info["loss_history"][1] < info["loss_history"][0]
    assert np.isfinite(codes).all() and codes.shape == (3600, 16)
    assert labels.shape == (3600,) and set(np.unique(labels)) <= set(range(7))


def test_stego_learns_domains_with_mini_batches():
    rng = np.random.default_rng(1)
    coords, rows, cols = _grid(20)
    domains = (rows // 10) * 2 + cols // 10
    x = _standardize(rng.normal(size=(4, 32))[domains] + 1.5 * rng.normal(size=(400, 32)))
    before = x.copy()
    labels, codes, info = stego_clustering(x, coords, 4, epochs=40, batch_size=128, code_dim=8, seed=3)
    np.testing.assert_array_equal(x, before)
    assert info["dense_correlation_size"] == [128, 128]
    assert info["final_loss"] < info["loss_history"][0]
    np.testing.assert_allclose(np.linalg.norm(codes, axis=1), 1.0, atol=1e-5)
    assert adjusted_rand_score(domains, labels) > 0.8
    again, codes_again, _ = stego_clustering(x, coords, 4, epochs=40, batch_size=128, code_dim=8, seed=3)
    np.testing.assert_array_equal(codes_again, codes)
    np.testing.assert_array_equal(again, labels)


def test_stego_rejects_coords_that_do_not_match_the_spots():
    x = np.zeros((10, 4), np.float32)
    with pytest.raises(FusionInputError, match=r"\(10, 2\).*got \(9, 2\)"):
        stego_clustering(x, np.zeros((9, 2)), 3)


# ---------------------------------------------------------------------------- BYOL + GAT

BYOL_SMALL = {"epochs": 4, "gat_epochs": 40, "image_size": 16, "encoder_widths": (8, 16), "projector_hidden": 32,
              "projection_dim": 16, "batch_size": 64, "gat_hidden": 16, "gat_dim": 8, "gat_heads": 2}


@pytest.fixture(scope="module")
def striped_slide():
    """16 x 16 spots in three vertical bands; a band is encoded in its patches' stain shade
    and texture frequency, under heavy pixel noise."""
    rng = np.random.default_rng(0)
    coords, _, cols = _grid(16)
    bands = cols * 3 // 16
    shade = np.array([[0.80, 0.45, 0.65], [0.60, 0.35, 0.70], [0.85, 0.65, 0.80]])
    u = np.arange(16) / 16
    patches = np.empty((256, 3, 16, 16), np.float32)
    for i, band in enumerate(bands):
        wave = np.sin(2 * np.pi * (1, 3, 6)[band] * u)
        texture = 0.7 + 0.3 * (0.5 + 0.5 * np.outer(wave, wave))
        patches[i] = np.clip(shade[band][:, None, None] * texture + rng.normal(0, 0.15, (3, 16, 16)), 0, 1)
    return patches, coords, bands


@pytest.fixture(scope="module")
def byol_run(striped_slide):
    patches, coords, _ = striped_slide
    with _one_torch_thread():
        return byol_gat_clustering(patches, coords, 3, seed=0, **BYOL_SMALL)


@contextlib.contextmanager
def _one_torch_thread():
    """Bit-for-bit reruns are compared on one intra-op thread: on a heavily loaded two-core
    machine, two-thread runs of the same seed differed in the last float bit (1e-7)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def test_byol_gat_recovers_spatial_bands(striped_slide, byol_run):
    _, _, bands = striped_slide
    labels, embedding, info = byol_run
    assert labels.shape == (256,)
    assert adjusted_rand_score(bands, labels) > 0.6
    assert embedding.shape == (256, 8) and embedding.dtype == np.float32 and np.isfinite(embedding).all()
    _check_info(info, "byol_gat", 4)
    assert info["final_loss"] < info["loss_history"][0]
    assert len(info["gat_loss_history"]) == 40 and info["gat_final_loss"] < info["gat_loss_history"][0]
    assert info["n_graph_edges"] >= 256 * 7  # >= 6 neighbours + self loop per spot


def test_byol_gat_is_deterministic(striped_slide, byol_run):
    patches, coords, _ = striped_slide
    before = patches.copy()
    with _one_torch_thread():
        labels, embedding, info = byol_gat_clustering(patches, coords, 3, seed=0, **BYOL_SMALL)
    np.testing.assert_array_equal(patches, before)
    np.testing.assert_array_equal(embedding, byol_run[1])
    np.testing.assert_array_equal(labels, byol_run[0])
    assert info["gat_loss_history"] == byol_run[2]["gat_loss_history"]


def test_byol_gat_rejects_patches_outside_unit_range_or_wrong_layout(striped_slide):
    patches, coords, _ = striped_slide
    with pytest.raises(FusionInputError, match=r"\(n, 3, S, S\).*\(256, 16, 16, 3\)"):
        byol_gat_clustering(patches.transpose(0, 2, 3, 1), coords, 3)
    with pytest.raises(FusionInputError, match="outside \\[0, 1\\]"):
        byol_gat_clustering(patches * 255, coords, 3)


def test_augmentation_without_crop_or_jitter_is_an_exact_dihedral_transform():
    x = torch.rand(6, 3, 8, 8)
    views = augment_patches(x, 8, torch.Generator().manual_seed(0), min_crop_area=1.0, jitter=0.0)
    for original, view in zip(x, views):
        dihedral = [torch.rot90(t, k, dims=(1, 2)) for t in (original, original.flip(2)) for k in range(4)]
        assert min(float((view - d).abs().max()) for d in dihedral) < 1e-5
    again = augment_patches(x, 8, torch.Generator().manual_seed(0), min_crop_area=1.0, jitter=0.0)
    assert torch.equal(views, again)
    jittered = augment_patches(x, 12, torch.Generator().manual_seed(1), min_crop_area=0.5, jitter=0.4)
    assert jittered.shape == (6, 3, 12, 12) and jittered.min() >= 0 and jittered.max() <= 1


def test_spatial_graph_is_symmetric_with_self_loops():
    coords, _, _ = _grid(5)
    source, target = spatial_graph_edges(coords, 4)
    edges = set(zip(source.tolist(), target.tolist()))
    assert all((t, s) in edges for s, t in edges)
    assert all((i, i) in edges for i in range(25))
    # An interior spot of the grid: its 4 lattice neighbours and itself.
    assert {s for s, t in edges if t == 12} == {7, 11, 12, 13, 17}


def test_graph_attention_only_reads_graph_neighbours_and_normalises_over_them():
    torch.manual_seed(0)
    layer = _GraphAttention(4, 3, 2, concat=True)
    # Path graph 0 - 1 - 2 - 3 with self loops.
    pairs = [(0, 0), (1, 1), (2, 2), (3, 3), (0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2)]
    source = torch.tensor([s for s, _ in pairs])
    target = torch.tensor([t for _, t in pairs])
    x = torch.randn(4, 4)
    out = layer(x, source, target)
    changed = x.clone()
    changed[3] += 10.0
    out_changed = layer(changed, source, target)
    assert torch.allclose(out[:2], out_changed[:2])  # spots 0 and 1 do not see spot 3
    assert not torch.allclose(out[2], out_changed[2])
    # With identical inputs every attention-weighted average is that input's projection.
    same = x[:1].expand(4, -1)
    expected = layer.linear(same) + layer.bias
    assert torch.allclose(layer(same, source, target), expected, atol=1e-6)
    # Huge attention scores: the per-spot max is subtracted before exp.
    with torch.no_grad():
        layer.attention_source.mul_(1e6)
    assert torch.isfinite(layer(x, source, target)).all()
