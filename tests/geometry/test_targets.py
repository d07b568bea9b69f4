"""Canonical targets from the Gram matrix, slide units, set sampling, the stored training set."""

import numpy as np
import pytest

from mihd_assets.geometry.targets import (
    GeometryInputError,
    GeometryTrainingSet,
    canonical_coordinates,
    estimate_sigma_data,
    sample_sets,
    slide_units,
)


def _rotation(theta):
    return np.array([[np.cos(theta), -np.sin(theta)], [np.sin(theta), np.cos(theta)]])


def test_canonical_coordinates_factor_the_centred_gram_matrix():
    rng = np.random.default_rng(1)
    pts = rng.normal(size=(30, 2)) * [3.0, 1.0]
    v = canonical_coordinates(pts, dims=2)
    centred = pts - pts.mean(axis=0)
    np.testing.assert_allclose(v @ v.T, centred @ centred.T, atol=1e-9)
    np.testing.assert_allclose(v.mean(axis=0), 0.0, atol=1e-12)
    # Axes by decreasing variance, each with a positive third moment.
    assert v[:, 0].var() > v[:, 1].var()
    assert ((v**3).sum(axis=0) > 0).all()


def test_canonical_coordinates_forget_rotation_translation_and_reflection():
    rng = np.random.default_rng(2)
    pts = rng.normal(size=(40, 2)) * [2.0, 1.0]
    moved = pts @ _rotation(1.1).T + [50.0, -7.0]
    mirrored = pts * [-1.0, 1.0]
    ref = canonical_coordinates(pts)
    np.testing.assert_allclose(canonical_coordinates(moved), ref, atol=1e-8)
    np.testing.assert_allclose(canonical_coordinates(mirrored), ref, atol=1e-8)


def test_canonical_coordinates_of_3d_points_keep_the_top_two_axes():
    rng = np.random.default_rng(3)
    pts = rng.normal(size=(25, 3)) * [5.0, 2.0, 0.1]
    v = canonical_coordinates(pts, dims=2)
    assert v.shape == (25, 2)
    u, s, _ = np.linalg.svd(pts - pts.mean(axis=0), full_matrices=False)
    best_rank2 = u[:, :2] * s[:2]
    np.testing.assert_allclose(v @ v.T, best_rank2 @ best_rank2.T, atol=1e-8)


def test_slide_units_have_unit_rms_radius_and_reject_bad_input():
    coords, radius = slide_units(np.array([[0.0, 0.0], [200.0, 0.0], [0.0, 200.0], [200.0, 200.0]]))
    assert radius == pytest.approx(100 * np.sqrt(2))
    assert np.sqrt((coords**2).sum(axis=1).mean()) == pytest.approx(1.0)
    with pytest.raises(GeometryInputError, match="non-finite"):
        slide_units(np.array([[0.0, np.nan], [1.0, 1.0]]), "bad")
    with pytest.raises(GeometryInputError, match="share one position"):
        slide_units(np.ones((5, 2)), "flat")


def test_sample_sets_sizes_and_uniqueness():
    rng = np.random.default_rng(0)
    sets = sample_sets(50, 20, 10, 30, rng)
    assert all(10 <= len(s) <= 30 and len(set(s)) == len(s) for s in sets)
    assert len({len(s) for s in sets}) > 1
    assert all(len(s) == 8 for s in sample_sets(8, 3, 10, 30, rng))  # clamped to the slide
    with pytest.raises(GeometryInputError, match="size_min"):
        sample_sets(50, 1, 1, 5, rng)


def test_training_set_round_trip_and_sigma_data(small_training_set, tmp_path):
    ts = small_training_set
    ts.encoder = {"kind": "shared_pca", "genes": ["A", "B"], "components": np.eye(2, dtype=np.float32)}
    ts.save(tmp_path / "ts.npz")
    back = GeometryTrainingSet.load(tmp_path / "ts.npz")
    assert back.slide_ids("train") == ["s0", "s1"] and back.slide_ids("heldout") == ["s2"]
    np.testing.assert_array_equal(back.train.index, ts.train.index)
    np.testing.assert_allclose(back.heldout.targets, ts.heldout.targets)
    assert back.sigma_data == pytest.approx(ts.sigma_data)
    assert back.encoder["genes"] == ["A", "B"]
    # sigma_data is the RMS of real target coordinates; padding is excluded.
    real = ts.train.targets[ts.train.mask]
    assert estimate_sigma_data(ts.train) == pytest.approx(float(np.sqrt((real.astype(float) ** 2).mean())))
    assert (ts.train.targets[~ts.train.mask] == 0).all()
    # Every set's target is its own canonical geometry.
    i = 5
    n = ts.train.size[i]
    slide = ts.slides[ts.train.slide[i]]
    np.testing.assert_allclose(ts.train.targets[i, :n], canonical_coordinates(slide.coords[ts.train.index[i, :n]]), atol=1e-5)
