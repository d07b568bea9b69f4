"""Cellpose-SAM E0-E5 assets: split, checkpoints, predictions, sweeps, donor counts, statistics, report.

Files live under ``<storage_root>/segmentation/`` and are written atomically; assets that
write DuckDB rows are separate from the model-running ones (one pool each).
"""


import importlib.util
import io
import json
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    asset,
)

from mihd_resources.orchestration import throttled_log
from mihd_resources.orchestration import GPU_POOL, gpu_op_tags
from mihd_assets.fileio import atomic_write_bytes, atomic_write_text, file_sha256, tree_fingerprint
from mihd_resources import ComputeResource, MetricsStore, settings
from mihd_resources.compute import DEVICE_FACTS, device_check_result, device_check_spec
from mihd_resources.metrics_store import read_only_query
from mihd_resources.step_executor import StepExecutor
from mihd_resources.storage import partition_path
from mihd_resources.weights import ModelWeightsResource

from .partitions import ANNOTATIONS, CLINICAL, DONOR_TILES, donors_partitions
from .plan import FINE_TUNED, MODELS, plan_for_profile
from .split import SPLITS, AnnotatedImage, CellposeSet, donor_split, find_annotations, load_annotated
from .tiles import TilePair, annotations_root, marker_of

GROUP = "segmentation"
WEIGHTS_CHECK = "weights_not_random"
DROPS_CHECK = "no_min_train_masks_drops"
NATIVE_CHECK = "native_micro_sam"
SKIPPED_CHECK = "no_skipped_tiles"
MICRO_SAM = importlib.util.find_spec("micro_sam") is not None
E4_NAME = "e4_amg_sweep_microsam" if MICRO_SAM else "e4_amg_sweep_proxy"
E4_METHOD = "microsam_amg" if MICRO_SAM else "proxy:cellpose_grid_prompted"


def seg_key(name: str) -> AssetKey:
    return AssetKey(["segmentation", name])


def store(*parts: str) -> Path:
    return settings.storage_root() / "segmentation" / Path(*parts)


def checkpoint_manifest(model: str) -> dict:
    path = store("checkpoints", f"{model}.json")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint manifest {path} missing: materialize segmentation/e1_checkpoint_{model} first")
    return json.loads(path.read_text())


def _read_json(path: Path, producer: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: materialize {producer} first")
    return json.loads(path.read_text())


def _metadata(record: dict) -> dict:
    return {k: (MetadataValue.json(v) if isinstance(v, (dict, list, tuple)) else v) for k, v in record.items() if v is not None}


def _weights_check(key: AssetKey, weights: str, init_weights: str | None = None) -> AssetCheckResult:
    random = weights == "random" or init_weights == "random"
    return AssetCheckResult(
        check_name=WEIGHTS_CHECK, asset_key=key, passed=not random, severity=AssetCheckSeverity.WARN,
        description="randomly initialised network (demo/tests): scores are not cellpose's" if random else None,
        metadata={"weights": weights, "init_weights": str(init_weights)},
    )


def _weights_spec(key: AssetKey) -> AssetCheckSpec:
    return AssetCheckSpec(WEIGHTS_CHECK, asset=key, description="Warns when the network's weights (or the weights it was fine-tuned from) are random.")


def _drops_spec(key: AssetKey) -> AssetCheckSpec:
    return AssetCheckSpec(DROPS_CHECK, asset=key, description="Warns when training images had fewer than min_train_masks masks and were left out.")


def _progress(context, label: str):
    return throttled_log(context, label)


def _device_columns(record: dict) -> dict:
    """``device_requested`` / ``device_used`` / ``gpu_expected_by`` of a stored record; ``None``
    each for records written before the GPU steps recorded them (and for the baseline, loaded
    without a GPU step)."""
    return {k: record.get(k) for k in DEVICE_FACTS}


# ---------------------------------------------------------------- E0


E0_SPLIT = seg_key("e0_donor_split")


@asset(
    key=E0_SPLIT, deps=[ANNOTATIONS, DONOR_TILES], group_name=GROUP, code_version="1", kinds={"python", "duckdb"},
    description="E0: donor-level train/val/test split of the annotated tiles (no donor in two splits), "
    "written to split.json and DuckDB `segmentation_split`; split sizes in metadata.",
)
def e0_donor_split(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    plan = plan_for_profile()
    ann_root, tiles_root = annotations_root(), settings.tiles_root()
    inventory = find_annotations(ann_root, tiles_root)
    for problem in inventory.problems:
        context.log.warning(f"annotation skipped: {problem}")
    if not inventory.images:
        raise ValueError(f"no annotated tile under {ann_root} pairs with a tile under {tiles_root}")
    assignment = donor_split([im.donor for im in inventory.images], plan.split_fractions, plan.split_seed)
    rows = [{"donor_id": im.donor, "image_id": im.stem, "marker": im.marker, "split": assignment[im.donor],
             "mask_path": str(im.mask_path), "dapi_path": str(im.tile.dapi_path), "marker_path": str(im.tile.marker_path)}
            for im in inventory.images]
    split_doc = {"fractions": list(plan.split_fractions), "seed": plan.split_seed, "donors": assignment, "images": rows,
                 "annotations_fingerprint": tree_fingerprint(ann_root)}
    atomic_write_text(store("e0", "split.json"), json.dumps(split_doc, indent=1))
    frame = pd.DataFrame(rows)
    sizes = {s: {"donors": int(sum(v == s for v in assignment.values())), "images": int((frame["split"] == s).sum())} for s in SPLITS}
    written = metrics.write(context, {"segmentation_split": frame[["donor_id", "image_id", "marker", "split"]].assign(n_masks=None)})
    return MaterializeResult(metadata={
        "split_sizes": MetadataValue.json(sizes), "n_annotated": len(rows), "rows_written": MetadataValue.json(written),
        "profile": settings.profile(), "annotations_root": str(ann_root), "input_fingerprint": split_doc["annotations_fingerprint"],
        "problems": MetadataValue.json(inventory.problems),
    })


E0_SET = seg_key("e0_training_set")


@asset(
    key=E0_SET, deps=[E0_SPLIT], group_name=GROUP, code_version="1", kinds={"python", "numpy"},
    description="E0: the annotated tiles of each split in Cellpose training format - image [DAPI, marker, 0] "
    "(channel first) and instance mask relabelled 1..N - one .npz per split.",
)
def e0_training_set(context: AssetExecutionContext) -> MaterializeResult:
    plan = plan_for_profile()
    doc = _read_json(store("e0", "split.json"), "segmentation/e0_donor_split")
    counts = {}
    for split in SPLITS:
        images, masks, records = [], [], []
        for row in (r for r in doc["images"] if r["split"] == split):
            tile = TilePair(row["donor_id"], row["image_id"], marker_of(row["image_id"]), Path(row["dapi_path"]), Path(row["marker_path"]))
            image, mask = load_annotated(AnnotatedImage(row["donor_id"], row["image_id"], row["marker"], Path(row["mask_path"]), tile))
            images.append(image)
            masks.append(mask)
            records.append({"donor_id": row["donor_id"], "image_id": row["image_id"], "marker": row["marker"], "n_masks": int(mask.max())})
        CellposeSet(images, masks, records).save(store("e0", f"{split}.npz"))
        few = sum(r["n_masks"] < plan.min_train_masks for r in records)
        counts[split] = {"images": len(records), "masks": int(sum(r["n_masks"] for r in records)), "below_min_train_masks": few}
        context.log.info(f"E0 {split}: {len(records)} images, {counts[split]['masks']} masks")
    return MaterializeResult(metadata={"splits": MetadataValue.json(counts), "format": "[DAPI, marker, 0] float32 + int32 instance mask",
                                       "min_train_masks": plan.min_train_masks, "profile": settings.profile()})


def load_split(split: str) -> CellposeSet:
    path = store("e0", f"{split}.npz")
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: materialize segmentation/e0_training_set first")
    return CellposeSet.load(path)


# ---------------------------------------------------------------- E1 checkpoints


def checkpoint_key(model: str) -> AssetKey:
    return seg_key(f"e1_checkpoint_{model}")


BASELINE = checkpoint_key("baseline")


@asset(
    key=BASELINE, group_name=GROUP, code_version="1", kinds={"pytorch", "cellpose"}, check_specs=[_weights_spec(BASELINE)],
    description="E1 baseline Cellpose-SAM weights: the local file in MIHD_CELLPOSE_WEIGHTS (checked strictly, never "
    "downloaded); without it and with random weights allowed, a randomly initialised network (tiny in the demo profile).",
)
def e1_checkpoint_baseline(context: AssetExecutionContext, weights: ModelWeightsResource) -> MaterializeResult:
    from .cellpose_api import CPSAM_CONFIG, TINY_CONFIG, load_model, save_random_network

    configured = os.environ.get("MIHD_CELLPOSE_WEIGHTS", "")
    target = store("checkpoints", "baseline.pt")
    if configured:
        loaded = load_model(configured, "cpu")
        manifest = {"path": str(loaded.path), "weights": f"file:{loaded.sha256[:16]}", "config": loaded.config.name}
    elif weights.allow_random:
        config = TINY_CONFIG if settings.profile() == "demo" else CPSAM_CONFIG
        context.log.warning(f"baseline cellpose network is RANDOMLY initialised ({config.name} configuration): "
                            "MIHD_CELLPOSE_WEIGHTS is not set and random weights are allowed")
        save_random_network(target, config, seed=0)
        manifest = {"path": str(target), "weights": "random", "config": config.name}
    else:
        raise ValueError("no baseline cellpose weights: set MIHD_CELLPOSE_WEIGHTS to a local cpsam state dict, or allow "
                         "random weights (MIHD_ALLOW_RANDOM_WEIGHTS=1) for a demo run")
    manifest.update({"model": "baseline", "init_weights": None, "sha256": file_sha256(manifest["path"]), "profile": settings.profile()})
    atomic_write_text(store("checkpoints", "baseline.json"), json.dumps(manifest, indent=1))
    return MaterializeResult(metadata=_metadata(manifest), check_results=[_weights_check(BASELINE, manifest["weights"])])


def _train_images(model: str, train: CellposeSet, marker: str) -> CellposeSet:
    if model == "marker_specific":
        chosen = [i for i, r in enumerate(train.records) if r["marker"] == marker]
        if not chosen:
            raise ValueError(f"marker-specific fine-tune: no training image of marker {marker!r} "
                             f"(markers present: {sorted({r['marker'] for r in train.records})})")
        return train.subset(chosen)
    if model == "marker_only":
        return train.without_dapi()
    return train


def _fine_tune_factory(model: str):
    key = checkpoint_key(model)
    what = {"generic": "all annotated training images", "marker_specific": "the training images of the plan's marker",
            "marker_only": "all training images with the DAPI channel zeroed (no DAPI)"}[model]

    @asset(
        key=key, deps=[E0_SET, BASELINE], group_name=GROUP, pool=GPU_POOL, op_tags=gpu_op_tags(), code_version="2",
        kinds={"pytorch", "cellpose"}, check_specs=[_weights_spec(key), _drops_spec(key), device_check_spec(key)],
        description=f"E1 `{model}` checkpoint: the baseline fine-tuned with cellpose.train.train_seg on {what}; "
        "the state dict is stored atomically and min_train_masks drops are counted.",
    )
    def _asset(context: AssetExecutionContext, compute: ComputeResource, step_executor: StepExecutor) -> MaterializeResult:
        from .cellpose_api import train

        plan = plan_for_profile()
        base = checkpoint_manifest("baseline")
        data = _train_images(model, load_split("train"), plan.marker)
        out = store("checkpoints", f"{model}.pt")
        cs = compute.settings()

        def work(log):
            return train(base["path"], data.images, data.masks, out, n_epochs=plan.n_epochs,
                         learning_rate=plan.learning_rate, weight_decay=plan.weight_decay, batch_size=plan.batch_size,
                         min_train_masks=plan.min_train_masks, seed=0, device=cs.torch_device(), progress=log.info)

        result, facts = compute.run(context, step_executor, "segmentation", work)
        dropped = [data.records[i]["image_id"] for i in result.dropped]
        if dropped:
            context.log.warning(f"{model}: {len(dropped)} training image(s) with < {plan.min_train_masks} masks left out: {dropped}")
        manifest = {
            "model": model, "path": str(out), "sha256": result.sha256, "config": base["config"], "profile": settings.profile(),
            "init_weights": base["weights"], "weights": f"finetuned_from:{base['weights']}",
            "n_train_given": result.n_images_given, "n_train_used": result.n_images_used, "dropped_min_masks": dropped,
            "min_train_masks": plan.min_train_masks, "n_epochs": plan.n_epochs, "learning_rate": plan.learning_rate,
            "final_train_loss": result.train_losses[-1], "seconds": round(result.seconds, 2), **facts,
        }
        atomic_write_text(store("checkpoints", f"{model}.json"), json.dumps(manifest, indent=1))
        return MaterializeResult(metadata=_metadata(manifest), check_results=[
            _weights_check(key, manifest["weights"], base["weights"]),
            AssetCheckResult(check_name=DROPS_CHECK, asset_key=key, passed=not dropped, severity=AssetCheckSeverity.WARN,
                             metadata={"n_dropped": len(dropped)}),
            device_check_result(key, facts),
        ])

    return _asset


fine_tune_checkpoints = [_fine_tune_factory(m) for m in FINE_TUNED]


# ---------------------------------------------------------------- E1 predictions + metrics


def predictions_key(model: str) -> AssetKey:
    return seg_key(f"e1_test_predictions_{model}")


def _predict_factory(model: str):
    key = predictions_key(model)

    @asset(
        key=key, deps=[E0_SET, checkpoint_key(model)], group_name=GROUP, pool=GPU_POOL, op_tags=gpu_op_tags(),
        code_version="1", kinds={"pytorch", "cellpose"}, check_specs=[device_check_spec(key)],
        description=f"E1: instance masks predicted by the `{model}` checkpoint on every test image "
        "(cellpose eval with the plan's thresholds), stored as .npz with the step's device facts.",
    )
    def _asset(context: AssetExecutionContext, compute: ComputeResource, step_executor: StepExecutor) -> MaterializeResult:
        from .cellpose_api import load_model, segment

        plan = plan_for_profile()
        manifest = checkpoint_manifest(model)
        test = load_split("test")
        if model == "marker_only":
            test = test.without_dapi()
        started = time.perf_counter()
        cs = compute.settings()

        def work(log):
            loaded = load_model(manifest["path"], cs.torch_device())
            return segment(loaded, test.images, plan.eval)

        masks, facts = compute.run(context, step_executor, "segmentation", work)
        seconds = time.perf_counter() - started
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **{f"pred_{i:05d}": m for i, m in enumerate(masks)},
                            **{PREDICTIONS_INFO: np.asarray(json.dumps(facts))})
        atomic_write_bytes(store("e1", f"predictions_{model}.npz"), buffer.getvalue())
        return MaterializeResult(metadata={"model": model, "n_images": len(masks), "n_pred_masks": int(sum(m.max() for m in masks)),
                                           "seconds": round(seconds, 2), "weights": manifest["weights"], "config": manifest["config"],
                                           "device": facts["device_used"], **facts,
                                           "eval": MetadataValue.json(plan.describe()["eval"])},
                                 check_results=[device_check_result(key, facts)])

    return _asset


test_predictions = [_predict_factory(m) for m in MODELS]
# The predictions file's entry with the device facts of the step that predicted them (JSON).
PREDICTIONS_INFO = "device_json"


def _predictions_file(model: str) -> Path:
    path = store("e1", f"predictions_{model}.npz")
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: materialize segmentation/e1_test_predictions_{model} first")
    return path


def load_predictions(model: str) -> list[np.ndarray]:
    with np.load(_predictions_file(model)) as data:
        return [data[k] for k in sorted(data.files) if k.startswith("pred_")]


def prediction_device(model: str) -> dict:
    """The device facts of the step that predicted ``model``'s test masks (``None`` each for a
    file written before they were stored)."""
    with np.load(_predictions_file(model)) as data:
        stored = json.loads(str(data[PREDICTIONS_INFO])) if PREDICTIONS_INFO in data.files else {}
    return _device_columns(stored)


def _model_row(experiment: str, manifest: dict) -> dict:
    return {"experiment": experiment, "model": manifest["model"], "init_weights": manifest.get("init_weights"),
            "weights": manifest["weights"], "config": manifest["config"], "profile": manifest["profile"],
            "budget": manifest.get("budget"), "seed": manifest.get("seed"),
            "n_train_given": manifest.get("n_train_given"), "n_train_used": manifest.get("n_train_used"),
            "n_dropped_min_masks": len(manifest.get("dropped_min_masks", [])), "min_train_masks": manifest.get("min_train_masks"),
            "n_epochs": manifest.get("n_epochs"), "learning_rate": manifest.get("learning_rate"),
            "final_train_loss": manifest.get("final_train_loss"), "seconds": manifest.get("seconds"),
            **_device_columns(manifest)}


@asset(
    key=seg_key("e1_segmentation_metrics"), deps=[predictions_key(m) for m in MODELS], group_name=GROUP,
    code_version="1", kinds={"python", "duckdb"},
    description="E1 test-set AP@0.5, precision, recall, F1 and TP/FP/FN per image and in total for each model "
    "(cellpose.metrics) into DuckDB `segmentation_metrics`; the models' training records into `segmentation_models`.",
)
def e1_segmentation_metrics(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    from .scoring import score_masks

    test = load_split("test")
    ids = [r["image_id"] for r in test.records]
    frames, models, totals = [], [], {}
    for model in MODELS:
        manifest = checkpoint_manifest(model)
        scores = score_masks(test.masks, load_predictions(model), ids)
        frames.append(scores.assign(experiment="E1", model=model, variant="", method="cellpose", weights=manifest["weights"],
                                    config=manifest["config"], profile=manifest["profile"], **prediction_device(model)))
        models.append(_model_row("E1", manifest))
        total = scores[scores["level"] == "total"].iloc[0]
        totals[model] = {k: round(float(total[k]), 4) for k in ("ap50", "precision", "recall", "f1")}
    written = metrics.write(context, {"segmentation_metrics": pd.concat(frames, ignore_index=True), "segmentation_models": models})
    return MaterializeResult(metadata={"test_totals": MetadataValue.json(totals), "rows_written": MetadataValue.json(written),
                                       "profile": settings.profile()})


# ---------------------------------------------------------------- E2


E2_RUNS = seg_key("e2_budget_runs")


@asset(
    key=E2_RUNS, deps=[E0_SET, BASELINE], group_name=GROUP, pool=GPU_POOL, op_tags=gpu_op_tags(), code_version="2",
    kinds={"pytorch", "cellpose"}, check_specs=[_weights_spec(E2_RUNS), _drops_spec(E2_RUNS), device_check_spec(E2_RUNS)],
    description="E2 label efficiency: the baseline fine-tuned on budgets of 2, 5, 10, 20, 30 training images "
    "(a seed picks each subset), each scored on the test set; checkpoints and scores stored per run.",
)
def e2_budget_runs(context: AssetExecutionContext, compute: ComputeResource, step_executor: StepExecutor) -> MaterializeResult:
    plan = plan_for_profile()
    base = checkpoint_manifest("baseline")
    train_set, test = load_split("train"), load_split("test")
    if max(plan.budgets) > len(train_set.images):
        raise ValueError(f"E2 budget {max(plan.budgets)} exceeds the {len(train_set.images)} annotated training images")
    ids = [r["image_id"] for r in test.records]
    cs = compute.settings()
    profile = settings.profile()

    def work(log):
        from .budget import budget_runs

        return budget_runs(log, plan, base, train_set, test, ids, cs.torch_device(), profile,
                           lambda name: store("e2", f"{name}.pt"))

    (runs, score_frames, drops), facts = compute.run(context, step_executor, "segmentation", work)
    runs = [{**run, **facts} for run in runs]
    scores = pd.concat(score_frames, ignore_index=True)
    atomic_write_text(store("e2", "runs.json"), json.dumps({"runs": runs}, indent=1))
    atomic_write_bytes(store("e2", "scores.csv"), scores.to_csv(index=False).encode())
    curve = scores[scores["level"] == "total"].groupby("budget")["ap50"].mean().round(4).to_dict()
    return MaterializeResult(
        metadata={"ap50_by_budget": MetadataValue.json({int(k): v for k, v in curve.items()}), "n_runs": len(runs),
                  "seeds": list(plan.budget_seeds), "weights": runs[0]["weights"], "config": base["config"], "profile": settings.profile(),
                  **facts},
        check_results=[_weights_check(E2_RUNS, runs[0]["weights"], base["weights"]),
                       AssetCheckResult(check_name=DROPS_CHECK, asset_key=E2_RUNS, passed=drops == 0, severity=AssetCheckSeverity.WARN,
                                        metadata={"n_dropped": drops}),
                       device_check_result(E2_RUNS, facts)],
    )


@asset(
    key=seg_key("e2_budget_metrics"), deps=[E2_RUNS], group_name=GROUP, code_version="1",
    kinds={"python", "duckdb"},
    description="E2 rows into DuckDB: test scores of every budget x seed run in `segmentation_metrics` "
    "(the curve is the view `segmentation_e2_curve`) and the runs in `segmentation_models`.",
)
def e2_budget_metrics(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    runs = _read_json(store("e2", "runs.json"), "segmentation/e2_budget_runs")["runs"]
    scores = pd.read_csv(store("e2", "scores.csv"), keep_default_na=False, na_values=[""])
    scores["image_id"] = scores["image_id"].fillna("").astype(str)
    first = runs[0]
    scores = scores.assign(experiment="E2", model="generic", method="cellpose", weights=first["weights"], config=first["config"],
                           profile=first["profile"], **_device_columns(first))
    written = metrics.write(context, {"segmentation_metrics": scores, "segmentation_models": [_model_row("E2", r) for r in runs]})
    return MaterializeResult(metadata={"rows_written": MetadataValue.json(written)})


# ---------------------------------------------------------------- E3


@asset(
    key=seg_key("e3_gating_metrics"), deps=[E0_SET, predictions_key("generic")], group_name=GROUP, 
    code_version="1", kinds={"python", "duckdb"},
    description="E3 post-processing ablation on the generic fine-tune's test predictions: marker-intensity quantile "
    "gating (q0_100, q2_98, q5_95) x minimum area (50, 60, 80), scored with cellpose.metrics into `segmentation_metrics`.",
)
def e3_gating_metrics(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    from .gating import gate_masks
    from .scoring import score_masks

    plan = plan_for_profile()
    test = load_split("test")
    predictions = load_predictions("generic")
    manifest = checkpoint_manifest("generic")
    ids = [r["image_id"] for r in test.records]
    frames, best = [], {}
    for name, low, high in plan.gating_quantiles:
        for area in plan.min_areas:
            gated = [gate_masks(p, im[1], low, high, area) for p, im in zip(predictions, test.images)]
            scores = score_masks(test.masks, gated, ids)
            frames.append(scores.assign(variant=f"{name}_a{area}", gating=name, min_area=area))
            best[f"{name}_a{area}"] = round(float(scores.iloc[-1]["f1"]), 4)
    # The device columns: the GPU step that predicted the gated masks (E3 itself runs on CPU).
    rows = pd.concat(frames, ignore_index=True).assign(experiment="E3", model="generic", method="gating",
                                                        weights=manifest["weights"], config=manifest["config"], profile=manifest["profile"],
                                                        **prediction_device("generic"))
    written = metrics.write(context, {"segmentation_metrics": rows})
    return MaterializeResult(metadata={"f1_by_setting": MetadataValue.json(best), "rows_written": MetadataValue.json(written)})


# ---------------------------------------------------------------- E4


E4_SWEEP = seg_key(E4_NAME)


@asset(
    key=E4_SWEEP, deps=[E0_SET, predictions_key("generic")], group_name=GROUP, pool=GPU_POOL, op_tags=gpu_op_tags(),
    code_version="1", kinds={"python", "pytorch"},
    # The proxy runs no GPU step (it re-scores the generic predictions): device_as_requested only with micro-sam.
    check_specs=[AssetCheckSpec(NATIVE_CHECK, asset=E4_SWEEP, description="Warns when E4 ran the cellpose proxy instead of micro-sam.")]
    + ([device_check_spec(E4_SWEEP)] if MICRO_SAM else []),
    description="E4 points-per-side sweep of an automatic mask generator on the test set: micro-sam's AMG when "
    "micro_sam is installed (MIHD_MICROSAM_CHECKPOINT), otherwise a PROXY - the generic cellpose predictions "
    "restricted to instances hit by the point grid - labelled `proxy` in key, metadata and rows.",
)
def e4_amg_sweep(context: AssetExecutionContext, compute: ComputeResource, step_executor: StepExecutor) -> MaterializeResult:
    from .gating import grid_prompted_masks
    from .scoring import score_masks

    plan = plan_for_profile()
    test = load_split("test")
    ids = [r["image_id"] for r in test.records]
    frames, facts = [], None
    if MICRO_SAM:
        from .amg import microsam_masks

        cs = compute.settings()

        def work(log):
            device = cs.torch_device()
            return [microsam_masks(test.images, pps, device) for pps in plan.points_per_side]

        predictions, facts = compute.run(context, step_executor, "segmentation", work)
        for pps, predicted in zip(plan.points_per_side, predictions):
            frames.append(score_masks(test.masks, predicted, ids).assign(variant=f"pps_{pps}", points_per_side=pps))
        weights, config = f"file:{os.environ.get('MIHD_MICROSAM_CHECKPOINT', '')}", "micro_sam"
        device = facts
    else:
        context.log.warning("micro_sam is not installed: E4 runs the cellpose PROXY (grid-prompted generic predictions)")
        predictions = load_predictions("generic")
        manifest = checkpoint_manifest("generic")
        for pps in plan.points_per_side:
            frames.append(score_masks(test.masks, [grid_prompted_masks(p, pps) for p in predictions], ids)
                          .assign(variant=f"pps_{pps}", points_per_side=pps))
        weights, config = manifest["weights"], manifest["config"]
        device = prediction_device("generic")  # the rows' masks: the generic predictions' GPU step
    scores = pd.concat(frames, ignore_index=True).assign(experiment="E4", model="generic" if not MICRO_SAM else "micro_sam",
                                                          method=E4_METHOD, weights=weights, config=config, profile=settings.profile(),
                                                          **device)
    atomic_write_bytes(store("e4", f"{E4_NAME}.csv"), scores.to_csv(index=False).encode())
    totals = scores[scores["level"] == "total"].set_index("points_per_side")["ap50"].round(4).to_dict()
    return MaterializeResult(
        metadata={"method": E4_METHOD, "proxy": not MICRO_SAM, "ap50_by_points_per_side": MetadataValue.json({int(k): v for k, v in totals.items()}),
                  "profile": settings.profile(), **(facts or {})},
        check_results=[AssetCheckResult(check_name=NATIVE_CHECK, asset_key=E4_SWEEP, passed=MICRO_SAM, severity=AssetCheckSeverity.WARN,
                                        description=None if MICRO_SAM else "proxy used: micro_sam not installed",
                                        metadata={"method": E4_METHOD})]
        + ([device_check_result(E4_SWEEP, facts)] if facts is not None else []),
    )


@asset(
    key=seg_key(f"{E4_NAME}_metrics"), deps=[E4_SWEEP], group_name=GROUP, code_version="1",
    kinds={"python", "duckdb"},
    description="E4 sweep scores per points-per-side into DuckDB `segmentation_metrics` (method column says "
    "`proxy:...` on every row when micro-sam did not run).",
)
def e4_amg_sweep_metrics(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    path = store("e4", f"{E4_NAME}.csv")
    if not path.is_file():
        raise FileNotFoundError(f"{path} missing: materialize {E4_SWEEP.to_user_string()} first")
    scores = pd.read_csv(path, keep_default_na=False, na_values=[""])
    scores["image_id"] = scores["image_id"].fillna("").astype(str)
    if "gpu_expected_by" in scores:  # '' (nothing expected a GPU) is not missing where the facts are recorded
        recorded = scores["device_requested"].notna()
        scores["gpu_expected_by"] = scores["gpu_expected_by"].astype(object).where(~recorded, scores["gpu_expected_by"].fillna(""))
    written = metrics.write(context, {"segmentation_metrics": scores})
    return MaterializeResult(metadata={"rows_written": MetadataValue.json(written), "method": E4_METHOD})


# ---------------------------------------------------------------- E5 per donor


E5_COUNTS = seg_key("e5_tile_counts")


def donor_counts_path(donor: str) -> Path:
    """``<storage>/segmentation/e5/tile_counts/<donor>.json``; an invalid donor key is refused naming it."""
    return partition_path(store("e5", "tile_counts"), donor, partitions=donors_partitions.name, suffix=".json")


def donor_tiles_folder(donor: str) -> Path:
    """``<tiles root>/<donor>``; an invalid donor key is refused naming it."""
    return partition_path(settings.tiles_root(), donor, partitions=donors_partitions.name)


@asset(
    key=E5_COUNTS, deps=[DONOR_TILES, BASELINE, checkpoint_key("generic")], partitions_def=donors_partitions, group_name=GROUP,
    pool=GPU_POOL, op_tags=gpu_op_tags(), code_version="2", kinds={"pytorch", "cellpose"},
    check_specs=[AssetCheckSpec(SKIPPED_CHECK, asset=E5_COUNTS, description="Warns when tiles of the donor were skipped (missing channel, unreadable TIFF)."),
                 _weights_spec(E5_COUNTS), device_check_spec(E5_COUNTS)],
    description="E5 full inference on every tile of one donor with the baseline and the fine-tuned model: cells and "
    "marker-positive cells per tile. Tiles found by strict .tif/.tiff suffix and channel pairing; unreadable ones skipped and recorded.",
)
def e5_tile_counts(context: AssetExecutionContext, compute: ComputeResource, step_executor: StepExecutor) -> MaterializeResult:
    from .cellpose_api import load_model, segment
    from .gating import count_positive
    from .tiles import SkippedTile, TileReadError, cellpose_image, discover_tiles, read_pair

    donor = context.partition_key
    folder = donor_tiles_folder(donor)
    plan = plan_for_profile()
    pairs, skipped = discover_tiles(folder, donor)
    other = [p for p in pairs if plan.marker and p.marker != plan.marker]
    pairs = [p for p in pairs if not plan.marker or p.marker == plan.marker]
    images, names = [], []
    for pair in pairs:
        try:
            dapi, marker = read_pair(pair)
        except TileReadError as err:
            skipped.append(SkippedTile(donor, err.file, str(err)))
            continue
        images.append(cellpose_image(dapi, marker))
        names.append(pair.stem)
    for s in skipped:
        context.log.warning(f"donor {donor}: skipped {s.file}: {s.reason}")
    if not images:
        raise ValueError(f"donor {donor}: no readable {plan.marker or ''} tile in {folder} "
                         f"({len(skipped)} skipped: {'; '.join(f'{s.file}: {s.reason}' for s in skipped) or 'no tile files'})")
    cs = compute.settings()
    manifests = {source: checkpoint_manifest(source) for source in ("baseline", plan.e5_finetuned_model)}

    def work(log):
        device = cs.torch_device()
        rows, info = [], {}
        for role, source in (("baseline", "baseline"), ("finetuned", plan.e5_finetuned_model)):
            manifest = manifests[source]
            loaded = load_model(manifest["path"], device)
            started = time.perf_counter()
            masks = segment(loaded, images, plan.eval)
            for name, image, mask in zip(names, images, masks):
                n_cells, n_positive = count_positive(mask, image[1], plan.marker_threshold)
                rows.append({"donor_id": donor, "model": role, "model_source": source, "weights": manifest["weights"],
                             "config": manifest["config"], "tile": name, "marker": plan.marker, "n_cells": n_cells,
                             "n_positive": n_positive, "marker_threshold": plan.marker_threshold})
            info[role] = {"source": source, "weights": manifest["weights"],
                          "seconds": round(time.perf_counter() - started, 2)}
            log.info(f"donor {donor}: {role} ({source}) counted {len(images)} tiles in {info[role]['seconds']} s")
        return rows, info

    (rows, info), facts = compute.run(context, step_executor, "segmentation", work)
    rows = [{**row, **facts} for row in rows]  # every tile_counts row says where the counting ran
    doc = {"donor": donor, "counts": rows, "skipped": [s.as_row() for s in skipped], "models": info, "device": facts}
    atomic_write_text(donor_counts_path(donor), json.dumps(doc))
    frame = pd.DataFrame(rows)
    totals = frame.groupby("model")[["n_cells", "n_positive"]].sum()
    base = checkpoint_manifest("baseline")
    return MaterializeResult(
        metadata={"donor": donor, "n_tiles": len(names), "n_skipped": len(skipped), "n_other_marker_tiles": len(other),
                  "cells": MetadataValue.json({m: int(v) for m, v in totals["n_cells"].items()}),
                  "positive": MetadataValue.json({m: int(v) for m, v in totals["n_positive"].items()}),
                  "models": MetadataValue.json(info), "marker_threshold": plan.marker_threshold, "profile": settings.profile(),
                  "input_fingerprint": tree_fingerprint(folder), **facts},
        check_results=[
            AssetCheckResult(check_name=SKIPPED_CHECK, asset_key=E5_COUNTS, passed=not skipped, severity=AssetCheckSeverity.WARN,
                             description="; ".join(f"{s.file}: {s.reason}" for s in skipped) or None, metadata={"n_skipped": len(skipped)}),
            _weights_check(E5_COUNTS, base["weights"]),
            device_check_result(E5_COUNTS, facts),
        ],
    )


@asset(
    key=seg_key("e5_tile_counts_metrics"), deps=[E5_COUNTS], partitions_def=donors_partitions, group_name=GROUP,
    code_version="1", kinds={"python", "duckdb"},
    description="One donor's E5 per-tile counts into DuckDB `tile_counts` and its skipped tiles (with reasons) "
    "into `skipped_tiles`.",
)
def e5_tile_counts_metrics(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    doc = _read_json(donor_counts_path(context.partition_key), "segmentation/e5_tile_counts")
    skipped = pd.DataFrame(doc["skipped"], columns=["donor_id", "file", "reason"])
    written = metrics.write(context, {"tile_counts": doc["counts"], "skipped_tiles": skipped})
    return MaterializeResult(metadata={"rows_written": MetadataValue.json(written)})


# ---------------------------------------------------------------- E5 statistics + report


E5_STATS = seg_key("e5_donor_statistics")


@asset(
    key=E5_STATS, deps=[E5_COUNTS, CLINICAL], group_name=GROUP, code_version="1", kinds={"python", "duckdb", "scipy"},
    description="E5 donor-level statistics over every donor with tile counts: donor ratio = sum(positive)/sum(cells), "
    "Spearman vs the eight outcomes with BH-FDR (missing codes dropped and counted), tile-bootstrap CI and sign "
    "consistency; baseline and fine-tuned side by side in `donor_ratios`, `e5_spearman`, `e5_bootstrap`.",
)
def e5_donor_statistics(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    from .stats import OUTCOMES, TileMatrix, bootstrap_rhos, bootstrap_summary, donor_ratios, read_clinical, spearman_table

    plan = plan_for_profile()
    registered = context.instance.get_dynamic_partitions(donors_partitions.name)
    counts, without = [], []
    for donor in registered:
        path = donor_counts_path(donor)
        if path.is_file():
            counts.extend(json.loads(path.read_text())["counts"])
        else:
            without.append(donor)
    if without:
        context.log.warning(f"E5: {len(without)} registered donor(s) have no tile counts (failed or not materialized): {without}")
    if not counts:
        raise ValueError(f"E5: none of the {len(registered)} registered donors has tile counts; materialize segmentation/e5_tile_counts")
    tiles = pd.DataFrame(counts)
    clinical_path = settings.clinical_table()
    clinical = read_clinical(clinical_path)
    ratios = donor_ratios(tiles)
    spearman, boot = [], []
    for model, group in ratios.groupby("model"):
        series = group.set_index("donor_id")["ratio"]
        table = spearman_table(series, clinical.values)
        spearman.append(table.assign(model=model))
        model_tiles = tiles[tiles["model"] == model]
        has_cells = model_tiles.groupby("donor_id")["n_cells"].transform("sum") > 0
        if has_cells.any():
            matrix = TileMatrix.from_counts(model_tiles[has_cells])
            rhos = bootstrap_rhos(matrix, clinical.values[list(OUTCOMES)], plan.bootstrap_replicates, plan.bootstrap_fraction, plan.bootstrap_seed)
        else:
            context.log.warning(f"E5 {model}: no donor has a counted cell; no bootstrap (the model found nothing)")
            rhos = np.full((0, len(OUTCOMES)), np.nan)
        boot.append(bootstrap_summary(rhos, table["rho"].to_numpy(), list(OUTCOMES)).assign(model=model, tile_fraction=plan.bootstrap_fraction))
        significant = table.loc[table["q_value"] < 0.05, "outcome"].tolist()
        context.log.info(f"E5 {model}: {len(series)} donors; FDR<0.05: {significant or 'none'}")
    spearman_frame, boot_frame = pd.concat(spearman, ignore_index=True), pd.concat(boot, ignore_index=True)
    result = {"spearman": spearman_frame.to_dict("records"), "bootstrap": boot_frame.to_dict("records"),
              "donors_without_counts": without, "missing_codes": clinical.missing_counts}
    atomic_write_text(store("e5", "statistics.json"), json.dumps(result, default=float))
    written = metrics.write(context, {"donor_ratios": ratios, "e5_spearman": spearman_frame, "e5_bootstrap": boot_frame})
    sig = {m: g.loc[g["q_value"] < 0.05, "outcome"].tolist() for m, g in spearman_frame.groupby("model")}
    return MaterializeResult(metadata={
        "n_donors": int(ratios["donor_id"].nunique()), "donors_without_counts": MetadataValue.json(without),
        "significant_fdr_0_05": MetadataValue.json(sig), "missing_outcome_values": MetadataValue.json(clinical.missing_counts),
        "bootstrap_replicates": plan.bootstrap_replicates, "clinical_table": str(clinical_path),
        "clinical_sha256": file_sha256(clinical_path), "rows_written": MetadataValue.json(written), "profile": settings.profile(),
    })


REPORT = seg_key("segmentation_report")


@asset(
    key=REPORT,
    deps=[seg_key("e1_segmentation_metrics"), seg_key("e2_budget_metrics"), seg_key("e3_gating_metrics"),
          seg_key(f"{E4_NAME}_metrics"), E5_STATS, seg_key("e5_tile_counts_metrics")],
    group_name=GROUP, code_version="2", kinds={"python", "plotly"},
    description="Manuscript-ready E1-E5 summary (markdown + offline HTML with the E2 budget curve and the E5 forest "
    "plot) built only from the DuckDB views; reading shares the DuckDB writer pool because DuckDB locks the file per process.",
)
def segmentation_report(context: AssetExecutionContext, metrics: MetricsStore) -> MaterializeResult:
    from .report import REPORT_QUERIES, build_report

    frames = {name: read_only_query(metrics.path, sql) for name, sql in REPORT_QUERIES.items()}
    baseline = checkpoint_manifest("baseline")
    notes = [f"E4 method: {E4_METHOD}" + (" (a proxy, not micro-sam)" if not MICRO_SAM else "")]
    context_info = {"profile": settings.profile(), "weights_line": f"baseline `{baseline['weights']}` ({baseline['config']} network)",
                    "notes": notes}
    markdown, page = build_report(frames, context_info)
    md_path, html_path = store("report", "segmentation_report.md"), store("report", "segmentation_report.html")
    atomic_write_text(md_path, markdown)
    atomic_write_text(html_path, page)
    return MaterializeResult(metadata={"report_html": MetadataValue.path(str(html_path)), "report_md": MetadataValue.path(str(md_path)),
                                       "summary": MetadataValue.md(markdown), "profile": settings.profile()})
