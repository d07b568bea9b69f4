"""The one DuckDB metrics database: schema from ``sql/``, idempotent writes, read-only SQL.

Writes replace every row of one (asset_key, partition_key) in a single transaction, so
re-materializing an asset partition never duplicates rows and a failed write leaves the
previous rows in place. DuckDB allows one writing process per file: assets that write
belong to the ``duckdb_writer`` pool (limit 1).
"""

from __future__ import annotations

import contextlib
import datetime as dt
from pathlib import Path
from typing import Iterator, Sequence

import duckdb
import pandas as pd
from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource

from .settings import SQL_DIR

DUCKDB_WRITER_POOL = "duckdb_writer"
BOOKKEEPING = ("asset_key", "partition_key", "run_id", "code_version", "written_at")


def schema_statements(sql_dir: Path = SQL_DIR) -> list[str]:
    """``schema.sql`` first, then each family's ``tables/*.sql``, then ``views/*.sql`` (name order)."""
    files = [
        sql_dir / "schema.sql",
        *sorted((sql_dir / "tables").glob("*.sql")),
        *sorted((sql_dir / "views").glob("*.sql")),
    ]
    return [f.read_text() for f in files]


def apply_schema(con: duckdb.DuckDBPyConnection, sql_dir: Path = SQL_DIR) -> None:
    for statement in schema_statements(sql_dir):
        con.execute(statement)


def replace_partition_rows(
    con: duckdb.DuckDBPyConnection,
    table: str,
    asset_key: str,
    partition_key: str,
    rows: pd.DataFrame,
    run_id: str,
    code_version: str | None,
) -> int:
    """Delete then insert the rows of one asset partition, atomically."""
    existing = [r[0] for r in con.execute(
        "SELECT column_name FROM information_schema.columns WHERE table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()]
    if not existing:
        raise KeyError(f"DuckDB table {table!r} does not exist; declare it in sql/schema.sql")
    frame = rows.copy()
    unknown = [c for c in frame.columns if c not in existing]
    if unknown:
        raise KeyError(f"columns {unknown} are not in DuckDB table {table!r} (sql/schema.sql)")
    frame["asset_key"] = asset_key
    frame["partition_key"] = partition_key
    frame["run_id"] = run_id
    frame["code_version"] = code_version
    frame["written_at"] = dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)
    con.execute("BEGIN TRANSACTION")
    try:
        con.execute(f'DELETE FROM "{table}" WHERE asset_key = ? AND partition_key = ?', [asset_key, partition_key])
        if len(frame):
            con.register("_mihd_rows", frame)
            con.execute(f'INSERT INTO "{table}" BY NAME SELECT * FROM _mihd_rows')
            con.unregister("_mihd_rows")
        con.execute("COMMIT")
    except Exception:
        con.execute("ROLLBACK")
        raise
    return len(frame)


class MetricsStore(ConfigurableResource):
    """Writes metric rows into the platform's DuckDB file (through dagster-duckdb)."""

    duckdb: DuckDBResource

    @property
    def path(self) -> str:
        return self.duckdb.database

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        with self.duckdb.get_connection() as con:
            apply_schema(con)
            yield con

    def write(self, context, tables: dict[str, pd.DataFrame | Sequence[dict]]) -> dict[str, int]:
        """Replace this asset partition's rows in each table; returns rows written per table."""
        asset_key = context.asset_key.to_user_string()
        partition_key = context.partition_key if context.has_partition_key else ""
        code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
        written = {}
        with self.connect() as con:
            for table, rows in tables.items():
                frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
                written[table] = replace_partition_rows(
                    con, table, asset_key, partition_key, frame, context.run_id, code_version
                )
        return written


def read_only_query(database: str | Path, sql: str) -> pd.DataFrame:
    """Run ``sql`` on a read-only connection (writes raise) and return a DataFrame."""
    database = Path(database)
    if not database.is_file():
        raise FileNotFoundError(f"no DuckDB database at {database}; run `make demo` (or materialize assets) first")
    with duckdb.connect(str(database), read_only=True) as con:
        return con.execute(sql).df()
