"""Numerically stable losses shared by the trained fusion and image-only methods.

Every loss here runs in float32 with autocast switched off, whatever the caller's
context: a STEGO run once went NaN because a dense 3,639 x 3,639 similarity matrix
divided by a small temperature overflowed ``exp``. Softmax-type terms go through
log-sum-exp (``F.cross_entropy`` / ``log_softmax`` / ``logsumexp``), and rows are
brought to a unit max-abs scale before L2 normalisation so that even inputs near the
float32 limit (whose squared norm would overflow) normalise to the right direction.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor


def _float32_no_autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """Switch autocast off for the device type (a no-op outside an autocast region)."""
    return torch.autocast(device_type=device.type, enabled=False)


def unit_rows(x: Tensor) -> Tensor:
    """Rows of ``x`` scaled to unit L2 norm, computed in float32 without overflow.

    Dividing by each row's max-abs value first keeps the squared norm finite for any
    finite input (``F.normalize`` alone returns zeros for rows of 1e30). All-zero rows
    stay zero.
    """
    x = x.float()
    peak = x.abs().amax(dim=1, keepdim=True)
    x = x / torch.where(peak > 0, peak, torch.ones_like(peak))
    return F.normalize(x, dim=1)


def _check_pair(name: str, a: Tensor, b: Tensor) -> None:
    if a.ndim != 2 or b.ndim != 2:
        raise ValueError(f"{name}: expected two 2-D (n, d) tensors, got shapes {tuple(a.shape)} and {tuple(b.shape)}")
    if a.shape != b.shape:
        raise ValueError(f"{name}: shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.shape[0] == 0:
        raise ValueError(f"{name}: empty batch of shape {tuple(a.shape)}")


def info_nce(a: Tensor, b: Tensor, temperature: float) -> Tensor:
    """Symmetric cross-modal InfoNCE between row-paired embeddings ``a`` and ``b`` (n x d).

    Row i of ``a`` and row i of ``b`` are the positive pair; every other row of the other
    modality in the batch is a negative. Both inputs are L2-normalised here, the cosine
    logits are divided by ``temperature`` and the loss is the mean of the a->b and b->a
    cross-entropies (each a log-sum-exp, finite for any temperature > 0 and any finite
    input). Always float32, also inside an autocast region.
    """
    _check_pair("info_nce", a, b)
    if not temperature > 0:
        raise ValueError(f"info_nce: temperature must be > 0, got {temperature}")
    with _float32_no_autocast(a.device):
        logits = unit_rows(a) @ unit_rows(b).T / float(temperature)
        targets = torch.arange(a.shape[0], device=a.device)
        return 0.5 * (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets))


def byol_regression_loss(prediction: Tensor, target: Tensor) -> Tensor:
    """BYOL's negative-free loss: mean over rows of ``2 - 2 cos(prediction, target)``.

    The target is detached here (it comes from the EMA network and must not receive
    gradients). Bounded in [0, 4].
    """
    _check_pair("byol_regression_loss", prediction, target)
    with _float32_no_autocast(prediction.device):
        cosine = (unit_rows(prediction) * unit_rows(target.detach())).sum(dim=1)
        return (2.0 - 2.0 * cosine).mean()


def scan_loss(anchor_logits: Tensor, neighbor_logits: Tensor, entropy_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """SCAN clustering loss (Van Gansbeke et al. 2020) from the head's logits.

    consistency = mean_i -log <p_i, p_j> for each anchor i and a mined neighbour j, taken
    as ``-logsumexp(log p_i + log p_j)`` so it stays finite when the two predictions
    disagree completely (the naive ``log(dot)`` is ``log 0``);
    entropy = H(mean_i p_i), the entropy of the batch's average prediction, which keeps
    all clusters in use. Returns ``(consistency - entropy_weight * entropy, consistency,
    entropy)``.
    """
    _check_pair("scan_loss", anchor_logits, neighbor_logits)
    with _float32_no_autocast(anchor_logits.device):
        log_p_anchor = F.log_softmax(anchor_logits.float(), dim=1)
        log_p_neighbor = F.log_softmax(neighbor_logits.float(), dim=1)
        consistency = -torch.logsumexp(log_p_anchor + log_p_neighbor, dim=1).mean()
        # log of the mean probability, also via log-sum-exp: never log(0).
        log_mean_p = torch.logsumexp(log_p_anchor, dim=0) - torch.log(
            torch.tensor(float(anchor_logits.shape[0]), device=anchor_logits.device)
        )
        entropy = -(log_mean_p.exp() * log_mean_p).sum()
        return consistency - entropy_weight * entropy, consistency, entropy


def cosine_correlation(a: Tensor, b: Tensor) -> Tensor:
    """Dense ``|a| x |b|`` cosine similarities of the rows, float32 and without autocast."""
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"cosine_correlation: expected (n, d) and (m, d) tensors, got {tuple(a.shape)} and {tuple(b.shape)}")
    with _float32_no_autocast(a.device):
        return unit_rows(a) @ unit_rows(b).T


def stego_correspondence_loss(feature_corr: Tensor, codes_a: Tensor, codes_b: Tensor, shift: float) -> Tensor:
    """STEGO's correspondence-distillation term between two sets of spots A and B.

    ``feature_corr`` = the frozen backbone features' cosine correlations (|A| x |B|, see
    :func:`cosine_correlation`; no gradient flows into it). It is centred per row here
    (STEGO's ``pointwise`` option) so the shift acts relative to each spot's typical
    similarity. S = cosine correlations of the head's codes. The loss
    ``-mean((F - shift) * max(S, 0))`` raises S where the backbone says the pair is more
    alike than ``shift`` and lowers it (to 0) elsewhere. Only bounded cosines enter, no
    exponentials: finite for any finite input, at any size of the dense matrices.
    """
    if feature_corr.ndim != 2 or codes_a.ndim != 2 or codes_b.ndim != 2:
        raise ValueError(
            "stego_correspondence_loss: expected 2-D tensors, got feature correlations "
            f"{tuple(feature_corr.shape)} and codes {tuple(codes_a.shape)}, {tuple(codes_b.shape)}"
        )
    if feature_corr.shape != (codes_a.shape[0], codes_b.shape[0]):
        raise ValueError(
            f"stego_correspondence_loss: feature correlations of shape {tuple(feature_corr.shape)} do not match "
            f"codes of shapes {tuple(codes_a.shape)} and {tuple(codes_b.shape)}"
        )
    with _float32_no_autocast(codes_a.device):
        feature_corr = feature_corr.detach().float()
        # (F - row mean) - shift, as one subtraction over the dense matrix.
        shifted = feature_corr - (feature_corr.mean(dim=1, keepdim=True) + shift)
        code_corr = unit_rows(codes_a) @ unit_rows(codes_b).T
        return -(shifted * code_corr.clamp(min=0)).mean()
