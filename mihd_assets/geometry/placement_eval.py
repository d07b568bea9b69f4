"""Scoring a placement against hidden positions: the whole layout, each set, and the baselines.

Metrics (the same as the held-out evaluation, each with the number of cells it used):

* ``knn_jaccard_10`` / ``knn_jaccard_30``: mean over cells of |kNN_layout ∩ kNN_true| /
  |kNN_layout ∪ kNN_true| at k = 10 and 30, over every cell;
* ``distance_spearman``: Spearman correlation of all pairwise distances, on at most
  ``max_pair_cells`` cells (a seeded random subset beyond that: the pairs grow as n^2);
* ``trustworthiness``: sklearn's trustworthiness at k = 10, on the same subset.

Scopes: ``whole`` scores one layout of every cell; ``per_set`` scores, within each of (at
most ``max_sets``) placement sets, the model's own estimate of that set
(``geometry_set_estimate``), the joined layout restricted to the set (``geometry``) and the
baselines, so what joining the sets costs or gains is visible beside the whole-layout score.

Baselines on the same cells: ``random`` (Gaussian coordinates) and ``expression_spectral``
(spectral embedding of the kNN graph of the cells' encoder features, the model's own input).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

METRICS = ("knn_jaccard_10", "knn_jaccard_30", "distance_spearman", "trustworthiness")
TRUST_K = 10
BRUTE_FORCE_MAX = 4000  # up to this many points one distance matrix beats a KD-tree


def knn_indices(points: np.ndarray, k: int) -> np.ndarray:
    """Each point's k nearest other points, ``(n, k)``, in no particular order (one distance
    matrix up to ``BRUTE_FORCE_MAX`` points, a KD-tree beyond)."""
    n = len(points)
    if n <= BRUTE_FORCE_MAX:
        from scipy.spatial.distance import cdist

        d = cdist(points, points, "sqeuclidean")
        np.fill_diagonal(d, np.inf)
        return np.argpartition(d, k - 1, axis=1)[:, :k]
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k).fit(points).kneighbors(None, return_distance=False)


def _jaccard(a: np.ndarray, b: np.ndarray, k: int) -> float:
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)
    return float(np.mean(shared / (2 * k - shared)))


def knn_jaccard_all(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    """Mean kNN Jaccard at ``k`` over every point."""
    if len(true) < k + 1:
        raise ValueError(f"Jaccard@{k} needs at least {k + 1} cells, got {len(true)}")
    return _jaccard(knn_indices(pred, k), knn_indices(true, k), k)


class TrueLayout:
    """The hidden positions of a set of cells, with what every scored layout is compared to
    computed once: their kNN at 10 and 30, and the ranks of their pairwise distances (on at
    most ``max_pair_cells`` cells, a seeded random subset beyond that)."""

    def __init__(self, true: np.ndarray, max_pair_cells: int, seed: int):
        from scipy.spatial.distance import pdist
        from scipy.stats import rankdata

        n = len(true)
        if n <= 2 * TRUST_K or n < 31:
            raise ValueError(f"scoring a layout needs more than {max(2 * TRUST_K, 30)} cells, got {n}")
        self.true = true
        self.knn = {k: knn_indices(true, k) for k in (10, 30)}
        self.subset = (np.arange(n) if n <= max_pair_cells
                       else np.sort(np.random.default_rng(seed).choice(n, max_pair_cells, replace=False)))
        distances = pdist(true[self.subset])
        self.constant = bool(np.ptp(distances) == 0)
        self.ranks = rankdata(distances)

    def metrics(self, pred: np.ndarray) -> dict:
        """The four metrics of ``pred`` (same cells, same order), each with its number of cells."""
        from scipy.spatial.distance import pdist
        from scipy.stats import rankdata
        from sklearn.manifold import trustworthiness

        distances = pdist(pred[self.subset])
        if self.constant or np.ptp(distances) == 0:
            rho = float("nan")  # a rank correlation with a constant is undefined
        else:
            rho = float(np.corrcoef(rankdata(distances), self.ranks)[0, 1])  # Spearman = Pearson of the ranks
        trust = float(trustworthiness(self.true[self.subset], pred[self.subset], n_neighbors=TRUST_K))
        return {"knn_jaccard_10": _jaccard(knn_indices(pred, 10), self.knn[10], 10),
                "knn_jaccard_30": _jaccard(knn_indices(pred, 30), self.knn[30], 30),
                "n_cells_jaccard": len(self.true), "distance_spearman": rho, "trustworthiness": trust,
                "n_cells_pairs": int(len(self.subset))}


def layout_metrics(pred: np.ndarray, true: np.ndarray, max_pair_cells: int, seed: int) -> dict:
    """The four metrics of one layout against the hidden positions, each with its number of cells."""
    return TrueLayout(true, max_pair_cells, seed).metrics(pred)


def random_layout(n: int, dims: int, rng: np.random.Generator) -> np.ndarray:
    return rng.normal(0.0, 1.0, size=(n, dims))


def spectral_layout(features: np.ndarray, dims: int, k: int, seed: int) -> np.ndarray:
    from sklearn.manifold import SpectralEmbedding

    return SpectralEmbedding(n_components=dims, affinity="nearest_neighbors", n_neighbors=k,
                             random_state=seed).fit_transform(features)


def evaluate_placement(layout: np.ndarray, set_index: np.ndarray, set_coords: np.ndarray, features: np.ndarray,
                       truth: np.ndarray, *, k: int = 10, max_pair_cells: int = 3000, max_sets: int = 32,
                       seed: int = 0) -> pd.DataFrame:
    """One row per (scope, method): the metrics above, ``n_cells`` and ``n_sets``."""
    rng = np.random.default_rng(seed)
    dims = layout.shape[1]
    n = len(layout)
    rows = []
    whole = {
        "geometry": layout,
        "random": random_layout(n, dims, rng),
        "expression_spectral": spectral_layout(features, dims, k, seed),
    }
    reference = TrueLayout(truth, max_pair_cells, seed)
    for method, pred in whole.items():
        rows.append({"scope": "whole", "method": method, "n_sets": None, **reference.metrics(pred)})
    chosen = np.sort(rng.choice(len(set_index), min(max_sets, len(set_index)), replace=False))
    per_set: dict[str, list[dict]] = {m: [] for m in ("geometry_set_estimate", "geometry", "random", "expression_spectral")}
    for s in chosen:
        cells = set_index[s]
        reference = TrueLayout(truth[cells], max_pair_cells, seed)
        preds = {
            "geometry_set_estimate": set_coords[s],
            "geometry": layout[cells],
            "random": whole["random"][cells],
            "expression_spectral": spectral_layout(features[cells], dims, k, seed),
        }
        for method, pred in preds.items():
            per_set[method].append(reference.metrics(pred))
    for method, scores in per_set.items():
        frame = pd.DataFrame(scores)
        rows.append({"scope": "per_set", "method": method, "n_sets": int(len(chosen)),
                     **{m: float(frame[m].mean()) for m in METRICS},
                     "n_cells_jaccard": int(frame["n_cells_jaccard"].iloc[0]),
                     "n_cells_pairs": int(frame["n_cells_pairs"].iloc[0])})
    out = pd.DataFrame(rows)
    out["n_cells"] = np.where(out["scope"] == "whole", n, set_index.shape[1])
    out["n_sets"] = out["n_sets"].astype("Int64")  # NULL for the whole layout
    return out
