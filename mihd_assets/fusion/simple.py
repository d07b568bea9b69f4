"""Untrained fusions: concatenation and mean of the per-modality standardized embeddings."""

from __future__ import annotations

import time

import numpy as np
from sklearn.decomposition import PCA


def concat_fusion(gene: np.ndarray, vision: np.ndarray) -> tuple[np.ndarray, dict]:
    """``[gene | vision]`` of inputs already standardized per modality."""
    started = time.perf_counter()
    fused = np.concatenate([gene, vision], axis=1).astype(np.float32)
    return fused, {"method": "concat", "epochs": 0, "final_loss": None, "seconds": time.perf_counter() - started,
                   "dims": int(fused.shape[1])}


def mean_fusion(gene: np.ndarray, vision: np.ndarray, dims: int = 32, seed: int = 0) -> tuple[np.ndarray, dict]:
    """Element-wise mean of the two modalities after projecting each onto its first ``dims``
    principal axes (the two embeddings have different widths); each projection is divided
    by its total standard deviation so neither modality dominates the mean."""
    started = time.perf_counter()
    d = int(min(dims, gene.shape[1], vision.shape[1], gene.shape[0]))
    parts = []
    for block in (gene, vision):
        proj = PCA(n_components=d, random_state=seed).fit_transform(block)
        parts.append(proj / max(float(np.sqrt((proj ** 2).sum(axis=1).mean())), 1e-12))
    fused = ((parts[0] + parts[1]) / 2).astype(np.float32)
    return fused, {"method": "mean", "epochs": 0, "final_loss": None, "seconds": time.perf_counter() - started,
                   "dims": d}
