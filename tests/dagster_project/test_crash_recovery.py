"""A `mihd` run killed in a GPU step does not wedge the `gpu` pool; steps run in parallel;
asset files follow the umask.

Real subprocesses against a real Dagster instance (SQLite in a temporary DAGSTER_HOME). Every
subprocess starts in its own process group and is killed with its group in ``finally``, so a
failing test leaves no step process or forkserver behind.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from dagster import DagsterEventType, DagsterInstance, DagsterRunStatus
from dagster._core.instance.ref import InstanceRef

from tests.conftest import BASE_ENV, REPO, home_env

GPU_POOL = "gpu"


def _instance(env) -> DagsterInstance:
    return DagsterInstance.from_ref(InstanceRef.from_dir(env["DAGSTER_HOME"]))


def _start(args: list[str], env: dict, log: Path) -> subprocess.Popen:
    """`mihd ...` in its own process group (session), output to ``log``."""
    return subprocess.Popen(
        [sys.executable, "-m", "dagster_project.cli", *args], cwd=REPO, env={**BASE_ENV, **env},
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True,
    )


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _run(args: list[str], env: dict, log: Path, timeout: float) -> tuple[int, str]:
    proc = _start(args, env, log)
    try:
        code = proc.wait(timeout=timeout)
    finally:
        _kill_group(proc)  # the step processes and the forkserver of this run, if any are left
    return code, log.read_text()


@pytest.fixture
def one_slide(tiny_slides, tmp_path):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(tiny_slides / "demo_01", root / "demo_01")
    return root


def _gpu_step_running(instance: DagsterInstance) -> tuple[str, str] | None:
    """(run id, step key) of a step holding the gpu pool's slot after its STEP_START."""
    if not instance.event_log_storage.supports_global_concurrency_limits:
        return None
    for slot in instance.event_log_storage.get_concurrency_info(GPU_POOL).claimed_slots:
        started = instance.all_logs(slot.run_id, of_type=DagsterEventType.STEP_START)
        if any(e.step_key == slot.step_key for e in started):
            return slot.run_id, slot.step_key
    return None


@pytest.mark.slow
@pytest.mark.timeout(1800)  # a loaded 2-core machine needs ~9 min; a wedged gpu pool would hang forever
def test_killed_run_does_not_block_the_gpu_pool(one_slide, tmp_path):
    env = home_env(tmp_path / "home", one_slide)
    args = ["materialize", "--only", "slides", "--only", "embeddings", "--max-concurrent", "2"]
    proc = _start(args, env, tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 400
        running = instance = None
        while running is None:
            assert proc.poll() is None, "mihd ended before a gpu step started:\n" + (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "no gpu-pool step started in 400 s"
            time.sleep(0.2)
            if instance is None:
                # Open the instance once mihd has created its storage (it plans only after that).
                if "materializing" in (tmp_path / "first.log").read_text():
                    instance = _instance(env)
                continue
            running = _gpu_step_running(instance)
    finally:
        _kill_group(proc)  # SIGKILL: the run worker and its step processes die mid-step
    dead_run, gpu_step = running
    instance = _instance(env)
    assert instance.get_run_by_id(dead_run).status == DagsterRunStatus.STARTED
    # The dead run still holds the slot: without recovery, every later gpu step waits forever.
    assert dead_run in instance.event_log_storage.get_concurrency_info(GPU_POOL).active_run_ids

    code, out = _run(args, env, tmp_path / "second.log", timeout=1200)
    assert code == 0, out
    assert f"run {dead_run[:8]} (demo_01): the mihd process that ran it" in out and "freed its pool slots" in out
    instance = _instance(env)
    dead = instance.get_run_record_by_id(dead_run)
    assert dead.dagster_run.status == DagsterRunStatus.FAILURE
    assert dead_run not in instance.event_log_storage.get_concurrency_info(GPU_POOL).active_run_ids
    # The step that was killed ran again, in the new run, and succeeded.
    newest = instance.get_run_records(limit=1)[0].dagster_run
    assert newest.run_id != dead_run and newest.status == DagsterRunStatus.SUCCESS
    succeeded = {e.step_key for e in instance.all_logs(newest.run_id, of_type=DagsterEventType.STEP_SUCCESS)}
    assert gpu_step in succeeded
    # A third run finds nothing to recover and nothing to do.
    code, out = _run(args, env, tmp_path / "third.log", timeout=300)
    assert code == 0 and "freed its pool slots" not in out and "demo_01: fresh, nothing to do" in out, out


def _intervals(instance: DagsterInstance) -> dict[str, tuple[float, float]]:
    spans = {}
    for record in instance.get_run_records():
        run_id = record.dagster_run.run_id
        starts = {e.step_key: e.timestamp for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)}
        for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_SUCCESS):
            spans[e.step_key] = (starts[e.step_key], e.timestamp)
    return spans


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_independent_steps_run_in_parallel_and_serial_keeps_one_at_a_time(one_slide, tmp_path):
    """The two preprocessing presets of a slide depend only on raw_slide: with two step
    processes they run at the same time; `--serial` runs them one after the other."""
    steps = ("slides__preprocessed_slide_staig", "slides__preprocessed_slide_standard")
    spans = {}
    for mode in ("parallel", "serial"):
        env = home_env(tmp_path / mode, one_slide)
        extra = ["--max-concurrent", "2"] if mode == "parallel" else ["--serial"]
        code, out = _run(["materialize", "--only", "slides", *extra], env, tmp_path / f"{mode}.log", timeout=600)
        assert code == 0, out
        assert "demo_01: done in" in out
        instance = _instance(env)
        run = next(r.dagster_run for r in instance.get_run_records() if r.dagster_run.job_name == "__ASSET_JOB")
        assert run.tags["mihd/launcher_pid"].isdigit() and run.tags["mihd/launcher_host"]
        assert run.tags["dagster/partition"] == "demo_01"
        spans[mode] = _intervals(instance)
    (a0, a1), (b0, b1) = (spans["parallel"][s] for s in steps)
    assert a0 < b1 and b0 < a1, f"parallel: {steps[0]} {a0:.2f}-{a1:.2f} and {steps[1]} {b0:.2f}-{b1:.2f} do not overlap"
    (a0, a1), (b0, b1) = (spans["serial"][s] for s in steps)
    assert a1 <= b0 or b1 <= a0, "serial: the two steps overlapped"
    assert set(spans["parallel"]) == set(spans["serial"])


UMASK_SCRIPT = textwrap.dedent("""
    import os, stat, sys
    os.umask(int(sys.argv[2], 8))
    import anndata as ad
    import numpy as np
    from dagster import AssetKey, build_output_context
    from mihd_assets.embeddings.store import SpotEmbedding
    from mihd_resources.embedding_io_manager import EmbeddingIOManager
    from mihd_resources.io_manager import AnnDataIOManager

    base = sys.argv[1]
    adata = ad.AnnData(np.ones((3, 2), dtype=np.float32))
    AnnDataIOManager(base_dir=base).handle_output(build_output_context(asset_key=AssetKey(["slides", "raw"])), adata)
    embedding = SpotEmbedding(np.zeros((3, 4)), list(adata.obs_names), {"encoder": "pca"})
    EmbeddingIOManager(base_dir=base).handle_output(build_output_context(asset_key=AssetKey(["emb", "pca"])), embedding)
    for path in (os.path.join(base, "slides", "raw", "__all__.h5ad"), os.path.join(base, "emb", "pca", "__all__.npz")):
        print(path, oct(stat.S_IMODE(os.stat(path).st_mode)))
""")


@pytest.mark.parametrize("umask, mode", [("002", "0o664"), ("077", "0o600")])
def test_asset_files_follow_the_umask(tmp_path, umask, mode):
    """Under umask 002 the lab's group can read (and write) asset files; 077 keeps them private."""
    proc = subprocess.run([sys.executable, "-c", UMASK_SCRIPT, str(tmp_path / "store"), umask], cwd=REPO,
                          env=BASE_ENV, capture_output=True, text=True, timeout=300, start_new_session=True)
    assert proc.returncode == 0, proc.stderr
    modes = [line.split()[-1] for line in proc.stdout.splitlines()]
    assert modes == [mode, mode], proc.stdout
    assert not list((tmp_path / "store").rglob("*.tmp")), "a temporary file was left behind"
