"""Imported once by the forkserver that `mihd materialize` forks its step processes from.

Each step of the multiprocess executor runs in a child process; forked from a server that
already imported the definitions (every asset module), torch, cellpose and scanpy, built the repository
and the asset job from them, and loaded the instance's storage modules (SQLAlchemy, Alembic),
a step process starts in well under a second instead of importing all of it again.
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.util
import os
from pathlib import Path

from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef

from dagster_project.definitions import defs

# The definitions import no deep-learning framework (every process that loads the code location
# would pay for it); the step processes forked from here get them already imported.
import cellpose.models  # noqa: E402,F401
import scanpy  # noqa: E402,F401
import torch  # noqa: E402,F401

# A process started by a forkserver gets "forkserver" as its default start method, so a step's
# own worker processes (the vision DataLoader's) would each start a second forkserver and
# import torch again. Steps get the default they have under `mihd --serial` and in any plain
# Python process on Linux, fork: set in the after-fork hook multiprocessing runs in each child
# once its start method is in place.


class _StartMethod:
    def reset(self) -> None:
        if "fork" in multiprocessing.get_all_start_methods():
            multiprocessing.set_start_method("fork", force=True)


_START_METHOD = _StartMethod()
multiprocessing.util.register_after_fork(_START_METHOD, _StartMethod.reset)

defs.get_repository_def()
defs.resolve_implicit_global_asset_job_def()

if os.environ.get("DAGSTER_HOME") and (Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml").exists():
    # Open and close the instance: the storage modules load lazily on first use. Nothing stays
    # open across the fork (the instance is disposed here).
    with DagsterInstance.from_ref(InstanceRef.from_dir(os.environ["DAGSTER_HOME"])) as _instance:
        _instance.get_run_records(limit=1)
