"""Post-processing of instance masks: E3 marker-intensity gating + minimum area, E4's
point-grid automatic-mask proxy, and E5's marker-positive cell counts."""

from __future__ import annotations

import numpy as np
from skimage.segmentation import relabel_sequential

# E3 grid: (name, low percentile, high percentile) x minimum area in pixels.
GATING_QUANTILES = (("q0_100", 0.0, 100.0), ("q2_98", 2.0, 98.0), ("q5_95", 5.0, 95.0))
MIN_AREAS = (50, 60, 80)


def mask_marker_means(masks: np.ndarray, marker: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(area, mean marker intensity) of labels 1..masks.max(), indexed label-1."""
    if masks.shape != marker.shape:
        raise ValueError(f"mask shape {masks.shape} differs from marker shape {marker.shape}")
    n = int(masks.max())
    if n == 0:
        return np.zeros(0), np.zeros(0)
    flat = masks.ravel()
    area = np.bincount(flat, minlength=n + 1)[1:].astype(float)
    total = np.bincount(flat, weights=marker.ravel().astype(float), minlength=n + 1)[1:]
    with np.errstate(invalid="ignore", divide="ignore"):
        return area, total / area


def keep_labels(masks: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Zero every label whose ``keep[label-1]`` is False, then relabel 1..N."""
    lookup = np.concatenate([[0], np.where(keep, np.arange(1, keep.size + 1), 0)])
    relabelled, _, _ = relabel_sequential(lookup[masks])
    return relabelled.astype(np.int32)


def gate_masks(masks: np.ndarray, marker: np.ndarray, q_low: float, q_high: float, min_area: int) -> np.ndarray:
    """Keep masks whose mean marker intensity lies within the image's [q_low, q_high]
    percentiles of per-mask means, and whose area is at least ``min_area`` pixels."""
    area, mean = mask_marker_means(masks, marker)
    if area.size == 0:
        return masks.astype(np.int32)
    present = area > 0
    low, high = np.percentile(mean[present], [q_low, q_high])
    keep = present & (mean >= low) & (mean <= high) & (area >= min_area)
    return keep_labels(masks, keep)


def point_grid(shape: tuple[int, int], points_per_side: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel rows/cols of a ``points_per_side`` x ``points_per_side`` grid, placed like SAM's
    automatic mask generator (cell centres of an even partition of the image)."""
    offsets = (np.arange(points_per_side) + 0.5) / points_per_side
    rows = np.minimum((offsets * shape[0]).astype(int), shape[0] - 1)
    cols = np.minimum((offsets * shape[1]).astype(int), shape[1] - 1)
    rr, cc = np.meshgrid(rows, cols, indexing="ij")
    return rr.ravel(), cc.ravel()


def grid_prompted_masks(masks: np.ndarray, points_per_side: int) -> np.ndarray:
    """E4 proxy: the instances an automatic mask generator prompted by a point grid could
    return - those hit by at least one grid point (denser grids reach smaller cells)."""
    rr, cc = point_grid(masks.shape, points_per_side)
    hit = np.unique(masks[rr, cc])
    keep = np.isin(np.arange(1, int(masks.max()) + 1), hit[hit > 0])
    return keep_labels(masks, keep)


def count_positive(masks: np.ndarray, marker: np.ndarray, threshold: float) -> tuple[int, int]:
    """(total cells, marker-positive cells): a cell is positive when the mean marker
    intensity inside its mask is at least ``threshold`` (raw intensity units)."""
    area, mean = mask_marker_means(masks, marker)
    present = area > 0
    return int(present.sum()), int((mean[present] >= threshold).sum())

