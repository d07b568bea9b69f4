"""Expression-only cell datasets: where they live, how they are read, and how a slide becomes one.

A cell dataset is one of, under the cells root (``MIHD_CELLS_ROOT``):

* ``<dataset>.h5ad``: AnnData with raw counts in ``layers["counts"]`` or ``X``, genes as
  symbols or Ensembl ids in ``var_names`` (an id or symbol column in ``var`` is used too),
  optional ``obs["cell_type"]``;
* ``<dataset>.h5``: a 10x Genomics HDF5 feature-barcode matrix;
* ``<dataset>/``: a 10x MTX folder (``matrix.mtx[.gz]``, ``features.tsv[.gz]`` or
  ``genes.tsv``, ``barcodes.tsv[.gz]``), directly or in ``filtered_feature_bc_matrix/``.

A dataset may carry hidden positions in ``obsm["spatial_truth"]`` for evaluation. The
reader the placement uses (:func:`read_cell_dataset`) opens an ``.h5ad`` file's ``obs``,
``var`` and counts only: it never reads ``obsm``, so no position can reach the placement.
:func:`read_truth` is the evaluation's reader of the positions.

:func:`cells_from_slide` turns a Visium slide into such a dataset: each spot on tissue is
split into cells (every count assigned to one of the spot's cells at random, with random
shares per spot), each cell placed at a random point of its spot's disc; the positions go
to ``obsm["spatial_truth"]`` only and the slide's labels to ``obs["cell_type"]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pandas as pd
import scipy.sparse as sp

if TYPE_CHECKING:
    import anndata as ad

CELL_DATASETS = "cell_datasets"  # the name of the partitions definition
ANNDATA_SUFFIX = ".h5ad"
TENX_H5_SUFFIX = ".h5"
TRUTH_KEY = "spatial_truth"
CELL_TYPE = "cell_type"
MTX_SUBFOLDER = "filtered_feature_bc_matrix"
# var columns that may hold a gene's symbol or its Ensembl id (10x readers: gene_ids; CELLxGENE: feature_name).
GENE_NAME_COLUMNS = ("gene_ids", "gene_id", "ensembl_id", "ensembl", "gene_symbols", "gene_symbol",
                     "feature_name", "symbol", "gene_name")


class CellDatasetError(ValueError):
    """A cell dataset that cannot be placed or evaluated; the message names the dataset and the problem."""


def _err(dataset: str, path: Path | str, problem: str) -> CellDatasetError:
    return CellDatasetError(f"cell dataset '{dataset}': {problem} ({path})")


def _mtx_folder(folder: Path) -> Path | None:
    """The folder holding ``matrix.mtx[.gz]`` (``folder`` itself or its ``filtered_feature_bc_matrix/``)."""
    for candidate in (folder, folder / MTX_SUBFOLDER):
        if (candidate / "matrix.mtx.gz").is_file() or (candidate / "matrix.mtx").is_file():
            return candidate
    return None


def dataset_candidates(root: Path, key: str) -> list[Path]:
    """The sources that exist for ``key`` under ``root`` (``.h5ad``, ``.h5``, MTX folder)."""
    found = [root / f"{key}{suffix}" for suffix in (ANNDATA_SUFFIX, TENX_H5_SUFFIX) if (root / f"{key}{suffix}").is_file()]
    if (root / key).is_dir() and _mtx_folder(root / key) is not None:
        found.append(root / key)
    return found


def scan_cell_datasets(root: str | Path, validate) -> tuple[list[str], list[str]]:
    """Datasets under ``root``: (valid keys, refusal messages).

    ``validate(key)`` raises for a key that cannot be a partition (the platform's partition-key
    validator). A key with two sources (e.g. ``x.h5ad`` and ``x.h5``) is refused, naming both."""
    root = Path(root)
    if not root.is_dir():
        return [], []
    keys: dict[str, list[str]] = {}
    for path in sorted(root.iterdir()):
        if path.name.startswith("."):
            continue  # hidden files, and the temporary files of atomic writes
        if path.is_file() and path.suffix in (ANNDATA_SUFFIX, TENX_H5_SUFFIX):
            keys.setdefault(path.name[: -len(path.suffix)], []).append(path.name)
        elif path.is_dir() and _mtx_folder(path) is not None:
            keys.setdefault(path.name, []).append(path.name + "/")
    valid, refused = [], []
    for key, names in sorted(keys.items()):
        if len(names) > 1:
            refused.append(f"cell dataset '{key}': several sources {names} under {root}; keep one")
            continue
        try:
            valid.append(validate(key))
        except ValueError as exc:
            refused.append(f"{names[0]}: {exc}")
    return valid, refused


def _check_counts(matrix, dataset: str, path: Path, where: str, obs_names, var_names) -> sp.csr_matrix:
    """Raw counts as CSR float32 (float64 above 2**24): finite, non-negative integers."""
    if sp.issparse(matrix):
        csr = sp.csr_matrix(matrix)
    elif isinstance(matrix, np.ndarray):
        csr = sp.csr_matrix(matrix)
    else:
        raise _err(dataset, path, f"{where} is a {type(matrix).__name__}, not a dense or sparse matrix")
    values = csr.data
    if values.dtype.kind not in "biuf":
        raise _err(dataset, path, f"{where} has dtype {values.dtype}; raw counts must be numbers")
    checks = [("NaN or infinite", ~np.isfinite(values) if values.dtype.kind == "f" else None),
              ("negative", values < 0 if values.dtype.kind in "if" else None),
              ("non-integer", (values != np.rint(values)) if values.dtype.kind == "f" else None)]
    for problem, mask in checks:
        if mask is not None and mask.any():
            i = int(np.flatnonzero(mask)[0])
            row = int(np.searchsorted(csr.indptr, i, side="right") - 1)
            raise _err(dataset, path, f"{where} holds {int(mask.sum())} {problem} count(s), e.g. {values[i]!r} at cell "
                                      f"{obs_names[row]!r}, gene {var_names[int(csr.indices[i])]!r}: raw counts must be "
                                      "finite non-negative integers")
    peak = float(values.max()) if values.size else 0.0
    return csr.astype(np.float32 if peak <= 2**24 else np.float64)


def _read_h5ad_without_obsm(path: Path, dataset: str) -> tuple[sp.csr_matrix, pd.DataFrame, pd.DataFrame, str]:
    """Counts, obs and var of an ``.h5ad`` file, read element by element: ``obsm`` is never opened."""
    import h5py
    from anndata.io import read_elem

    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as exc:
        raise _err(dataset, path, f"not an AnnData file: unreadable ({exc})") from exc
    if not is_hdf5:
        raise _err(dataset, path, "not an AnnData file: not HDF5 (an .h5ad file is HDF5 with obs and var groups)")
    try:
        with h5py.File(path, "r") as fh:
            groups = sorted(fh.keys())
            missing = [g for g in ("obs", "var") if g not in groups]
            if missing:
                raise _err(dataset, path, f"not an AnnData file: HDF5 without the AnnData group(s) {missing} "
                                          f"(top level holds {groups or 'nothing'})")
            obs, var = read_elem(fh["obs"]), read_elem(fh["var"])
            if "layers" in fh and "counts" in fh["layers"]:
                where, matrix = 'layers["counts"]', read_elem(fh["layers"]["counts"])
            elif "X" in fh:
                where, matrix = "X", read_elem(fh["X"])
            else:
                raise _err(dataset, path, 'no counts: the file has neither layers["counts"] nor X')
    except CellDatasetError:
        raise
    except Exception as exc:  # any reader failure, re-raised naming the dataset and the file
        raise _err(dataset, path, f"cannot read as AnnData ({type(exc).__name__}: {exc})") from exc
    return matrix, obs, var, where


def read_cell_dataset(source: str | Path, dataset: str) -> ad.AnnData:
    """The dataset at ``source`` as AnnData: raw counts in ``X`` (CSR), ``obs``, ``var``; no ``obsm``.

    Bad input (not AnnData, no counts, NaN / negative / non-integer counts, no cells, no genes,
    duplicate cell names) is a :class:`CellDatasetError` naming the dataset and the problem."""
    import anndata as ad

    source = Path(source)
    if source.is_file() and source.name.endswith(ANNDATA_SUFFIX):
        matrix, obs, var, where = _read_h5ad_without_obsm(source, dataset)
    elif source.is_file() and source.name.endswith(TENX_H5_SUFFIX):
        import scanpy as sc

        try:
            tenx = sc.read_10x_h5(source)
        except Exception as exc:  # any reader failure, re-raised naming the dataset and the file
            raise _err(dataset, source, f"cannot read as a 10x HDF5 matrix ({type(exc).__name__}: {exc})") from exc
        matrix, obs, var, where = tenx.X, tenx.obs, tenx.var, "the 10x matrix"
    elif source.is_dir():
        import scanpy as sc

        folder = _mtx_folder(source)
        if folder is None:
            raise _err(dataset, source, "no matrix.mtx[.gz] in the folder or its filtered_feature_bc_matrix/")
        try:
            tenx = sc.read_10x_mtx(folder, var_names="gene_symbols", gex_only=True)
        except Exception as exc:  # any reader failure, re-raised naming the dataset and the file
            raise _err(dataset, folder, f"cannot read as a 10x MTX folder ({type(exc).__name__}: {exc})") from exc
        matrix, obs, var, where = tenx.X, tenx.obs, tenx.var, "the 10x matrix"
    else:
        raise _err(dataset, source, "no dataset here: expected a .h5ad file, a 10x .h5 file or a 10x MTX folder")
    obs, var = pd.DataFrame(obs), pd.DataFrame(var)
    if len(obs) == 0 or len(var) == 0:
        raise _err(dataset, source, f"the counts matrix is empty ({len(obs)} cells x {len(var)} genes)")
    if obs.index.has_duplicates:
        dup = obs.index[obs.index.duplicated()][:3].tolist()
        raise _err(dataset, source, f"cell names (obs_names) must be unique; repeated: {dup}")
    if tuple(matrix.shape) != (len(obs), len(var)):
        raise _err(dataset, source, f"{where} has shape {tuple(matrix.shape)}, obs/var say {(len(obs), len(var))}")
    counts = _check_counts(matrix, dataset, source, where, obs.index, var.index)
    var.index = var.index.astype(str)
    adata = ad.AnnData(X=counts, obs=obs, var=var)
    adata.var_names_make_unique()
    adata.uns["cell_dataset"] = {"source": str(source.resolve()), "counts_from": where}
    return adata


def has_truth(source: str | Path) -> bool:
    """Whether the dataset at ``source`` is an ``.h5ad`` file holding ``obsm["spatial_truth"]``
    (only the file's group names are read)."""
    import h5py

    source = Path(source)
    if not (source.is_file() and source.name.endswith(ANNDATA_SUFFIX) and h5py.is_hdf5(source)):
        return False
    with h5py.File(source, "r") as fh:
        return "obsm" in fh and TRUTH_KEY in fh["obsm"]


def read_truth(source: str | Path, dataset: str, obs_names) -> np.ndarray:
    """``obsm["spatial_truth"]`` of an ``.h5ad`` dataset, in the order of ``obs_names``
    (the evaluation's reader; the placement never calls it)."""
    import h5py
    from anndata.io import read_elem

    source = Path(source)
    if not (source.is_file() and source.name.endswith(ANNDATA_SUFFIX)):
        raise _err(dataset, source, f"no hidden positions: only an .h5ad dataset can carry obsm['{TRUTH_KEY}']")
    with h5py.File(source, "r") as fh:
        if "obsm" not in fh or TRUTH_KEY not in fh["obsm"]:
            raise _err(dataset, source, f"no hidden positions: the file has no obsm['{TRUTH_KEY}']")
        truth = np.asarray(read_elem(fh["obsm"][TRUTH_KEY]), dtype=np.float64)
        names = pd.Index(read_elem(fh["obs"]).index.astype(str))
    if truth.ndim != 2 or truth.shape[0] != len(names) or truth.shape[1] < 2:
        raise _err(dataset, source, f"obsm['{TRUTH_KEY}'] has shape {truth.shape}; expected ({len(names)}, 2)")
    if not np.isfinite(truth).all():
        raise _err(dataset, source, f"obsm['{TRUTH_KEY}'] holds {int((~np.isfinite(truth)).sum())} non-finite values")
    order = names.get_indexer(pd.Index(obs_names).astype(str))
    if (order < 0).any():
        raise _err(dataset, source, f"{int((order < 0).sum())} placed cells are not in the dataset file "
                                    "(the file changed since the placement: rematerialize geometry/cell_placement)")
    return truth[order, :2]


# --------------------------------------------------------------------------- slide -> cells


@dataclass(frozen=True)
class CellSplit:
    cells_per_spot: int = 2
    seed: int = 0


def _spot_radius(adata: ad.AnnData, slide_id: str, coords: np.ndarray) -> float:
    """Half the spot diameter the slide records, else a quarter of the median distance between neighbouring spots."""
    factors = adata.uns.get("spatial", {}).get(slide_id, {}).get("scalefactors", {})
    diameter = factors.get("spot_diameter_fullres")
    if diameter:
        return float(diameter) / 2.0
    from sklearn.neighbors import NearestNeighbors

    dist = NearestNeighbors(n_neighbors=2).fit(coords).kneighbors(coords)[0][:, 1]
    return float(np.median(dist)) / 4.0


def cells_from_slide(adata: ad.AnnData, slide_id: str, split: CellSplit = CellSplit()) -> ad.AnnData:
    """An expression-only cell dataset made from the spots on tissue of ``adata`` (a read slide).

    Each spot becomes ``cells_per_spot`` cells: its counts are divided among them (each count
    to one cell, with the spot's own random shares), each cell sits at a uniform random point
    of the spot's disc. Positions (the slide's units) are kept only in ``obsm["spatial_truth"]``,
    the slide's labels (``obs["truth"]``) become ``obs["cell_type"]``; cells are shuffled."""
    import anndata as ad

    if split.cells_per_spot < 1:
        raise ValueError(f"cells_per_spot must be at least 1, got {split.cells_per_spot}")
    keep = np.ones(adata.n_obs, dtype=bool)
    if "in_tissue" in adata.obs:
        keep = adata.obs["in_tissue"].to_numpy() == 1
    spots = adata[keep]
    if spots.n_obs == 0:
        raise ValueError(f"slide {slide_id}: no spots on tissue to split into cells")
    counts = spots.layers["counts"] if "counts" in spots.layers else spots.X
    counts = sp.csr_matrix(counts)
    if (counts.data < 0).any() or not np.all(counts.data == np.rint(counts.data)):
        raise ValueError(f"slide {slide_id}: counts are not non-negative integers; cells need raw counts")
    coords = np.asarray(spots.obsm["spatial"], dtype=np.float64)
    radius = _spot_radius(spots, slide_id, coords)
    rng = np.random.default_rng(split.seed)
    c, n_spots = split.cells_per_spot, spots.n_obs
    shares = rng.dirichlet(np.ones(c), size=n_spots)  # (spots, cells)
    rows = np.repeat(np.arange(n_spots), np.diff(counts.indptr))
    remaining = counts.data.astype(np.int64)
    left = np.ones(n_spots)
    parts = []
    for j in range(c):
        if j == c - 1:
            take = remaining
        else:
            p = np.clip(shares[rows, j] / np.maximum(left[rows], 1e-12), 0.0, 1.0)
            take = rng.binomial(remaining, p)
            left = left - shares[:, j]
        remaining = remaining - take
        parts.append(sp.csr_matrix((take.astype(np.int32), counts.indices, counts.indptr), shape=counts.shape))
    # Cell j of spot i is row j * n_spots + i; then one shuffle of all cells.
    stacked = sp.vstack(parts).tocsr()
    stacked.eliminate_zeros()
    angle = rng.uniform(0.0, 2 * np.pi, size=c * n_spots)
    dist = radius * np.sqrt(rng.uniform(0.0, 1.0, size=c * n_spots))
    positions = np.tile(coords, (c, 1)) + np.c_[dist * np.cos(angle), dist * np.sin(angle)]
    barcodes = np.asarray(spots.obs_names, dtype=str)
    names = np.array([f"{b}-cell{j + 1}" for j in range(c) for b in barcodes])
    order = rng.permutation(c * n_spots)
    obs = pd.DataFrame(index=pd.Index(names[order], name=None))
    obs["source_spot"] = np.tile(barcodes, c)[order]
    if "truth" in spots.obs:
        labels = np.tile(spots.obs["truth"].astype(object).to_numpy(), c)[order]
        labels = np.array([None if v is None or str(v) in ("nan", "NA", "<NA>", "None", "") else str(v) for v in labels],
                          dtype=object)
        obs[CELL_TYPE] = pd.Categorical(labels)
    var = pd.DataFrame(index=spots.var_names.astype(str))
    for column in ("gene_ids", "feature_types"):
        if column in spots.var:
            var[column] = spots.var[column].astype(str).to_numpy()
    cells = ad.AnnData(X=stacked[order].astype(np.float32), obs=obs, var=var)
    cells.obsm[TRUTH_KEY] = positions[order]
    cells.uns["cells_from_slide"] = {
        "slide_id": slide_id, "cells_per_spot": c, "seed": split.seed, "n_spots": int(n_spots),
        "spot_radius": radius,
        "method": "counts of each spot divided among its cells (multinomial with Dirichlet(1) shares per spot); "
                  "each cell at a uniform point of the spot's disc; positions only in obsm['spatial_truth']",
    }
    return cells


def write_cells(cells: ad.AnnData, target: str | Path) -> Path:
    """Write ``cells`` atomically to ``target`` (an ``.h5ad`` path)."""
    from ..fileio import atomic_path

    target = Path(target)
    with atomic_path(target) as tmp:
        cells.write_h5ad(tmp)
    return target
