"""Slide assets: raw AnnData per slide, preprocessed AnnData per preset, QC rows in DuckDB."""


import time

import numpy as np
import pandas as pd
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetExecutionContext,
    AssetIn,
    AssetKey,
    Config,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    Output,
    asset,
    observable_source_asset,
)

from mihd_resources.orchestration import changed_data_versions, slides_partitions
from mihd_assets.fileio import file_sha256
from mihd_resources import MetricsStore, StorageResource, settings

from .coords import check_slide_images
from .io import read_slide
from .preprocess import PRESETS, preprocess, resolve_steps
from .qc import slide_qc
from .versioning import anndata_content_hash, source_fingerprint

GROUP = "slides"
SLIDE_FILES = AssetKey(["slides", "slide_files"])
RAW_SLIDE = AssetKey(["slides", "raw_slide"])
SPOTS_ON_TISSUE = "spots_on_tissue"
TISSUE_FRACTION = "spots_on_tissue_fraction"
# Presets materialized for every slide; downstream assets pick theirs by key.
MATERIALIZED_PRESETS = ("standard", "staig")
# Bumped when a preset's steps change: standard 2 = scale without clipping (as scanpy's textbook path).
PRESET_CODE_VERSIONS = {"standard": "2", "staig": "1"}


def preprocessed_key(preset: str) -> AssetKey:
    return AssetKey(["slides", f"preprocessed_slide_{preset}"])


# Status of the tissue checks of a slide without any image (no full-resolution TIFF, no
# hires or lowres PNG): they are recorded as failed WARN checks with this text, and the
# assets that need pixels refuse the slide (:func:`require_image`).
NO_IMAGE = "not applicable: no image"


class SlideHasNoImageError(ValueError):
    """An asset that needs pixels was asked to run on a slide without any image."""


def slide_image_paths(adata, slide_id: str) -> dict[str, str]:
    """The slide's image files by name (fullres / hires / lowres); empty without any image."""
    return dict(adata.uns["spatial"][slide_id]["metadata"]["image_paths"])


def has_image(adata, slide_id: str) -> bool:
    """Whether the slide has at least one image (full-resolution TIFF, hires or lowres PNG)."""
    return bool(slide_image_paths(adata, slide_id))


def require_image(adata, slide_id: str, needed_by: str) -> None:
    """Refuse at once, naming the slide, an asset that needs pixels on a slide without any image.

    ``adata`` is the slide's raw or preprocessed AnnData (both keep ``uns["spatial"]``);
    ``needed_by`` names what needs the pixels. Every asset that reads the slide's image, or
    an embedding computed from it, calls this before loading a model or any input of its own.
    """
    if not has_image(adata, slide_id):
        raise SlideHasNoImageError(
            f"slide '{slide_id}' has no image (no full-resolution TIFF, no hires or lowres PNG): "
            f"{needed_by} needs the slide's pixels and does not run for it; gene-only assets do"
        )


def require_tissue_check(raw, slide_id: str) -> None:
    """Refuse to build on a slide whose coordinates missed its tissue (defence in depth:
    the blocking check already stops downstream steps within one run).

    A slide without any image has nothing to check its coordinates against: raw_slide
    records the check as ``NO_IMAGE`` and this lets it through (the assets that need pixels
    refuse it through :func:`require_image`). A slide whose check ran and failed is refused.
    """
    gate = raw.uns.get("mihd_checks", {}).get(SPOTS_ON_TISSUE, {})
    if gate.get("passed", False):
        return
    if gate.get("status") == NO_IMAGE and not has_image(raw, slide_id):
        return
    raise ValueError(
        f"slide '{slide_id}': raw_slide failed its {SPOTS_ON_TISSUE} check; fix the slide's "
        "images or coordinates first"
    )


def slide_input_fingerprint(storage: StorageResource, slide_id: str) -> str:
    """Changes whenever a file of the slide folder, or the slide's .h5ad file, changes (path,
    size, modification time)."""
    return source_fingerprint(storage.slide_source(slide_id))


@observable_source_asset(
    key=SLIDE_FILES,
    group_name=GROUP,
    partitions_def=slides_partitions,
    description=(
        "The files of one slide folder under the data root (counts, positions, scale factors, images, "
        "truth), or its `<slide>.h5ad` file. Its data version is the fingerprint (every file's path, size "
        "and modification time); a new version makes `raw_slide` of that slide unsynced. Observed by the slide discovery "
        "sensor and by `mihd materialize`."
    ),
)
def slide_files(context, storage: StorageResource):
    registered = context.instance.get_dynamic_partitions(slides_partitions.name)
    current = {}
    for slide_id in registered:
        if storage.slide_source(slide_id).exists():
            current[slide_id] = slide_input_fingerprint(storage, slide_id)
        else:
            context.log.warning(f"slide {slide_id}: {storage.slide_source(slide_id)} is gone; not observed")
    return changed_data_versions(context.instance, SLIDE_FILES, current)


def raw_slide_data_version(adata, slide_id: str) -> str:
    """The content of what was read, plus the full-resolution image file (not stored in the AnnData)."""
    paths = dict(adata.uns["spatial"][slide_id]["metadata"]["image_paths"])
    parts = [anndata_content_hash(adata)] + [file_sha256(paths[name]) for name in sorted(paths) if name == "fullres"]
    return "-".join(p[:20] for p in parts)


@asset(
    key=RAW_SLIDE,
    deps=[SLIDE_FILES],
    group_name=GROUP,
    partitions_def=slides_partitions,
    io_manager_key="anndata_io_manager",
    code_version="3",
    kinds={"python", "anndata"},
    check_specs=[
        AssetCheckSpec(
            SPOTS_ON_TISSUE,
            asset=RAW_SLIDE,
            blocking=True,
            description=(
                "Spot coordinates mapped with each image's own scale factor land on that image's "
                "tissue (three-class Otsu on saturation) at least as well as with another image's "
                "scale factor, read as another image's pixels, or with x and y swapped: fails when "
                "one of those puts >= 10 points more of the in-tissue spots on tissue (and >= 60%), "
                "when under 60% land on tissue, or when the image has no tissue contrast. A slide "
                f"without any image fails it with WARN severity, '{NO_IMAGE}', which blocks nothing "
                "(the assets that need pixels refuse such a slide themselves)."
            ),
        ),
        AssetCheckSpec(
            "spots_on_tissue_fraction",
            asset=RAW_SLIDE,
            description=(
                "Warns when fewer than 95% of the in-tissue spots land on tissue in an image (real "
                "slides show 95-99.5%; a torn or folded edge or faint tissue lowers it); the "
                "metadata carries the fraction per image. A slide without any image fails it, "
                f"'{NO_IMAGE}'."
            ),
        ),
    ],
)
def raw_slide(context: AssetExecutionContext, storage: StorageResource):
    """Raw counts of one Visium slide as AnnData, in scanpy's Visium conventions.

    `X` and `layers["counts"]` hold raw UMI counts; `obs["truth"]` the annotated layer
    (spatialLIBD `metadata.tsv` or a two-column truth file); `obsm["spatial"]`
    full-resolution pixels (x = column, y = row); `uns["spatial"][slide]` the scale factors,
    the hires/lowres images and the paths of every source file. The blocking check
    `spots_on_tissue` stops downstream assets when the coordinates miss the tissue.

    A slide without any image (no full-resolution TIFF, no hires or lowres PNG) materializes
    with `has_image: false`; both tissue checks fail with WARN severity as
    "not applicable: no image" (a WARN failure blocks nothing downstream), gene-only assets
    run and every asset that needs pixels refuses the slide (`require_image`).

    Its data version is a hash of the content read, so a touched but unchanged file re-runs
    this asset only: downstream assets stay in sync.
    """
    slide_id = context.partition_key
    source = storage.slide_source(slide_id)
    fingerprint = source_fingerprint(source)
    started = time.perf_counter()
    adata = read_slide(source, slide_id, storage.slide_images_folder(slide_id))
    image = has_image(adata, slide_id)
    checks = check_slide_images(adata, slide_id) if image else []
    passed = image and all(c.passed for c in checks)
    status = ("passed" if passed else "failed") if image else NO_IMAGE
    adata.uns["mihd_checks"] = {SPOTS_ON_TISSUE: {
        "passed": passed, "status": status, "images": {c.image: c.as_dict() for c in checks},
    }}
    info = adata.uns["spatial"][slide_id]
    meta = info["metadata"]
    content = raw_slide_data_version(adata, slide_id)
    yield Output(
        adata,
        data_version=DataVersion(content),
        metadata={
            "slide_id": slide_id,
            "n_spots": adata.n_obs,
            "n_genes": adata.n_vars,
            "counts_format": meta["counts_format"],
            "positions_format": meta["positions_format"],
            "layout": meta["layout"],
            "coordinate_units": meta["coordinate_units"],
            "images": MetadataValue.json(meta["image_paths"]),
            "scalefactors": MetadataValue.json(info["scalefactors"]),
            "truth_source": meta["truth_source"],
            "n_labelled": int(adata.obs["truth"].notna().sum()) if "truth" in adata.obs else 0,
            "input_fingerprint": fingerprint,
            "content_hash": content,
            "profile": settings.profile(),
            "has_image": image,
            # The blocking check's outcome; the text NO_IMAGE on a slide without any image.
            "tissue_check_passed": passed if image else NO_IMAGE,
            "tissue_fraction_low": any(c.low_fraction for c in checks),
            "seconds": round(time.perf_counter() - started, 3),
        },
    )
    for c in checks:
        (context.log.info if c.passed else context.log.error)(
            f"slide {slide_id}: {c.image} image, scale {c.scale:g}: {c.frac_on_tissue:.1%} of spots on tissue"
            + (f" - {c.problem}" if c.problem else "")
        )
    if not image:
        why = (
            f"{NO_IMAGE}: the slide has no full-resolution TIFF and no hires or lowres PNG, so "
            "nothing can be checked against the spot coordinates; assets that need pixels refuse "
            "this slide, gene-only assets run"
        )
        context.log.warning(f"slide {slide_id}: {why}")
        for check_name in (SPOTS_ON_TISSUE, TISSUE_FRACTION):
            yield AssetCheckResult(
                check_name=check_name,
                asset_key=RAW_SLIDE,
                passed=False,
                severity=AssetCheckSeverity.WARN,
                description=why,
                metadata={"has_image": False},
            )
        return
    yield AssetCheckResult(
        check_name=SPOTS_ON_TISSUE,
        asset_key=RAW_SLIDE,
        passed=passed,
        severity=AssetCheckSeverity.ERROR,
        description=None if passed else "; ".join(f"{c.image}: {c.problem}" for c in checks if not c.passed),
        metadata={
            **{f"{c.image}_frac_on_tissue": float(c.frac_on_tissue) for c in checks},
            **{f"{c.image}_scale": float(c.scale) for c in checks},
            **{f"{c.image}_best_fit": c.best_fit for c in checks},
            "frac_on_tissue_by_placement": MetadataValue.json({c.image: c.candidate_fractions for c in checks}),
        },
    )
    low = [c for c in checks if c.low_fraction]
    yield AssetCheckResult(
        check_name="spots_on_tissue_fraction",
        asset_key=RAW_SLIDE,
        passed=not low,
        severity=AssetCheckSeverity.WARN,
        description=(
            "; ".join(
                f"{c.image}: {c.frac_on_tissue:.1%} of the in-tissue spots on tissue, below the 95% "
                "real slides reach (a torn or folded edge or faint tissue lowers it)"
                for c in low
            )
            if low else "every image has >= 95% of the in-tissue spots on tissue"
        ),
        metadata={f"{c.image}_frac_on_tissue": float(c.frac_on_tissue) for c in checks},
    )


class PreprocessConfig(Config):
    """Override the preset's ordered steps (names only). Any override is recorded and
    flagged by the `preset_not_overridden` check."""

    steps_override: list[str] = []


def _preprocessed_factory(preset: str):
    key = preprocessed_key(preset)
    steps = " -> ".join(s.describe() for s in PRESETS[preset])

    @asset(
        key=key,
        ins={"raw": AssetIn(key=RAW_SLIDE)},
        group_name=GROUP,
        partitions_def=slides_partitions,
        io_manager_key="anndata_io_manager",
        code_version=PRESET_CODE_VERSIONS[preset],
        kinds={"python", "anndata", "scanpy"},
        check_specs=[
            AssetCheckSpec(
                "preset_not_overridden",
                asset=key,
                description="Warns when the preset's ordered steps were overridden by run config.",
            )
        ],
        description=(
            f"Slide expression preprocessed with the `{preset}` preset, steps in order: {steps}. "
            "Raw counts stay in `layers['counts']`; the steps that ran are in `uns['preprocess']`."
        ),
    )
    def _asset(context: AssetExecutionContext, config: PreprocessConfig, raw):
        slide_id = context.partition_key
        require_tissue_check(raw, slide_id)
        override = list(config.steps_override)
        if override:
            context.log.warning(
                f"slide {slide_id}: preset '{preset}' steps overridden by run config: {override} "
                f"(preset order: {steps})"
            )
            resolve_steps(preset, override)  # fail fast on unknown step names
        started = time.perf_counter()
        out, ran, notes = preprocess(raw, preset, override or None)
        seconds = time.perf_counter() - started
        out.uns["preprocess"]["seconds"] = seconds
        for note in notes:
            context.log.warning(f"slide {slide_id}: {note}")
        yield Output(
            out,
            metadata={
                "preset": preset,
                "profile": settings.profile(),
                "steps": MetadataValue.json(ran),
                "override": bool(override),
                "notes": MetadataValue.json(notes),
                "n_spots": out.n_obs,
                "n_genes_out": out.n_vars,
                "seconds": round(seconds, 3),
            },
        )
        yield AssetCheckResult(
            check_name="preset_not_overridden",
            asset_key=key,
            passed=not override,
            severity=AssetCheckSeverity.WARN,
            metadata={"steps": MetadataValue.json(ran)},
        )

    return _asset


preprocessed_slides = [_preprocessed_factory(p) for p in MATERIALIZED_PRESETS]


@asset(
    key=AssetKey(["slides", "slide_qc_metrics"]),
    ins={
        "raw": AssetIn(key=RAW_SLIDE),
        **{f"pre_{p}": AssetIn(key=preprocessed_key(p)) for p in MATERIALIZED_PRESETS},
    },
    group_name=GROUP,
    partitions_def=slides_partitions,
    code_version="1",
    kinds={"python", "duckdb"},
)
def slide_qc_metrics(
    context: AssetExecutionContext,
    metrics: MetricsStore,
    raw,
    pre_standard,
    pre_staig,
) -> MaterializeResult:
    """QC numbers of one slide into DuckDB: `slide_qc` (spots, genes, UMI, tissue
    fractions), `slide_image_checks` (one row per image and scale factor; none for a slide
    without any image) and `preprocessing_runs` (preset and exact ordered steps per
    preprocessed matrix)."""
    slide_id = context.partition_key
    images = list(raw.uns["mihd_checks"][SPOTS_ON_TISSUE]["images"].values())
    # The highest-resolution image present stands for the slide's tissue fraction.
    order = {"fullres": 0, "hires": 1, "lowres": 2}
    best = min(images, key=lambda c: order.get(c["image"], 9)) if images else None
    qc = slide_qc(raw, slide_id, float(best["frac_on_tissue"]) if best else None)
    # A slide without any image has no image rows: its slide_qc row says NULL for the
    # tissue fraction, and the write leaves no slide_image_checks row for it.
    image_rows = pd.DataFrame([{**c, "slide_id": slide_id} for c in images])
    if images:
        image_rows["threshold"] = image_rows["threshold"].astype(float).where(image_rows["threshold"].notna(), None)
        image_rows["problem"] = image_rows["problem"].replace("", None)
    pre_rows = []
    for pre in (pre_standard, pre_staig):
        info = pre.uns["preprocess"]
        pre_rows.append({
            "slide_id": slide_id,
            "preset": str(info["preset"]),
            "steps": " -> ".join(np.asarray(info["steps"]).tolist()),
            "override": bool(info["override"]),
            "notes": "; ".join(np.asarray(info.get("notes", [])).tolist()),
            "n_spots": int(pre.n_obs),
            "n_genes_out": int(pre.n_vars),
            "seconds": float(info["seconds"]),
        })
    written = metrics.write(
        context,
        {"slide_qc": [qc], "slide_image_checks": image_rows, "preprocessing_runs": pre_rows},
    )
    return MaterializeResult(
        metadata={
            "rows_written": MetadataValue.json(written),
            "database": metrics.path,
            **{k: v for k, v in qc.items() if v is not None},
        }
    )


# Assets whose blocking check gates everything downstream of them, with the metadata entry
# that records the check's outcome on each materialization.
BLOCKING_GATES = {RAW_SLIDE: "tissue_check_passed"}
