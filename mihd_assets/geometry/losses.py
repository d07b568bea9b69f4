"""Generator and geometry losses on padded sets (mask True = real point).

Procrustes-aligned MSE compares shapes after the best rotation/reflection; the scale loss
compares RMS radii; kNN-NCA and edge losses are computed on RMS-normalised sets, so they
only see the shape (the scale term alone owns the scale).
"""

from __future__ import annotations

import torch

from .models import centre

# Finite stand-in for -inf: masked logits must not turn padded rows into NaN gradients.
_NEG = -1e9


def rms(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """RMS distance of each set's points from its centroid: (B,)."""
    m = mask.to(x.dtype)
    xc = centre(x, mask)
    return torch.sqrt((xc**2).sum(dim=(1, 2)) / m.sum(dim=1).clamp_min(1.0) + 1e-12)


def procrustes_align(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``pred`` rotated/reflected onto ``target`` (orthogonal Procrustes per set, no scaling)."""
    p, t = centre(pred, mask).float(), centre(target, mask).float()
    u, _, vh = torch.linalg.svd(p.transpose(1, 2) @ t)
    return p @ (u @ vh)


def procrustes_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    aligned = procrustes_align(pred, target, mask)
    m = mask.unsqueeze(-1).float()
    err = ((aligned - centre(target, mask).float()) ** 2 * m).sum(dim=(1, 2)) / m.sum(dim=(1, 2)).clamp_min(1.0)
    return err.mean()


def scale_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(log RMS(pred) - log RMS(target))^2, averaged over sets."""
    return ((torch.log(rms(pred.float(), mask)) - torch.log(rms(target.float(), mask))) ** 2).mean()


def _pairwise_sq(x: torch.Tensor) -> torch.Tensor:
    return torch.cdist(x, x).pow(2)


def _normalized(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return centre(x.float(), mask) / rms(x.float(), mask)[:, None, None]


def knn_nca_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, k: int = 10,
                 temperature: float = 0.1) -> torch.Tensor:
    """-log of the softmax(-d^2/T) mass that each point puts on its true k nearest neighbours."""
    p, t = _normalized(pred, mask), _normalized(target, mask)
    n = mask.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)[None]
    invalid = ~(mask[:, None, :] & mask[:, :, None]) | eye
    dt = _pairwise_sq(t).masked_fill(invalid, float("inf"))
    kk = min(k, n - 1)
    nbrs = dt.topk(kk, dim=-1, largest=False).indices
    true_nb = torch.zeros_like(invalid).scatter_(-1, nbrs, True) & ~invalid
    logits = (-_pairwise_sq(p) / temperature).masked_fill(invalid, _NEG)
    log_p = torch.log_softmax(logits, dim=-1)
    mass = torch.logsumexp(log_p.masked_fill(~true_nb, _NEG), dim=-1)
    return -(mass * mask.float()).sum() / mask.float().sum()


def edge_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, k: int = 10) -> torch.Tensor:
    """Squared error of the lengths of each point's true kNN edges, on RMS-normalised sets."""
    p, t = _normalized(pred, mask), _normalized(target, mask)
    n = mask.shape[1]
    eye = torch.eye(n, dtype=torch.bool, device=mask.device)[None]
    invalid = ~(mask[:, None, :] & mask[:, :, None]) | eye
    dt = torch.cdist(t, t)
    nbrs = dt.masked_fill(invalid, float("inf")).topk(min(k, n - 1), dim=-1, largest=False).indices
    edge = torch.zeros_like(invalid).scatter_(-1, nbrs, True) & ~invalid
    diff = (torch.cdist(p, p) - dt) ** 2
    return (diff * edge.float()).sum() / edge.float().sum().clamp_min(1.0)
