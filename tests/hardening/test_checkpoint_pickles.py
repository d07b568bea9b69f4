"""Loading a geometry checkpoint or a Slurm call file never runs code another user put in the file."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import cloudpickle
import numpy as np
import pytest
import torch

from mihd_assets.geometry.config import TrainConfig
from mihd_assets.geometry.models import ModelConfig
from mihd_assets.geometry.targets import assemble_training_set
from mihd_assets.geometry.train import (
    CHECKPOINT_FORMAT,
    CheckpointFormatError,
    IncompatibleCheckpointError,
    load_model,
    read_checkpoint,
    save_checkpoint,
    train,
)
from mihd_resources.slurm_worker import UnsafeCallFileError, read_private_file, write_private_file
from mihd_resources.step_executor import StepExecutor
from tests.geometry.conftest import synthetic_slides

REPO = Path(__file__).resolve().parents[2]
MODEL = ModelConfig(in_dim=8, width=32, heads=4, inducing=8, context_blocks=1, generator_blocks=1, denoiser_blocks=1)
CFG = TrainConfig(steps=4, batch_size=4, lr=3e-3, warmup_steps=1, checkpoint_every=2, log_every=2)


class WritesMarker:
    """Unpickling this object writes ``marker``: what a crafted checkpoint would run."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "code from the file ran"))


@pytest.fixture(scope="module")
def training_set():
    torch.set_num_threads(1)
    return assemble_training_set(synthetic_slides(n_side=8), dims=2, n_sets_train=16, n_sets_heldout=2,
                                 size_min=12, size_max=20, seed=0)


def _crafted(path: Path, marker: Path) -> Path:
    torch.save({"format": CHECKPOINT_FORMAT, "architecture": "x", "model": WritesMarker(marker)}, path)
    return path


def test_the_crafted_payload_is_live(tmp_path):
    """The payload the other tests use does run when a file is loaded with weights_only=False."""
    marker = tmp_path / "marker"
    torch.load(_crafted(tmp_path / "evil.pt", marker), weights_only=False)
    assert marker.read_text() == "code from the file ran"


def test_checkpoint_with_a_pickle_payload_is_refused_and_runs_nothing(tmp_path, training_set):
    marker = tmp_path / "marker"
    evil = _crafted(tmp_path / "geometry_checkpoint.pt", marker)
    before = evil.read_bytes()
    with pytest.raises(CheckpointFormatError, match=r"geometry_checkpoint\.pt refused: it is not a weights-only checkpoint"):
        read_checkpoint(evil)
    with pytest.raises(CheckpointFormatError, match=r"geometry_checkpoint\.pt refused"):
        load_model(evil)
    with pytest.raises(IncompatibleCheckpointError, match=r"geometry_checkpoint\.pt cannot be resumed: .*refused"):
        train(training_set, MODEL, CFG, evil, "fp", log=lambda _m: None)
    assert not marker.exists()
    assert evil.read_bytes() == before  # a file that failed to load is never overwritten


def test_old_format_checkpoints_are_refused_naming_the_format(tmp_path):
    # Written before the weights-only format: numpy objects inside (needs weights_only=False to load) ...
    with_numpy = tmp_path / "numpy.pt"
    torch.save({"architecture": "a", "encoder": {"components": np.ones((2, 2), np.float32)}}, with_numpy)
    with pytest.raises(CheckpointFormatError, match=r"numpy\.pt refused.*Unsupported global.*restart: true"):
        read_checkpoint(with_numpy)
    # ... or plain values but no format tag.
    untagged = tmp_path / "untagged.pt"
    torch.save({"architecture": "a", "step": 3}, untagged)
    with pytest.raises(CheckpointFormatError, match=rf"untagged\.pt has format None, not '{CHECKPOINT_FORMAT}'"):
        read_checkpoint(untagged)


def test_checkpoints_are_written_weights_only(tmp_path, training_set):
    ckpt = tmp_path / "c.pt"
    encoder = {"kind": "shared_pca", "genes": np.array(["g1", "g2"]), "components": np.ones((2, 8), np.float32),
               "score_scale": np.float32(2.5), "zero_d": np.asarray(np.float32(1.5))}
    train(training_set, MODEL, CFG, ckpt, "fp", log=lambda _m: None, extra={"encoder": encoder})
    saved = torch.load(ckpt, map_location="cpu", weights_only=True)  # no unpickler allowlist needed
    assert saved["format"] == CHECKPOINT_FORMAT and saved["step"] == CFG.steps
    assert saved["encoder"]["genes"] == ["g1", "g2"]
    assert torch.equal(saved["encoder"]["components"], torch.ones((2, 8)))
    assert saved["encoder"]["score_scale"] == 2.5 and saved["encoder"]["zero_d"] == 1.5
    model, again = load_model(ckpt)
    assert again["step"] == CFG.steps
    # it resumes from its own file
    resumed = train(training_set, MODEL, replace(CFG, steps=6), ckpt, "fp", log=lambda _m: None, extra={"encoder": encoder})
    assert resumed.resumed_from_step == CFG.steps and resumed.step == 6


def test_a_value_that_needs_pickle_is_refused_before_writing(tmp_path):
    path = tmp_path / "c.pt"
    with pytest.raises(TypeError, match=r"checkpoint\.extra\.when: .*datetime cannot be stored"):
        import datetime

        save_checkpoint(path, {"extra": {"when": datetime.datetime.now()}})
    assert not path.exists()


# --------------------------------------------------------------------------- Slurm call files


def _worker(call: Path, result: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mihd_resources.slurm_worker", str(call), str(result)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)


def _job_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "job"
    folder.mkdir(mode=0o700)
    os.chmod(folder, 0o700)
    return folder


def test_worker_runs_a_private_call_file(tmp_path):
    folder = _job_dir(tmp_path)
    write_private_file(folder / "call.pkl", cloudpickle.dumps(lambda log: 6 * 7))
    assert stat.S_IMODE((folder / "call.pkl").stat().st_mode) == 0o600
    done = _worker(folder / "call.pkl", folder / "result.pkl")
    assert done.returncode == 0, done.stderr
    assert stat.S_IMODE((folder / "result.pkl").stat().st_mode) == 0o600
    assert cloudpickle.loads(read_private_file(folder / "result.pkl")) == 42


def test_worker_refuses_a_call_file_others_can_write(tmp_path):
    folder = _job_dir(tmp_path)
    marker = tmp_path / "marker"
    call = folder / "call.pkl"
    call.write_bytes(cloudpickle.dumps(WritesMarker(marker)))
    os.chmod(call, 0o666)
    done = _worker(call, folder / "result.pkl")
    assert done.returncode != 0
    assert f"refusing to load {call}" in done.stderr and "writable by group or others" in done.stderr
    assert not marker.exists() and not (folder / "result.pkl").exists()


def test_worker_refuses_a_call_file_in_a_folder_others_can_write(tmp_path):
    folder = tmp_path / "shared"
    folder.mkdir()
    os.chmod(folder, 0o777)
    marker = tmp_path / "marker"
    write_private_file(folder / "call.pkl", cloudpickle.dumps(WritesMarker(marker)))
    with pytest.raises(UnsafeCallFileError, match=r"its folder .*shared is writable by group or others"):
        read_private_file(folder / "call.pkl")
    assert not marker.exists()


def test_worker_refuses_a_symlinked_call_file(tmp_path):
    folder = _job_dir(tmp_path)
    write_private_file(tmp_path / "elsewhere.pkl", cloudpickle.dumps(1))
    (folder / "call.pkl").symlink_to(tmp_path / "elsewhere.pkl")
    with pytest.raises(UnsafeCallFileError, match="is a symlink"):
        read_private_file(folder / "call.pkl")


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a file to another user needs root")
def test_worker_refuses_a_call_file_of_another_user(tmp_path):
    folder = _job_dir(tmp_path)
    marker = tmp_path / "marker"
    call = folder / "call.pkl"
    write_private_file(call, cloudpickle.dumps(WritesMarker(marker)))
    os.chown(call, 65534, 65534)
    done = _worker(call, folder / "result.pkl")
    assert done.returncode != 0
    assert f"refusing to load {call}" in done.stderr and "owned by uid 65534" in done.stderr
    assert not marker.exists()


def _fake_slurm(bin_dir: Path) -> None:
    """sbatch that refuses every job, scontrol that answers ping: the step stops after writing its folder."""
    bin_dir.mkdir()
    for name, body in {"sbatch": "echo 'sbatch: error: test refuses jobs' >&2; exit 1",
                       "scontrol": "echo 'Slurmctld(primary) at test is UP'",
                       "scancel": "exit 0"}.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)


def test_step_creates_each_job_folder_owner_only(tmp_path, monkeypatch):
    import yaml
    from dagster import Output, asset, materialize

    _fake_slurm(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}:{os.environ['PATH']}")
    settings = tmp_path / "slurm.yaml"
    settings.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work")}))

    @asset(name="toy")
    def toy(context, step_executor: StepExecutor):
        return Output(step_executor.run(context, "embeddings", lambda log: 1))

    old_umask = os.umask(0)  # the folders are 0700 whatever the umask
    try:
        result = materialize([toy], raise_on_error=False,
                             resources={"step_executor": StepExecutor(executor="slurm", slurm_config=str(settings))})
    finally:
        os.umask(old_umask)
    assert not result.success
    (run_dir,) = (tmp_path / "work").iterdir()
    (job_dir,) = run_dir.iterdir()
    assert stat.S_IMODE(run_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(job_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((job_dir / "call.pkl").stat().st_mode) == 0o600
    assert read_private_file(job_dir / "call.pkl")  # the worker's check accepts it


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a folder to another user needs root")
def test_step_refuses_a_job_folder_of_another_user(tmp_path):
    from dagster import Failure

    from mihd_resources.step_executor import private_dir

    planted = tmp_path / "run"
    planted.mkdir()
    os.chown(planted, 65534, 65534)
    with pytest.raises(Failure, match=r"run is owned by uid 65534, not by this user"):
        private_dir(planted)
