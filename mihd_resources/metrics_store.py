"""The metrics store: one Parquet file per written asset partition, a DuckDB file of views to query.

Layout (see docs/metrics_storage.md)::

    <metrics_dir>/<table>/<asset key>/<partition>/<time_ns>-<pid>-<id>.parquet   one file per write
    <metrics_dir>/<table>/_schema/_/<schema hash>.parquet    zero rows, every column typed
    <database>.duckdb                    catalog: one VIEW per table + sql/views/*.sql
    <database>.duckdb.schema-hash        hash of sql/ + metrics_dir the catalog was built from
    <database>.duckdb.lock               held only while the catalog is rebuilt

A write builds the partition's typed rows in an in-memory DuckDB that has the tables of
``sql/schema.sql`` and ``sql/tables/*.sql`` (so a column the schema lacks, or a NULL in a
NOT NULL column, is refused before anything on disk changes), copies them to a temporary
file in the partition's folder and renames it to a new, never reused name (so a file,
once visible, never changes: DuckDB opens a Parquet file more than once per query, and a
file replaced in place under the same name can be read half old, half new). Each table's
view keeps, per (asset_key, partition_key), only the rows of the newest file (names sort
by write time): re-writing a partition replaces exactly its rows, last writer wins, and a
reader sees the old write or the new one, never both or half. An empty write is a file
with one tombstone row (``_mihd_tombstone``) that the view drops, so the partition then
has no rows. Superseded files stay until :func:`prune_superseded` removes them.

Writers never open the catalog for writing. The catalog is rebuilt only when it is missing
or when its hash is stale, into a temporary file that then replaces it (readers that have
the old one open keep reading it), under an ``fcntl`` lock so two writers do not race.
So any number of processes, on any node that mounts the folder, write at once, and
``duckdb.connect(path, read_only=True)`` (or ``duckdb -readonly path``) is never blocked.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import hashlib
import os
import time
import uuid
from pathlib import Path
from typing import Iterator, Optional, Sequence
from urllib.parse import quote, unquote

import duckdb
import pandas as pd
from dagster import ConfigurableResource
from dagster_duckdb import DuckDBResource
from pydantic import Field

from .settings import SQL_DIR

BOOKKEEPING = ("asset_key", "partition_key", "run_id", "code_version", "written_at")

CATALOG_FORMAT = "mihd-metrics-catalog-2"
CATALOG_TABLE = "_mihd_catalog"
SCHEMA_FOLDER = "_schema"
TOMBSTONE = "_mihd_tombstone"  # true on the one row of an empty write's file
FILE_COLUMN = "_mihd_file"     # read_parquet's filename column in the views
_GLOB_CHARS = set("*?[]{}")


class MetricsWriteError(ValueError):
    """A metrics write was refused; the partition's previous rows are unchanged."""


# --------------------------------------------------------------------------- schema (sql/)

def table_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    """``schema.sql`` first, then each family's ``tables/*.sql`` (name order)."""
    return [sql_dir / "schema.sql", *sorted((sql_dir / "tables").glob("*.sql"))]


def view_files(sql_dir: Path = SQL_DIR) -> list[Path]:
    return sorted((sql_dir / "views").glob("*.sql"))


def schema_statements(sql_dir: Path = SQL_DIR) -> list[str]:
    """``schema.sql`` first, then each family's ``tables/*.sql``, then ``views/*.sql`` (name order)."""
    return [f.read_text() for f in (*table_files(sql_dir), *view_files(sql_dir))]


def apply_schema(con: duckdb.DuckDBPyConnection, sql_dir: Path = SQL_DIR) -> None:
    """Create every table and view of ``sql/`` in ``con`` (a database holding real tables)."""
    for statement in schema_statements(sql_dir):
        con.execute(statement)


def apply_tables(con: duckdb.DuckDBPyConnection, sql_dir: Path = SQL_DIR) -> None:
    for path in table_files(sql_dir):
        try:
            con.execute(path.read_text())
        except duckdb.Error as exc:
            raise type(exc)(f"{path}: {exc}") from exc


def schema_connection(sql_dir: Path = SQL_DIR) -> duckdb.DuckDBPyConnection:
    """An in-memory DuckDB holding the (empty) metric tables of ``sql/``."""
    con = duckdb.connect(":memory:")
    apply_tables(con, sql_dir)
    return con


def table_columns(con: duckdb.DuckDBPyConnection, table: str) -> list[tuple[str, str]]:
    """``(column, type)`` of ``table`` in declaration order; empty when there is no such table."""
    return [(r[0], r[1]) for r in con.execute(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'main' AND table_name = ? ORDER BY ordinal_position",
        [table],
    ).fetchall()]


def base_tables(con: duckdb.DuckDBPyConnection, catalog: str | None = None) -> list[str]:
    sql = "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' AND table_schema = 'main'"
    params: list = []
    if catalog is not None:
        sql += " AND table_catalog = ?"
        params.append(catalog)
    return [r[0] for r in con.execute(sql + " ORDER BY table_name", params).fetchall()]


def replace_partition_rows(
    con: duckdb.DuckDBPyConnection,
    table: str,
    asset_key: str,
    partition_key: str,
    rows: pd.DataFrame,
    run_id: str,
    code_version: str | None,
) -> int:
    """Delete then insert the rows of one asset partition of a DuckDB table, atomically.

    The metrics store calls this on its in-memory schema connection to type and check a
    write; it also works on any database holding the tables of ``sql/``.
    """
    existing = [c for c, _ in table_columns(con, table)]
    if not existing:
        raise KeyError(f"DuckDB table {table!r} does not exist; declare it in sql/schema.sql or sql/tables/*.sql")
    frame = rows.copy()
    unknown = [c for c in frame.columns if c not in existing]
    if unknown:
        raise KeyError(f"columns {unknown} are not in DuckDB table {table!r} (sql/schema.sql, sql/tables/*.sql)")
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


# --------------------------------------------------------------------------- file layout

def metrics_dir_for(database: str | Path) -> Path:
    """The default Parquet folder of a catalog: ``<folder>/<stem>_metrics`` beside the ``.duckdb`` file."""
    database = Path(database).resolve()
    return database.with_name(f"{database.stem}_metrics")


def encode_name(value: str) -> str:
    """A file name for an asset key or partition key, reversible with :func:`decode_name`.

    Percent-encoding of everything but letters, digits and ``-._~``; a leading ``_`` or
    ``.`` is encoded too, so ``_`` alone (the empty key) and ``_schema`` never clash with
    a real key and no name is hidden. Names longer than 200 characters become ``_h<sha256>``
    (the bookkeeping columns still hold the key).
    """
    if value == "":
        return "_"
    name = quote(value, safe="-~")  # '.' and '_' are never encoded by quote(); handle the leading one
    if name[0] in "._":
        name = f"%{ord(name[0]):02X}{name[1:]}"
    if len(name) > 200:
        return "_h" + hashlib.sha256(value.encode()).hexdigest()
    return name


def decode_name(name: str) -> str:
    if name == "_":
        return ""
    if name.startswith("_h"):
        raise ValueError(f"{name!r} is a hashed name; read the key from the file's asset_key / partition_key columns")
    return unquote(name)


def partition_dir(metrics_dir: str | Path, table: str, asset_key: str, partition_key: str) -> Path:
    return Path(metrics_dir) / table / encode_name(asset_key) / encode_name(partition_key)


def partition_files(metrics_dir: str | Path, table: str, asset_key: str, partition_key: str) -> list[Path]:
    """The partition's files, oldest first; the last one holds its current rows."""
    folder = partition_dir(metrics_dir, table, asset_key, partition_key)
    return sorted(folder.glob("*.parquet")) if folder.is_dir() else []


def new_file_name() -> str:
    """Unique, and in write order when sorted: ``<time_ns>-<pid>-<random>.parquet``."""
    return f"{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:12]}.parquet"


def table_glob(metrics_dir: str | Path, table: str) -> str:
    return str(Path(metrics_dir) / table / "*" / "*" / "*.parquet")


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _temp_beside(target: Path) -> Path:
    """A fresh name in the target's folder that the ``*.parquet`` globs never match."""
    return target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")


def _copy_to_parquet(con: duckdb.DuckDBPyConnection, select_sql: str, params: list, target: Path) -> Path:
    """Write ``select_sql`` to a temporary Parquet file beside ``target``; returns the temp path.

    DuckDB creates the file with mode 0o666 & ~umask (not mkstemp's 0o600), so the
    permissions follow the writer's umask.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    temp = _temp_beside(target)
    try:
        con.execute(f"COPY ({select_sql}) TO {_sql_literal(str(temp))} (FORMAT parquet)", params)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise
    return temp


def _atomic_write_text(path: Path, text: str) -> None:
    temp = _temp_beside(path)
    temp.write_text(text)
    os.replace(temp, path)


# --------------------------------------------------------------------------- catalog

def stamp_path(database: str | Path) -> Path:
    database = Path(database)
    return database.with_name(database.name + ".schema-hash")


def lock_path(database: str | Path) -> Path:
    database = Path(database)
    return database.with_name(database.name + ".lock")


def schema_hash(metrics_dir: str | Path, sql_dir: Path = SQL_DIR) -> str:
    """Hash of everything the catalog is built from: the sql files and the Parquet folder."""
    digest = hashlib.sha256()
    digest.update(CATALOG_FORMAT.encode() + b"\0" + str(Path(metrics_dir).resolve()).encode() + b"\0")
    for path in (*table_files(sql_dir), *view_files(sql_dir)):
        digest.update(str(path.relative_to(sql_dir)).encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def catalog_is_current(database: str | Path, metrics_dir: str | Path, sql_dir: Path = SQL_DIR) -> bool:
    database, stamp = Path(database), stamp_path(database)
    return database.is_file() and stamp.is_file() and stamp.read_text().strip() == schema_hash(metrics_dir, sql_dir)


def _check_folder(metrics_dir: Path) -> None:
    if _GLOB_CHARS & set(str(metrics_dir)):
        raise ValueError(f"metrics folder {metrics_dir} contains a glob character ({''.join(sorted(_GLOB_CHARS))}); "
                         "the catalog's read_parquet globs cannot name it")


def ensure_catalog(database: str | Path, metrics_dir: str | Path | None = None, sql_dir: Path = SQL_DIR) -> bool:
    """Build the catalog if it is missing or stale; True when this call rebuilt it."""
    database = Path(database).resolve()
    metrics_dir = Path(metrics_dir).resolve() if metrics_dir else metrics_dir_for(database)
    if catalog_is_current(database, metrics_dir, sql_dir):
        return False
    database.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_path(database), os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if catalog_is_current(database, metrics_dir, sql_dir):
            return False
        build_catalog(database, metrics_dir, sql_dir)
        return True
    finally:
        os.close(fd)  # releases the lock


def build_catalog(database: Path, metrics_dir: Path, sql_dir: Path = SQL_DIR) -> None:
    """Write the catalog to a temporary file and move it over ``database``; then the stamp.

    Callers hold the lock (:func:`ensure_catalog`). A ``database`` that is an older
    single-file metrics database (real tables, no catalog table) has its rows exported to
    Parquet first, one file per (table, asset, partition) not already written.
    """
    _check_folder(metrics_dir)
    digest = schema_hash(metrics_dir, sql_dir)
    with schema_connection(sql_dir) as mem:
        tables = {t: table_columns(mem, t) for t in base_tables(mem)}
        for table in tables:
            # Named by the schema hash: a new schema adds a file, none is ever replaced in place.
            target = metrics_dir / table / SCHEMA_FOLDER / "_" / f"{digest[:16]}.parquet"
            if not target.exists():
                select = f'SELECT *, NULL::BOOLEAN AS {TOMBSTONE} FROM "{table}" LIMIT 0'
                os.replace(_copy_to_parquet(mem, select, [], target), target)
        if database.is_file():
            _export_legacy_rows(mem, database, metrics_dir, tables)
    temp = _temp_beside(database)
    try:
        with duckdb.connect(str(temp)) as cat:
            for table, columns in tables.items():
                select = ", ".join(f'CAST("{c}" AS {t}) AS "{c}"' for c, t in columns)
                cat.execute(
                    f'CREATE VIEW "{table}" AS SELECT {select} FROM read_parquet('
                    f"{_sql_literal(table_glob(metrics_dir, table))}, union_by_name = true, "
                    f"hive_partitioning = false, filename = '{FILE_COLUMN}') "
                    f"QUALIFY {FILE_COLUMN} = max({FILE_COLUMN}) OVER (PARTITION BY asset_key, partition_key) "
                    f"AND {TOMBSTONE} IS NOT TRUE"
                )
            for path in view_files(sql_dir):
                try:
                    cat.execute(path.read_text())
                except duckdb.Error as exc:
                    raise type(exc)(f"{path}: {exc}") from exc
            cat.execute(f"CREATE TABLE {CATALOG_TABLE} (metrics_dir VARCHAR, schema_hash VARCHAR, built_at TIMESTAMP)")
            cat.execute(f"INSERT INTO {CATALOG_TABLE} VALUES (?, ?, ?)",
                        [str(metrics_dir), digest, dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)])
            cat.execute("CHECKPOINT")
        os.replace(temp, database)
    finally:
        temp.unlink(missing_ok=True)
        Path(str(temp) + ".wal").unlink(missing_ok=True)
    _atomic_write_text(stamp_path(database), digest + "\n")


def _export_legacy_rows(mem: duckdb.DuckDBPyConnection, database: Path, metrics_dir: Path,
                        tables: dict[str, list[tuple[str, str]]]) -> None:
    try:
        mem.execute(f"ATTACH {_sql_literal(str(database))} AS legacy (READ_ONLY)")
    except duckdb.Error as exc:
        raise type(exc)(f"cannot open the existing metrics database {database} to rebuild its catalog: {exc}") from exc
    try:
        present = base_tables(mem, "legacy")
        if CATALOG_TABLE in present:
            return
        for table in (t for t in present if t in tables):
            legacy_columns = {c for c, in mem.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_catalog = 'legacy' AND table_name = ?",
                [table]).fetchall()}
            shared = ", ".join(f'"{c}"' for c, _ in tables[table] if c in legacy_columns)
            for asset_key, partition_key in mem.execute(
                f'SELECT DISTINCT asset_key, partition_key FROM legacy."{table}"').fetchall():
                if partition_files(metrics_dir, table, asset_key, partition_key):
                    continue  # written since: the newer file wins
                target = partition_dir(metrics_dir, table, asset_key, partition_key) / new_file_name()
                mem.execute(f'DELETE FROM "{table}"')
                mem.execute(f'INSERT INTO "{table}" ({shared}) SELECT {shared} FROM legacy."{table}" '
                            "WHERE asset_key = ? AND partition_key = ?", [asset_key, partition_key])
                os.replace(_copy_to_parquet(mem, f'SELECT * FROM "{table}"', [], target), target)
            mem.execute(f'DELETE FROM "{table}"')
    finally:
        mem.execute("DETACH legacy")


# --------------------------------------------------------------------------- writes

def _as_frame(rows: pd.DataFrame | Sequence[dict]) -> pd.DataFrame:
    return rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))


def write_partition_tables(
    database: str | Path,
    metrics_dir: str | Path | None,
    asset_key: str,
    partition_key: str,
    tables: dict[str, pd.DataFrame | Sequence[dict]],
    run_id: str,
    code_version: str | None,
    sql_dir: Path = SQL_DIR,
) -> dict[str, int]:
    """Replace the rows of one (asset, partition) in each table; returns rows written per table.

    Every table's file is built and checked first; only when all of them are good do they
    replace the previous files, so a refused write changes nothing.
    """
    database = Path(database).resolve()
    metrics_dir = Path(metrics_dir).resolve() if metrics_dir else metrics_dir_for(database)
    ensure_catalog(database, metrics_dir, sql_dir)
    staged: list[tuple[Path, Path]] = []
    written: dict[str, int] = {}
    try:
        with schema_connection(sql_dir) as mem:
            for table, rows in tables.items():
                target = partition_dir(metrics_dir, table, asset_key, partition_key) / new_file_name()
                where = f"partition {partition_key!r} of asset {asset_key!r} in metrics table {table!r}"
                frame = _as_frame(rows)
                known = {c for c, _ in table_columns(mem, table)}
                if not known:
                    raise MetricsWriteError(f"{where}: there is no table {table!r} in sql/schema.sql or "
                                            "sql/tables/*.sql; nothing written, previous rows kept")
                unknown = [c for c in frame.columns if c not in known]
                if unknown:
                    raise MetricsWriteError(f"{where}: column(s) {unknown} are not in table {table!r} "
                                            "(sql/schema.sql, sql/tables/*.sql); nothing written, previous rows kept")
                try:
                    written[table] = replace_partition_rows(mem, table, asset_key, partition_key, frame,
                                                            run_id, code_version)
                except duckdb.Error as exc:
                    raise MetricsWriteError(f"{where}: {type(exc).__name__}: {exc}; nothing written, "
                                            "previous rows kept") from exc
                if written[table]:
                    select = f'SELECT * FROM "{table}" WHERE asset_key = ? AND partition_key = ?'
                    params = [asset_key, partition_key]
                else:  # the tombstone: the newest file of the partition, and no rows in the view
                    select = (f"SELECT ?::VARCHAR AS asset_key, ?::VARCHAR AS partition_key, ?::VARCHAR AS run_id, "
                              f"?::VARCHAR AS code_version, ?::TIMESTAMP AS written_at, true AS {TOMBSTONE}")
                    params = [asset_key, partition_key, run_id, code_version,
                              dt.datetime.now(dt.timezone.utc).replace(tzinfo=None)]
                staged.append((_copy_to_parquet(mem, select, params, target), target))
        for temp, target in staged:
            os.replace(temp, target)
    finally:
        for temp, _ in staged:
            temp.unlink(missing_ok=True)  # gone already once replaced
    return written


def prune_superseded(metrics_dir: str | Path, keep_seconds: float = 3600.0) -> list[Path]:
    """Delete the files of every partition that a newer write superseded over ``keep_seconds`` ago.

    Returns the deleted paths. The views never return rows of a superseded file, but a query
    lists the files when it starts and opens them as it runs: a query running while this
    deletes a file it listed fails (run it again). Run this when no long query is running,
    e.g. from a maintenance job.
    """
    metrics_dir = Path(metrics_dir)
    cutoff_ns = time.time_ns() - int(keep_seconds * 1e9)
    deleted = []
    for folder in sorted(metrics_dir.glob("*/*/*")):
        if not folder.is_dir() or folder.parent.name == SCHEMA_FOLDER:
            continue
        files = sorted(folder.glob("*.parquet"))
        for older, newer in zip(files, files[1:]):
            stamp = newer.name.split("-", 1)[0]
            if not stamp.isdigit():
                raise ValueError(f"{newer}: not a metrics file name (<time_ns>-<pid>-<id>.parquet); "
                                 f"move it out of {folder}")
            superseded_at = int(stamp)
            if superseded_at < cutoff_ns:
                older.unlink()
                deleted.append(older)
    return deleted


# --------------------------------------------------------------------------- the resource

class MetricsStore(ConfigurableResource):
    """Writes metric rows as Parquet files and keeps the DuckDB catalog of views over them.

    ``duckdb.database`` names the catalog file (the ``.duckdb`` users query); the store
    never opens it for writing outside a rebuild into a temporary file. ``metrics_dir``
    holds the Parquet files (default: ``<stem>_metrics/`` beside the catalog); on Slurm or
    Kubernetes both must be on storage every node mounts.
    """

    duckdb: DuckDBResource
    metrics_dir: Optional[str] = Field(
        default=None,
        description="folder of the Parquet files; default <catalog stem>_metrics beside the .duckdb file",
    )

    @property
    def path(self) -> str:
        return self.duckdb.database

    @property
    def parquet_dir(self) -> Path:
        return Path(self.metrics_dir).resolve() if self.metrics_dir else metrics_dir_for(self.path)

    def ensure_catalog(self) -> bool:
        return ensure_catalog(self.path, self.parquet_dir)

    @contextlib.contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection to the (current) catalog: every table and view by name."""
        self.ensure_catalog()
        with duckdb.connect(str(Path(self.path).resolve()), read_only=True) as con:
            yield con

    def write(self, context, tables: dict[str, pd.DataFrame | Sequence[dict]]) -> dict[str, int]:
        """Replace this asset partition's rows in each table; returns rows written per table."""
        asset_key = context.asset_key.to_user_string()
        partition_key = context.partition_key if context.has_partition_key else ""
        code_version = context.assets_def.code_versions_by_key.get(context.asset_key)
        return write_partition_tables(self.path, self.parquet_dir, asset_key, partition_key, tables,
                                      context.run_id, code_version)


# The statements read_only_query runs. EXPLAIN is not among them: EXPLAIN ANALYZE runs the
# statement it explains, a COPY ... TO included.
QUERY_STATEMENTS = (duckdb.StatementType.SELECT,)


def catalog_metrics_dir(con: duckdb.DuckDBPyConnection, catalog: str) -> str | None:
    """The Parquet folder the views of the attached ``catalog`` read (None when it is not a catalog)."""
    found = con.execute("SELECT count(*) FROM information_schema.tables WHERE table_catalog = ? AND table_name = ?",
                        [catalog, CATALOG_TABLE]).fetchone()
    if not found[0]:
        return None
    row = con.execute(f'SELECT metrics_dir FROM "{catalog}".{CATALOG_TABLE} LIMIT 1').fetchone()
    return row[0] if row else None


def sandboxed_connection(database: str | Path) -> duckdb.DuckDBPyConnection:
    """A connection that reads ``database`` (attached read-only, under its file stem, as
    ``duckdb.connect`` names it) and no file but it and, for a catalog, the Parquet files
    under its metrics folder.

    ``allowed_directories`` names the metrics folder, ``enable_external_access=false`` shuts
    every other file (``read_csv('/etc/passwd')``, ``COPY ... TO``, ``ATTACH``, extensions), and
    ``lock_configuration=true`` keeps SQL run on the connection from changing them back. The
    settings belong to a database instance, so the connection is its own in-memory instance
    with the file attached: other connections of the process are not restricted."""
    database = Path(database)
    name = database.stem if database.stem not in ("memory", "system", "temp") else f"{database.stem}_catalog"
    quoted = '"' + name.replace('"', '""') + '"'
    con = duckdb.connect(":memory:")
    try:
        con.execute(f"ATTACH {_sql_literal(str(database))} AS {quoted} (READ_ONLY)")
        con.execute(f"USE {quoted}")
        metrics_dir = catalog_metrics_dir(con, name)
        if metrics_dir:
            con.execute(f"SET allowed_directories = [{_sql_literal(metrics_dir.rstrip('/') + '/')}]")
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
    except BaseException:
        con.close()
        raise
    return con


def read_only_query(database: str | Path, sql: str) -> pd.DataFrame:
    """Run ``sql`` on a :func:`sandboxed_connection` and return the last statement's rows.

    Only SELECT statements run (``DESCRIBE``, ``SHOW``, ``SUMMARIZE``, ``PRAGMA show_tables``
    and ``FROM t`` are SELECTs); any other statement (a write, ``COPY``, ``EXPORT``, ``ATTACH``,
    ``SET``, ``INSTALL``/``LOAD``, ``EXPLAIN``) is refused with ``duckdb.PermissionException``
    before anything runs. Reading a file outside the catalog's metrics folder raises DuckDB's
    own PermissionException."""
    database = Path(database)
    if not database.is_file():
        raise FileNotFoundError(f"no DuckDB database at {database}; run `make demo` (or materialize assets) first")
    for i, statement in enumerate(duckdb.extract_statements(sql), start=1):
        if statement.type not in QUERY_STATEMENTS:
            text = " ".join(statement.query.split())
            raise duckdb.PermissionException(
                f"read-only: only SELECT statements run on the metrics database; statement {i} is "
                f"{statement.type.name} ({text[:80]!r}): refused, nothing was run"
            )
    with sandboxed_connection(database) as con:
        return con.execute(sql).df()
