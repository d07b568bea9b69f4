"""Training sets: random subsets of spots with canonical target coordinates.

A target is the set's intrinsic geometry, not its position on the slide: the centred Gram
matrix ``G = Xc Xc^T`` of the set's coordinates is factored into its top-D eigenpairs,
``V = U sqrt(Lambda)``. ``V`` is invariant to where the set lay on the slide and how the
slide was rotated; each axis's sign is fixed by a positive third moment so that the same
shape always gets the same coordinates (the eigen-solver's sign is arbitrary, and an
arbitrary sign makes the denoiser's mean prediction shrink towards zero).

Coordinates are first put in *slide units*: centred and divided by the slide's RMS radius,
so slides scanned at different resolutions share one scale and ``sigma_data`` means the
same thing on every slide.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fileio import atomic_path


class GeometryInputError(ValueError):
    """Input that cannot become a geometry training set; the message names it."""


def slide_units(coords: np.ndarray, slide_id: str = "?") -> tuple[np.ndarray, float]:
    """Centre ``(n, 2)`` coordinates and divide by their RMS radius; returns (coords, radius)."""
    coords = np.asarray(coords, dtype=np.float64)
    if coords.ndim != 2 or coords.shape[0] < 2:
        raise GeometryInputError(f"slide {slide_id}: need an (n >= 2, d) coordinate array, got shape {coords.shape}")
    if not np.isfinite(coords).all():
        raise GeometryInputError(f"slide {slide_id}: {int((~np.isfinite(coords)).sum())} non-finite coordinates")
    centred = coords - coords.mean(axis=0)
    radius = float(np.sqrt((centred**2).sum(axis=1).mean()))
    if radius <= 0:
        raise GeometryInputError(f"slide {slide_id}: all {coords.shape[0]} spots share one position")
    return centred / radius, radius


def canonical_coordinates(points: np.ndarray, dims: int = 2) -> np.ndarray:
    """Top-``dims`` factor of the centred Gram matrix, ``V = U sqrt(Lambda)``, centred, sign-fixed.

    Works for any embedding of the points (2-D coordinates, or a prediction): the Gram
    matrix forgets rotation and translation, so equal shapes give equal ``V``.
    """
    points = np.asarray(points, dtype=np.float64)
    n = points.shape[0]
    if points.ndim != 2 or n < 2:
        raise GeometryInputError(f"canonical_coordinates: need an (n >= 2, d) array, got shape {points.shape}")
    centred = points - points.mean(axis=0)
    gram = centred @ centred.T
    evals, evecs = np.linalg.eigh(gram)
    order = np.argsort(evals)[::-1][:dims]
    lam = np.clip(evals[order], 0.0, None)
    v = evecs[:, order] * np.sqrt(lam)[None, :]
    if v.shape[1] < dims:
        v = np.pad(v, ((0, 0), (0, dims - v.shape[1])))
    v -= v.mean(axis=0)
    return _fix_signs(v)


def _fix_signs(v: np.ndarray) -> np.ndarray:
    """Flip each axis so its third moment is positive (ties: the largest |value| is positive)."""
    third = (v**3).sum(axis=0)
    tie_break = v[np.abs(v).argmax(axis=0), np.arange(v.shape[1])]
    sign = np.where(np.abs(third) > 1e-12, np.sign(third), np.sign(tie_break))
    sign[sign == 0] = 1.0
    return v * sign[None, :]


def sample_sets(
    n_spots: int, n_sets: int, size_min: int, size_max: int, rng: np.random.Generator
) -> list[np.ndarray]:
    """``n_sets`` random subsets of ``range(n_spots)``, each of a size drawn from [size_min, size_max]
    (clamped to the slide's spot count)."""
    if size_min < 2 or size_max < size_min:
        raise GeometryInputError(f"set sizes must satisfy 2 <= size_min <= size_max, got [{size_min}, {size_max}]")
    out = []
    for _ in range(n_sets):
        size = min(int(rng.integers(size_min, size_max + 1)), n_spots)
        out.append(np.sort(rng.choice(n_spots, size=size, replace=False)))
    return out


@dataclass
class SlideData:
    """One slide as the geometry family sees it: features per spot and slide-unit coordinates."""

    slide_id: str
    split: str  # "train" or "heldout"
    features: np.ndarray  # (n_spots, d) float32, from the frozen expression encoder
    coords: np.ndarray  # (n_spots, 2) slide units
    radius_px: float  # RMS radius in the slide's coordinate units (full-resolution pixels, or an .h5ad's own units)
    obs_names: list[str]


@dataclass
class GeometrySets:
    """Sets of one split, padded: ``index[i, :size[i]]`` are spots of slide ``slide[i]``."""

    index: np.ndarray  # (n_sets, n_max) int64, -1 = padding
    size: np.ndarray  # (n_sets,) int64
    slide: np.ndarray  # (n_sets,) int64 into GeometryTrainingSet.slides
    targets: np.ndarray  # (n_sets, n_max, dims) float32, 0 = padding

    @property
    def mask(self) -> np.ndarray:
        return np.arange(self.index.shape[1])[None, :] < self.size[:, None]


def build_sets(slides: list[SlideData], which: list[int], n_sets_per_slide: int, size_min: int,
               size_max: int, dims: int, rng: np.random.Generator) -> GeometrySets:
    index, sizes, owners, targets = [], [], [], []
    for s in which:
        slide = slides[s]
        for subset in sample_sets(len(slide.obs_names), n_sets_per_slide, size_min, size_max, rng):
            index.append(subset)
            sizes.append(len(subset))
            owners.append(s)
            targets.append(canonical_coordinates(slide.coords[subset], dims))
    n_max = max(sizes)
    idx = np.full((len(index), n_max), -1, dtype=np.int64)
    tgt = np.zeros((len(index), n_max, dims), dtype=np.float32)
    for i, (subset, v) in enumerate(zip(index, targets)):
        idx[i, : len(subset)] = subset
        tgt[i, : len(subset)] = v
    return GeometrySets(idx, np.asarray(sizes, dtype=np.int64), np.asarray(owners, dtype=np.int64), tgt)


def estimate_sigma_data(sets: GeometrySets) -> float:
    """Standard deviation of the target coordinates over every real (unpadded) point."""
    values = sets.targets[sets.mask]
    return float(np.sqrt((values.astype(np.float64) ** 2).mean()))


@dataclass
class GeometryTrainingSet:
    """Everything training and evaluation need, in one file: slides, sets of both splits,
    the frozen encoder's description, and ``sigma_data`` estimated from the training targets."""

    slides: list[SlideData]
    train: GeometrySets
    heldout: GeometrySets
    dims: int
    sigma_data: float
    info: dict = field(default_factory=dict)
    # The frozen expression encoder: "kind" plus its arrays (gene list, statistics, basis).
    encoder: dict = field(default_factory=dict)

    def slide_ids(self, split: str) -> list[str]:
        return [s.slide_id for s in self.slides if s.split == split]

    def save(self, path: str | Path) -> None:
        arrays = {}
        for i, s in enumerate(self.slides):
            arrays[f"slide{i}_features"] = s.features.astype(np.float32)
            arrays[f"slide{i}_coords"] = s.coords.astype(np.float32)
            arrays[f"slide{i}_obs"] = np.asarray(s.obs_names, dtype=str)
        for split in ("train", "heldout"):
            sets: GeometrySets = getattr(self, split)
            for name in ("index", "size", "slide", "targets"):
                arrays[f"{split}_{name}"] = getattr(sets, name)
        for name, value in self.encoder.items():
            if name != "kind":
                arrays[f"encoder_{name}"] = np.asarray(value)
        header = {
            "encoder_kind": self.encoder.get("kind"),
            "dims": self.dims,
            "sigma_data": self.sigma_data,
            "slides": [{"slide_id": s.slide_id, "split": s.split, "radius_px": s.radius_px} for s in self.slides],
            "info": self.info,
        }
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, header_json=np.asarray(json.dumps(header, default=str)), **arrays)

    @classmethod
    def load(cls, path: str | Path) -> "GeometryTrainingSet":
        with np.load(path, allow_pickle=False) as data:
            header = json.loads(str(data["header_json"]))
            slides = [
                SlideData(
                    meta["slide_id"], meta["split"], data[f"slide{i}_features"], data[f"slide{i}_coords"],
                    float(meta["radius_px"]), data[f"slide{i}_obs"].tolist(),
                )
                for i, meta in enumerate(header["slides"])
            ]
            splits = {
                split: GeometrySets(*(data[f"{split}_{n}"] for n in ("index", "size", "slide", "targets")))
                for split in ("train", "heldout")
            }
            encoder = {"kind": header.get("encoder_kind")}
            encoder.update({k[len("encoder_"):]: data[k] for k in data.files if k.startswith("encoder_")})
        for name in ("genes", "gene_ids"):
            if name in encoder:
                encoder[name] = encoder[name].tolist()
        return cls(slides, splits["train"], splits["heldout"], int(header["dims"]), float(header["sigma_data"]),
                   header["info"], encoder)


def assemble_training_set(slides: list[SlideData], dims: int, n_sets_train: int, n_sets_heldout: int,
                          size_min: int, size_max: int, seed: int, info: dict | None = None) -> GeometryTrainingSet:
    """Sample the sets of both splits and estimate ``sigma_data`` from the training targets."""
    train_ids = [i for i, s in enumerate(slides) if s.split == "train"]
    heldout_ids = [i for i, s in enumerate(slides) if s.split == "heldout"]
    if not train_ids or not heldout_ids:
        raise GeometryInputError(
            f"need at least one training and one held-out slide, got train={[slides[i].slide_id for i in train_ids]} "
            f"heldout={[slides[i].slide_id for i in heldout_ids]}"
        )
    dim_set = {s.features.shape[1] for s in slides}
    if len(dim_set) != 1:
        raise GeometryInputError(f"slides have features of different widths: { {s.slide_id: s.features.shape for s in slides} }")
    rng = np.random.default_rng(seed)
    train = build_sets(slides, train_ids, -(-n_sets_train // len(train_ids)), size_min, size_max, dims, rng)
    heldout = build_sets(slides, heldout_ids, n_sets_heldout, size_min, size_max, dims, rng)
    sigma = estimate_sigma_data(train)
    return GeometryTrainingSet(slides, train, heldout, dims, sigma, dict(info or {}))
