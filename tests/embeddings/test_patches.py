"""Spot patch datasets: windows land on the spots in every image, padding, filters, workers."""

import pickle
import re

import numpy as np
import pytest
import tifffile
import torch
from PIL import Image

from mihd_assets.embeddings.patches import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    STAIG_WINDOW_FULLRES,
    PatchImageError,
    SpotPatchDataset,
    LUMA,
    STAIG_FILTER_SIZE,
    fft_lowpass,
    highest_resolution_image,
    make_loader,
    spot_pitch,
    staig_filter,
)
from mihd_assets.slides.io import read_visium_slide

MEAN = torch.tensor(IMAGENET_MEAN)[:, None, None]
STD = torch.tensor(IMAGENET_STD)[:, None, None]


def write_tiff(path, image):
    tifffile.imwrite(path, image, tile=(64, 64), photometric="rgb")
    return path


def denormalize(patch: torch.Tensor) -> np.ndarray:
    """(3, s, s) normalized tensor -> (3, s, s) RGB in [0, 1]."""
    return (patch * STD + MEAN).numpy()


def all_patches(ds: SpotPatchDataset) -> torch.Tensor:
    return torch.stack([ds[i] for i in range(len(ds))])


def high_frequency_fraction(gray: np.ndarray, above: float) -> float:
    """Share of the non-DC spectral power beyond ``above`` cycles per image."""
    power = np.abs(np.fft.fft2(gray)) ** 2
    power[0, 0] = 0.0
    fy = np.abs(np.fft.fftfreq(gray.shape[0]) * gray.shape[0])
    fx = np.abs(np.fft.fftfreq(gray.shape[1]) * gray.shape[1])
    high = np.maximum(fy[:, None], fx[None, :]) > above
    return float(power[high].sum() / power.sum())


@pytest.fixture(scope="module")
def demo_slide(tiny_slides):
    """(spots, full-res TIFF path, hires PNG path, hires scale) of a real demo slide."""
    adata = read_visium_slide(tiny_slides / "demo_01")
    info = adata.uns["spatial"]["demo_01"]
    paths, factors = info["metadata"]["image_paths"], info["scalefactors"]
    name, path, scale = highest_resolution_image(paths, factors)
    assert (name, scale) == ("fullres", 1.0) and path.suffix == ".tif"
    return adata.obsm["spatial"], path, paths["hires"], factors["tissue_hires_scalef"]


def test_window_centre_is_the_spot_pixel(tmp_path):
    image = np.full((300, 400, 3), 255, dtype=np.uint8)
    spots = np.array([[100.0, 80.0], [250.0, 200.0], [57.0, 231.0]])  # (x = col, y = row)
    for x, y in spots.astype(int):
        image[y, x] = (0, 0, 0)
        image[y, x + 5] = (0, 255, 0)  # 5 px to the right: tells columns from rows
    ds = SpotPatchDataset(write_tiff(tmp_path / "marks.tif", image), spots, scale=1.0, input_size=31, patch_side_fullres=31)
    assert ds.window_px == 31 and ds.n_padded == 0
    for i in range(len(spots)):
        win = ds.window(i)
        assert np.unravel_index(np.argmin(win.sum(axis=2)), win.shape[:2]) == (15, 15)
        np.testing.assert_array_equal(win[15, 20], [0.0, 1.0, 0.0])


def test_resized_patch_is_centred_on_the_spot(tmp_path):
    image = np.full((300, 400, 3), 255, dtype=np.uint8)
    spots = np.array([[120.0, 90.0], [260.0, 190.0]])
    for x, y in spots.astype(int):
        image[y - 4 : y + 5, x - 4 : x + 5] = 0
    ds = SpotPatchDataset(write_tiff(tmp_path / "blobs.tif", image), spots, scale=1.0, input_size=32, patch_side_fullres=45)
    for i in range(len(spots)):
        darkness = 1.0 - denormalize(ds[i]).mean(axis=0)
        rows, cols = np.mgrid[0:32, 0:32]
        centre = (darkness * rows).sum() / darkness.sum(), (darkness * cols).sum() / darkness.sum()
        np.testing.assert_allclose(centre, (15.5, 15.5), atol=0.5)


def test_hires_and_fullres_give_the_same_patch(tmp_path):
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:800, 0:800]
    base = 0.5 + 0.25 * np.sin(xx / 23.0) * np.cos(yy / 31.0) + 0.2 * np.sin((xx + 2 * yy) / 57.0)
    image = (np.stack([base, base**2, 1 - base], axis=-1) * 255).astype(np.uint8)
    full = write_tiff(tmp_path / "full.tif", image)
    hires = tmp_path / "hires.png"
    Image.fromarray(image).resize((200, 200), Image.Resampling.LANCZOS).save(hires)
    spots = rng.uniform(100, 700, size=(20, 2))

    from_full = SpotPatchDataset(full, spots, 1.0, input_size=32, patch_side_fullres=160)
    from_hires = SpotPatchDataset(hires, spots, 0.25, input_size=32, patch_side_fullres=160)
    assert from_hires.window_px == 40 and from_full.window_px == 160
    a = all_patches(from_full)
    b = all_patches(from_hires)
    # Normalized units; windows start on whole hires pixels, so up to 2 full-res px of shift
    # remains (shifting by 8 full-res px already costs 0.27).
    assert (a - b).abs().mean() < 0.1
    # The bug this guards against: the full-res image addressed with hires-scaled coordinates.
    wrong = SpotPatchDataset(full, spots * 0.25, 1.0, input_size=32, patch_side_fullres=160)
    assert (a - all_patches(wrong)).abs().mean() > 0.5


def test_demo_slide_fullres_and_hires_agree(demo_slide):
    spots, full, hires, hires_scale = demo_slide
    assert spot_pitch(spots) == pytest.approx(60.0, abs=1.0)  # tiny_spec's pitch
    a = all_patches(SpotPatchDataset(full, spots, 1.0, input_size=16))
    b = all_patches(SpotPatchDataset(hires, spots, hires_scale, input_size=16))
    assert np.corrcoef(a.flatten(), b.flatten())[0, 1] > 0.85
    wrong = all_patches(SpotPatchDataset(full, spots * hires_scale, 1.0, input_size=16))
    assert np.corrcoef(a.flatten(), wrong.flatten())[0, 1] < 0.5


def test_windows_past_the_border_are_padded_white_and_counted(tmp_path):
    image = np.full((200, 200, 3), 128, dtype=np.uint8)
    spots = np.array([[5.0, 100.0], [100.0, 100.0], [195.0, 195.0]])
    ds = SpotPatchDataset(write_tiff(tmp_path / "grey.tif", image), spots, 1.0, input_size=41, patch_side_fullres=41)
    assert ds.n_padded == 2 and ds.padded.tolist() == [True, False, True]
    assert ds.describe()["n_padded"] == 2
    left = ds.window(0)  # x0 = 5 - 20 = -15: fifteen white columns
    assert (left[:, :15] == 1.0).all() and (left[:, 15:] < 0.6).all()
    assert (ds.window(1) < 0.6).all()
    corner = ds.window(2)  # rows and columns 25.. lie past the far border
    assert (corner[25:] == 1.0).all() and (corner[:, 25:] == 1.0).all() and (corner[:25, :25] < 0.6).all()


def test_fft_lowpass_keeps_frequencies_up_to_the_cutoff():
    x = np.arange(128)
    low = np.sin(2 * np.pi * 3 * x / 128)[None, :] * np.ones((128, 1))
    high = 0.5 * np.cos(2 * np.pi * 40 * x / 128)[:, None] * np.ones((1, 128))
    np.testing.assert_allclose(fft_lowpass(low + high, cutoff=10), low, atol=1e-5)
    np.testing.assert_allclose(fft_lowpass(low + high, cutoff=45), low + high, atol=1e-5)
    np.testing.assert_allclose(fft_lowpass(low + high, cutoff=2), 0.0, atol=1e-5)


def test_filtered_variants_are_low_pass_grey(demo_slide):
    spots, full, _, _ = demo_slide
    idx = range(0, len(spots), 15)
    hf = {}
    for variant in ("standard", "freq", "staig_strict"):
        ds = SpotPatchDataset(full, spots, 1.0, input_size=224, variant=variant)
        patches = [denormalize(ds[i]) for i in idx]
        if variant != "standard":
            for p in patches:  # one grey channel, replicated
                np.testing.assert_allclose(p[0], p[1], atol=1e-5)
                np.testing.assert_allclose(p[0], p[2], atol=1e-5)
        hf[variant] = np.mean([high_frequency_fraction(p.mean(axis=0), above=20) for p in patches])
    assert hf["freq"] < hf["standard"] / 10
    assert hf["staig_strict"] < hf["standard"] / 10


def test_filtered_patch_equals_the_filter_applied_as_written(demo_slide):
    """The dataset converts to grey before resizing to 512 px (cheaper); STAIG resizes the RGB
    window and converts inside its filter. Both are linear, so the patches agree to float error."""
    spots, full, _, _ = demo_slide
    for variant in ("freq", "staig_strict"):
        ds = SpotPatchDataset(full, spots, 1.0, input_size=224, variant=variant)
        for i in (0, len(spots) // 2, len(spots) - 1):
            rgb = torch.from_numpy(ds.window(i)).permute(2, 0, 1)
            big = torch.nn.functional.interpolate(rgb[None], size=(STAIG_FILTER_SIZE,) * 2, mode="bilinear",
                                                  align_corners=False, antialias=True)[0]
            grey = torch.from_numpy(staig_filter(big.permute(1, 2, 0).numpy()))[None, None]
            small = torch.nn.functional.interpolate(grey, size=(224, 224), mode="bilinear", align_corners=False,
                                                    antialias=True)[0].expand(3, -1, -1)
            np.testing.assert_allclose(denormalize(ds[i]), small.numpy(), atol=1e-5)
    assert LUMA.sum() == pytest.approx(1.0)


def test_fft_lowpass_is_the_full_complex_transform_of_a_real_image():
    rng = np.random.default_rng(0)
    for shape in ((64, 64), (63, 70)):
        image = rng.random(shape)
        h, w = shape
        fy, fx = np.abs(np.fft.fftfreq(h) * h), np.abs(np.fft.fftfreq(w) * w)
        keep = (fy[:, None] <= 9) & (fx[None, :] <= 9)
        reference = np.fft.ifft2(np.fft.fft2(image) * keep)
        assert np.abs(reference.imag).max() < 1e-12  # the band is symmetric: a real result
        np.testing.assert_allclose(fft_lowpass(image, cutoff=9), reference.real, atol=1e-6)


def test_staig_strict_uses_staigs_window(demo_slide):
    spots, full, hires, hires_scale = demo_slide
    ds = SpotPatchDataset(full, spots, 1.0, input_size=224, variant="staig_strict")
    assert ds.patch_side_fullres == STAIG_WINDOW_FULLRES == 504 and ds.window_px == 504
    assert SpotPatchDataset(hires, spots, hires_scale, 224, variant="staig_strict").window_px == round(504 * hires_scale)
    with pytest.raises(ValueError, match="504"):
        SpotPatchDataset(full, spots, 1.0, input_size=224, variant="staig_strict", patch_side_fullres=200)


def test_loader_with_workers_matches_single_process(demo_slide):
    spots, full, _, _ = demo_slide
    ds = SpotPatchDataset(full, spots, 1.0, input_size=32)
    serial = torch.cat(list(make_loader(ds, batch_size=16, num_workers=0)))
    loader = make_loader(ds, batch_size=16, num_workers=2, prefetch_factor=2)
    assert loader.persistent_workers
    parallel = torch.cat(list(loader))
    assert serial.shape == (len(spots), 3, 32, 32)
    assert torch.equal(serial, parallel)
    # Spawned workers receive a pickled dataset without the parent's file handle.
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._image is None and torch.equal(clone[3], serial[3])


def test_missing_image_names_the_file(tmp_path):
    missing = tmp_path / "nope.tif"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        SpotPatchDataset(missing, np.array([[1.0, 1.0]]), 1.0, input_size=16, patch_side_fullres=8)


def test_corrupt_tiff_names_the_file(tmp_path):
    garbage = tmp_path / "garbage.tif"
    garbage.write_bytes(b"II*\x00" + bytes(range(256)) * 4)
    with pytest.raises(PatchImageError, match=re.escape(str(garbage))):
        SpotPatchDataset(garbage, np.array([[1.0, 1.0]]), 1.0, input_size=16, patch_side_fullres=8)


def test_truncated_tiff_names_the_file(tmp_path):
    image = np.random.default_rng(1).integers(0, 255, size=(256, 256, 3), dtype=np.uint8)
    path = write_tiff(tmp_path / "truncated.tif", image)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    spots = np.array([[32.0, 32.0], [224.0, 224.0]])
    with pytest.raises(PatchImageError, match=re.escape(str(path))):
        ds = SpotPatchDataset(path, spots, 1.0, input_size=16, patch_side_fullres=16)
        [ds[i] for i in range(len(ds))]


def test_rejects_no_spots_and_spots_off_the_image(tmp_path):
    path = write_tiff(tmp_path / "small.tif", np.zeros((100, 100, 3), dtype=np.uint8))
    with pytest.raises(ValueError, match="no spots"):
        SpotPatchDataset(path, np.zeros((0, 2)), 1.0, input_size=16, patch_side_fullres=8)
    with pytest.raises(PatchImageError, match="outside the 100x100 image"):
        SpotPatchDataset(path, np.array([[50.0, 50.0], [50.0, 400.0]]), 1.0, input_size=16, patch_side_fullres=8)
    with pytest.raises(ValueError, match="unknown patch variant"):
        SpotPatchDataset(path, np.array([[50.0, 50.0]]), 1.0, input_size=16, patch_side_fullres=8, variant="fft")
