"""Readers on real 10x layouts (shared samples) and on the demo layout, plus bad input."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest

from mihd_assets.slides.io import SlideInputError, locate_slide_files, read_visium_slide


def test_space_ranger1_h5_heart(shared_data):
    folder = shared_data / "visium_human_heart_spaceranger1"
    adata = read_visium_slide(folder, "heart")
    layout = locate_slide_files(folder, "heart")
    assert (layout.counts_format, layout.positions_format) == ("h5", "spaceranger1")
    assert adata.shape == (100, 100)
    meta = adata.uns["spatial"]["heart"]["metadata"]
    assert meta["n_positions"] == 4992 and meta["n_positions_in_tissue"] == 4235
    # obsm["spatial"] is (x = pxl_col_in_fullres, y = pxl_row_in_fullres) of the positions file.
    pos = pd.read_csv(folder / "spatial" / "tissue_positions_list.csv", header=None, index_col=0)
    bc = adata.obs_names[0]
    assert adata.obsm["spatial"][0, 0] == pos.loc[bc, 5]
    assert adata.obsm["spatial"][0, 1] == pos.loc[bc, 4]
    assert adata.uns["spatial"]["heart"]["scalefactors"]["tissue_lowres_scalef"] == pytest.approx(0.045004502)
    assert adata.uns["spatial"]["heart"]["images"]["lowres"].shape == (600, 600, 3)
    assert np.array_equal(adata.layers["counts"].toarray(), adata.X.toarray())


def test_space_ranger3_mtx_embryo(shared_data):
    folder = shared_data / "visium_mouse_embryo_cytassist_spaceranger3"
    adata = read_visium_slide(folder, "embryo")
    layout = locate_slide_files(folder, "embryo")
    assert (layout.counts_format, layout.positions_format) == ("mtx", "spaceranger2")
    assert adata.shape == (2898, 19465)
    assert "hires" not in adata.uns["spatial"]["embryo"]["images"]
    pos = pd.read_csv(folder / "spatial" / "tissue_positions.csv", index_col="barcode")
    bc = adata.obs_names[10]
    assert tuple(adata.obsm["spatial"][10]) == (pos.loc[bc, "pxl_col_in_fullres"], pos.loc[bc, "pxl_row_in_fullres"])
    assert (adata.obs["in_tissue"] == 1).all()


def test_demo_slide_reads_with_truth(tiny_slides):
    adata = read_visium_slide(tiny_slides / "demo_01")
    meta = adata.uns["spatial"]["demo_01"]["metadata"]
    assert meta["truth_source"] == "metadata.tsv:layer_guess_reordered"
    assert set(adata.obs["truth"].dropna().unique()) <= {"Layer1", "Layer2", "Layer3", "Layer4", "Layer5", "Layer6", "WM"}
    assert adata.obs["truth"].notna().mean() > 0.9
    assert set(meta["image_paths"]) == {"fullres", "hires", "lowres"}


def test_two_column_truth_file(tiny_slides, tmp_path):
    folder = tmp_path / "s1"
    shutil.copytree(tiny_slides / "demo_01", folder)
    meta = pd.read_csv(folder / "metadata.tsv", sep="\t")
    (folder / "metadata.tsv").unlink()
    meta[["barcode", "layer_guess_reordered"]].fillna("NA").to_csv(folder / "s1_truth.txt", sep="\t", header=False, index=False)
    adata = read_visium_slide(folder, "s1")
    assert adata.uns["spatial"]["s1"]["metadata"]["truth_source"] == "s1_truth.txt"
    assert adata.obs["truth"].notna().sum() > 0.9 * adata.n_obs


@pytest.fixture
def slide_copy(tiny_slides, tmp_path):
    folder = tmp_path / "bad_slide"
    shutil.copytree(tiny_slides / "demo_02", folder)
    return folder


def test_missing_counts_names_folder(slide_copy):
    (slide_copy / "filtered_feature_bc_matrix.h5").unlink()
    with pytest.raises(SlideInputError, match=r"slide 'bad_slide'.*no counts file"):
        read_visium_slide(slide_copy)


def test_missing_scalefactors_names_file(slide_copy):
    (slide_copy / "spatial" / "scalefactors_json.json").unlink()
    with pytest.raises(SlideInputError, match=r"scalefactors_json.json: scale factors file is missing"):
        read_visium_slide(slide_copy)


def test_corrupt_h5_names_file(slide_copy):
    (slide_copy / "filtered_feature_bc_matrix.h5").write_bytes(b"not an hdf5 file" * 100)
    with pytest.raises(SlideInputError, match=r"filtered_feature_bc_matrix.h5: cannot read counts"):
        read_visium_slide(slide_copy)


def test_positions_lacking_barcodes(slide_copy):
    path = slide_copy / "spatial" / "tissue_positions_list.csv"
    lines = path.read_text().splitlines()
    kept = [line for line in lines if line.split(",")[1] == "0"] + [l for l in lines if l.split(",")[1] == "1"][5:]
    path.write_text("\n".join(kept) + "\n")
    with pytest.raises(SlideInputError, match=r"tissue_positions_list.csv: 5 of \d+ barcodes of the counts matrix have no position"):
        read_visium_slide(slide_copy)


def test_image_smaller_than_coordinates(slide_copy):
    from PIL import Image

    hires = slide_copy / "spatial" / "tissue_hires_image.png"
    with Image.open(hires) as img:
        img.crop((0, 0, img.width // 2, img.height // 2)).save(hires)
    with pytest.raises(SlideInputError, match=r"tissue_hires_image.png: hires image is .* smaller than the coordinates imply"):
        read_visium_slide(slide_copy)


def test_bad_scale_factor_value(slide_copy):
    path = slide_copy / "spatial" / "scalefactors_json.json"
    factors = json.loads(path.read_text())
    factors["tissue_hires_scalef"] = 0
    path.write_text(json.dumps(factors))
    with pytest.raises(SlideInputError, match="tissue_hires_scalef must be a positive number"):
        read_visium_slide(slide_copy)


def test_two_tiffs_are_ambiguous(slide_copy):
    tif = next(slide_copy.glob("*.tif"))
    shutil.copy(tif, slide_copy / "other.tiff")
    with pytest.raises(SlideInputError, match="2 full-resolution TIFFs"):
        read_visium_slide(slide_copy)
