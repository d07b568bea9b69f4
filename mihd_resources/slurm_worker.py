"""The program a Slurm job runs: ``python -m mihd_resources.slurm_worker CALL RESULT``.

Loads the step's compute function (cloudpickle, written by ``StepExecutor``), opens Dagster
Pipes from the environment the step exported (context and message files on the shared
filesystem), calls the function with the Pipes logger so its lines stream into the Dagster
run, and writes the returned value to ``RESULT`` atomically. An exception prints its
traceback to stderr (the step shows the tail) and exits non-zero.

Unpickling ``CALL`` runs whatever code the file names, so the worker loads it only when
:func:`read_private_file` accepts it: a regular file (not a symlink) owned by the user running
the job, that neither group nor others can write, in a folder owned by that user that
neither group nor others can write (``StepExecutor`` creates it mode 0700 and writes the file
mode 0600). Any other call file is refused with an error naming it, and nothing is loaded.
The result is written mode 0600, and the step reads it back under the same rule.
"""

from __future__ import annotations

import os
import socket
import stat
import sys
import time
from pathlib import Path


class UnsafeCallFileError(PermissionError):
    """A pickle file another user could have written; it was not loaded."""


def _problems(st: os.stat_result, what: str) -> list[str]:
    found = []
    if st.st_uid != os.geteuid():
        found.append(f"{what} is owned by uid {st.st_uid}, not by this user (uid {os.geteuid()})")
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        found.append(f"{what} is writable by group or others (mode {stat.filemode(st.st_mode)})")
    return found


def read_private_file(path: str | Path) -> bytes:
    """The bytes of ``path`` if only this user can have written it; :class:`UnsafeCallFileError` otherwise.

    The checks are made on the opened file (``fstat``), so the bytes read are those of the
    file checked; a symlink is refused (``O_NOFOLLOW``)."""
    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError:
        if path.is_symlink():
            raise UnsafeCallFileError(f"refusing to load {path}: it is a symlink") from None
        raise
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())
        problems = [] if stat.S_ISREG(st.st_mode) else [f"{path} is not a regular file"]
        problems += _problems(st, str(path))
        problems += _problems(os.stat(path.parent), f"its folder {path.parent}")
        if problems:
            raise UnsafeCallFileError(
                f"refusing to load {path}: " + "; ".join(problems)
                + ". A pickle file must be owned by the user loading it and writable by no one else "
                "(loading a pickle runs code)"
            )
        return fh.read()


def write_private_file(path: str | Path, data: bytes, mode: int = 0o600) -> None:
    """Write ``data`` to ``path`` atomically (a temporary file beside it, then a rename), with ``mode``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)  # os.open's mode is narrowed by the umask; set exactly this one
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m mihd_resources.slurm_worker CALL.pkl RESULT.pkl", file=sys.stderr)
        return 2
    call, result = Path(argv[0]), Path(argv[1])
    import cloudpickle
    from dagster_pipes import open_dagster_pipes

    with open_dagster_pipes() as pipes:
        job = os.environ.get("SLURM_JOB_ID", "?")
        pipes.log.info(
            f"Slurm job {job} on {socket.gethostname()}: CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}, cpus {os.environ.get('SLURM_CPUS_PER_TASK', '?')}"
        )
        fn = cloudpickle.loads(read_private_file(call))
        started = time.perf_counter()
        value = fn(pipes.log)
        write_private_file(result, cloudpickle.dumps(value))
        pipes.log.info(f"Slurm job {job}: compute finished in {time.perf_counter() - started:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
