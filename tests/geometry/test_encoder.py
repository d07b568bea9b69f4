"""The frozen expression encoder: spatially variable genes, training slides only, batch offsets removed."""

import numpy as np
import pytest

from mihd_assets.geometry.encoder import fit_shared_pca, morans_i, standardize_embeddings
from mihd_assets.geometry.targets import GeometryInputError
from mihd_assets.slides.io import read_visium_slide


@pytest.fixture(scope="module")
def two_slides(tiny_slides):
    return {s: read_visium_slide(tiny_slides / s, s) for s in ("demo_01", "demo_02")}


def test_morans_i_separates_smooth_patterns_from_noise():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1, size=(400, 2))
    values = np.c_[xy[:, 0] + xy[:, 1], rng.normal(size=400)]
    smooth, noise = morans_i(values, xy)
    assert smooth > 0.8 and abs(noise) < 0.1


def test_encoder_picks_spatial_genes_and_is_fitted_on_training_slides_only(two_slides):
    train = {"demo_01": two_slides["demo_01"]}
    enc = fit_shared_pca(train, two_slides, n_genes=30, n_components=8)
    structured = [g for g in enc.genes if not g.startswith("DEMOG")]  # layer markers and spatial programs
    assert len(structured) >= 25, enc.genes
    held = two_slides["demo_02"]
    feats = enc.transform(held, "demo_02")
    assert feats.shape == (held.n_obs, 8) and np.isfinite(feats).all()
    # The held-out slide's expression never shapes the encoder.
    altered = held.copy()
    altered.X = altered.X * 3
    again = fit_shared_pca(train, {"demo_01": two_slides["demo_01"], "demo_02": altered}, n_genes=30, n_components=8)
    np.testing.assert_allclose(again.components, enc.components)
    assert enc.describe()["fitted_on"] == "training slides only"
    missing = held[:, [g for g in held.var_names if g != enc.genes[0]]].copy()
    with pytest.raises(GeometryInputError, match=r"slide demo_02: 1 encoder genes missing"):
        enc.transform(missing, "demo_02")


def test_stored_embeddings_are_standardized_with_training_statistics():
    values = {"a": np.array([[0.0, 1.0], [2.0, 3.0]]), "b": np.array([[10.0, 10.0], [12.0, 14.0]])}
    out, info = standardize_embeddings("scgpt", values, ["a"])
    np.testing.assert_allclose(out["a"].mean(axis=0), 0.0)
    np.testing.assert_allclose(out["b"][0], [9.0, 8.0])  # training mean (1, 2), std (1, 1)
    assert info["encoder"] == "embedding:scgpt"
    with pytest.raises(GeometryInputError, match="fitted per slide"):
        standardize_embeddings("mlp", values, ["a"])
