"""Imported once by the forkserver that `mihd materialize` forks its step processes from.

Each step of the multiprocess executor runs in a child process; forked from a server that
already imported the definitions (torch, scanpy, every asset module), built the repository
and the asset job from them, and loaded the instance's storage modules (SQLAlchemy, Alembic),
a step process starts in well under a second instead of importing all of it again.
"""

from __future__ import annotations

import os
from pathlib import Path

from dagster import DagsterInstance
from dagster._core.instance.ref import InstanceRef

from dagster_project.definitions import defs

defs.get_repository_def()
defs.resolve_implicit_global_asset_job_def()

if os.environ.get("DAGSTER_HOME") and (Path(os.environ["DAGSTER_HOME"]) / "dagster.yaml").exists():
    # Open and close the instance: the storage modules load lazily on first use. Nothing stays
    # open across the fork (the instance is disposed here).
    with DagsterInstance.from_ref(InstanceRef.from_dir(os.environ["DAGSTER_HOME"])) as _instance:
        _instance.get_run_records(limit=1)
