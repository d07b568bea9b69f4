"""Tile discovery, channel pairing and reading for two-channel immunofluorescence tiles.

A tile is a pair of single-channel TIFFs ``<stem>_b<k>c0.tif`` (DAPI) and
``<stem>_b<k>c1.tif`` (marker) in one donor folder. Only names ending in ``.tif`` or
``.tiff`` are image files (a ``*_metadata.xml`` file read as a TIFF once crashed a full
inference run); a tile whose partner channel is missing, or whose files cannot be read,
is a recorded skip with the reason, never a crash of the donor.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile

from mihd_resources import settings
from mihd_resources.storage import InvalidPartitionKey, validate_partition_key

TIFF_SUFFIXES = (".tif", ".tiff")
CHANNEL_NAME = re.compile(r"^(?P<stem>.+)_b(?P<block>\d+)c(?P<channel>\d+)$")
# `<projid>_<MARKER>_<n>`: the marker is the second-to-last underscore-separated token.
MARKER_NAME = re.compile(r"_(?P<marker>[A-Za-z0-9-]+)_[^_]+$")
DAPI_CHANNEL, MARKER_CHANNEL = "0", "1"


def annotations_root() -> Path:
    """Instance masks of the annotated tiles (``MIHD_ANNOTATIONS_ROOT``; default beside the tiles)."""
    env = os.environ.get("MIHD_ANNOTATIONS_ROOT")
    return Path(env).resolve() if env else settings.tiles_root().parent / "annotations"


def scan_donors(tiles_root: str | Path) -> tuple[list[str], list[str]]:
    """(valid donor folder names, refusal messages) under ``tiles_root``."""
    root = Path(tiles_root)
    if not root.is_dir():
        return [], [f"tiles root {root} does not exist"]
    valid, refused = [], []
    for entry in sorted(root.iterdir()):
        if not entry.is_dir():
            continue
        try:
            valid.append(validate_partition_key(entry.name))
        except InvalidPartitionKey as err:
            refused.append(f"{entry}: {err}")
    return valid, refused


@dataclass(frozen=True)
class TilePair:
    donor: str
    stem: str  # file name without the channel token, e.g. 10001234_GFAP_3_b0
    marker: str
    dapi_path: Path
    marker_path: Path


@dataclass(frozen=True)
class SkippedTile:
    donor: str
    file: str
    reason: str

    def as_row(self) -> dict:
        return {"donor_id": self.donor, "file": self.file, "reason": self.reason}


def marker_of(stem: str) -> str:
    found = MARKER_NAME.search(stem)
    return found.group("marker") if found else "unknown"


def is_tiff_name(path: Path) -> bool:
    return path.suffix.lower() in TIFF_SUFFIXES


def discover_tiles(donor_dir: str | Path, donor: str | None = None) -> tuple[list[TilePair], list[SkippedTile]]:
    """Pair the channel files of one donor folder; other TIFFs and unpaired channels are skips."""
    donor_dir = Path(donor_dir)
    donor = donor or donor_dir.name
    if not donor_dir.is_dir():
        raise FileNotFoundError(f"donor {donor}: tile folder {donor_dir} does not exist")
    channels: dict[str, dict[str, Path]] = {}
    skipped: list[SkippedTile] = []
    for path in sorted(p for p in donor_dir.iterdir() if p.is_file() and is_tiff_name(p)):
        found = CHANNEL_NAME.match(path.stem)
        if not found:
            skipped.append(SkippedTile(donor, path.name, "TIFF name has no _b<k>c<n> channel token"))
            continue
        key = f"{found.group('stem')}_b{found.group('block')}"
        channels.setdefault(key, {})[found.group("channel")] = path
    pairs = []
    for stem, found in sorted(channels.items()):
        extra = sorted(set(found) - {DAPI_CHANNEL, MARKER_CHANNEL})
        for channel in extra:
            skipped.append(SkippedTile(donor, found[channel].name, f"channel c{channel} is neither DAPI (c0) nor marker (c1)"))
        missing = [c for c in (DAPI_CHANNEL, MARKER_CHANNEL) if c not in found]
        if missing:
            present = [found[c].name for c in (DAPI_CHANNEL, MARKER_CHANNEL) if c in found]
            skipped.append(SkippedTile(donor, present[0], f"missing channel file(s) c{', c'.join(missing)} for tile {stem}"))
            continue
        pairs.append(TilePair(donor, stem, marker_of(stem.rsplit("_b", 1)[0]), found[DAPI_CHANNEL], found[MARKER_CHANNEL]))
    return pairs, skipped


class TileReadError(ValueError):
    """A tile's files exist but are not a usable pair of 2-D images; ``file`` is the one at fault."""

    def __init__(self, file: str, message: str):
        super().__init__(message)
        self.file = file


def _read_plane(path: Path) -> np.ndarray:
    try:
        array = tifffile.imread(path)
    except (tifffile.TiffFileError, OSError, ValueError, EOFError) as err:
        raise TileReadError(path.name, f"{path.name}: unreadable TIFF ({type(err).__name__}: {err})") from err
    if array.size == 0:
        raise TileReadError(path.name, f"{path.name}: unreadable TIFF (no image data; truncated or not a TIFF)")
    array = np.squeeze(array)
    if array.ndim != 2:
        raise TileReadError(path.name, f"{path.name}: expected one 2-D channel, got shape {array.shape}")
    if not np.issubdtype(array.dtype, np.number):
        raise TileReadError(path.name, f"{path.name}: non-numeric pixel type {array.dtype}")
    if not np.isfinite(array).all():
        raise TileReadError(path.name, f"{path.name}: non-finite pixel values")
    return array


def read_pair(pair: TilePair) -> tuple[np.ndarray, np.ndarray]:
    """(DAPI, marker) as float32 2-D arrays of the same shape."""
    dapi, marker = _read_plane(pair.dapi_path), _read_plane(pair.marker_path)
    if dapi.shape != marker.shape:
        raise TileReadError(
            pair.marker_path.name,
            f"{pair.stem}: DAPI {pair.dapi_path.name} is {dapi.shape} but marker {pair.marker_path.name} is {marker.shape}"
        )
    return dapi.astype(np.float32), marker.astype(np.float32)


def cellpose_image(dapi: np.ndarray, marker: np.ndarray, use_dapi: bool = True) -> np.ndarray:
    """The Cellpose training/eval format ``[DAPI, marker, 0]`` (channel first); without DAPI
    (the `marker_only` model) the DAPI channel is zero."""
    nucleus = dapi if use_dapi else np.zeros_like(dapi)
    return np.stack([nucleus, marker, np.zeros_like(dapi)]).astype(np.float32)
