"""The one place embeddings are normalised after loading: they are stored raw and scaled once.

Standardising twice (once in a caller, again inside a method) silently changes results.
"""

from __future__ import annotations

import numpy as np


def standardize(values: np.ndarray) -> np.ndarray:
    """Per-column zero mean, unit variance (sklearn's StandardScaler); constant columns stay 0."""
    from sklearn.preprocessing import StandardScaler

    return StandardScaler().fit_transform(np.asarray(values, dtype=np.float64)).astype(np.float32)
