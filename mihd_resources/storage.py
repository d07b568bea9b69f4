"""Data root (where raw slides live) and the partition-key rules for files and folders.

Every partition key that becomes part of a path (slides, donors, any dynamic partitions)
goes through :func:`validate_partition_key`, and the path it names through
:func:`path_in_root` (or both at once, :func:`partition_path`): the key must be a plain file
name, and the path must stay inside its root.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from dagster import ConfigurableResource

from .orchestration import slides_partitions

_KEY = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}")
SLIDES = slides_partitions.name


class InvalidPartitionKey(ValueError):
    """A partition key that cannot name a file or folder; the message names the key and its partitions."""


def validate_partition_key(key: str, partitions: str | None = None) -> str:
    """``key`` if it is a plain file or folder name: it starts with a letter or digit, then up to
    127 letters, digits, ``_``, ``-`` or ``.``, and has no ``..``; :class:`InvalidPartitionKey`
    naming the key and ``partitions`` (the partitions definition it belongs to) otherwise."""
    if not isinstance(key, str) or not _KEY.fullmatch(key) or ".." in key:
        of = f" of partitions {partitions!r}" if partitions else ""
        raise InvalidPartitionKey(
            f"invalid partition key {key!r}{of}: use letters, digits, '_', '-', '.'; "
            "no path separators, no '..', no spaces, at most 128 characters"
        )
    return key


def partitions_label(partitions_def) -> str:
    """How errors name a partitions definition: its name (dynamic ones), else its type."""
    if partitions_def is None:
        return "(partitions definition unknown)"
    return getattr(partitions_def, "name", None) or type(partitions_def).__name__


def path_in_root(root: str | Path, *parts: str) -> Path:
    """``root / parts``, or ValueError naming the path when it does not stay inside ``root``.

    The check is lexical (``..`` and absolute parts are resolved, symlinks are not): a slide
    folder that is a symlink placed under the root by its operator is followed as before."""
    base = os.path.abspath(root)
    path = os.path.abspath(os.path.join(base, *parts))
    if os.path.commonpath([base, path]) != base or path == base:
        raise ValueError(f"path {os.path.join(str(root), *parts)!r} leaves its root {str(root)!r}; refused")
    return Path(root, *parts)


def partition_path(root: str | Path, key: str, *, partitions: str | None, prefix: tuple[str, ...] = (),
                   suffix: str = "") -> Path:
    """``root / prefix... / (key + suffix)`` for a validated ``key`` of ``partitions``, inside ``root``."""
    validate_partition_key(key, partitions)
    return path_in_root(root, *prefix, key + suffix)


def is_slide_folder(path: Path) -> bool:
    spatial = path / "spatial"
    has_counts = (path / "filtered_feature_bc_matrix.h5").is_file() or (
        path / "filtered_feature_bc_matrix"
    ).is_dir()
    return path.is_dir() and spatial.is_dir() and has_counts


class StorageResource(ConfigurableResource):
    """Root folders: ``slides_root`` holds one folder per Visium slide."""

    slides_root: str

    def slide_folder(self, slide_id: str) -> Path:
        return partition_path(self.slides_root, slide_id, partitions=SLIDES)

    def scan_slides(self) -> tuple[list[str], list[str]]:
        """Slide folders under the root: (valid keys, refused names with reasons)."""
        root = Path(self.slides_root)
        if not root.is_dir():
            return [], []
        valid, refused = [], []
        for path in sorted(root.iterdir()):
            if not is_slide_folder(path):
                continue
            try:
                valid.append(validate_partition_key(path.name, SLIDES))
            except InvalidPartitionKey as exc:
                refused.append(str(exc))
        return valid, refused
