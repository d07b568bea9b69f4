"""The demo generator: real layout, consistent images, both modalities carry the layers."""

import json

import numpy as np
import pytest
import scanpy as sc
import tifffile
from PIL import Image

from mihd_assets.demo.visium import LAYER_MARKERS, LAYERS, generate_demo_slides, tiny_spec
from mihd_assets.fileio import file_sha256
from mihd_assets.slides.io import read_visium_slide


def test_layout_files(tiny_slides):
    folder = tiny_slides / "demo_01"
    for rel in (
        "filtered_feature_bc_matrix.h5", "spatial/tissue_positions_list.csv", "spatial/scalefactors_json.json",
        "spatial/tissue_hires_image.png", "spatial/tissue_lowres_image.png", "demo_01_full_image.tif", "metadata.tsv",
    ):
        assert (folder / rel).is_file(), rel
    first = (folder / "spatial/tissue_positions_list.csv").read_text().splitlines()[0].split(",")
    assert len(first) == 6 and not first[0].startswith("barcode")  # Space Ranger 1: no header


def test_deterministic(tmp_path, tiny_slides):
    generate_demo_slides(tmp_path, n_slides=1, spec=tiny_spec())
    for rel in ("spatial/tissue_positions_list.csv", "metadata.tsv", "spatial/tissue_hires_image.png", "demo_01_full_image.tif"):
        assert file_sha256(tmp_path / "demo_01" / rel) == file_sha256(tiny_slides / "demo_01" / rel), rel


def test_second_call_leaves_files_untouched(tmp_path):
    generate_demo_slides(tmp_path, n_slides=1, spec=tiny_spec())
    mtimes = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}
    generate_demo_slides(tmp_path, n_slides=1, spec=tiny_spec())
    assert mtimes == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("*") if p.is_file()}


@pytest.mark.parametrize("name", ["hires", "lowres"])
def test_scaled_images_are_the_fullres_image_scaled(tiny_slides, name):
    folder = tiny_slides / "demo_01"
    full = tifffile.imread(next(folder.glob("*.tif")))
    factors = json.loads((folder / "spatial/scalefactors_json.json").read_text())
    scale = factors[f"tissue_{name}_scalef"]
    small = np.asarray(Image.open(folder / f"spatial/tissue_{name}_image.png").convert("RGB"))
    assert small.shape[0] == round(full.shape[0] * scale) and small.shape[1] == round(full.shape[1] * scale)
    expected = np.asarray(Image.fromarray(full).resize((small.shape[1], small.shape[0]), Image.Resampling.BOX))
    assert np.abs(small.astype(float) - expected.astype(float)).mean() < 6


def test_marker_genes_enriched_in_their_layer(tiny_slides):
    adata = read_visium_slide(tiny_slides / "demo_01")
    adata = adata[adata.obs["truth"].notna()].copy()
    sc.pp.normalize_total(adata, target_sum=1e4)
    for layer in LAYERS:
        genes = LAYER_MARKERS[layer]
        inside = adata[adata.obs["truth"] == layer, genes].X.mean()
        outside = adata[adata.obs["truth"] != layer, genes].X.mean()
        assert inside > 1.5 * outside, layer


def test_image_texture_differs_between_layers(tiny_slides):
    """Mean darkness around spots differs between layers (nucleus density/size per layer)."""
    adata = read_visium_slide(tiny_slides / "demo_01")
    full = tifffile.imread(next((tiny_slides / "demo_01").glob("*.tif"))).astype(float)
    darkness = {}
    for layer in ("Layer1", "Layer4", "WM"):
        xy = adata.obsm["spatial"][(adata.obs["truth"] == layer).to_numpy()].astype(int)
        vals = [255 - full[y - 12:y + 12, x - 12:x + 12].mean() for x, y in xy]
        darkness[layer] = np.mean(vals)
    assert darkness["Layer4"] > darkness["Layer1"] + 5
    assert darkness["Layer4"] > darkness["WM"] + 5
