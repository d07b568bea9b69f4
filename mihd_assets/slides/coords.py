"""Coordinate / image consistency: do the spots land on the tissue of each image?

Addressing a full-resolution image with hires-scaled coordinates (on DLPFC 151673, x
2579-11821 became 386-1773 on a 13,332 px image) makes every patch miss the tissue,
and nothing complains. :func:`check_spots_on_tissue` maps the full-resolution spot
coordinates into an image with that image's own scale factor and asks the image itself
where tissue is (HSV saturation: stained tissue is coloured, glass background is
grey/white; see :func:`tissue_mask` for how the threshold is chosen). It also tries the
other plausible placements (the other images' scale factors, x and y swapped) and blocks
when one of them fits clearly better than the declared one, or when the declared one is
far below what real slides show (see :func:`decide` for the numbers).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io import IMAGE_SUFFIXES

# Below this saturation spread an image has no usable contrast (e.g. a flat placeholder).
MIN_SATURATION_RANGE = 0.05
# Pixels sampled to estimate the Otsu threshold (the whole image is never decoded).
THRESHOLD_SAMPLE_PIXELS = 1_000_000

# Decision thresholds on the fraction of in-tissue spots whose centre lies on the tissue
# mask; :func:`decide` explains the numbers.
WARN_FRACTION = 0.95
FLOOR_FRACTION = 0.6
BETTER_FIT_MARGIN = 0.10
# Named scale factors a slide can declare, and the placement "same scale, x and y swapped".
SCALE_NAMES = ("fullres", "hires", "lowres")
SWAPPED_XY = "swapped_xy"
# Largest spot footprint a mask is smoothed over, as a fraction of the image's shorter side.
# A Visium array is 78 rows of spots 100 um apart with 55 um diameters, so an image holding
# it has spots under 1/100 of its side; a placement implying spots of 1/20 is implausible
# anyway, and smoothing over more would cost memory and time for nothing.
MAX_FOOTPRINT_FRACTION = 1 / 20


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


def slide_scales(scalefactors: Mapping[str, float]) -> dict[str, float]:
    """The named scale factors of a slide: ``fullres`` 1.0 and every ``tissue_<name>_scalef``
    of the scale-factor file (hires, lowres) that is present."""
    scales = {"fullres": 1.0}
    for name in SCALE_NAMES[1:]:
        key = f"tissue_{name}_scalef"
        if key in scalefactors:
            scales[name] = float(scalefactors[key])
    return scales


@dataclass
class Placement:
    """One way the spot coordinates may map into an image: ``key`` names it (the suffix
    of its ``frac_on_tissue_<key>`` field), ``factor`` multiplies the coordinates,
    ``swap`` exchanges x and y first, ``label`` names it in messages."""

    key: str
    factor: float
    swap: bool
    label: str


def placements(image_name: str, scale: float, scales: Mapping[str, float]) -> tuple[str, list[Placement]]:
    """The declared placement's key and every placement to try, declared one first.

    The declared one maps full-resolution coordinates with ``scale``; its key is
    ``<name>_scale`` for the named scale equal to it (``image_name`` first), or ``given``.
    Candidates: every other named scale factor (the image may be another image's size,
    or the declared factor belong to another image); coordinates already in another
    image's pixels (``coords_in_<k>_px``: factor ``scale / s_k``, for k neither full
    resolution nor the declared image, where that factor is 1 = the ``fullres`` scale);
    and x and y swapped at the declared scale.
    """
    name = next((n for n in [image_name, *scales] if n in scales and np.isclose(scales[n], scale)), None)
    declared = f"{name}_scale" if name else "given"
    out = [Placement(
        declared, scale, False,
        f"the declared {name} scale factor {scale:g}" if name else f"the given scale factor {scale:g}",
    )]
    for other, s in scales.items():
        if other != name:
            already = f", i.e. coordinates already in {image_name}-image pixels" if other == "fullres" else ""
            out.append(Placement(f"{other}_scale", s, False, f"the {other} scale factor {s:g}{already}"))
    for other, s in scales.items():
        if other not in ("fullres", name) and not np.isclose(scale / s, 1.0):
            out.append(Placement(
                f"coords_in_{other}_px", scale / s, False,
                f"as {other}-image pixels, factor {scale:g} / {s:g} = {scale / s:g}",
            ))
    out.append(Placement(SWAPPED_XY, scale, True, f"x and y swapped at scale factor {scale:g}"))
    return declared, out


# Placement keys recorded per image (one ``frac_on_tissue_<key>`` field and column each).
PLACEMENT_KEYS = (
    "fullres_scale", "hires_scale", "lowres_scale", "coords_in_hires_px", "coords_in_lowres_px", SWAPPED_XY,
)


@dataclass
class TissueCheck:
    """One image's check. ``frac_on_tissue`` is for the declared placement
    (``declared_scale``: ``<image>_scale``, or ``given`` for a factor no image has); the
    ``frac_on_tissue_<placement>`` fields hold the same figure for each placement of
    :func:`placements` (NaN where not tried: a scale factor the slide lacks, a placement
    equal to another one, an image without tissue contrast); ``best_fit`` names the
    placement that fits best ('' when none could be judged), ``frac_on_tissue_best_fit``
    its figure."""

    image: str
    path: str
    scale: float
    n_spots: int
    frac_in_bounds: float
    frac_on_tissue: float
    threshold: float | None
    passed: bool
    problem: str | None
    declared_scale: str = "given"
    frac_on_tissue_fullres_scale: float = float("nan")
    frac_on_tissue_hires_scale: float = float("nan")
    frac_on_tissue_lowres_scale: float = float("nan")
    frac_on_tissue_coords_in_hires_px: float = float("nan")
    frac_on_tissue_coords_in_lowres_px: float = float("nan")
    frac_on_tissue_swapped_xy: float = float("nan")
    best_fit: str = ""
    frac_on_tissue_best_fit: float = float("nan")

    def as_dict(self) -> dict:
        """Plain values that HDF5 can store (no None): missing threshold is NaN, no problem is ''."""
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["threshold"] = float("nan") if self.threshold is None else self.threshold
        out["problem"] = self.problem or ""
        return out

    @property
    def candidate_fractions(self) -> dict[str, float]:
        """On-tissue fraction per placement tried (the declared one included when it is a
        named scale), NaN ones left out."""
        out = {key: float(getattr(self, f"frac_on_tissue_{key}")) for key in PLACEMENT_KEYS}
        return {k: v for k, v in out.items() if not np.isnan(v)}

    @property
    def low_fraction(self) -> bool:
        """Fewer than :data:`WARN_FRACTION` of the spots on tissue (real slides show 95-99.5%)."""
        return self.frac_on_tissue < WARN_FRACTION


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


def decide(declared: Placement, frac: float, others: Mapping[str, tuple[Placement, float]]) -> str | None:
    """Why the declared placement is blocked, or None when it passes.

    ``frac`` is the declared placement's on-tissue fraction, ``others`` each other
    placement tried with its fraction. Correctly placed real slides show 95-99.5% of
    their in-tissue spots on the mask (a torn or folded edge or faint tissue costs a few
    points); coordinates scaled for another image put almost none there (0-5% on the
    DLPFC 151676, mouse embryo, human heart and demo images). So:

    * another placement fits clearly better when it puts at least
      :data:`BETTER_FIT_MARGIN` (10 points) more of the spots on tissue than the declared
      one and is itself a plausible fit (at least :data:`FLOOR_FRACTION`). As fractions
      stop at 1, this needs the declared one below 90%. On the correctly placed samples
      no placement beats the declared one (x and y swapped comes closest, 5-36 points
      below, because tissue fills much of a square capture area); 10 points is several
      binomial standard errors even for a 100-spot slide, while a 15-point margin would
      let DLPFC 151676 with x and y swapped through (87% against 99%).
    * the declared placement is blocked below :data:`FLOOR_FRACTION` (60%) whatever fits
      best: that leaves 40% of the spots Space Ranger called in tissue on glass, far more
      than tears or pale staining do, and still far above the near-zero of a wrong scale.

    Everything from the floor up passes here; below :data:`WARN_FRACTION` the asset's
    separate warning check reports it.
    """
    best = max(others, key=lambda k: others[k][1]) if others else None
    if best is not None and others[best][1] >= max(FLOOR_FRACTION, frac + BETTER_FIT_MARGIN):
        placement, better = others[best]
        if placement.swap:
            return (
                f"coordinates fit with x and y swapped ({better:.1%} on tissue) better than as given "
                f"({frac:.1%}) with {declared.label}: are the positions file's columns swapped?"
            )
        return (
            f"coordinates fit {placement.label} ({better:.1%} on tissue) better than "
            f"{declared.label} ({frac:.1%}): are they scaled for another image?"
        )
    if frac < FLOOR_FRACTION:
        alternative = (
            f"; no other placement fits better (best: {others[best][0].label}, {others[best][1]:.1%})"
            if best is not None else ""
        )
        return (
            f"only {frac:.1%} of the spots fall on tissue with {declared.label}, far below the "
            f"95-99.5% of real slides{alternative}: are the coordinates shifted, or is the image "
            "from another slide?"
        )
    return None


def check_spots_on_tissue(
    image_path: str | Path,
    spatial_fullres: np.ndarray,
    scale: float,
    spot_diameter_fullres: float,
    image_name: str = "image",
    scales: Mapping[str, float] | None = None,
) -> TissueCheck:
    """Map full-res spot coordinates with ``scale`` into the image and test tissue overlap.

    The tissue mask comes from the image alone (:func:`tissue_mask` on a strided copy of
    at most ~1 Mpx, so a full-resolution TIFF is never decoded whole); a spot is on tissue
    when its centre is inside the image and on the mask, which is built from saturation
    averaged over one spot footprint, so a spot is judged by what lies under it, not by a
    single pixel. ``scales`` are the slide's named scale factors (:func:`slide_scales`);
    every placement of :func:`placements` is scored the same way (each with a mask
    smoothed for its own spot size) and :func:`decide` blocks or passes. An image without
    saturation contrast (a flat placeholder) fails outright.
    """
    coords = np.asarray(spatial_fullres, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2 or len(coords) == 0:
        raise ValueError(f"{image_path}: spot coordinates must be (n>0, 2), got {coords.shape}")
    declared, tried = placements(image_name, scale, dict(scales or {}))
    img = LazyImage.open(image_path)
    n = len(coords)

    def in_bounds(xy: np.ndarray) -> np.ndarray:
        return (xy[:, 0] >= 0) & (xy[:, 0] < img.width) & (xy[:, 1] >= 0) & (xy[:, 1] < img.height)

    inside = in_bounds(coords * scale)
    result = dict(
        image=image_name, path=str(image_path), scale=float(scale), n_spots=n,
        frac_in_bounds=float(inside.mean()), declared_scale=declared,
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

    masks: dict[float, tuple[np.ndarray, float]] = {}

    def mask_for(factor: float) -> tuple[np.ndarray, float]:
        if factor not in masks:
            footprint = min(spot_diameter_fullres * factor / step, min(sat.shape) * MAX_FOOTPRINT_FRACTION)
            masks[factor] = tissue_mask(sat, footprint)
        return masks[factor]

    def on_tissue(p: Placement) -> float:
        xy = (coords[:, ::-1] if p.swap else coords) * p.factor
        ok = in_bounds(xy)
        if not ok.any():
            return 0.0
        mask, _ = mask_for(p.factor)
        rows = np.clip((xy[ok, 1] / step).astype(int), 0, mask.shape[0] - 1)
        cols = np.clip((xy[ok, 0] / step).astype(int), 0, mask.shape[1] - 1)
        return float(mask[rows, cols].sum()) / n

    fractions = {p.key: (p, on_tissue(p)) for p in tried}
    frac = fractions[declared][1]
    others = {k: v for k, v in fractions.items() if k != declared}
    problem = decide(fractions[declared][0], frac, others)
    if problem is not None:
        problem = f"{img.width}x{img.height} image, {n} spots ({inside.mean():.1%} inside it): {problem}"
    best = max(fractions, key=lambda k: fractions[k][1])  # the declared placement is first: it wins ties
    return TissueCheck(
        **result, frac_on_tissue=frac, threshold=mask_for(scale)[1], passed=problem is None,
        problem=problem,
        **{f"frac_on_tissue_{k}": f for k, (_, f) in fractions.items() if k in PLACEMENT_KEYS},
        best_fit=best, frac_on_tissue_best_fit=fractions[best][1],
    )


def check_slide_images(adata, slide_id: str) -> list[TissueCheck]:
    """Run :func:`check_spots_on_tissue` for every image a slide has, in-tissue spots only,
    each with that image's own scale factor declared and the slide's others as candidates."""
    from .io import image_scale

    info = adata.uns["spatial"][slide_id]
    factors = info["scalefactors"]
    paths = dict(info["metadata"]["image_paths"])
    if not paths:
        raise ValueError(f"slide '{slide_id}': no image to check the spot coordinates against")
    mask = np.asarray(adata.obs["in_tissue"]) == 1 if "in_tissue" in adata.obs else slice(None)
    coords = np.asarray(adata.obsm["spatial"])[mask]
    scales = slide_scales(factors)
    return [
        check_spots_on_tissue(
            path, coords, image_scale(name, factors), factors["spot_diameter_fullres"],
            image_name=name, scales=scales,
        )
        for name, path in sorted(paths.items())
    ]
