import numpy as np

from mihd_assets.segmentation.gating import count_positive, gate_masks, grid_prompted_masks, point_grid


def _labels():
    masks = np.zeros((40, 40), np.int32)
    masks[2:12, 2:12] = 1      # area 100, marker 10
    masks[20:30, 2:12] = 2     # area 100, marker 500
    masks[2:6, 20:24] = 3      # area 16, marker 1000
    masks[20:30, 20:30] = 4    # area 100, marker 2000
    marker = np.zeros((40, 40))
    for label, value in {1: 10, 2: 500, 3: 1000, 4: 2000}.items():
        marker[masks == label] = value
    return masks, marker


def test_positive_count_is_a_hand_count():
    masks, marker = _labels()
    assert count_positive(masks, marker, threshold=500) == (4, 3)
    assert count_positive(np.zeros((5, 5), np.int32), np.zeros((5, 5)), 1.0) == (0, 0)


def test_gating_grid_behaves_as_named():
    masks, marker = _labels()
    assert gate_masks(masks, marker, 0, 100, 0).max() == 4          # q0_100 without area filter keeps all
    assert gate_masks(masks, marker, 0, 100, 50).max() == 3         # min area drops the 16 px mask
    kept = gate_masks(masks, marker, 5, 95, 0)                      # extremes (10 and 2000) are gated out
    assert kept.max() == 2 and set(np.unique(marker[kept > 0])) == {500, 1000}


def test_denser_point_grid_reaches_more_instances():
    masks, _ = _labels()
    rows, cols = point_grid(masks.shape, 4)
    # Cell centres of a 4 x 4 partition of 40 px: (k + 0.5) / 4 * 40 = 5, 15, 25, 35.
    assert len(rows) == 16 and sorted(set(rows)) == [5, 15, 25, 35] and sorted(set(cols)) == [5, 15, 25, 35]
    counts = [grid_prompted_masks(masks, pps).max() for pps in (2, 8, 40)]
    assert counts == sorted(counts) and counts[-1] == 4 and counts[0] < 4
