"""Readers for real 10x Visium folder layouts.

Supported (each has a test on a real sample):

* Space Ranger 1.x: ``spatial/tissue_positions_list.csv`` without a header;
* Space Ranger 2.x+: ``spatial/tissue_positions.csv`` with a header;
* counts as ``filtered_feature_bc_matrix.h5`` or as the ``filtered_feature_bc_matrix/``
  MTX folder;
* ground truth from a spatialLIBD ``metadata.tsv`` (``layer_guess*`` columns) or a
  two-column ``<slide>_truth.txt`` / ``truth.tsv`` (barcode, label; no header);
* a full-resolution image: the single ``.tif``/``.tiff`` in the slide folder.

The result follows scanpy's conventions: raw counts in ``X`` (and ``layers["counts"]``),
``obsm["spatial"]`` in full-resolution pixels with column 0 = x (image column) and
column 1 = y (image row), ``uns["spatial"][slide]`` with ``scalefactors``, ``images``
(hires / lowres arrays) and ``metadata`` (file references).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if TYPE_CHECKING:
    import anndata as ad
import pandas as pd

log = logging.getLogger(__name__)

POSITION_COLUMNS = [
    "barcode",
    "in_tissue",
    "array_row",
    "array_col",
    "pxl_row_in_fullres",
    "pxl_col_in_fullres",
]
TRUTH_COLUMNS = (
    "layer_guess_reordered_short",
    "layer_guess_reordered",
    "layer_guess",
    "spatialLIBD",
    "ground_truth",
)
IMAGE_SUFFIXES = (".tif", ".tiff")


class SlideInputError(ValueError):
    """A slide folder is missing a file or holds a file that is wrong; the message says which."""


@dataclass
class SlideLayout:
    """Where each part of one slide lives on disk (what :func:`locate_slide_files` found)."""

    slide_id: str
    root: Path
    counts: Path
    counts_format: str  # "h5" or "mtx"
    positions: Path
    positions_format: str  # "spaceranger1" (no header) or "spaceranger2" (header)
    scalefactors: Path
    images: dict[str, Path] = field(default_factory=dict)  # fullres / hires / lowres
    truth: Path | None = None

    def files(self) -> list[Path]:
        found = [self.counts, self.positions, self.scalefactors, *self.images.values()]
        if self.truth is not None:
            found.append(self.truth)
        return found


def _err(slide_id: str, path: Path | str, problem: str) -> SlideInputError:
    return SlideInputError(f"slide '{slide_id}': {path}: {problem}")


def locate_slide_files(root: str | Path, slide_id: str | None = None) -> SlideLayout:
    """Find the counts, positions, scale factors, images and truth file of one slide."""
    root = Path(root)
    slide_id = slide_id or root.name
    if not root.is_dir():
        raise _err(slide_id, root, "slide folder does not exist")
    spatial = root / "spatial"

    h5 = root / "filtered_feature_bc_matrix.h5"
    mtx = root / "filtered_feature_bc_matrix"
    if h5.is_file():
        counts, counts_format = h5, "h5"
    elif mtx.is_dir():
        counts, counts_format = mtx, "mtx"
    else:
        raise _err(
            slide_id,
            root,
            "no counts file: expected filtered_feature_bc_matrix.h5 or the "
            "filtered_feature_bc_matrix/ MTX folder",
        )

    v1 = spatial / "tissue_positions_list.csv"
    v2 = spatial / "tissue_positions.csv"
    if v2.is_file():
        positions, positions_format = v2, "spaceranger2"
    elif v1.is_file():
        positions, positions_format = v1, "spaceranger1"
    else:
        raise _err(
            slide_id,
            spatial,
            "no spot positions: expected tissue_positions.csv (Space Ranger 2+) or "
            "tissue_positions_list.csv (Space Ranger 1)",
        )

    scalefactors = spatial / "scalefactors_json.json"
    if not scalefactors.is_file():
        raise _err(slide_id, scalefactors, "scale factors file is missing")

    images: dict[str, Path] = {}
    for name in ("hires", "lowres"):
        png = spatial / f"tissue_{name}_image.png"
        if png.is_file():
            images[name] = png
    tiffs = sorted(
        p for p in root.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
    )
    if len(tiffs) > 1:
        raise _err(
            slide_id,
            root,
            f"{len(tiffs)} full-resolution TIFFs ({', '.join(p.name for p in tiffs)}); "
            "keep exactly one per slide folder",
        )
    if tiffs:
        images["fullres"] = tiffs[0]

    truth = None
    for candidate in (
        root / "metadata.tsv",
        root / f"{slide_id}_truth.txt",
        root / "truth.tsv",
        root / "truth.txt",
    ):
        if candidate.is_file():
            truth = candidate
            break

    return SlideLayout(
        slide_id=slide_id,
        root=root,
        counts=counts,
        counts_format=counts_format,
        positions=positions,
        positions_format=positions_format,
        scalefactors=scalefactors,
        images=images,
        truth=truth,
    )


def read_counts(layout: SlideLayout) -> ad.AnnData:
    """Raw counts as AnnData (spots x genes), gene symbols as var names, IDs in ``gene_ids``."""
    import scanpy as sc

    try:
        if layout.counts_format == "h5":
            adata = sc.read_10x_h5(layout.counts)
        else:
            adata = sc.read_10x_mtx(layout.counts, var_names="gene_symbols", gex_only=True)
    except Exception as exc:  # any reader failure is reported with the file named
        raise _err(layout.slide_id, layout.counts, f"cannot read counts ({type(exc).__name__}: {exc})") from exc
    if adata.n_obs == 0 or adata.n_vars == 0:
        raise _err(layout.slide_id, layout.counts, f"counts matrix is empty (shape {adata.shape})")
    adata.var_names_make_unique()
    return adata


def read_positions(layout: SlideLayout) -> pd.DataFrame:
    """Spot positions indexed by barcode, with the six standard columns."""
    try:
        if layout.positions_format == "spaceranger1":
            df = pd.read_csv(layout.positions, header=None)
            if df.shape[1] != len(POSITION_COLUMNS):
                raise _err(
                    layout.slide_id,
                    layout.positions,
                    f"expected {len(POSITION_COLUMNS)} columns without header, found {df.shape[1]}",
                )
            df.columns = POSITION_COLUMNS
        else:
            df = pd.read_csv(layout.positions)
            missing = [c for c in POSITION_COLUMNS if c not in df.columns]
            if missing:
                raise _err(layout.slide_id, layout.positions, f"header lacks columns {missing}")
            df = df[POSITION_COLUMNS]
    except SlideInputError:
        raise
    except Exception as exc:
        raise _err(layout.slide_id, layout.positions, f"cannot parse positions ({exc})") from exc
    if df["barcode"].duplicated().any():
        dup = df.loc[df["barcode"].duplicated(), "barcode"].iloc[0]
        raise _err(layout.slide_id, layout.positions, f"duplicate barcode {dup!r}")
    for col in ("pxl_row_in_fullres", "pxl_col_in_fullres"):
        if not np.isfinite(df[col].to_numpy(dtype=float)).all():
            raise _err(layout.slide_id, layout.positions, f"non-finite values in {col}")
    return df.set_index("barcode")


def read_scalefactors(layout: SlideLayout) -> dict:
    try:
        factors = json.loads(layout.scalefactors.read_text())
    except Exception as exc:
        raise _err(layout.slide_id, layout.scalefactors, f"not valid JSON ({exc})") from exc
    for key in ("tissue_hires_scalef", "tissue_lowres_scalef", "spot_diameter_fullres"):
        value = factors.get(key)
        if not isinstance(value, (int, float)) or not value > 0:
            raise _err(layout.slide_id, layout.scalefactors, f"{key} must be a positive number, got {value!r}")
    return factors


def read_truth(layout: SlideLayout) -> tuple[pd.Series, str] | None:
    """Truth labels indexed by barcode, and a description of where they came from."""
    if layout.truth is None:
        return None
    path = layout.truth
    try:
        if path.name == "metadata.tsv":
            df = pd.read_csv(path, sep="\t", index_col=0)
            column = next((c for c in TRUTH_COLUMNS if c in df.columns), None)
            if column is None:
                raise _err(
                    layout.slide_id, path, f"no truth column; expected one of {list(TRUTH_COLUMNS)}"
                )
            labels = df[column]
            if "barcode" in df.columns:
                labels.index = df["barcode"]
            return labels.astype("string"), f"{path.name}:{column}"
        df = pd.read_csv(path, sep="\t", header=None)
    except SlideInputError:
        raise
    except Exception as exc:
        raise _err(layout.slide_id, path, f"cannot parse truth file ({exc})") from exc
    if df.shape[1] != 2:
        raise _err(layout.slide_id, path, f"two-column truth file expected, found {df.shape[1]} columns")
    return pd.Series(df[1].astype("string").to_numpy(), index=df[0].astype(str), name="truth"), path.name


def _read_png(path: Path) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as img:
        return np.asarray(img.convert("RGB"))


def image_shape(path: Path) -> tuple[int, int]:
    """(height, width) without decoding pixel data."""
    if path.suffix.lower() in IMAGE_SUFFIXES:
        import tifffile

        with tifffile.TiffFile(path) as tif:
            shape = tif.series[0].shape
        return int(shape[0]), int(shape[1])
    from PIL import Image

    with Image.open(path) as img:
        return img.height, img.width


def image_scale(name: str, scalefactors: dict) -> float:
    """Factor that maps full-resolution pixel coordinates into the image called ``name``."""
    if name == "fullres":
        return 1.0
    return float(scalefactors[f"tissue_{name}_scalef"])


def read_visium_slide(root: str | Path, slide_id: str | None = None) -> ad.AnnData:
    """Read one slide folder into AnnData following scanpy's Visium conventions."""
    layout = locate_slide_files(root, slide_id)
    sid = layout.slide_id
    adata = read_counts(layout)
    positions = read_positions(layout)
    factors = read_scalefactors(layout)

    if adata.n_obs == 0:
        raise _err(sid, layout.counts, "the counts matrix has zero barcodes (an empty slide)")
    missing = adata.obs_names.difference(positions.index)
    if len(missing):
        raise _err(
            sid,
            layout.positions,
            f"{len(missing)} of {adata.n_obs} barcodes of the counts matrix have no position "
            f"(first: {list(missing[:3])})",
        )
    pos = positions.loc[adata.obs_names]
    adata.obs["in_tissue"] = pos["in_tissue"].to_numpy(dtype=np.int8)
    adata.obs["array_row"] = pos["array_row"].to_numpy(dtype=np.int32)
    adata.obs["array_col"] = pos["array_col"].to_numpy(dtype=np.int32)
    if not (adata.obs["in_tissue"] == 1).any():
        raise _err(
            sid,
            layout.positions,
            f"zero spots on tissue: all {adata.n_obs} barcodes of the counts matrix have in_tissue = 0",
        )
    # x = image column, y = image row, both in full-resolution pixels (scanpy convention).
    adata.obsm["spatial"] = pos[["pxl_col_in_fullres", "pxl_row_in_fullres"]].to_numpy(dtype=np.float64)

    max_xy = adata.obsm["spatial"].max(axis=0)
    images: dict[str, np.ndarray] = {}
    image_paths: dict[str, str] = {}
    for name, path in layout.images.items():
        try:
            height, width = image_shape(path)
        except Exception as exc:
            raise _err(sid, path, f"unreadable image ({type(exc).__name__}: {exc})") from exc
        scale = image_scale(name, factors)
        need_w, need_h = max_xy[0] * scale, max_xy[1] * scale
        if need_w >= width or need_h >= height:
            raise _err(
                sid,
                path,
                f"{name} image is {width}x{height} px but spot coordinates x {scale:g} reach "
                f"x={need_w:.0f}, y={need_h:.0f}: image smaller than the coordinates imply",
            )
        image_paths[name] = str(path.resolve())
        if name in ("hires", "lowres"):
            images[name] = _read_png(path)

    truth_source = None
    truth = read_truth(layout)
    if truth is not None:
        labels, truth_source = truth
        labels = labels[~labels.index.duplicated()]
        adata.obs["truth"] = pd.Categorical(labels.reindex(adata.obs_names).to_numpy(dtype=object))
    n_positions = int(len(positions))
    n_in_tissue = int((positions["in_tissue"] == 1).sum())

    adata.layers["counts"] = adata.X.copy()
    adata.uns["spatial"] = {
        sid: {
            "images": images,
            "scalefactors": {k: float(v) for k, v in factors.items() if isinstance(v, (int, float))},
            "metadata": {
                "source_folder": str(layout.root.resolve()),
                "counts_file": str(layout.counts.resolve()),
                "counts_format": layout.counts_format,
                "positions_file": str(layout.positions.resolve()),
                "positions_format": layout.positions_format,
                "image_paths": image_paths,
                "truth_source": truth_source or "none",
                "n_positions": n_positions,
                "n_positions_in_tissue": n_in_tissue,
            },
        }
    }
    return adata
