"""The frozen expression encoder that turns each spot's counts into geometry features.

Two kinds, both frozen before any held-out slide is seen:

* ``shared_pca``: genes common to every slide -> normalize_total(1e4) -> log1p -> the most
  spatially variable genes *of the training slides* (Moran's I) -> each gene centred and
  scaled within its slide (removes slide-level batch offsets) -> PCA fitted on the training
  spots. One basis for every slide, so held-out slides land in the space
  the model was trained in.
* a stored gene embedding of a pretrained encoder (``scgpt``): same network for every
  slide; only the z-scoring statistics come from the training slides.

Per-slide fitted embeddings (``pca``, ``mlp`` in the embeddings family) are refused: each
slide gets its own basis, so features of two slides are not comparable.

The output is scaled once, here (normalising twice silently changes results).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Mapping

import numpy as np
import scipy.sparse as sp

from .targets import GeometryInputError

if TYPE_CHECKING:
    import anndata as ad

# Embeddings fitted per slide: their bases differ between slides.
PER_SLIDE_ENCODERS = ("pca", "mlp")


def _log_normalized(adata: ad.AnnData, genes: list[str], slide_id: str) -> np.ndarray:
    counts = adata.layers["counts"] if "counts" in adata.layers else adata.X
    counts = counts[:, adata.var_names.get_indexer(genes)]
    counts = counts.toarray() if sp.issparse(counts) else np.asarray(counts)
    counts = counts.astype(np.float64)
    if counts.shape[0] == 0:
        raise GeometryInputError(f"slide {slide_id}: no spots")
    if not np.isfinite(counts).all() or (counts < 0).any():
        raise GeometryInputError(f"slide {slide_id}: counts must be finite and >= 0 (matrix {counts.shape})")
    totals = counts.sum(axis=1, keepdims=True)
    if (totals == 0).any():
        raise GeometryInputError(f"slide {slide_id}: {int((totals == 0).sum())} spots have zero counts over the {len(genes)} shared genes")
    return np.log1p(counts / totals * 1e4)


def _within_slide_z(x: np.ndarray) -> np.ndarray:
    """Centre and scale every gene within one slide: slide-level offsets (batch effects) go,
    within-slide variation (where the geometry is) stays. Uses expression only, never coordinates."""
    std = x.std(axis=0)
    return (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)


@dataclass
class SharedPCAEncoder:
    """Frozen: gene list, PCA basis and feature scale, all from the training slides."""

    genes: list[str]
    components: np.ndarray  # (k, n_genes)
    score_scale: float  # one scale for all components: their relative variances carry the signal
    explained_variance_ratio: np.ndarray
    morans_i: float  # mean Moran's I of the chosen genes on the training slides
    n_shared_genes: int = 0  # genes present in every slide, the ones the encoder chose from
    # Ensembl ids of `genes` (from the training slides' var["gene_ids"]), so cells named by id can be encoded
    gene_ids: list[str] | None = None

    def transform(self, adata: ad.AnnData, slide_id: str) -> np.ndarray:
        missing = [g for g in self.genes if g not in adata.var_names]
        if missing:
            raise GeometryInputError(f"slide {slide_id}: {len(missing)} encoder genes missing (first: {missing[:5]})")
        x = _within_slide_z(_log_normalized(adata, self.genes, slide_id))
        return ((x @ self.components.T) / self.score_scale).astype(np.float32)

    def describe(self) -> dict:
        return {
            "encoder": "shared_pca",
            "n_genes": len(self.genes),
            "n_components": int(self.components.shape[0]),
            "explained_variance_total": float(self.explained_variance_ratio.sum()),
            "genes_mean_morans_i": round(self.morans_i, 4),
            "n_shared_genes": self.n_shared_genes,
            "fitted_on": "training slides only",
            "normalization": "normalize_total(1e4) -> log1p -> spatially variable genes (Moran's I, training slides) -> "
                             "z-score per gene within each slide -> PCA (training) -> / RMS of the first component",
        }

    def state(self) -> dict:
        """Arrays to store beside a checkpoint so new data can be encoded the same way."""
        ids = {"gene_ids": list(self.gene_ids)} if self.gene_ids is not None else {}
        return {
            **ids,
            "genes": list(self.genes),
            "components": self.components.astype(np.float32),
            "score_scale": np.float32(self.score_scale),
        }


def morans_i(values: np.ndarray, coords: np.ndarray, k: int = 6) -> np.ndarray:
    """Moran's I of every column of ``values`` on the k-nearest-neighbour graph of ``coords``
    (row-standardised weights): about 0 for spatial noise, towards 1 for smooth patterns."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(coords) - 1)
    neighbours = NearestNeighbors(n_neighbors=k + 1).fit(coords).kneighbors(coords, return_distance=False)[:, 1:]
    z = values - values.mean(axis=0)
    lag = z[neighbours].mean(axis=1)
    return (z * lag).sum(axis=0) / np.maximum((z * z).sum(axis=0), 1e-12)


def fit_shared_pca(train: Mapping[str, ad.AnnData], all_slides: Mapping[str, ad.AnnData],
                   n_genes: int, n_components: int, seed: int = 0, min_shared_genes: int = 2) -> SharedPCAEncoder:
    """Fit the encoder on ``train`` slides, over genes present in every slide of ``all_slides``.

    Slides whose gene lists differ (each keeping its own top genes, as public data often does)
    share the genes they all have; fewer than ``min_shared_genes`` of them is an error naming
    every slide's gene count. The count is recorded (``n_shared_genes``).

    Genes are chosen by spatial autocorrelation on the training slides (mean Moran's I),
    not by dispersion: a geometry model needs the genes whose expression follows position,
    and over-dispersed genes without spatial pattern only add noise.
    """
    from sklearn.decomposition import PCA

    if not train:
        raise GeometryInputError("shared_pca: no training slides")
    common = None
    for adata in all_slides.values():
        names = set(map(str, adata.var_names))
        common = names if common is None else common & names
    genes = sorted(common or [])
    if len(genes) < max(2, min_shared_genes):
        per_slide = {sid: int(a.n_vars) for sid, a in all_slides.items()}
        raise GeometryInputError(
            f"shared_pca: the slides share only {len(genes)} genes (genes per slide: {per_slide}); the geometry "
            f"encoder needs at least {max(2, min_shared_genes)} genes present in every training and held-out slide "
            "(MIHD_GEOMETRY_MIN_SHARED_GENES): train on slides with more genes in common, or drop the slide "
            "with the fewest")
    logs = {sid: _log_normalized(a, genes, sid) for sid, a in train.items()}
    score = np.mean([morans_i(logs[sid], np.asarray(train[sid].obsm["spatial"], dtype=float)) for sid in logs], axis=0)
    keep = np.sort(np.argsort(np.nan_to_num(score, nan=-np.inf))[::-1][: min(n_genes, len(genes))])
    z = np.vstack([_within_slide_z(v[:, keep]) for v in logs.values()])
    k = min(n_components, min(z.shape) - 1)
    if k < 1:
        raise GeometryInputError(f"shared_pca: training matrix {z.shape} too small for PCA")
    pca = PCA(n_components=k, random_state=seed).fit(z)
    # One scale for every component (the first's RMS): whitening each component would give the
    # many noise components the weight of the few that carry the tissue's structure.
    return SharedPCAEncoder(
        genes=[genes[i] for i in keep], components=pca.components_,
        score_scale=float(np.sqrt(pca.explained_variance_[0])), explained_variance_ratio=pca.explained_variance_ratio_,
        morans_i=float(np.mean(score[keep])), n_shared_genes=len(genes),
        gene_ids=_gene_ids(train, [genes[i] for i in keep]),
    )


def _gene_ids(slides: Mapping[str, ad.AnnData], genes: list[str]) -> list[str] | None:
    """The Ensembl ids of ``genes`` from the first slide that records ``var["gene_ids"]``, else None."""
    for adata in slides.values():
        if "gene_ids" in adata.var.columns:
            ids = adata.var["gene_ids"].astype(str)
            return [str(ids.iloc[adata.var_names.get_loc(g)]) for g in genes]
    return None


def standardize_embeddings(encoder: str, values: Mapping[str, np.ndarray], train_ids: list[str]) -> tuple[dict, dict]:
    """Z-score stored embeddings of a frozen encoder with statistics of the training slides."""
    if encoder in PER_SLIDE_ENCODERS:
        raise GeometryInputError(
            f"gene encoder '{encoder}' is fitted per slide (each slide has its own basis), so its features "
            "cannot be compared across slides; use 'shared_pca' or a pretrained encoder such as 'scgpt'"
        )
    widths = {sid: v.shape[1] for sid, v in values.items()}
    if len(set(widths.values())) != 1:
        raise GeometryInputError(f"embedding '{encoder}' has different widths per slide: {widths}")
    train = np.vstack([values[s] for s in train_ids]).astype(np.float64)
    mean, std = train.mean(axis=0), train.std(axis=0)
    std[std == 0] = 1.0
    out = {sid: ((v - mean) / std).astype(np.float32) for sid, v in values.items()}
    return out, {"encoder": f"embedding:{encoder}", "n_components": int(train.shape[1]),
                 "normalization": "z-score with training-slide statistics", "fitted_on": "pretrained (frozen)"}
