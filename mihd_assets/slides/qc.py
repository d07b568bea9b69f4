"""Per-slide quality-control numbers (one row per slide in DuckDB ``slide_qc``)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import anndata as ad
import scipy.sparse as sp


def slide_qc(adata: ad.AnnData, slide_id: str, frac_on_tissue_image: float | None) -> dict:
    """Spots, genes, UMI and tissue coverage of a raw slide (counts in ``layers['counts']``)."""
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    counts = counts.tocsr() if sp.issparse(counts) else sp.csr_matrix(counts)
    umi = np.asarray(counts.sum(axis=1)).ravel()
    genes_per_spot = np.diff(counts.indptr)
    meta = adata.uns["spatial"][slide_id]["metadata"]
    n_positions = int(meta["n_positions"])
    labelled = int(adata.obs["truth"].notna().sum()) if "truth" in adata.obs else 0
    return {
        "slide_id": slide_id,
        "n_spots": int(adata.n_obs),
        "n_genes": int(adata.n_vars),
        "n_genes_detected": int((np.asarray(counts.sum(axis=0)).ravel() > 0).sum()),
        "total_umi": float(umi.sum()),
        "median_umi_per_spot": float(np.median(umi)),
        "median_genes_per_spot": float(np.median(genes_per_spot)),
        "n_positions": n_positions,
        "n_positions_in_tissue": int(meta["n_positions_in_tissue"]),
        "frac_positions_in_tissue": float(meta["n_positions_in_tissue"]) / max(n_positions, 1),
        "frac_spots_on_tissue_image": frac_on_tissue_image,
        "n_spots_labelled": labelled,
        "counts_format": str(meta["counts_format"]),
        "positions_format": str(meta["positions_format"]),
    }
