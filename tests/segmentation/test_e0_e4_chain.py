"""E0-E4 materialized as assets through Dagster on a hand-drawn five-donor cohort: every
model's E1 predictions and metrics, the E2 budget x seed runs, the E3 gating grid and the E4
sweep land in DuckDB, with counts that follow from the drawing.

The cohort: every tile is the same 96x96 drawing of six nuclei (rectangles) with a known
marker intensity each; five donors with a GFAP and an OLIG2 tile each. The split (3/1/1
donors) leaves six training and two test images. Every network is a random tiny CPSAM
trained for two epochs (MIHD_SEG_EPOCHS=2: cellpose's learning rate warms up from 0, so one
epoch would change no weight); E2's budgets shrink to (2, 3) so they fit the six training images.

The `generic` model's test predictions are a known stand-in network output (``PREDICTION``:
the six true nuclei copied exactly plus four false objects), so E1-generic, E3 and E4 have
counts worked out by hand below. The other models and E2 run the real tiny networks.
"""

from dataclasses import replace
from itertools import product
from pathlib import Path

import duckdb
import numpy as np
import pytest
from dagster import DagsterInstance, materialize
from dagster_duckdb import DuckDBResource

from mihd_assets.fileio import file_sha256
from mihd_resources import ComputeResource, MetricsStore
from mihd_resources.step_executor import StepExecutor
from mihd_resources.weights import ModelWeightsResource

from .conftest import changed_weights, write_tiff

SIZE = 96
DONORS = [f"1000000{i}" for i in range(1, 6)]
MARKER_BACKGROUND, DAPI_BACKGROUND, DAPI_NUCLEUS = 100, 200, 1500
# True nuclei (annotated, bright in DAPI): name -> (rows, cols, mean marker intensity).
TRUE = {
    "T1": (slice(4, 14), slice(4, 14), 300),     # 100 px
    "T2": (slice(4, 14), slice(24, 34), 400),    # 100 px
    "T3": (slice(4, 14), slice(44, 54), 500),    # 100 px
    "T4": (slice(24, 34), slice(4, 14), 600),    # 100 px
    "T5": (slice(24, 34), slice(24, 34), 700),   # 100 px
    "T6": (slice(24, 32), slice(44, 52), 800),   # 64 px: a real but small nucleus
}
# False objects the stand-in generic network also returns (no nucleus; marker painted there).
EXTRA = {
    "S1": (slice(60, 67), slice(4, 12), 450),    # 56 px debris
    "S2": (slice(60, 68), slice(24, 33), 650),   # 72 px debris
    "D1": (slice(60, 70), slice(44, 54), 20),    # 100 px, the dimmest object
    "B1": (slice(80, 90), slice(4, 14), 5000),   # 100 px, the brightest object
}
N_TEST = 2  # one test donor x (GFAP, OLIG2)

# E3, per test image (6 true nuclei; 10 predicted objects with distinct marker means).
# q0_100 keeps every intensity. With 10 objects the 2nd/5th percentile of the means lies
# strictly between the lowest two (20 and 300) and the 98th/95th strictly between the highest
# two (800 and 5000), so q2_98 and q5_95 both drop exactly D1 and B1.
# Minimum area 50 keeps everything (smallest is S1, 56 px); 60 drops S1; 80 drops S1, S2 (72)
# and the true T6 (64), which turns a TP into an FN.
E3_PER_IMAGE = {  # (gating, min_area) -> (TP, FP, FN)
    ("q0_100", 50): (6, 4, 0), ("q0_100", 60): (6, 3, 0), ("q0_100", 80): (5, 2, 1),
    ("q2_98", 50): (6, 2, 0), ("q2_98", 60): (6, 1, 0), ("q2_98", 80): (5, 0, 1),
    ("q5_95", 50): (6, 2, 0), ("q5_95", 60): (6, 1, 0), ("q5_95", 80): (5, 0, 1),
}
# E4 proxy, per test image: an 8x8 grid on 96 px puts points at rows/cols 6, 18, ..., 90.
# Hit: T1 (6,6), T2 (6,30), T4 (30,6), T5 (30,30), S1 (66,6), S2 (66,30). Missed: T3 (cols
# 44-53), T6 (cols 44-51), D1 (cols 44-53), B1 (rows 80-89). From 16 per side (points every
# 6 px from 3) every object of the drawing is hit, which leaves E1's generic counts.
E4_PER_IMAGE = {8: (4, 2, 2), 16: (6, 4, 0), 32: (6, 4, 0), 64: (6, 4, 0)}
E1_GENERIC_PER_IMAGE = (6, 4, 0)
BUDGETS = (2, 3)
SEEDS = (0, 1)  # two seeds, so the budgets x seeds crossing is checked


def _labels(objects: dict) -> np.ndarray:
    labels = np.zeros((SIZE, SIZE), np.int32)
    for k, (rows, cols, _) in enumerate(objects.values(), 1):
        labels[rows, cols] = k
    return labels


TRUTH = _labels(TRUE)
PREDICTION = _labels({**TRUE, **EXTRA})


def _write_cohort(root: Path) -> None:
    dapi = np.full((SIZE, SIZE), DAPI_BACKGROUND, np.uint16)
    dapi[TRUTH > 0] = DAPI_NUCLEUS
    marker = np.full((SIZE, SIZE), MARKER_BACKGROUND, np.uint16)
    for rows, cols, value in (*TRUE.values(), *EXTRA.values()):
        marker[rows, cols] = value
    for donor in DONORS:
        for name in ("GFAP", "OLIG2"):
            stem = f"{donor}_{name}_1"
            write_tiff(root / "tiles" / donor / f"{stem}_b0c0.tif", dapi)
            write_tiff(root / "tiles" / donor / f"{stem}_b0c1.tif", marker)
            write_tiff(root / "annotations" / donor / f"{stem}_masks.tif", TRUTH.astype(np.uint16))


@pytest.fixture
def chain(tmp_path, monkeypatch):
    from mihd_assets.segmentation import assets as seg
    from mihd_assets.segmentation import cellpose_api

    root = tmp_path / "cohort"
    _write_cohort(root)
    for name, value in {"MIHD_HOME": tmp_path / "home", "MIHD_TILES_ROOT": root / "tiles",
                        "MIHD_ANNOTATIONS_ROOT": root / "annotations", "MIHD_PROFILE": "demo", "MIHD_SEG_EPOCHS": "2"}.items():
        monkeypatch.setenv(name, str(value))
    for name in ("MIHD_CELLPOSE_WEIGHTS", "MIHD_STORAGE", "MIHD_DUCKDB", "MIHD_EXECUTOR", "MIHD_SEG_MARKER_THRESHOLD"):
        monkeypatch.delenv(name, raising=False)
    # The full plan's E2 budgets (up to 30 images) exceed the six training images: the assets read
    # their plan through this name at every materialization, so the test shrinks only the budgets.
    plan_for_profile = seg.plan_for_profile
    monkeypatch.setattr(seg, "plan_for_profile", lambda profile=None: replace(plan_for_profile(profile), budgets=BUDGETS, budget_seeds=SEEDS))
    real_segment = cellpose_api.segment

    def segment(model, images, settings=cellpose_api.EvalSettings()):
        if Path(model.path).name == "generic.pt":  # the stand-in output of the generic fine-tune
            assert all(im.shape == (3, SIZE, SIZE) for im in images)
            return [PREDICTION.copy() for _ in images]
        return real_segment(model, images, settings)

    monkeypatch.setattr(cellpose_api, "segment", segment)
    db = tmp_path / "metrics.duckdb"
    resources = {"metrics": MetricsStore(duckdb=DuckDBResource(database=str(db))), "compute": ComputeResource(device="cpu"),
                 "step_executor": StepExecutor(), "weights": ModelWeightsResource(allow_random=True)}
    return db, resources, seg.plan_for_profile(), tmp_path / "home" / "storage" / "segmentation"


def test_e0_to_e4_assets_write_every_model_budget_and_gating_setting(chain):
    from mihd_assets.segmentation import assets as seg
    from mihd_assets.segmentation.definitions import BENCHMARK_KEYS, all_assets
    from mihd_assets.segmentation.plan import FINE_TUNED, MODELS

    db, resources, plan, store = chain
    result = materialize(all_assets, instance=DagsterInstance.ephemeral(), resources=resources, selection=BENCHMARK_KEYS)
    assert result.success
    done = {e.asset_key for e in result.get_asset_materialization_events()}
    assert done == set(BENCHMARK_KEYS)
    assert [seg.predictions_key(m) in done for m in MODELS] == [True] * 4
    # Every fine-tune moved the baseline's weights, and the three E1 fine-tunes differ from each other.
    for model in FINE_TUNED:
        assert changed_weights(store / "checkpoints" / "baseline.pt", store / "checkpoints" / f"{model}.pt") > 0, model
    assert len({file_sha256(store / "checkpoints" / f"{m}.pt") for m in FINE_TUNED}) == 3
    e2_checkpoints = sorted((store / "e2").glob("*.pt"))
    assert [p.stem for p in e2_checkpoints] == sorted(f"budget_{b}_seed_{s}" for b in BUDGETS for s in (0, 1))
    assert all(changed_weights(store / "checkpoints" / "baseline.pt", path) > 0 for path in e2_checkpoints)
    checks = {(c.asset_key.path[-1], c.check_name): c.passed for c in result.get_asset_check_evaluations()}
    assert checks[("e1_checkpoint_marker_specific", "weights_not_random")] is False  # fine-tuned from random weights
    assert checks[("e1_checkpoint_marker_only", "no_min_train_masks_drops")] is True  # six masks per image >= 5

    with duckdb.connect(str(db), read_only=True) as con:
        split = dict(con.execute("SELECT split, count(DISTINCT donor_id) FROM segmentation_split GROUP BY split").fetchall())
        assert split == {"train": 3, "val": 1, "test": 1}

        # E1: every model has one row per test image plus a total, and its training record.
        e1 = con.execute("SELECT model, level, count(*), sum(tp + fn), min(n_true), max(n_true) FROM segmentation_metrics "
                         "WHERE experiment = 'E1' GROUP BY model, level ORDER BY model, level").fetchall()
        assert {(m, lvl): n for m, lvl, n, *_ in e1} == {(m, lvl): (N_TEST if lvl == "image" else 1)
                                                          for m in MODELS for lvl in ("image", "total")}
        assert all(tp_fn == 6 * N_TEST and n_true == (6 if lvl == "image" else 6 * N_TEST)
                   for _, lvl, _, tp_fn, n_true, _ in e1)
        models = con.execute("SELECT model, n_train_given, init_weights FROM segmentation_models WHERE experiment = 'E1' "
                             "ORDER BY model").fetchall()
        assert models == sorted([("baseline", None, None), ("generic", 6, "random"), ("marker_only", 6, "random"),
                                 ("marker_specific", 3, "random")])  # marker_specific: the three GFAP training tiles
        generic = con.execute("SELECT tp, fp, fn, ap50, f1 FROM segmentation_metrics WHERE experiment = 'E1' AND "
                              "model = 'generic' AND level = 'total'").fetchone()
        tp, fp, fn = (N_TEST * v for v in E1_GENERIC_PER_IMAGE)
        assert generic[:3] == (tp, fp, fn)
        assert generic[3] == pytest.approx(6 / 10, rel=1e-6) and generic[4] == 12 / 16

        # E2: exactly the plan's budgets x seeds, each scored on the test set and recorded.
        e2 = con.execute("SELECT budget, seed, variant, count(*) FILTER (WHERE level = 'image'), count(*) FILTER "
                         "(WHERE level = 'total') FROM segmentation_metrics WHERE experiment = 'E2' "
                         "GROUP BY ALL ORDER BY 1, 2").fetchall()
        expected = list(product(plan.budgets, plan.budget_seeds))
        assert plan.budgets == BUDGETS and plan.budget_seeds == SEEDS
        assert e2 == [(b, s, f"budget_{b}_seed_{s}", N_TEST, 1) for b, s in expected]
        runs = con.execute("SELECT budget, seed, model, n_train_given, n_epochs FROM segmentation_models "
                           "WHERE experiment = 'E2' ORDER BY 1, 2").fetchall()
        assert runs == [(b, s, f"budget_{b}_seed_{s}", b, 2) for b, s in expected]

        # E3: the plan's quantiles x minimum areas, with the hand-counted effect of each gate.
        e3 = con.execute("SELECT gating, min_area, variant, tp, fp, fn, ap50, n_pred FROM segmentation_metrics "
                         "WHERE experiment = 'E3' AND level = 'total' ORDER BY 1, 2").fetchall()
        grid = sorted(product([q[0] for q in plan.gating_quantiles], plan.min_areas))
        assert [(g, a) for g, a, *_ in e3] == grid == sorted(E3_PER_IMAGE)
        for gating, area, variant, tp, fp, fn, ap50, n_pred in e3:
            want = E3_PER_IMAGE[(gating, area)]
            assert variant == f"{gating}_a{area}" and (tp, fp, fn) == tuple(N_TEST * v for v in want), (gating, area)
            assert n_pred == N_TEST * (want[0] + want[1])
            assert ap50 == pytest.approx(want[0] / sum(want), rel=1e-6)
        assert con.execute("SELECT count(*) FROM segmentation_metrics WHERE experiment = 'E3' AND level = 'image'").fetchone()[0] \
            == len(grid) * N_TEST

        # E4 (the cellpose proxy without micro_sam): a coarse grid misses the objects between its points.
        e4 = con.execute("SELECT points_per_side, method, tp, fp, fn FROM segmentation_metrics WHERE experiment = 'E4' "
                         "AND level = 'total' ORDER BY 1").fetchall()
        assert [r[0] for r in e4] == list(plan.points_per_side)
        for pps, method, tp, fp, fn in e4 if not seg.MICRO_SAM else []:
            assert method == seg.E4_METHOD and (tp, fp, fn) == tuple(N_TEST * v for v in E4_PER_IMAGE[pps]), pps
