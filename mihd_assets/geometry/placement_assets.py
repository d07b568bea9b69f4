"""Cell placement assets: one layout of a whole expression-only dataset, and its score on hidden positions.

``geometry/cell_placement`` (partitioned by cell dataset, ``gpu`` pool) reads the dataset,
the geometry checkpoint and its training set (lineage from both), and writes
``<storage>/geometry/cell_placement/<dataset>.h5ad`` and ``.png``.
``geometry/cell_placement_evaluation`` scores that layout against the dataset's
``obsm["spatial_truth"]`` (read only here) and writes DuckDB ``cell_placement_metrics``.
The placement pipeline itself is ``placement.py``; the metrics ``placement_eval.py``.
"""

import base64
import json
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from pydantic import Field

from mihd_assets.fileio import atomic_path, atomic_write_bytes, file_sha256
from mihd_resources import ComputeResource, MetricsStore
from mihd_resources.compute import device_check_result, device_check_spec
from mihd_resources.geometry_store import CHECKPOINT, TRAINING_SET, GeometryStore
from mihd_resources.orchestration import GPU_POOL, gpu_op_tags
from mihd_resources.step_executor import StepExecutor
from mihd_resources.storage import partition_path

from .assets import CHECKPOINT_KEY, GROUP, PLAN, TRAINING_SET_KEY
from .cell_datasets import CELL_DATASET_FILES, cell_dataset_source, cell_datasets_partitions
from .cells import CELL_DATASETS, CELL_TYPE, CellDatasetError, read_cell_dataset

CELL_PLACEMENT_KEY = AssetKey(["geometry", "cell_placement"])
CELL_EVALUATION_KEY = AssetKey(["geometry", "cell_placement_evaluation"])
PLACEMENT_FOLDER = ("geometry", "cell_placement")
BEATS_BASELINES_2X = "placement_beats_baselines_2x"


def placement_file(store: GeometryStore, dataset: str, suffix: str) -> Path:
    """``<storage>/geometry/cell_placement/<dataset><suffix>``; an invalid key is refused naming it."""
    return partition_path(store.base_dir, dataset, partitions=CELL_DATASETS, prefix=PLACEMENT_FOLDER, suffix=suffix)


def training_set_header(path: Path) -> dict:
    """The header of a stored training set (set sizes, encoder, slides) without loading its arrays."""
    with np.load(path, allow_pickle=False) as data:
        return json.loads(str(data["header_json"]))


def checkpoint_code_version(context: AssetExecutionContext, checkpoint_id: str) -> str:
    """The code version of the geometry_checkpoint materialization that wrote this file, or why it is unknown."""
    event = context.instance.get_latest_materialization_event(CHECKPOINT_KEY)
    if event is None or event.asset_materialization is None:
        return "unknown: no geometry_checkpoint materialization in this instance"
    mat = event.asset_materialization
    recorded = mat.metadata.get("checkpoint_id")
    if getattr(recorded, "value", recorded) != checkpoint_id:
        return "unknown: the latest geometry_checkpoint materialization recorded another file"
    return str((mat.tags or {}).get("dagster/code_version", "unknown: not tagged"))


class CellPlacementConfig(Config):
    """How a dataset is laid out. ``min_gene_coverage``: the least share of the encoder's genes the
    dataset must have (found by symbol or Ensembl id). ``overlap``: the share of each set that is its
    pass's anchor cells, shared by every set of the pass. ``passes``: how many times every cell is
    placed (each pass with other sets). ``method``: the generator's estimate, or that estimate refined
    by the denoiser (the held-out evaluation's ``refined``). ``knn_k``: neighbours of the graph in obsp."""

    min_gene_coverage: float = Field(default=0.8, ge=0.0, le=1.0)
    overlap: float = Field(default=0.5, gt=0.0, lt=1.0)
    passes: int = Field(default=2, ge=1, le=64)
    method: Literal["generator", "refined"] = "generator"
    knn_k: int = Field(default=15, ge=1)
    seed: int = 0


@asset(
    key=CELL_PLACEMENT_KEY,
    deps=[CHECKPOINT_KEY, TRAINING_SET_KEY, CELL_DATASET_FILES],
    partitions_def=cell_datasets_partitions,
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    code_version="1",
    kinds={"pytorch", "anndata"},
    check_specs=[device_check_spec(CELL_PLACEMENT_KEY)],
    description=(
        "One layout of a whole expression-only cell dataset from the geometry checkpoint: the checkpoint's encoder "
        "genes found in the dataset by symbol or Ensembl id (coverage recorded; below the configured minimum the "
        "partition fails naming the dataset, the coverage and the first missing genes), cells encoded as the "
        "training spots were, laid out in overlapping random sets of the trained size, the sets' estimates joined "
        "into one layout (orthogonal Procrustes on the shared cells, generalised Procrustes refinement, mean of "
        "each cell's estimates). Writes `<dataset>.h5ad` (input obs/var, obsm['X_geometry'], the kNN graph in "
        "obsp, uns['geometry'] naming checkpoint, code version, set size, overlap and method) and a figure "
        "coloured by cell_type. Never reads obsm['spatial_truth']."
    ),
)
def cell_placement(context: AssetExecutionContext, config: CellPlacementConfig, compute: ComputeResource,
                   store: GeometryStore, step_executor: StepExecutor) -> MaterializeResult:
    import anndata as ad

    from .placement import (
        PLACEMENT_METHOD,
        FrozenEncoder,
        encode_cells,
        join_sets,
        knn_graph,
        layout_figure_png,
        map_genes,
        plan_sets,
        predict_sets,
        require_coverage,
    )
    from .evaluate import refine_stop
    from .train import CheckpointMismatchError, checkpoint_sigma_gen, load_model, read_checkpoint

    dataset = context.partition_key
    started = time.perf_counter()
    source = cell_dataset_source(dataset)

    cells = read_cell_dataset(source, dataset)
    ckpt = store.existing(CHECKPOINT, "geometry_checkpoint")
    ts_path = store.existing(TRAINING_SET, "geometry_training_set")
    try:
        saved = read_checkpoint(ckpt)
    except CheckpointMismatchError as exc:
        raise CellDatasetError(f"cell dataset '{dataset}': {exc}") from exc
    encoder = FrozenEncoder.from_checkpoint(saved, ckpt, dataset)
    ts_fingerprint = file_sha256(ts_path)
    if saved.get("data_fingerprint") != ts_fingerprint:
        raise CellDatasetError(
            f"cell dataset '{dataset}': geometry checkpoint {ckpt} was trained on another training set than "
            f"{ts_path} (fingerprints differ); rematerialize geometry/geometry_checkpoint")
    header = training_set_header(ts_path)
    set_min, set_max = (int(v) for v in header["info"]["set_size"])
    mapping = map_genes(encoder, cells.var)
    require_coverage(mapping, config.min_gene_coverage, dataset, encoder)
    features, n_empty = encode_cells(cells.X, mapping, encoder)
    if n_empty:
        context.log.warning(f"cell dataset '{dataset}': {n_empty} of {cells.n_obs} cells have no count on any of the "
                            f"{mapping.n_matched} encoder genes found; they are placed from an all-zero profile")
    plan = plan_sets(cells.n_obs, set_max, config.overlap, config.passes, config.seed, dataset)
    refine = None
    if config.method == "refined":
        sigma_data = float(saved["sigma_data"])
        sigma_gen = checkpoint_sigma_gen(saved, str(ckpt))
        refine = {"sigma_data": sigma_data, "sigma_gen": sigma_gen,
                  "sigma_refine": PLAN.sigma_refine_factor * sigma_data, "steps": PLAN.refine_steps,
                  "sigma_stop": refine_stop(PLAN, sigma_data, sigma_gen)}
    cs = compute.settings()
    n_cells, seed = cells.n_obs, config.seed

    def work(log):
        device = cs.torch_device()
        model, _ = load_model(ckpt, device)
        t0 = time.perf_counter()
        coords = predict_sets(model, features, plan.index, device, cs.batch_size, cs.use_amp(), refine, seed)
        t1 = time.perf_counter()
        joined = join_sets(plan, coords, n_cells)
        log.info(f"cell dataset '{dataset}': {plan.n_sets} sets of {plan.set_size} cells placed in {t1 - t0:.2f} s, "
                 f"joined in {time.perf_counter() - t1:.2f} s")
        return coords, joined, {"model_seconds": round(t1 - t0, 3), "join_seconds": round(time.perf_counter() - t1, 3)}

    (coords, joined, timing), facts = compute.run(context, step_executor, "geometry", work)
    distances, connectivities = knn_graph(joined.layout, config.knn_k)
    checkpoint_id = file_sha256(ckpt)[:16]
    info = {
        "checkpoint_id": checkpoint_id,
        "checkpoint_path": str(ckpt),
        "checkpoint_step": int(saved["step"]),
        "checkpoint_code_version": checkpoint_code_version(context, checkpoint_id),
        "training_set_fingerprint": ts_fingerprint[:16],
        "trained_set_sizes": [set_min, set_max],
        "set_size": plan.set_size,
        "overlap": float(config.overlap),
        "n_anchor_cells": plan.n_anchor,
        "passes": plan.passes,
        "n_sets": plan.n_sets,
        "method": f"{config.method}: {PLACEMENT_METHOD}",
        "estimate": config.method,
        "seed": config.seed,
        "gene_coverage": round(mapping.coverage, 4),
        "n_encoder_genes": mapping.n_encoder_genes,
        "n_genes_matched": mapping.n_matched,
        "genes_matched_by": mapping.matched_by,
        "first_missing_genes": np.asarray(mapping.missing[:20], dtype=str),
        "n_cells_without_encoder_counts": n_empty,
        "knn_k": min(config.knn_k, n_cells - 1),
        "device": facts["device_used"],
        "source": str(source),
    }
    out = ad.AnnData(X=cells.X, obs=cells.obs.copy(), var=cells.var.copy())
    out.obsm["X_geometry"] = joined.layout.astype(np.float32)
    out.obsm["X_geometry_input"] = features
    out.obs["geometry_spread"] = joined.spread.astype(np.float32)
    out.obs["geometry_estimates"] = joined.estimates_per_cell.astype(np.int32)
    out.obsp["geometry_distances"] = distances
    out.obsp["geometry_connectivities"] = connectivities
    out.uns["geometry"] = {**info, "genes_matched_by": dict(mapping.matched_by),
                           "neighbors": {"distances_key": "geometry_distances",
                                         "connectivities_key": "geometry_connectivities", "k": info["knn_k"]}}
    # The sets and the model's own estimate of each (before joining): the evaluation's per-set score.
    out.uns["geometry_sets"] = {"index": plan.index, "estimates": coords.astype(np.float32),
                                "pass": plan.pass_of_set}
    path = placement_file(store, dataset, ".h5ad")
    with atomic_path(path) as tmp:
        out.write_h5ad(tmp)
    labels = cells.obs[CELL_TYPE] if CELL_TYPE in cells.obs else None
    figure = placement_file(store, dataset, ".png")
    title = (f"{dataset}: {n_cells} cells, gene coverage {mapping.coverage:.0%}, {plan.n_sets} sets of {plan.set_size}"
             + ("" if labels is not None else " (no cell_type)"))
    png = layout_figure_png(joined.layout, labels, title)
    atomic_write_bytes(figure, png)
    seconds = round(time.perf_counter() - started, 2)

    return MaterializeResult(
        metadata={
            "cells": n_cells,
            "gene_coverage": round(mapping.coverage, 4),
            "genes": MetadataValue.json({"encoder": mapping.n_encoder_genes, "found": mapping.n_matched,
                                         "by": mapping.matched_by, "first_missing": mapping.missing[:10]}),
            "sets": plan.n_sets,
            "set_size": plan.set_size,
            "overlap": float(config.overlap),
            "passes": plan.passes,
            "seconds": seconds,
            **timing,
            "device": facts["device_used"],
            **facts,
            "checkpoint_id": checkpoint_id,
            "checkpoint_code_version": info["checkpoint_code_version"],
            "median_spread": round(float(np.median(joined.spread)), 4),
            "cells_without_encoder_counts": n_empty,
            "path": MetadataValue.path(str(path)),
            "figure": MetadataValue.path(str(figure)),
            "layout": MetadataValue.md(f"![layout](data:image/png;base64,{base64.b64encode(png).decode()})"),
        },
        check_results=[device_check_result(CELL_PLACEMENT_KEY, facts)],
    )


def _beats_check(frame: pd.DataFrame) -> AssetCheckResult:
    whole = frame[frame["scope"] == "whole"].set_index("method")
    ours = float(whole.loc["geometry", "knn_jaccard_10"])
    best = float(whole.loc[["random", "expression_spectral"], "knn_jaccard_10"].max())
    ratio = ours / best if best > 0 else float("inf")
    return AssetCheckResult(
        check_name=BEATS_BASELINES_2X, asset_key=CELL_EVALUATION_KEY, passed=bool(ours >= 2 * best),
        severity=AssetCheckSeverity.WARN,
        description=f"whole-layout kNN Jaccard@10 {ours:.4f} is {ratio:.2f}x the better baseline ({best:.4f})",
        metadata={"knn_jaccard_10": round(ours, 4), "best_baseline": round(best, 4), "ratio": round(ratio, 3),
                  "n_cells": int(whole.loc["geometry", "n_cells"])},
    )


@asset(
    key=CELL_EVALUATION_KEY,
    deps=[CELL_PLACEMENT_KEY, CELL_DATASET_FILES],
    partitions_def=cell_datasets_partitions,
    group_name=GROUP,
    code_version="1",
    kinds={"python", "duckdb"},
    check_specs=[AssetCheckSpec(BEATS_BASELINES_2X, asset=CELL_EVALUATION_KEY, description=(
        "The whole layout's kNN Jaccard@10 is at least twice the better baseline's (random, expression_spectral)."))],
    description=(
        "Scores the placement against the dataset's hidden positions (obsm['spatial_truth'], read here only): "
        "kNN Jaccard@10 and @30 over every cell, Spearman of pairwise distances and trustworthiness@10 (on at "
        "most 3,000 cells), each with its number of cells, for the whole layout and the baselines random and "
        "expression_spectral on the same cells; per set (the model's own estimate of each set, the joined layout "
        "within it, the baselines) beside it. Rows in DuckDB `cell_placement_metrics`; view "
        "`cell_placement_vs_baselines`. Fails naming the dataset when it carries no hidden positions."
    ),
)
def cell_placement_evaluation(context: AssetExecutionContext, store: GeometryStore,
                              metrics: MetricsStore) -> MaterializeResult:
    import anndata as ad

    from .cells import read_truth
    from .placement_eval import evaluate_placement

    dataset = context.partition_key
    started = time.perf_counter()
    path = placement_file(store, dataset, ".h5ad")
    if not path.is_file():
        raise FileNotFoundError(f"cell dataset '{dataset}': no placement {path}; materialize geometry/cell_placement first")
    placed = ad.read_h5ad(path)
    truth = read_truth(cell_dataset_source(dataset), dataset, placed.obs_names)
    info = placed.uns["geometry"]
    sets = placed.uns["geometry_sets"]
    frame = evaluate_placement(np.asarray(placed.obsm["X_geometry"], dtype=np.float64), np.asarray(sets["index"]),
                               np.asarray(sets["estimates"], dtype=np.float64),
                               np.asarray(placed.obsm["X_geometry_input"], dtype=np.float64), truth, seed=int(info["seed"]))
    frame.insert(0, "dataset_id", dataset)
    frame.insert(1, "checkpoint_id", str(info["checkpoint_id"]))
    frame["checkpoint_step"] = int(info["checkpoint_step"])
    frame["set_size"] = int(info["set_size"])
    frame["overlap"] = float(info["overlap"])
    frame["passes"] = int(info["passes"])
    frame["estimate"] = str(info["estimate"])
    frame["gene_coverage"] = float(info["gene_coverage"])
    frame["placement_device"] = str(info["device"])
    written = metrics.write(context, {"cell_placement_metrics": frame})
    table = frame[["scope", "method", "knn_jaccard_10", "knn_jaccard_30", "distance_spearman", "trustworthiness",
                   "n_cells", "n_cells_pairs", "n_sets"]]
    check = _beats_check(frame)
    whole = frame[frame["scope"] == "whole"].set_index("method")
    per_set = frame[frame["scope"] == "per_set"].set_index("method")
    return MaterializeResult(
        metadata={
            "cells": int(placed.n_obs),
            "knn_jaccard_10": MetadataValue.json({
                "whole_layout": round(float(whole.loc["geometry", "knn_jaccard_10"]), 4),
                "per_set_model_estimate": round(float(per_set.loc["geometry_set_estimate", "knn_jaccard_10"]), 4),
                "per_set_joined_layout": round(float(per_set.loc["geometry", "knn_jaccard_10"]), 4),
                "random": round(float(whole.loc["random", "knn_jaccard_10"]), 4),
                "expression_spectral": round(float(whole.loc["expression_spectral", "knn_jaccard_10"]), 4)}),
            "scores": MetadataValue.md(table.round(4).to_markdown(index=False)),
            "checkpoint_id": str(info["checkpoint_id"]),
            "rows_written": MetadataValue.json(written),
            "seconds": round(time.perf_counter() - started, 2),
        },
        check_results=[check],
    )


PLACEMENT_ASSETS = [cell_placement, cell_placement_evaluation]
