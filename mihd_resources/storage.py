"""Data root (where raw slides live) and the partition-key rules for folders in it."""

from __future__ import annotations

import re
from pathlib import Path

from dagster import ConfigurableResource

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")


class InvalidPartitionKey(ValueError):
    pass


def validate_partition_key(key: str) -> str:
    """A slide or donor id must be a plain folder name: no separators, no ``..``, no spaces."""
    if not isinstance(key, str) or not _KEY.match(key) or ".." in key:
        raise InvalidPartitionKey(
            f"invalid partition key {key!r}: use letters, digits, '_', '-', '.'; "
            "no path separators, no '..', no spaces, at most 128 characters"
        )
    return key


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
        return Path(self.slides_root) / validate_partition_key(slide_id)

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
                valid.append(validate_partition_key(path.name))
            except InvalidPartitionKey as exc:
                refused.append(str(exc))
        return valid, refused
