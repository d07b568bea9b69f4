"""The one place embeddings are normalised after loading (seed 001: stored raw, scaled once)."""

from __future__ import annotations

import numpy as np


def standardize(values: np.ndarray) -> np.ndarray:
    """Per-column zero mean, unit variance (sklearn's StandardScaler); constant columns stay 0."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit_transform(np.asarray(values, dtype=np.float64)).astype(np.float32)
