"""EDM formulas (Karras et al. 2022) against hand values, and the Heun sampler on known cases."""

import math

import pytest
import torch

from mihd_assets.geometry.edm import edm_loss, heun_sample, karras_sigmas, loss_weight, preconditioning, sample_sigma


def test_preconditioning_matches_the_formulas():
    sd, s = 0.5, torch.tensor([0.2, 1.0, 80.0])
    c_skip, c_out, c_in, c_noise = preconditioning(s, sd)
    for i, sv in enumerate(s.tolist()):
        assert c_skip[i].item() == pytest.approx(sd**2 / (sv**2 + sd**2))
        assert c_out[i].item() == pytest.approx(sv * sd / math.sqrt(sv**2 + sd**2))
        assert c_in[i].item() == pytest.approx(1 / math.sqrt(sv**2 + sd**2))
        assert c_noise[i].item() == pytest.approx(math.log(sv) / 4)
    # At low sigma the skip path dominates and the network output is scaled away.
    low = preconditioning(torch.tensor([1e-4]), sd)
    assert low[0].item() == pytest.approx(1.0, abs=1e-6) and low[1].item() == pytest.approx(1e-4, rel=1e-3)


def test_loss_weight_and_lognormal_sigmas():
    sd = 0.3
    s = torch.tensor([0.1, 0.3, 3.0])
    assert torch.allclose(loss_weight(s, sd), (s**2 + sd**2) / (s * sd) ** 2)
    g = torch.Generator().manual_seed(0)
    sig = sample_sigma(20000, -1.2, 1.2, g)
    assert torch.log(sig).mean().item() == pytest.approx(-1.2, abs=0.03)
    assert torch.log(sig).std().item() == pytest.approx(1.2, abs=0.03)


def test_edm_loss_is_weighted_masked_mse():
    target = torch.zeros(2, 3, 2)
    denoised = torch.ones(2, 3, 2)
    mask = torch.tensor([[True, True, False], [True, True, True]])
    denoised[0, 2] = 100.0  # padding: ignored
    sigma = torch.tensor([0.5, 0.5])
    assert edm_loss(denoised, target, sigma, mask, 0.5).item() == pytest.approx(loss_weight(sigma, 0.5)[0].item())


def test_karras_schedule_endpoints_and_order():
    s = karras_sigmas(18, 0.002, 80.0, rho=7.0)
    assert len(s) == 19 and s[0].item() == pytest.approx(80.0) and s[-2].item() == pytest.approx(0.002) and s[-1] == 0
    assert (s[:-1] > s[1:]).all()
    mid = (80.0 ** (1 / 7) + 0.5 * (0.002 ** (1 / 7) - 80.0 ** (1 / 7))) ** 7
    assert karras_sigmas(3, 0.002, 80.0)[1].item() == pytest.approx(mid)
    with pytest.raises(ValueError):
        karras_sigmas(4, 1.0, 0.5)


def test_heun_with_the_ideal_denoiser_lands_on_the_data():
    # Data = one fixed set y: the ideal denoiser returns y, and the ODE must end exactly at y.
    y = torch.randn(1, 5, 2)
    x = y + 3.0 * torch.randn(1, 5, 2)
    out = heun_sample(lambda x_, s_: y.expand_as(x_), x, karras_sigmas(6, 0.01, 3.0))
    assert torch.allclose(out, y, atol=1e-5)


def test_heun_on_gaussian_data_keeps_the_scale():
    # Data ~ N(0, sd^2): ideal denoiser D(x; s) = x sd^2 / (s^2 + sd^2); samples from sigma_max
    # must come out with standard deviation sd (the probability-flow ODE is exact here).
    sd = 0.4
    x = 20.0 * torch.randn(4000, 1, 2, generator=torch.Generator().manual_seed(0))
    out = heun_sample(lambda x_, s_: x_ * sd**2 / (s_[:, None, None] ** 2 + sd**2), x, karras_sigmas(40, 0.002, 20.0))
    assert out.std().item() == pytest.approx(sd, rel=0.05)


def test_refinement_schedule_starts_at_the_matched_noise_level_and_stops_at_sigma_stop():
    """The noisy estimate carries sigma_refine of added noise and sigma_gen of the generator's own
    error: the steps start at their root-sum-square and end at sigma_stop, then 0."""
    import math

    from mihd_assets.geometry.evaluate import Inference

    inf = Inference(model=None, sigma_data=0.7, device=torch.device("cpu"), sigma_gen=0.2)
    sched = inf.refine_schedule(sigma_refine=1.05, steps=4, sigma_stop=0.4)
    assert sched[0].item() == pytest.approx(math.hypot(1.05, 0.2))
    assert sched[-2].item() == pytest.approx(0.4) and sched[-1].item() == 0.0 and len(sched) == 5
    assert torch.all(sched[:-1][1:] < sched[:-1][:-1])
    # a stop above the start collapses to a single step from the start
    assert inf.refine_schedule(0.1, 4, 5.0)[-2].item() == pytest.approx(math.hypot(0.1, 0.2))
