"""Placing an expression-only dataset with a trained geometry checkpoint: one layout of all its cells.

1. **Genes.** Each gene of the checkpoint's frozen encoder is looked up in the dataset: by
   symbol (``var_names`` or a symbol column of ``var``), then by Ensembl id (version suffix
   ignored; the checkpoint keeps the training slides' ids when they had them), then by symbol
   ignoring case. The share of encoder genes found is the coverage; the asset refuses a
   dataset below its configured minimum.
2. **Encoding.** As the encoder encodes a slide: the encoder genes' counts normalised to
   1e4 per cell (over the genes found), log1p, each gene centred and scaled within the
   dataset, projected on the frozen PCA basis. A gene the dataset lacks enters as 0 (its
   mean), so it adds nothing.
3. **Sets.** The model saw random sets of spots of the trained size; cells are laid out in
   random sets of that size too. Per pass, a random share ``overlap`` of each set is the
   pass's anchor cells, common to all its sets; the rest of each set is the pass's next cells,
   so every cell lies in at least one set per pass and the number of sets grows linearly with
   the number of cells.
4. **Join.** The generator's estimate of each set (canonical frame) is rotated/reflected and
   translated (orthogonal Procrustes) onto the pass's first set over the anchors; a pass's
   layout is the mean of its aligned estimates. Passes are aligned onto the first over all
   cells and averaged; then every set is re-aligned onto that consensus over all its cells
   and the consensus recomputed (generalised Procrustes), a few times. A cell's position is
   the mean of its aligned estimates; their RMS distance from it is its ``spread``.

Nothing here reads positions: the only inputs are counts, gene names and the checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Mapping

import numpy as np
import pandas as pd
import scipy.sparse as sp

from .cells import GENE_NAME_COLUMNS, CellDatasetError

PLACEMENT_METHOD = (
    "random sets of the trained size with per-pass anchor cells -> generator estimate per set "
    "(canonical frame) -> orthogonal Procrustes onto the pass's first set over the anchors -> passes "
    "aligned over all cells -> generalised Procrustes refinement -> mean of each cell's aligned estimates"
)
ENCODER_KIND = "shared_pca"


def _as_array(value) -> np.ndarray:
    if hasattr(value, "numpy"):
        return value.detach().cpu().numpy() if hasattr(value, "detach") else value.numpy()
    return np.asarray(value)


@dataclass
class FrozenEncoder:
    """The checkpoint's expression encoder: genes (symbols, and Ensembl ids when recorded), PCA basis, scale."""

    genes: list[str]
    gene_ids: list[str] | None
    components: np.ndarray  # (k, n_genes)
    score_scale: float

    @classmethod
    def from_checkpoint(cls, saved: Mapping, path, dataset: str) -> "FrozenEncoder":
        """The encoder a checkpoint carries; a checkpoint of another encoder, or one whose encoder
        does not fit its model, is a :class:`CellDatasetError` naming the dataset and the file."""
        where = f"cell dataset '{dataset}': geometry checkpoint {path}"
        enc = saved.get("encoder")
        if not isinstance(enc, Mapping):
            raise CellDatasetError(f"{where} carries no frozen expression encoder, so new cells cannot be encoded "
                                   "as its training spots were; rematerialize geometry/geometry_checkpoint")
        kind = enc.get("kind")
        if kind != ENCODER_KIND:
            raise CellDatasetError(
                f"{where} was trained on features of the encoder {kind!r}, not {ENCODER_KIND!r}: placement encodes "
                f"cells from their counts with the checkpoint's own frozen {ENCODER_KIND!r} encoder. Train the "
                f"checkpoint with MIHD_GEOMETRY_ENCODER={ENCODER_KIND} to place cells")
        try:
            genes = [str(g) for g in enc["genes"]]
            components = _as_array(enc["components"]).astype(np.float64)
            scale = float(_as_array(enc["score_scale"]))
        except KeyError as exc:
            raise CellDatasetError(f"{where}: its encoder lacks {exc.args[0]!r}") from None
        ids = enc.get("gene_ids")
        gene_ids = [str(g) for g in ids] if ids is not None else None
        in_dim = int(saved.get("model_config", {}).get("in_dim", -1))
        if components.ndim != 2 or components.shape != (in_dim, len(genes)):
            raise CellDatasetError(
                f"{where}: its encoder (basis {components.shape}, {len(genes)} genes) does not fit its model "
                f"(input width {in_dim}): the encoder and the network come from different trainings")
        if gene_ids is not None and len(gene_ids) != len(genes):
            raise CellDatasetError(f"{where}: {len(gene_ids)} gene ids for {len(genes)} encoder genes")
        if not math.isfinite(scale) or scale <= 0:
            raise CellDatasetError(f"{where}: encoder feature scale {scale!r} is not a positive number")
        return cls(genes, gene_ids, components, scale)


# --------------------------------------------------------------------------- genes


def _strip_version(name: str) -> str:
    """``ENSG00000141510.17`` -> ``ENSG00000141510``; other names unchanged."""
    if name.upper().startswith("ENS"):
        head, dot, tail = name.rpartition(".")
        if dot and tail.isdigit():
            return head
    return name


@dataclass
class GeneMapping:
    """Per encoder gene, the dataset's column holding it (-1: missing)."""

    columns: np.ndarray
    matched_by: dict[str, int]
    missing: list[str]
    n_encoder_genes: int

    @property
    def n_matched(self) -> int:
        return int((self.columns >= 0).sum())

    @property
    def coverage(self) -> float:
        return self.n_matched / self.n_encoder_genes if self.n_encoder_genes else 0.0


def map_genes(encoder: FrozenEncoder, var: pd.DataFrame) -> GeneMapping:
    """Find each encoder gene among the dataset's genes (symbol, Ensembl id, symbol ignoring case)."""
    names = [list(map(str, var.index))]
    names += [list(map(str, var[c].astype(str))) for c in GENE_NAME_COLUMNS if c in var.columns]
    exact: dict[str, int] = {}
    stripped: dict[str, int] = {}
    folded: dict[str, int] = {}
    for column_names in names:
        for i, name in enumerate(column_names):
            exact.setdefault(name, i)
            stripped.setdefault(_strip_version(name), i)
            folded.setdefault(name.upper(), i)
    columns = np.full(len(encoder.genes), -1, dtype=np.int64)
    matched_by = {"symbol": 0, "ensembl_id": 0, "symbol_ignoring_case": 0}
    missing = []
    for g, symbol in enumerate(encoder.genes):
        gene_id = encoder.gene_ids[g] if encoder.gene_ids else None
        if symbol in exact:
            columns[g], how = exact[symbol], "symbol"
        elif gene_id and _strip_version(gene_id) in stripped:
            columns[g], how = stripped[_strip_version(gene_id)], "ensembl_id"
        elif symbol.upper() in folded:
            columns[g], how = folded[symbol.upper()], "symbol_ignoring_case"
        else:
            missing.append(symbol)
            continue
        matched_by[how] += 1
    return GeneMapping(columns, matched_by, missing, len(encoder.genes))


def require_coverage(mapping: GeneMapping, minimum: float, dataset: str, encoder: FrozenEncoder) -> None:
    """A :class:`CellDatasetError` naming the dataset, the coverage and the first missing genes when
    fewer than ``minimum`` of the encoder's genes were found."""
    if mapping.coverage >= minimum and mapping.n_matched > 0:
        return
    ids = "" if encoder.gene_ids else " (the checkpoint records no Ensembl ids: name genes by symbol)"
    raise CellDatasetError(
        f"cell dataset '{dataset}': gene coverage {mapping.coverage:.1%} ({mapping.n_matched} of "
        f"{mapping.n_encoder_genes} encoder genes found by symbol or Ensembl id) is below the minimum "
        f"{minimum:.0%}; first missing genes: {mapping.missing[:10]}{ids}")


def encode_cells(counts: sp.spmatrix | np.ndarray, mapping: GeneMapping, encoder: FrozenEncoder) -> tuple[np.ndarray, int]:
    """(features ``(n_cells, k)`` float32, number of cells without a count on any found encoder gene)."""
    present = mapping.columns >= 0
    sub = counts[:, mapping.columns[present]]
    sub = sub.toarray() if sp.issparse(sub) else np.asarray(sub)
    sub = sub.astype(np.float64)
    totals = sub.sum(axis=1, keepdims=True)
    empty = int((totals[:, 0] == 0).sum())
    x = np.log1p(sub / np.where(totals > 0, totals, 1.0) * 1e4)
    std = x.std(axis=0)
    z = np.zeros((x.shape[0], len(encoder.genes)))
    z[:, present] = (x - x.mean(axis=0)) / np.where(std > 0, std, 1.0)
    return ((z @ encoder.components.T) / encoder.score_scale).astype(np.float32), empty


# --------------------------------------------------------------------------- sets


@dataclass
class SetPlan:
    """Sets of one placement: ``index[i]`` are the cells of set ``i``, its first ``n_anchor`` the
    anchors of its pass ``pass_of_set[i]``."""

    index: np.ndarray  # (n_sets, set_size) int64
    pass_of_set: np.ndarray  # (n_sets,) int64
    n_anchor: int
    passes: int

    @property
    def set_size(self) -> int:
        return int(self.index.shape[1])

    @property
    def n_sets(self) -> int:
        return int(self.index.shape[0])


def plan_sets(n_cells: int, set_size: int, overlap: float, passes: int, seed: int, dataset: str) -> SetPlan:
    """Random anchored sets covering every cell once per pass (see the module's docstring)."""
    if n_cells < set_size:
        raise CellDatasetError(
            f"cell dataset '{dataset}': {n_cells} cells, fewer than one set of {set_size} (the set size the "
            "checkpoint was trained on); a layout needs at least that many cells")
    if not 0.0 < overlap < 1.0:
        raise ValueError(f"overlap must be between 0 and 1 (exclusive), got {overlap}")
    if passes < 1:
        raise ValueError(f"passes must be at least 1, got {passes}")
    n_anchor = min(set_size - 1, max(3, int(round(overlap * set_size))))
    fresh = set_size - n_anchor
    rng = np.random.default_rng(seed)
    sets, owners = [], []
    for p in range(passes):
        order = rng.permutation(n_cells)
        anchors, rest = order[:n_anchor], order[n_anchor:]
        for start in range(0, len(rest), fresh):
            chunk = rest[start:start + fresh]
            if len(chunk) < fresh:  # the last set is topped up with earlier cells of the pass
                chunk = np.concatenate([chunk, rng.choice(rest[:start], fresh - len(chunk), replace=False)])
            sets.append(np.concatenate([anchors, chunk]))
            owners.append(p)
    return SetPlan(np.asarray(sets, dtype=np.int64), np.asarray(owners, dtype=np.int64), n_anchor, passes)


def predict_sets(model, features: np.ndarray, index: np.ndarray, device, batch_size: int = 64, amp: bool = False,
                 refine: dict | None = None, seed: int = 0) -> np.ndarray:
    """The model's coordinates of every set ``(n_sets, set_size, dims)``: the generator's estimate
    in its canonical frame, or (``refine``: sigma_data, sigma_gen, sigma_refine, steps, sigma_stop)
    that estimate refined by the denoiser."""
    import torch

    from .evaluate import Inference

    device = torch.device(device)
    model = model.to(device).eval()
    inf = Inference(model, float(refine["sigma_data"]) if refine else 1.0, device,
                    sigma_gen=float(refine["sigma_gen"]) if refine else 0.0, amp=amp)
    generator = torch.Generator().manual_seed(seed)
    out = []
    for start in range(0, len(index), batch_size):
        rows = index[start:start + batch_size]
        feats = torch.from_numpy(np.ascontiguousarray(features[rows])).to(device)
        mask = torch.ones(feats.shape[:2], dtype=torch.bool, device=device)
        context, v = inf.generate(feats, mask)
        if refine:
            v = inf.refine(context, v, mask, refine["sigma_refine"], refine["steps"], refine["sigma_stop"], generator)
        out.append(v.float().cpu().numpy())
    return np.concatenate(out).astype(np.float64)


# --------------------------------------------------------------------------- join


def procrustes_onto(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``source`` (``(b, n, d)``) rotated/reflected and translated onto ``target`` (same shape),
    least squares per set (orthogonal Procrustes; the scale is kept)."""
    ms, mt = source.mean(axis=1, keepdims=True), target.mean(axis=1, keepdims=True)
    u, _, vt = np.linalg.svd(np.swapaxes(source - ms, 1, 2) @ (target - mt))
    return (source - ms) @ (u @ vt) + mt


def _mean_of_estimates(index: np.ndarray, coords: np.ndarray, n_cells: int) -> tuple[np.ndarray, np.ndarray]:
    dims = coords.shape[-1]
    total = np.zeros((n_cells, dims))
    count = np.zeros(n_cells)
    np.add.at(total, index.ravel(), coords.reshape(-1, dims))
    np.add.at(count, index.ravel(), 1.0)
    return total / np.maximum(count, 1.0)[:, None], count


def _transform_like(points: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """``points`` moved by the rotation/translation that takes ``source`` onto ``target`` (2-D arrays)."""
    ms, mt = source.mean(axis=0), target.mean(axis=0)
    u, _, vt = np.linalg.svd((source - ms).T @ (target - mt))
    return (points - ms) @ (u @ vt) + mt


@dataclass
class JoinedLayout:
    layout: np.ndarray  # (n_cells, dims), centred
    spread: np.ndarray  # (n_cells,) RMS distance of a cell's aligned estimates from its position
    estimates_per_cell: np.ndarray  # (n_cells,)
    aligned: np.ndarray  # (n_sets, set_size, dims): every set's estimate in the layout's frame
    refinement_rms: list[float] = field(default_factory=list)  # RMS change of the layout per refinement


def join_sets(plan: SetPlan, coords: np.ndarray, n_cells: int, refinements: int = 3) -> JoinedLayout:
    """One layout of all cells from the sets' estimates (see the module's docstring)."""
    a = plan.n_anchor
    pass_layouts = []
    for p in range(plan.passes):
        rows = np.flatnonzero(plan.pass_of_set == p)
        est = coords[rows]
        ref = np.broadcast_to(est[0, :a], est[:, :a].shape)
        # Each set's transform is fitted on its anchors and applied to the whole set.
        ms, mt = est[:, :a].mean(axis=1, keepdims=True), ref.mean(axis=1, keepdims=True)
        u, _, vt = np.linalg.svd(np.swapaxes(est[:, :a] - ms, 1, 2) @ (ref - mt))
        aligned = (est - ms) @ (u @ vt) + mt
        pass_layouts.append(_mean_of_estimates(plan.index[rows], aligned, n_cells)[0])
    consensus = pass_layouts[0]
    for _ in range(3 if plan.passes > 1 else 0):
        consensus = np.mean([_transform_like(layout, layout, consensus) for layout in pass_layouts], axis=0)
    history = []
    aligned = coords
    for _ in range(max(1, refinements)):
        aligned = procrustes_onto(coords, consensus[plan.index])
        new, count = _mean_of_estimates(plan.index, aligned, n_cells)
        history.append(float(np.sqrt(((new - consensus) ** 2).sum(axis=1).mean())))
        consensus = new
    aligned = procrustes_onto(coords, consensus[plan.index])
    layout, count = _mean_of_estimates(plan.index, aligned, n_cells)
    sq = np.zeros(n_cells)
    np.add.at(sq, plan.index.ravel(), ((aligned - layout[plan.index]) ** 2).sum(axis=-1).ravel())
    spread = np.sqrt(sq / np.maximum(count, 1.0))
    centre = layout.mean(axis=0)
    return JoinedLayout(layout - centre, spread, count, aligned - centre, history)


def knn_graph(layout: np.ndarray, k: int) -> tuple[sp.csr_matrix, sp.csr_matrix]:
    """(distances, connectivities) of the layout's k-nearest-neighbour graph: distances to each
    cell's k nearest other cells; connectivities 1 where either cell is among the other's k."""
    from sklearn.neighbors import NearestNeighbors

    k = min(k, len(layout) - 1)
    nn = NearestNeighbors(n_neighbors=k).fit(layout)
    distances = nn.kneighbors_graph(None, n_neighbors=k, mode="distance").tocsr()
    linked = nn.kneighbors_graph(None, n_neighbors=k, mode="connectivity")
    connectivities = ((linked + linked.T) > 0).astype(np.float32).tocsr()
    return distances.astype(np.float32), connectivities


def layout_figure_png(layout: np.ndarray, cell_type, title: str, dpi: int = 80) -> bytes:
    """A scatter of the layout, coloured by ``cell_type`` when given (None: one colour)."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 5.6), dpi=dpi)
    size = max(1.0, min(12.0, 6000.0 / max(len(layout), 1)))
    if cell_type is None:
        ax.scatter(layout[:, 0], layout[:, 1], s=size, c="0.35", linewidths=0)
    else:
        labels = pd.Series(pd.Categorical(cell_type)).astype(object).fillna("(no label)").astype(str).to_numpy()
        cmap = plt.get_cmap("tab20")
        for i, label in enumerate(sorted(set(labels))):
            where = labels == label
            ax.scatter(layout[where, 0], layout[where, 1], s=size, color=cmap(i % 20), linewidths=0, label=label)
        ax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=7, markerscale=3, frameon=False)
    ax.set_aspect("equal")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()
