"""Read the lab's old embedding cache so past GPU hours become platform assets.

The old ``run_benchmark.py`` cache kept one array per slide and encoder::

    embeddings_cache/
      <slide_id>/
        gene_<encoder>.npz | .npy                 encoder: pca, mlp, scgpt
        vision_<encoder>_<variant>.npz | .npy     variant: standard, freq, staig_strict
        vision_<encoder>.npz | .npy               (no variant = standard)

An ``.npz`` holds the values under ``embeddings`` (or ``values``, or as its only array)
and may hold the spot barcodes under ``barcodes`` / ``obs_names`` / ``spot_ids``; an
``.npy`` is the bare (n_spots, d) array in the slide's spot order. Values are taken
exactly as stored (they were cached raw, before normalization).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fileio import file_sha256
from .store import SpotEmbedding

VALUE_KEYS = ("embeddings", "values", "embedding", "X")
BARCODE_KEYS = ("barcodes", "obs_names", "spot_ids")
_NAME = re.compile(r"^(?P<modality>gene|vision)_(?P<rest>[A-Za-z0-9_]+)$")


@dataclass
class CacheEntry:
    slide_id: str
    path: Path
    modality: str
    encoder: str
    variant: str  # "" for gene embeddings

    @property
    def asset_name(self) -> str:
        return f"gene_{self.encoder}" if self.modality == "gene" else f"vision_{self.encoder}_{self.variant}"


@dataclass
class CacheScan:
    entries: list[CacheEntry] = field(default_factory=list)
    unrecognised: list[tuple[Path, str]] = field(default_factory=list)


def parse_entry(slide_id: str, path: Path, variants: tuple[str, ...]) -> CacheEntry:
    match = _NAME.match(path.stem)
    if match is None:
        raise ValueError(f"{path}: name is not gene_<encoder> or vision_<encoder>[_<variant>]")
    modality, rest = match["modality"], match["rest"]
    if modality == "gene":
        return CacheEntry(slide_id, path, "gene", rest, "")
    for variant in sorted(variants, key=len, reverse=True):
        if rest.endswith(f"_{variant}"):
            return CacheEntry(slide_id, path, "vision", rest[: -len(variant) - 1], variant)
    return CacheEntry(slide_id, path, "vision", rest, "standard")


def scan_cache(root: Path, variants: tuple[str, ...]) -> CacheScan:
    """Every ``<slide>/<name>.npz|.npy`` under ``root``; other files are listed as unrecognised."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"embedding cache {root} is not a directory")
    scan = CacheScan()
    for slide_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(p for p in slide_dir.iterdir() if p.is_file()):
            if path.suffix not in (".npz", ".npy"):
                scan.unrecognised.append((path, "not .npz/.npy"))
                continue
            try:
                scan.entries.append(parse_entry(slide_dir.name, path, variants))
            except ValueError as err:
                scan.unrecognised.append((path, str(err).split(": ", 1)[1]))
    for path in sorted(p for p in root.iterdir() if p.is_file()):
        scan.unrecognised.append((path, "file outside a <slide_id>/ folder"))
    return scan


def _read_arrays(path: Path, where: str) -> tuple[np.ndarray, list[str] | None]:
    if path.suffix == ".npy":
        return np.load(path, allow_pickle=False), None
    with np.load(path, allow_pickle=False) as data:
        names = list(data.files)
        value_key = next((k for k in VALUE_KEYS if k in names), None)
        if value_key is None:
            arrays = [k for k in names if k not in BARCODE_KEYS]
            if len(arrays) != 1:
                raise ValueError(f"{where}: no array named {'/'.join(VALUE_KEYS)} and {len(arrays)} candidates {arrays}")
            value_key = arrays[0]
        barcode_key = next((k for k in BARCODE_KEYS if k in names), None)
        barcodes = data[barcode_key].astype(str).tolist() if barcode_key else None
        return data[value_key], barcodes


def load_entry(entry: CacheEntry, slide_obs_names: list[str]) -> tuple[SpotEmbedding, dict]:
    """The cached array aligned to the slide's spots, and how it was aligned.

    With barcodes the rows are reordered to the slide's order (every slide spot must be
    present); without, the row count must equal the slide's spot count and the order is
    taken as the slide's own (recorded, since it cannot be checked).
    """
    where = f"{entry.path} (slide {entry.slide_id})"
    values, barcodes = _read_arrays(entry.path, where)
    if values.ndim != 2 or values.shape[1] == 0:
        raise ValueError(f"{where}: expected a (n_spots, d) array, got shape {values.shape}")
    if not np.issubdtype(values.dtype, np.number):
        raise ValueError(f"{where}: values have dtype {values.dtype}, expected numbers")
    if not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).any(axis=1).sum())
        raise ValueError(f"{where}: {bad} of {values.shape[0]} rows have NaN/inf values")
    if barcodes is not None:
        if len(barcodes) != values.shape[0]:
            raise ValueError(f"{where}: {len(barcodes)} barcodes for {values.shape[0]} rows")
        index = {b: i for i, b in enumerate(barcodes)}
        missing = [b for b in slide_obs_names if b not in index]
        if missing:
            raise ValueError(
                f"{where}: {len(missing)} of the slide's {len(slide_obs_names)} spots are not in the cache "
                f"(first: {missing[:3]})"
            )
        values = values[[index[b] for b in slide_obs_names]]
        alignment = "by barcode"
    else:
        if values.shape[0] != len(slide_obs_names):
            raise ValueError(
                f"{where}: {values.shape[0]} rows but the slide has {len(slide_obs_names)} spots, and the file "
                "has no barcodes to align them"
            )
        alignment = "row order assumed = slide spot order (no barcodes in file)"
    info = {
        "encoder": entry.encoder,
        "modality": entry.modality,
        "variant": entry.variant,
        "weights": "unknown (imported from old cache)",
        "source": "imported",
        "source_file": str(entry.path),
        "source_sha256": file_sha256(entry.path),
        "alignment": alignment,
        "config": "unknown",
        "profile": "imported",
        "device": "unknown",
        "seconds": 0.0,
    }
    return SpotEmbedding(values, list(slide_obs_names), info), info
