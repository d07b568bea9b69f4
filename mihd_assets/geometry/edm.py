"""EDM (Karras et al. 2022) for point sets: preconditioning, training noise, loss weight, Heun.

Reimplemented from the paper's formulas:

    c_skip = sd^2 / (s^2 + sd^2)      c_out = s sd / sqrt(s^2 + sd^2)
    c_in   = 1 / sqrt(s^2 + sd^2)     c_noise = ln(s) / 4
    D(x; s) = c_skip x + c_out F(c_in x, c_noise)
    ln s ~ N(P_mean, P_std^2),  lambda(s) = (s^2 + sd^2) / (s sd)^2

and the deterministic Heun sampler on t_i = (s_max^(1/rho) + i/(n-1) (s_min^(1/rho) - s_max^(1/rho)))^rho.
"""

from __future__ import annotations

from typing import Callable

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x, sigma[B]) -> D(x; sigma)


def preconditioning(sigma: torch.Tensor, sigma_data: float) -> tuple[torch.Tensor, ...]:
    """(c_skip, c_out, c_in, c_noise) for a batch of noise levels."""
    sd2 = sigma_data**2
    s2 = sigma**2
    c_skip = sd2 / (s2 + sd2)
    c_out = sigma * sigma_data / torch.sqrt(s2 + sd2)
    c_in = 1.0 / torch.sqrt(s2 + sd2)
    c_noise = torch.log(sigma) / 4.0
    return c_skip, c_out, c_in, c_noise


def sample_sigma(n: int, p_mean: float, p_std: float, generator: torch.Generator | None = None,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Log-normal training noise levels: ln sigma ~ N(p_mean, p_std^2)."""
    z = torch.randn(n, generator=generator)
    return torch.exp(z * p_std + p_mean).to(device)


def loss_weight(sigma: torch.Tensor, sigma_data: float) -> torch.Tensor:
    """lambda(sigma) = (sigma^2 + sd^2) / (sigma sd)^2: unit effective weight at every sigma."""
    return (sigma**2 + sigma_data**2) / (sigma * sigma_data) ** 2


def edm_loss(denoised: torch.Tensor, target: torch.Tensor, sigma: torch.Tensor, mask: torch.Tensor,
             sigma_data: float) -> torch.Tensor:
    """Mean over sets of lambda(sigma) x masked MSE of the denoised set."""
    m = mask.unsqueeze(-1).to(denoised.dtype)
    per_set = (((denoised - target) ** 2) * m).sum(dim=(1, 2)) / (m.sum(dim=(1, 2)) * denoised.shape[-1])
    return (loss_weight(sigma, sigma_data) * per_set).mean()


def karras_sigmas(n_steps: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """n_steps noise levels from sigma_max down to sigma_min, then a final 0."""
    if n_steps < 1:
        raise ValueError(f"need at least one sampling step, got {n_steps}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(f"need 0 < sigma_min <= sigma_max, got {sigma_min}, {sigma_max}")
    if n_steps == 1:
        steps = torch.tensor([sigma_max], dtype=torch.float64)
    else:
        i = torch.arange(n_steps, dtype=torch.float64)
        steps = (sigma_max ** (1 / rho) + i / (n_steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([steps, torch.zeros(1, dtype=torch.float64)])


@torch.no_grad()
def heun_sample(denoise: Denoiser, x: torch.Tensor, sigmas: torch.Tensor) -> torch.Tensor:
    """Deterministic Heun (2nd order) integration of the probability-flow ODE along ``sigmas``.

    ``x`` must already carry noise at ``sigmas[0]``; the last step (to sigma 0) is Euler.
    """
    batch = x.shape[0]
    for s_cur, s_next in zip(sigmas[:-1].tolist(), sigmas[1:].tolist()):
        sig = torch.full((batch,), s_cur, device=x.device, dtype=x.dtype)
        d_cur = (x - denoise(x, sig)) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            sig_n = torch.full((batch,), s_next, device=x.device, dtype=x.dtype)
            d_next = (x_next - denoise(x_next, sig_n)) / s_next
            x_next = x + (s_next - s_cur) * 0.5 * (d_cur + d_next)
        x = x_next
    return x


def sampler_range(sigma_data: float, sigma_min_factor: float, sigma_max_factor: float) -> tuple[float, float]:
    """Noise range in units of sigma_data (Karras: 0.002 and 80 at sigma_data 0.5)."""
    return sigma_data * sigma_min_factor, sigma_data * sigma_max_factor
