"""Content fingerprints of slide data: what Dagster's data versions of slide assets are made of."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from ..fileio import tree_fingerprint


def _update_array(digest, values) -> None:
    array = np.ascontiguousarray(np.asarray(values))
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    if array.dtype == object:
        digest.update("\x1f".join(map(str, array.ravel().tolist())).encode())
    else:
        digest.update(array.tobytes())


def anndata_content_hash(adata, obs_columns: tuple[str, ...] = ("in_tissue", "array_row", "array_col", "truth")) -> str:
    """A hash of what a raw slide holds: counts, spot and gene names, coordinates, the named
    ``obs`` columns, the scale factors and the stored images.

    Two reads of unchanged files give the same hash whatever the files' timestamps, so a
    touched file makes ``raw_slide`` re-run (cheap) without making its downstream assets stale.
    """
    digest = hashlib.sha256()
    x = adata.X
    if sp.issparse(x):
        x = x.tocsr()
        for part in (x.data, x.indices, x.indptr, np.asarray(x.shape)):
            _update_array(digest, part)
    else:
        _update_array(digest, x)
    _update_array(digest, np.asarray(adata.obs_names, dtype=object))
    _update_array(digest, np.asarray(adata.var_names, dtype=object))
    if "spatial" in adata.obsm:
        _update_array(digest, adata.obsm["spatial"])
    for column in obs_columns:
        if column in adata.obs:
            _update_array(digest, adata.obs[column].astype(object).where(adata.obs[column].notna(), None).to_numpy())
    for library, info in sorted(dict(adata.uns.get("spatial", {})).items()):
        digest.update(str(library).encode())
        digest.update(json.dumps({k: float(v) for k, v in dict(info.get("scalefactors", {})).items()},
                                 sort_keys=True).encode())
        for name, image in sorted(dict(info.get("images", {})).items()):
            digest.update(name.encode())
            _update_array(digest, image)
    return digest.hexdigest()[:20]


def source_fingerprint(source) -> str:
    """Cheap fingerprint of a slide's input: for a folder, :func:`~mihd_assets.fileio.tree_fingerprint`
    (every file's relative path, size and modification time); for a single file (an ``.h5ad``
    slide), its name, size and modification time. A missing source is a FileNotFoundError."""
    source = Path(source)
    if source.is_dir():
        return tree_fingerprint(source)
    stat = source.stat()
    digest = hashlib.sha256(f"{source.name}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:16]
