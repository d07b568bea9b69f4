"""A real one-node Slurm cluster for tests: munged, slurmctld and slurmd from Debian's
``slurm-wlm`` and ``munge``, each in its own process group, all state in one temporary folder.

The node offers two fake GPUs (``gres/gpu`` backed by character devices made with ``mknod``),
enough for Slurm to schedule ``--gres=gpu:N`` and set ``CUDA_VISIBLE_DEVICES``; no CUDA runs.
Client commands (``sbatch``, ``squeue``, ``scontrol``, ``scancel``) find the cluster through
``SLURM_CONF``, which :meth:`LocalSlurm.env` returns.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol", "scancel", "sinfo")


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (a permission the container lacks)."""


def missing_binaries() -> list[str]:
    found = []
    for name in BINARIES:
        if shutil.which(name) is None and not Path("/usr/sbin", name).exists():
            found.append(name)
    return found


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _binary(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


class LocalSlurm:
    """``with LocalSlurm(tmp) as slurm: subprocess.run(["sbatch", ...], env=slurm.env())``."""

    def __init__(self, root: Path, cpus: int = 2, memory_mb: int = 8000, gpus: int = 2):
        self.root = Path(root)
        self.cpus, self.memory_mb, self.gpus = cpus, memory_mb, gpus
        self.host = socket.gethostname().split(".")[0]
        self.conf = self.root / "etc" / "slurm.conf"
        # munged runs as the munge user, which must reach its socket folder: a folder of its own
        # under /tmp (test temp folders are private to their owner).
        self.munge_dir = Path(tempfile.mkdtemp(prefix="mihd-munge-"))
        os.chmod(self.munge_dir, 0o755)
        self.munge_socket = self.munge_dir / "munge.socket"
        self._procs: list[subprocess.Popen] = []

    # --- configuration ---------------------------------------------------------------------
    def _write_config(self) -> None:
        for sub in ("etc", "state", "spool", "log", "run", "dev"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        dev = self.root / "dev"
        for i in range(self.gpus):
            node = dev / f"nvidia{i}"
            if not node.exists():
                # Slurm refuses plain files as GPU devices; /dev/null's major/minor is enough.
                made = subprocess.run(["mknod", str(node), "c", "1", "3"], capture_output=True, text=True)
                if made.returncode != 0:
                    raise SlurmUnavailable(f"cannot make the fake GPU device {node} with mknod (no CAP_MKNOD "
                                           f"here?): {made.stderr.strip()}")
        gres = f"Gres=gpu:{self.gpus}" if self.gpus else ""
        self.conf.write_text("\n".join([
            "ClusterName=mihdtest",
            f"SlurmctldHost={self.host}",
            f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}",
            "SlurmUser=root",
            "SlurmdUser=root",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket}",
            "MpiDefault=none",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core_Memory",
            # Without a default, every job takes all the node's memory and jobs run one at a time.
            "DefMemPerCPU=1000",
            "ReturnToService=2",
            "SchedulerParameters=sched_interval=1",
            "MinJobAge=600",
            "KillWait=5",
            "GresTypes=gpu",
            f"StateSaveLocation={self.root / 'state'}",
            f"SlurmdSpoolDir={self.root / 'spool'}",
            f"SlurmctldPidFile={self.root / 'run' / 'slurmctld.pid'}",
            f"SlurmdPidFile={self.root / 'run' / 'slurmd.pid'}",
            f"SlurmctldLogFile={self.root / 'log' / 'slurmctld.log'}",
            f"SlurmdLogFile={self.root / 'log' / 'slurmd.log'}",
            f"NodeName={self.host} CPUs={self.cpus} RealMemory={self.memory_mb} {gres} State=UNKNOWN",
            "PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))
        (self.root / "etc" / "gres.conf").write_text(
            "AutoDetect=off\n"
            + (f"NodeName={self.host} Name=gpu File={dev}/nvidia[0-{self.gpus - 1}]\n" if self.gpus else "")
        )

    def env(self) -> dict[str, str]:
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    # --- processes -------------------------------------------------------------------------
    def _spawn(self, args: list[str], **kw) -> subprocess.Popen:
        proc = subprocess.Popen(args, env=self.env(), start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kw)
        self._procs.append(proc)
        return proc

    def start(self, timeout_s: float = 30.0) -> "LocalSlurm":
        self._write_config()
        munge_dir = self.munge_dir
        shutil.chown(munge_dir, "munge", "munge")
        self._spawn(["runuser", "-u", "munge", "--", _binary("munged"), "--foreground",
                     f"--socket={self.munge_socket}", f"--pid-file={munge_dir / 'munged.pid'}",
                     f"--log-file={munge_dir / 'munged.log'}", f"--seed-file={munge_dir / 'munged.seed'}"])
        self._wait(lambda: self.munge_socket.exists(), timeout_s, "munged socket")
        self._spawn([_binary("slurmctld"), "-D", "-f", str(self.conf)])
        self._spawn([_binary("slurmd"), "-D", "-f", str(self.conf)])
        self._wait(self._idle, timeout_s, "node idle in sinfo")
        return self

    def _idle(self) -> bool:
        for proc in self._procs:
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"{proc.args[0]} exited with {proc.returncode}: {err[-2000:]}\n{self.logs()}")
        out = subprocess.run(["sinfo", "-h", "-o", "%T"], env=self.env(), capture_output=True, text=True)
        return out.returncode == 0 and out.stdout.strip() == "idle"

    @staticmethod
    def _wait(predicate, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if predicate():
                return
            time.sleep(0.25)
        raise TimeoutError(f"local Slurm: no {what} after {timeout_s:.0f} s")

    def logs(self) -> str:
        parts = []
        for name in ("slurmctld.log", "slurmd.log"):
            path = self.root / "log" / name
            if path.exists():
                parts.append(f"--- {name}\n" + "\n".join(path.read_text(errors="replace").splitlines()[-30:]))
        return "\n".join(parts)

    def jobs(self) -> list[str]:
        """Job ids Slurm still has pending or running."""
        out = subprocess.run(["squeue", "-h", "-o", "%i %T"], env=self.env(), capture_output=True, text=True, check=True)
        return [line.split()[0] for line in out.stdout.splitlines() if line.strip()]

    def job_state(self, job_id: str) -> str:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=self.env(), capture_output=True,
                             text=True, check=True)
        fields = dict(tok.split("=", 1) for tok in out.stdout.split() if "=" in tok)
        return fields["JobState"]

    def stop(self) -> None:
        if self._procs:
            subprocess.run(["scancel", "--full", "-u", "root"], env=self.env(), capture_output=True)
        for proc in reversed(self._procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    continue
        for proc in reversed(self._procs):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        self._procs.clear()
        shutil.rmtree(self.munge_dir, ignore_errors=True)

    def __enter__(self) -> "LocalSlurm":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
