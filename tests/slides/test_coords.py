"""The spots-on-tissue check: passes on consistent data (synthetic and the real lowres-only
DLPFC 151676), fails when the full-res image is addressed with hires-scaled coordinates,
on wrongly scaled or shifted coordinates, and on placeholder or tissue-free images."""

import numpy as np
import pytest
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from mihd_assets.slides.coords import (
    check_slide_images, check_spots_on_tissue, footprint_sigma, saturation, tissue_mask,
)
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


def _purple(sat: np.ndarray, value: float = 0.65) -> np.ndarray:
    """An RGB image (uint8) whose HSV saturation is ``sat``: R = B = value, G = value * (1 - sat)."""
    rgb = np.stack([np.full_like(sat, value), value * (1 - sat), np.full_like(sat, value)], axis=-1)
    return (np.clip(rgb, 0, 1) * 255).round().astype(np.uint8)


def _pale_and_dense_slide(tmp_path):
    """Glass (narrow peak at saturation 0.025), a pale tissue block (0.09) and a strongly,
    unevenly stained block (0.12-0.32): the three classes of a real H&E lowres image."""
    rng = np.random.default_rng(0)
    sat = np.clip(rng.normal(0.025, 0.004, (300, 300)), 0, 1)
    sat[60:240, 60:150] = np.clip(rng.normal(0.09, 0.015, (180, 90)), 0, 1)
    sat[60:240, 150:240] = rng.uniform(0.12, 0.32, (180, 90))
    path = tmp_path / "three_classes.png"
    Image.fromarray(_purple(sat)).save(path)
    return path


def test_pale_tissue_is_on_the_mask_where_two_class_otsu_cuts_it_off(tmp_path):
    path = _pale_and_dense_slide(tmp_path)
    sat = saturation(np.asarray(Image.open(path).convert("RGB")))
    mask, threshold = tissue_mask(sat, 4.0)
    # Two-class Otsu would put the cut above the pale tissue (what blocked slide 151676).
    assert threshold_otsu(ndimage.gaussian_filter(sat, footprint_sigma(4.0))) > 0.1
    assert 0.03 < threshold < 0.08
    assert mask[70:230, 70:145].all() and mask[70:230, 155:235].all()
    assert not mask[:50].any() and not mask[:, :50].any()
    # Spots over both tissue blocks (x = column, y = row; scale 1) pass; moved onto glass they fail.
    xs, ys = np.meshgrid(np.arange(70, 235, 8.0), np.arange(70, 235, 8.0))
    spots = np.column_stack([xs.ravel(), ys.ravel()])
    assert check_spots_on_tissue(path, spots, 1.0, 4.0).passed
    off = check_spots_on_tissue(path, spots * 0.25, 1.0, 4.0)
    assert not off.passed and off.frac_on_tissue < 0.1 and off.frac_in_bounds == 1.0


def test_flat_image_without_tissue_fails(tmp_path):
    rng = np.random.default_rng(1)
    sat = np.clip(rng.normal(0.025, 0.004, (300, 300)), 0, 1)  # glass only
    path = tmp_path / "glass.png"
    Image.fromarray(_purple(sat)).save(path)
    xs, ys = np.meshgrid(np.arange(50, 250, 10.0), np.arange(50, 250, 10.0))
    check = check_spots_on_tissue(path, np.column_stack([xs.ravel(), ys.ravel()]), 1.0, 4.0)
    assert not check.passed and check.frac_on_tissue == 0.0
    assert "no tissue contrast" in check.problem


@pytest.fixture(scope="module")
def dlpfc(shared_data):
    """spatialLIBD 151676: a real lowres-only slide with pale superficial layers."""
    adata = read_visium_slide(shared_data / "visium_dlpfc_151676_banksy5000", "151676")
    info = adata.uns["spatial"]["151676"]
    return adata, info["metadata"]["image_paths"]["lowres"], info["scalefactors"]


def test_dlpfc_lowres_passes(dlpfc):
    adata, _, _ = dlpfc
    (check,) = check_slide_images(adata, "151676")
    assert check.image == "lowres" and check.passed, check
    assert check.frac_in_bounds == 1.0 and check.frac_on_tissue >= 0.98


@pytest.mark.parametrize("how", ["hires scale factor", "scale x1.25", "scale x0.8", "shifted 10% right",
                                 "shifted 10% up"])
def test_dlpfc_lowres_with_wrong_coordinates_fails(dlpfc, how):
    adata, lowres, factors = dlpfc
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    scale = factors["tissue_lowres_scalef"]
    shift = 0.1 * 600 / scale  # a tenth of the 600-px image, in full-resolution pixels
    wrong = {
        "hires scale factor": (xy, factors["tissue_hires_scalef"]),
        "scale x1.25": (xy, scale * 1.25),
        "scale x0.8": (xy, scale * 0.8),
        "shifted 10% right": (xy + [shift, 0.0], scale),
        "shifted 10% up": (xy - [0.0, shift], scale),
    }[how]
    check = check_spots_on_tissue(lowres, *wrong, factors["spot_diameter_fullres"])
    assert not check.passed and check.frac_on_tissue < 0.9, check
    assert "scaled for another image" in check.problem
