"""Small synthetic geometry data: spots on a grid whose features are smooth functions of position."""

import numpy as np
import pytest

from mihd_assets.geometry.targets import SlideData, assemble_training_set, slide_units


def synthetic_slides(n_slides: int = 3, n_side: int = 14, n_features: int = 8, seed: int = 0) -> list[SlideData]:
    """Hex-ish grids; features = random Fourier features of the slide-unit position + noise, so
    expression determines geometry the same way on every slide."""
    rng = np.random.default_rng(seed)
    freqs = rng.normal(0, 1.5, size=(2, n_features))
    phase = rng.uniform(0, 2 * np.pi, n_features)
    slides = []
    for i in range(n_slides):
        yy, xx = np.mgrid[0:n_side, 0:n_side].astype(float)
        xy = np.c_[xx.ravel() + 0.5 * (yy.ravel() % 2), yy.ravel() * 0.87] * 100.0
        coords, radius = slide_units(xy, f"s{i}")
        feats = np.cos(coords @ freqs + phase) + rng.normal(0, 0.05, (len(coords), n_features))
        split = "heldout" if i == n_slides - 1 else "train"
        slides.append(SlideData(f"s{i}", split, feats.astype(np.float32), coords, radius, [f"b{j}" for j in range(len(coords))]))
    return slides


@pytest.fixture(scope="module")
def small_training_set():
    return assemble_training_set(synthetic_slides(), dims=2, n_sets_train=64, n_sets_heldout=4,
                                 size_min=24, size_max=40, seed=0)
