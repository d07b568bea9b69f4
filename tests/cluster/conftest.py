"""Fixtures for the multi-node tests: a real throwaway PostgreSQL (tests/services/postgres.py)
and a Dagster home whose instance file is deploy/postgres/dagster.yaml."""

from __future__ import annotations

import shutil
import uuid
from pathlib import Path

import pytest

from tests.services import postgres as pg_service

REPO = Path(__file__).resolve().parents[2]
POSTGRES_INSTANCE_TEMPLATE = REPO / "deploy" / "postgres" / "dagster.yaml"


@pytest.fixture(scope="session")
def postgres_server():
    """One PostgreSQL server for the session (about 2 s to start); each test gets its own database."""
    reason = pg_service.skip_reason()
    if reason:
        pytest.skip(reason)
    server = pg_service.LocalPostgres()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_db(postgres_server) -> str:
    """A fresh, empty database on the session's server, dropped after the test."""
    name = postgres_server.create_database(f"mihd_{uuid.uuid4().hex[:12]}")
    try:
        yield name
    finally:
        postgres_server.drop_database(name)


@pytest.fixture
def postgres_dagster_home(tmp_path, postgres_server, postgres_db) -> dict[str, str]:
    """A DAGSTER_HOME holding a copy of deploy/postgres/dagster.yaml, and the DAGSTER_PG_* variables
    that point it at this test's database (for subprocesses, or ``monkeypatch.setenv``)."""
    home = tmp_path / "dagster_home"
    home.mkdir()
    shutil.copy(POSTGRES_INSTANCE_TEMPLATE, home / "dagster.yaml")
    return {"DAGSTER_HOME": str(home), **postgres_server.dagster_env(postgres_db)}
