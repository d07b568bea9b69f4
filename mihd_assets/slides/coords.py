"""Coordinate / image consistency: do the spots land on the tissue of each image?

Addressing a full-resolution image with hires-scaled coordinates (on DLPFC 151673, x
2579-11821 became 386-1773 on a 13,332 px image) makes every patch miss the tissue,
and nothing complains. :func:`check_spots_on_tissue` maps the full-resolution spot
coordinates into an image with that image's own scale factor and asks the image itself
where tissue is (HSV saturation: stained tissue is coloured, glass background is
grey/white; see :func:`tissue_mask` for how the threshold is chosen).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import IMAGE_SUFFIXES

# Below this saturation spread an image has no usable contrast (e.g. a flat placeholder).
MIN_SATURATION_RANGE = 0.05
# Pixels sampled to estimate the Otsu threshold (the whole image is never decoded).
THRESHOLD_SAMPLE_PIXELS = 1_000_000


@dataclass
class LazyImage:
    """Read-only image access by window; TIFFs are read tile by tile through zarr."""

    path: Path
    shape: tuple[int, ...]
    _array: object

    @classmethod
    def open(cls, path: str | Path) -> "LazyImage":
        path = Path(path)
        if path.suffix.lower() in IMAGE_SUFFIXES:
            import tifffile
            import zarr

            store = tifffile.imread(path, aszarr=True)
            array = zarr.open(store, mode="r")
            if isinstance(array, zarr.Group):
                array = array["0"]  # pyramidal TIFF: level 0 is full resolution
            return cls(path, tuple(array.shape), array)
        from PIL import Image

        with Image.open(path) as img:
            array = np.asarray(img.convert("RGB"))
        return cls(path, array.shape, array)

    @property
    def height(self) -> int:
        return int(self.shape[0])

    @property
    def width(self) -> int:
        return int(self.shape[1])

    def window(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """Pixels [y0:y1, x0:x1] (inside the image); only the tiles it touches are decoded."""
        return np.asarray(self._array[y0:y1, x0:x1])

    def strided(self, step: int) -> np.ndarray:
        """Every ``step``-th pixel, read in horizontal bands to bound memory."""
        rows = []
        band = max(step, 1024 // step * step)
        for y0 in range(0, self.height, band):
            block = np.asarray(self._array[y0 : min(y0 + band, self.height), :])
            rows.append(block[::step, ::step])
        return np.concatenate(rows, axis=0)


def to_rgb(pixels: np.ndarray) -> np.ndarray:
    """Any 2-D grey, RGB or RGBA array as float RGB in [0, 1]."""
    arr = np.asarray(pixels)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    arr = arr[..., :3]
    if np.issubdtype(arr.dtype, np.integer):
        arr = arr.astype(np.float32) / float(np.iinfo(arr.dtype).max)
    return np.clip(arr.astype(np.float32), 0.0, 1.0)


def saturation(pixels: np.ndarray) -> np.ndarray:
    """HSV saturation of an RGB array (0 for grey, white or black pixels)."""
    rgb = to_rgb(pixels)
    cmax = rgb.max(axis=-1)
    cmin = rgb.min(axis=-1)
    return np.where(cmax > 0, (cmax - cmin) / np.maximum(cmax, 1e-6), 0.0)


@dataclass
class TissueCheck:
    image: str
    path: str
    scale: float
    n_spots: int
    frac_in_bounds: float
    frac_on_tissue: float
    threshold: float | None
    passed: bool
    problem: str | None

    def as_dict(self) -> dict:
        """Plain values that HDF5 can store (no None): missing threshold is NaN, no problem is ''."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["threshold"] = float("nan") if self.threshold is None else self.threshold
        out["problem"] = self.problem or ""
        return out


def footprint_sigma(spot_diameter_px: float) -> float:
    """Gaussian sigma (pixels) whose second moment equals that of a spot's disc.

    A uniform disc of radius r has per-axis variance r**2 / 4, so a Gaussian with
    sigma = diameter / 4 makes the smoothed value at a spot centre about the mean over
    the spot's own footprint, not over its neighbours (never below one pixel).
    """
    return max(1.0, float(spot_diameter_px) / 4.0)


def tissue_threshold(smooth_sat: np.ndarray) -> float:
    """Saturation above which a pixel is tissue rather than glass.

    H&E images hold three saturation classes: glass (a tall, narrow peak near 0),
    weakly stained tissue (cell-poor neuropil such as cortical layers 1-3, thin or pale
    sections) and strongly stained tissue. Two-class Otsu puts its cut inside the broad
    tissue distribution when the glass peak is narrow and the tissue spread wide: on the
    spatialLIBD 151676 lowres image it cut at saturation 0.108 while the pale superficial
    layers sit at 0.08-0.11 and glass at 0.02-0.03, so 8% of the correctly placed spots
    (all labelled ones in L1-L3) fell off the mask. The lower of the three-class Otsu thresholds
    (Liao et al. 2001, skimage ``threshold_multiotsu``) separates glass from all
    tissue; images with only two classes get a cut in their glass-tissue valley too,
    because splitting the narrow glass peak explains almost no variance.
    """
    from skimage.filters import threshold_multiotsu

    return float(threshold_multiotsu(smooth_sat, classes=3)[0])


def tissue_mask(sat: np.ndarray, spot_diameter_px: float) -> tuple[np.ndarray, float]:
    """Tissue mask of a saturation image: smoothed over one spot footprint
    (:func:`footprint_sigma`), thresholded by :func:`tissue_threshold`, then closing and
    hole filling with a disc of one spot diameter (tissue is textured and has gaps
    between fibres; a spot over such a gap is still on tissue). Returns (mask, threshold).
    """
    from scipy import ndimage

    smooth = ndimage.gaussian_filter(sat.astype(np.float32), sigma=footprint_sigma(spot_diameter_px))
    threshold = tissue_threshold(smooth)
    mask = smooth > threshold
    radius = max(1, int(round(spot_diameter_px)))
    r = np.arange(-radius, radius + 1)
    disk = (r[:, None] ** 2 + r[None, :] ** 2) <= radius**2
    mask = ndimage.binary_closing(mask, structure=disk)
    return ndimage.binary_fill_holes(mask), threshold


def check_spots_on_tissue(
    image_path: str | Path,
    spatial_fullres: np.ndarray,
    scale: float,
    spot_diameter_fullres: float,
    image_name: str = "image",
    min_fraction: float = 0.95,
) -> TissueCheck:
    """Map full-res spot coordinates with ``scale`` into the image and test tissue overlap.

    The tissue mask comes from the image alone (:func:`tissue_mask` on a strided copy of
    at most ~1 Mpx, so a full-resolution TIFF is never decoded whole); a spot is on tissue
    when its centre is on the mask, which is built from saturation averaged over one spot
    footprint, so a spot is judged by what lies under it, not by a single pixel. Passing needs at
    least ``min_fraction`` of spots inside the image and on tissue. An image without
    saturation contrast (a flat placeholder) fails outright.
    """
    coords = np.asarray(spatial_fullres, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
        raise ValueError(f"{image_path}: spot coordinates must be (n>0, 2), got {coords.shape}")
    img = LazyImage.open(image_path)
    xy = coords * scale
    n = len(xy)
    inside = (xy[:, 0] >= 0) & (xy[:, 0] < img.width) & (xy[:, 1] >= 0) & (xy[:, 1] < img.height)
    result = dict(
        image=image_name, path=str(image_path), scale=float(scale), n_spots=n,
        frac_in_bounds=float(inside.mean()),
    )

    step = max(1, int(np.ceil(np.sqrt(img.height * img.width / THRESHOLD_SAMPLE_PIXELS))))
    sat = saturation(img.strided(step))
    spread = float(np.percentile(sat, 99) - np.percentile(sat, 1))
    if spread < MIN_SATURATION_RANGE:
        return TissueCheck(
            **result, frac_on_tissue=0.0, threshold=None, passed=False,
            problem=(
                f"image has no tissue contrast (saturation spread {spread:.3f} < "
                f"{MIN_SATURATION_RANGE}); is it a placeholder?"
            ),
        )
    mask, threshold = tissue_mask(sat, spot_diameter_fullres * scale / step)
    on_tissue = np.zeros(n, dtype=bool)
    rows = np.clip((xy[inside, 1] / step).astype(int), 0, mask.shape[0] - 1)
    cols = np.clip((xy[inside, 0] / step).astype(int), 0, mask.shape[1] - 1)
    on_tissue[inside] = mask[rows, cols]
    frac = float(on_tissue.mean())
    passed = frac >= min_fraction
    problem = None if passed else (
        f"only {frac:.1%} of {n} spots fall inside the {img.width}x{img.height} image and on "
        f"tissue (need {min_fraction:.0%}; {inside.mean():.1%} inside the image) with scale "
        f"factor {scale:g}: are the coordinates scaled for another image?"
    )
    return TissueCheck(**result, frac_on_tissue=frac, threshold=threshold, passed=passed, problem=problem)


def check_slide_images(adata, slide_id: str, min_fraction: float = 0.95) -> list[TissueCheck]:
    """Run :func:`check_spots_on_tissue` for every image a slide has, in-tissue spots only."""
    from .io import image_scale

    info = adata.uns["spatial"][slide_id]
    factors = info["scalefactors"]
    paths = dict(info["metadata"]["image_paths"])
    if not paths:
        raise ValueError(f"slide '{slide_id}': no image to check the spot coordinates against")
    mask = np.asarray(adata.obs["in_tissue"]) == 1 if "in_tissue" in adata.obs else slice(None)
    coords = np.asarray(adata.obsm["spatial"])[mask]
    return [
        check_spots_on_tissue(
            path, coords, image_scale(name, factors), factors["spot_diameter_fullres"],
            image_name=name, min_fraction=min_fraction,
        )
        for name, path in sorted(paths.items())
    ]
