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


def knn_indices(points: np.ndarray, k: int) -> np.ndarray:
    """Each point's k nearest other points, ``(n, k)`` (a KD-tree: fine for every cell of a dataset)."""
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k).fit(points).kneighbors(None, return_distance=False)


def knn_jaccard_all(pred: np.ndarray, true: np.ndarray, k: int) -> float:
    """Mean kNN Jaccard at ``k`` over every point."""
    if len(true) < k + 1:
        raise ValueError(f"Jaccard@{k} needs at least {k + 1} cells, got {len(true)}")
    both = np.sort(np.concatenate([knn_indices(pred, k), knn_indices(true, k)], axis=1), axis=1)
    shared = (both[:, 1:] == both[:, :-1]).sum(axis=1)
    return float(np.mean(shared / (2 * k - shared)))


def pair_metrics(pred: np.ndarray, true: np.ndarray) -> tuple[float, float]:
    """(Spearman of pairwise distances, trustworthiness@10) on these points."""
    from scipy.spatial.distance import pdist
    from scipy.stats import spearmanr
    from sklearn.manifold import trustworthiness

    if len(true) <= 2 * TRUST_K:
        raise ValueError(f"trustworthiness@{TRUST_K} needs more than {2 * TRUST_K} cells, got {len(true)}")
    dp, dt = pdist(pred), pdist(true)
    rho = float(spearmanr(dp, dt).statistic) if np.ptp(dp) > 0 and np.ptp(dt) > 0 else float("nan")
    return rho, float(trustworthiness(true, pred, n_neighbors=TRUST_K))


def layout_metrics(pred: np.ndarray, true: np.ndarray, max_pair_cells: int, seed: int) -> dict:
    """The four metrics of one layout, each with its number of cells."""
    n = len(true)
    subset = np.arange(n) if n <= max_pair_cells else np.sort(np.random.default_rng(seed).choice(n, max_pair_cells, replace=False))
    rho, trust = pair_metrics(pred[subset], true[subset])
    return {"knn_jaccard_10": knn_jaccard_all(pred, true, 10), "knn_jaccard_30": knn_jaccard_all(pred, true, 30),
            "n_cells_jaccard": n, "distance_spearman": rho, "trustworthiness": trust,
            "n_cells_pairs": int(len(subset))}


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
    for method, pred in whole.items():
        rows.append({"scope": "whole", "method": method, "n_sets": None, **layout_metrics(pred, truth, max_pair_cells, seed)})
    chosen = np.sort(rng.choice(len(set_index), min(max_sets, len(set_index)), replace=False))
    per_set: dict[str, list[dict]] = {m: [] for m in ("geometry_set_estimate", "geometry", "random", "expression_spectral")}
    for s in chosen:
        cells = set_index[s]
        true = truth[cells]
        preds = {
            "geometry_set_estimate": set_coords[s],
            "geometry": layout[cells],
            "random": whole["random"][cells],
            "expression_spectral": spectral_layout(features[cells], dims, k, seed),
        }
        for method, pred in preds.items():
            per_set[method].append(layout_metrics(pred, true, max_pair_cells, seed))
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
