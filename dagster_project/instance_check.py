"""Preflight for a Postgres-backed Dagster instance: connect once, and say which setting is wrong.

Dagster's own answer to an unreachable database comes after about ten seconds of retries as
``DagsterPostgresException: too many retries for DB connection``, naming neither the setting
nor the address. :func:`check_instance_storage` reads ``$DAGSTER_HOME/dagster.yaml``; when the
instance stores its state in PostgreSQL it resolves the connection settings (``env:`` values
included) the way dagster-postgres does, connects once, and raises
:class:`InstanceStorageError` naming the setting (``storage.postgres.postgres_db``), the
variable each value came from, and ``host:port``. A SQLite instance is not checked.

    python -m dagster_project.instance_check      # prints what it reached, or the error (exit 1)
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import yaml

# Field of `postgres_db` -> the psycopg2 keyword, in the order messages list them.
FIELDS = ("hostname", "port", "username", "password", "db_name")
LEGACY_SECTIONS = ("run_storage", "event_log_storage", "schedule_storage")
CONNECT_TIMEOUT_S = 5


class InstanceStorageError(RuntimeError):
    """The instance's PostgreSQL settings are incomplete or the server cannot be reached with them."""


def _postgres_sections(config: dict) -> list[tuple[str, dict]]:
    """(setting path, its config) of every PostgreSQL storage the instance file declares."""
    found = []
    storage = config.get("storage") or {}
    if isinstance(storage, dict) and isinstance(storage.get("postgres"), dict):
        found.append(("storage.postgres", storage["postgres"]))
    for name in LEGACY_SECTIONS:
        section = config.get(name) or {}
        if isinstance(section, dict) and str(section.get("module", "")).startswith("dagster_postgres"):
            found.append((f"{name}.config", section.get("config") or {}))
    return found


def _resolve(value: Any, setting: str, sources: dict[str, str], field: str, instance_file: Path) -> Any:
    """A literal, or ``{env: NAME}`` read from the environment (as Dagster's StringSource/IntSource)."""
    if isinstance(value, dict) and set(value) == {"env"}:
        name = value["env"]
        sources[field] = f"${name}"
        if name not in os.environ:
            raise InstanceStorageError(
                f"{setting}.{field} in {instance_file} reads the environment variable {name}, which is not set; "
                f"export {name} (see deploy/postgres/README.md)"
            )
        return os.environ[name]
    sources[field] = f"{instance_file}"
    return value


def _connection(setting: str, section: dict, instance_file: Path) -> tuple[str, dict, dict[str, str], str]:
    """(setting path, psycopg2 keywords, field -> where its value came from, SQLAlchemy URL)."""
    from dagster_postgres.utils import get_conn_string
    from sqlalchemy.engine import make_url

    sources: dict[str, str] = {}
    if "postgres_url" in section:
        url = _resolve(section["postgres_url"], setting, sources, "postgres_url", instance_file)
        path = f"{setting}.postgres_url"
    elif "postgres_db" in section:
        path = f"{setting}.postgres_db"
        db = section["postgres_db"] or {}
        resolved = {k: _resolve(v, path, sources, k, instance_file) for k, v in db.items() if k != "params"}
        if db.get("params"):
            resolved["params"] = db["params"]
        missing = [f for f in ("username", "db_name") if not resolved.get(f)]
        if missing:
            raise InstanceStorageError(f"{path} in {instance_file} has no {' or '.join(missing)}")
        url = get_conn_string(**resolved)
    else:
        raise InstanceStorageError(f"{setting} in {instance_file} has neither postgres_db nor postgres_url")
    parsed = make_url(url)
    kwargs = {
        "host": parsed.host or None,
        "port": parsed.port,
        "user": parsed.username,
        "password": parsed.password,
        "dbname": parsed.database,
        **{k: v for k, v in parsed.query.items()},
    }
    return path, {k: v for k, v in kwargs.items() if v is not None}, sources, url


def _where(kwargs: dict) -> str:
    host = kwargs.get("host") or "the default Unix socket"
    return f"{host}:{kwargs.get('port', 5432)}"


def _hint(message: str, sources: dict[str, str]) -> str:
    def src(*fields):
        return ", ".join(f"{f} ({sources[f]})" for f in fields if f in sources) or "postgres_url"

    lowered = message.lower()
    if "translate host name" in lowered or "name or service not known" in lowered:
        return f"unknown host: check {src('hostname')}"
    if "refused" in lowered or "timeout expired" in lowered or "no route" in lowered or "could not connect" in lowered:
        return f"no server answers there: is PostgreSQL running, and are {src('hostname', 'port')} right?"
    if "password" in lowered or "authentication" in lowered or "role" in lowered:
        return f"the server refused the login: check {src('username', 'password')}"
    if "database" in lowered and "does not exist" in lowered:
        return f"no such database: check {src('db_name')} or create it (createdb)"
    return f"check {src(*FIELDS)}"


def check_instance_storage(home: str | Path | None = None) -> str | None:
    """Connect once to the instance's PostgreSQL; ``None`` for a non-Postgres instance.

    Returns a one-line description of what it reached; raises :class:`InstanceStorageError`.
    """
    import psycopg2
    from sqlalchemy.engine import make_url

    home = Path(home or os.environ.get("DAGSTER_HOME", ""))
    instance_file = home / "dagster.yaml"
    if not instance_file.is_file():
        return None
    config = yaml.safe_load(instance_file.read_text()) or {}
    reached = []
    for setting, section in _postgres_sections(config):
        path, kwargs, sources, url = _connection(setting, section, instance_file)
        try:
            make_url(url).get_dialect().import_dbapi()
        except ImportError as exc:
            raise InstanceStorageError(
                f"{path} in {instance_file}: the scheme {make_url(url).drivername!r} needs a Python driver that is "
                f"not installed ({exc}); dagster-postgres installs psycopg2, so set `scheme: postgresql+psycopg2`"
            ) from exc
        try:
            con = psycopg2.connect(connect_timeout=CONNECT_TIMEOUT_S, **kwargs)
        except psycopg2.Error as exc:
            detail = " ".join(str(exc).split())
            raise InstanceStorageError(
                f"Dagster instance storage {path} (in {instance_file}) points at {_where(kwargs)}, database "
                f"{kwargs.get('dbname')!r}, user {kwargs.get('user')!r}, and cannot connect: {detail} -- "
                f"{_hint(detail, sources)}"
            ) from exc
        try:
            version = con.server_version
        finally:
            con.close()
        reached.append(f"{path}: PostgreSQL {version // 10000}.{version % 10000} at {_where(kwargs)}, "
                       f"database {kwargs.get('dbname')!r}, user {kwargs.get('user')!r}")
    return "; ".join(reached) or None


def main() -> int:
    try:
        reached = check_instance_storage()
    except InstanceStorageError as exc:
        print(f"instance check: {exc}", file=sys.stderr)
        return 1
    home = os.environ.get("DAGSTER_HOME", "")
    print(reached or f"{home}/dagster.yaml does not use PostgreSQL (nothing to check)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
