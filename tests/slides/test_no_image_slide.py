"""A slide without any image (no full-resolution TIFF, no hires or lowres PNG): raw_slide
materializes with both tissue checks failed at WARN severity as "not applicable: no image"
(which blocks nothing downstream in the run), gene-only assets and their metric rows run,
every asset that needs pixels fails at once naming the slide, and the figure code draws a
coordinates-only first panel."""

import shutil
from types import SimpleNamespace

import anndata as ad
import duckdb
import numpy as np
import pytest
from dagster import (
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    DagsterInstance,
    Output,
    asset,
    materialize,
)

from mihd_assets.embeddings import assets as emb
from mihd_assets.embeddings.store import SpotEmbedding
from mihd_assets.fusion import assets as fa
from mihd_assets.fusion.store import SpotLabels
from mihd_assets.reports.assets import _display_image
from mihd_assets.reports.figures import NO_IMAGE_PANEL, slide_panels_figure, slide_panels_png
from mihd_assets.slides import assets as slides
from mihd_resources.orchestration import user_error
from tests.conftest import slide_resources

SLIDE = "demo_01"
GENE_PCA = next(a for a in emb.gene_embeddings if a.key == emb.gene_key("pca"))
RESNET_KEY = emb.vision_key("resnet50", "standard")
VISION_STANDARD = emb.vision_asset_for(RESNET_KEY)  # the step of every `standard` encoder
KMEANS_KEY = fa.clustering_key("gene_pca", "kmeans")
KMEANS = next(a for a in fa.clusterings if a.key == KMEANS_KEY)
KMEANS_METRICS = next(a for a in fa.clustering_metrics if a.key == fa.metrics_key(KMEANS_KEY))
VISION_CLUSTERING = next(a for a in fa.clusterings if a.key == fa.clustering_key("vision_uni2_standard", "kmeans"))
SCAN = next(a for a in fa.image_only_clusterings if a.key.path[-1] == "image_only__scan__uni2_standard")
STAIG = fa.staig_fusion_embeddings[0]


def _failures(result) -> dict[str, str]:
    """step key -> the platform's error message, for every failed step."""
    return {
        e.step_key: user_error(e.event_specific_data.error).message
        for e in result.all_events if e.event_type_value == "STEP_FAILURE"
    }


@pytest.fixture(scope="module")
def no_image_run(tiny_slides, tmp_path_factory):
    """One run over a copy of a demo slide whose images were deleted: raw_slide, both
    preprocessed slides, slide QC, gene PCA, its k-means clustering and metric rows, and a
    vision embedding (the only step expected to fail)."""
    tmp = tmp_path_factory.mktemp("no_image")
    root = tmp / "root"
    folder = root / SLIDE
    shutil.copytree(tiny_slides / SLIDE, folder)
    for image in (folder / "spatial" / "tissue_hires_image.png", folder / "spatial" / "tissue_lowres_image.png",
                  folder / f"{SLIDE}_full_image.tif"):
        image.unlink()
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", [SLIDE])
    store = tmp / "store"
    resources = slide_resources(root, store, tmp / "m.duckdb")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MIHD_PROFILE", "demo")

        def no_model(*args, **kwargs):
            raise AssertionError("a vision model was built for a slide without any image")

        mp.setattr("mihd_assets.embeddings.vision.build_encoder", no_model)
        gene_only = [slides.raw_slide, *slides.preprocessed_slides, slides.slide_qc_metrics, GENE_PCA, KMEANS,
                     KMEANS_METRICS]
        result = materialize(
            [*gene_only, VISION_STANDARD], partition_key=SLIDE, instance=instance, resources=resources,
            selection=[key for a in gene_only for key in a.keys] + [RESNET_KEY], raise_on_error=False,
        )
    return SimpleNamespace(result=result, instance=instance, resources=resources, store=store,
                           database=tmp / "m.duckdb")


def test_raw_slide_materializes_with_the_tissue_checks_not_applicable(no_image_run):
    result = no_image_run.result
    (materialization,) = result.asset_materializations_for_node("slides__raw_slide")
    assert materialization.metadata["has_image"].value is False
    assert materialization.metadata["tissue_check_passed"].value == slides.NO_IMAGE
    checks = {e.check_name: e for e in result.get_asset_check_evaluations()
              if e.asset_key == slides.RAW_SLIDE}
    for name in (slides.SPOTS_ON_TISSUE, slides.TISSUE_FRACTION):
        assert not checks[name].passed, f"{name} must not pass silently without an image"
        assert checks[name].severity == AssetCheckSeverity.WARN
        assert "not applicable: no image" in checks[name].description
    raw = ad.read_h5ad(no_image_run.store / "slides" / "raw_slide" / f"{SLIDE}.h5ad")
    gate = raw.uns["mihd_checks"][slides.SPOTS_ON_TISSUE]
    assert gate["status"] == slides.NO_IMAGE and not gate["passed"] and dict(gate["images"]) == {}
    slides.require_tissue_check(raw, SLIDE)  # gene-only assets are let through


def test_gene_only_assets_and_their_metric_rows_run(no_image_run):
    result = no_image_run.result
    failed = _failures(result)
    assert set(failed) == {emb.vision_op_name("standard")}, failed
    materialized = {e.asset_key for e in result.get_asset_materialization_events()}
    assert {slides.RAW_SLIDE, *(a.key for a in slides.preprocessed_slides), slides.slide_qc_metrics.key,
            GENE_PCA.key, KMEANS_KEY, KMEANS_METRICS.key} <= materialized
    with duckdb.connect(str(no_image_run.database), read_only=True) as con:
        rows = con.execute(
            "SELECT refinement, metrics_status, ari FROM clustering_metrics WHERE slide_id = ? AND asset_key = ? "
            "ORDER BY refinement", [SLIDE, "evaluation/clustering_metrics/gene_pca__kmeans"],
        ).fetchall()
        qc = con.execute("SELECT n_spots, frac_spots_on_tissue_image FROM slide_qc WHERE slide_id = ?",
                         [SLIDE]).fetchall()
        image_rows = con.execute("SELECT count(*) FROM slide_image_checks WHERE slide_id = ?", [SLIDE]).fetchone()[0]
    assert [r[0] for r in rows] == ["majority_k15", "none"]
    assert all(r[1] == "ok" and r[2] is not None for r in rows)
    assert len(qc) == 1 and qc[0][0] > 0 and qc[0][1] is None
    assert image_rows == 0


def test_vision_embedding_fails_at_once_naming_the_slide(no_image_run):
    message = _failures(no_image_run.result)[emb.vision_op_name("standard")]
    assert f"slide '{SLIDE}' has no image" in message
    assert "vision embedding vision_resnet50_standard" in message


def test_image_readers_refuse_the_slide_even_with_a_stored_vision_embedding(no_image_run, monkeypatch):
    """A vision embedding left from when the slide had an image: the vision clustering, the
    image-only clustering and STAIG's image mode still refuse the slide, before any training."""
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    store = no_image_run.store
    raw = ad.read_h5ad(store / "slides" / "raw_slide" / f"{SLIDE}.h5ad")
    values = np.random.default_rng(0).normal(size=(raw.n_obs, 8))
    for name in ("vision_uni2_standard", "vision_uni2_staig_strict"):
        SpotEmbedding(values, list(raw.obs_names), {"weights": "random"}).save(
            store / "embeddings" / name / f"{SLIDE}.npz")
    vision_assets = [emb.vision_asset_for(emb.vision_key("uni2", v)) for v in ("standard", "staig_strict")]
    targets = [VISION_CLUSTERING, SCAN, STAIG]
    result = materialize(
        [slides.raw_slide, *slides.preprocessed_slides, *vision_assets, *targets],
        partition_key=SLIDE, instance=no_image_run.instance, resources=no_image_run.resources,
        selection=[a.key for a in targets], raise_on_error=False,
    )
    failed = _failures(result)
    assert set(failed) == {"clustering__vision_uni2_standard__kmeans", "clustering__image_only__scan__uni2_standard",
                           f"fusion__{fa.STAIG_NAME}"}, failed
    for step, message in failed.items():
        assert f"slide '{SLIDE}' has no image" in message, (step, message)


def test_figure_falls_back_to_a_coordinates_only_panel(no_image_run):
    store = no_image_run.store
    raw = ad.read_h5ad(store / "slides" / "raw_slide" / f"{SLIDE}.h5ad")
    image, scale, title = _display_image(raw, SLIDE)
    assert image is None and scale == 1.0 and title == NO_IMAGE_PANEL
    labels = SpotLabels.load(store / "clustering" / KMEANS_KEY.path[-1] / f"{SLIDE}.npz")
    index = {b: i for i, b in enumerate(raw.obs_names)}
    xy = np.asarray(raw.obsm["spatial"])[[index[b] for b in labels.obs_names]] * scale
    fig = slide_panels_figure(image, xy, None, labels.refined, f"{SLIDE} · gene_pca__kmeans", image_title=title)
    try:
        first = fig.axes[0]
        assert first.get_title() == "no image: spot coordinates only"
        (spots,) = first.collections
        assert len(spots.get_offsets()) == len(labels.obs_names)
        assert not first.images  # no pixels drawn
    finally:
        import matplotlib.pyplot as plt

        plt.close(fig)
    assert slide_panels_png(image, xy, None, labels.refined, "t", image_title=title).startswith(b"\x89PNG")


def test_fusion_of_a_never_computed_vision_embedding_fails_saying_the_slide_has_no_image(no_image_run, monkeypatch):
    """A fusion that reads a vision embedding, materialized for a slide without images: its
    input was never computed, and the error says why (no image), not just "file missing"."""
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    store = no_image_run.store
    (store / "embeddings" / "vision_uni2_standard" / f"{SLIDE}.npz").unlink(missing_ok=True)  # another test's fake
    concat = next(a for a in fa.fusion_embeddings if a.key.path[-1] == "concat__pca__uni2_standard")
    vision = emb.vision_asset_for(emb.vision_key("uni2", "standard"))
    result = materialize(
        [slides.raw_slide, *slides.preprocessed_slides, GENE_PCA, vision, concat],
        partition_key=SLIDE, instance=no_image_run.instance, resources=no_image_run.resources,
        selection=[concat.key], raise_on_error=False,
    )
    (message,) = _failures(result).values()
    assert f"slide '{SLIDE}' has no image" in message and "vision_uni2_standard" in message, message


def _fake_slide(image_paths: dict, gate: dict):
    return SimpleNamespace(uns={
        "spatial": {SLIDE: {"metadata": {"image_paths": image_paths}}},
        "mihd_checks": {slides.SPOTS_ON_TISSUE: gate},
    })


def test_require_tissue_check_refuses_a_really_failed_check_and_require_image_names_the_slide():
    no_image = _fake_slide({}, {"passed": False, "status": slides.NO_IMAGE, "images": {}})
    slides.require_tissue_check(no_image, SLIDE)
    with pytest.raises(slides.SlideHasNoImageError, match=f"slide '{SLIDE}' has no image.*vision embedding x"):
        slides.require_image(no_image, SLIDE, "vision embedding x")
    failed = _fake_slide({"hires": "/x/tissue_hires_image.png"}, {"passed": False, "status": "failed", "images": {}})
    stored_before_status = _fake_slide({"hires": "/x/tissue_hires_image.png"}, {"passed": False, "images": {}})
    # "not applicable" recorded for a slide that does have an image is not believed.
    inconsistent = _fake_slide({"hires": "/x/tissue_hires_image.png"}, {"passed": False, "status": slides.NO_IMAGE})
    for raw in (failed, stored_before_status, inconsistent):
        with pytest.raises(ValueError, match="failed its spots_on_tissue check"):
            slides.require_tissue_check(raw, SLIDE)
    slides.require_image(failed, SLIDE, "vision embedding x")  # it has an image


@pytest.mark.parametrize("severity, child_runs", [(AssetCheckSeverity.WARN, True), (AssetCheckSeverity.ERROR, False)])
def test_a_failed_blocking_check_blocks_downstream_only_at_error_severity(severity, child_runs):
    """What raw_slide's no-image result relies on in the installed Dagster: a failed blocking
    check stops the downstream steps of its run only when its severity is ERROR."""

    @asset(check_specs=[AssetCheckSpec("gate", asset="parent", blocking=True)])
    def parent():
        yield Output(1)
        yield AssetCheckResult(check_name="gate", passed=False, severity=severity)

    @asset
    def child(parent):
        return parent + 1

    result = materialize([parent, child], raise_on_error=False)
    ran = {e.step_key for e in result.all_events if e.event_type_value == "STEP_SUCCESS"}
    assert ("child" in ran) is child_runs
