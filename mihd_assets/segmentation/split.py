"""E0: donor-level train/val/test split and the annotated dataset in Cellpose format."""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import tifffile
from skimage.segmentation import relabel_sequential

from ..fileio import atomic_write_bytes
from .tiles import TilePair, cellpose_image, discover_tiles, read_pair

SPLITS = ("train", "val", "test")


def donor_split(donors: list[str], fractions: tuple[float, float, float], seed: int) -> dict[str, str]:
    """Assign each donor to exactly one split (train/val/test), every split non-empty."""
    unique = sorted(set(donors))
    if len(unique) < 3:
        raise ValueError(f"a train/val/test split needs at least 3 donors with annotations, found {len(unique)}: {unique}")
    if len(fractions) != 3 or min(fractions) <= 0 or abs(sum(fractions) - 1) > 1e-6:
        raise ValueError(f"split fractions must be three positive numbers summing to 1, got {fractions}")
    order = np.random.default_rng(seed).permutation(len(unique))
    n_val = max(1, int(round(fractions[1] * len(unique))))
    n_test = max(1, int(round(fractions[2] * len(unique))))
    n_train = len(unique) - n_val - n_test
    if n_train < 1:
        raise ValueError(f"{len(unique)} donors leave no training donor with fractions {fractions}")
    names = ["train"] * n_train + ["val"] * n_val + ["test"] * n_test
    return {unique[i]: names[k] for k, i in enumerate(order)}


@dataclass
class AnnotatedImage:
    donor: str
    stem: str
    marker: str
    mask_path: Path
    tile: TilePair


@dataclass
class AnnotationInventory:
    images: list[AnnotatedImage] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)


def find_annotations(annotations_root: Path, tiles_root: Path) -> AnnotationInventory:
    """Every ``<donor>/<stem>_masks.tif`` under ``annotations_root`` with its tile pair."""
    inventory = AnnotationInventory()
    if not annotations_root.is_dir():
        raise FileNotFoundError(f"annotations root {annotations_root} does not exist (set MIHD_ANNOTATIONS_ROOT)")
    for donor_dir in sorted(p for p in annotations_root.iterdir() if p.is_dir()):
        tile_dir = tiles_root / donor_dir.name
        if not tile_dir.is_dir():
            inventory.problems.append(f"{donor_dir}: no tile folder {tile_dir}")
            continue
        pairs, _ = discover_tiles(tile_dir)
        by_stem = {p.stem.rsplit("_b", 1)[0]: p for p in pairs}
        for mask in sorted(donor_dir.glob("*_masks.tif*")):
            stem = mask.name.split("_masks.tif")[0]
            if stem not in by_stem:
                inventory.problems.append(f"{mask}: no readable-looking tile pair {stem}_b0c0/c1 in {tile_dir}")
                continue
            tile = by_stem[stem]
            inventory.images.append(AnnotatedImage(donor_dir.name, stem, tile.marker, mask, tile))
    return inventory


def load_annotated(image: AnnotatedImage, use_dapi: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(Cellpose image ``[DAPI, marker, 0]``, instance mask relabelled 1..N)."""
    dapi, marker = read_pair(image.tile)
    mask = np.squeeze(tifffile.imread(image.mask_path))
    if mask.shape != dapi.shape:
        raise ValueError(f"{image.mask_path}: mask shape {mask.shape} differs from tile shape {dapi.shape}")
    if not np.issubdtype(mask.dtype, np.integer) or mask.min() < 0:
        raise ValueError(f"{image.mask_path}: an instance mask needs non-negative integer labels, got {mask.dtype}")
    relabelled, _, _ = relabel_sequential(mask.astype(np.int64))
    return cellpose_image(dapi, marker, use_dapi), relabelled.astype(np.int32)


@dataclass
class CellposeSet:
    """One split in Cellpose format: images ``[3, H, W]`` float32, instance masks int32."""

    images: list[np.ndarray]
    masks: list[np.ndarray]
    records: list[dict]  # donor, stem, marker, n_masks per image

    def save(self, path: Path) -> None:
        buffer = io.BytesIO()
        arrays = {f"image_{i:05d}": im for i, im in enumerate(self.images)}
        arrays.update({f"mask_{i:05d}": m for i, m in enumerate(self.masks)})
        np.savez_compressed(buffer, records=np.array(json.dumps(self.records)), **arrays)
        atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: Path) -> "CellposeSet":
        with np.load(path) as data:
            records = json.loads(str(data["records"]))
            images = [data[f"image_{i:05d}"] for i in range(len(records))]
            masks = [data[f"mask_{i:05d}"] for i in range(len(records))]
        return cls(images, masks, records)

    def subset(self, indices: list[int]) -> "CellposeSet":
        return CellposeSet([self.images[i] for i in indices], [self.masks[i] for i in indices], [self.records[i] for i in indices])

    def without_dapi(self) -> "CellposeSet":
        images = [np.stack([np.zeros_like(im[0]), im[1], im[2]]) for im in self.images]
        return CellposeSet(images, self.masks, self.records)
