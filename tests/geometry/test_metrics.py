"""Evaluation metrics and baselines: known values, invariances, and refusal of too-small sets."""

import numpy as np
import pytest

from mihd_assets.geometry.evaluate import (
    distance_spearman,
    knn_jaccard,
    random_baseline,
    scale_ratio,
    set_metrics,
    spectral_baseline,
    trustworthiness_at,
)
from mihd_assets.geometry.targets import GeometryInputError


def test_perfect_prediction_scores_one_under_rotation_and_scaling():
    rng = np.random.default_rng(0)
    true = rng.normal(size=(60, 2))
    theta = 0.9
    rot = np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])
    pred = 0.5 * true @ rot.T + 3.0
    m = set_metrics(pred, true, k=10)
    assert m["knn_jaccard"] == pytest.approx(1.0)
    assert m["distance_spearman"] == pytest.approx(1.0)
    assert m["trustworthiness"] == pytest.approx(1.0)
    assert m["scale_ratio"] == pytest.approx(0.5)


def test_random_prediction_scores_near_chance():
    rng = np.random.default_rng(1)
    true = rng.normal(size=(200, 2))
    j = knn_jaccard(random_baseline(200, 2, 1.0, rng), true, 10)
    chance = 10 / 199 / (2 - 10 / 199)  # expected overlap of two random 10-subsets, as Jaccard
    assert j == pytest.approx(chance, abs=0.02)
    assert abs(distance_spearman(rng.normal(size=(200, 2)), true)) < 0.1


def test_knn_jaccard_by_hand():
    true = np.array([[0.0], [1.0], [3.0], [10.0]])
    pred = np.array([[0.0], [5.0], [1.0], [10.0]])
    # k=1: true nearest = 1, 0, 1, 2; predicted nearest = 2, 2, 0, 1: no overlap anywhere.
    assert knn_jaccard(pred, true, 1) == pytest.approx(0.0)
    # k=2: both give {1,2}, {0,2}, {0,1}, {1,2}.
    assert knn_jaccard(pred, true, 2) == pytest.approx(1.0)
    # k=1: points 0 and 1 keep their nearest neighbour, points 2 and 3 do not -> 0.5.
    pred2 = np.array([[0.0], [1.0], [30.0], [2.5]])
    assert knn_jaccard(pred2, true, 1) == pytest.approx(0.5)


def test_sets_too_small_for_k_are_rejected_with_a_message():
    pts = np.random.default_rng(0).normal(size=(10, 2))
    with pytest.raises(GeometryInputError, match=r"Jaccard@10 needs a set of at least 11 points, got 10"):
        knn_jaccard(pts, pts, 10)
    with pytest.raises(GeometryInputError, match="trustworthiness@10"):
        trustworthiness_at(pts, pts, 10)


def test_spectral_baseline_uses_expression_and_the_given_scale():
    rng = np.random.default_rng(2)
    true = rng.uniform(-1, 1, size=(120, 2))
    feats = np.c_[np.cos(2 * true), np.sin(2 * true)] + rng.normal(0, 0.02, (120, 4))
    pred = spectral_baseline(feats, 2, 10, rms_target=0.7, seed=0)
    assert np.sqrt((pred**2).sum(axis=1).mean()) == pytest.approx(0.7)
    assert knn_jaccard(pred, true, 10) > 0.25  # expression that encodes position helps
    assert scale_ratio(2 * true, true) == pytest.approx(2.0)
