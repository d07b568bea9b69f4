"""Set networks (masks, centring, EDM limit) and the generator / geometry losses."""

import math

import pytest
import torch

from mihd_assets.geometry import losses
from mihd_assets.geometry.models import ISAB, GeometryModel, ModelConfig


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def _rot(theta):
    return torch.tensor([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])


def test_isab_ignores_padding():
    block = ISAB(16, 4, 4).eval()
    x = torch.randn(1, 7, 16)
    padded = torch.cat([x, 50 * torch.randn(1, 5, 16)], dim=1)
    mask = torch.tensor([[True] * 7 + [False] * 5])
    with torch.no_grad():
        alone = block(x, torch.ones(1, 7, dtype=torch.bool))
        with_pad = block(padded, mask)
    assert torch.allclose(alone, with_pad[:, :7], atol=1e-5)
    assert (with_pad[:, 7:] == 0).all()


def test_model_outputs_are_centred_permutation_equivariant_and_padding_free():
    cfg = ModelConfig(in_dim=6, width=32, heads=4, inducing=8)
    model = GeometryModel(cfg).eval()
    feats = torch.randn(1, 10, 6)
    perm = torch.randperm(10)
    padded = torch.cat([feats, torch.randn(1, 3, 6)], dim=1)
    mask_pad = torch.tensor([[True] * 10 + [False] * 3])
    full = torch.ones(1, 10, dtype=torch.bool)
    with torch.no_grad():
        ctx, v = model(feats, full)
        _, v_perm = model(feats[:, perm], full)
        _, v_pad = model(padded, mask_pad)
        x = torch.randn(1, 10, 2)
        x = x - x.mean(dim=1, keepdim=True)
        d = model.denoiser(x, torch.tensor([1e-4]), ctx, model.refiner_condition(v, full), full, 0.5)
    assert torch.allclose(v.mean(dim=1), torch.zeros(1, 2), atol=1e-6)
    assert torch.allclose(v[:, perm], v_perm, atol=1e-5)
    assert torch.allclose(v, v_pad[:, :10], atol=1e-5) and (v_pad[:, 10:] == 0).all()
    # EDM limit: at sigma -> 0 the denoiser returns its input (c_skip -> 1, c_out -> 0).
    assert torch.allclose(d, x, atol=1e-3)


def test_procrustes_and_scale_losses():
    t = torch.randn(2, 12, 2)
    mask = torch.ones(2, 12, dtype=torch.bool)
    t = t - t.mean(dim=1, keepdim=True)
    rotated = t @ _rot(0.7).T
    mirrored = t * torch.tensor([-1.0, 1.0])
    assert losses.procrustes_mse(rotated, t, mask).item() == pytest.approx(0.0, abs=1e-8)
    assert losses.procrustes_mse(mirrored, t, mask).item() == pytest.approx(0.0, abs=1e-8)
    assert losses.procrustes_mse(torch.randn(2, 12, 2), t, mask).item() > 0.1
    assert losses.scale_loss(rotated, t, mask).item() == pytest.approx(0.0, abs=1e-8)
    assert losses.scale_loss(2 * t, t, mask).item() == pytest.approx(math.log(2) ** 2, rel=1e-4)


def test_geometry_losses_are_scale_invariant_finite_with_padding_and_learnable():
    t = torch.randn(2, 20, 2)
    mask = torch.ones(2, 20, dtype=torch.bool)
    mask[1, 15:] = False
    assert losses.edge_loss(3 * (t @ _rot(0.3).T), t, mask).item() == pytest.approx(0.0, abs=1e-6)
    good = losses.knn_nca_loss(3 * t, t, mask, k=5)
    bad = losses.knn_nca_loss(torch.randn(2, 20, 2), t, mask, k=5)
    assert torch.isfinite(good) and good < bad
    pred = torch.randn(2, 20, 2, requires_grad=True)
    (losses.knn_nca_loss(pred, t, mask, 5) + losses.edge_loss(pred, t, mask, 5)).backward()
    assert torch.isfinite(pred.grad).all()


def test_canonical_frame_matches_the_targets_frame():
    import numpy as np

    from mihd_assets.geometry.models import canonical_frame
    from mihd_assets.geometry.targets import canonical_coordinates

    pts = torch.randn(3, 15, 2) * torch.tensor([2.0, 0.7]) + 5.0
    mask = torch.ones(3, 15, dtype=torch.bool)
    mask[2, 11:] = False
    out = canonical_frame(pts @ _rot(0.4).T, mask)
    for i, n in enumerate((15, 15, 11)):
        expected = canonical_coordinates(pts[i, :n].double().numpy())
        np.testing.assert_allclose(out[i, :n].numpy(), expected, atol=1e-4)
    assert (out[2, 11:] == 0).all()
