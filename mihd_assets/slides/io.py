"""Readers of one slide: a 10x Visium folder, or an AnnData ``.h5ad`` file.

A slide is either ``<slides root>/<slide>/`` laid out as Space Ranger leaves it
(:func:`read_visium_slide`), or ``<slides root>/<slide>.h5ad``, or a folder
``<slides root>/<slide>/`` holding exactly one ``.h5ad`` and no Visium files
(:func:`read_anndata_slide`). :func:`read_slide` reads either layout.

Visium layouts supported (each has a test on a real sample):

* Space Ranger 1.x: ``spatial/tissue_positions_list.csv`` without a header;
* Space Ranger 2.x+: ``spatial/tissue_positions.csv`` with a header;
* counts as ``filtered_feature_bc_matrix.h5`` or as the ``filtered_feature_bc_matrix/``
  MTX folder;
* ground truth from a spatialLIBD ``metadata.tsv`` (``layer_guess*`` columns) or a
  two-column ``<slide>_truth.txt`` / ``truth.tsv`` (barcode, label; no header);
* a full-resolution image: the single ``.tif``/``.tiff`` in the slide folder.

The result follows scanpy's conventions: raw counts in ``X`` (and ``layers["counts"]``),
``obsm["spatial"]`` with column 0 = x (image column) and column 1 = y (image row), in
full-resolution pixels (an AnnData file without scale factors: in the file's own units),
``uns["spatial"][slide]`` with ``scalefactors``, ``images`` (hires / lowres arrays) and
``metadata`` (file references, ``layout`` and ``coordinate_units``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import io
import json
import logging
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

if TYPE_CHECKING:
    import anndata as ad
import pandas as pd
import scipy.sparse as sp

from ..fileio import atomic_write_bytes

log = logging.getLogger(__name__)

LAYOUT_VISIUM = "visium_folder"
LAYOUT_ANNDATA = "anndata"
UNITS_FULLRES = "fullres_px"
UNITS_FILE = "file units"
ANNDATA_SUFFIX = ".h5ad"
# Entries whose presence makes a folder a 10x Visium slide folder.
VISIUM_MARKERS = ("filtered_feature_bc_matrix.h5", "filtered_feature_bc_matrix", "spatial")
# obs column of an AnnData slide holding the truth labels; unset: the first of ANNDATA_TRUTH_COLUMNS present.
TRUTH_COLUMN_ENV = "MIHD_TRUTH_COLUMN"
COORDINATE_KEYS = ("spatial", "X_spatial")
# var columns of an AnnData slide carried into the raw slide (10x readers give gene_ids, feature_types, genome).
CARRIED_VAR_COLUMNS = ("gene_ids", "feature_types", "genome", "feature_name")
# float32 holds every integer up to 2**24 exactly; larger counts stay float64.
FLOAT32_EXACT = 2**24

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
ANNDATA_TRUTH_COLUMNS = TRUTH_COLUMNS + ("truth",)
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


def _check_image_extent(sid: str, where: Path | str, name: str, width: int, height: int,
                        max_xy: np.ndarray, scale: float, prefix: str = "") -> None:
    """Refuse an image smaller than the spot coordinates x its scale factor reach."""
    need_w, need_h = max_xy[0] * scale, max_xy[1] * scale
    if need_w >= width or need_h >= height:
        raise _err(
            sid,
            where,
            f"{prefix}{name} image is {width}x{height} px but spot coordinates x {scale:g} reach "
            f"x={need_w:.0f}, y={need_h:.0f}: image smaller than the coordinates imply",
        )


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
        _check_image_extent(sid, path, name, width, height, max_xy, image_scale(name, factors))
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
                "layout": LAYOUT_VISIUM,
                "coordinate_units": UNITS_FULLRES,
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


# --- AnnData (.h5ad) slides ---------------------------------------------------------------


def h5ad_files(folder: Path) -> list[Path]:
    """The ``.h5ad`` files directly inside ``folder`` (hidden files excluded), sorted."""
    return sorted(
        p for p in folder.iterdir()
        if p.is_file() and p.name.endswith(ANNDATA_SUFFIX) and not p.name.startswith(".")
    )


def folder_layout(folder: str | Path, slide_id: str | None = None) -> tuple[str, Path | None]:
    """``("anndata", its .h5ad)`` for a folder holding exactly one ``.h5ad`` and no Visium
    files, ``("visium_folder", None)`` for any other folder (the Visium reader names what is
    missing). SlideInputError for a folder holding Visium files and an ``.h5ad``, or several
    ``.h5ad`` files: which one is the slide would be a guess."""
    folder = Path(folder)
    sid = slide_id or folder.name
    found = h5ad_files(folder)
    if not found:
        return LAYOUT_VISIUM, None
    names = ", ".join(p.name for p in found)
    visium = [name for name in VISIUM_MARKERS if (folder / name).exists()]
    if visium:
        raise _err(
            sid, folder,
            f"holds 10x Visium files ({', '.join(visium)}) and AnnData file(s) ({names}): keep one "
            "layout per slide folder (a Visium folder, or exactly one .h5ad)",
        )
    if len(found) > 1:
        raise _err(sid, folder, f"{len(found)} .h5ad files ({names}): an AnnData slide folder holds exactly one")
    return LAYOUT_ANNDATA, found[0]


def _h5ad_stem(path: Path) -> str:
    return path.name[: -len(ANNDATA_SUFFIX)] if path.name.endswith(ANNDATA_SUFFIX) else path.stem


def read_slide(source: str | Path, slide_id: str | None = None,
               images_dir: str | Path | None = None) -> ad.AnnData:
    """Read one slide in either layout: a ``.h5ad`` file or a folder holding exactly one
    (:func:`read_anndata_slide`, images exported as PNG into ``images_dir``), else a Visium
    folder (:func:`read_visium_slide`). ``metadata["layout"]`` says which."""
    source = Path(source)
    if source.is_file():
        sid = slide_id or _h5ad_stem(source)
        if not source.name.endswith(ANNDATA_SUFFIX):
            raise _err(sid, source, "not a slide: expected a Visium slide folder or an AnnData .h5ad file")
        return read_anndata_slide(source, sid, images_dir)
    sid = slide_id or source.name
    if not source.is_dir():
        raise _err(sid, source, "no slide here: expected a Visium slide folder or an AnnData .h5ad file")
    layout, h5ad = folder_layout(source, sid)
    if layout == LAYOUT_ANNDATA:
        return read_anndata_slide(h5ad, sid, images_dir)
    return read_visium_slide(source, sid)


def _open_anndata(path: Path, sid: str) -> ad.AnnData:
    import anndata as ad
    import h5py

    if not path.is_file():
        raise _err(sid, path, "AnnData file does not exist")
    try:
        is_hdf5 = h5py.is_hdf5(path)
        if is_hdf5:
            with h5py.File(path, "r") as fh:
                groups = sorted(fh.keys())
    except OSError as exc:
        raise _err(sid, path, f"not an AnnData file: unreadable HDF5 ({exc})") from exc
    if not is_hdf5:
        raise _err(sid, path, "not an AnnData file: not HDF5 (an .h5ad file is HDF5 with obs and var groups)")
    missing = [g for g in ("obs", "var") if g not in groups]
    if missing:
        raise _err(
            sid, path,
            f"not an AnnData file: HDF5 without the AnnData group(s) {missing} "
            f"(top level holds {groups or 'nothing'})",
        )
    try:
        return ad.read_h5ad(path)
    except Exception as exc:  # any reader failure is reported with the file named
        raise _err(sid, path, f"cannot read as AnnData ({type(exc).__name__}: {exc})") from exc


def _anndata_counts(adata: ad.AnnData, sid: str, path: Path) -> tuple[sp.csr_matrix, str]:
    """Raw counts (``layers["counts"]`` if present, else ``X``) as CSR, checked to be
    non-negative integers; float32 (exact up to 2**24) unless a count is larger."""
    if "counts" in adata.layers:
        where, matrix = 'layers["counts"]', adata.layers["counts"]
    elif adata.X is not None:
        where, matrix = "X", adata.X
    else:
        raise _err(sid, path, 'no counts: the file has neither layers["counts"] nor X')
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
        values = csr.data
    elif isinstance(matrix, np.ndarray):
        csr = None
        values = np.asarray(matrix)
    else:
        raise _err(sid, path, f"{where} is a {type(matrix).__name__}, not a dense or sparse matrix")
    if values.dtype.kind not in "biuf":
        raise _err(sid, path, f"{where} has dtype {values.dtype}; raw counts must be numbers")

    def first(mask: np.ndarray) -> tuple[int, str]:
        flat = np.flatnonzero(mask)
        i = int(flat[0])
        if csr is not None:
            row, col, value = int(np.searchsorted(csr.indptr, i, side="right") - 1), int(csr.indices[i]), csr.data[i]
        else:
            row, col = (int(v) for v in np.unravel_index(i, values.shape))
            value = values[row, col]
        return len(flat), f"{float(value):.6g} at spot {adata.obs_names[row]!r}, gene {adata.var_names[col]!r}"

    tests = []
    if values.dtype.kind == "f":
        tests.append(("non-finite", lambda: ~np.isfinite(values), ""))
    if values.dtype.kind in "if":
        tests.append(("negative", lambda: values < 0, ""))
    if values.dtype.kind == "f":
        tests.append(("non-integer", lambda: values != np.rint(values),
                      "; this looks like normalized or log-transformed data: store the raw counts in "
                      'layers["counts"] or X'))
    for problem, mask_of, hint in tests:
        mask = mask_of()
        if mask.any():
            n, example = first(mask)
            raise _err(
                sid, path,
                f"{where} holds {n} {problem} value(s), e.g. {example}: raw counts must be "
                f"non-negative integers{hint}",
            )
    peak = float(values.max()) if values.size else 0.0
    dtype = np.float32 if peak <= FLOAT32_EXACT else np.float64
    out = csr.astype(dtype) if csr is not None else sp.csr_matrix(values.astype(dtype))
    return out, where


def _anndata_coordinates(adata: ad.AnnData, sid: str, path: Path) -> tuple[np.ndarray, str]:
    """``(n, 2)`` float64 coordinates from ``obsm["spatial"]`` (else ``obsm["X_spatial"]``)."""
    key = next((k for k in COORDINATE_KEYS if k in adata.obsm), None)
    if key is None:
        raise _err(
            sid, path,
            'no spot coordinates: expected obsm["spatial"] (or obsm["X_spatial"]); obsm holds '
            f"{sorted(adata.obsm.keys()) or 'nothing'}",
        )
    raw = adata.obsm[key]
    if isinstance(raw, pd.DataFrame):
        values = raw.to_numpy()
    elif sp.issparse(raw):
        values = raw.toarray()
    else:
        values = np.asarray(raw)
    if values.dtype.kind not in "iuf":
        raise _err(sid, path, f'obsm["{key}"] has dtype {values.dtype}; coordinates must be numbers')
    if values.shape != (adata.n_obs, 2):
        raise _err(
            sid, path,
            f'obsm["{key}"] has shape {values.shape}; expected (n_spots, 2) = ({adata.n_obs}, 2) '
            "with x = image column, y = image row",
        )
    values = values.astype(np.float64)
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        raise _err(
            sid, path,
            f'obsm["{key}"]: {int(bad.sum())} spot(s) with NaN or infinite coordinates, first '
            f"{adata.obs_names[int(np.flatnonzero(bad)[0])]!r}",
        )
    if not (values.max(axis=0) > values.min(axis=0)).any():
        raise _err(
            sid, path,
            f'obsm["{key}"]: all {adata.n_obs} spots at one position ({values[0, 0]:g}, {values[0, 1]:g}): '
            "zero spread",
        )
    return values, key


def _anndata_library(adata: ad.AnnData, sid: str, path: Path) -> tuple[str | None, dict]:
    """The one library of ``uns["spatial"]`` (the one named ``sid`` when there are several)."""
    spatial = adata.uns.get("spatial")
    if spatial is None:
        return None, {}
    if not isinstance(spatial, Mapping):
        raise _err(sid, path, f'uns["spatial"] is a {type(spatial).__name__}, not a mapping of libraries')
    libraries = list(spatial)
    if not libraries:
        return None, {}
    if len(libraries) == 1:
        library = libraries[0]
    elif sid in spatial:
        library = sid
    else:
        raise _err(
            sid, path,
            f'uns["spatial"] holds {len(libraries)} libraries ({libraries}) and none is named {sid!r}: '
            "keep one library per slide file",
        )
    info = spatial[library]
    if not isinstance(info, Mapping):
        raise _err(sid, path, f'uns["spatial"]["{library}"] is a {type(info).__name__}, not a mapping')
    return str(library), dict(info)


def _real(value) -> float | None:
    """``value`` as a float when it is a real number (numpy scalars and 0-d arrays included)."""
    if isinstance(value, np.ndarray) and value.ndim == 0:
        value = value.item()
    if isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_)):
        return float(value)
    return None


def _image_rgb8(array, sid: str, path: Path, where: str) -> np.ndarray:
    """An image array as scanpy stores it (uint8, or float in [0, 1] as matplotlib reads a
    PNG; grey, RGB or RGBA) as (h, w, 3) uint8 RGB; alpha is dropped as PIL's RGB conversion does."""
    image = np.asarray(array)
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    if image.ndim != 3 or image.shape[2] not in (3, 4) or 0 in image.shape[:2]:
        raise _err(sid, path, f"{where} has shape {image.shape}; expected (height, width), (height, width, 3) or (height, width, 4)")
    image = image[..., :3]
    if image.dtype == np.uint8:
        return np.ascontiguousarray(image)
    if image.dtype.kind == "f":
        if not np.isfinite(image).all() or image.min() < 0 or image.max() > 1:
            raise _err(sid, path, f"{where}: float image values must lie in [0, 1], found [{image.min():g}, {image.max():g}]")
        return np.rint(image.astype(np.float64) * 255).astype(np.uint8)
    raise _err(sid, path, f"{where} has dtype {image.dtype}; expected uint8 or float in [0, 1]")


def _export_png(image: np.ndarray, target: Path) -> None:
    """Write ``image`` as PNG at ``target`` atomically, unless ``target`` already holds these bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, "RGB").save(buffer, format="PNG")
    data = buffer.getvalue()
    if target.is_file() and target.read_bytes() == data:
        return
    atomic_write_bytes(target, data)


def _anndata_truth(obs: pd.DataFrame, sid: str, path: Path) -> tuple[pd.Categorical | None, str]:
    """Truth labels from the obs column named by ``MIHD_TRUTH_COLUMN`` (refused when absent),
    else from the first of :data:`ANNDATA_TRUTH_COLUMNS` present; empty strings are missing."""
    configured = os.environ.get(TRUTH_COLUMN_ENV, "").strip()
    if configured:
        if configured not in obs.columns:
            raise _err(
                sid, path,
                f"obs has no truth column {configured!r} (set by {TRUTH_COLUMN_ENV}); obs columns: {list(obs.columns)}",
            )
        column = configured
    else:
        column = next((c for c in ANNDATA_TRUTH_COLUMNS if c in obs.columns), None)
        if column is None:
            return None, "none"
    labels = [
        None if pd.isna(v) or not str(v).strip() else str(v)
        for v in obs[column].astype(object).to_numpy()
    ]
    return pd.Categorical(np.asarray(labels, dtype=object)), f"{path.name}:{column}"


def _numeric_obs(obs: pd.DataFrame, column: str, sid: str, path: Path) -> np.ndarray:
    try:
        values = np.asarray(obs[column], dtype=np.float64)
    except (TypeError, ValueError) as exc:
        raise _err(sid, path, f'obs["{column}"] is not numeric ({exc})') from exc
    return values


def _in_tissue(obs: pd.DataFrame, sid: str, path: Path) -> np.ndarray:
    if "in_tissue" not in obs.columns:
        return np.ones(len(obs), dtype=np.int8)
    values = _numeric_obs(obs, "in_tissue", sid, path)
    bad = ~np.isin(values, (0.0, 1.0))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _err(
            sid, path,
            f'obs["in_tissue"] must be 0 or 1; {int(bad.sum())} spot(s) hold other values, e.g. '
            f"{obs['in_tissue'].iloc[i]!r} at spot {obs.index[i]!r}",
        )
    return values.astype(np.int8)


def _grid_index(obs: pd.DataFrame, column: str, sid: str, path: Path) -> np.ndarray:
    values = _numeric_obs(obs, column, sid, path)
    bad = ~np.isfinite(values) | (values != np.rint(values))
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise _err(sid, path, f'obs["{column}"] must hold integers; spot {obs.index[i]!r} holds {obs[column].iloc[i]!r}')
    return values.astype(np.int32)


def read_anndata_slide(path: str | Path, slide_id: str | None = None,
                       images_dir: str | Path | None = None) -> ad.AnnData:
    """Read one AnnData ``.h5ad`` slide into the conventions of :func:`read_visium_slide`.

    Counts: ``layers["counts"]`` if present, else ``X``; refused unless non-negative integers
    (normalized data is refused), stored as CSR in ``X`` and ``layers["counts"]``. Obs names
    must be unique; var names are kept (made unique as the 10x readers do) and ``gene_ids``,
    ``feature_types``, ``genome``, ``feature_name`` are carried from ``var``. Coordinates:
    ``obsm["spatial"]`` (else ``obsm["X_spatial"]``), (n, 2), finite, not all in one place.
    ``obs["in_tissue"]`` and ``obs["array_row"/"array_col"]`` are carried (in_tissue is 1 for
    every spot when absent); ``obs["truth"]`` comes from the column :func:`_anndata_truth` picks.

    With ``uns["spatial"][library]["scalefactors"]`` the coordinates are full-resolution
    pixels (``coordinate_units`` "fullres_px") and the library's hires/lowres image arrays are
    the slide's images: written once as ``<images_dir>/<name>.png`` (``metadata["image_paths"]``,
    what the tissue check and the vision code open) and stored as uint8 RGB arrays. Without
    scale factors the coordinates are in the file's own units ("file units"), there are no
    images and ``scalefactors`` is empty.
    """
    import anndata as ad

    path = Path(path)
    sid = slide_id or _h5ad_stem(path)
    source = _open_anndata(path, sid)
    if source.n_obs == 0 or source.n_vars == 0:
        raise _err(sid, path, f"the AnnData is empty (shape {source.shape})")
    obs_names = pd.Index(source.obs_names.astype(str))
    duplicated = obs_names[obs_names.duplicated()]
    if len(duplicated):
        raise _err(
            sid, path,
            f"{len(duplicated)} duplicate obs names (spot barcodes), first: {list(dict.fromkeys(duplicated))[:3]}",
        )
    counts, counts_source = _anndata_counts(source, sid, path)
    coords, coords_key = _anndata_coordinates(source, sid, path)
    library, info = _anndata_library(source, sid, path)

    obs = pd.DataFrame(index=obs_names)
    obs["in_tissue"] = _in_tissue(source.obs.set_axis(obs_names), sid, path)
    if not (obs["in_tissue"] == 1).any():
        raise _err(sid, path, f'zero spots on tissue: all {len(obs)} spots have obs["in_tissue"] = 0')
    for column in ("array_row", "array_col"):
        if column in source.obs.columns:
            obs[column] = _grid_index(source.obs.set_axis(obs_names), column, sid, path)
    labels, truth_source = _anndata_truth(source.obs, sid, path)
    if labels is not None:
        obs["truth"] = labels
    var = pd.DataFrame(index=pd.Index(source.var_names.astype(str)))
    for column in CARRIED_VAR_COLUMNS:
        if column in source.var.columns:
            var[column] = source.var[column].astype(str).to_numpy()

    factors: dict[str, float] = {}
    if "scalefactors" in info:
        units = UNITS_FULLRES
        if not isinstance(info["scalefactors"], Mapping):
            raise _err(sid, path, f'uns["spatial"]["{library}"]["scalefactors"] is not a mapping')
        factors = {str(k): v for k, v in ((k, _real(v)) for k, v in info["scalefactors"].items()) if v is not None}
    else:
        units = UNITS_FILE
    stored = info.get("images", {})
    if not isinstance(stored, Mapping):
        raise _err(sid, path, f'uns["spatial"]["{library}"]["images"] is not a mapping of image arrays')
    extra = sorted(set(stored) - {"hires", "lowres"})
    if extra:
        log.warning("slide '%s': %s: images %s of uns['spatial'][%r] are not read (only hires and lowres are)",
                    sid, path, extra, library)
    images: dict[str, np.ndarray] = {}
    for name in ("hires", "lowres"):
        if name not in stored:
            continue
        where = f'uns["spatial"]["{library}"]["images"]["{name}"]'
        if units == UNITS_FILE:
            raise _err(sid, path, f'{where} is an image but uns["spatial"]["{library}"] has no scalefactors to place the spots on it')
        scale = factors.get(f"tissue_{name}_scalef")
        if scale is None or not scale > 0:
            raise _err(sid, path, f"scalefactors tissue_{name}_scalef must be a positive number for the {name} image, got {scale!r}")
        image = _image_rgb8(stored[name], sid, path, where)
        _check_image_extent(sid, path, name, image.shape[1], image.shape[0], coords.max(axis=0), scale, prefix=f"{where}: ")
        images[name] = image
    image_paths: dict[str, str] = {}
    if images:
        diameter = factors.get("spot_diameter_fullres")
        if diameter is None or not diameter > 0:
            raise _err(sid, path, f"scalefactors spot_diameter_fullres must be a positive number when images are present, got {diameter!r}")
        if images_dir is None:
            raise _err(sid, path, "holds images: read it with images_dir, the folder they are written to as PNG")
        for name, image in images.items():
            target = Path(images_dir) / f"{name}.png"
            _export_png(image, target)
            image_paths[name] = str(target.resolve())

    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.var_names_make_unique()
    adata.obsm["spatial"] = coords
    adata.layers["counts"] = adata.X.copy()
    resolved = str(path.resolve())
    adata.uns["spatial"] = {
        sid: {
            "images": images,
            "scalefactors": factors,
            "metadata": {
                "layout": LAYOUT_ANNDATA,
                "coordinate_units": units,
                "source_file": resolved,
                "library_id": library if library is not None else "none",
                "counts_file": resolved,
                "counts_format": "h5ad",
                "counts_source": counts_source,
                "positions_file": resolved,
                "positions_format": f'h5ad obsm["{coords_key}"]',
                "image_paths": image_paths,
                "truth_source": truth_source,
                "n_positions": int(adata.n_obs),
                "n_positions_in_tissue": int((adata.obs["in_tissue"] == 1).sum()),
            },
        }
    }
    return adata
