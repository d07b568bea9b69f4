"""`dagster-webserver` and `dagster-daemon` for tests, each in its own process group.

Everything they start (the code servers, `dagster api execute_run` run workers, step
subprocesses) stays in their groups, and carries a tag in its environment, so :meth:`stop`
can both kill the groups and report any process that escaped them.

    services = DagsterServices(env, logs_dir)
    base = services.start_webserver()
    services.start_daemon()
    ...
    assert services.stop() == []      # nothing was left running
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
TAG_VAR = "MIHD_TEST_PROCESS_TAG"
STARTUP_TIMEOUT_S = 240
STOP_TIMEOUT_S = 20
EXIT_GRACE_S = 10


def tail(path: Path, n: int = 60) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


def tagged_processes(tag: str) -> list[tuple[int, str]]:
    """(pid, command line) of every live process whose environment carries ``TAG_VAR=tag``."""
    needle = f"{TAG_VAR}={tag}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue  # exited meanwhile, or another user's process (never one of ours)
        if needle in environ.split(b"\0") and state != "Z":
            found.append((int(entry.name), cmdline))
    return found


def stop_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group led by ``proc``, wait, then SIGKILL whatever is left of it."""
    pgid = proc.pid  # started with start_new_session: it leads its own group
    try:
        os.killpg(pgid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        proc.wait(timeout=STOP_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        pass
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


class DagsterServices:
    def __init__(self, env: dict[str, str], logs_dir: Path, workspace: Path = REPO / "workspace.yaml"):
        self.tag = uuid.uuid4().hex
        self.env = {**env, TAG_VAR: self.tag}
        self.logs_dir = Path(logs_dir)
        self.logs_dir.mkdir(parents=True, exist_ok=True)
        self.workspace = workspace
        self.procs: dict[str, subprocess.Popen] = {}
        self.base: str | None = None

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = self.logs_dir / f"{name}.log"
        with log.open("w") as fh:
            proc = subprocess.Popen(args, cwd=REPO, env=self.env, stdout=fh, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)
        self.procs[name] = proc
        return proc

    def log(self, name: str) -> Path:
        return self.logs_dir / f"{name}.log"

    def logs(self) -> str:
        return "\n".join(f"--- {name} log ({self.log(name)}):\n{tail(self.log(name))}" for name in self.procs)

    def start_webserver(self, port: int) -> str:
        proc = self._start("webserver", [str(BIN / "dagster-webserver"), "-w", str(self.workspace),
                                         "-h", "127.0.0.1", "-p", str(port)])
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"dagster-webserver exited with code {proc.returncode}:\n{self.logs()}")
            try:
                with urllib.request.urlopen(f"{base}/server_info", timeout=5) as resp:
                    if resp.status == 200:
                        self.base = base
                        self._wait_for_location()
                        return base
            except (urllib.error.URLError, OSError) as exc:
                last = repr(exc)
            time.sleep(0.5)
        raise RuntimeError(f"dagster-webserver did not answer within {STARTUP_TIMEOUT_S} s ({last}):\n{self.logs()}")

    def _wait_for_location(self) -> None:
        """The code location is loaded (the webserver answers before its code server is up)."""
        query = """{ workspaceOrError { ... on Workspace { locationEntries { name
                      locationOrLoadError { __typename ... on PythonError { message } } } } } }"""
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while time.monotonic() < deadline:
            entries = self.graphql(query)["workspaceOrError"]["locationEntries"]
            kinds = {e["name"]: e["locationOrLoadError"] for e in entries}
            if kinds and all(k and k["__typename"] == "RepositoryLocation" for k in kinds.values()):
                return
            errors = [k["message"] for k in kinds.values() if k and k["__typename"] == "PythonError"]
            if errors:
                raise RuntimeError(f"code location failed to load: {errors}")
            time.sleep(1)
        raise RuntimeError(f"code location not loaded within {STARTUP_TIMEOUT_S} s:\n{self.logs()}")

    def start_daemon(self) -> subprocess.Popen:
        return self._start("daemon", [str(BIN / "dagster-daemon"), "run", "-w", str(self.workspace)])

    def graphql(self, query: str, variables: dict | None = None) -> dict:
        request = urllib.request.Request(
            f"{self.base}/graphql", data=json.dumps({"query": query, "variables": variables or {}}).encode(),
            headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=120) as resp:
            payload = json.loads(resp.read())
        if "errors" in payload:
            raise RuntimeError(f"GraphQL errors: {payload['errors']}")
        return payload["data"]

    def stop(self) -> list[tuple[int, str]]:
        """Stop the daemon, then the webserver (groups); returns the tagged processes that were
        still alive afterwards (then SIGKILLed), which should be none."""
        for name in ("daemon", "webserver"):
            if name in self.procs:
                stop_group(self.procs.pop(name))
        for name in list(self.procs):
            stop_group(self.procs.pop(name))
        # SIGKILL is delivered at once but a large process takes a moment to exit (seconds on
        # a loaded machine); a process that escaped the groups got no signal and is still
        # there after the grace (a code server would only end on its 45 s heartbeat timeout).
        deadline = time.monotonic() + EXIT_GRACE_S
        while (left := tagged_processes(self.tag)) and time.monotonic() < deadline:
            time.sleep(0.2)
        for pid, _ in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        return left
