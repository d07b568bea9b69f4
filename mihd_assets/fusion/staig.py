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
  computed in log space (log-sum-exp) instead of ratios of exponentials;
- 300 epochs, Adam lr 5e-4, weight decay 1e-5; the output is the 64-d projection, which
  is then clustered by mclust EEE and refined by a 15-neighbour majority vote.

The image embedding is standardized exactly once, here (``normalize.standardize``).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np

from . import normalize


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


def spatial_knn_edges(coords: np.ndarray, k: int) -> np.ndarray:
    """Symmetrized k-NN graph as a (2, E) array of directed edges (both directions, no self loops)."""
    from sklearn.neighbors import NearestNeighbors

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


def image_components(image_std: np.ndarray, n_pcs: int, seed: int) -> np.ndarray:
    """The standardized image embedding's first ``n_pcs`` principal components: STAIG measures
    both the edge-dropping distances and the pseudo-labels on these (16 in the published code)."""
    from sklearn.decomposition import PCA

    n_pcs = min(n_pcs, image_std.shape[1], image_std.shape[0])
    return PCA(n_components=n_pcs, random_state=seed).fit_transform(image_std)


def image_pseudo_labels(image_pcs: np.ndarray, k: int, seed: int) -> np.ndarray:
    from sklearn.cluster import KMeans

    k = min(k, image_pcs.shape[0])
    return KMeans(n_clusters=k, n_init=10, random_state=seed).fit_predict(image_pcs)


class ContrastiveMasks:
    """What the debiased neighbour-contrastive loss needs besides the embeddings, built once per
    training run: the positive pairs as an edge list (graph neighbours, in both views, plus the
    spot itself in the other view) and additive 0 / -inf biases selecting each row's
    denominator (its positives and the spots of a different pseudo-label)."""

    def __init__(self, adjacency, same_pseudo):
        import torch

        n = adjacency.shape[0]
        eye = torch.eye(n, dtype=torch.bool, device=adjacency.device)
        pos_intra = adjacency & ~eye
        pos_inter = adjacency | eye
        neg = ~same_pseudo
        zero = torch.zeros((), device=adjacency.device)
        minus_inf = torch.tensor(float("-inf"), device=adjacency.device)
        self.bias_intra = torch.where(pos_intra | neg, zero, minus_inf)
        self.bias_inter = torch.where(pos_inter | neg, zero, minus_inf)
        self.intra_rows, self.intra_cols = pos_intra.nonzero(as_tuple=True)
        self.inter_rows, self.inter_cols = pos_inter.nonzero(as_tuple=True)
        self.log_n_pos = torch.log((pos_intra.sum(1) + pos_inter.sum(1)).float())
        self.n = n


def _segment_logsumexp(values, rows, n: int):
    """Row-wise logsumexp of a sparse set of entries (``values[k]`` belongs to row ``rows[k]``),
    shifted by each row's maximum so no exponent overflows."""
    import torch

    top = torch.full((n,), float("-inf"), dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, rows, values.detach(), reduce="amax", include_self=True)
    sums = torch.zeros(n, dtype=values.dtype, device=values.device).index_add(0, rows, torch.exp(values - top[rows]))
    return torch.log(sums) + top


def debiased_neighbor_contrastive_loss(z1, z2, adjacency, same_pseudo, tau: float,
                                       masks: ContrastiveMasks | None = None):
    """Mean over spots and both directions of
    ``-log( mean_{p in P_i} e^{s_ip/tau} / sum_{j in P_i or N_i} e^{s_ij/tau} )`` where P_i is the
    spot itself in the other view plus its graph neighbours in both views, and N_i the spots
    of both views whose pseudo-label differs from spot i's. Inputs are L2-normalised; every
    sum of exponentials is a log-sum-exp. Positives are sparse (about 13 per spot) and read
    from an edge list; only the denominator is dense. Pass ``masks`` built once per run."""
    import torch
    import torch.nn.functional as F

    m = masks if masks is not None else ContrastiveMasks(adjacency, same_pseudo)
    a_all, b_all = F.normalize(z1, dim=1), F.normalize(z2, dim=1)

    def one_direction(a, b, inter):
        intra = (a @ a.T) / tau
        lse_all = torch.logaddexp(torch.logsumexp(intra + m.bias_intra, dim=1),
                                  torch.logsumexp(inter + m.bias_inter, dim=1))
        pos = torch.cat([intra[m.intra_rows, m.intra_cols], inter[m.inter_rows, m.inter_cols]])
        rows = torch.cat([m.intra_rows, m.inter_rows])
        log_mean_pos = _segment_logsumexp(pos, rows, m.n) - m.log_n_pos
        return -(log_mean_pos - lse_all)

    inter_ab = (a_all @ b_all.T) / tau
    return 0.5 * (one_direction(a_all, b_all, inter_ab) + one_direction(b_all, a_all, inter_ab.T)).mean()


def staig_fusion(
    hvg: np.ndarray,
    coords: np.ndarray,
    image_embedding_raw: np.ndarray,
    config: StaigConfig = StaigConfig(),
    device: str = "cpu",
    progress: Callable[[int, int, float], None] | None = None,
) -> tuple[np.ndarray, dict]:
    """The 64-d STAIG embedding of each spot, and what ran (epochs, final loss, seconds, ...).

    ``image_embedding_raw`` is the stored encoder output; it is standardized here, once.
    """
    import torch
    import torch.nn as nn
    import torch.nn.functional as F

    started = time.perf_counter()
    hvg = np.asarray(hvg, dtype=np.float32)
    n = hvg.shape[0]
    if hvg.ndim != 2 or coords.shape != (n, 2) or image_embedding_raw.shape[0] != n:
        raise ValueError(
            f"staig_fusion: HVG {hvg.shape}, coordinates {coords.shape} and image embedding "
            f"{image_embedding_raw.shape} must have the same number of spots"
        )
    if n <= config.n_neighbors:
        raise ValueError(f"staig_fusion: {n} spots, need more than k={config.n_neighbors} for the spatial graph")
    for name, block in (("HVG", hvg), ("image embedding", image_embedding_raw)):
        if not np.isfinite(block).all():
            raise ValueError(f"staig_fusion: {name} matrix {block.shape} has NaN/inf values")

    image_std = normalize.standardize(image_embedding_raw)
    edges = spatial_knn_edges(np.asarray(coords, dtype=np.float64), config.n_neighbors)
    image_pcs = image_components(image_std, config.pseudo_label_pcs, config.seed)
    drop_p = edge_drop_probabilities(edges, image_pcs)
    pseudo = image_pseudo_labels(image_pcs, config.pseudo_label_k, config.seed)

    torch.manual_seed(config.seed)
    gen = torch.Generator().manual_seed(config.seed)
    dev = torch.device(device)
    x = torch.from_numpy(hvg).to(dev)
    edge_t = torch.from_numpy(edges).to(dev)
    upper = torch.from_numpy(edges[0] < edges[1])
    adjacency = torch.zeros(n, n, dtype=torch.bool, device=dev)
    adjacency[edge_t[0], edge_t[1]] = True
    pseudo_t = torch.from_numpy(pseudo).to(dev)
    same_pseudo = pseudo_t[:, None] == pseudo_t[None, :]
    masks = ContrastiveMasks(adjacency, same_pseudo)

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

    def drop_features(rate: float) -> torch.Tensor:
        mask = (torch.rand(x.shape[1], generator=gen) >= rate).to(dev, x.dtype)
        return x * mask

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

        def forward(self, feats, adj):
            h = self.act(torch.sparse.mm(adj, self.gcn(feats)) + self.gcn_bias)
            return self.fc2(F.elu(self.fc1(h)))

    model = Model().to(dev)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    history: list[float] = []
    for epoch in range(1, config.epochs + 1):
        model.train()
        optimizer.zero_grad()
        z1 = model(drop_features(config.feature_drop_1), normalized_adjacency(drop_edges()))
        z2 = model(drop_features(config.feature_drop_2), normalized_adjacency(drop_edges()))
        loss = debiased_neighbor_contrastive_loss(z1, z2, adjacency, same_pseudo, config.tau, masks)
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
        "mean_edge_drop_probability": float(drop_p.mean()),
        "n_pseudo_labels": int(len(np.unique(pseudo))),
        "input_genes": int(hvg.shape[1]),
    }
    return out, info
