"""Geometry assets: training set -> checkpoint -> evaluation -> DuckDB, across slides.

These assets learn from several slides at once, so they are not partitioned: each reads
the training and held-out slides named by the geometry plan (``config.py``) through a
partition mapping, which the lineage graph shows.
"""


import json
import time

import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    Config,
    MaterializeResult,
    MetadataValue,
    SpecificPartitionsPartitionMapping,
    asset,
)

from mihd_resources.orchestration import GPU_POOL, gpu_op_tags
from mihd_resources.orchestration import run_record_metadata
from mihd_assets.embeddings.assets import gene_key
from mihd_assets.fileio import atomic_write_text, file_sha256
from mihd_assets.slides.assets import RAW_SLIDE, require_tissue_check
from mihd_resources import ComputeResource, MetricsStore, settings
from mihd_resources.compute import DEVICE_FACTS, device_check_result, device_check_spec
from mihd_resources.geometry_store import (
    CHECKPOINT,
    CHECKPOINT_RECORD,
    EVALUATION,
    TRAINING_SET,
    GeometryStore,
)
from mihd_resources.step_executor import StepExecutor
from mihd_resources.storage import SLIDES, validate_partition_key

from .config import GeometryPlan, geometry_plan, geometry_size

GROUP = "geometry"
TRAINING_SET_KEY = AssetKey(["geometry", "geometry_training_set"])
CHECKPOINT_KEY = AssetKey(["geometry", "geometry_checkpoint"])
EVALUATION_KEY = AssetKey(["geometry", "geometry_evaluation"])
METRICS_KEY = AssetKey(["geometry", "geometry_metrics"])
BEATS_BASELINES = "generator_beats_baselines"
REFINED_NOT_WORSE = "refined_not_worse_than_generator"
LOW_SIGMA_SCALE = "low_sigma_scale_ratio"

PLAN: GeometryPlan = geometry_plan()
for _slide in PLAN.train_slides + PLAN.heldout_slides:
    validate_partition_key(_slide, SLIDES)
_SLIDES = SpecificPartitionsPartitionMapping(list(PLAN.train_slides + PLAN.heldout_slides))


def _training_set_ins() -> dict[str, AssetIn]:
    ins = {"raw": AssetIn(key=RAW_SLIDE, partition_mapping=_SLIDES)}
    if PLAN.gene_encoder != "shared_pca":
        ins["embedding"] = AssetIn(key=gene_key(PLAN.gene_encoder), partition_mapping=_SLIDES)
    return ins


@asset(
    key=TRAINING_SET_KEY,
    ins=_training_set_ins(),
    group_name=GROUP,
    code_version="1",
    kinds={"python", "numpy"},
    description=(
        "Random sets of spots from the training slides, with the frozen expression encoder's features "
        f"(`{PLAN.gene_encoder}`, fitted on training slides only) and canonical target coordinates factored "
        "from each set's centred Gram matrix (V = U sqrt(Lambda), sign-fixed, slide units); held-out slides' "
        "sets for evaluation; sigma_data estimated from the training targets. Training slides: "
        f"{', '.join(PLAN.train_slides)}; held out: {', '.join(PLAN.heldout_slides)}."
    ),
)
def geometry_training_set(context: AssetExecutionContext, store: GeometryStore, raw: dict, **embedding):
    from .dataset import build_training_set

    size = geometry_size(settings.profile())
    for slide_id, adata in raw.items():
        require_tissue_check(adata, slide_id)
    started = time.perf_counter()
    stored = embedding.get("embedding")
    embeddings = {s: (e.values, e.obs_names) for s, e in stored.items()} if stored else None
    ts = build_training_set(raw, PLAN, size, embeddings)
    path = store.path(TRAINING_SET)
    ts.save(path)
    n_labelled = {s: int(a.obs["truth"].notna().sum()) if "truth" in a.obs else 0 for s, a in raw.items()}
    return MaterializeResult(metadata={
        "path": str(path),
        "fingerprint": file_sha256(path)[:16],
        "train_slides": MetadataValue.json(ts.slide_ids("train")),
        "heldout_slides": MetadataValue.json(ts.slide_ids("heldout")),
        "n_sets_train": int(len(ts.train.size)),
        "n_sets_heldout": int(len(ts.heldout.size)),
        "sigma_data": round(ts.sigma_data, 5),
        "dims": ts.dims,
        # shared_pca: genes present in every slide (slides with different gene lists share these)
        **({"n_shared_genes": ts.info["encoder"]["n_shared_genes"]} if "n_shared_genes" in ts.info["encoder"] else {}),
        "n_genes_per_slide": MetadataValue.json({s: int(a.n_vars) for s, a in raw.items()}),
        "n_labelled_spots": MetadataValue.json(n_labelled),
        **run_record_metadata(ts.info),
        "profile": settings.profile(),
        "seconds": round(time.perf_counter() - started, 3),
    })


class CheckpointConfig(Config):
    """``steps``: 0 = the size's default. ``restart``: train from scratch, moving the existing
    checkpoint aside (``<name>.incompatible-<time>`` or ``<name>.restart-<time>``); without it, a
    checkpoint that cannot be resumed fails the step, naming the file and why."""

    steps: int = 0
    restart: bool = False


@asset(
    key=CHECKPOINT_KEY,
    deps=[TRAINING_SET_KEY],
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    code_version="3",
    kinds={"pytorch"},
    check_specs=[device_check_spec(CHECKPOINT_KEY)],
    description=(
        "Trained geometry model: ISAB set encoder, generator (direct V) and EDM-preconditioned FiLM denoiser. "
        "State dict, configs, optimizer and RNG state written atomically every N steps; a killed run resumes "
        "from the last checkpoint. Records step, losses, sigma_data, device (requested, used, what expected a "
        "GPU) and seconds. CPU: tiny size; "
        "CUDA: bf16 autocast when the compute resource allows AMP."
    ),
)
def geometry_checkpoint(context: AssetExecutionContext, config: CheckpointConfig, compute: ComputeResource,
                        store: GeometryStore, step_executor: StepExecutor) -> MaterializeResult:
    import dataclasses

    from .models import GeometryModel, ModelConfig
    from .targets import GeometryTrainingSet
    from .train import train

    size = geometry_size(settings.profile())
    ts_path = store.existing(TRAINING_SET, "geometry_training_set")
    ts = GeometryTrainingSet.load(ts_path)
    fingerprint = file_sha256(ts_path)
    cs = compute.settings()
    train_cfg = size.train if not config.steps else dataclasses.replace(size.train, steps=config.steps)
    model_cfg = ModelConfig(
        in_dim=ts.slides[0].features.shape[1], dims=ts.dims, width=size.width, heads=size.heads,
        inducing=size.inducing, context_blocks=size.context_blocks, generator_blocks=size.generator_blocks,
        denoiser_blocks=size.denoiser_blocks,
    )
    ckpt = store.path(CHECKPOINT)
    # The frozen encoder travels with the checkpoint, so new data can be encoded the same way.
    extra = {"encoder": ts.encoder, "slides": {"train": ts.slide_ids("train"), "heldout": ts.slide_ids("heldout")}}

    def work(log):
        device = cs.torch_device()
        if device.type == "cpu" and size.name != "tiny":
            log.warning(f"geometry size '{size.name}' on CPU: expect hours; MIHD_GEOMETRY_SIZE=tiny is the CPU size")
        return train(ts, model_cfg, train_cfg, ckpt, fingerprint, device=device, amp=cs.use_amp(), log=log.info,
                     extra=extra, restart=config.restart, warn=log.warning)

    # The device facts (device_requested, device_used, gpu_expected_by) are the one record of
    # where the step ran; `device` and `amp_dtype` are read from them.
    result, facts = compute.run(context, step_executor, "geometry", work)
    on_cuda = facts["device_used"] == "cuda"
    record = {
        "checkpoint_id": file_sha256(ckpt)[:16],
        "path": str(ckpt),
        "step": result.step,
        "target_steps": train_cfg.steps,
        "resumed_from_step": result.resumed_from_step,
        "resume_note": result.resume_note,
        "restarted_from_incompatible": result.restarted_from_incompatible,
        "moved_aside_to": result.moved_aside_to,
        "losses": result.last_losses,
        "sigma_data": round(ts.sigma_data, 5),
        "sigma_gen": None if result.sigma_gen is None else round(result.sigma_gen, 5),
        "size": size.name,
        "n_parameters": sum(p.numel() for p in GeometryModel(model_cfg).parameters()),
        "device": facts["device_used"],
        **facts,
        "amp_dtype": "bfloat16" if cs.amp and on_cuda else "float32",
        "seconds": round(result.seconds, 2),
        "training_set_fingerprint": fingerprint[:16],
        "profile": settings.profile(),
    }
    atomic_write_text(store.path(CHECKPOINT_RECORD), json.dumps({**record, "history": result.history}, indent=1))
    context.log.info(f"geometry checkpoint {record['checkpoint_id']} at step {result.step} ({result.resume_note})")
    return MaterializeResult(metadata=run_record_metadata(record),
                             check_results=[device_check_result(CHECKPOINT_KEY, facts)])


def _check_results(frame: pd.DataFrame) -> list[AssetCheckResult]:
    """The family's bars, per held-out slide, as WARN checks on the evaluation."""
    main = frame[frame["sigma_bin"] == ""].set_index(["slide_id", "method"])["knn_jaccard"]
    slides = sorted(frame["slide_id"].unique())
    beats = {s: bool(main[(s, "generator")] > max(main[(s, "random")], main[(s, "expression_spectral")])) for s in slides}
    refined = {s: bool(main[(s, "refined")] >= main[(s, "generator")]) for s in slides}
    low = frame[(frame["method"] == "denoiser") & (frame["sigma_hi"] <= 0.1)].set_index("slide_id")["scale_ratio"]
    low_ok = {s: bool(0.8 <= low[s] <= 1.25) for s in slides}
    jacc = {s: {m: round(float(main[(s, m)]), 4) for m in ("generator", "refined", "random", "expression_spectral")} for s in slides}
    return [
        AssetCheckResult(check_name=BEATS_BASELINES, asset_key=EVALUATION_KEY, passed=all(beats.values()),
                         severity=AssetCheckSeverity.WARN, metadata={"knn_jaccard": MetadataValue.json(jacc)}),
        AssetCheckResult(check_name=REFINED_NOT_WORSE, asset_key=EVALUATION_KEY, passed=all(refined.values()),
                         severity=AssetCheckSeverity.WARN, metadata={"knn_jaccard": MetadataValue.json(jacc)}),
        AssetCheckResult(check_name=LOW_SIGMA_SCALE, asset_key=EVALUATION_KEY, passed=all(low_ok.values()),
                         severity=AssetCheckSeverity.WARN,
                         metadata={"scale_ratio_sigma_below_0.1": MetadataValue.json({s: round(float(low[s]), 4) for s in slides})}),
    ]


@asset(
    key=EVALUATION_KEY,
    deps=[CHECKPOINT_KEY, TRAINING_SET_KEY],
    group_name=GROUP,
    pool=GPU_POOL,
    op_tags=gpu_op_tags(),
    code_version="3",
    kinds={"pytorch", "pandas"},
    check_specs=[
        AssetCheckSpec(BEATS_BASELINES, asset=EVALUATION_KEY,
                       description="On every held-out slide the generator's kNN Jaccard@k beats both baselines."),
        AssetCheckSpec(REFINED_NOT_WORSE, asset=EVALUATION_KEY,
                       description="Refinement (generator -> noise -> Heun) does not lower kNN Jaccard@k."),
        AssetCheckSpec(LOW_SIGMA_SCALE, asset=EVALUATION_KEY,
                       description="One-step denoising keeps the scale (ratio in [0.8, 1.25]) for sigma < 0.1."),
        device_check_spec(EVALUATION_KEY),
    ],
    description=(
        "Held-out evaluation of the checkpoint: generator, refined (generator -> noise at sigma_refine -> Heun), "
        "full Heun sampler from sigma_max, one-step denoiser per sigma bin, and the baselines random coordinates "
        "and expression-kNN spectral embedding; scale ratio, kNN Jaccard@k, Spearman of pairwise distances and "
        "trustworthiness@k per slide, method and sigma bin."
    ),
)
def geometry_evaluation(context: AssetExecutionContext, compute: ComputeResource, store: GeometryStore,
                        step_executor: StepExecutor) -> MaterializeResult:
    from .evaluate import evaluate, refine_stop
    from .targets import GeometryTrainingSet
    from .train import checkpoint_sigma_gen, load_model

    ckpt = store.existing(CHECKPOINT, "geometry_checkpoint")
    ts = GeometryTrainingSet.load(store.existing(TRAINING_SET, "geometry_training_set"))
    cs = compute.settings()
    started = time.perf_counter()

    def work(log):
        device = cs.torch_device()
        model, saved = load_model(ckpt, device)
        sigma_gen = checkpoint_sigma_gen(saved, str(ckpt))
        frame = evaluate(model, ts, PLAN, device, amp=cs.use_amp(), batch_size=cs.batch_size, log=log.info,
                         sigma_gen=sigma_gen)
        return frame, int(saved["step"]), sigma_gen

    (frame, step, sigma_gen), facts = compute.run(context, step_executor, "geometry", work)
    frame.insert(0, "checkpoint_id", file_sha256(ckpt)[:16])
    frame.insert(1, "step", step)
    frame["sigma_data"] = ts.sigma_data
    frame["k"] = PLAN.knn_k
    for name in DEVICE_FACTS:  # every geometry_metrics row says where the evaluation ran
        frame[name] = facts[name]
    path = store.path(EVALUATION)
    atomic_write_text(path, frame.to_csv(index=False))
    summary = frame[frame["sigma_bin"] == ""].groupby("method")[["knn_jaccard", "scale_ratio", "trustworthiness"]].mean()
    return MaterializeResult(
        metadata={
            "path": str(path),
            "checkpoint_id": str(frame["checkpoint_id"].iloc[0]),
            "step": step,
            "sigma_gen": round(sigma_gen, 5),
            "refine_schedule": MetadataValue.json({
                "sigma_refine": round(PLAN.sigma_refine_factor * ts.sigma_data, 5), "steps": PLAN.refine_steps,
                "stop": round(refine_stop(PLAN, ts.sigma_data, sigma_gen), 5)}),
            "heldout_slides": MetadataValue.json(ts.slide_ids("heldout")),
            "summary": MetadataValue.md(summary.round(4).to_markdown()),
            "device": facts["device_used"],
            **facts,
            "seconds": round(time.perf_counter() - started, 2),
        },
        check_results=[*_check_results(frame), device_check_result(EVALUATION_KEY, facts)],
    )


@asset(
    key=METRICS_KEY,
    deps=[EVALUATION_KEY, CHECKPOINT_KEY],
    group_name=GROUP,
    code_version="1",
    kinds={"python", "duckdb"},
    description=(
        "Writes DuckDB `geometry_metrics` (per checkpoint, slide, method and sigma bin) and "
        "`geometry_training_runs` (step, losses, sigma_data, device, seconds of the checkpoint); both with "
        "device_requested / device_used / gpu_expected_by of the GPU step behind the row; "
        "views `geometry_scale_by_sigma` (scale ratio and Jaccard@10 of the one-step denoiser per noise bin) and `geometry_methods_latest`."
    ),
)
def geometry_metrics(context: AssetExecutionContext, store: GeometryStore, metrics: MetricsStore) -> MaterializeResult:
    frame = pd.read_csv(store.existing(EVALUATION, "geometry_evaluation"), keep_default_na=False, na_values=[""])
    frame["sigma_bin"] = frame["sigma_bin"].fillna("")
    if "gpu_expected_by" in frame:  # '' (nothing expected a GPU) is not a missing value
        frame["gpu_expected_by"] = frame["gpu_expected_by"].fillna("")
    record = json.loads(store.existing(CHECKPOINT_RECORD, "geometry_checkpoint").read_text())
    run = {k: record[k] for k in ("checkpoint_id", "step", "target_steps", "resumed_from_step", "sigma_data",
                                  "size", "n_parameters", "device", "amp_dtype", "seconds", "profile")}
    # Checkpoints recorded before the device facts existed read NULL.
    run.update({k: record.get(k) for k in DEVICE_FACTS})
    run["losses"] = json.dumps(record["losses"])
    run["train_slides"] = ",".join(PLAN.train_slides)
    run["heldout_slides"] = ",".join(PLAN.heldout_slides)
    written = metrics.write(context, {"geometry_metrics": frame, "geometry_training_runs": [run]})
    return MaterializeResult(metadata={"rows_written": MetadataValue.json(written)})
