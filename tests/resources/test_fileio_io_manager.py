"""Atomic writes: a failed write never leaves a partial file or replaces the old one."""

import anndata as ad
import numpy as np
import pytest
from dagster import AssetKey, build_input_context, build_output_context

from mihd_assets.fileio import atomic_path, atomic_write_text
from mihd_resources.io_manager import AnnDataIOManager


def test_failed_write_keeps_old_file(tmp_path):
    target = tmp_path / "x.txt"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash mid-write")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["x.txt"]


def test_anndata_io_manager_round_trip(tmp_path):
    manager = AnnDataIOManager(base_dir=str(tmp_path))
    adata = ad.AnnData(np.arange(6, dtype=np.float32).reshape(3, 2))
    key = AssetKey(["slides", "raw_slide"])
    out_ctx = build_output_context(asset_key=key, partition_key="s1")
    manager.handle_output(out_ctx, adata)
    path = tmp_path / "slides" / "raw_slide" / "s1.h5ad"
    assert path.is_file() and not list(path.parent.glob(".*tmp"))
    loaded = manager.load_input(build_input_context(asset_key=key, partition_key="s1"))
    np.testing.assert_array_equal(loaded.X, adata.X)
    with pytest.raises(TypeError, match="expected AnnData"):
        manager.handle_output(build_output_context(asset_key=key, partition_key="s2"), {"not": "anndata"})
    with pytest.raises(FileNotFoundError, match="materialize the upstream partition first"):
        manager.load_input(build_input_context(asset_key=key, partition_key="missing"))
