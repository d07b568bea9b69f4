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
from typing import Optional

from dagster import ConfigurableResource

from mihd_assets.slides.io import ANNDATA_SUFFIX, SlideInputError, folder_layout, h5ad_files

from . import settings
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
    """A 10x Visium slide folder: ``spatial/`` and the counts (``.h5`` or the MTX folder)."""
    spatial = path / "spatial"
    has_counts = (path / "filtered_feature_bc_matrix.h5").is_file() or (
        path / "filtered_feature_bc_matrix"
    ).is_dir()
    return path.is_dir() and spatial.is_dir() and has_counts


class StorageResource(ConfigurableResource):
    """Root folders: ``slides_root`` holds the slides, each a Visium folder ``<slide>/``, an
    AnnData file ``<slide>.h5ad`` or a folder ``<slide>/`` holding exactly one ``.h5ad``;
    ``h5ad_images_root`` (default ``<storage root>/slides/h5ad_images``) receives the images
    of AnnData slides as PNG files, one folder per slide."""

    slides_root: str
    h5ad_images_root: Optional[str] = None

    def slide_folder(self, slide_id: str) -> Path:
        return partition_path(self.slides_root, slide_id, partitions=SLIDES)

    def slide_file(self, slide_id: str) -> Path:
        """``<slides root>/<slide>.h5ad`` (whether or not it exists)."""
        return partition_path(self.slides_root, slide_id, partitions=SLIDES, suffix=ANNDATA_SUFFIX)

    def slide_source(self, slide_id: str) -> Path:
        """The slide's file ``<slide>.h5ad`` when it exists, else its folder ``<slide>/`` (which
        may not exist: a slide removed from disk). SlideInputError when both exist."""
        file, folder = self.slide_file(slide_id), self.slide_folder(slide_id)
        if file.is_file():
            if folder.exists():
                raise SlideInputError(
                    f"slide '{slide_id}': both {file} and {folder} exist under {self.slides_root}; "
                    "keep one of the two (an .h5ad file or a slide folder)"
                )
            return file
        return folder

    def slide_images_folder(self, slide_id: str) -> Path:
        """Where the images of an AnnData slide are written as PNG: ``<h5ad_images_root>/<slide>/``."""
        root = self.h5ad_images_root or str(settings.storage_root() / "slides" / "h5ad_images")
        return partition_path(root, slide_id, partitions=SLIDES)

    def scan_slides(self) -> tuple[list[str], list[str]]:
        """Slides under the root: (valid keys, refused names with reasons).

        A slide is a Visium folder, a ``<key>.h5ad`` file, or a folder holding exactly one
        ``.h5ad`` and no Visium files. Refused: names that are not valid keys, a key that is
        both a file and a folder, folders holding Visium files and an ``.h5ad``, or several
        ``.h5ad`` files."""
        root = Path(self.slides_root)
        if not root.is_dir():
            return [], []
        valid, refused = [], []
        for path in sorted(root.iterdir()):
            if path.is_file():
                if not path.name.endswith(ANNDATA_SUFFIX) or path.name.startswith("."):
                    continue
                key = path.name[: -len(ANNDATA_SUFFIX)]
                if (root / key).exists():
                    refused.append(f"slide '{key}': both {path.name} and {key}/ exist under {root}; keep one of the two")
                    continue
                try:
                    valid.append(validate_partition_key(key, SLIDES))
                except InvalidPartitionKey as exc:
                    refused.append(f"{path.name}: {exc}")
                continue
            if not path.is_dir() or (root / (path.name + ANNDATA_SUFFIX)).is_file():
                continue  # not a slide, or refused above beside its .h5ad file
            if not is_slide_folder(path) and not h5ad_files(path):
                continue
            try:
                folder_layout(path, path.name)
                valid.append(validate_partition_key(path.name, SLIDES))
            except (InvalidPartitionKey, SlideInputError) as exc:
                refused.append(str(exc))
        return valid, refused
