"""A partition key reaches a file path only when it is a plain file name and the path stays in its root.

Dagster accepts any string as a dynamic partition key (``../x``, ``a/b``, ``/etc/x``); the
IO managers, the donor family's E5 files and the Slurm job folders refuse them, naming the
key and the partitions definition, before any file is read or written.
"""

from __future__ import annotations

import os
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import yaml
from dagster import (
    DagsterInstance,
    DynamicPartitionsDefinition,
    Output,
    asset,
    build_asset_context,
    build_input_context,
    build_output_context,
    materialize,
)

from mihd_assets.embeddings.store import SpotEmbedding
from mihd_assets.fusion.store import SpotLabels
from mihd_assets.segmentation import assets as seg
from mihd_resources import AnnDataIOManager
from mihd_resources.embedding_io_manager import EmbeddingIOManager
from mihd_resources.io_manager import partition_file
from mihd_resources.labels_io_manager import LabelsIOManager
from mihd_resources.orchestration import slides_partitions, user_error
from mihd_resources.step_executor import StepExecutor
from mihd_resources.storage import InvalidPartitionKey, StorageResource, path_in_root, validate_partition_key
from tests.hardening.test_checkpoint_pickles import _fake_slurm

BAD_KEYS = ["../x", "a/b", "/etc/passwd", "ok\n", "..", ".hidden"]
KEY = ["family", "thing"]


def _objects():
    names = ["s1", "s2"]
    return {
        "anndata": (lambda d: AnnDataIOManager(base_dir=d), ad.AnnData(np.zeros((2, 3), np.float32), obs={"i": [0, 1]})),
        "embedding": (lambda d: EmbeddingIOManager(base_dir=d), SpotEmbedding(np.ones((2, 4), np.float32), names)),
        "labels": (lambda d: LabelsIOManager(base_dir=d), SpotLabels(names, np.array([0, 1]), np.array([1, 0]))),
    }


@pytest.fixture(scope="module")
def instance():
    inst = DagsterInstance.ephemeral()
    inst.add_dynamic_partitions(slides_partitions.name, BAD_KEYS + ["slide_1"])
    inst.add_dynamic_partitions("donors", ["../x", "d/1", "donor_1"])
    return inst


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", ["anndata", "embedding", "labels"])
@pytest.mark.parametrize("key", BAD_KEYS)
def test_io_managers_refuse_a_key_that_is_not_a_file_name(kind, key, instance, tmp_path):
    make, obj = _objects()[kind]
    base = tmp_path / "store" / "inner"
    manager = make(str(base))
    out = build_output_context(asset_key=KEY, partition_key=key, asset_partitions_def=slides_partitions, instance=instance)
    with pytest.raises(InvalidPartitionKey) as raised:
        manager.handle_output(out, obj)
    assert f"invalid partition key {key!r} of partitions 'slides'" in str(raised.value)
    assert "family/thing" in str(raised.value)
    assert _files(tmp_path) == []  # nothing written, inside the root or out of it
    inp = build_input_context(asset_key=KEY, partition_key=key, asset_partitions_def=slides_partitions, instance=instance)
    with pytest.raises(InvalidPartitionKey, match="of partitions 'slides'") as raised:
        manager.load_input(inp)
    assert repr(key) in str(raised.value)


@pytest.mark.parametrize("key", ["", *BAD_KEYS])
def test_each_of_several_upstream_partitions_is_checked(key, instance, tmp_path):
    """An unpartitioned consumer reads {partition: object}: each key is checked the same way."""
    ctx = build_input_context(asset_key=KEY, partition_key="slide_1", asset_partitions_def=slides_partitions,
                              instance=instance)
    with pytest.raises(InvalidPartitionKey, match="of partitions 'slides'") as raised:
        partition_file(str(tmp_path), ctx, ".npz", key)
    assert f"invalid partition key {key!r}" in str(raised.value)


@pytest.mark.parametrize("kind", ["anndata", "embedding", "labels"])
def test_io_managers_store_and_load_a_normal_key(kind, instance, tmp_path):
    make, obj = _objects()[kind]
    manager = make(str(tmp_path))
    out = build_output_context(asset_key=KEY, partition_key="slide_1", asset_partitions_def=slides_partitions,
                               instance=instance)
    manager.handle_output(out, obj)
    ext = ".h5ad" if kind == "anndata" else ".npz"
    assert _files(tmp_path) == [f"family/thing/slide_1{ext}"]
    inp = build_input_context(asset_key=KEY, partition_key="slide_1", asset_partitions_def=slides_partitions,
                              instance=instance)
    loaded = manager.load_input(inp)
    assert list(loaded.obs_names) == list(obj.obs_names)


def test_a_run_of_a_dotdot_partition_fails_naming_key_and_partitions(instance, tmp_path):
    """Dagster runs the partition ``../x``; the IO manager refuses to write outside its folder."""

    @asset(partitions_def=slides_partitions, io_manager_key="io", name="thing")
    def thing():
        return ad.AnnData(np.zeros((2, 2), np.float32))

    base = tmp_path / "base"
    result = materialize([thing], instance=instance, partition_key="../x", raise_on_error=False,
                         resources={"io": AnnDataIOManager(base_dir=str(base))})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    message = user_error(failure.event_specific_data.error).message
    assert "invalid partition key '../x' of partitions 'slides'" in message
    assert _files(tmp_path) == []


@pytest.mark.parametrize("key", ["", *BAD_KEYS])
def test_donor_paths_refuse_invalid_keys(key, tmp_path, monkeypatch):
    monkeypatch.setenv("MIHD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIHD_TILES_ROOT", str(tmp_path / "tiles"))
    for path_of in (seg.donor_counts_path, seg.donor_tiles_folder):
        with pytest.raises(InvalidPartitionKey, match="of partitions 'donors'") as raised:
            path_of(key)
        assert f"invalid partition key {key!r}" in str(raised.value)


def test_donor_paths_of_a_normal_key_stay_under_their_roots(tmp_path, monkeypatch):
    from mihd_resources import settings

    monkeypatch.setenv("MIHD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIHD_TILES_ROOT", str(tmp_path / "tiles"))
    assert seg.donor_counts_path("donor_1") == settings.storage_root() / "segmentation" / "e5" / "tile_counts" / "donor_1.json"
    assert seg.donor_tiles_folder("donor_1") == settings.tiles_root() / "donor_1"


@pytest.mark.parametrize("key", ["../x", "d/1"])
def test_e5_assets_refuse_a_donor_key_before_touching_files(key, instance, tmp_path, monkeypatch):
    from dagster_duckdb import DuckDBResource

    from mihd_resources import ComputeResource, MetricsStore

    monkeypatch.setenv("MIHD_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MIHD_TILES_ROOT", str(tmp_path / "tiles"))
    ctx = build_asset_context(partition_key=key, instance=instance)
    with pytest.raises(InvalidPartitionKey, match=rf"invalid partition key '{key}' of partitions 'donors'"):
        seg.e5_tile_counts(ctx, compute=ComputeResource(device="cpu"), step_executor=StepExecutor())
    ctx = build_asset_context(partition_key=key, instance=instance)
    with pytest.raises(InvalidPartitionKey, match=rf"invalid partition key '{key}' of partitions 'donors'"):
        seg.e5_tile_counts_metrics(ctx, metrics=MetricsStore(duckdb=DuckDBResource(database=str(tmp_path / "m.duckdb"))))


def test_slurm_job_folder_refuses_a_partition_key_with_a_separator(instance, tmp_path, monkeypatch):
    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    settings = tmp_path / "slurm.yaml"
    settings.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work")}))

    @asset(name="toy", partitions_def=slides_partitions)
    def toy(context, step_executor: StepExecutor):
        return Output(step_executor.run(context, "embeddings", lambda log: 1))

    result = materialize([toy], instance=instance, partition_key="../x", raise_on_error=False,
                         resources={"step_executor": StepExecutor(executor="slurm", slurm_config=str(settings))})
    assert not result.success
    failure = next(e for e in result.all_events if e.event_type_value == "STEP_FAILURE")
    assert "invalid partition key '../x' of partitions 'slides'" in user_error(failure.event_specific_data.error).message
    assert not (tmp_path / "work").exists() or _files(tmp_path / "work") == []


def test_storage_and_the_root_check(tmp_path):
    with pytest.raises(InvalidPartitionKey, match="invalid partition key '../x' of partitions 'slides'"):
        StorageResource(slides_root=str(tmp_path)).slide_folder("../x")
    assert StorageResource(slides_root=str(tmp_path)).slide_folder("151673") == tmp_path / "151673"
    with pytest.raises(InvalidPartitionKey, match=r"invalid partition key 'a\\n'"):
        validate_partition_key("a\n")  # '$' would accept a trailing newline; the whole key must match
    with pytest.raises(ValueError, match="leaves its root"):
        path_in_root(tmp_path, "/etc/passwd")
    with pytest.raises(ValueError, match="leaves its root"):
        path_in_root(tmp_path, "sub", "..", "..", "x")
    assert path_in_root(tmp_path, "sub", "f.npz") == tmp_path / "sub" / "f.npz"


def test_geometry_store_keeps_its_files_in_its_folder(tmp_path):
    from mihd_resources.geometry_store import CHECKPOINT, GeometryStore

    store = GeometryStore(base_dir=str(tmp_path))
    assert store.path(CHECKPOINT) == tmp_path / "geometry" / CHECKPOINT
    for name in ("../x.pt", "/etc/passwd"):
        with pytest.raises(ValueError, match="leaves its root"):
            store.path(name)
