"""Training: it learns, a killed run resumes where it stopped, NaN stops it, foreign checkpoints fail."""

import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from mihd_assets.geometry import train as train_mod
from mihd_assets.geometry.config import TrainConfig
from mihd_assets.geometry.models import GeometryModel, ModelConfig
from mihd_assets.geometry.train import (
    CheckpointMismatchError,
    IncompatibleCheckpointError,
    NonFiniteLossError,
    checkpoint_sigma_gen,
    compute_losses,
    load_model,
    load_state_strict,
    read_checkpoint,
    set_batch,
    train,
)

REPO = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(in_dim=8, width=32, heads=4, inducing=8, context_blocks=1, generator_blocks=1, denoiser_blocks=1)
CFG = TrainConfig(steps=60, batch_size=8, lr=3e-3, warmup_steps=5, checkpoint_every=20, log_every=10)


@pytest.fixture(autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _quiet(_msg):
    pass


def _fixed_batch_losses(model: GeometryModel, ts) -> dict[str, float]:
    """Losses on the same training sets, noise levels and noise draws: comparable across models
    (single-batch training losses are not: each batch draws its own sigmas)."""
    rows = np.arange(min(32, len(ts.train.size)))
    feats, target, mask = set_batch(ts, ts.train, rows, "cpu")
    with torch.no_grad():
        parts = compute_losses(model.eval(), feats, target, mask, ts.sigma_data, replace(CFG, feature_noise=0.0),
                               torch.Generator().manual_seed(123), torch.device("cpu"), False)
    return {k: float(v) for k, v in parts.items()}


def test_training_lowers_the_losses(small_training_set, tmp_path):
    torch.manual_seed(CFG.seed)  # the initial weights train() starts from
    before = _fixed_batch_losses(GeometryModel(MODEL), small_training_set)
    result = train(small_training_set, MODEL, replace(CFG, steps=200, checkpoint_every=200), tmp_path / "c.pt", "fp", log=_quiet)
    after = _fixed_batch_losses(load_model(tmp_path / "c.pt")[0], small_training_set)
    assert result.step == 200 and result.resumed_from_step == 0
    assert after["gen_align"] < 0.5 * before["gen_align"] and after["score"] < before["score"], (before, after)
    saved = read_checkpoint(tmp_path / "c.pt")
    assert saved["step"] == 200 and saved["sigma_data"] == pytest.approx(small_training_set.sigma_data)
    assert {"model", "optimizer", "rng_state", "model_config", "train_config"} <= set(saved)
    # sigma_gen follows the generator's RMS error as it trains (a running mean over the last
    # batches, which carry feature noise): below the untrained error, not below the clean one
    assert saved["sigma_gen"] == pytest.approx(result.sigma_gen)
    assert checkpoint_sigma_gen(saved, "c.pt") == pytest.approx(result.sigma_gen)
    # a checkpoint from before noise matching has none: refinement's schedule is unknown, say so
    with pytest.raises(CheckpointMismatchError, match=r"old\.pt has no sigma_gen.*rematerialize"):
        checkpoint_sigma_gen({k: v for k, v in saved.items() if k != "sigma_gen"}, "old.pt")
    assert after["gen_error"] < saved["sigma_gen"] < 0.8 * before["gen_error"], (saved["sigma_gen"], before, after)


def test_noise_matching_starts_the_denoiser_from_the_estimate_above_sigma_gen(small_training_set, monkeypatch):
    """Sets whose sigma exceeds sigma_gen get the generator's estimate topped up to sigma; the others
    the target plus sigma of noise."""
    torch.manual_seed(0)
    model = GeometryModel(MODEL).eval()
    rows = np.arange(16)
    feats, target, mask = set_batch(small_training_set, small_training_set.train, rows, "cpu")
    seen = {}
    original = model.denoiser.forward

    def spy(x, sigma, context, v_init, mask_, sigma_data):
        seen.update(x=x.detach(), sigma=sigma.detach(), v_init=v_init.detach())
        return original(x, sigma, context, v_init, mask_, sigma_data)

    monkeypatch.setattr(model.denoiser, "forward", spy)
    sigma_gen = 0.3
    with torch.no_grad():
        compute_losses(model, feats, target, mask, small_training_set.sigma_data, replace(CFG, feature_noise=0.0),
                       torch.Generator().manual_seed(5), torch.device("cpu"), False, sigma_gen=sigma_gen)
    m = mask.unsqueeze(-1).float()
    rms_from_estimate = ((((seen["x"] - seen["v_init"]) ** 2) * m).sum((1, 2)) / (m.sum((1, 2)) * 2)).sqrt()
    high = seen["sigma"] > sigma_gen
    assert high.any() and (~high).any()
    expected = torch.sqrt(seen["sigma"] ** 2 - sigma_gen**2)[high]
    assert torch.allclose(rms_from_estimate[high], expected, rtol=0.35), (rms_from_estimate[high], expected)
    # below sigma_gen the start is the target (in the estimate's frame), not the estimate
    target_frame = train_mod.denoiser_target(target, seen["v_init"], mask)
    rms_from_target = ((((seen["x"] - target_frame) ** 2) * m).sum((1, 2)) / (m.sum((1, 2)) * 2)).sqrt()
    assert torch.allclose(rms_from_target[~high], seen["sigma"][~high], rtol=0.35)


def _trainer_script(ckpt: Path, steps: int) -> str:
    return f"""
import sys, time, torch
sys.path.insert(0, {str(REPO)!r}); sys.path.insert(0, {str(Path(__file__).parent)!r})
torch.set_num_threads(1)
from dataclasses import replace
from conftest import synthetic_slides
from mihd_assets.geometry.targets import assemble_training_set
from mihd_assets.geometry import train as T
from test_train import MODEL, CFG
ts = assemble_training_set(synthetic_slides(), 2, 64, 4, 24, 40, 0)
T.train(ts, MODEL, replace(CFG, steps={steps}), {str(ckpt)!r}, "fp", log=lambda m: print(m, flush=True))
"""


def test_killed_run_resumes_from_its_last_checkpoint_and_ends_like_an_uninterrupted_one(small_training_set, tmp_path):
    ckpt = tmp_path / "killed.pt"
    steps = 400
    proc = subprocess.Popen([sys.executable, "-c", _trainer_script(ckpt, steps)], start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline:
            if ckpt.exists() and read_checkpoint(ckpt)["step"] >= 40:
                break
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    killed_at = read_checkpoint(ckpt)["step"]
    assert 40 <= killed_at < steps, f"the run was not killed mid-way (checkpoint at step {killed_at})"

    resumed = train(small_training_set, MODEL, replace(CFG, steps=steps), ckpt, "fp", log=_quiet)
    assert resumed.resumed_from_step == killed_at and resumed.step == steps
    assert resumed.resume_note == f"resumed from step {killed_at}"

    straight = train(small_training_set, MODEL, replace(CFG, steps=steps), tmp_path / "straight.pt", "fp", log=_quiet)
    assert straight.resumed_from_step == 0
    a, b = read_checkpoint(ckpt)["model"], read_checkpoint(tmp_path / "straight.pt")["model"]
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-5), key


def test_changed_settings_or_data_are_refused_unless_restart_and_say_why(small_training_set, tmp_path):
    ckpt = tmp_path / "c.pt"
    train(small_training_set, MODEL, replace(CFG, steps=20), ckpt, "fp", log=_quiet)
    more = train(small_training_set, MODEL, replace(CFG, steps=40), ckpt, "fp", log=_quiet)
    assert more.resumed_from_step == 20  # more steps: continue
    with pytest.raises(IncompatibleCheckpointError, match=r"c\.pt cannot be resumed: training settings differ: \['lr'\]"):
        train(small_training_set, MODEL, replace(CFG, steps=20, lr=1e-4), ckpt, "fp", log=_quiet)
    other_lr = train(small_training_set, MODEL, replace(CFG, steps=20, lr=1e-4), ckpt, "fp", log=_quiet, restart=True)
    assert other_lr.resumed_from_step == 0 and "training settings differ: ['lr']" in other_lr.resume_note
    with pytest.raises(IncompatibleCheckpointError, match=r"c\.pt cannot be resumed: the training set changed"):
        train(small_training_set, MODEL, replace(CFG, steps=20, lr=1e-4), ckpt, "other", log=_quiet)
    other_data = train(small_training_set, MODEL, replace(CFG, steps=20, lr=1e-4), ckpt, "other", log=_quiet, restart=True)
    assert other_data.resumed_from_step == 0 and "training set changed" in other_data.resume_note


def test_non_finite_loss_stops_training_and_keeps_the_last_good_checkpoint(small_training_set, tmp_path, monkeypatch):
    ckpt = tmp_path / "c.pt"
    real = train_mod.compute_losses
    calls = {"n": 0}

    def poisoned(*args, **kwargs):
        out = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 27:
            out["score"] = out["score"] * float("nan")
            out["total"] = out["total"] + out["score"]
        return out

    monkeypatch.setattr(train_mod, "compute_losses", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"non-finite loss at step 27 .*score=nan.*last good checkpoint .*c\.pt is kept"):
        train(small_training_set, MODEL, CFG, ckpt, "fp", log=_quiet)
    saved = read_checkpoint(ckpt)
    assert saved["step"] == 20
    model, _ = load_model(ckpt)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_checkpoint_of_another_architecture_fails_naming_the_keys(small_training_set, tmp_path):
    ckpt = tmp_path / "c.pt"
    train(small_training_set, MODEL, replace(CFG, steps=5), ckpt, "fp", log=_quiet)
    state = read_checkpoint(ckpt)["model"]
    wider = GeometryModel(replace(MODEL, width=48))
    with pytest.raises(CheckpointMismatchError, match=r"c\.pt does not fit.*shape mismatches \['context\.embed\.0\.weight: checkpoint \(32, 8\) vs model \(48, 8\)"):
        load_state_strict(wider, state, str(ckpt))
    deeper = GeometryModel(replace(MODEL, denoiser_blocks=2))
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['denoiser\.blocks\.1\."):
        load_state_strict(deeper, state, str(ckpt))
    renamed = {k.replace("generator.", "gen."): v for k, v in state.items()}
    with pytest.raises(CheckpointMismatchError, match=r"missing keys \['generator\..*unexpected keys \['gen\."):
        load_state_strict(GeometryModel(MODEL), renamed, str(ckpt))
    payload = read_checkpoint(ckpt)
    payload["architecture"] = "something-else"
    torch.save(payload, tmp_path / "foreign.pt")
    with pytest.raises(CheckpointMismatchError, match="foreign.pt is architecture 'something-else'"):
        load_model(tmp_path / "foreign.pt")
