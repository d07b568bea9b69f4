"""A real, throwaway PostgreSQL server for tests: Debian's ``initdb`` + ``postgres`` binaries,
one temporary folder, TCP on 127.0.0.1 only, the postmaster in its own process group.

    with LocalPostgres() as pg:
        pg.create_database("t1")
        psycopg2.connect(**pg.connect_kwargs("t1"))

``postgres`` refuses to run as root, so when the tests run as root the server runs as the
``postgres`` system user (its folder is handed to that user); otherwise as the current user.
Stopping sends the postmaster a fast shutdown (SIGINT), then SIGKILLs whatever is left of its
process group and of its children (each postgres child calls setsid, so it leads a session of
its own), and removes the folder.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_BIN_DIRS = (Path("/usr/lib/postgresql/15/bin"), *sorted(Path("/usr/lib/postgresql").glob("*/bin"), reverse=True))
BINARIES = ("initdb", "postgres")
SUPERUSER = "postgres"
STARTUP_TIMEOUT_S = 30
STOP_TIMEOUT_S = 20


def find_bin_dir() -> Path | None:
    """The first PostgreSQL bin folder holding both ``initdb`` and ``postgres`` (``$PG_BIN`` first)."""
    candidates = [Path(os.environ["PG_BIN"])] if os.environ.get("PG_BIN") else []
    candidates += list(PG_BIN_DIRS)
    on_path = shutil.which("initdb")
    if on_path:
        candidates.append(Path(on_path).parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in BINARIES):
            return folder
    return None


def skip_reason() -> str | None:
    """Why a real PostgreSQL cannot be started here, or None when it can."""
    if find_bin_dir() is None:
        return ("PostgreSQL server binaries (initdb, postgres) not found in /usr/lib/postgresql/*/bin, "
                "$PG_BIN or PATH; install Debian's `postgresql` package")
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(SUPERUSER)
        except KeyError:
            return "running as root but there is no `postgres` system user to run the server as"
    try:
        import psycopg2  # noqa: F401
    except ImportError as exc:
        return f"psycopg2 cannot be imported ({exc}); install the project's dependencies"
    return None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def _is_postgres(pid: int) -> bool:
    """Still a live postgres process (not a reused pid, not a zombie)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    name, state = stat[stat.index("(") + 1:stat.rindex(")")], stat.rsplit(")", 1)[1].split()[0]
    return state != "Z" and name.startswith("postgres")


def _tail(path: Path, n: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"


class LocalPostgres:
    """One PostgreSQL cluster in a temporary folder; password authentication over TCP."""

    def __init__(self, password: str = "mihd-test-password"):
        bin_dir = find_bin_dir()
        if bin_dir is None:
            raise RuntimeError(skip_reason())
        self.bin_dir = bin_dir
        self.host = "127.0.0.1"
        self.port: int | None = None
        self.user = SUPERUSER
        self.password = password
        self.root: Path | None = None
        self.proc: subprocess.Popen | None = None
        self._as_user: dict = {}

    # --- paths -------------------------------------------------------------------------
    @property
    def data_dir(self) -> Path:
        return self.root / "data"

    @property
    def socket_dir(self) -> Path:
        return self.root / "sock"

    @property
    def log(self) -> Path:
        return self.root / "postgres.log"

    # --- lifecycle ---------------------------------------------------------------------
    def start(self) -> "LocalPostgres":
        # Not under pytest's tmp folder: that one is private to the invoking user (0700), and
        # the postgres user must reach its own folder.
        self.root = Path(tempfile.mkdtemp(prefix="mihd-pg-"))
        self.socket_dir.mkdir()
        pwfile = self.root / "pwfile"
        pwfile.write_text(self.password + "\n")
        if os.geteuid() == 0:
            account = pwd.getpwnam(SUPERUSER)
            for path in (self.root, self.socket_dir, pwfile):
                os.chown(path, account.pw_uid, account.pw_gid)
            self._as_user = {"user": account.pw_uid, "group": account.pw_gid, "extra_groups": []}
        init = subprocess.run(
            [str(self.bin_dir / "initdb"), "-D", str(self.data_dir), "-U", SUPERUSER, "--auth-local=trust",
             "--auth-host=scram-sha-256", f"--pwfile={pwfile}", "--encoding=UTF8", "--no-sync"],
            capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL, **self._as_user,
        )
        if init.returncode != 0:
            self._remove_root()
            raise RuntimeError(f"initdb failed ({init.returncode}):\n{init.stdout}\n{init.stderr}")
        # A port picked free can be taken before the server binds it: try a few.
        errors = []
        for _ in range(3):
            self.port = free_port()
            try:
                self._launch()
                return self
            except RuntimeError as exc:
                errors.append(str(exc))
                if "could not bind" not in str(exc) and "Address already in use" not in str(exc):
                    break
        self.stop()
        raise RuntimeError("PostgreSQL did not start:\n" + "\n---\n".join(errors))

    def _launch(self) -> None:
        with self.log.open("ab") as log_fh:
            if self._as_user:
                os.chown(self.log, self._as_user["user"], self._as_user["group"])
            self.proc = subprocess.Popen(
                [str(self.bin_dir / "postgres"), "-D", str(self.data_dir), "-p", str(self.port),
                 "-k", str(self.socket_dir), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                 "-c", "synchronous_commit=off", "-c", "full_page_writes=off", "-c", "max_connections=200"],
                stdout=log_fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True, **self._as_user,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        last = ""
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                code, self.proc = self.proc.returncode, None
                raise RuntimeError(f"postgres exited with code {code} on port {self.port}; log {self.log}:\n{_tail(self.log)}")
            try:
                self.connect().close()
                return
            except Exception as exc:  # noqa: BLE001 - psycopg2.OperationalError while it starts; kept for the message
                last = str(exc).strip()
            time.sleep(0.1)
        self._stop_group()
        raise RuntimeError(f"postgres did not accept connections on {self.host}:{self.port} within "
                           f"{STARTUP_TIMEOUT_S} s (last error: {last}); log {self.log}:\n{_tail(self.log)}")

    def processes(self) -> list[int]:
        """The postmaster and its children (backends, checkpointer, ...), which each lead a
        session of their own (postgres calls setsid in every child), so a group kill misses them."""
        if self.proc is None:
            return []
        return [self.proc.pid, *_children(self.proc.pid)]

    def _stop_group(self) -> None:
        proc = self.proc
        if proc is None:
            return
        children = _children(proc.pid)
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: ends sessions, checkpoints, exits
            try:
                proc.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                pass
        self.proc = None
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # start_new_session: the postmaster leads its group
        except ProcessLookupError:
            pass
        proc.wait()
        for pid in children:  # after a clean shutdown they are gone already
            if _is_postgres(pid):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass

    def _remove_root(self) -> None:
        if self.root is not None and self.root.exists():
            shutil.rmtree(self.root)

    def stop(self) -> None:
        self._stop_group()
        self._remove_root()

    def __enter__(self) -> "LocalPostgres":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # --- clients -----------------------------------------------------------------------
    def connect_kwargs(self, dbname: str = "postgres") -> dict:
        return {"host": self.host, "port": self.port, "user": self.user, "password": self.password,
                "dbname": dbname, "connect_timeout": 5}

    def connect(self, dbname: str = "postgres"):
        import psycopg2

        return psycopg2.connect(**self.connect_kwargs(dbname))

    def _admin(self, statement: str) -> None:
        """One statement outside a transaction (CREATE/DROP DATABASE refuse to run in one)."""
        con = self.connect()
        try:
            con.autocommit = True
            with con.cursor() as cur:
                cur.execute(statement)
        finally:
            con.close()

    def create_database(self, name: str) -> str:
        self._admin(f'CREATE DATABASE "{name}"')
        return name

    def drop_database(self, name: str) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def dagster_env(self, dbname: str) -> dict[str, str]:
        """The variables deploy/postgres/dagster.yaml reads, pointing at this server and database."""
        return {
            "DAGSTER_PG_HOST": self.host,
            "DAGSTER_PG_PORT": str(self.port),
            "DAGSTER_PG_USER": self.user,
            "DAGSTER_PG_PASSWORD": self.password,
            "DAGSTER_PG_DB": dbname,
        }
