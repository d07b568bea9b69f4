"""Expression preprocessing as named presets of explicit, ordered steps.

The order of steps matters and is easy to get backwards (STAIG was once believed to
normalise before selecting genes; it selects them on raw counts first). Here a preset
*is* its ordered list of steps, and the list that actually ran is returned so it can be
recorded with the result.

STAIG's reference order (its ``adata_processing.py``): seurat_v3 highly variable genes
on raw counts (3,000) -> normalize_total(1e4) -> log1p -> scale(zero_center=False,
max_value=10); its model input is the 3,000-HVG matrix, not PCA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import logging
from dataclasses import dataclass, field

import numpy as np

if TYPE_CHECKING:
    import anndata as ad
import scipy.sparse as sp

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Step:
    name: str
    params: dict = field(default_factory=dict)

    def describe(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.name}({args})"


PRESETS: dict[str, tuple[Step, ...]] = {
    # scanpy's textbook path: HVGs chosen on raw counts, then normalise (all genes), log,
    # subset, scale to unit variance without clipping (sc.pp.scale's default max_value=None).
    # Clipping at 10 (the old default here) rewrote 10,287 values of the spatialLIBD 151676
    # HVG matrix (rare high counts of sparse genes, > 10 SD), and rotated its 30-PC subspace
    # away from the unclipped one (mean principal-angle cosine 0.895); filter_genes only
    # drops genes without counts, which changes neither the HVGs nor the size factors.
    "standard": (
        Step("filter_genes", {"min_cells": 1}),
        Step("highly_variable_genes", {"flavor": "seurat_v3", "n_top_genes": 3000, "layer": "counts"}),
        Step("normalize_total", {"target_sum": 1e4}),
        Step("log1p"),
        Step("subset_highly_variable"),
        Step("scale", {"zero_center": True, "max_value": None}),
    ),
    # STAIG's reference order (its adata_processing.py): HVGs on raw counts first.
    "staig": (
        Step("filter_genes", {"min_cells": 1}),
        Step("highly_variable_genes", {"flavor": "seurat_v3", "n_top_genes": 3000, "layer": None}),
        Step("normalize_total", {"target_sum": 1e4}),
        Step("log1p"),
        Step("scale", {"zero_center": False, "max_value": 10.0}),
        Step("subset_highly_variable"),
    ),
}


class PreprocessError(ValueError):
    pass


def _dense(x):
    return x.toarray() if sp.issparse(x) else np.asarray(x)


def _run_step(adata: ad.AnnData, step: Step, notes: list[str]) -> ad.AnnData:
    import scanpy as sc

    p = dict(step.params)
    if step.name == "filter_genes":
        sc.pp.filter_genes(adata, **p)
    elif step.name == "highly_variable_genes":
        n_top = int(p.pop("n_top_genes"))
        if n_top > adata.n_vars:
            notes.append(f"highly_variable_genes: n_top_genes {n_top} > {adata.n_vars} genes; all genes kept")
            n_top = adata.n_vars
        sc.pp.highly_variable_genes(adata, n_top_genes=n_top, **p)
    elif step.name == "normalize_total":
        sc.pp.normalize_total(adata, **p)
    elif step.name == "log1p":
        sc.pp.log1p(adata)
    elif step.name == "scale":
        adata.X = _dense(adata.X).astype(np.float32)
        sc.pp.scale(adata, **p)
    elif step.name == "subset_highly_variable":
        if "highly_variable" not in adata.var:
            raise PreprocessError("subset_highly_variable needs highly_variable_genes earlier in the steps")
        adata = adata[:, adata.var["highly_variable"].to_numpy()].copy()
    elif step.name == "pca":
        sc.pp.pca(adata, **p)
    else:
        raise PreprocessError(f"unknown preprocessing step {step.name!r}")
    return adata


def resolve_steps(preset: str, steps_override: list[str] | None = None) -> tuple[Step, ...]:
    """The steps a preset stands for, or an explicit override given as step names in order.

    An override keeps the preset's parameters for steps it names and is reported by the
    caller as an override (never silent).
    """
    if preset not in PRESETS:
        raise PreprocessError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    base = PRESETS[preset]
    if not steps_override:
        return base
    by_name = {s.name: s for s in base}
    return tuple(by_name.get(name, Step(name)) for name in steps_override)


def preprocess(
    adata: ad.AnnData, preset: str = "standard", steps_override: list[str] | None = None
) -> tuple[ad.AnnData, list[str], list[str]]:
    """Apply a preset to a copy of ``adata``.

    Returns the processed AnnData (raw counts kept in ``layers["counts"]``, the steps in
    ``uns["preprocess"]``), the ordered step descriptions that ran, and notes about any
    adjustment made (e.g. fewer genes than ``n_top_genes``).
    """
    steps = resolve_steps(preset, steps_override)
    out = adata.copy()
    if "counts" not in out.layers:
        out.layers["counts"] = out.X.copy()
    # Raw counts must be integers for seurat_v3; fail here rather than deep in a loess fit.
    counts = out.layers["counts"]
    values = counts.data if sp.issparse(counts) else np.asarray(counts).ravel()
    if values.size and (np.any(values < 0) or not np.allclose(values, np.round(values))):
        raise PreprocessError("layers['counts'] must hold non-negative integer counts")
    out.X = out.X.astype(np.float32)
    ran: list[str] = []
    notes: list[str] = []
    for step in steps:
        out = _run_step(out, step, notes)
        ran.append(step.describe())
        if out.n_vars == 0 or out.n_obs == 0:
            raise PreprocessError(f"step {step.describe()} left an empty matrix {out.shape}")
    X = _dense(out.X) if not sp.issparse(out.X) else out.X.data
    if not np.all(np.isfinite(X)):
        raise PreprocessError("preprocessing produced non-finite values")
    out.uns["preprocess"] = {
        "preset": preset,
        "steps": ran,
        "override": bool(steps_override),
        "notes": notes,
    }
    return out, ran, notes
