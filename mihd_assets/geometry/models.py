"""Set networks: ISAB blocks with key masks, the context encoder, generator and EDM denoiser.

Sets in a batch are padded to one length; ``mask`` (B, N) is True for real points. Padded
points are never attended to (key masks) and their outputs are zeroed, so a point's output
does not depend on how much padding its set carries.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from .edm import preconditioning

ARCHITECTURE = "mihd-geometry-isab-v2"


@dataclass(frozen=True)
class ModelConfig:
    in_dim: int
    dims: int = 2  # output coordinates D
    width: int = 64
    heads: int = 4
    inducing: int = 16
    context_blocks: int = 2
    generator_blocks: int = 2
    denoiser_blocks: int = 2
    noise_features: int = 32

    def as_dict(self) -> dict:
        return asdict(self)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real points of each set: (B, N, D) -> (B, 1, D)."""
    m = mask.unsqueeze(-1).to(x.dtype)
    return (x * m).sum(dim=1, keepdim=True) / m.sum(dim=1, keepdim=True).clamp_min(1.0)


def centre(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Subtract each set's centroid and zero the padding (targets are centred)."""
    return (x - masked_mean(x, mask)) * mask.unsqueeze(-1).to(x.dtype)


def canonical_frame(v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Rotate each set onto its principal axes, each with a positive third moment: the frame
    the targets are given in (``targets.canonical_coordinates``), so a prediction and its
    target can be compared point by point."""
    vc = centre(v.float(), mask)
    _, evecs = torch.linalg.eigh(vc.transpose(1, 2) @ vc)
    out = vc @ evecs.flip(-1)
    sign = torch.sign((out**3).sum(dim=1, keepdim=True))
    return out * torch.where(sign == 0, torch.ones_like(sign), sign)


class MAB(nn.Module):
    """Multihead attention block: H = LN(Q + MHA(Q, K, K)); out = LN(H + rFF(H))."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.ff = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, key_mask: torch.Tensor | None = None) -> torch.Tensor:
        padding = None if key_mask is None else ~key_mask
        h = self.norm1(q + self.attn(q, kv, kv, key_padding_mask=padding, need_weights=False)[0])
        return self.norm2(h + self.ff(h))


class ISAB(nn.Module):
    """Induced set attention (Set Transformer): m inducing points attend to the set, the set attends back."""

    def __init__(self, width: int, heads: int, inducing: int):
        super().__init__()
        self.inducing = nn.Parameter(torch.randn(1, inducing, width) / math.sqrt(width))
        self.gather = MAB(width, heads)
        self.scatter = MAB(width, heads)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        summary = self.gather(self.inducing.expand(x.shape[0], -1, -1), x, key_mask=mask)
        return self.scatter(x, summary) * mask.unsqueeze(-1).to(x.dtype)


class SetEncoder(nn.Module):
    """Per-spot features -> context H: a linear embedding, then ISAB blocks over the set."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed = nn.Sequential(nn.Linear(cfg.in_dim, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.width))
        self.blocks = nn.ModuleList(ISAB(cfg.width, cfg.heads, cfg.inducing) for _ in range(cfg.context_blocks))

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(features) * mask.unsqueeze(-1).to(features.dtype)
        for block in self.blocks:
            h = block(h, mask)
        return h


class Generator(nn.Module):
    """Context H -> V directly: ISAB blocks and an MLP head, centred per set."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.blocks = nn.ModuleList(ISAB(cfg.width, cfg.heads, cfg.inducing) for _ in range(cfg.generator_blocks))
        self.head = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.dims))

    def forward(self, context: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = context
        for block in self.blocks:
            h = block(h, mask)
        return centre(self.head(h), mask)


class NoiseEmbedding(nn.Module):
    """c_noise -> fixed sinusoidal features -> MLP."""

    def __init__(self, features: int, width: int):
        super().__init__()
        half = features // 2
        self.register_buffer("freqs", torch.exp(torch.linspace(0.0, math.log(1000.0), half)), persistent=False)
        self.mlp = nn.Sequential(nn.Linear(2 * half, width), nn.GELU(), nn.Linear(width, width))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        angles = c_noise[:, None] * self.freqs[None, :]
        return self.mlp(torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1))


class FiLMBlock(nn.Module):
    """ISAB whose output is modulated by the noise level: h * (1 + gamma) + beta."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.isab = ISAB(cfg.width, cfg.heads, cfg.inducing)
        self.film = nn.Linear(cfg.width, 2 * cfg.width)
        nn.init.zeros_(self.film.weight)
        nn.init.zeros_(self.film.bias)

    def forward(self, h: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.film(noise).unsqueeze(1).chunk(2, dim=-1)
        return self.isab(h, mask) * (1 + gamma) + beta


class Denoiser(nn.Module):
    """EDM-preconditioned refiner D(x; sigma | H, V_init) = c_skip x + c_out F(c_in x, c_noise, H, V_init).

    ``V_init`` is the generator's estimate in the canonical frame (divided by sigma_data):
    at high noise the refiner can lean on it instead of collapsing towards the mean.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.inp = nn.Linear(2 * cfg.dims + cfg.width, cfg.width)
        self.noise = NoiseEmbedding(cfg.noise_features, cfg.width)
        self.blocks = nn.ModuleList(FiLMBlock(cfg) for _ in range(cfg.denoiser_blocks))
        self.out = nn.Sequential(nn.Linear(cfg.width, cfg.width), nn.GELU(), nn.Linear(cfg.width, cfg.dims))

    def raw(self, x_in: torch.Tensor, c_noise: torch.Tensor, context: torch.Tensor, v_init: torch.Tensor,
            mask: torch.Tensor) -> torch.Tensor:
        h = self.inp(torch.cat([x_in, v_init, context], dim=-1))
        noise = self.noise(c_noise)
        for block in self.blocks:
            h = block(h, noise, mask)
        return self.out(h)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, context: torch.Tensor, v_init: torch.Tensor,
                mask: torch.Tensor, sigma_data: float) -> torch.Tensor:
        c_skip, c_out, c_in, c_noise = (c.to(x.dtype) for c in preconditioning(sigma, sigma_data))
        f = self.raw(c_in[:, None, None] * x, c_noise, context, v_init.to(x.dtype) / sigma_data, mask).to(x.dtype)
        return centre(c_skip[:, None, None] * x + c_out[:, None, None] * f, mask)


class GeometryModel(nn.Module):
    """Context encoder shared by a generator (direct V) and an EDM denoiser (refiner)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.context = SetEncoder(cfg)
        self.generator = Generator(cfg)
        self.denoiser = Denoiser(cfg)

    def forward(self, features: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(context H, generator output V)."""
        context = self.context(features, mask)
        return context, self.generator(context, mask)

    @staticmethod
    def refiner_condition(v_gen: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The generator's output as the refiner sees it: canonical frame, no gradient."""
        return canonical_frame(v_gen.detach(), mask)
