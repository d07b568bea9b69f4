"""Agreement with the annotated layers (sklearn) and spatial continuity (CHAOS, PAS)."""

from __future__ import annotations

import numpy as np
import pandas as pd
from sklearn import metrics as skm
from sklearn.neighbors import NearestNeighbors


def agreement(truth: pd.Series | np.ndarray, labels: np.ndarray) -> dict:
    """ARI, NMI, homogeneity and completeness on the spots that have a truth label."""
    truth = pd.Series(np.asarray(truth, dtype=object))
    known = truth.notna().to_numpy() & (truth.astype(str) != "nan").to_numpy()
    t, p = truth[known].astype(str).to_numpy(), np.asarray(labels)[known]
    return {
        "ari": float(skm.adjusted_rand_score(t, p)),
        "nmi": float(skm.normalized_mutual_info_score(t, p)),
        "homogeneity": float(skm.homogeneity_score(t, p)),
        "completeness": float(skm.completeness_score(t, p)),
        "n_labelled": int(known.sum()),
    }


def chaos(labels: np.ndarray, coords: np.ndarray) -> float:
    """CHAOS (Shang & Zhou 2022): mean distance from each spot to its nearest spot of the
    same cluster, coordinates standardized; lower = spatially more compact domains."""
    labels = np.asarray(labels)
    xy = np.asarray(coords, dtype=np.float64)
    xy = (xy - xy.mean(axis=0)) / xy.std(axis=0).clip(min=1e-12)
    total = 0.0
    for label in np.unique(labels):
        members = xy[labels == label]
        if members.shape[0] < 2:
            continue
        dist, _ = NearestNeighbors(n_neighbors=2).fit(members).kneighbors(members)
        total += float(dist[:, 1].sum())
    return total / labels.shape[0]


def pas(labels: np.ndarray, coords: np.ndarray, k: int = 10) -> float:
    """PAS: fraction of spots whose label differs from more than half of their ``k``
    nearest spots (at least 6 of 10); lower = fewer scattered spots."""
    labels = np.asarray(labels)
    k = min(k, labels.shape[0] - 1)
    _, idx = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords)
    differ = (labels[idx[:, 1:]] != labels[:, None]).sum(axis=1)
    return float((differ > k / 2).mean())
