"""The geometry evaluation's three checks on evaluation frames whose answer is known.

The checks are a pure function of the evaluation frame (``assets._check_results``): kNN
Jaccard of the generator against the random and spectral baselines, of the refined output
against the generator, and the one-step denoiser's scale ratio in the sigma < 0.1 bin.
"""

import numpy as np
import pandas as pd
import pytest

from mihd_assets.geometry import assets as geo

ALL = (geo.BEATS_BASELINES, geo.REFINED_NOT_WORSE, geo.LOW_SIGMA_SCALE)


def evaluation_frame(jaccard: dict[str, dict[str, float]], low_sigma_scale: dict[str, float],
                     high_sigma_scale: float = 3.0) -> pd.DataFrame:
    """Rows as ``evaluate`` writes them: one per (slide, method) with ``sigma_bin == ''`` and the
    denoiser's per-bin rows; ``high_sigma_scale`` is the denoiser's ratio in the [0.1, 0.3) bin,
    which no check looks at."""
    rows = []
    for slide, by_method in jaccard.items():
        for method, value in {**by_method, "full_sampler": 0.0}.items():
            rows.append({"slide_id": slide, "method": method, "sigma_bin": "", "sigma_lo": np.nan, "sigma_hi": np.nan,
                         "knn_jaccard": value, "scale_ratio": 1.0, "trustworthiness": 0.9})
        for lo, hi, ratio in ((0.0, 0.1, low_sigma_scale[slide]), (0.1, 0.3, high_sigma_scale)):
            rows.append({"slide_id": slide, "method": "denoiser", "sigma_bin": f"[{lo:.2f},{hi:.2f})", "sigma_lo": lo,
                         "sigma_hi": hi, "knn_jaccard": 0.0, "scale_ratio": ratio, "trustworthiness": 0.5})
    return pd.DataFrame(rows)


def scores(generator, refined, random, spectral):
    return {"generator": generator, "refined": refined, "random": random, "expression_spectral": spectral}


def outcomes(frame: pd.DataFrame) -> dict[str, bool]:
    results = geo._check_results(frame)
    assert all(r.asset_key == geo.EVALUATION_KEY for r in results)
    return {r.check_name: r.passed for r in results}


def test_a_checkpoint_that_beats_the_baselines_passes_every_check():
    frame = evaluation_frame({"s3": scores(0.42, 0.45, 0.05, 0.30)}, {"s3": 1.02})
    assert outcomes(frame) == {name: True for name in ALL}
    results = {r.check_name: r for r in geo._check_results(frame)}
    assert results[geo.BEATS_BASELINES].metadata["knn_jaccard"].value == {
        "s3": {"generator": 0.42, "refined": 0.45, "random": 0.05, "expression_spectral": 0.30}}
    assert results[geo.LOW_SIGMA_SCALE].metadata["scale_ratio_sigma_below_0.1"].value == {"s3": 1.02}


@pytest.mark.parametrize("spectral, random, passed", [
    (0.30, 0.05, True),    # generator 0.42 beats both
    (0.50, 0.05, False),   # the spectral baseline wins
    (0.10, 0.60, False),   # the random baseline wins
    (0.42, 0.05, False),   # a tie is not a win
])
def test_generator_must_strictly_beat_both_baselines(spectral, random, passed):
    frame = evaluation_frame({"s3": scores(0.42, 0.45, random, spectral)}, {"s3": 1.0})
    assert outcomes(frame) == {geo.BEATS_BASELINES: passed, geo.REFINED_NOT_WORSE: True, geo.LOW_SIGMA_SCALE: True}


@pytest.mark.parametrize("refined, passed", [(0.43, True), (0.42, True), (0.41, False)])
def test_refinement_may_not_lower_the_generators_jaccard(refined, passed):
    frame = evaluation_frame({"s3": scores(0.42, refined, 0.05, 0.30)}, {"s3": 1.0})
    assert outcomes(frame)[geo.REFINED_NOT_WORSE] is passed


@pytest.mark.parametrize("ratio, passed", [(0.8, True), (1.25, True), (0.79, False), (1.26, False)])
def test_low_sigma_scale_ratio_must_lie_in_0_8_to_1_25(ratio, passed):
    # The [0.1, 0.3) bin's ratio of 3.0 is outside the range but does not count.
    frame = evaluation_frame({"s3": scores(0.42, 0.45, 0.05, 0.30)}, {"s3": ratio})
    assert outcomes(frame)[geo.LOW_SIGMA_SCALE] is passed


def test_one_failing_heldout_slide_fails_the_check():
    frame = evaluation_frame({"s3": scores(0.42, 0.45, 0.05, 0.30), "s4": scores(0.20, 0.19, 0.05, 0.30)},
                             {"s3": 1.0, "s4": 1.5})
    assert outcomes(frame) == {name: False for name in ALL}
    frame = evaluation_frame({"s3": scores(0.42, 0.45, 0.05, 0.30), "s4": scores(0.35, 0.35, 0.05, 0.30)},
                             {"s3": 1.0, "s4": 0.9})
    assert outcomes(frame) == {name: True for name in ALL}
