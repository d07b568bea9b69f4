"""Embedding assets: one per gene encoder and per vision encoder x patch variant, per slide
(the vision encoders of one patch variant share one step, which cuts the patches once).

Each stores the raw embedding (SpotEmbedding .npz) with what produced it; the
`embedding_runs_metrics` (gene) and `vision_embedding_runs_metrics` assets load them and
write DuckDB `embedding_runs`.
"""

import tempfile
from pathlib import Path

import numpy as np

from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetCheckKey,
    AssetOut,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
    multi_asset,
)

from mihd_resources.orchestration import run_record_metadata, throttled_log
from mihd_resources.orchestration import GPU_POOL, gpu_op_tags
from mihd_resources.orchestration import slides_partitions
from mihd_assets.matrix import MATRIX
from mihd_assets.slides.assets import RAW_SLIDE, preprocessed_key, require_image, require_tissue_check
from mihd_resources import ComputeResource, MetricsStore, settings
from mihd_resources.compute import device_check_result, device_check_spec
from mihd_resources.step_executor import StepExecutor
from mihd_resources.weights import ModelWeightsResource

from .store import SpotEmbedding

GROUP = "embeddings"
SCGPT_MAX_GENES = 1200  # scGPT's own sequence cap (gene tokens per spot)
DEMO_SCGPT_MAX_GENES = 512
WEIGHTS_CHECK = "weights_not_random"


def gene_key(encoder: str) -> AssetKey:
    return AssetKey(["embeddings", f"gene_{encoder}"])


def vision_key(encoder: str, variant: str) -> AssetKey:
    return AssetKey(["embeddings", f"vision_{encoder}_{variant}"])


def _weights_check(key: AssetKey, info: dict) -> AssetCheckResult:
    random = str(info.get("weights", "")).startswith("random")
    return AssetCheckResult(
        check_name=WEIGHTS_CHECK,
        asset_key=key,
        passed=not random,
        severity=AssetCheckSeverity.WARN,
        description="embedding computed with randomly initialised weights" if random else None,
        metadata={"weights": str(info.get("weights"))},
    )


def _weights_spec(key: AssetKey) -> AssetCheckSpec:
    return AssetCheckSpec(
        WEIGHTS_CHECK, asset=key, description="Warns when the encoder ran with random weights (demo/tests)."
    )


def _progress(context, label: str):
    log = throttled_log(context, label)
    return lambda done, total: log(f"{done}/{total} patches", final=done == total)


def vision_op_name(variant: str) -> str:
    return f"embeddings__vision_{variant}"


def _vision_variant_factory(variant: str):
    """One step per slide and patch variant embeds the patches with every selected vision
    encoder: the patches (for the filtered variants, the 512 px STAIG filter of each window,
    most of a CPU step's time) are cut once and fed to each encoder, batch by batch. Each
    encoder's embedding is its own asset (subsettable: materializing one runs only that
    encoder), with its own checks, and equals what a step of that encoder alone computes."""
    keys = {encoder: vision_key(encoder, variant) for encoder in MATRIX.vision_encoders}

    @multi_asset(
        name=vision_op_name(variant),
        outs={
            key.path[-1]: AssetOut(
                key=key,
                group_name=GROUP,
                io_manager_key="embedding_io_manager",
                code_version="1",
                is_required=False,  # a subset (one encoder) yields only its own outputs
                kinds={"pytorch", "timm"},
                description=(
                    f"Raw `{encoder}` (timm) embeddings of H&E patches around each spot, `{variant}` patch "
                    "variant, read lazily from the slide's highest-resolution image with coordinates scaled by "
                    "that image's own factor; stored before any normalization. The patches are cut once per "
                    "slide and variant for all selected encoders. A slide without any image fails at once, "
                    "naming the slide."
                ),
            )
            for encoder, key in keys.items()
        },
        ins={"raw": AssetIn(key=RAW_SLIDE)},
        partitions_def=slides_partitions,
        pool=GPU_POOL,
        op_tags=gpu_op_tags(),
        can_subset=True,
        check_specs=[spec for key in keys.values() for spec in (_weights_spec(key), device_check_spec(key))],
    )
    def _asset(context: AssetExecutionContext, compute: ComputeResource, weights: ModelWeightsResource,
               step_executor: StepExecutor, raw):
        slide_id = context.partition_key
        encoders = [e for e, key in keys.items() if key in context.selected_asset_keys]
        names = ", ".join(keys[e].path[-1] for e in encoders)
        require_tissue_check(raw, slide_id)
        require_image(raw, slide_id, f"vision embedding {names}")
        paths = {}
        for encoder in encoders:
            path = weights.path_for(encoder)
            if path is None and not weights.allow_random:
                raise ValueError(
                    f"slide '{slide_id}': no weights configured for vision encoder '{encoder}': set "
                    f"ModelWeightsResource.{encoder} (env MIHD_{encoder.upper()}_WEIGHTS) to a local state dict, "
                    "or allow_random=True (env MIHD_ALLOW_RANDOM_WEIGHTS=1) for a random-weights run"
                )
            if path is None:
                context.log.warning(f"slide {slide_id}: {encoder} runs with RANDOM weights (no local weights configured)")
            paths[encoder] = path
        profile = settings.profile()
        tiny = profile == "demo"
        info_sp = raw.uns["spatial"][slide_id]
        image_paths, scalefactors = dict(info_sp["metadata"]["image_paths"]), dict(info_sp["scalefactors"])
        spots = np.asarray(raw.obsm["spatial"])
        cs = compute.settings()
        label = f"{slide_id} vision_{variant} ({len(encoders)} encoder{'s' if len(encoders) != 1 else ''})"

        def work(log):
            from .patches import PatchView, SharedPatchDataset, highest_resolution_image, make_loader
            from .vision import build_encoder, embed_views

            built = [build_encoder(encoder, weights_path=paths[encoder], tiny=tiny) for encoder in encoders]
            image_name, image_path, scale = highest_resolution_image(image_paths, scalefactors)
            views = [PatchView(info["input_size"], tuple(info["mean"]), tuple(info["std"])) for _, info in built]
            dataset = SharedPatchDataset(image_path, spots, scale, views, variant=variant)
            device = cs.torch_device()
            loader = make_loader(dataset, cs.batch_size, cs.num_workers, pin_memory=cs.pin_memory and device.type == "cuda")
            results = embed_views([model for model, _ in built], loader, device, amp=cs.use_amp(),
                                  progress_callback=_progress(log, label))
            shared = {**dataset.describe(), "image": image_name, "patch_pass_encoders": list(encoders)}
            records = [{
                **shared,
                **{k: v for k, v in info.items() if k not in ("mean", "std")},
                "modality": "vision",
                "variant": variant,
                "profile": profile,
                "device": str(device),
                "amp_dtype": str(result.amp_dtype),
                "seconds": round(result.seconds, 3),
                "patches_per_second": round(result.patches_per_second, 2),
            } for (_, info), result in zip(built, results)]
            return [result.embeddings for result in results], records

        (embeddings, records), device = compute.run(context, step_executor, "embeddings", work,
                                                    output_name=[keys[e].path[-1] for e in encoders])
        selected_checks = context.selected_asset_check_keys
        for encoder, values, record in zip(encoders, embeddings, records):
            key = keys[encoder]
            record = {**record, **device}
            yield Output(
                SpotEmbedding(values, list(raw.obs_names), record),
                output_name=key.path[-1],
                metadata={**run_record_metadata(record), "dims": int(values.shape[1])},
            )
            for check in (_weights_check(key, record), device_check_result(key, device)):
                if AssetCheckKey(key, check.check_name) in selected_checks:
                    yield check

    return _asset


def _gene_factory(encoder: str):
    key = gene_key(encoder)

    @asset(
        key=key,
        ins={"pre": AssetIn(key=preprocessed_key(MATRIX.gene_preset))},
        group_name=GROUP,
        partitions_def=slides_partitions,
        io_manager_key="embedding_io_manager",
        pool=GPU_POOL if encoder != "pca" else None,
        op_tags=gpu_op_tags() if encoder != "pca" else None,
        # PCA's output width is part of its code version (30 PCs since the fusion matrix).
        code_version=f"3-{MATRIX.pca_components}pc" if encoder == "pca" else "1",
        kinds={"pytorch"} if encoder != "pca" else {"scikitlearn"},
        check_specs=[_weights_spec(key)] + ([device_check_spec(key)] if encoder != "pca" else []),
        description=(
            f"Raw `{encoder}` gene-expression embedding of each spot from "
            f"`preprocessed_slide_{MATRIX.gene_preset}`; stored before any normalization."
        ),
    )
    def _asset(context: AssetExecutionContext, compute: ComputeResource, weights: ModelWeightsResource,
               step_executor: StepExecutor, pre):
        from .gene import mlp_autoencoder_embedding, pca_embedding
        from .scgpt import save_random_scgpt, scgpt_embedding

        slide_id = context.partition_key
        demo = settings.profile() == "demo"
        cs = compute.settings()
        device = None  # the GPU steps' device facts (compute.run); PCA runs in the step process on CPU
        if encoder == "pca":  # CPU, in the step process
            values, info = pca_embedding(pre, n_components=MATRIX.pca_components)
            info["weights"] = "none (fitted per slide)"
            info["device"] = "cpu"
        elif encoder == "mlp":
            epochs = 20 if demo else MATRIX.mlp_epochs

            def work(log):
                device = cs.torch_device()
                values, info = mlp_autoencoder_embedding(
                    pre, latent_dim=MATRIX.mlp_latent_dim, epochs=epochs, device=str(device), batch_size=cs.batch_size
                )
                info.pop("loss_history", None)
                return values, {**info, "weights": "none (trained per slide)", "device": str(device)}

            (values, info), device = compute.run(context, step_executor, "embeddings", work)
        else:
            # The demo caps each spot at its 512 most expressed genes (real runs: scGPT's 1,200);
            # attention cost grows with the square of the sequence length.
            max_genes = DEMO_SCGPT_MAX_GENES if demo else SCGPT_MAX_GENES
            model_dir = weights.path_for("scgpt")
            random = model_dir is None and weights.allow_random
            if random:
                context.log.warning(f"slide {slide_id}: scGPT runs with RANDOM weights (MIHD_SCGPT_DIR not set)")

            def work(log):
                device = cs.torch_device()
                if random:
                    with tempfile.TemporaryDirectory() as tmp:
                        random_dir = save_random_scgpt(Path(tmp) / "scgpt", list(pre.var_names))
                        values, info = scgpt_embedding(pre, random_dir, device=device, batch_size=cs.batch_size,
                                                       amp=cs.use_amp(), max_genes=max_genes)
                    info["config"] = "tiny"  # save_random_scgpt's small network of the same code
                else:
                    values, info = scgpt_embedding(pre, model_dir, device=device, batch_size=cs.batch_size,
                                                   amp=cs.use_amp(), max_genes=max_genes)
                return values, {**info, "device": str(device)}

            (values, info), device = compute.run(context, step_executor, "embeddings", work)
        record = {**info, **(device or {}), "encoder": encoder, "modality": "gene", "variant": "",
                  "profile": settings.profile()}
        yield Output(
            SpotEmbedding(values, list(pre.obs_names), record),
            metadata={
                **run_record_metadata(record),
                "dims": int(values.shape[1]),
            },
        )
        yield _weights_check(key, record)
        if device is not None:
            yield device_check_result(key, device)

    return _asset


gene_embeddings = [_gene_factory(e) for e in MATRIX.gene_encoders]
vision_embeddings = [_vision_variant_factory(v) for v in MATRIX.vision_variants]


def vision_asset_for(key: AssetKey):
    """The (multi-)asset definition that computes the vision embedding ``key``."""
    for definition in vision_embeddings:
        if key in definition.keys:
            return definition
    raise KeyError(f"no vision embedding asset computes {key.to_user_string()}")
# The assets that read a slide's pixels first; everything downstream of them needs an image too.
VISION_KEYS = [vision_key(e, v) for e in MATRIX.vision_encoders for v in MATRIX.vision_variants]
ALL_EMBEDDING_KEYS = [gene_key(e) for e in MATRIX.gene_encoders] + VISION_KEYS


def _runs_metrics_factory(name: str, keys: list[AssetKey], which: str):
    @asset(
        key=AssetKey(["embeddings", name]),
        ins={"_".join(k.path[1:]): AssetIn(key=k) for k in keys},
        group_name=GROUP,
        partitions_def=slides_partitions,
        code_version="1",
        kinds={"python", "duckdb"},
        description=(
            f"One DuckDB `embedding_runs` row per {which} embedding of this slide: modality, encoder, variant, "
            "dims, weights source, device (and, for GPU steps, the device requested, used and what expected a "
            "GPU), seconds, patches/s (read from the stored files)."
        ),
    )
    def _asset(context: AssetExecutionContext, metrics: MetricsStore, **embeddings) -> MaterializeResult:
        return _write_embedding_runs(context, metrics, embeddings)

    return _asset


def _write_embedding_runs(context: AssetExecutionContext, metrics: MetricsStore, embeddings: dict) -> MaterializeResult:
    rows = []
    for emb in embeddings.values():
        info = emb.info
        rows.append({
            "slide_id": context.partition_key,
            "modality": info.get("modality"),
            "encoder": info.get("encoder"),
            "variant": info.get("variant") or "",
            "config": info.get("config", "full"),
            "profile": info.get("profile"),
            "n_spots": int(emb.values.shape[0]),
            "dims": int(emb.values.shape[1]),
            "weights": str(info.get("weights")),
            "device": info.get("device"),
            # GPU steps only (NULL for PCA and for embeddings stored before these were recorded)
            "device_requested": info.get("device_requested"),
            "device_used": info.get("device_used"),
            "gpu_expected_by": info.get("gpu_expected_by"),
            "seconds": float(info.get("seconds") or 0.0),
            "patches_per_second": info.get("patches_per_second"),
            "n_padded": info.get("n_padded"),
        })
    written = metrics.write(context, {"embedding_runs": rows})
    return MaterializeResult(metadata={"rows_written": MetadataValue.json(written)})


# Two writers into `embedding_runs`, so a slide without any image still gets its gene rows.
embedding_runs_metrics = _runs_metrics_factory("embedding_runs_metrics", [gene_key(e) for e in MATRIX.gene_encoders],
                                               "gene")
vision_embedding_runs_metrics = _runs_metrics_factory("vision_embedding_runs_metrics", VISION_KEYS, "vision")
