"""Segmentation scores per image and in total, from cellpose.metrics matching counts."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import pandas as pd

from .cellpose_api import matching_counts


def _ratio(num, den):
    num, den = np.asarray(num, float), np.asarray(den, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1), np.nan)


def score_masks(true_masks: Sequence[np.ndarray], pred_masks: Sequence[np.ndarray], image_ids: Sequence[str],
                threshold: float = 0.5) -> pd.DataFrame:
    """One row per image plus a ``level='total'`` row.

    Per image: AP = TP/(TP+FP+FN) at IoU ``threshold`` (cellpose.metrics), precision,
    recall, F1 = 2TP/(2TP+FP+FN). Total: AP is the mean over images (cellpose's convention
    for a test set), precision/recall/F1 come from the summed TP/FP/FN.
    """
    ap, tp, fp, fn = matching_counts(true_masks, pred_masks, threshold)
    rows = pd.DataFrame({
        "level": "image",
        "image_id": list(image_ids),
        "ap50": ap.astype(float),
        "precision": _ratio(tp, tp + fp),
        "recall": _ratio(tp, tp + fn),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn),
        "tp": tp, "fp": fp, "fn": fn,
        "n_true": [int(m.max()) for m in true_masks],
        "n_pred": [int(m.max()) for m in pred_masks],
    })
    TP, FP, FN = int(tp.sum()), int(fp.sum()), int(fn.sum())
    total = {
        "level": "total", "image_id": "", "ap50": float(ap.mean()) if len(ap) else np.nan,
        "precision": float(_ratio(TP, TP + FP)), "recall": float(_ratio(TP, TP + FN)),
        "f1": float(_ratio(2 * TP, 2 * TP + FP + FN)), "tp": TP, "fp": FP, "fn": FN,
        "n_true": int(rows["n_true"].sum()), "n_pred": int(rows["n_pred"].sum()),
    }
    return pd.concat([rows, pd.DataFrame([total])], ignore_index=True)
