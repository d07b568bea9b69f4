"""`executor: slurm` against a real one-node Slurm cluster (slurmctld + slurmd + munged).

GPU-heavy compute goes through ``StepExecutor``; with ``executor="slurm"`` it runs as a batch
job through Dagster Pipes. These tests check, on the real cluster: a demo slide's embedding
equals the local run's; the job's id, node and state are in the metadata and Slurm reports it
COMPLETED; a failing job fails the step with its exit code and stderr tail; an interrupted
step leaves no job behind; a job that cannot start fails with Slurm's reason; a missing or
unreachable Slurm fails at once and never runs locally.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from dagster import DagsterInstance, Output, asset, materialize
from dagster_duckdb import DuckDBResource

from mihd_assets.embeddings import assets as emb
from mihd_assets.embeddings.store import SpotEmbedding
from mihd_assets.slides import assets as slides
from mihd_resources import AnnDataIOManager, ComputeResource, MetricsStore, StorageResource
from mihd_resources.embedding_io_manager import EmbeddingIOManager
from mihd_resources.orchestration import user_error
from mihd_resources.step_executor import StepExecutor
from mihd_resources.weights import ModelWeightsResource
from tests.cluster.slurm_cluster import LocalSlurm, SlurmUnavailable, missing_binaries

REPO = Path(__file__).resolve().parents[2]
UNI = emb.vision_key("uni", "standard")
VISION = emb.vision_asset_for(UNI)  # the step of every `standard` encoder; uni alone is selected
# CPU on both sides: the same code on the same inputs gives bit-identical float32 results.
# On GPUs kernels may differ between nodes; the documented tolerance is rtol=1e-4, atol=1e-5.
RTOL, ATOL = 1e-4, 1e-5


def _skip_reason() -> str | None:
    missing = missing_binaries()
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)}); scripts/install_system_deps.sh installs them"
    if os.geteuid() != 0:
        return "the one-node test cluster runs slurmd as root and makes fake GPU devices with mknod"
    return None


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    cluster = LocalSlurm(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        cluster.stop()
        pytest.skip(str(exc))
    try:
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture
def slurm_env(slurm, monkeypatch, tmp_path):
    """SLURM_CONF for this process (the jobs inherit the environment) and a settings file."""
    monkeypatch.setenv("SLURM_CONF", str(slurm.conf))

    def settings(**defaults) -> str:
        path = tmp_path / "slurm.yaml"
        path.write_text(yaml.safe_dump({
            "work_dir": str(tmp_path / "slurm_work"), "poll_interval_s": 0.5,
            "defaults": {"mem": "1000M", "cpus_per_task": 1, "gpus": 1, "time": "00:10:00", **defaults},
        }))
        return str(path)

    return settings


def _resources(root: Path, store: Path, executor: StepExecutor) -> dict:
    return {
        "storage": StorageResource(slides_root=str(root)),
        "anndata_io_manager": AnnDataIOManager(base_dir=str(store)),
        "embedding_io_manager": EmbeddingIOManager(base_dir=str(store)),
        "compute": ComputeResource(device="cpu", batch_size=32, num_workers=0),
        "metrics": MetricsStore(duckdb=DuckDBResource(database=str(store / "m.duckdb"))),
        "weights": ModelWeightsResource(allow_random=True),
        "step_executor": executor,
    }


def _failure(result) -> str:
    failures = [e for e in result.all_events if e.event_type_value == "STEP_FAILURE"]
    assert failures, "expected a step failure"
    return user_error(failures[0].event_specific_data.error).message


def test_demo_slide_embedding_on_slurm_equals_local_run(slurm, slurm_env, tiny_slides, tmp_path, monkeypatch):
    monkeypatch.setenv("MIHD_PROFILE", "demo")
    root = tmp_path / "root"
    shutil.copytree(tiny_slides / "demo_01", root / "demo_01")
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", ["demo_01"])

    local = materialize([slides.raw_slide, VISION], partition_key="demo_01", instance=instance,
                        resources=_resources(root, tmp_path / "local", StepExecutor()),
                        selection=[slides.RAW_SLIDE, UNI])
    assert local.success
    remote = materialize(
        [slides.raw_slide, VISION], partition_key="demo_01", instance=instance,
        resources=_resources(root, tmp_path / "slurm", StepExecutor(executor="slurm", slurm_config=slurm_env())),
        selection=[slides.RAW_SLIDE, UNI],
    )
    assert remote.success

    (mat,) = [m for m in remote.asset_materializations_for_node(VISION.op.name)]
    meta = {k: getattr(v, "value", v) for k, v in mat.metadata.items()}
    assert meta["executor"] == "slurm" and meta["slurm_state"] == "COMPLETED"
    assert meta["slurm_node"] == slurm.host and meta["slurm_exit_code"] == "0:0"
    assert meta["slurm_gres"] == "gres:gpu:1"  # --gres=gpu:1 was requested and granted
    assert slurm.job_state(meta["slurm_job_id"]) == "COMPLETED"  # Slurm's own record of the job
    # The job's log lines reached the Dagster run through Pipes.
    logs = [e.message for e in instance.all_logs(remote.run_id) if e.message]
    assert any(f"Slurm job {meta['slurm_job_id']} on {slurm.host}" in m for m in logs)
    assert any("patches" in m for m in logs)  # the encoder's progress line, written inside the job

    name = f"{UNI.path[-1]}/demo_01.npz"
    a = SpotEmbedding.load(tmp_path / "local" / "embeddings" / name)
    b = SpotEmbedding.load(tmp_path / "slurm" / "embeddings" / name)
    assert a.obs_names == b.obs_names and a.values.shape == b.values.shape
    np.testing.assert_allclose(b.values, a.values, rtol=RTOL, atol=ATOL)


def _toy(work_body: str):
    """An asset whose compute (run through the step executor) executes ``work_body``."""
    namespace: dict = {}
    exec(textwrap.dedent(f"""
        def work(log):
            import sys, time
            {work_body}
    """), namespace)
    work = namespace["work"]

    @asset(name="toy")
    def toy(context, step_executor: StepExecutor):
        return Output(step_executor.run(context, "embeddings", work))

    return toy


def test_failing_job_fails_the_step_with_exit_code_and_stderr(slurm, slurm_env):
    toy = _toy('print("boom-marker: bad input", file=sys.stderr); sys.exit(3)')
    result = materialize([toy], raise_on_error=False,
                         resources={"step_executor": StepExecutor(executor="slurm", slurm_config=slurm_env())})
    assert not result.success
    message = _failure(result)
    assert "ended FAILED (exit code 3:0)" in message
    assert "boom-marker: bad input" in message  # the tail of the job's stderr


def test_job_that_cannot_start_fails_with_slurms_reason(slurm, slurm_env):
    # Hold both CPUs of the node, so the step's job stays pending for lack of resources.
    blocker = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", "--mem=500M", "--output=/dev/null", "--wrap", "sleep 120"],
                             env=slurm.env(), capture_output=True, text=True, check=True).stdout.strip()
    try:
        deadline = time.monotonic() + 30
        while slurm.job_state(blocker) != "RUNNING":
            assert time.monotonic() < deadline, "the blocker job never started"
            time.sleep(0.5)
        toy = _toy("return 1")
        result = materialize([toy], raise_on_error=False, resources={
            "step_executor": StepExecutor(executor="slurm", slurm_config=slurm_env(pending_timeout_s=4))})
        assert not result.success
        message = _failure(result)
        assert "still pending after 4 s" in message and "Resources" in message
        job_id = message.split("Slurm job ")[1].split()[0]
        assert slurm.job_state(job_id) == "CANCELLED"
    finally:
        subprocess.run(["scancel", blocker], env=slurm.env(), check=True)


def test_interrupted_step_cancels_its_job(slurm, slurm_env, tmp_path):
    """Cancelling a Dagster run interrupts its steps (SIGINT to the step process); the step's
    Slurm job must not outlive it."""
    script = tmp_path / "run_toy.py"
    script.write_text(textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(REPO)!r})
        from tests.cluster.test_slurm_executor import _toy
        from mihd_resources.step_executor import StepExecutor
        from dagster import materialize
        toy = _toy("time.sleep(600)")
        materialize([toy], raise_on_error=False,
                    resources={{"step_executor": StepExecutor(executor="slurm", slurm_config={slurm_env()!r})}})
    """))
    before = set(slurm.jobs())
    proc = subprocess.Popen([sys.executable, str(script)], env=slurm.env(), cwd=REPO, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        job_id = None
        while job_id is None:
            assert proc.poll() is None, proc.stdout.read()
            assert time.monotonic() < deadline, "the step's Slurm job never started"
            new = [j for j in slurm.jobs() if j not in before]
            if new and slurm.job_state(new[0]) == "RUNNING":
                job_id = new[0]
            time.sleep(0.5)
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=60)
        assert f"cancelled Slurm job {job_id}" in output
        deadline = time.monotonic() + 30
        while job_id in slurm.jobs():
            assert time.monotonic() < deadline, f"Slurm job {job_id} still queued or running after the step stopped"
            time.sleep(0.5)
        assert slurm.job_state(job_id) == "CANCELLED"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_missing_sbatch_fails_at_once_and_never_runs_locally(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    ran_here = tmp_path / "ran_here"
    toy = _toy(f"open({str(ran_here)!r}, 'w').write('x')")
    settings = tmp_path / "slurm.yaml"
    settings.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work")}))
    result = materialize([toy], raise_on_error=False,
                         resources={"step_executor": StepExecutor(executor="slurm", slurm_config=str(settings))})
    assert not result.success
    message = _failure(result)
    assert "MIHD_EXECUTOR=slurm" in message and "sbatch" in message and "not run locally" in message
    assert not ran_here.exists()


def test_unreachable_controller_fails_naming_the_setting(slurm, tmp_path, monkeypatch):
    # A configuration whose controller port nothing listens on.
    conf = tmp_path / "slurm.conf"
    text = slurm.conf.read_text()
    port_line = next(line for line in text.splitlines() if line.startswith("SlurmctldPort="))
    conf.write_text(text.replace(port_line, "SlurmctldPort=9").replace("ClusterName=mihdtest", "ClusterName=gone")
                    + "MessageTimeout=2\n")
    monkeypatch.setenv("SLURM_CONF", str(conf))
    settings = tmp_path / "slurm.yaml"
    settings.write_text(yaml.safe_dump({"work_dir": str(tmp_path / "work")}))
    result = materialize([_toy("return 1")], raise_on_error=False,
                         resources={"step_executor": StepExecutor(executor="slurm", slurm_config=str(settings))})
    assert not result.success
    message = _failure(result)
    assert "controller is not reachable" in message and "MIHD_EXECUTOR=slurm" in message


def test_settings_file_errors_name_the_file_and_key(tmp_path):
    from mihd_resources.step_executor import load_slurm_settings

    bad = tmp_path / "slurm.yaml"
    bad.write_text(yaml.safe_dump({"work_dir": "/x", "families": {"embedings": {"gpus": 1}}}))
    with pytest.raises(ValueError, match=r"slurm.yaml: unknown families \['embedings'\]"):
        load_slurm_settings(bad)
    bad.write_text(yaml.safe_dump({"work_dir": "/x", "families": {"fusion": {"gpus": -1}}}))
    with pytest.raises(ValueError, match=r"families.fusion"):
        load_slurm_settings(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump({"work_dir": "/x", "defaults": {"partition": "gpu", "gpu_type": "l40s"},
                                    "families": {"segmentation": {"gpus": 2, "mem": "64G"}}}))
    spec = load_slurm_settings(good).spec("segmentation")
    assert "--gres=gpu:l40s:2" in spec.sbatch_options() and "--mem=64G" in spec.sbatch_options()
    assert "--partition=gpu" in spec.sbatch_options()
