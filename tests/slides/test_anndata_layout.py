"""AnnData slides: a slide stored as ``<slide>.h5ad`` (or a folder holding one) reads into the
same AnnData as its Visium folder, bad files are refused naming the file and the problem, the
scan and the sensor register ``.h5ad`` slides, and raw_slide and the geometry training set take
them (with images, and without images in the file's own units)."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import replace
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from dagster import DagsterInstance, build_sensor_context, materialize

from mihd_assets.slides import assets as slides
from mihd_assets.slides.io import (
    SlideInputError,
    _read_png,
    read_anndata_slide,
    read_slide,
    read_visium_slide,
)
from mihd_assets.slides.versioning import anndata_content_hash, source_fingerprint
from mihd_resources import AnnDataIOManager, StorageResource

EMBRYO = "visium_mouse_embryo_cytassist_spaceranger3"


def scanpy_like_h5ad(folder: Path, slide_id: str, target: Path, library: str = "library_1",
                     keep_obs: slice | np.ndarray = slice(None)) -> Path:
    """Write a Visium folder as ``sc.read_visium`` stores it: counts in X, obs in_tissue /
    array_row / array_col, var gene_ids / feature_types, obsm["spatial"] (x = column, y = row,
    full-res px), uns["spatial"][library] with the scale factors JSON and the hires/lowres
    PNGs as matplotlib's imread returns them (float32 in [0, 1])."""
    from matplotlib.image import imread

    visium = read_visium_slide(folder, slide_id)[keep_obs]
    spatial = folder / "spatial"
    images = {name: imread(spatial / f"tissue_{name}_image.png")
              for name in ("hires", "lowres") if (spatial / f"tissue_{name}_image.png").is_file()}
    out = ad.AnnData(
        X=sp.csr_matrix(visium.X),
        obs=visium.obs[["in_tissue", "array_row", "array_col"]].copy(),
        var=visium.var[["gene_ids", "feature_types"]].copy(),
    )
    out.obsm["spatial"] = np.asarray(visium.obsm["spatial"])
    out.uns["spatial"] = {library: {
        "images": images,
        "scalefactors": json.loads((spatial / "scalefactors_json.json").read_text()),
        "metadata": {"chemistry_description": "Visium", "software_version": "spaceranger"},
    }}
    target.parent.mkdir(parents=True, exist_ok=True)
    out.write_h5ad(target)
    return target


@pytest.fixture(scope="module")
def embryo(shared_data, tmp_path_factory):
    """The real CytAssist sample read from its folder, and the same slide written as one .h5ad."""
    folder = shared_data / EMBRYO
    if not folder.is_dir():
        pytest.skip(f"real sample {EMBRYO} not present at {folder}")
    tmp = tmp_path_factory.mktemp("embryo_h5ad")
    path = scanpy_like_h5ad(folder, "embryo", tmp / "embryo.h5ad")
    return folder, read_slide(folder, "embryo"), path


def test_h5ad_of_the_real_sample_reads_as_its_folder(embryo, tmp_path):
    folder, visium, path = embryo
    images_dir = tmp_path / "images" / "embryo"
    adata = read_slide(path, "embryo", images_dir)

    assert visium.uns["spatial"]["embryo"]["metadata"]["layout"] == "visium_folder"
    meta = adata.uns["spatial"]["embryo"]["metadata"]
    assert meta["layout"] == "anndata" and meta["coordinate_units"] == "fullres_px"
    assert meta["library_id"] == "library_1" and meta["counts_source"] == "X"
    assert adata.shape == visium.shape == (2898, 19465)
    assert list(adata.obs_names) == list(visium.obs_names)
    assert list(adata.var_names) == list(visium.var_names)
    assert list(adata.var["gene_ids"]) == list(visium.var["gene_ids"])
    # Counts and coordinates exactly equal, CSR in X and layers["counts"].
    assert sp.isspmatrix_csr(adata.X) and sp.isspmatrix_csr(adata.layers["counts"])
    assert adata.X.dtype == visium.X.dtype
    assert (adata.X != visium.X).nnz == 0 and (adata.layers["counts"] != visium.layers["counts"]).nnz == 0
    assert np.array_equal(adata.obsm["spatial"], visium.obsm["spatial"])
    assert np.array_equal(adata.obs["in_tissue"], visium.obs["in_tissue"])
    assert adata.uns["spatial"]["embryo"]["scalefactors"] == visium.uns["spatial"]["embryo"]["scalefactors"]
    # Images: the stored arrays and the exported PNG equal the folder's PNG pixel for pixel.
    folder_png = folder / "spatial" / "tissue_lowres_image.png"
    assert set(meta["image_paths"]) == {"lowres"}
    exported = Path(meta["image_paths"]["lowres"])
    assert exported == (images_dir / "lowres.png").resolve()
    assert np.array_equal(_read_png(exported), _read_png(folder_png))
    assert np.array_equal(adata.uns["spatial"]["embryo"]["images"]["lowres"], _read_png(folder_png))
    # Same content hash as the folder: downstream assets see the same slide.
    assert anndata_content_hash(adata) == anndata_content_hash(visium)
    # The images are exported once: a second read leaves the PNG untouched.
    before = exported.stat().st_mtime_ns
    read_slide(path, "embryo", images_dir)
    assert exported.stat().st_mtime_ns == before


def test_folder_holding_one_h5ad_is_an_anndata_slide(embryo, tmp_path):
    _, visium, path = embryo
    folder = tmp_path / "embryo"
    folder.mkdir()
    shutil.copy(path, folder / "whatever_name.h5ad")
    adata = read_slide(folder, "embryo", tmp_path / "images")
    assert adata.uns["spatial"]["embryo"]["metadata"]["layout"] == "anndata"
    assert (adata.X != visium.X).nnz == 0


def test_h5ad_with_images_needs_an_images_folder(embryo):
    _, _, path = embryo
    with pytest.raises(SlideInputError, match=r"slide 'embryo': .*embryo.h5ad: holds images: read it with images_dir"):
        read_slide(path, "embryo")


# --- a tiny h5ad without images (the demo-like case) and every bad input -----------------------


def tiny_anndata(n_side: int = 12, n_genes: int = 30, seed: int = 0) -> ad.AnnData:
    """Integer counts on a grid, coordinates in arbitrary units, no uns["spatial"]."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n_side, 0:n_side]
    n = n_side * n_side
    counts = rng.poisson(2.0, size=(n, n_genes)).astype(np.float32)
    obs = pd.DataFrame(index=[f"spot{i:03d}" for i in range(n)])
    labels = np.where(yy.ravel() < n_side // 2, "upper", "lower").astype(object)
    labels[:3] = ""
    obs["layer_guess"] = labels
    var = pd.DataFrame(index=[f"Gene{j}" for j in range(n_genes)])
    adata = ad.AnnData(X=sp.csr_matrix(counts), obs=obs, var=var)
    adata.obsm["spatial"] = np.c_[xx.ravel(), yy.ravel()].astype(np.float64) * 0.1
    return adata


def write(adata: ad.AnnData, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    adata.write_h5ad(path)
    return path


def test_tiny_h5ad_without_images_reads_in_file_units(tmp_path, monkeypatch):
    monkeypatch.delenv("MIHD_TRUTH_COLUMN", raising=False)
    source = tiny_anndata()
    path = write(source, tmp_path / "tiny.h5ad")
    adata = read_slide(path)
    info = adata.uns["spatial"]["tiny"]
    assert info["metadata"]["layout"] == "anndata" and info["metadata"]["coordinate_units"] == "file units"
    assert info["images"] == {} and info["metadata"]["image_paths"] == {} and info["scalefactors"] == {}
    assert (adata.obs["in_tissue"] == 1).all()
    assert info["metadata"]["truth_source"] == "tiny.h5ad:layer_guess"
    assert adata.obs["truth"].isna().sum() == 3 and set(adata.obs["truth"].dropna()) == {"upper", "lower"}
    assert np.array_equal(adata.obsm["spatial"], source.obsm["spatial"])
    assert (adata.X != source.X).nnz == 0 and sp.isspmatrix_csr(adata.X)
    # The stored raw slide writes and reads back (empty image and scale factor mappings included).
    back = ad.read_h5ad(write(adata, tmp_path / "stored.h5ad"))
    assert back.uns["spatial"]["tiny"]["metadata"]["coordinate_units"] == "file units"


def test_counts_layer_wins_over_normalized_x_and_dense_becomes_csr(tmp_path):
    source = tiny_anndata()
    raw = source.X.toarray().astype(np.int64)
    source.layers["counts"] = raw
    source.X = sp.csr_matrix(np.log1p(raw / raw.sum(axis=1, keepdims=True) * 1e4))
    adata = read_slide(write(source, tmp_path / "s.h5ad"), "s")
    assert adata.uns["spatial"]["s"]["metadata"]["counts_source"] == 'layers["counts"]'
    assert sp.isspmatrix_csr(adata.X) and np.array_equal(adata.X.toarray(), raw)


def test_truth_column_from_the_environment(tmp_path, monkeypatch):
    source = tiny_anndata()
    source.obs["my_domains"] = pd.Categorical(["d1"] * 100 + ["d2"] * (source.n_obs - 100))
    path = write(source, tmp_path / "s.h5ad")
    monkeypatch.setenv("MIHD_TRUTH_COLUMN", "my_domains")
    adata = read_slide(path, "s")
    assert adata.uns["spatial"]["s"]["metadata"]["truth_source"] == "s.h5ad:my_domains"
    assert list(adata.obs["truth"][:2]) == ["d1", "d1"]
    monkeypatch.setenv("MIHD_TRUTH_COLUMN", "absent_column")
    with pytest.raises(SlideInputError, match=r"slide 's': .*s.h5ad: obs has no truth column 'absent_column'"):
        read_slide(path, "s")


def _normalized(a):
    a.X = sp.csr_matrix(np.log1p(a.X.toarray()))


def _negative(a):
    x = a.X.toarray()
    x[5, 7] = -3
    a.X = sp.csr_matrix(x)


def _duplicates(a):
    names = list(a.obs_names)
    names[10], names[20] = names[0], names[1]
    a.obs_names = names


def _no_coords(a):
    del a.obsm["spatial"]


def _three_columns(a):
    a.obsm["spatial"] = np.c_[a.obsm["spatial"], np.zeros(a.n_obs)]


def _nan_coords(a):
    xy = a.obsm["spatial"].copy()
    xy[[4, 9], 1] = np.nan
    xy[11, 0] = np.inf
    a.obsm["spatial"] = xy


def _one_place(a):
    a.obsm["spatial"] = np.full((a.n_obs, 2), 7.0)


def _images_without_scalefactors(a):
    a.uns["spatial"] = {"lib": {"images": {"lowres": np.zeros((50, 50, 3), dtype=np.uint8)}}}


@pytest.mark.parametrize("spoil, message", [
    (_normalized, r"X holds \d+ non-integer value\(s\), e\.g\. \d\.\d+ at spot 'spot\d+', gene 'Gene\d+'"
                  r".*normalized or log-transformed"),
    (_negative, r"X holds 1 negative value\(s\), e\.g\. -3 at spot 'spot005', gene 'Gene7'"),
    (_duplicates, r"2 duplicate obs names \(spot barcodes\), first: \['spot000', 'spot001'\]"),
    (_no_coords, r'no spot coordinates: expected obsm\["spatial"\] \(or obsm\["X_spatial"\]\)'),
    (_three_columns, r'obsm\["spatial"\] has shape \(144, 3\); expected \(n_spots, 2\) = \(144, 2\)'),
    (_nan_coords, r"obsm\[.spatial.\]: 3 spot\(s\) with NaN or infinite coordinates, first 'spot004'"),
    (_one_place, r'obsm\["spatial"\]: all 144 spots at one position \(7, 7\): zero spread'),
    (_images_without_scalefactors, r'\["images"\]\["lowres"\] is an image but .* has no scalefactors'),
], ids=["normalized", "negative", "duplicate_obs", "no_coords", "n_by_3", "nan_inf", "zero_spread",
        "images_no_scalefactors"])
def test_bad_h5ad_is_refused_naming_file_slide_and_problem(tmp_path, spoil, message):
    source = tiny_anndata()
    spoil(source)
    path = write(source, tmp_path / "bad.h5ad")
    with pytest.raises(SlideInputError, match=rf"slide 'bad_slide': {re.escape(str(path))}: .*{message}"):
        read_slide(path, "bad_slide", tmp_path / "images")


def test_x_spatial_is_accepted(tmp_path):
    source = tiny_anndata()
    source.obsm["X_spatial"] = source.obsm.pop("spatial")
    adata = read_slide(write(source, tmp_path / "s.h5ad"), "s")
    assert np.array_equal(adata.obsm["spatial"], source.obsm["X_spatial"])
    assert adata.uns["spatial"]["s"]["metadata"]["positions_format"] == 'h5ad obsm["X_spatial"]'


def test_files_that_are_not_anndata_are_refused(tmp_path):
    garbage = tmp_path / "garbage.h5ad"
    garbage.write_bytes(b"this is not an hdf5 file" * 50)
    with pytest.raises(SlideInputError, match=rf"slide 'garbage': {re.escape(str(garbage))}: not an AnnData file: not HDF5"):
        read_slide(garbage)
    plain = tmp_path / "plain.h5ad"
    with h5py.File(plain, "w") as fh:
        fh.create_dataset("matrix", data=np.arange(6).reshape(2, 3))
    with pytest.raises(SlideInputError, match=rf"slide 'plain': {re.escape(str(plain))}: not an AnnData file: HDF5 without "
                                              r"the AnnData group\(s\) \['obs', 'var'\]"):
        read_slide(plain)


def test_ambiguous_folders_are_refused(tmp_path, tiny_slides):
    two = tmp_path / "two"
    write(tiny_anndata(), two / "a.h5ad")
    write(tiny_anndata(), two / "b.h5ad")
    with pytest.raises(SlideInputError, match=r"slide 'two': .*two: 2 .h5ad files \(a.h5ad, b.h5ad\)"):
        read_slide(two)
    mixed = tmp_path / "mixed"
    shutil.copytree(tiny_slides / "demo_01", mixed)
    write(tiny_anndata(), mixed / "extra.h5ad")
    with pytest.raises(SlideInputError, match=r"slide 'mixed': .*holds 10x Visium files .* and AnnData file\(s\) \(extra.h5ad\)"):
        read_slide(mixed)


# --- discovery, fingerprint, raw_slide, geometry ---------------------------------------------


def test_scan_and_sensor_register_h5ad_slides(tmp_path, tiny_slides):
    from dagster_project.sensors import slide_discovery_sensor

    root = tmp_path / "root"
    shutil.copytree(tiny_slides / "demo_01", root / "visium_slide")
    write(tiny_anndata(), root / "file_slide.h5ad")
    write(tiny_anndata(), root / "folder_slide" / "data.h5ad")
    write(tiny_anndata(), root / "bad name.h5ad")
    write(tiny_anndata(), root / "both.h5ad")
    write(tiny_anndata(), root / "both" / "x.h5ad")
    (root / "notes.txt").write_text("not a slide")
    storage = StorageResource(slides_root=str(root), h5ad_images_root=str(tmp_path / "images"))
    valid, refused = storage.scan_slides()
    assert valid == ["file_slide", "folder_slide", "visium_slide"]
    assert len(refused) == 2, refused
    assert any("bad name.h5ad" in r and "invalid partition key 'bad name'" in r for r in refused)
    assert any("slide 'both': both both.h5ad and both/ exist" in r for r in refused)
    assert storage.slide_source("file_slide") == root / "file_slide.h5ad"
    assert storage.slide_source("folder_slide") == root / "folder_slide"
    with pytest.raises(SlideInputError, match="slide 'both': both"):
        storage.slide_source("both")

    instance = DagsterInstance.ephemeral()
    with build_sensor_context(instance=instance, resources={"storage": storage}) as ctx:
        result = slide_discovery_sensor(ctx)
    (request,) = result.dynamic_partitions_requests
    assert sorted(request.partition_keys) == ["file_slide", "folder_slide", "visium_slide"]
    assert "file_slide" in result.run_requests[0].tags["mihd/reason"]

    # The input fingerprint covers the file: rewriting it changes the fingerprint.
    before = slides.slide_input_fingerprint(storage, "file_slide")
    assert before == source_fingerprint(root / "file_slide.h5ad")
    write(tiny_anndata(seed=1), root / "file_slide.h5ad")
    os.utime(root / "file_slide.h5ad", ns=(1, 1))
    assert slides.slide_input_fingerprint(storage, "file_slide") != before


def test_raw_slide_materializes_an_h5ad_slide_with_images(tmp_path, tiny_slides, monkeypatch):
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    root = tmp_path / "root"
    scanpy_like_h5ad(tiny_slides / "demo_01", "demo_01", root / "demo_01.h5ad")
    images = tmp_path / "h5ad_images"
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", ["demo_01"])
    result = materialize(
        [slides.raw_slide], partition_key="demo_01", instance=instance, raise_on_error=False,
        resources={
            "storage": StorageResource(slides_root=str(root), h5ad_images_root=str(images)),
            "anndata_io_manager": AnnDataIOManager(base_dir=str(tmp_path / "store")),
        },
    )
    assert result.success
    (materialization,) = result.asset_materializations_for_node("slides__raw_slide")
    meta = materialization.metadata
    assert meta["layout"].value == "anndata" and meta["coordinate_units"].value == "fullres_px"
    assert meta["tissue_check_passed"].value is True
    assert set(meta["images"].value) == {"hires", "lowres"}
    assert all(Path(p).parent == (images / "demo_01").resolve() for p in meta["images"].value.values())
    evaluations = {e.check_name: e for e in result.get_asset_check_evaluations()}
    assert evaluations["spots_on_tissue"].passed


def test_geometry_plan_takes_h5ad_slides_without_images(tmp_path, tiny_slides, monkeypatch):
    """Geometry targets are scale-free: slides in the file's own units, without images or scale
    factors, train and hold out like Visium slides."""
    from mihd_assets.geometry.config import SIZES, geometry_plan
    from mihd_assets.geometry.dataset import build_training_set

    monkeypatch.setenv("MIHD_GEOMETRY_TRAIN_SLIDES", "h5ad_train")
    monkeypatch.setenv("MIHD_GEOMETRY_HELDOUT_SLIDES", "h5ad_heldout")
    adatas = {}
    for new, demo in (("h5ad_train", "demo_01"), ("h5ad_heldout", "demo_02")):
        visium = read_visium_slide(tiny_slides / demo, demo)
        out = ad.AnnData(X=visium.X.copy(), var=pd.DataFrame(index=visium.var_names))
        out.obs_names = visium.obs_names
        out.obsm["spatial"] = np.asarray(visium.obsm["spatial"]) / 137.0  # arbitrary units
        adatas[new] = read_slide(write(out, tmp_path / f"{new}.h5ad"), new)
        assert adatas[new].uns["spatial"][new]["metadata"]["image_paths"] == {}
    size = replace(SIZES["tiny"], n_sets_train=16, n_sets_heldout=2)
    ts = build_training_set(adatas, geometry_plan(), size)
    assert ts.slide_ids("train") == ["h5ad_train"] and ts.slide_ids("heldout") == ["h5ad_heldout"]
    assert ts.info["coordinate_units"] == {"h5ad_train": "file units", "h5ad_heldout": "file units"}
    assert np.isfinite(ts.train.targets).all() and ts.sigma_data > 0
