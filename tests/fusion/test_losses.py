"""Shared losses: values against hand computations, stability at extreme scales, float32 under autocast."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mihd_assets.fusion.losses import (
    byol_regression_loss,
    cosine_correlation,
    info_nce,
    scan_loss,
    stego_correspondence_loss,
    unit_rows,
)

torch.set_num_threads(1)


def _log_softmax(x: np.ndarray, axis: int) -> np.ndarray:
    x = x - x.max(axis=axis, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=axis, keepdims=True))


def _hand_info_nce(a: np.ndarray, b: np.ndarray, temperature: float) -> float:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    logits = a @ b.T / temperature
    a_to_b = -np.diag(_log_softmax(logits, axis=1)).mean()
    b_to_a = -np.diag(_log_softmax(logits, axis=0)).mean()
    return 0.5 * (a_to_b + b_to_a)


def test_info_nce_matches_a_hand_log_softmax():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(6, 4)), rng.normal(size=(6, 4))
    for temperature in (1.0, 0.3):
        expected = _hand_info_nce(a, b, temperature)
        got = info_nce(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), temperature)
        assert got.dtype == torch.float32
        assert float(got) == pytest.approx(expected, rel=1e-5)


def test_info_nce_is_low_for_aligned_pairs_and_high_for_shuffled_ones():
    rng = np.random.default_rng(1)
    a = torch.tensor(rng.normal(size=(32, 16)), dtype=torch.float32)
    aligned = float(info_nce(a, a + 0.01 * torch.randn(32, 16), 0.05))
    shuffled = float(info_nce(a, a[torch.randperm(32)], 0.05))
    assert aligned < 0.01
    assert shuffled > np.log(32)


@pytest.mark.parametrize("scale", [1e4, 1e30])
def test_info_nce_finite_at_low_temperature_and_huge_inputs(scale):
    rng = np.random.default_rng(2)
    a0 = torch.tensor(rng.normal(size=(64, 8)), dtype=torch.float32)
    b0 = torch.tensor(rng.normal(size=(64, 8)), dtype=torch.float32)
    reference = info_nce(a0, b0, 0.01)
    a = (a0 * scale).requires_grad_(True)
    b = (b0 * scale).requires_grad_(True)
    loss = info_nce(a, b, 0.01)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(a.grad).all() and torch.isfinite(b.grad).all()
    # Cosine logits do not depend on the inputs' scale: same loss as the unscaled inputs
    # (plain F.normalize returns zero rows at 1e30, which would give log(64) instead).
    assert float(loss.detach()) == pytest.approx(float(reference), rel=1e-4)
    assert float(reference) > 10  # at temperature 0.01 random pairs give large logits


def test_info_nce_is_float32_inside_a_bfloat16_autocast_region():
    rng = np.random.default_rng(3)
    a = torch.tensor(rng.normal(size=(128, 64)), dtype=torch.float32)
    b = torch.tensor(rng.normal(size=(128, 64)), dtype=torch.float32)
    outside = info_nce(a, b, 0.07)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = info_nce(a, b, 0.07)
        bf16_logits = a @ b.T  # what autocast would have done to the matmul
    assert bf16_logits.dtype == torch.bfloat16
    assert inside.dtype == torch.float32
    assert float(inside) == pytest.approx(float(outside), rel=1e-6)


def test_info_nce_rejects_bad_shapes_and_temperature():
    with pytest.raises(ValueError, match=r"\(4, 3\) vs \(5, 3\)"):
        info_nce(torch.zeros(4, 3), torch.zeros(5, 3), 0.1)
    with pytest.raises(ValueError, match="2-D"):
        info_nce(torch.zeros(4), torch.zeros(4), 0.1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(torch.ones(4, 3), torch.ones(4, 3), 0.0)


def test_unit_rows_keeps_direction_of_extreme_rows_and_zero_rows():
    x = torch.tensor([[1.8e38, 2.4e38], [3e-30, 4e-30], [0.0, 0.0]])
    out = unit_rows(x)
    assert torch.allclose(out[:2], torch.tensor([[0.6, 0.8], [0.6, 0.8]]), atol=1e-6)
    assert torch.equal(out[2], torch.zeros(2))


def test_byol_loss_range_and_target_gets_no_gradient():
    p = torch.tensor([[1.0, 0.0], [0.0, 2.0]], requires_grad=True)
    z = torch.tensor([[5.0, 0.0], [0.0, -1.0]], requires_grad=True)
    loss = byol_regression_loss(p, z)
    assert float(loss.detach()) == pytest.approx((0.0 + 4.0) / 2)
    loss.backward()
    assert z.grad is None
    # Both rows sit at an extremum of the cosine (+1 and -1), where d(2 - 2cos)/dp is exactly 0.
    torch.testing.assert_close(p.grad, torch.zeros(2, 2))
    # At 45 degrees: d/dq (2 - 2cos) = -2 (z/|z| - cos q/|q|) / |q| = [-1, 1] / sqrt(2).
    q = torch.tensor([[1.0, 1.0]], requires_grad=True)
    byol_regression_loss(q, torch.tensor([[3.0, 0.0]])).backward()
    torch.testing.assert_close(q.grad, torch.tensor([[-1.0, 1.0]]) / 2**0.5)


def test_scan_loss_matches_hand_formula_and_stays_finite_for_disjoint_predictions():
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(10, 3)), rng.normal(size=(10, 3))
    pa = np.exp(_log_softmax(a, 1))
    pb = np.exp(_log_softmax(b, 1))
    consistency = -np.log((pa * pb).sum(1)).mean()
    mean_p = pa.mean(0)
    entropy = -(mean_p * np.log(mean_p)).sum()
    total, c, e = scan_loss(torch.tensor(a, dtype=torch.float32), torch.tensor(b, dtype=torch.float32), 2.0)
    assert float(c) == pytest.approx(consistency, rel=1e-5)
    assert float(e) == pytest.approx(entropy, rel=1e-5)
    assert float(total) == pytest.approx(consistency - 2.0 * entropy, rel=1e-5)

    # Anchor certain of cluster 0, neighbour certain of cluster 1: log<p, q> = log(~e^-2e4).
    anchor = torch.tensor([[1e4, -1e4]], requires_grad=True)
    neighbour = torch.tensor([[-1e4, 1e4]])
    total, c, _ = scan_loss(anchor, neighbour, 1.0)
    total.backward()
    assert torch.isfinite(c) and float(c.detach()) > 1e4
    assert torch.isfinite(anchor.grad).all()


def test_stego_loss_matches_hand_formula():
    rng = np.random.default_rng(5)
    fa, fb = rng.normal(size=(5, 6)), rng.normal(size=(4, 6))
    ca, cb = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))

    def cos(x, y):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (y / np.linalg.norm(y, axis=1, keepdims=True)).T

    feature_corr = cos(fa, fb)
    feature_corr -= feature_corr.mean(axis=1, keepdims=True)
    expected = -((feature_corr - 0.2) * np.maximum(cos(ca, cb), 0)).mean()
    fa_t, fb_t, ca_t, cb_t = (torch.tensor(v, dtype=torch.float32) for v in (fa, fb, ca, cb))
    feature_corr_t = cosine_correlation(fa_t, fb_t)
    np.testing.assert_allclose(feature_corr_t.numpy(), cos(fa, fb), atol=1e-6)
    assert float(stego_correspondence_loss(feature_corr_t, ca_t, cb_t, shift=0.2)) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match=r"\(5, 4\) do not match codes of shapes \(4, 3\)"):
        stego_correspondence_loss(feature_corr_t, cb_t, cb_t, 0.2)
