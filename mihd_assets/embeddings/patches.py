"""Spot patches read lazily from a slide image, as a torch ``Dataset``.

Coordinates are always full-resolution pixels (``obsm["spatial"]``: x = column, y = row)
and the patch side is always given in full-resolution pixels; the dataset maps both into
the image it reads with that image's own scale factor (a full-res image addressed with
hires-scaled coordinates makes every patch miss the tissue). Windows are read tile by
tile (zarr over the TIFF), so a full-resolution image is never decoded whole, and every
DataLoader worker opens its own handle.

Variants:

* ``standard``: the window around each spot, resized to the encoder's input size;
* ``freq``: the same window through STAIG's filter (:func:`staig_filter`: grayscale,
  Gaussian blur, FFT low-pass), replicated to three channels;
* ``staig_strict``: STAIG's own window, 3.5 x 144 = 504 full-res px resized to 512 px,
  through the same filter, then resized to the encoder's input size.

Both filtered variants run the filter at STAIG's 512 px so its blur widths and cut-off
mean the same thing whatever the window size.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from ..slides.coords import LazyImage, to_rgb
from ..slides.io import image_scale

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
VARIANTS = ("standard", "freq", "staig_strict")

# STAIG crops 3.5 x the 144 px fiducial diameter around each spot and works at 512 px.
STAIG_WINDOW_FULLRES = 3.5 * 144
STAIG_FILTER_SIZE = 512
# STAIG keeps the centred square [245, 275) of the 512 px spectrum: about 15 cycles per
# patch on either side of zero.
STAIG_LOWPASS_CUTOFF = 15.0
# cv2.GaussianBlur with kernel k and sigma 0 uses sigma = 0.3 * ((k - 1) / 2 - 1) + 0.8;
# STAIG blurs with k = 5 before the FFT and k = 15 after it. (sigma, radius) in px at 512.
STAIG_PRE_BLUR = (1.1, 2)
STAIG_POST_BLUR = (2.6, 7)
# Below this many image pixels a window carries no usable texture.
MIN_WINDOW_PX = 4
# ITU-R BT.601 luma weights, as cv2's RGB -> gray conversion.
LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


class PatchImageError(ValueError):
    """The image a patch dataset reads is missing, unreadable or does not fit the spots."""


def spot_pitch(spots_fullres: np.ndarray) -> float:
    """Spot-to-spot distance in full-res px: median nearest-neighbour distance.

    On a Visium grid this is the centre-to-centre pitch (100 um), a natural patch side.
    """
    from scipy.spatial import cKDTree

    coords = _as_coords(spots_fullres)
    if len(coords) < 2:
        raise ValueError(f"spot pitch needs at least 2 spots, got {len(coords)}")
    dist, _ = cKDTree(coords).query(coords, k=2)
    nearest = dist[:, 1]
    nearest = nearest[nearest > 0]
    if len(nearest) == 0:
        raise ValueError(f"all {len(coords)} spots share one position; cannot derive a spot pitch")
    return float(np.median(nearest))


def highest_resolution_image(image_paths: dict[str, str], scalefactors: dict) -> tuple[str, Path, float]:
    """(name, path, scale) of the image patches should come from: full-res TIFF, else hires.

    ``image_paths`` and ``scalefactors`` are the slide's
    ``uns["spatial"][slide]["metadata"]["image_paths"]`` and ``["scalefactors"]``.
    """
    for name in ("fullres", "hires"):
        if name in image_paths:
            return name, Path(image_paths[name]), image_scale(name, scalefactors)
    raise PatchImageError(
        f"no full-resolution or hires image to cut patches from (images: {sorted(image_paths) or 'none'})"
    )


def fft_lowpass(gray: np.ndarray, cutoff: float) -> np.ndarray:
    """Keep spatial frequencies up to ``cutoff`` cycles per image along each axis.

    A square pass band centred on zero, as STAIG's mask. It is symmetric (STAIG's
    [245, 275) is 4 bins off-centre, hence its ``abs`` of a complex result), so the
    output is real.
    """
    if cutoff <= 0:
        raise ValueError(f"low-pass cutoff must be positive (cycles per image), got {cutoff}")
    h, w = gray.shape
    fy = np.abs(np.fft.fftfreq(h) * h)
    fx = np.fft.rfftfreq(w) * w  # the non-negative half: the band is symmetric, the input real
    keep = (fy[:, None] <= cutoff) & (fx[None, :] <= cutoff)
    return np.fft.irfft2(np.fft.rfft2(gray) * keep, s=(h, w)).astype(np.float32)


def staig_filter(rgb: np.ndarray, cutoff: float = STAIG_LOWPASS_CUTOFF) -> np.ndarray:
    """STAIG's patch filter on an (h, w, 3) float RGB image in [0, 1] (meant for 512 px):
    grayscale -> Gaussian blur -> FFT low-pass -> Gaussian blur. Returns (h, w) in [0, 1];
    low-pass ringing below 0 or above 1 is clipped."""
    return staig_filter_gray(rgb @ LUMA, cutoff)


def staig_filter_gray(gray: np.ndarray, cutoff: float = STAIG_LOWPASS_CUTOFF) -> np.ndarray:
    """:func:`staig_filter` from the grayscale (h, w) image on."""
    from scipy.ndimage import gaussian_filter

    # mode "mirror" is cv2's default border (BORDER_REFLECT_101).
    gray = gaussian_filter(gray, sigma=STAIG_PRE_BLUR[0], radius=STAIG_PRE_BLUR[1], mode="mirror")
    gray = fft_lowpass(gray, cutoff)
    gray = gaussian_filter(gray, sigma=STAIG_POST_BLUR[0], radius=STAIG_POST_BLUR[1], mode="mirror")
    return np.clip(gray, 0.0, 1.0)


def _as_coords(spots_fullres: np.ndarray) -> np.ndarray:
    coords = np.asarray(spots_fullres, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[1] != 2:
        raise ValueError(f"spot coordinates must be (n, 2) full-res (x, y), got shape {coords.shape}")
    if not np.isfinite(coords).all():
        raise ValueError(f"{int((~np.isfinite(coords)).any(axis=1).sum())} spot coordinates are not finite")
    return coords


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """(c, h, w) float -> (c, size, size); antialiased so downscaling does not alias."""
    if image.shape[-2:] == (size, size):
        return image
    return F.interpolate(image[None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[0]


def open_image(path: str | Path) -> LazyImage:
    """Open an image for windowed reading; errors name the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file does not exist")
    try:
        image = LazyImage.open(path)
    except Exception as exc:  # tifffile / zarr / PIL each raise their own types
        raise PatchImageError(f"{path}: unreadable image ({type(exc).__name__}: {exc})") from exc
    if not (len(image.shape) == 2 or (len(image.shape) == 3 and image.shape[2] in (3, 4))):
        raise PatchImageError(f"{path}: expected a (rows, cols[, 3|4]) image, got shape {image.shape}")
    return image


class SpotPatchDataset(Dataset):
    """One normalized (3, input_size, input_size) float tensor per spot.

    ``scale`` maps full-res coordinates into ``image_path`` (1.0 for the full-res TIFF,
    ``tissue_hires_scalef`` for the hires PNG). ``patch_side_fullres`` defaults to
    :func:`spot_pitch`; ``staig_strict`` always uses STAIG's 504 px. Windows that reach
    past the image border are padded with white and counted in ``n_padded``.
    """

    def __init__(
        self,
        image_path: str | Path,
        spots_fullres: np.ndarray,
        scale: float,
        input_size: int,
        mean: tuple[float, float, float] = IMAGENET_MEAN,
        std: tuple[float, float, float] = IMAGENET_STD,
        patch_side_fullres: float | None = None,
        variant: str = "standard",
        lowpass_cutoff: float = STAIG_LOWPASS_CUTOFF,
    ):
        if variant not in VARIANTS:
            raise ValueError(f"unknown patch variant {variant!r}; expected one of {VARIANTS}")
        coords = _as_coords(spots_fullres)
        if len(coords) == 0:
            raise ValueError(f"{image_path}: no spots to cut patches for")
        if not scale > 0:
            raise ValueError(f"{image_path}: scale factor must be positive, got {scale}")
        if variant == "staig_strict":
            if patch_side_fullres is not None and patch_side_fullres != STAIG_WINDOW_FULLRES:
                raise ValueError(
                    f"staig_strict uses STAIG's {STAIG_WINDOW_FULLRES:g} full-res px window; "
                    f"got patch_side_fullres={patch_side_fullres}"
                )
            patch_side_fullres = STAIG_WINDOW_FULLRES
        elif patch_side_fullres is None:
            patch_side_fullres = spot_pitch(coords)
        if not patch_side_fullres > 0:
            raise ValueError(f"patch side must be positive (full-res px), got {patch_side_fullres}")

        self.image_path = Path(image_path)
        self.variant = variant
        self.scale = float(scale)
        self.input_size = int(input_size)
        self.patch_side_fullres = float(patch_side_fullres)
        self.lowpass_cutoff = float(lowpass_cutoff)
        self._mean = torch.tensor(mean, dtype=torch.float32)[:, None, None]
        self._std = torch.tensor(std, dtype=torch.float32)[:, None, None]

        image = open_image(self.image_path)
        self._image: LazyImage | None = image
        self._pid: int | None = os.getpid()
        self.image_height, self.image_width = image.height, image.width

        self.window_px = int(round(self.patch_side_fullres * self.scale))
        if self.window_px < MIN_WINDOW_PX:
            raise PatchImageError(
                f"{self.image_path}: a {self.patch_side_fullres:g} full-res px patch is only "
                f"{self.window_px} px in this image (scale {self.scale:g}); need at least {MIN_WINDOW_PX}"
            )
        centres = coords * self.scale
        outside = (
            (centres[:, 0] < 0) | (centres[:, 0] >= self.image_width)
            | (centres[:, 1] < 0) | (centres[:, 1] >= self.image_height)
        )
        if outside.any():
            first = int(np.flatnonzero(outside)[0])
            raise PatchImageError(
                f"{self.image_path}: {int(outside.sum())} of {len(coords)} spot centres fall outside the "
                f"{self.image_width}x{self.image_height} image with scale {self.scale:g} (first: spot {first} "
                f"at full-res {tuple(coords[first])}); are the coordinates scaled for another image?"
            )
        # Top-left pixel of each window, so that the window's centre pixel is the spot's.
        self._origins = np.floor(centres - (self.window_px - 1) / 2 + 0.5).astype(np.int64)
        end = self._origins + self.window_px
        self.padded = (
            (self._origins < 0).any(axis=1)
            | (end[:, 0] > self.image_width)
            | (end[:, 1] > self.image_height)
        )

    def __len__(self) -> int:
        return len(self._origins)

    @property
    def n_padded(self) -> int:
        return int(self.padded.sum())

    def describe(self) -> dict:
        """What this dataset reads, for asset metadata."""
        return {
            "image_path": str(self.image_path),
            "image_px": [self.image_height, self.image_width],
            "scale": self.scale,
            "variant": self.variant,
            "patch_side_fullres": self.patch_side_fullres,
            "window_px": self.window_px,
            "input_size": self.input_size,
            "lowpass_cutoff": self.lowpass_cutoff if self.variant != "standard" else None,
            "n_spots": len(self),
            "n_padded": self.n_padded,
        }

    def __getstate__(self) -> dict:
        # Image handles (open TIFF files, zarr stores) stay in the process that opened them.
        state = self.__dict__.copy()
        state["_image"] = None
        state["_pid"] = None
        return state

    def _handle(self) -> LazyImage:
        # A forked worker inherits the parent's handle; give it its own file position.
        if self._image is None or self._pid != os.getpid():
            self._image = open_image(self.image_path)
            self._pid = os.getpid()
        return self._image

    def window(self, index: int) -> np.ndarray:
        """The raw (window_px, window_px, 3) float RGB window in [0, 1], white outside the image."""
        x0, y0 = (int(v) for v in self._origins[index])
        side = self.window_px
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + side, self.image_width), min(y0 + side, self.image_height)
        handle = self._handle()
        try:
            block = handle.window(ya, yb, xa, xb)
        except Exception as exc:  # a damaged tile surfaces only when it is read
            raise PatchImageError(
                f"{self.image_path}: cannot read window rows {ya}:{yb}, cols {xa}:{xb} for spot {index} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        canvas = np.ones((side, side, 3), dtype=np.float32)
        canvas[ya - y0 : yb - y0, xa - x0 : xb - x0] = to_rgb(block)
        return canvas

    def patches(self, index: int, sizes: Sequence[int]) -> list[torch.Tensor]:
        """Spot ``index``'s unnormalized (3, s, s) patch at each size in ``sizes``: the window is
        read, and for the filtered variants filtered, once for all of them."""
        window = self.window(index)
        if self.variant == "standard":
            chw = torch.from_numpy(np.ascontiguousarray(window.transpose(2, 0, 1)))
            return [_resize(chw, size) for size in sizes]
        # Grayscale first, then resize to STAIG's 512 px: both are linear, so the order does
        # not change the result, and one channel resizes three times faster than three.
        big = _resize(torch.from_numpy(window @ LUMA)[None], STAIG_FILTER_SIZE)[0].numpy()
        gray = torch.from_numpy(staig_filter_gray(big, self.lowpass_cutoff))[None]
        return [_resize(gray, size).expand(3, -1, -1) for size in sizes]

    def __getitem__(self, index: int) -> torch.Tensor:
        (patch,) = self.patches(index, (self.input_size,))
        return (patch - self._mean) / self._std


class PatchView(NamedTuple):
    """How one encoder wants its patches: input side in px and per-channel normalization."""

    input_size: int
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD


class SharedPatchDataset(SpotPatchDataset):
    """The patches of one variant for several encoders at once: item ``i`` is a tuple with one
    normalized (3, s, s) tensor per view, in the order of ``views``. Each window is read and
    filtered once, then resized per distinct input size, so every view equals what a
    :class:`SpotPatchDataset` of that view alone returns, value for value."""

    def __init__(self, image_path: str | Path, spots_fullres: np.ndarray, scale: float,
                 views: Sequence[PatchView], **kwargs):
        views = [PatchView(int(v.input_size), tuple(v.mean), tuple(v.std)) for v in views]
        if not views:
            raise ValueError(f"{image_path}: a shared patch dataset needs at least one view")
        first = views[0]
        super().__init__(image_path, spots_fullres, scale, first.input_size, first.mean, first.std, **kwargs)
        self.views = views
        self._sizes = sorted({v.input_size for v in views})
        self._norms = [(torch.tensor(v.mean, dtype=torch.float32)[:, None, None],
                        torch.tensor(v.std, dtype=torch.float32)[:, None, None]) for v in views]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, ...]:
        by_size = dict(zip(self._sizes, self.patches(index, self._sizes)))
        return tuple((by_size[v.input_size] - mean) / std for v, (mean, std) in zip(self.views, self._norms))

    def describe(self) -> dict:
        described = super().describe()
        del described["input_size"]
        return {**described, "input_sizes": self._sizes}


def make_loader(
    dataset: Dataset,
    batch_size: int = 64,
    num_workers: int = 0,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> DataLoader:
    """An in-order DataLoader; with workers they persist and prefetch so the GPU stays fed."""
    if batch_size < 1 or num_workers < 0:
        raise ValueError(f"batch_size must be >= 1 and num_workers >= 0, got {batch_size}, {num_workers}")
    extra = {"persistent_workers": True, "prefetch_factor": prefetch_factor} if num_workers > 0 else {}
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=False,
        drop_last=False,
        num_workers=num_workers,
        pin_memory=pin_memory,
        **extra,
    )


def patch_array(image_path: str | Path, spots_fullres: np.ndarray, scale: float, size: int) -> np.ndarray:
    """Every spot's standard patch as one (n, 3, size, size) float32 array in [0, 1]
    (unnormalized), through the same lazy reader and coordinate scaling as the encoders."""
    dataset = SpotPatchDataset(image_path, spots_fullres, scale, size, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
    loader = make_loader(dataset, batch_size=256, num_workers=0, pin_memory=False)
    return torch.cat(list(loader)).numpy().astype(np.float32)
