"""The platform's scoring against counts worked out by hand on drawn rectangles, then its
AP/F1 on real nuclei masks against cellpose.metrics called directly (a second check: the
platform calls cellpose.metrics itself, so that comparison alone cannot catch a wrong count)."""

import numpy as np
import pytest
import tifffile
from cellpose import metrics as cp_metrics
from PIL import Image
from scipy import ndimage as ndi
from skimage.segmentation import relabel_sequential

from mihd_assets.segmentation.scoring import score_masks


def _imperfect_prediction(true: np.ndarray, seed: int) -> np.ndarray:
    """A prediction with every kind of error: shrunken cells, missed cells, a merge, false blobs."""
    rng = np.random.default_rng(seed)
    labels = np.unique(true[true > 0])
    pred = np.where(ndi.binary_erosion(true > 0, iterations=1), true, 0)
    pred[np.isin(pred, rng.choice(labels, size=max(1, len(labels) // 6), replace=False))] = 0
    a, b = labels[:2]
    pred[pred == b] = a
    h, w = true.shape
    yy, xx = np.mgrid[:h, :w]
    for k in range(3):
        cy, cx = rng.integers(10, h - 10), rng.integers(10, w - 10)
        pred[((yy - cy) ** 2 + (xx - cx) ** 2 <= 16) & (pred == 0)] = pred.max() + 1 + k
    out, _, _ = relabel_sequential(pred)
    return out.astype(np.int32)


def _check_against_cellpose(trues, preds):
    ids = [str(i) for i in range(len(trues))]
    ours = score_masks(trues, preds, ids)
    ap, tp, fp, fn = cp_metrics.average_precision(trues, preds, threshold=[0.5])
    images = ours[ours["level"] == "image"]
    np.testing.assert_allclose(images["ap50"], ap[:, 0])
    np.testing.assert_array_equal(images[["tp", "fp", "fn"]].to_numpy(), np.stack([tp[:, 0], fp[:, 0], fn[:, 0]], 1))
    f1_direct = 2 * tp[:, 0] / (2 * tp[:, 0] + fp[:, 0] + fn[:, 0])
    np.testing.assert_allclose(images["f1"], f1_direct)
    total = ours[ours["level"] == "total"].iloc[0]
    assert total["ap50"] == pytest.approx(ap[:, 0].mean())
    assert total["f1"] == pytest.approx(2 * tp.sum() / (2 * tp.sum() + fp.sum() + fn.sum()))
    assert 0 < total["ap50"] < 1  # the prediction is imperfect, so the comparison is not trivial


def _hand_counted_fixture():
    """Two 40x40 images whose matches at IoU 0.5 are counted by hand.

    Image 0 - three true masks, three predictions:
      T1 rows 0-9,  cols 0-9   (100 px)   P1 rows 0-9, cols 0-7 (80 px, inside T1):
                                          IoU = 80 / 100 = 0.8  -> a match (TP)
      T2 rows 0-9,  cols 20-29 (100 px)   P2 rows 0-3, cols 20-29 (40 px, inside T2):
                                          IoU = 40 / 100 = 0.4  -> NOT a match: T2 is FN, P2 is FP
      T3 rows 20-29, cols 0-9  (100 px)   nothing overlaps it   -> missed (FN)
                                          P3 rows 30-37, cols 30-37 (64 px) overlaps no true mask -> FP
      TP=1, FP=2, FN=2: AP50 = 1/(1+2+2) = 1/5, F1 = 2*1/(2*1+2+2) = 1/3, precision = recall = 1/3.
    Image 1 - two true masks predicted exactly (IoU 1) and one extra prediction:
      TP=2, FP=1, FN=0: AP50 = 2/3, F1 = 4/5, precision 2/3, recall 1.
    Total: TP=3, FP=3, FN=2; AP50 = mean over images = (1/5 + 2/3)/2 = 13/30;
      F1 from the summed counts = 6/(6+3+2) = 6/11, precision 3/6, recall 3/5.
    """
    t0, p0 = np.zeros((40, 40), np.int32), np.zeros((40, 40), np.int32)
    t0[0:10, 0:10], t0[0:10, 20:30], t0[20:30, 0:10] = 1, 2, 3
    p0[0:10, 0:8], p0[0:4, 20:30], p0[30:38, 30:38] = 1, 2, 3
    t1, p1 = np.zeros((40, 40), np.int32), np.zeros((40, 40), np.int32)
    t1[5:15, 5:15], t1[25:35, 25:35] = 1, 2
    p1[5:15, 5:15], p1[25:35, 25:35], p1[0:4, 30:36] = 1, 2, 3
    return [t0, t1], [p0, p1]


def test_scores_equal_hand_counted_matches():
    trues, preds = _hand_counted_fixture()
    scores = score_masks(trues, preds, ["a", "b"]).set_index("image_id")
    a, b, total = scores.loc["a"], scores.loc["b"], scores.loc[""]
    assert (a["tp"], a["fp"], a["fn"], a["n_true"], a["n_pred"]) == (1, 2, 2, 3, 3)
    # AP50 comes from cellpose.metrics in float32 (0.2 is 0.20000000298); the other ratios are float64.
    assert a["ap50"] == pytest.approx(1 / 5, rel=1e-7) and a["f1"] == 1 / 3 and a["precision"] == 1 / 3 and a["recall"] == 1 / 3
    assert (b["tp"], b["fp"], b["fn"], b["n_true"], b["n_pred"]) == (2, 1, 0, 2, 3)
    assert b["ap50"] == pytest.approx(2 / 3, rel=1e-7) and b["f1"] == 4 / 5 and b["precision"] == 2 / 3 and b["recall"] == 1.0
    assert total["level"] == "total" and (total["tp"], total["fp"], total["fn"]) == (3, 3, 2)
    assert (total["n_true"], total["n_pred"]) == (5, 6)
    assert total["ap50"] == pytest.approx(13 / 30, rel=1e-7)
    assert total["f1"] == 6 / 11 and total["precision"] == 1 / 2 and total["recall"] == 3 / 5
    # The IoU-0.4 pair becomes a match once the threshold is below 0.4: image a then has TP=2, FP=1, FN=1.
    loose = score_masks(trues, preds, ["a", "b"], threshold=0.3).set_index("image_id").loc["a"]
    assert (loose["tp"], loose["fp"], loose["fn"]) == (2, 1, 1) and loose["ap50"] == 0.5
    _check_against_cellpose(trues, preds)  # the second check: the same numbers as cellpose.metrics


def test_dsb2018_instance_masks(shared_data):
    folder = shared_data / "nuclei_dsb2018_stardist"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    trues = [tifffile.imread(folder / f"mask_{n}.tif").astype(np.int32) for n in (256, 512)]
    assert min(len(np.unique(t)) - 1 for t in trues) >= 60
    _check_against_cellpose(trues, [_imperfect_prediction(t, seed=i) for i, t in enumerate(trues)])


def test_bbbc039_semantic_masks_as_instances(shared_data):
    folder = shared_data / "nuclei_bbbc039_u2os"
    if not folder.is_dir():
        pytest.skip(f"{folder} not present")
    trues = []
    for png in sorted((folder / "masks").glob("*.png"))[:3]:
        semantic = np.asarray(Image.open(png))
        semantic = semantic[..., 0] if semantic.ndim == 3 else semantic
        instances, n = ndi.label(semantic == 1)  # class 1 = interior; instances = its components
        assert n > 10
        trues.append(instances.astype(np.int32))
    _check_against_cellpose(trues, [_imperfect_prediction(t, seed=i) for i, t in enumerate(trues)])
