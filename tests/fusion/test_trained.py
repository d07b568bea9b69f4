"""Trained fusions on a planted-label problem: learning, recovery, determinism, inputs used as given."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.cluster import KMeans
from sklearn.metrics import adjusted_rand_score

from mihd_assets.fusion.trained import (
    FusionInputError,
    basic_contrastive_fusion,
    llava_mlp_fusion,
    qformer_fusion,
)

torch.set_num_threads(1)

N_SPOTS, N_DOMAINS = 240, 4

# Tiny sizes: the same code as the real defaults, narrower and for fewer epochs.
METHODS = {
    "llava_mlp": (llava_mlp_fusion, {"epochs": 40, "batch_size": 80, "lr": 3e-3}),
    "basic_contrastive": (basic_contrastive_fusion, {"epochs": 25, "batch_size": 80, "embed_dim": 16,
                                                     "hidden_dim": 64}),
    "qformer": (qformer_fusion, {"epochs": 25, "batch_size": 80, "model_dim": 16, "n_queries": 4,
                                 "tokens_per_modality": 2, "n_heads": 2, "n_layers": 1}),
}


def _standardize(x: np.ndarray) -> np.ndarray:
    return ((x - x.mean(axis=0)) / x.std(axis=0)).astype(np.float32)


@pytest.fixture(scope="module")
def planted():
    """Two noisy views of one planted domain label, each standardised as the caller does."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(N_DOMAINS), N_SPOTS // N_DOMAINS)
    gene = rng.normal(size=(N_DOMAINS, 12))[labels] + 1.5 * rng.normal(size=(N_SPOTS, 12))
    vision = rng.normal(size=(N_DOMAINS, 24))[labels] + 1.5 * rng.normal(size=(N_SPOTS, 24))
    return labels, _standardize(gene), _standardize(vision)


@pytest.fixture(scope="module")
def planted_baseline(planted) -> float:
    """k-means ARI of the gene embedding alone: a fusion must add the vision signal to beat it."""
    labels, gene, _ = planted
    return _kmeans_ari(labels, gene)


@pytest.fixture(scope="module")
def runs(planted):
    """One seed-0 run per method, shared by the tests below."""
    _, gene, vision = planted
    out = {}
    for name, (fn, kwargs) in METHODS.items():
        calls = []
        fused, info = fn(gene, vision, seed=0, progress=lambda e, total, loss: calls.append((e, total, loss)), **kwargs)
        out[name] = (fused, info, calls)
    return out


def _kmeans_ari(labels: np.ndarray, x: np.ndarray) -> float:
    return adjusted_rand_score(labels, KMeans(N_DOMAINS, n_init=10, random_state=0).fit_predict(x))


@pytest.mark.parametrize("name", METHODS)
def test_loss_decreases_and_info_describes_the_run(runs, planted, name):
    fused, info, calls = runs[name]
    _, gene, vision = planted
    epochs = METHODS[name][1]["epochs"]
    history = info["loss_history"]
    assert len(history) == epochs and all(np.isfinite(history))
    assert history[-1] < 0.9 * history[0], history
    assert info["final_loss"] == history[-1]
    assert info["method"] == name and info["epochs"] == epochs and info["device"] == "cpu"
    assert info["seconds"] > 0
    assert info["dims"] == {"gene": gene.shape[1], "vision": vision.shape[1], "fused": fused.shape[1]}
    assert fused.dtype == np.float32 and fused.shape[0] == N_SPOTS and np.isfinite(fused).all()
    assert [c[0] for c in calls] == list(range(1, epochs + 1))
    assert all(c[1] == epochs for c in calls) and [c[2] for c in calls] == history
    # The size arguments took effect: output widths and parameter counts worked out by hand
    # (gene 12, vision 24 wide; Linear(a, b) has a*b + b parameters).
    width = {"llava_mlp": 2 * 12, "basic_contrastive": 2 * 16, "qformer": 16}[name]
    assert fused.shape[1] == width
    if name == "llava_mlp":  # projector 24 -> 12 (hidden defaults to the gene width) -> 12
        assert info["n_parameters"] == (24 * 12 + 12) + (12 * 12 + 12)
    if name == "basic_contrastive":  # gene 12 -> 64 -> 16 and vision 24 -> 64 -> 16
        assert info["n_parameters"] == (12 * 64 + 64) + (64 * 16 + 16) + (24 * 64 + 64) + (64 * 16 + 16)


@pytest.mark.parametrize("name", METHODS)
def test_fused_embedding_recovers_the_planted_domains(runs, planted, planted_baseline, name):
    labels = planted[0]
    assert planted_baseline < 0.5  # the gene view alone does not get there
    assert _kmeans_ari(labels, runs[name][0]) > 0.5


def _short(name: str) -> tuple:
    fn, kwargs = METHODS[name]
    return fn, {**kwargs, "epochs": 3}


@pytest.mark.parametrize("name", METHODS)
def test_deterministic_for_a_seed_and_seed_matters(planted, name):
    _, gene, vision = planted
    fn, kwargs = _short(name)
    first, first_info = fn(gene, vision, seed=0, **kwargs)
    again, info = fn(gene, vision, seed=0, **kwargs)
    np.testing.assert_array_equal(again, first)
    assert info["loss_history"] == first_info["loss_history"]
    other, _ = fn(gene, vision, seed=1, **kwargs)
    assert not np.allclose(other, first)


@pytest.mark.parametrize("name", METHODS)
def test_inputs_are_used_as_given_not_restandardized(planted, name):
    """The caller's standardisation is the only one: arrays untouched, no hidden rescaling.

    A function that standardised internally would give the same output for an affine
    copy of the inputs (same seed); this one must not.
    """
    _, gene, vision = planted
    fn, kwargs = _short(name)
    gene_before, vision_before = gene.copy(), vision.copy()
    fused, _ = fn(gene, vision, seed=0, **kwargs)
    np.testing.assert_array_equal(gene, gene_before)
    np.testing.assert_array_equal(vision, vision_before)
    shifted_fused, _ = fn((3.0 * gene + 2.0).astype(np.float32), (0.5 * vision - 1.0).astype(np.float32),
                          seed=0, **kwargs)
    assert not np.allclose(shifted_fused, fused, atol=1e-3)


def test_llava_keeps_the_gene_embedding_exactly_and_projects_vision_into_gene_space(runs, planted):
    _, gene, vision = planted
    fused, info, _ = runs["llava_mlp"]
    d = gene.shape[1]
    assert fused.shape == (N_SPOTS, 2 * d)
    np.testing.assert_array_equal(fused[:, :d], gene)
    projected = fused[:, d:]
    # The projection regresses the gene embedding: closer to it than predicting zero (the mean).
    assert np.mean((projected - gene) ** 2) < 0.85 * np.mean(gene ** 2)
    assert info["hidden_dim"] == d


def test_contrastive_output_is_two_unit_halves(runs):
    fused, info, _ = runs["basic_contrastive"]
    half = info["embed_dim"]
    assert fused.shape == (N_SPOTS, 2 * half)
    np.testing.assert_allclose(np.linalg.norm(fused[:, :half], axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(fused[:, half:], axis=1), 1.0, atol=1e-5)
    # Trained to align: a spot's two halves are more similar than random pairings.
    same = (fused[:, :half] * fused[:, half:]).sum(1).mean()
    shuffled = np.random.default_rng(1).permutation(N_SPOTS)
    other = (fused[:, :half] * fused[shuffled, half:]).sum(1).mean()
    assert same > other + 0.15


def test_qformer_output_width_is_model_dim(runs):
    fused, info, _ = runs["qformer"]
    assert fused.shape == (N_SPOTS, info["model_dim"])


@pytest.mark.parametrize("name", METHODS)
def test_invalid_inputs_are_rejected_naming_shapes(planted, name):
    _, gene, vision = planted
    fn = METHODS[name][0]
    with pytest.raises(FusionInputError, match=r"\(240, 12\).*\(239, 24\)"):
        fn(gene, vision[:-1])
    with pytest.raises(FusionInputError, match="2-D"):
        fn(gene[:, 0], vision)
    bad = vision.copy()
    bad[5, 3] = np.nan
    with pytest.raises(FusionInputError, match="non-finite.*first rows: \\[5\\]"):
        fn(gene, bad)
    with pytest.raises(FusionInputError, match="epochs=0"):
        fn(gene, vision, epochs=0)


def test_batches_cover_every_spot_once_and_are_never_single_spots():
    from mihd_assets.fusion.trained import batches

    generator = torch.Generator().manual_seed(0)
    for n, batch_size in [(3, 2), (5, 2), (601, 256), (3600, 256)]:
        split = batches(n, batch_size, generator, torch.device("cpu"))
        assert sorted(torch.cat(split).tolist()) == list(range(n))
        assert min(len(b) for b in split) >= 2
        assert max(len(b) for b in split) - min(len(b) for b in split) <= 1


def test_fusions_run_on_the_smallest_valid_input():
    rng = np.random.default_rng(0)
    gene, vision = rng.normal(size=(3, 2)).astype(np.float32), rng.normal(size=(3, 5)).astype(np.float32)
    for name, (fn, kwargs) in METHODS.items():
        fused, info = fn(gene, vision, **{**kwargs, "epochs": 2, "batch_size": 2})
        assert fused.shape[0] == 3 and np.isfinite(fused).all(), name
