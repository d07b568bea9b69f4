"""Fusion, clustering and evaluation assets, generated from the benchmark matrix.

Lineage: ``embeddings/*`` -> ``fusion/<method>__<gene>__<vision>`` (fused embeddings) ->
``clustering/<representation>__<method>`` (raw + refined labels) ->
``evaluation/clustering_metrics/<representation>__<method>`` (its DuckDB rows, one asset per
clustering so any subset of the matrix can be scored on its own) -> ``reports/*``. Image-only methods go from a
vision embedding straight to ``clustering/image_only__<method>__<vision>``.
"""


import time

import numpy as np
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
)

from mihd_resources.orchestration import run_record_metadata, throttled_log
from mihd_resources.orchestration import GPU_POOL, gpu_op_tags
from mihd_resources.orchestration import slides_partitions
from mihd_assets.embeddings.assets import gene_key, vision_key
from mihd_assets.embeddings.store import SpotEmbedding
from mihd_assets.matrix import MATRIX, cluster_count, replicate_suffix
from mihd_assets.slides.assets import RAW_SLIDE, preprocessed_key, require_image
from mihd_resources import ComputeResource, MetricsStore, settings
from mihd_resources.clustering import ClusteringResource
from mihd_resources.compute import DEVICE_FACTS, device_check_result, device_check_spec
from mihd_resources.step_executor import StepExecutor

from . import normalize
from .store import SpotLabels

METHOD_CHECK = "clustering_method_as_requested"
PSEUDO_LABEL_CHECK = "staig_pseudo_labels_as_requested"
TRAINED_FUSIONS = ("llava_mlp", "basic_contrastive", "qformer")

# Demo profile: same code, fewer epochs and narrower networks (recorded as profile=demo).
DEMO_FUSION_KW = {
    "llava_mlp": {"epochs": 60},
    "basic_contrastive": {"epochs": 60, "embed_dim": 32, "hidden_dim": 128},
    "qformer": {"epochs": 25, "model_dim": 32, "n_layers": 1},
}
DEMO_IMAGE_ONLY_KW = {
    "scan": {"epochs": 40, "hidden_dim": 128},
    "stego": {"epochs": 80, "hidden_dim": 64, "code_dim": 32},
    "byol_gat": {"epochs": 4, "gat_epochs": 60, "image_size": 32, "encoder_widths": (8, 16, 32)},
}
DEMO_STAIG_EPOCHS = 300  # the real STAIG schedule is cheap on a demo-sized slide


def split_vision(name: str) -> tuple[str, str]:
    """``"uni2_staig_strict"`` -> ``("uni2", "staig_strict")``."""
    for variant in sorted(MATRIX.vision_variants, key=len, reverse=True):
        if name.endswith(f"_{variant}"):
            return name[: -len(variant) - 1], variant
    raise ValueError(f"vision embedding name {name!r} does not end with a variant of {MATRIX.vision_variants}")


def vision_input_key(name: str) -> AssetKey:
    return vision_key(*split_vision(name))


def fusion_name(method: str, gene: str, vision: str) -> str:
    return f"{method}__{gene}__{vision}"


STAIG_NAME = fusion_name("staig_fusion", "hvg", MATRIX.staig_vision)
# STAIG's own mode for slides without a usable image: its own asset, never a silent stand-in.
STAIG_NO_IMAGE_NAME = fusion_name("staig_fusion", "hvg", "none")


def fusion_key(name: str) -> AssetKey:
    return AssetKey(["fusion", name])


def clustering_key(representation: str, method: str, replicate: int = 0) -> AssetKey:
    return AssetKey(["clustering", f"{representation}__{method}{replicate_suffix(replicate)}"])


def _as_metadata(record: dict) -> dict:
    return run_record_metadata(record, exclude=("loss_history",))


def _progress(context, label: str):
    log = throttled_log(context, label)
    return lambda epoch, epochs, loss: log(f"epoch {epoch}/{epochs} loss {loss:.4f}", final=epoch == epochs)


def _aligned(reference: SpotEmbedding, other: SpotEmbedding, where: str) -> np.ndarray:
    """``other``'s rows in ``reference``'s spot order."""
    if other.obs_names == reference.obs_names:
        return other.values
    index = {b: i for i, b in enumerate(other.obs_names)}
    missing = [b for b in reference.obs_names if b not in index]
    if missing:
        raise ValueError(f"{where}: {len(missing)} spots of the gene embedding have no vision embedding (first: {missing[:3]})")
    return other.values[[index[b] for b in reference.obs_names]]


def _upstream_device(embedding: SpotEmbedding) -> dict:
    """The device facts of the GPU step that computed ``embedding`` (none for CPU-only embeddings
    such as PCA or concat, and for embeddings stored before the facts were recorded)."""
    return {k: embedding.info[k] for k in DEVICE_FACTS if k in embedding.info}


PSEUDO_LABEL_FACTS = ("pseudo_label_k_requested", "pseudo_label_k_used", "n_pseudo_labels")


def _upstream_pseudo_labels(embedding: SpotEmbedding) -> dict:
    """STAIG's image pseudo-labels behind a representation (k requested, k used, non-empty
    pseudo-labels); nothing for other representations and for STAIG without an image."""
    info = embedding.info
    if info.get("pseudo_labels") != "kmeans_image_pcs":
        return {}
    # STAIG embeddings stored before the k used was recorded lack it (NULL in the rows)
    return {"pseudo_label_k_requested": info["pseudo_label_k"], "pseudo_label_k_used": info.get("pseudo_label_k_used"),
            "n_pseudo_labels": info["n_pseudo_labels"]}


def _upstream_weights(*embeddings: SpotEmbedding) -> str:
    sources = sorted({str(e.info.get("weights", "unknown")) for e in embeddings})
    return "random" if any(s.startswith("random") for s in sources) else "; ".join(sources)


# ---------------------------------------------------------------- fusion embeddings

def _fusion_factory(method: str, gene: str, vision: str, replicate: int = 0):
    base = fusion_name(method, gene, vision)
    name = base + replicate_suffix(replicate)
    trained = method in TRAINED_FUSIONS

    @asset(
        key=fusion_key(name),
        ins={"gene_embedding": AssetIn(key=gene_key(gene)), "vision_embedding": AssetIn(key=vision_input_key(vision))},
        group_name="fusion",
        partitions_def=slides_partitions,
        io_manager_key="embedding_io_manager",
        pool=GPU_POOL if trained else None,
        op_tags=gpu_op_tags() if trained else None,
        code_version="1",
        kinds={"pytorch"} if trained else {"numpy"},
        check_specs=[device_check_spec(fusion_key(name))] if trained else None,
        description=(
            f"`{method}` fusion of the `{gene}` gene embedding and the `{vision}` vision embedding; both "
            "are standardized per modality once, here, before fusing."
            + (f" Replicate {replicate} (training seed {replicate})." if trained else "")
        ),
    )
    def _asset(context: AssetExecutionContext, compute: ComputeResource, step_executor: StepExecutor,
               gene_embedding, vision_embedding):
        from . import simple, trained as trained_methods

        slide_id = context.partition_key
        where = f"slide '{slide_id}' {name}"
        g = normalize.standardize(gene_embedding.values)
        v = normalize.standardize(_aligned(gene_embedding, vision_embedding, where))
        demo = settings.profile() == "demo"
        device = None  # device facts of the trained (gpu-pool) fusions
        if method == "concat":
            fused, info = simple.concat_fusion(g, v)
        elif method == "mean":
            fused, info = simple.mean_fusion(g, v)
        else:
            fn = getattr(trained_methods, f"{method}_fusion")
            kwargs = DEMO_FUSION_KW[method] if demo else {}
            cs = compute.settings()

            def work(log):
                return fn(g, v, device=str(cs.torch_device()), progress=_progress(log, where), seed=replicate,
                          **kwargs)

            (fused, info), device = compute.run(context, step_executor, "fusion", work)
        record = {**info, **(device or {}), "method": method, "gene_encoder": gene, "vision": vision,
                  "replicate": replicate, "weights": _upstream_weights(gene_embedding, vision_embedding),
                  "profile": settings.profile(),
                  "normalization": "standardize(gene), standardize(vision) once before fusion"}
        yield Output(SpotEmbedding(fused, list(gene_embedding.obs_names), record),
                     metadata={**_as_metadata(record), "dims": int(fused.shape[1])})
        if device is not None:
            yield device_check_result(fusion_key(name), device)

    return _asset


def _staig_events(context, compute: ComputeResource, step_executor: StepExecutor, pre, image_raw, config, name: str,
                  replicate: int, *, vision_name: str, weights: str):
    """Run STAIG (image or no-image mode, as ``config`` says) on the `staig` preset's HVG matrix;
    yields its output and its checks."""
    from dataclasses import replace

    from .staig import staig_fusion

    where = f"slide '{context.partition_key}' {name}"
    if settings.profile() == "demo":
        config = replace(config, epochs=DEMO_STAIG_EPOCHS)
    hvg = pre.X.toarray() if hasattr(pre.X, "toarray") else np.asarray(pre.X)
    coords = np.asarray(pre.obsm["spatial"])
    cs = compute.settings()

    def work(log):
        try:
            return staig_fusion(hvg, coords, image_raw, config, device=str(cs.torch_device()),
                                progress=_progress(log, where), logger=log)
        except ValueError as err:  # re-raised with the slide and asset it happened in
            raise ValueError(f"{where}: {err}") from err

    (out, info), device = compute.run(context, step_executor, "fusion", work)
    record = {**info, **device, "gene_encoder": "hvg", "vision": vision_name, "weights": weights,
              "profile": settings.profile(), "replicate": replicate}
    yield Output(SpotEmbedding(out, list(pre.obs_names), record), metadata={**_as_metadata(record)})
    yield device_check_result(context.asset_key, device)
    if config.image_mode == "image":
        yield _pseudo_label_result(context.asset_key, info)


def _pseudo_label_check(key: AssetKey) -> AssetCheckSpec:
    return AssetCheckSpec(PSEUDO_LABEL_CHECK, asset=key, description=(
        "Fails (WARN) when STAIG's image pseudo-labels are fewer than pseudo_label_k: k clamped to a slide with "
        "fewer spots, or k-means leaving pseudo-labels without a spot."))


def _pseudo_label_result(key: AssetKey, info: dict) -> AssetCheckResult:
    requested, used, found = info["pseudo_label_k"], info["pseudo_label_k_used"], info["n_pseudo_labels"]
    problems = []
    if used != requested:
        problems.append(f"pseudo_label_k={requested} clamped to {used}, the slide's number of spots")
    if found != used:
        problems.append(f"k-means gave {found} non-empty pseudo-labels of {used}")
    return AssetCheckResult(
        check_name=PSEUDO_LABEL_CHECK, asset_key=key, passed=not problems, severity=AssetCheckSeverity.WARN,
        description="; ".join(problems) or None,
        metadata={"pseudo_label_k_requested": requested, "pseudo_label_k_used": used, "n_pseudo_labels": found},
    )


def _staig_factory(replicate: int = 0):
    from .staig import StaigConfig

    name = STAIG_NAME + replicate_suffix(replicate)
    seed = StaigConfig().seed + replicate

    @asset(
        key=fusion_key(name),
        ins={"pre": AssetIn(key=preprocessed_key("staig")), "vision": AssetIn(key=vision_input_key(MATRIX.staig_vision))},
        group_name="fusion",
        partitions_def=slides_partitions,
        io_manager_key="embedding_io_manager",
        pool=GPU_POOL,
        op_tags=gpu_op_tags(),
        code_version="3",
        kinds={"pytorch"},
        check_specs=[device_check_spec(fusion_key(name)), _pseudo_label_check(fusion_key(name))],
        description=(
            "STAIG-equivalent fusion with STAIG's published configuration: the 3,000-HVG matrix of the `staig` "
            "preset on a k=5 spatial graph, image-distance-driven edge dropping, pseudo-label-debiased "
            "contrastive loss (k=80, tau=35), 300 epochs; the image embedding is standardized once. "
            f"Replicate {replicate}: seed {seed} (STAIG's published seed is 39788)."
        ),
    )
    def _asset(context: AssetExecutionContext, compute: ComputeResource, step_executor: StepExecutor, pre, vision):
        where = f"slide '{context.partition_key}' {name}"
        require_image(pre, context.partition_key, f"STAIG image mode ({name})")
        image_raw = _aligned(SpotEmbedding(np.zeros((pre.n_obs, 1)), list(pre.obs_names)), vision, where)
        yield from _staig_events(context, compute, step_executor, pre, image_raw, StaigConfig(seed=seed), name,
                                 replicate, vision_name=MATRIX.staig_vision, weights=_upstream_weights(vision))

    return _asset


def _staig_no_image_factory(replicate: int = 0):
    from .staig import StaigConfig

    name = STAIG_NO_IMAGE_NAME + replicate_suffix(replicate)
    seed = StaigConfig().seed + replicate

    @asset(
        key=fusion_key(name),
        ins={"pre": AssetIn(key=preprocessed_key("staig"))},
        group_name="fusion",
        partitions_def=slides_partitions,
        io_manager_key="embedding_io_manager",
        pool=GPU_POOL,
        op_tags=gpu_op_tags(),
        code_version="1",
        kinds={"pytorch"},
        check_specs=[device_check_spec(fusion_key(name))],
        description=(
            "STAIG without an image, as STAIG itself runs on slides without a usable image: the same GCN, graph "
            "(k=5), contrastive loss (tau=35) and 300 epochs on the 3,000-HVG matrix of the `staig` preset, with "
            "edges dropped uniformly (each with probability 1/degree) and no image pseudo-labels (every other "
            f"spot is a negative). Replicate {replicate}: seed {seed}. Runs on every slide, image or not."
        ),
    )
    def _asset(context: AssetExecutionContext, compute: ComputeResource, step_executor: StepExecutor, pre):
        yield from _staig_events(context, compute, step_executor, pre, None, StaigConfig(image_mode="none", seed=seed),
                                 name, replicate, vision_name="none", weights="none (no image)")

    return _asset


# ---------------------------------------------------------------- representations

def representations() -> dict[str, tuple[AssetKey, str, bool]]:
    """Every embedding that gets clustered: name -> (asset key of replicate 0, kind, trained).

    A trained representation has one asset per replicate (key + ``__rep<r>``); the others
    are deterministic and every clustering replicate reads the same asset."""
    reps: dict[str, tuple[AssetKey, str, bool]] = {}
    for gene in MATRIX.gene_only:
        reps[f"gene_{gene}"] = (gene_key(gene), "gene", False)
    for vision in MATRIX.vision_only:
        reps[f"vision_{vision}"] = (vision_input_key(vision), "vision", False)
    for method in MATRIX.fusion_methods:
        for gene, vision in MATRIX.fusion_inputs:
            name = fusion_name(method, gene, vision)
            reps[name] = (fusion_key(name), "fusion", method in TRAINED_FUSIONS)
    reps[STAIG_NAME] = (fusion_key(STAIG_NAME), "fusion", True)
    reps[STAIG_NO_IMAGE_NAME] = (fusion_key(STAIG_NO_IMAGE_NAME), "fusion", True)
    return reps


def _replicate_key(key: AssetKey, replicate: int) -> AssetKey:
    return AssetKey([*key.path[:-1], key.path[-1] + replicate_suffix(replicate)])


def clustering_input(values: np.ndarray, kind: str, seed: int = 0) -> tuple[np.ndarray, str]:
    from .clustering import prepare_for_clustering

    return prepare_for_clustering(values, standardize_first=kind == "vision", max_dims=MATRIX.max_cluster_dims,
                                  n_pcs=MATRIX.cluster_pcs, seed=seed)


def run_clustering(method: str, x: np.ndarray, n_clusters: int, resource: ClusteringResource, where: str,
                   log, replicate: int = 0) -> tuple[np.ndarray, str, dict]:
    """Labels, the method actually used, and extra facts, ``n_clusters_requested`` and
    ``n_clusters_found`` among them. A missing mclust fails unless the resource explicitly
    allows the fallback, which is then logged at WARNING; so is a result with another number
    of non-empty clusters than requested (leiden's resolution search missing the count,
    mclust or k-means leaving clusters empty)."""
    from .clustering import (
        MclustUnavailable,
        cluster_count_facts,
        kmeans_labels,
        leiden_labels,
        mclust_labels,
        validate_for_clustering,
    )

    validate_for_clustering(x, n_clusters, where)
    seed = resource.seed + replicate
    if method == "mclust":
        try:
            labels, used, extra = mclust_labels(x, n_clusters, resource.mclust_model, seed, where), "mclust", {
                "mclust_model": resource.mclust_model, "seed": seed}
        except MclustUnavailable as err:
            if not resource.allow_mclust_fallback:
                raise
            log.warning(f"{where}: mclust unavailable ({err}); FALLING BACK to {resource.fallback_method} "
                        "because ClusteringResource.allow_mclust_fallback is set")
            labels, used, extra = kmeans_labels(x, n_clusters, seed, where), resource.fallback_method, {
                "fallback_reason": str(err), "seed": seed}
        return labels, used, {**extra, **cluster_count_facts(labels, n_clusters, used, where, log)}
    if method == "kmeans":
        labels = kmeans_labels(x, n_clusters, seed, where)
        return labels, "kmeans", {"seed": seed, **cluster_count_facts(labels, n_clusters, "kmeans", where, log)}
    if method == "leiden":
        labels, extra = leiden_labels(x, n_clusters, seed, where=where, logger=log)  # warns itself on a miss
        found = extra.pop("n_found")
        return labels, "leiden", {"seed": seed, **extra, "n_clusters_requested": n_clusters, "n_clusters_found": found}
    raise ValueError(f"{where}: unknown clustering method {method!r}; expected one of {MATRIX.clustering_methods}")


def _method_check(key: AssetKey) -> AssetCheckSpec:
    return AssetCheckSpec(METHOD_CHECK, asset=key,
                          description="Fails (WARN) when a configured fallback replaced the requested clustering method, "
                                      "or when the labels hold another number of non-empty clusters than requested.")


def _method_result(key: AssetKey, requested: str, used: str, n_requested: int, n_found: int) -> AssetCheckResult:
    problems = []
    if requested != used:
        problems.append(f"requested {requested}, ran {used} (fallback)")
    if n_found != n_requested:
        problems.append(f"{n_found} non-empty clusters found, {n_requested} requested")
    return AssetCheckResult(
        check_name=METHOD_CHECK, asset_key=key, passed=not problems, severity=AssetCheckSeverity.WARN,
        description="; ".join(problems) or None,
        metadata={"requested": requested, "used": used, "n_clusters_requested": n_requested,
                  "n_clusters_found": n_found},
    )


def _coords_for(raw, obs_names: list[str]) -> np.ndarray:
    index = {b: i for i, b in enumerate(raw.obs_names)}
    return np.asarray(raw.obsm["spatial"], dtype=np.float64)[[index[b] for b in obs_names]]


def representation_needs_image(representation: str, kind: str) -> bool:
    """Whether a clustered representation is computed from the slide's pixels: a vision
    embedding, or a fusion of one (STAIG's no-image mode is not)."""
    return kind == "vision" or (kind == "fusion" and representation != STAIG_NO_IMAGE_NAME)


def _clustering_factory(representation: str, upstream: AssetKey, kind: str, method: str, replicate: int = 0):
    key = clustering_key(representation, method, replicate)
    needs_image = representation_needs_image(representation, kind)

    @asset(
        key=key,
        ins={"embedding": AssetIn(key=upstream), "raw": AssetIn(key=RAW_SLIDE)},
        group_name="clustering",
        partitions_def=slides_partitions,
        io_manager_key="labels_io_manager",
        code_version="2",
        kinds={"r", "python"} if method == "mclust" else {"python"},
        check_specs=[_method_check(key)],
        description=(
            f"`{method}` clusters of `{upstream.path[-1]}` (cluster count per slide from the matrix), raw and "
            f"after a {MATRIX.refine_k}-neighbour spatial majority vote; replicate {replicate} (clustering seed "
            f"= the resource's seed + {replicate})."
        ),
    )
    def _asset(context: AssetExecutionContext, clustering: ClusteringResource, embedding, raw):
        from .clustering import refine_labels

        slide_id = context.partition_key
        if needs_image:
            require_image(raw, slide_id, f"clustering {key.path[-1]}")
        where = f"slide '{slide_id}' {key.path[-1]}"
        started = time.perf_counter()
        n_clusters, source = cluster_count(slide_id, raw.obs["truth"] if "truth" in raw.obs else None)
        x, prepared = clustering_input(embedding.values, kind)
        labels, used, extra = run_clustering(method, x, n_clusters, clustering, where, context.log, replicate)
        refined = refine_labels(labels, _coords_for(raw, embedding.obs_names), clustering.refine_k)
        record = {
            "representation": representation, "kind": kind, "clustering_method": method,
            "clustering_method_used": used, "n_clusters": n_clusters, "n_clusters_source": source,
            "cluster_input": prepared, "refine_k": clustering.refine_k, "seconds": time.perf_counter() - started,
            "weights": str(embedding.info.get("weights", "unknown")), "profile": settings.profile(),
            "replicate": replicate, **_upstream_device(embedding), **_upstream_pseudo_labels(embedding), **extra,
        }
        yield Output(SpotLabels(list(embedding.obs_names), labels, refined, record), metadata=_as_metadata(record))
        yield _method_result(key, method, used, record["n_clusters_requested"], record["n_clusters_found"])

    return _asset


def _image_only_factory(method: str, vision: str, replicate: int = 0):
    representation = f"image_only__{method}__{vision}"
    key = AssetKey(["clustering", representation + replicate_suffix(replicate)])

    @asset(
        key=key,
        ins={"embedding": AssetIn(key=vision_input_key(vision)), "raw": AssetIn(key=RAW_SLIDE)},
        group_name="clustering",
        partitions_def=slides_partitions,
        io_manager_key="labels_io_manager",
        pool=GPU_POOL,
        op_tags=gpu_op_tags(),
        code_version="1",
        kinds={"pytorch"},
        check_specs=[_method_check(key), device_check_spec(key)],
        description=(
            f"Image-only `{method}` clustering of the `{vision}` embedding"
            + (" and the H&E patches around each spot" if method == "byol_gat" else "")
            + f"; raw labels and a {MATRIX.refine_k}-neighbour spatial majority vote; replicate {replicate} "
            f"(seed {replicate})."
        ),
    )
    def _asset(context: AssetExecutionContext, compute: ComputeResource, clustering: ClusteringResource,
               step_executor: StepExecutor, embedding, raw):
        from . import image_only
        from .clustering import cluster_count_facts, refine_labels, validate_for_clustering

        slide_id = context.partition_key
        require_image(raw, slide_id, f"image-only clustering {key.path[-1]}")
        where = f"slide '{slide_id}' {representation}"
        n_clusters, source = cluster_count(slide_id, raw.obs["truth"] if "truth" in raw.obs else None)
        coords = _coords_for(raw, embedding.obs_names)
        x = normalize.standardize(validate_for_clustering(embedding.values, n_clusters, where))
        kwargs = DEMO_IMAGE_ONLY_KW[method] if settings.profile() == "demo" else {}
        if method not in ("scan", "stego", "byol_gat"):
            raise ValueError(f"{where}: unknown image-only method {method!r}")
        patches = spot_patches(raw, slide_id, embedding.obs_names, kwargs.get("image_size", 96)) \
            if method == "byol_gat" else None
        cs = compute.settings()

        def work(log):
            device = str(cs.torch_device())
            progress = _progress(log, where)
            if method == "scan":
                return image_only.scan_clustering(x, n_clusters, seed=replicate, device=device, progress=progress,
                                                  logger=log, **kwargs)
            if method == "stego":
                return image_only.stego_clustering(x, coords, n_clusters, seed=replicate, device=device,
                                                   progress=progress, **kwargs)
            return image_only.byol_gat_clustering(patches, coords, n_clusters, seed=replicate, device=device,
                                                  progress=progress, **kwargs)

        (labels, _, info), device = compute.run(context, step_executor, "fusion", work)
        if method == "scan":  # scan_clustering logged a collapsed head itself, through the step's log
            counts = {"n_clusters_requested": n_clusters, "n_clusters_found": info["n_clusters_found"]}
        else:  # k-means on the learned features
            counts = cluster_count_facts(labels, n_clusters, method, where, context.log)
        refined = refine_labels(labels, coords, clustering.refine_k)
        record = {
            **{k: v for k, v in info.items() if k != "gat_loss_history"}, **device, **counts,
            "representation": representation, "kind": "image_only", "clustering_method": method,
            "clustering_method_used": method, "n_clusters": n_clusters, "n_clusters_source": source,
            "refine_k": clustering.refine_k, "weights": str(embedding.info.get("weights", "unknown")),
            "profile": settings.profile(), "replicate": replicate,
        }
        yield Output(SpotLabels(list(embedding.obs_names), labels, refined, record), metadata=_as_metadata(record))
        yield _method_result(key, method, method, n_clusters, counts["n_clusters_found"])
        yield device_check_result(key, device)

    return _asset


def spot_patches(raw, slide_id: str, obs_names: list[str], size: int) -> np.ndarray:
    """(n, 3, size, size) RGB patches in [0, 1] from the slide's highest-resolution image."""
    from mihd_assets.embeddings.patches import highest_resolution_image, patch_array

    require_image(raw, slide_id, "spot patches")
    info = raw.uns["spatial"][slide_id]
    _, path, scale = highest_resolution_image(dict(info["metadata"]["image_paths"]), dict(info["scalefactors"]))
    return patch_array(path, _coords_for(raw, obs_names), scale, size)


REPLICATES = range(MATRIX.replicates)
fusion_embeddings = [
    _fusion_factory(m, g, v, r)
    for m in MATRIX.fusion_methods for g, v in MATRIX.fusion_inputs
    for r in (REPLICATES if m in TRAINED_FUSIONS else (0,))
]
staig_fusion_embeddings = [_staig_factory(r) for r in REPLICATES]
staig_no_image_embeddings = [_staig_no_image_factory(r) for r in REPLICATES]
clusterings = [
    _clustering_factory(name, _replicate_key(upstream, r) if trained else upstream, kind, method, r)
    for name, (upstream, kind, trained) in representations().items()
    for method in MATRIX.clustering_methods
    for r in REPLICATES
]
image_only_clusterings = [_image_only_factory(m, MATRIX.image_only_vision, r)
                          for m in MATRIX.image_only_methods for r in REPLICATES]
ALL_CLUSTERING_KEYS = [a.key for a in clusterings + image_only_clusterings]
# Figures show replicate 0 of each clustering (one panel set per method, not per seed).
FIGURE_CLUSTERING_KEYS = [k for k in ALL_CLUSTERING_KEYS if "__rep" not in k.path[-1]]


def _reads_pixels(key: AssetKey, parents: dict[AssetKey, set[AssetKey]]) -> bool:
    """Whether ``key`` is, or is computed from, a vision embedding (walking ``parents``)."""
    vision = {vision_key(e, v) for e in MATRIX.vision_encoders for v in MATRIX.vision_variants}
    seen, frontier = set(), [key]
    while frontier:
        current = frontier.pop()
        if current in vision:
            return True
        for parent in parents.get(current, ()):
            if parent not in seen:
                seen.add(parent)
                frontier.append(parent)
    return False


_PARENTS = {key: set(a.asset_deps[key]) for a in (*fusion_embeddings, *staig_fusion_embeddings,
                                                  *staig_no_image_embeddings, *clusterings, *image_only_clusterings)
            for key in a.keys}
# The clusterings a slide without any image still gets (gene embeddings, STAIG without its image
# branch) and those computed from its pixels.
IMAGE_FREE_FIGURE_KEYS = [k for k in FIGURE_CLUSTERING_KEYS if not _reads_pixels(k, _PARENTS)]
IMAGE_FIGURE_KEYS = [k for k in FIGURE_CLUSTERING_KEYS if _reads_pixels(k, _PARENTS)]


def _dimensions(info: dict) -> dict:
    """The matrix coordinates of one clustering, for its DuckDB rows."""
    rep, kind = info["representation"], info["kind"]
    gene = vision = fusion = ""
    if kind == "gene":
        gene = rep.removeprefix("gene_")
    elif kind == "vision":
        vision = rep.removeprefix("vision_")
    elif kind == "fusion":
        fusion, gene, vision = rep.split("__")
    else:  # image_only__<method>__<vision>
        _, fusion, vision = rep.split("__")
    return {"representation": rep, "kind": kind, "fusion_method": fusion, "gene_encoder": gene, "vision": vision}


def metrics_key(clustering: AssetKey) -> AssetKey:
    """``clustering/<name>`` -> ``evaluation/clustering_metrics/<name>``."""
    return AssetKey(["evaluation", "clustering_metrics", clustering.path[-1]])


def clustering_metric_rows(slide_id: str, raw, stored) -> tuple[list[dict], bool]:
    """DuckDB rows of one clustering of one slide (raw and refined), and whether truth labels exist."""
    from .clustering import clusters_found
    from .metrics import agreement, chaos, pas

    has_truth = bool("truth" in raw.obs and raw.obs["truth"].notna().any())
    info = stored.info
    coords = _coords_for(raw, stored.obs_names)
    rows = []
    for refinement, values in (("none", stored.labels), (f"majority_k{info['refine_k']}", stored.refined)):
        row = {
            "slide_id": slide_id, **_dimensions(info),
            "clustering_method": info["clustering_method"],
            "clustering_method_used": info["clustering_method_used"],
            "refinement": refinement, "n_clusters": info["n_clusters"],
            "n_clusters_requested": info["n_clusters"],
            "n_clusters_found": clusters_found(values),  # of this row's labels (raw or refined)
            "n_clusters_source": info["n_clusters_source"], "n_spots": len(stored.obs_names),
            "chaos": chaos(values, coords), "pas": pas(values, coords),
            "weights": info.get("weights"), "profile": info.get("profile"),
            "replicate": int(info.get("replicate", 0)), "seed": info.get("seed"),
            **{k: info.get(k) for k in DEVICE_FACTS + PSEUDO_LABEL_FACTS},
        }
        if has_truth:
            row.update(agreement(raw.obs["truth"].loc[stored.obs_names].to_numpy(), values))
            row["metrics_status"] = "ok"
        else:
            row.update({"ari": None, "nmi": None, "homogeneity": None, "completeness": None, "n_labelled": 0,
                        "metrics_status": "skipped: slide has no truth labels"})
        rows.append(row)
    return rows, has_truth


def _metrics_factory(clustering: AssetKey):
    key = metrics_key(clustering)

    @asset(
        key=key,
        ins={"labels": AssetIn(key=clustering), "raw": AssetIn(key=RAW_SLIDE)},
        group_name="evaluation",
        partitions_def=slides_partitions,
        code_version="1",
        kinds={"python", "duckdb"},
        description=(
            f"DuckDB `clustering_metrics` rows of `{clustering.to_user_string()}` on one slide: ARI, NMI, "
            "homogeneity, completeness against the truth labels and spatial continuity (CHAOS, PAS), raw and "
            "refined, keyed by every matrix dimension. Slides without truth labels get CHAOS/PAS and the "
            "skipped reason."
        ),
    )
    def _asset(context: AssetExecutionContext, metrics: MetricsStore, labels, raw) -> MaterializeResult:
        slide_id = context.partition_key
        rows, has_truth = clustering_metric_rows(slide_id, raw, labels)
        if not has_truth:
            context.log.warning(f"slide {slide_id}: no truth labels; ARI/NMI of {clustering.path[-1]} skipped, "
                                "CHAOS/PAS still computed")
        written = metrics.write(context, {"clustering_metrics": rows})
        return MaterializeResult(metadata={
            "rows_written": MetadataValue.json(written),
            "truth_labels": has_truth,
            **{f"ari_{r['refinement']}": float(r["ari"]) for r in rows if r["ari"] is not None},
            **{f"nmi_{r['refinement']}": float(r["nmi"]) for r in rows if r["nmi"] is not None},
        })

    return _asset


clustering_metrics = [_metrics_factory(k) for k in ALL_CLUSTERING_KEYS]
ALL_METRICS_KEYS = [a.key for a in clustering_metrics]
