"""Where things live by default. Every path can be overridden by an environment variable.

``MIHD_HOME`` (default ``./.mihd``) holds the demo data, the asset store, the DuckDB
file and the Dagster instance; ``MIHD_DATA_ROOT`` points the slide sensor at real data.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SQL_DIR = REPO_ROOT / "sql"


def mihd_home() -> Path:
    return Path(os.environ.get("MIHD_HOME", Path.cwd() / ".mihd")).resolve()


def demo_root() -> Path:
    return mihd_home() / "demo_data"


def slides_root() -> Path:
    env = os.environ.get("MIHD_DATA_ROOT")
    return Path(env).resolve() if env else demo_root() / "visium"


def tiles_root() -> Path:
    """Immunofluorescence tiles, one folder per donor (``MIHD_TILES_ROOT``; demo default)."""
    env = os.environ.get("MIHD_TILES_ROOT")
    return Path(env).resolve() if env else demo_root() / "rosmap" / "tiles"


def cells_root() -> Path:
    """Expression-only cell datasets to place, one ``.h5ad`` / 10x ``.h5`` / MTX folder each
    (``MIHD_CELLS_ROOT``; demo default)."""
    env = os.environ.get("MIHD_CELLS_ROOT")
    return Path(env).resolve() if env else demo_root() / "cells"


def clinical_table() -> Path:
    """The donors' clinical outcomes table (``MIHD_CLINICAL``; demo default)."""
    env = os.environ.get("MIHD_CLINICAL")
    return Path(env).resolve() if env else demo_root() / "rosmap" / "clinical.csv"


def storage_root() -> Path:
    return Path(os.environ.get("MIHD_STORAGE", mihd_home() / "storage")).resolve()


def duckdb_path() -> Path:
    return Path(os.environ.get("MIHD_DUCKDB", mihd_home() / "mihd.duckdb")).resolve()


def profile() -> str:
    """``demo`` (small sizes for the embedded data on a CPU) or ``full`` (real sizes)."""
    value = os.environ.get("MIHD_PROFILE", "full")
    if value not in ("demo", "full"):
        raise ValueError(f"MIHD_PROFILE must be 'demo' or 'full', got {value!r}")
    return value
