"""The spots-on-tissue check: passes on consistent data, fails when the full-res image is
addressed with hires-scaled coordinates."""

import numpy as np
import pytest

from mihd_assets.slides.coords import check_slide_images, check_spots_on_tissue
from mihd_assets.slides.io import read_visium_slide


def test_demo_slide_passes_on_every_image(tiny_slides):
    adata = read_visium_slide(tiny_slides / "demo_01")
    checks = check_slide_images(adata, "demo_01")
    assert {c.image for c in checks} == {"fullres", "hires", "lowres"}
    for c in checks:
        assert c.passed, c
        assert c.frac_on_tissue >= 0.95


def test_fullres_addressed_with_hires_scaled_coordinates_fails(tiny_slides):
    """The full-res image read with coordinates already multiplied by the hires
    scale factor. Every point is inside the image, but almost none is on tissue."""
    adata = read_visium_slide(tiny_slides / "demo_01")
    info = adata.uns["spatial"]["demo_01"]
    fullres = info["metadata"]["image_paths"]["fullres"]
    hires_scale = info["scalefactors"]["tissue_hires_scalef"]
    check = check_spots_on_tissue(fullres, adata.obsm["spatial"], hires_scale, info["scalefactors"]["spot_diameter_fullres"])
    assert check.frac_in_bounds == 1.0
    assert not check.passed
    assert check.frac_on_tissue < 0.5
    assert "scaled for another image" in check.problem
    right = check_spots_on_tissue(fullres, adata.obsm["spatial"], 1.0, info["scalefactors"]["spot_diameter_fullres"])
    assert right.passed


def test_heart_placeholder_hires_fails_loudly_lowres_passes(shared_data):
    adata = read_visium_slide(shared_data / "visium_human_heart_spaceranger1", "heart")
    checks = {c.image: c for c in check_slide_images(adata, "heart")}
    assert not checks["hires"].passed
    assert "no tissue contrast" in checks["hires"].problem
    assert checks["lowres"].passed, checks["lowres"]


def test_heart_lowres_with_hires_scale_fails(shared_data):
    adata = read_visium_slide(shared_data / "visium_human_heart_spaceranger1", "heart")
    info = adata.uns["spatial"]["heart"]
    check = check_spots_on_tissue(
        info["metadata"]["image_paths"]["lowres"], adata.obsm["spatial"],
        info["scalefactors"]["tissue_hires_scalef"], info["scalefactors"]["spot_diameter_fullres"],
    )
    assert not check.passed and check.frac_in_bounds < 1.0


def test_embryo_lowres_passes(shared_data):
    adata = read_visium_slide(shared_data / "visium_mouse_embryo_cytassist_spaceranger3", "embryo")
    (check,) = check_slide_images(adata, "embryo")
    assert check.passed and check.image == "lowres"


def test_rejects_malformed_coordinates(tiny_slides):
    adata = read_visium_slide(tiny_slides / "demo_01")
    path = adata.uns["spatial"]["demo_01"]["metadata"]["image_paths"]["hires"]
    with pytest.raises(ValueError, match=r"must be \(n>0, 2\)"):
        check_spots_on_tissue(path, np.zeros((0, 2)), 0.2, 30.0)
