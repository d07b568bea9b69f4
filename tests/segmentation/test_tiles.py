import numpy as np
import pytest

from mihd_assets.segmentation.tiles import (
    TileReadError,
    cellpose_image,
    discover_tiles,
    read_pair,
    scan_donors,
)

from .conftest import write_tiff


def _pair(folder, stem, shape=(16, 16), marker_shape=None):
    write_tiff(folder / f"{stem}_b0c0.tif", np.full(shape, 100, np.uint16))
    write_tiff(folder / f"{stem}_b0c1.tif", np.full(marker_shape or shape, 7, np.uint16))


def test_discovery_is_strict_about_suffix_and_pairs_channels(tmp_path):
    donor = tmp_path / "D1"
    _pair(donor, "D1_GFAP_1")
    _pair(donor, "D1_GFAP_2")
    (donor / "D1_GFAP_1_metadata.xml").write_text("<xml/>")  # once read as a TIFF and crashed a run
    (donor / "D1_GFAP_3_b0c0.tif.bak").write_bytes(b"junk")
    write_tiff(donor / "D1_GFAP_4_b0c0.tiff", np.zeros((16, 16), np.uint16))  # its c1 is missing
    write_tiff(donor / "overview.tif", np.zeros((4, 4), np.uint16))  # no channel token
    pairs, skipped = discover_tiles(donor)
    assert [p.stem for p in pairs] == ["D1_GFAP_1_b0", "D1_GFAP_2_b0"]
    assert {p.marker for p in pairs} == {"GFAP"}
    reasons = {s.file: s.reason for s in skipped}
    assert "missing channel file(s) c1" in reasons["D1_GFAP_4_b0c0.tiff"]
    assert "channel token" in reasons["overview.tif"]
    assert not any("xml" in f or ".bak" in f for f in reasons)


def test_corrupt_tiff_and_shape_mismatch_raise_naming_the_file(tmp_path):
    donor = tmp_path / "D2"
    _pair(donor, "D2_GFAP_1")
    (donor / "D2_GFAP_1_b0c1.tif").write_bytes(b"II*\x00 not really a tiff")
    _pair(donor, "D2_GFAP_2", shape=(16, 16), marker_shape=(8, 16))
    pairs, _ = discover_tiles(donor)
    with pytest.raises(TileReadError, match="D2_GFAP_1_b0c1.tif: unreadable TIFF") as err:
        read_pair(pairs[0])
    assert err.value.file == "D2_GFAP_1_b0c1.tif"
    with pytest.raises(TileReadError, match=r"\(16, 16\) but marker D2_GFAP_2_b0c1.tif is \(8, 16\)"):
        read_pair(pairs[1])


def test_cellpose_format_is_dapi_marker_zero():
    dapi, marker = np.full((4, 5), 3.0), np.full((4, 5), 9.0)
    image = cellpose_image(dapi, marker)
    assert image.shape == (3, 4, 5)
    assert image[0].max() == 3 and image[1].max() == 9 and image[2].max() == 0
    assert cellpose_image(dapi, marker, use_dapi=False)[0].max() == 0


def test_scan_donors_refuses_bad_keys(tmp_path):
    (tmp_path / "10001").mkdir()
    (tmp_path / "bad name").mkdir()
    valid, refused = scan_donors(tmp_path)
    assert valid == ["10001"]
    assert len(refused) == 1 and "bad name" in refused[0]
