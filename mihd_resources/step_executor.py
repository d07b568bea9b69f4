"""Where a GPU-heavy step's compute runs: in the Dagster step process, or as a Slurm job.

Every GPU-heavy asset hands its compute to :meth:`StepExecutor.run` as a function of one
argument, a logger (``info``/``warning``), that returns a picklable value. With
``executor="local"`` the function runs in the step process. With ``executor="slurm"`` it runs
as a batch job through Dagster Pipes:

- the function and everything it closes over are serialised with ``cloudpickle`` into a
  folder on the shared filesystem (``slurm.work_dir``), next to the Pipes context file. Loading
  a pickle runs code, so the job's folder ``<work_dir>/<run id>/<step>`` and its run folder are
  created mode 0700 (an existing one must be owned by this user, and is set to 0700), the call
  file is written mode 0600, and both the worker (call file) and the step (result file) refuse
  a file that is not owned by the user running them or that group or others can write
  (:func:`mihd_resources.slurm_worker.read_private_file`);
- ``sbatch`` submits a job that runs ``python -m mihd_resources.slurm_worker`` with the
  step's own interpreter; the worker opens ``dagster_pipes`` (file context loader and file
  message writer on the shared filesystem), calls the function with the Pipes logger, and
  writes the result atomically; log lines stream into the Dagster run while the job runs;
- the step polls ``scontrol show job`` and records the job id, node, state, elapsed time and
  exit code in the output's metadata. A job that fails, is cancelled, runs out of time or
  memory, or stays pending past ``pending_timeout_s`` fails the step with Slurm's state,
  reason, exit code and the tail of the job's stderr. Interrupting the step (cancelling the
  Dagster run) cancels the job with ``scancel``.

The same function and inputs give the same result in both modes: the job runs the step's
code from the same installation. On CPU results are bit-identical; on GPU they agree within
float32 tolerance (``rtol=1e-4, atol=1e-5``) because kernels may differ between nodes.

A configured Slurm executor that cannot be reached (no ``sbatch``, controller down) fails the
step at once, naming the setting; it never falls back to a local run.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Literal, Sequence, TypeVar

import yaml
from dagster import ConfigurableResource, Failure, MetadataValue
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .orchestration import GPU_FAMILIES
from .slurm_worker import read_private_file, write_private_file
from .storage import partitions_label, validate_partition_key

T = TypeVar("T")

# Dagster's Pipes session reads a preview property of the message reader at every session.
warnings.filterwarnings("ignore", message=r".*expected_writer_count.*")

# The same families whose Kubernetes pods are configured per family.
FAMILIES = GPU_FAMILIES
EXECUTOR_ENV = "MIHD_EXECUTOR"
SLURM_CONFIG_ENV = "MIHD_SLURM_CONFIG"

# Slurm job states after which a job does not run again.
_FINISHED = {
    "COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "OUT_OF_MEMORY", "NODE_FAIL", "PREEMPTED",
    "BOOT_FAIL", "DEADLINE", "SPECIAL_EXIT", "REVOKED",
}
_EXPLAIN = {
    "TIMEOUT": "Slurm killed the job at its time limit (raise `time` for this family)",
    "OUT_OF_MEMORY": "Slurm killed the job for exceeding its memory request (raise `mem` for this family)",
    "CANCELLED": "the job was cancelled (scancel, or by an administrator)",
    "NODE_FAIL": "the node running the job failed",
    "PREEMPTED": "the job was preempted by a higher-priority job",
    "BOOT_FAIL": "the node could not boot",
    "DEADLINE": "the job reached its deadline",
}


class SlurmJobSpec(BaseModel):
    """What one family's jobs request from Slurm."""

    model_config = ConfigDict(extra="forbid")

    partition: str | None = Field(default=None, description="sbatch --partition (cluster default when unset)")
    gpus: int = Field(default=1, ge=0, description="sbatch --gres=gpu:N")
    gpu_type: str | None = Field(default=None, description="e.g. l40s: --gres=gpu:l40s:N")
    time: str = Field(default="04:00:00", description="sbatch --time")
    mem: str = Field(default="32G", description="sbatch --mem")
    cpus_per_task: int = Field(default=8, ge=1, description="sbatch --cpus-per-task (DataLoader workers + main)")
    account: str | None = None
    qos: str | None = None
    extra_args: list[str] = Field(default_factory=list, description="further sbatch options, passed as given")
    setup: list[str] = Field(
        default_factory=list, description="shell lines run in the job before the worker (e.g. `module load cuda`)"
    )
    pending_timeout_s: float = Field(default=6 * 3600, gt=0, description="fail when still pending after this")

    def sbatch_options(self) -> list[str]:
        opts = [f"--time={self.time}", f"--mem={self.mem}", f"--cpus-per-task={self.cpus_per_task}"]
        if self.gpus:
            opts.append(f"--gres=gpu:{self.gpu_type + ':' if self.gpu_type else ''}{self.gpus}")
        for flag, value in (("--partition", self.partition), ("--account", self.account), ("--qos", self.qos)):
            if value:
                opts.append(f"{flag}={value}")
        return opts + list(self.extra_args)


class SlurmSettings(BaseModel):
    """The Slurm executor's settings file (``MIHD_SLURM_CONFIG``): defaults plus per-family overrides."""

    model_config = ConfigDict(extra="forbid")

    work_dir: str = Field(description="folder on the filesystem shared by the Dagster host and the compute nodes")
    python: str = Field(default_factory=lambda: sys.executable, description="interpreter the job runs")
    poll_interval_s: float = Field(default=2.0, gt=0)
    defaults: SlurmJobSpec = Field(default_factory=SlurmJobSpec)
    families: dict[str, dict[str, Any]] = Field(default_factory=dict)

    def spec(self, family: str) -> SlurmJobSpec:
        if family not in FAMILIES:
            raise ValueError(f"unknown asset family {family!r}; families: {', '.join(FAMILIES)}")
        override = self.families.get(family, {})
        return SlurmJobSpec(**{**self.defaults.model_dump(), **override})


def load_slurm_settings(path: str | Path) -> SlurmSettings:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Slurm settings file {path} (setting slurm_config / env {SLURM_CONFIG_ENV}) not found")
    raw = yaml.safe_load(path.read_text()) or {}
    try:
        settings = SlurmSettings(**raw)
    except ValidationError as exc:
        raise ValueError(f"Slurm settings file {path}: {exc}") from None
    unknown = sorted(set(settings.families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"Slurm settings file {path}: unknown families {unknown}; families: {', '.join(FAMILIES)}")
    for family in settings.families:
        try:
            settings.spec(family)
        except ValidationError as exc:
            raise ValueError(f"Slurm settings file {path}, families.{family}: {exc}") from None
    return settings


class _Job:
    """One submitted Slurm job, as ``scontrol show job`` reports it."""

    def __init__(self, job_id: str, env: dict[str, str]):
        self.job_id = job_id
        self.env = env
        self.fields: dict[str, str] = {}
        self.cancelled = False

    def refresh(self) -> dict[str, str]:
        out = subprocess.run(["scontrol", "show", "job", "-o", self.job_id], env=self.env, capture_output=True,
                             text=True)
        if out.returncode != 0:
            raise Failure(f"Slurm job {self.job_id}: scontrol show job failed: {(out.stderr or out.stdout).strip()}")
        self.fields = dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)
        return self.fields

    @property
    def state(self) -> str:
        return self.fields.get("JobState", "UNKNOWN")

    def metadata(self) -> dict[str, Any]:
        f = self.fields
        return {
            "executor": "slurm",
            "slurm_job_id": self.job_id,
            "slurm_state": self.state,
            "slurm_node": f.get("BatchHost") or f.get("NodeList", ""),
            "slurm_elapsed": f.get("RunTime", ""),
            "slurm_exit_code": f.get("ExitCode", ""),
            "slurm_partition": f.get("Partition", ""),
            "slurm_tres": f.get("TRES", ""),
            "slurm_gres": f.get("TresPerNode", "") or f.get("TresPerJob", ""),
        }

    def cancel(self) -> str | None:
        """``scancel`` the job; Slurm's error when it refused (the caller reports it)."""
        out = subprocess.run(["scancel", self.job_id], env=self.env, capture_output=True, text=True)
        self.cancelled = out.returncode == 0
        return None if out.returncode == 0 else (out.stderr or out.stdout).strip() or f"exit code {out.returncode}"


def private_dir(path: Path) -> Path:
    """``path`` as a folder only its owner can enter, list or write (mode 0700).

    Created with that mode (the umask cannot widen it); an existing folder must be a real
    folder owned by this user, and is set to 0700. A folder of another user, or a symlink, is
    refused: the step writes a pickle there that the job loads, and loading a pickle runs code."""
    try:
        path.mkdir(mode=0o700)
    except FileExistsError:
        pass
    st = path.lstat()
    if not stat.S_ISDIR(st.st_mode):
        raise Failure(f"Slurm work folder {path} is not a folder ({stat.filemode(st.st_mode)}); refusing to use it")
    if st.st_uid != os.geteuid():
        raise Failure(f"Slurm work folder {path} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()}); "
                      "refusing to write a step's call file there")
    os.chmod(path, 0o700)
    return path


def _tail(path: Path, lines: int = 40) -> str:
    if not path.is_file():
        return "(no stderr file)"
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:]) or "(stderr empty)"


class StepExecutor(ConfigurableResource):
    """Runs the compute of GPU-heavy assets locally or as Slurm jobs, chosen by configuration.

    ``executor``: ``local`` (default) or ``slurm`` (env ``MIHD_EXECUTOR``); ``slurm_config``:
    path of the YAML settings file (env ``MIHD_SLURM_CONFIG``), see ``deploy/slurm/``.
    """

    executor: Literal["local", "slurm"] = "local"
    slurm_config: str | None = None

    def run(self, context, family: str, fn: Callable[[Any], T], *,
            output_name: str | Sequence[str] | None = None) -> T:
        """``fn(log)`` here or in a Slurm job; the job's facts go into the output's metadata.

        ``output_name`` names the output (or outputs) that get them in a multi-asset; a single
        asset's own output is found from its key. An asset that calls this must yield or return
        ``Output`` objects (Dagster requires typed events from steps that open a Pipes session)."""
        if output_name is None:
            output_name = context.assets_def.get_output_name_for_asset_key(context.asset_key)
        names = [output_name] if isinstance(output_name, str) else list(output_name)
        if self.executor == "local":
            value, meta = fn(context.log), {"executor": "local"}
        else:
            value, meta = self._run_slurm(context, family, fn)
        for name in names:
            context.add_output_metadata(meta, output_name=name)
        return value

    # --- Slurm ------------------------------------------------------------------------------
    def _settings(self) -> SlurmSettings:
        if not self.slurm_config:
            raise Failure(
                f"executor: slurm is configured ({EXECUTOR_ENV}=slurm) but no Slurm settings file is set: "
                f"set {SLURM_CONFIG_ENV} (resource step_executor.slurm_config) to a YAML file with at least `work_dir`"
            )
        return load_slurm_settings(self.slurm_config)

    @staticmethod
    def _preflight(env: dict[str, str]) -> None:
        missing = [cmd for cmd in ("sbatch", "scontrol", "scancel") if shutil.which(cmd, path=env.get("PATH")) is None]
        if missing:
            raise Failure(
                f"executor: slurm is configured ({EXECUTOR_ENV}=slurm) but {', '.join(missing)} not found on PATH; "
                "run on a Slurm login node or set executor: local. The step was not run locally instead."
            )
        ping = subprocess.run(["scontrol", "ping"], env=env, capture_output=True, text=True, timeout=60)
        if ping.returncode != 0 or "UP" not in ping.stdout:
            raise Failure(
                f"executor: slurm is configured ({EXECUTOR_ENV}=slurm) but the Slurm controller is not reachable "
                f"(`scontrol ping`: {(ping.stdout + ping.stderr).strip() or 'no answer'}). The step was not run "
                "locally instead."
            )

    def _run_slurm(self, context, family: str, fn: Callable[[Any], T]) -> tuple[T, dict]:
        import cloudpickle
        from dagster import PipesFileContextInjector, PipesFileMessageReader, open_pipes_session

        settings = self._settings()
        spec = settings.spec(family)
        env = dict(os.environ)
        self._preflight(env)
        step = re.sub(r"[^A-Za-z0-9_.-]+", "_", context.op.name)
        partition = ""
        if context.has_partition_key:  # part of the job folder's name: a plain file name only
            partition = validate_partition_key(context.partition_key, partitions_label(context.assets_def.partitions_def))
        work_dir = Path(settings.work_dir)
        work_dir.mkdir(parents=True, exist_ok=True)
        run_folder = private_dir(work_dir / context.run_id)
        folder = private_dir(run_folder / (step + (f"__{partition}" if partition else "")))
        call, result, stdout, stderr = (folder / n for n in ("call.pkl", "result.pkl", "stdout.log", "stderr.log"))
        for stale in (result, stdout, stderr):
            stale.unlink(missing_ok=True)
        write_private_file(call, cloudpickle.dumps(fn))

        script = folder / "job.sh"
        lines = ["#!/bin/bash", "set -e", *spec.setup,
                 f"exec {shlex.quote(settings.python)} -m mihd_resources.slurm_worker "
                 f"{shlex.quote(str(call))} {shlex.quote(str(result))}"]
        write_private_file(script, ("\n".join(lines) + "\n").encode(), mode=0o700)
        job_name = f"mihd-{step}" + (f"-{partition}" if partition else "")

        with open_pipes_session(
            context=context,
            context_injector=PipesFileContextInjector(str(folder / "pipes_context.json")),
            message_reader=PipesFileMessageReader(str(folder / "pipes_messages.jsonl")),
        ) as session:
            job_env = {**env, **session.get_bootstrap_env_vars()}
            args = ["sbatch", "--parsable", f"--job-name={job_name[:120]}", f"--chdir={os.getcwd()}",
                    f"--output={stdout}", f"--error={stderr}", "--export=ALL", *spec.sbatch_options(), str(script)]
            submitted = subprocess.run(args, env=job_env, capture_output=True, text=True)
            if submitted.returncode != 0:
                raise Failure(
                    f"sbatch refused the job for {context.op.name} (family {family}): "
                    f"{submitted.stderr.strip() or submitted.stdout.strip()}\ncommand: {shlex.join(args)}"
                )
            job = _Job(submitted.stdout.strip().split(";")[0], env)
            context.log.info(f"{context.op.name}: submitted Slurm job {job.job_id} ({shlex.join(spec.sbatch_options())})")
            try:
                self._wait(context, job, spec, settings.poll_interval_s, stderr)
            except BaseException:
                # Run cancelled, step interrupted, or the job failed: never leave it queued or running.
                if job.state not in _FINISHED and not job.cancelled:
                    refused = job.cancel()
                    if refused:
                        context.log.error(f"{context.op.name}: scancel {job.job_id} failed ({refused}); "
                                          "the job may still be queued or running")
                    else:
                        context.log.warning(f"{context.op.name}: cancelled Slurm job {job.job_id}")
                raise
        meta = job.metadata()
        if not result.is_file():
            raise Failure(f"Slurm job {job.job_id} for {context.op.name} completed but wrote no result at {result}\n"
                          f"stderr tail:\n{_tail(stderr)}", metadata=meta)
        value = cloudpickle.loads(read_private_file(result))
        context.log.info(f"{context.op.name}: Slurm job {job.job_id} COMPLETED on {meta['slurm_node']} "
                         f"in {meta['slurm_elapsed']}")
        return value, {**meta, "slurm_folder": MetadataValue.path(str(folder))}

    @staticmethod
    def _wait(context, job: _Job, spec: SlurmJobSpec, poll_s: float, stderr: Path) -> None:
        submitted_at = time.monotonic()
        last_reason = None
        while True:
            job.refresh()
            state = job.state
            if state in _FINISHED:
                break
            if state == "PENDING":
                reason = job.fields.get("Reason", "")
                if reason != last_reason:
                    context.log.info(f"{context.op.name}: Slurm job {job.job_id} pending ({reason})")
                    last_reason = reason
                if time.monotonic() - submitted_at > spec.pending_timeout_s:
                    refused = job.cancel()
                    raise Failure(
                        f"Slurm job {job.job_id} for {context.op.name} still pending after "
                        f"{spec.pending_timeout_s:.0f} s (pending_timeout_s); Slurm's reason: {reason}. "
                        + (f"scancel failed: {refused}" if refused else "Cancelled."),
                        metadata=job.metadata(),
                    )
            time.sleep(poll_s)
        if state != "COMPLETED":
            exit_code = job.fields.get("ExitCode", "?")
            why = _EXPLAIN.get(state, "the job exited with an error")
            raise Failure(
                f"Slurm job {job.job_id} for {context.op.name} ended {state} (exit code {exit_code}): {why}.\n"
                f"stderr tail ({stderr}):\n{_tail(stderr)}",
                metadata=job.metadata(),
            )


def executor_from_env() -> StepExecutor:
    """The executor the environment asks for: ``MIHD_EXECUTOR`` and ``MIHD_SLURM_CONFIG``."""
    choice = os.environ.get(EXECUTOR_ENV, "local")
    if choice not in ("local", "slurm"):
        raise ValueError(f"{EXECUTOR_ENV} must be 'local' or 'slurm', got {choice!r}")
    return StepExecutor(executor=choice, slurm_config=os.environ.get(SLURM_CONFIG_ENV) or None)
