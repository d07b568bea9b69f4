"""STAIG-equivalent fusion: image-guided graph contrastive learning on HVG counts.

Reimplemented from the STAIG paper and its published configuration for 151673:

- input: the 3,000 HVG matrix of the ``staig`` preset (not PCA);
- graph: symmetric k-NN (k = 5) over spot coordinates; one GCN layer (hidden 64, PReLU;
  Glorot-initialised weight, bias added after propagation, as graph libraries define the
  layer) and a two-layer projection head (64, ELU), as in GRACE-style models;
- two views per epoch: feature-column dropout (0.1 / 0.2) and edge dropping where each
  edge's drop probability is its image-embedding distance divided by the sum of the
  distances of its source spot's edges (row-normalized), so edges joining spots that look
  different are dropped more often;
- loss: neighbour-contrastive (positives: the same spot in the other view and its graph
  neighbours in both views) whose negatives exclude spots with the same image pseudo-label
  (KMeans, k = 80, on PCA(16) of the standardized image embeddings), temperature 35;
  computed in log space (log-sum-exp) instead of ratios of exponentials (the max shift is
  skipped only where unit-norm similarities / tau <= 40 cannot overflow), forward and
  gradient together in a buffer reused every epoch;
- 300 epochs, Adam lr 5e-4, weight decay 1e-5; the output is the 64-d projection, which
  is then clustered by mclust EEE and refined by a 15-neighbour majority vote.

The image embedding is standardized exactly once, here (``normalize.standardize``).

Without a usable image, ``StaigConfig(image_mode="none")`` runs STAIG's image-free variant:
edges are dropped uniformly (every edge of a spot with probability 1 / its degree) and there
are no pseudo-labels, so every other spot is a negative (the plain neighbour-contrastive loss).
It has to be asked for: the default image mode refuses a missing image.
"""

from __future__ import annotations

import functools
import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from . import normalize

log = logging.getLogger(__name__)


IMAGE_MODES = ("image", "none")


@dataclass(frozen=True)
class StaigConfig:
    n_neighbors: int = 5
    hidden_dim: int = 64
    projection_dim: int = 64
    feature_drop_1: float = 0.1
    feature_drop_2: float = 0.2
    tau: float = 35.0
    pseudo_label_k: int = 80
    pseudo_label_pcs: int = 16
    epochs: int = 300
    lr: float = 5e-4
    weight_decay: float = 1e-5
    seed: int = 39788
    # "image": image-distance edge dropping and image pseudo-labels (needs the image embedding);
    # "none": STAIG without an image, uniform edge dropping and no pseudo-labels (pass no image).
    image_mode: str = "image"

    def __post_init__(self):
        if self.image_mode not in IMAGE_MODES:
            raise ValueError(f"StaigConfig: image_mode must be one of {IMAGE_MODES}, got {self.image_mode!r}")
        if self.n_neighbors < 1:
            raise ValueError(f"StaigConfig: n_neighbors must be >= 1, got {self.n_neighbors}")


def spatial_knn_edges(coords: np.ndarray, k: int) -> np.ndarray:
    """Symmetrized k-NN graph as a (2, E) array of directed edges (both directions, no self loops)."""
    from sklearn.neighbors import NearestNeighbors

    if coords.ndim != 2 or coords.shape[0] < k + 1:
        raise ValueError(f"spatial_knn_edges: coordinates {coords.shape}: need at least k + 1 = {k + 1} spots "
                         f"for a k={k} graph")
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords)
    src = np.repeat(np.arange(coords.shape[0]), k)
    dst = idx[:, 1:].ravel()
    pairs = np.unique(np.concatenate([np.stack([src, dst]), np.stack([dst, src])], axis=1), axis=1)
    return pairs[:, pairs[0] != pairs[1]]


def edge_drop_probabilities(edges: np.ndarray, image_pcs: np.ndarray) -> np.ndarray:
    """Per-edge drop probability: image distance / sum of the source spot's edge distances
    (STAIG's softmax of log-distances), distances between the image embedding's PCs."""
    dist = np.linalg.norm(image_pcs[edges[0]] - image_pcs[edges[1]], axis=1)
    row_sum = np.bincount(edges[0], weights=dist, minlength=image_pcs.shape[0])
    return np.clip(dist / np.maximum(row_sum[edges[0]], 1e-12), 0.0, 1.0)


def uniform_edge_drop_probabilities(edges: np.ndarray, n_spots: int) -> np.ndarray:
    """Per-edge drop probability without an image: 1 / (number of the source spot's edges), the
    same for every edge of a spot and independent of anything but the graph. It is the image
    rule above with all distances equal, so each spot still loses one edge per view on average."""
    degree = np.bincount(edges[0], minlength=n_spots).astype(np.float64)
    return 1.0 / degree[edges[0]]


def image_components(image_std: np.ndarray, n_pcs: int, seed: int) -> np.ndarray:
    """The standardized image embedding's first ``n_pcs`` principal components: STAIG measures
    both the edge-dropping distances and the pseudo-labels on these (16 in the published code)."""
    from sklearn.decomposition import PCA

    n_pcs = min(n_pcs, image_std.shape[1], image_std.shape[0])
    return PCA(n_components=n_pcs, random_state=seed).fit_transform(image_std)


def pseudo_label_k_for(k: int, n_spots: int, logger: logging.Logger | None = None) -> int:
    """The k that k-means of the image PCs can use: ``k``, or the number of spots when there are
    fewer (then every spot is its own pseudo-label and no negative is excluded); that clamp is
    logged at WARNING (``logger``, else this module's logger)."""
    if k <= n_spots:
        return k
    (logger or log).warning(
        f"staig_fusion: pseudo_label_k={k} but the slide has {n_spots} spots; k-means of the image PCs uses "
        f"k={n_spots}, every spot its own pseudo-label, so the loss excludes no same-pseudo-label negative")
    return n_spots


def image_pseudo_labels(image_pcs: np.ndarray, k: int, seed: int) -> np.ndarray:
    """k-means (``k`` clusters, at most one per spot: see :func:`pseudo_label_k_for`) of the image PCs."""
    from sklearn.cluster import KMeans

    if k > image_pcs.shape[0]:
        raise ValueError(f"image_pseudo_labels: k={k} pseudo-labels for {image_pcs.shape[0]} spots; "
                         "pass pseudo_label_k_for(k, n_spots)")
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(image_pcs)


class ContrastiveMasks:
    """What the debiased neighbour-contrastive loss needs besides the embeddings, built once per
    training run, and the buffer it computes in.

    ``excluded_intra`` / ``excluded_inter`` (n x n) mark, for row i, the spots of the anchor's
    own view / of the other view outside its denominator (neither a positive nor a spot of a
    different pseudo-label). The positives (graph neighbours in both views plus the spot itself
    in the other view, about 13 per spot) are edge lists: ``intra_rows/cols``, ``inter_rows/cols``.
    ``same_pseudo=None`` means no pseudo-labels: every other spot is a negative (STAIG without
    an image).

    The dense similarity blocks live in one buffer allocated on the first call and reused by
    every later one: a fresh 3,600 x 3,600 float32 matrix is 52 MB, above glibc's mmap
    threshold, so each new one was mapped, zero-filled page by page and unmapped again."""

    def __init__(self, adjacency, same_pseudo=None):
        import torch

        n = adjacency.shape[0]
        if adjacency.shape != (n, n) or (same_pseudo is not None and same_pseudo.shape != (n, n)):
            raise ValueError(
                f"ContrastiveMasks: adjacency {tuple(adjacency.shape)} and same-pseudo-label mask "
                f"{None if same_pseudo is None else tuple(same_pseudo.shape)} must both be (n, n)"
            )
        dev = adjacency.device
        adjacency = adjacency.bool()
        eye = torch.eye(n, dtype=torch.bool, device=dev)
        pos_intra = adjacency & ~eye
        pos_inter = adjacency | eye
        neg = ~(same_pseudo.bool() if same_pseudo is not None else eye)
        self.excluded_intra = ~(pos_intra | neg)
        self.excluded_inter = ~(pos_inter | neg)
        # Symmetric masks (always, for a symmetrized graph and pseudo-labels) let both directions
        # share three n x n blocks; see loss_and_gradients.
        self.symmetric = bool((adjacency == adjacency.T).all() and (neg == neg.T).all())
        self.intra_rows, self.intra_cols = pos_intra.nonzero(as_tuple=True)
        self.inter_rows, self.inter_cols = pos_inter.nonzero(as_tuple=True)
        self.pos_rows = torch.cat([self.intra_rows, self.inter_rows])
        self.log_n_pos = torch.log((pos_intra.sum(1) + pos_inter.sum(1)).double())
        self.n = n
        self._buffer = None
        self._excluded_block = None

    def buffer(self, shape, like):
        """The work buffer (``shape``, ``like``'s dtype and device), allocated once and reused."""
        import torch

        b = self._buffer
        if b is None or b.shape != shape or b.dtype != like.dtype or b.device != like.device:
            self._buffer = torch.empty(shape, dtype=like.dtype, device=like.device)
        return self._buffer

    def loss_and_gradients(self, a, b, tau: float):
        """The loss for L2-normalised ``a``, ``b`` (n x d) and its gradients with respect to them,
        computed with in-place ops in :meth:`buffer` (no dense temporary is allocated).

        Per direction (anchor view u, other view v) and row i, with S = u [u; v]^T / tau:
        loss_i = logsumexp_{j in denominator} S_ij - logsumexp_{p in P_i} S_ip + log |P_i|, and
        dloss_i/dS_ij = (softmax weight of j in the denominator) - (weight of j among the positives)."""
        if self.symmetric and 1.0 / tau <= _MAX_UNSHIFTED_EXPONENT:
            return self._shared_blocks(a, b, tau)
        return self._per_direction(a, b, tau)

    def _shared_blocks(self, a, b, tau: float):
        """Both directions from three n x n blocks E_aa, E_ab, E_bb = exp(S) (S_ba = S_ab^T, so
        direction b reads E_ab's columns). Unit-norm rows bound |S| by 1/tau <= 40, so exp(S)
        and its row sums neither overflow nor underflow without a max shift. With s = scale /
        row sums and symmetric E_aa, E_bb the dense gradient is
        dL/da = s_a.(E_aa a) + E_aa (s_a.a) + s_a.(E_ab b) + E_ab (s_b.b), over tau (likewise for b);
        the positives' part is sparse and scattered from the edge list."""
        import torch

        n, d = a.shape
        scale = 0.5 / n  # mean over spots of the average of both directions
        dev = a.device
        ir, ic, jr, jc = (t.to(dev) for t in (self.intra_rows, self.intra_cols, self.inter_rows, self.inter_cols))
        pos_rows = self.pos_rows.to(dev)
        e = self.buffer((3, n, n), a)
        e_aa, e_ab, e_bb = e[0], e[1], e[2]
        a_t, b_t = a / tau, b / tau
        torch.mm(a_t, a.T, out=e_aa)
        torch.mm(a_t, b.T, out=e_ab)
        torch.mm(b_t, b.T, out=e_bb)
        f_aa, f_ab, f_bb = e_aa.view(-1), e_ab.view(-1), e_bb.view(-1)
        pos_a = torch.cat([f_aa[ir * n + ic], f_ab[jr * n + jc]])
        pos_b = torch.cat([f_bb[ir * n + ic], f_ab[jc * n + jr]])  # S_ba[i, j] = S_ab[j, i]
        e.exp_()
        e_aa.masked_fill_(self.excluded_intra.to(dev), 0.0)
        e_bb.masked_fill_(self.excluded_intra.to(dev), 0.0)
        e_ab.masked_fill_(self.excluded_inter.to(dev), 0.0)
        sum_a = e_aa.sum(dim=1) + e_ab.sum(dim=1)
        sum_b = e_bb.sum(dim=1) + e_ab.sum(dim=0)
        lse_pos_a = _segment_logsumexp(pos_a, pos_rows, n)
        lse_pos_b = _segment_logsumexp(pos_b, pos_rows, n)
        total = (sum_a.log().double() - lse_pos_a.double() + sum_b.log().double() - lse_pos_b.double()
                 + 2 * self.log_n_pos.to(dev)).sum()
        s_a, s_b = (scale / sum_a)[:, None], (scale / sum_b)[:, None]
        a2, b2 = torch.cat([a_t, s_a * a_t], dim=1), torch.cat([b_t, s_b * b_t], dim=1)
        from_aa = torch.mm(e_aa, a2)
        from_ab_bb = torch.mm(e[1:].view(2 * n, n), b2)  # rows: E_ab b2, then E_bb b2
        from_ba = torch.mm(e_ab.T, a2)
        grad_a = s_a * (from_aa[:, :d] + from_ab_bb[:n, :d]) + from_aa[:, d:] + from_ab_bb[:n, d:]
        grad_b = s_b * (from_ab_bb[n:, :d] + from_ba[:, :d]) + from_ab_bb[n:, d:] + from_ba[:, d:]
        # Positives: d loss / d S = -scale * (weight among the row's positives) at each of them.
        k = ir.shape[0]
        w_a = (torch.exp(pos_a - lse_pos_a[pos_rows]) * scale)[:, None]
        w_b = (torch.exp(pos_b - lse_pos_b[pos_rows]) * scale)[:, None]
        for grad, rows, weight, other in ((grad_a, ir, w_a[:k], a_t[ic]), (grad_a, ic, w_a[:k], a_t[ir]),
                                          (grad_a, jr, w_a[k:], b_t[jc]), (grad_a, jc, w_b[k:], b_t[jr]),
                                          (grad_b, ir, w_b[:k], b_t[ic]), (grad_b, ic, w_b[:k], b_t[ir]),
                                          (grad_b, jr, w_b[k:], a_t[jc]), (grad_b, jc, w_a[k:], a_t[jr])):
            grad.index_add_(0, rows, other.mul_(weight), alpha=-1)
        return (total * scale).to(a.dtype), grad_a, grad_b

    def _per_direction(self, a, b, tau: float):
        """One (n, 2n) block per direction, ``[S_uu | S_uv]``, shifted by each row's maximum before
        exponentiating (any tau, any mask); dL/du = G [u; v] / tau and dL/d[u; v] = G^T u / tau."""
        import torch

        n = self.n
        dev = a.device
        sim = self.buffer((n, 2 * n), a)
        flat = sim.view(-1)
        scale = 0.5 / n
        pos_rows = self.pos_rows.to(dev)
        pos_flat = pos_rows * (2 * n) + torch.cat([self.intra_cols, self.inter_cols + n]).to(dev)
        if self._excluded_block is None:
            self._excluded_block = torch.cat([self.excluded_intra, self.excluded_inter], dim=1)
        excluded = self._excluded_block.to(dev)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        grad_a, grad_b = torch.zeros_like(a), torch.zeros_like(b)
        for u, v, grad_u, grad_v in ((a, b, grad_a, grad_b), (b, a, grad_b, grad_a)):
            uv = torch.cat([u, v])
            u_tau = u / tau
            torch.mm(u_tau, uv.T, out=sim)
            pos = flat[pos_flat]
            sim.masked_fill_(excluded, float("-inf"))
            top = sim.amax(dim=1, keepdim=True)  # finite: the spot itself in the other view is never excluded
            sim.sub_(top).exp_()
            row_sum = sim.sum(dim=1, keepdim=True)
            lse_all = (row_sum.log() + top).squeeze(1)
            lse_pos = _segment_logsumexp(pos, pos_rows, n)
            total += (lse_all.double() - lse_pos.double() + self.log_n_pos.to(dev)).sum()
            # sim -> dL/dS: the denominator's softmax weights, minus the positives' softmax weights.
            sim.mul_(scale / row_sum)
            flat.index_add_(0, pos_flat, torch.exp(pos - lse_pos[pos_rows]), alpha=-scale)
            grad_u.addmm_(sim, uv, alpha=1.0 / tau)
            back = torch.mm(sim.T, u_tau)
            grad_u.add_(back[:n])
            grad_v.add_(back[n:])
        return (total * scale).to(a.dtype), grad_a, grad_b


# Largest 1/tau for which exp of a cosine / tau needs no max shift: e^40 summed over 2n entries
# stays far below the float32 maximum (e^88), and e^-40 far above its smallest normal (e^-87).
_MAX_UNSHIFTED_EXPONENT = 40.0


def _segment_logsumexp(values, rows, n: int):
    """Row-wise logsumexp of a sparse set of entries (``values[k]`` belongs to row ``rows[k]``),
    shifted by each row's maximum so no exponent overflows."""
    import torch

    top = torch.full((n,), float("-inf"), dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, rows, values.detach(), reduce="amax", include_self=True)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, torch.exp(values - top[rows]))
    return torch.log(sums) + top


@functools.cache
def _contrastive_function():
    """The loss as an autograd function whose forward also computes the gradients (the loss is
    a scalar, so backward only scales them): the dense blocks never outlive the forward call."""
    import torch
    from torch.autograd.function import once_differentiable

    class NeighborContrastive(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a, b, masks, tau):
            loss, grad_a, grad_b = masks.loss_and_gradients(a.detach(), b.detach(), tau)
            ctx.save_for_backward(grad_a, grad_b)
            return loss

        @staticmethod
        @once_differentiable
        def backward(ctx, grad_output):
            grad_a, grad_b = ctx.saved_tensors
            return grad_output * grad_a, grad_output * grad_b, None, None

    return NeighborContrastive


def debiased_neighbor_contrastive_loss(z1, z2, adjacency, same_pseudo, tau: float,
                                       masks: ContrastiveMasks | None = None):
    """Mean over spots and both directions of
    ``-log( mean_{p in P_i} e^{s_ip/tau} / sum_{j in P_i or N_i} e^{s_ij/tau} )`` where P_i is the
    spot itself in the other view plus its graph neighbours in both views, and N_i the spots
    of both views whose pseudo-label differs from spot i's (``same_pseudo=None``: every spot
    but i itself, the plain neighbour-contrastive loss). Inputs are L2-normalised; every sum
    of exponentials is a log-sum-exp. Positives are sparse (about 13 per spot) and read from
    an edge list; only the denominator is dense, computed in a reused buffer together with
    the gradients. Pass ``masks`` built once per run."""
    import torch.nn.functional as F

    m = masks if masks is not None else ContrastiveMasks(adjacency, same_pseudo)
    if z1.shape != z2.shape or z1.ndim != 2 or z1.shape[0] != m.n:
        raise ValueError(f"debiased_neighbor_contrastive_loss: views {tuple(z1.shape)} and {tuple(z2.shape)} "
                         f"must both be ({m.n}, d) for a {m.n}-spot graph")
    return _contrastive_function().apply(F.normalize(z1, dim=1), F.normalize(z2, dim=1), m, float(tau))


def staig_fusion(
    hvg: np.ndarray,
    coords: np.ndarray,
    image_embedding_raw: np.ndarray | None,
    config: StaigConfig = StaigConfig(),
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
    logger: logging.Logger | None = None,
) -> tuple[np.ndarray, dict]:
    """The 64-d STAIG embedding of each spot, and what ran (epochs, final loss, seconds, ...).

    On a slide with fewer spots than ``config.pseudo_label_k`` k-means uses one pseudo-label
    per spot; ``info`` then has ``pseudo_label_k_used`` below ``pseudo_label_k`` and the clamp
    is logged at WARNING (``logger``, else this module's logger), as is a k-means that leaves
    pseudo-labels without a spot (``n_pseudo_labels`` below ``pseudo_label_k_used``).

    ``config.image_mode == "image"`` (the default): ``image_embedding_raw`` is the stored
    encoder output (spots x dims); it is standardized here, once, and drives the edge dropping
    and the pseudo-labels. ``config.image_mode == "none"``: pass ``image_embedding_raw=None``;
    edges are dropped uniformly (:func:`uniform_edge_drop_probabilities`) and the loss has no
    pseudo-labels. Either mode refuses the other's input rather than switching silently.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    started = time.perf_counter()
    use_image = config.image_mode == "image"
    hvg = np.asarray(hvg, dtype=np.float32)
    coords = np.asarray(coords, dtype=np.float64)
    if use_image and image_embedding_raw is None:
        raise ValueError("staig_fusion: image_mode='image' needs the image embedding, got None; "
                         "pass StaigConfig(image_mode='none') to run without an image")
    if not use_image and image_embedding_raw is not None:
        raise ValueError(f"staig_fusion: image_mode='none' was asked for but an image embedding "
                         f"{np.shape(image_embedding_raw)} was passed; pass None, or use image_mode='image'")
    image = np.asarray(image_embedding_raw) if use_image else None
    n = hvg.shape[0] if hvg.ndim >= 1 else 0
    shapes = f"HVG {hvg.shape}, coordinates {coords.shape}" + (f" and image embedding {image.shape}" if use_image else "")
    if hvg.ndim != 2 or coords.shape != (n, 2) or (use_image and (image.ndim != 2 or image.shape[0] != n)):
        raise ValueError(f"staig_fusion: {shapes}: need 2-D matrices with the same number of spots "
                         f"(coordinates as (spots, 2))")
    if n < config.n_neighbors + 1:
        raise ValueError(f"staig_fusion: {n} spots ({shapes}), need at least k + 1 = {config.n_neighbors + 1} "
                         f"for the k={config.n_neighbors} spatial graph")
    for name, block in (("HVG", hvg), ("coordinates", coords), *((("image embedding", image),) if use_image else ())):
        if not np.isfinite(block).all():
            bad = np.argwhere(~np.isfinite(block))
            raise ValueError(f"staig_fusion: {name} matrix {block.shape} has {len(bad)} NaN/inf values "
                             f"(first at {tuple(int(i) for i in bad[0])})")

    edges = spatial_knn_edges(coords, config.n_neighbors)
    if use_image:
        image_std = normalize.standardize(image)
        image_pcs = image_components(image_std, config.pseudo_label_pcs, config.seed)
        drop_p = edge_drop_probabilities(edges, image_pcs)
        k_used = pseudo_label_k_for(config.pseudo_label_k, n, logger)
        pseudo = image_pseudo_labels(image_pcs, k_used, config.seed)
        if len(np.unique(pseudo)) < k_used:
            (logger or log).warning(f"staig_fusion: k-means of the image PCs gave {len(np.unique(pseudo))} non-empty "
                                    f"pseudo-labels of the {k_used} asked for (duplicated image embeddings?)")
    else:
        drop_p = uniform_edge_drop_probabilities(edges, n)
        pseudo = None
        k_used = None

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    dev = torch.device(device)
    x = torch.from_numpy(hvg).to(dev)
    edge_t = torch.from_numpy(edges).to(dev)
    upper = torch.from_numpy(edges[0] < edges[1])
    adjacency = torch.zeros(n, n, dtype=torch.bool, device=dev)
    adjacency[edge_t[0], edge_t[1]] = True
    if pseudo is not None:
        pseudo_t = torch.from_numpy(pseudo).to(dev)
        same_pseudo = pseudo_t[:, None] == pseudo_t[None, :]
    else:
        same_pseudo = None
    masks = ContrastiveMasks(adjacency, same_pseudo)
    del same_pseudo

    def normalized_adjacency(keep: torch.Tensor) -> torch.Tensor:
        # GCN propagation D^-1/2 (A + I) D^-1/2 over the kept edges (undirected: an edge is
        # kept or dropped in both directions together).
        src, dst = edge_t[0][keep], edge_t[1][keep]
        loops = torch.arange(n, device=dev)
        rows, cols = torch.cat([src, loops]), torch.cat([dst, loops])
        deg = torch.bincount(rows, minlength=n).float()
        w = deg[rows].rsqrt() * deg[cols].rsqrt()
        return torch.sparse_coo_tensor(torch.stack([rows, cols]), w, (n, n), check_invariants=False).coalesce()

    # An undirected edge is kept or dropped in both directions together: each directed edge
    # points at its (min, max) pair, whose drop probability is the one seen from the lower spot.
    pair_keys, pair_of_edge = np.unique(np.minimum(edges[0], edges[1]) * n + np.maximum(edges[0], edges[1]),
                                        return_inverse=True)
    upper_keys = edges[0][upper.numpy()] * n + edges[1][upper.numpy()]  # sorted: edges come from np.unique
    assert np.array_equal(upper_keys, pair_keys)
    pair_drop = torch.from_numpy(drop_p[upper.numpy()]).float()
    pair_of_edge_t = torch.from_numpy(pair_of_edge)

    def drop_edges() -> torch.Tensor:
        keep_pair = torch.rand(pair_drop.shape[0], generator=gen) >= pair_drop
        return keep_pair[pair_of_edge_t].to(dev)

    def kept_columns(rate: float) -> torch.Tensor:
        # Feature dropout zeroes whole HVG columns; it is applied to the GCN weight's columns
        # instead of to a spots x genes copy of the input: the same products (x_ij * 0 or
        # x_ij * w_kj), without a 3,600 x 3,000 matrix allocated per view and epoch.
        return (torch.rand(x.shape[1], generator=gen) >= rate).to(dev, x.dtype)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            # A GCN layer as graph libraries define it: Glorot-initialised weight without bias,
            # propagation, then a zero-initialised bias (nn.Linear's default init is 2.4x
            # smaller on 3,000 inputs, and its bias would be propagated with the features).
            self.gcn = nn.Linear(x.shape[1], config.hidden_dim, bias=False)
            nn.init.xavier_uniform_(self.gcn.weight)
            self.gcn_bias = nn.Parameter(torch.zeros(config.hidden_dim))
            self.act = nn.PReLU()
            self.fc1 = nn.Linear(config.hidden_dim, config.projection_dim)
            self.fc2 = nn.Linear(config.projection_dim, config.hidden_dim)

        def forward(self, feats, adj, columns=None):
            weight = self.gcn.weight if columns is None else self.gcn.weight * columns
            h = self.act(torch.sparse.mm(adj, F.linear(feats, weight)) + self.gcn_bias)
            return self.fc2(F.elu(self.fc1(h)))

    model = Model().to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: list[float] = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        optimizer.zero_grad()
        # Same draw order as before: view 1's columns, its edges, then view 2's.
        cols_1 = kept_columns(config.feature_drop_1)
        z1 = model(x, normalized_adjacency(drop_edges()), cols_1)
        cols_2 = kept_columns(config.feature_drop_2)
        z2 = model(x, normalized_adjacency(drop_edges()), cols_2)
        loss = debiased_neighbor_contrastive_loss(z1, z2, adjacency, None, config.tau, masks)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"staig_fusion: loss became {loss.item()} at epoch {epoch}")
        loss.backward()
        optimizer.step()
        history.append(float(loss.item()))
        if progress is not None:
            progress(epoch, config.epochs, history[-1])
    model.eval()
    with torch.no_grad():
        full = torch.ones(edges.shape[1], dtype=torch.bool, device=dev)
        out = model(x, normalized_adjacency(full)).cpu().numpy().astype(np.float32)
    info = {
        "method": "staig_fusion",
        **asdict(config),
        "epochs": config.epochs,
        "final_loss": history[-1] if history else None,
        "loss_history": history,
        "seconds": time.perf_counter() - started,
        "device": str(dev),
        "dims": int(out.shape[1]),
        "n_edges": int(edges.shape[1]),
        "image": "embedding" if use_image else "none",
        "image_dims": int(image.shape[1]) if use_image else 0,
        "edge_dropping": "image_distance" if use_image else "uniform",
        "pseudo_labels": "kmeans_image_pcs" if use_image else "none",
        "mean_edge_drop_probability": float(drop_p.mean()),
        "pseudo_label_k_used": k_used,  # None without an image (no pseudo-labels)
        "n_pseudo_labels": int(len(np.unique(pseudo))) if pseudo is not None else 0,
        "input_genes": int(hvg.shape[1]),
    }
    return out, info
