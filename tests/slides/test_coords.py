"""The spots-on-tissue check. It passes consistent data (synthetic; the real DLPFC 151676,
mouse embryo and human heart lowres images) and blocks what it exists for: coordinates
scaled for another image (a full-res image addressed with hires-scaled coordinates,
lowres-scaled coordinates on the hires image, positions stored in another image's pixels),
x and y swapped, and placeholder or tissue-free images. Lowish but plausible fractions
(a torn edge, a shift) pass the blocking decision and are flagged as low."""


import duckdb
import numpy as np
import pandas as pd
import pytest
from PIL import Image
from scipy import ndimage
from skimage.filters import threshold_otsu

from mihd_assets.slides.coords import (
    BETTER_FIT_MARGIN, FLOOR_FRACTION, SWAPPED_XY, WARN_FRACTION, Placement, check_slide_images,
    check_spots_on_tissue, decide, footprint_sigma, saturation, slide_scales, tissue_mask,
)
from mihd_assets.slides.io import read_visium_slide


def _demo(tiny_slides):
    adata = read_visium_slide(tiny_slides / "demo_01")
    info = adata.uns["spatial"]["demo_01"]
    return adata, info["metadata"]["image_paths"], info["scalefactors"]


def test_demo_slide_passes_on_every_image_and_records_every_placement(tiny_slides):
    adata, _, factors = _demo(tiny_slides)
    checks = check_slide_images(adata, "demo_01")
    assert {c.image for c in checks} == {"fullres", "hires", "lowres"}
    for c in checks:
        assert c.passed and c.problem is None, c
        assert c.frac_on_tissue >= 0.95 and not c.low_fraction
        assert c.declared_scale == c.best_fit == f"{c.image}_scale"
        fractions = c.candidate_fractions
        # Every other image's scale, the other images' pixels, and x/y swapped were tried.
        expected = {"fullres_scale", "hires_scale", "lowres_scale", SWAPPED_XY}
        expected |= {f"coords_in_{k}_px" for k in ("hires", "lowres") if k != c.image}
        assert set(fractions) == expected
        assert fractions[c.declared_scale] == c.frac_on_tissue
        assert all(v < c.frac_on_tissue for k, v in fractions.items() if k != c.declared_scale), fractions
        assert np.isnan(getattr(c, f"frac_on_tissue_coords_in_{c.image}_px", np.nan))
    assert slide_scales(factors) == {
        "fullres": 1.0, "hires": factors["tissue_hires_scalef"], "lowres": factors["tissue_lowres_scalef"],
    }


def test_fullres_addressed_with_hires_scaled_coordinates_is_blocked(tiny_slides):
    """The full-res image read with coordinates already multiplied by the hires
    scale factor. Every point is inside the image, but almost none is on tissue."""
    adata, paths, factors = _demo(tiny_slides)
    scales = slide_scales(factors)
    check = check_spots_on_tissue(
        paths["fullres"], adata.obsm["spatial"], scales["hires"], factors["spot_diameter_fullres"],
        image_name="fullres", scales=scales,
    )
    assert check.frac_in_bounds == 1.0
    assert not check.passed and check.frac_on_tissue < 0.05
    assert check.declared_scale == "hires_scale" and check.best_fit == "fullres_scale"
    assert check.frac_on_tissue_best_fit == 1.0
    assert "coordinates fit the fullres scale factor 1" in check.problem
    assert "better than the declared hires scale factor" in check.problem
    assert "scaled for another image" in check.problem
    right = check_spots_on_tissue(
        paths["fullres"], adata.obsm["spatial"], 1.0, factors["spot_diameter_fullres"],
        image_name="fullres", scales=scales,
    )
    assert right.passed


def test_lowres_scaled_coordinates_on_the_hires_image_are_blocked(tiny_slides):
    adata, paths, factors = _demo(tiny_slides)
    scales = slide_scales(factors)
    check = check_spots_on_tissue(
        paths["hires"], adata.obsm["spatial"], scales["lowres"], factors["spot_diameter_fullres"],
        image_name="hires", scales=scales,
    )
    assert not check.passed and check.frac_on_tissue < 0.1
    assert check.best_fit == "hires_scale"
    assert "fit the hires scale factor" in check.problem and "the declared lowres scale factor" in check.problem


@pytest.mark.parametrize("unit", ["hires", "lowres"])
def test_positions_stored_in_another_images_pixels_are_blocked_on_every_image(tiny_slides, unit):
    """A positions file holding hires (or lowres) pixels instead of full-resolution ones:
    every image is blocked, and each names the placement that fits."""
    adata, _, factors = _demo(tiny_slides)
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"], dtype=np.float64) * factors[f"tissue_{unit}_scalef"]
    checks = {c.image: c for c in check_slide_images(adata, "demo_01")}
    for image, c in checks.items():
        assert not c.passed, c
        assert c.frac_on_tissue < 0.1 and c.frac_on_tissue_best_fit >= 0.95
        if image == unit:
            assert c.best_fit == "fullres_scale"
            assert f"coordinates already in {unit}-image pixels" in c.problem
        else:
            assert c.best_fit == f"coords_in_{unit}_px"
            assert f"as {unit}-image pixels" in c.problem
        assert "scaled for another image" in c.problem


def test_swapped_xy_is_blocked_on_every_demo_image(tiny_slides):
    adata, _, _ = _demo(tiny_slides)
    adata.obsm["spatial"] = np.asarray(adata.obsm["spatial"])[:, ::-1]
    for c in check_slide_images(adata, "demo_01"):
        assert not c.passed and c.best_fit == SWAPPED_XY, c
        # Tissue fills much of the image, so the swapped spots still land on it often.
        assert c.frac_on_tissue > FLOOR_FRACTION
        assert "x and y swapped" in c.problem and "columns swapped" in c.problem
        assert "scaled for another image" not in c.problem


def test_rejects_malformed_coordinates(tiny_slides):
    _, paths, _ = _demo(tiny_slides)
    with pytest.raises(ValueError, match=r"must be \(n>0, 2\)"):
        check_spots_on_tissue(paths["hires"], np.zeros((0, 2)), 0.2, 30.0)


# The decision alone, on made-up fractions.

def _placement(key: str, swap: bool = False) -> Placement:
    return Placement(key, 1.0, swap, f"the {key} placement")


def test_decide_margin_and_floor():
    declared = _placement("lowres_scale")
    hires, swapped = _placement("hires_scale"), _placement(SWAPPED_XY, swap=True)
    assert decide(declared, 0.97, {"hires_scale": (hires, 0.02), SWAPPED_XY: (swapped, 0.9)}) is None
    # Below the warning level but above the floor, nothing fits clearly better: passes.
    assert decide(declared, 0.80, {"hires_scale": (hires, 0.80 + BETTER_FIT_MARGIN - 0.01)}) is None
    assert decide(declared, FLOOR_FRACTION, {}) is None
    # Clearly better: the message names both placements and figures.
    msg = decide(declared, 0.80, {"hires_scale": (hires, 0.80 + BETTER_FIT_MARGIN + 0.01)})
    assert msg == (
        "coordinates fit the hires_scale placement (91.0% on tissue) better than the lowres_scale "
        "placement (80.0%): are they scaled for another image?"
    )
    assert "x and y swapped" in decide(declared, 0.7, {SWAPPED_XY: (swapped, 0.95)})
    # A better candidate that is itself implausible is no explanation; the floor blocks.
    msg = decide(declared, 0.05, {"hires_scale": (hires, 0.3)})
    assert "far below" in msg and "no other placement fits better" in msg
    assert "scaled for another image" not in msg
    # Declared is the best fit but far below real slides: blocked, scaling not blamed.
    msg = decide(declared, FLOOR_FRACTION - 0.01, {"hires_scale": (hires, 0.0), SWAPPED_XY: (swapped, 0.4)})
    assert "far below the 95-99.5% of real slides" in msg and "scaled for another image" not in msg


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
    assert "far below" in off.problem and "scaled for another image" not in off.problem


def test_flat_image_without_tissue_fails(tmp_path):
    rng = np.random.default_rng(1)
    sat = np.clip(rng.normal(0.025, 0.004, (300, 300)), 0, 1)  # glass only
    path = tmp_path / "glass.png"
    Image.fromarray(_purple(sat)).save(path)
    xs, ys = np.meshgrid(np.arange(50, 250, 10.0), np.arange(50, 250, 10.0))
    check = check_spots_on_tissue(path, np.column_stack([xs.ravel(), ys.ravel()]), 1.0, 4.0)
    assert not check.passed and check.frac_on_tissue == 0.0
    assert "no tissue contrast" in check.problem
    assert check.best_fit == "" and check.candidate_fractions == {}


def test_image_rows_fit_the_duckdb_table(tiny_slides, tmp_path):
    """The rows slide_qc_metrics writes (as_dict per image) match slide_image_checks; the
    placement fractions land as numbers, NaN (not tried) as NULL."""
    from mihd_resources.metrics_store import apply_schema, replace_partition_rows

    adata, _, _ = _demo(tiny_slides)
    rows = pd.DataFrame([{**c.as_dict(), "slide_id": "demo_01"} for c in check_slide_images(adata, "demo_01")])
    rows["threshold"] = rows["threshold"].astype(float)
    rows["problem"] = rows["problem"].replace("", None)
    with duckdb.connect(str(tmp_path / "m.duckdb")) as con:
        apply_schema(con)
        assert replace_partition_rows(con, "slide_image_checks", "slides/slide_qc_metrics", "demo_01", rows, "r", "1") == 3
        got = con.execute(
            "SELECT image, declared_scale, best_fit, frac_on_tissue_swapped_xy, frac_on_tissue_coords_in_hires_px "
            "FROM slide_image_checks ORDER BY image"
        ).fetchall()
    assert [(g[0], g[1], g[2]) for g in got] == [
        ("fullres", "fullres_scale", "fullres_scale"), ("hires", "hires_scale", "hires_scale"),
        ("lowres", "lowres_scale", "lowres_scale"),
    ]
    assert all(0.5 < g[3] < 0.95 for g in got)
    assert got[1][4] is None and got[0][4] is not None


# Real samples (skipped when /work/shared/data is absent).

@pytest.fixture(scope="module")
def heart(shared_data):
    adata = read_visium_slide(shared_data / "visium_human_heart_spaceranger1", "heart")
    info = adata.uns["spatial"]["heart"]
    return adata, info["metadata"]["image_paths"], info["scalefactors"]


def test_heart_placeholder_hires_fails_loudly_lowres_passes(heart):
    adata, _, _ = heart
    checks = {c.image: c for c in check_slide_images(adata, "heart")}
    assert not checks["hires"].passed
    assert "no tissue contrast" in checks["hires"].problem
    assert checks["lowres"].passed, checks["lowres"]
    assert checks["lowres"].best_fit == "lowres_scale" and checks["lowres"].frac_on_tissue >= 0.99


def test_heart_lowres_with_hires_scale_is_blocked(heart):
    adata, paths, factors = heart
    scales = slide_scales(factors)
    check = check_spots_on_tissue(
        paths["lowres"], adata.obsm["spatial"], scales["hires"], factors["spot_diameter_fullres"],
        image_name="lowres", scales=scales,
    )
    assert not check.passed and check.frac_in_bounds < 1.0
    assert check.best_fit == "lowres_scale" and "fit the lowres scale factor" in check.problem


def test_embryo_lowres_passes(shared_data):
    adata = read_visium_slide(shared_data / "visium_mouse_embryo_cytassist_spaceranger3", "embryo")
    (check,) = check_slide_images(adata, "embryo")
    assert check.passed and check.image == "lowres" and check.best_fit == "lowres_scale", check
    assert check.frac_on_tissue >= 0.99


@pytest.fixture(scope="module")
def dlpfc(shared_data):
    """spatialLIBD 151676: a real lowres-only slide with pale superficial layers."""
    adata = read_visium_slide(shared_data / "visium_dlpfc_151676_banksy5000", "151676")
    info = adata.uns["spatial"]["151676"]
    return adata, info["metadata"]["image_paths"]["lowres"], info["scalefactors"]


def test_dlpfc_lowres_passes(dlpfc):
    adata, _, _ = dlpfc
    (check,) = check_slide_images(adata, "151676")
    assert check.image == "lowres" and check.passed and check.best_fit == "lowres_scale", check
    assert check.frac_in_bounds == 1.0 and check.frac_on_tissue >= 0.98 and not check.low_fraction


def _dlpfc_wrong(dlpfc, how):
    adata, lowres, factors = dlpfc
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64)
    scale = factors["tissue_lowres_scalef"]
    shift = 0.1 * 600 / scale  # a tenth of the 600-px image, in full-resolution pixels
    wrong = {
        "hires scale factor": (xy, factors["tissue_hires_scalef"]),
        "scale x1.25": (xy, scale * 1.25),
        "scale x0.8": (xy, scale * 0.8),
        "x and y swapped": (xy[:, ::-1], scale),
        "shifted 10% right": (xy + [shift, 0.0], scale),
        "shifted 10% up": (xy - [0.0, shift], scale),
    }[how]
    return check_spots_on_tissue(
        lowres, *wrong, factors["spot_diameter_fullres"], image_name="lowres", scales=slide_scales(factors),
    )


@pytest.mark.parametrize("how", ["hires scale factor", "scale x1.25", "scale x0.8", "x and y swapped"])
def test_dlpfc_lowres_with_wrongly_scaled_or_swapped_coordinates_is_blocked(dlpfc, how):
    check = _dlpfc_wrong(dlpfc, how)
    assert not check.passed and check.frac_on_tissue < 0.9, check
    assert check.frac_on_tissue_best_fit >= 0.98
    if how == "x and y swapped":
        assert check.best_fit == SWAPPED_XY and "x and y swapped" in check.problem
    else:
        assert check.best_fit == "lowres_scale"
        assert "fit the lowres scale factor" in check.problem and "scaled for another image" in check.problem


@pytest.mark.parametrize("how", ["shifted 10% right", "shifted 10% up"])
def test_dlpfc_lowres_shifted_passes_the_blocking_decision_and_is_low(dlpfc, how):
    """A shift is not a scaling error: no placement fits better, the fraction (79-85%) is
    above the floor, so it passes and is flagged as low for the warning check."""
    check = _dlpfc_wrong(dlpfc, how)
    assert check.passed and check.low_fraction, check
    assert FLOOR_FRACTION <= check.frac_on_tissue < WARN_FRACTION


def test_dlpfc_torn_edge_passes_and_is_low(dlpfc, tmp_path):
    """A torn-off strip of tissue (painted glass-white over the spots of the left tenth):
    the declared scale still fits best, so the blocking decision passes; the fraction is low."""
    adata, lowres, factors = dlpfc
    xy = np.asarray(adata.obsm["spatial"], dtype=np.float64) * factors["tissue_lowres_scalef"]
    pixels = np.asarray(Image.open(lowres).convert("RGB")).copy()
    cut = np.quantile(xy[:, 0], 0.1)
    pixels[:, : int(cut)] = 245
    torn = tmp_path / "torn.png"
    Image.fromarray(pixels).save(torn)
    check = check_spots_on_tissue(
        torn, adata.obsm["spatial"], factors["tissue_lowres_scalef"], factors["spot_diameter_fullres"],
        image_name="lowres", scales=slide_scales(factors),
    )
    assert check.passed and check.low_fraction and check.best_fit == "lowres_scale", check
    assert 0.8 < check.frac_on_tissue < 0.92
