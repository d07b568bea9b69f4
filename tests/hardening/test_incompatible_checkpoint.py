"""A geometry checkpoint that cannot be resumed stops training, naming the file and why, and is
never overwritten; ``restart: true`` moves it aside, warns, and records that it did."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from dagster import DagsterInstance, materialize

from mihd_assets.geometry import assets as geo
from mihd_assets.geometry import config as geo_config
from mihd_assets.geometry.config import TrainConfig
from mihd_assets.geometry.models import ModelConfig
from mihd_assets.geometry.targets import assemble_training_set
from mihd_assets.geometry.train import IncompatibleCheckpointError, read_checkpoint, train
from mihd_resources import ComputeResource
from mihd_resources.geometry_store import CHECKPOINT, TRAINING_SET, GeometryStore
from mihd_resources.orchestration import user_error
from mihd_resources.step_executor import StepExecutor
from tests.geometry.conftest import synthetic_slides
from tests.hardening.test_checkpoint_pickles import WritesMarker

MODEL = ModelConfig(in_dim=8, width=32, heads=4, inducing=8, context_blocks=1, generator_blocks=1, denoiser_blocks=1)
CFG = TrainConfig(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=2)
MICRO = replace(geo_config.SIZES["tiny"], width=32, heads=4, inducing=8, context_blocks=1, generator_blocks=1,
                denoiser_blocks=1, train=replace(geo_config.SIZES["tiny"].train, batch_size=4, warmup_steps=1,
                                                 checkpoint_every=2, log_every=2))


def _training_set(seed: int = 0):
    return assemble_training_set(synthetic_slides(n_side=8, seed=seed), dims=2, n_sets_train=16, n_sets_heldout=2,
                                 size_min=12, size_max=20, seed=0)


@pytest.fixture(scope="module")
def training_set():
    torch.set_num_threads(1)
    return _training_set()


def _aside(ckpt: Path, label: str) -> list[Path]:
    return sorted(ckpt.parent.glob(f"{ckpt.name}.{label}-*"))


class Lines:
    def __init__(self):
        self.info, self.warning = [], []


def _run(ts, ckpt, fingerprint, lines: Lines, cfg=CFG, **kw):
    return train(ts, MODEL, cfg, ckpt, fingerprint, log=lines.info.append, warn=lines.warning.append, **kw)


def test_an_incompatible_checkpoint_is_refused_and_kept(training_set, tmp_path):
    ckpt = tmp_path / "c.pt"
    _run(training_set, ckpt, "fp", Lines())
    before = ckpt.read_bytes()
    for cfg, fingerprint, why in ((replace(CFG, lr=1e-4), "fp", r"training settings differ: \['lr'\]"),
                                  (CFG, "another training set", "the training set changed"),
                                  (replace(CFG, steps=2), "fp", "it is at step 4, beyond the requested 2")):
        with pytest.raises(IncompatibleCheckpointError, match=rf"geometry checkpoint {ckpt} cannot be resumed: {why}.*restart: true"):
            _run(training_set, ckpt, fingerprint, Lines(), cfg=cfg)
        assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.pt"]


def test_restart_moves_the_incompatible_checkpoint_aside_and_warns(training_set, tmp_path):
    ckpt = tmp_path / "c.pt"
    _run(training_set, ckpt, "fp", Lines())
    before = ckpt.read_bytes()
    lines = Lines()
    result = _run(training_set, ckpt, "fp", lines, cfg=replace(CFG, lr=1e-4), restart=True)
    (aside,) = _aside(ckpt, "incompatible")
    assert aside.read_bytes() == before  # the old checkpoint, intact
    assert result.restarted_from_incompatible and result.moved_aside_to == str(aside)
    assert result.resumed_from_step == 0 and result.step == CFG.steps
    assert read_checkpoint(ckpt)["train_config"]["lr"] == 1e-4
    assert any("training settings differ" in m and str(aside) in m for m in lines.warning), lines.warning
    assert not any("not resumed" in m for m in lines.info)


def test_restart_moves_an_unreadable_checkpoint_aside_without_loading_it(training_set, tmp_path):
    ckpt, marker = tmp_path / "c.pt", tmp_path / "marker"
    torch.save({"model": WritesMarker(marker)}, ckpt)
    before = ckpt.read_bytes()
    with pytest.raises(IncompatibleCheckpointError, match=rf"{ckpt} cannot be resumed: .*refused"):
        _run(training_set, ckpt, "fp", Lines())
    assert ckpt.read_bytes() == before
    lines = Lines()
    result = _run(training_set, ckpt, "fp", lines, restart=True)
    (aside,) = _aside(ckpt, "incompatible")
    assert aside.read_bytes() == before and result.restarted_from_incompatible
    assert not marker.exists()
    assert read_checkpoint(ckpt)["step"] == CFG.steps


def test_restart_on_a_resumable_checkpoint_moves_it_aside_too(training_set, tmp_path):
    ckpt = tmp_path / "c.pt"
    _run(training_set, ckpt, "fp", Lines())
    before = ckpt.read_bytes()
    lines = Lines()
    result = _run(training_set, ckpt, "fp", lines, restart=True)
    (aside,) = _aside(ckpt, "restart")
    assert aside.read_bytes() == before
    assert not result.restarted_from_incompatible and result.resumed_from_step == 0
    assert any("restart requested" in m for m in lines.warning)
    # a second restart in the same run directory never replaces the first file moved aside
    _run(training_set, ckpt, "fp", Lines(), restart=True)
    assert len(_aside(ckpt, "restart")) == 2


# --------------------------------------------------------------------------- through the asset


@pytest.fixture
def asset_home(tmp_path, monkeypatch):
    monkeypatch.setitem(geo_config.SIZES, "tiny", MICRO)
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    store = GeometryStore(base_dir=str(tmp_path / "storage"))
    _training_set().save(store.path(TRAINING_SET))
    return store


def _materialize(store: GeometryStore, instance: DagsterInstance, **config):
    return materialize(
        [geo.geometry_checkpoint], instance=instance, raise_on_error=False,
        resources={"compute": ComputeResource(device="cpu", torch_threads=1), "store": store,
                   "step_executor": StepExecutor()},
        run_config={"ops": {"geometry__geometry_checkpoint": {"config": {"steps": 4, **config}}}},
    )


def _metadata(result) -> dict:
    return {k: v.value for k, v in result.asset_materializations_for_node("geometry__geometry_checkpoint")[0].metadata.items()}


def test_the_asset_refuses_an_incompatible_checkpoint_unless_restart(asset_home):
    store, instance = asset_home, DagsterInstance.ephemeral()
    ckpt = store.path(CHECKPOINT)
    first = _materialize(store, instance)
    assert first.success and _metadata(first)["restarted_from_incompatible"] is False
    # the training set changes: the checkpoint no longer fits it
    _training_set(seed=1).save(store.path(TRAINING_SET))
    before = ckpt.read_bytes()
    refused = _materialize(store, instance)
    assert not refused.success
    failure = next(e for e in refused.all_events if e.event_type_value == "STEP_FAILURE")
    message = user_error(failure.event_specific_data.error).message
    assert f"geometry checkpoint {ckpt} cannot be resumed: the training set changed" in message
    assert "restart: true" in message
    assert ckpt.read_bytes() == before and not _aside(ckpt, "incompatible")

    restarted = _materialize(store, instance, restart=True)
    assert restarted.success
    meta = _metadata(restarted)
    (aside,) = _aside(ckpt, "incompatible")
    assert meta["restarted_from_incompatible"] is True and meta["moved_aside_to"] == str(aside)
    assert aside.read_bytes() == before and ckpt.read_bytes() != before
    warnings = [r.user_message for r in instance.all_logs(restarted.run_id) if r.level == logging.WARNING]
    assert any("the training set changed" in m and "restart requested" in m for m in warnings), warnings
