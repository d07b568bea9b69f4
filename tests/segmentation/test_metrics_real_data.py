"""The platform's AP/F1 on real nuclei masks agree with cellpose.metrics called directly."""

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
