"""Shared fixtures: tiny demo slides, isolated MIHD/Dagster homes, the real sample data."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# The environment as the tests started: embedding R (rpy2, for mclust) later adds R's
# LD_LIBRARY_PATH to os.environ, which breaks other programs' shared libraries (the
# webserver's `ssl`). Subprocesses get this snapshot, as a user's shell would.
BASE_ENV = dict(os.environ)
SHARED_DATA = Path(os.environ.get("MIHD_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The read-only real samples beside the project; tests using them skip when absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not present at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_slides(tmp_path_factory) -> Path:
    """Two tiny synthetic slides (same generator as the demo), written once per session."""
    from mihd_assets.demo.visium import generate_demo_slides, tiny_spec

    root = tmp_path_factory.mktemp("tiny_visium")
    generate_demo_slides(root, n_slides=2, spec=tiny_spec())
    return root


def run_cli(args: list[str], env: dict[str, str], timeout: int = 600) -> subprocess.CompletedProcess:
    """Run `mihd ...` in a fresh interpreter (Definitions read their paths from the environment)."""
    full_env = {**BASE_ENV, **env}
    return subprocess.run(
        [sys.executable, "-m", "dagster_project.cli", *args],
        cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout,
    )


def home_env(home: Path, data_root: Path) -> dict[str, str]:
    return {
        "MIHD_HOME": str(home),
        "DAGSTER_HOME": str(home / "dagster_home"),
        "MIHD_DATA_ROOT": str(data_root),
        # Small networks of the same code, random weights (recorded as such): CPU-sized.
        "MIHD_PROFILE": "demo",
        "MIHD_ALLOW_RANDOM_WEIGHTS": "1",
    }


@pytest.fixture(scope="session")
def materialized_home(tmp_path_factory, tiny_slides) -> dict[str, str]:
    """A MIHD home where every asset of the two tiny slides has been materialized."""
    home = tmp_path_factory.mktemp("mihd_home")
    env = home_env(home, tiny_slides)
    result = run_cli(["materialize"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    return env


def slide_resources(slides_root: Path, store: Path, database: Path) -> dict:
    """The slide pipeline's resources for an in-process `dagster.materialize` on CPU: slides
    under ``slides_root``, asset files under ``store``, metrics catalog ``database``, random weights."""
    from dagster_duckdb import DuckDBResource

    from mihd_resources import AnnDataIOManager, ComputeResource, MetricsStore, StorageResource
    from mihd_resources.clustering import ClusteringResource
    from mihd_resources.embedding_io_manager import EmbeddingIOManager
    from mihd_resources.labels_io_manager import LabelsIOManager
    from mihd_resources.step_executor import StepExecutor
    from mihd_resources.weights import ModelWeightsResource

    return {
        "storage": StorageResource(slides_root=str(slides_root)),
        "anndata_io_manager": AnnDataIOManager(base_dir=str(store)),
        "embedding_io_manager": EmbeddingIOManager(base_dir=str(store)),
        "labels_io_manager": LabelsIOManager(base_dir=str(store)),
        "compute": ComputeResource(device="cpu", num_workers=0),
        "step_executor": StepExecutor(),
        "metrics": MetricsStore(duckdb=DuckDBResource(database=str(database))),
        "clustering": ClusteringResource(),
        "weights": ModelWeightsResource(allow_random=True),
    }


def _xdist_group(nodeid: str) -> str:
    """The worker unit of a test: its file; the cluster tests together (one Slurm cluster and
    one PostgreSQL server at a time); the files reading the materialized home together (that
    home, two minutes of materialization, is built once)."""
    path = nodeid.split("::", 1)[0]
    if path.startswith("tests/cluster/"):
        return "cluster"
    try:
        text = (REPO / path).read_text()
    except OSError:
        return path
    return "materialized_home" if "materialized_home" in text else path


@pytest.hookimpl(optionalhook=True)  # the hook exists only when pytest-xdist is installed
def pytest_xdist_make_scheduler(config, log):
    """With ``pytest -n N`` (pytest-xdist) tests are sent to workers by the unit of
    :func:`_xdist_group`, so module and shared fixtures are built once. (xdist's own
    ``--dist loadgroup`` cannot do this under pytest 9, whose node ids are not rewritable.)"""
    from xdist.scheduler import LoadScopeScheduling

    class ByGroup(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return _xdist_group(nodeid)

    # Units in collection order (the cluster and materialized-home units, the longest, come
    # first), not largest-count first: a unit's test count says little about its time.
    config.option.loadscopereorder = False
    return ByGroup(config, log)
