"""`mihd sql` runs SELECTs over the metrics catalog and reads no file but the catalog's own Parquet folder."""

from __future__ import annotations

from pathlib import Path

import duckdb
import pytest

from mihd_resources import metrics_store as ms
from tests.conftest import run_cli

ASSET = "slides/slide_qc"


@pytest.fixture
def catalog(tmp_path) -> Path:
    database = tmp_path / "home" / "mihd.duckdb"
    ms.write_partition_tables(database, None, ASSET, "slide_0", {"slide_qc": [{"slide_id": "s0", "n_genes": 7}]}, "r1", "1")
    return database


def _sql(database: Path, query: str, tmp_path: Path):
    return run_cli(["sql", "--db", str(database), "--csv", query],
                   {"MIHD_HOME": str(tmp_path / "home"), "DAGSTER_HOME": str(tmp_path / "home" / "dagster")}, timeout=300)


def test_a_select_on_a_view_over_parquet_works(catalog, tmp_path):
    done = _sql(catalog, "SELECT partition_key, n_genes FROM slide_qc", tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["partition_key,n_genes", "slide_0,7"]
    # views defined in sql/views/ over those views work too
    done = _sql(catalog, "SELECT count(*) AS n FROM slide_qc_latest", tmp_path)
    assert done.returncode == 0, done.stderr


def test_copy_to_a_file_is_refused_and_writes_nothing(catalog, tmp_path):
    target = tmp_path / "x.csv"
    inside = ms.metrics_dir_for(catalog) / "x.csv"  # even into the folder the views may read
    for path in (target, inside):
        done = _sql(catalog, f"COPY (SELECT 42) TO '{path}'", tmp_path)
        assert done.returncode == 1
        assert "mihd sql: refused" in done.stderr and "statement 1 is COPY" in done.stderr, done.stderr
        assert not path.exists()
    # hidden behind a SELECT, or inside EXPLAIN ANALYZE (which runs what it explains)
    for query in (f"SELECT 1; COPY (SELECT 42) TO '{target}'", f"EXPLAIN ANALYZE COPY (SELECT 42) TO '{inside}'"):
        done = _sql(catalog, query, tmp_path)
        assert done.returncode == 1 and "mihd sql: refused" in done.stderr, done.stderr
        assert not target.exists() and not inside.exists()


def test_reading_a_file_outside_the_metrics_folder_is_refused(catalog, tmp_path):
    done = _sql(catalog, "SELECT * FROM read_csv('/etc/passwd')", tmp_path)
    assert done.returncode == 1 and "root:" not in done.stdout
    assert "mihd sql: refused" in done.stderr and 'Cannot access file "/etc/passwd"' in done.stderr, done.stderr
    assert "reads only the metrics database and its Parquet folder" in done.stderr
    for query in ("SELECT * FROM read_text('/etc/passwd')", f"SELECT * FROM glob('{tmp_path}/*')",
                  f"SELECT * FROM read_parquet('{tmp_path}/**/*.parquet')"):
        with pytest.raises(duckdb.PermissionException, match="file system operations are disabled"):
            ms.read_only_query(catalog, query)


def test_set_enable_external_access_is_refused(catalog, tmp_path):
    done = _sql(catalog, "SET enable_external_access = true", tmp_path)
    assert done.returncode == 1
    assert "mihd sql: refused" in done.stderr and "statement 1 is SET" in done.stderr, done.stderr


@pytest.mark.parametrize("statement", [
    "RESET enable_external_access",
    "SET allowed_directories = ['/']",
    "SET lock_configuration = false",
    "ATTACH '{tmp}/other.duckdb'",
    "INSTALL httpfs",
    "DELETE FROM slide_qc",
    "EXPORT DATABASE '{tmp}/exported'",
    "SELECT 1; CREATE TEMP TABLE t AS SELECT 1",
])
def test_statements_that_are_not_queries_are_refused(catalog, statement, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(duckdb.PermissionException, match="read-only: only SELECT statements run"):
        ms.read_only_query(catalog, statement.format(tmp=out))
    assert list(out.iterdir()) == []


def test_the_sandbox_settings_are_locked(catalog):
    """Even a statement that reached the connection could not turn file access back on."""
    with ms.sandboxed_connection(catalog) as con:
        for setting in ("SET enable_external_access = true", "SET allowed_directories = ['/']",
                        "SET lock_configuration = false"):
            with pytest.raises(duckdb.Error, match="the configuration has been locked"):
                con.execute(setting)
        assert con.execute("SELECT current_setting('enable_external_access')").fetchone() == (False,)
        assert con.execute("SELECT n_genes FROM slide_qc").fetchall() == [(7,)]


def test_the_sandbox_leaves_other_connections_of_the_process_alone(catalog):
    """The settings belong to a database instance: the sandbox is its own, the catalog attached."""
    with duckdb.connect(str(catalog), read_only=True) as held:
        for _ in range(2):
            assert ms.read_only_query(catalog, "SELECT n_genes FROM slide_qc")["n_genes"].tolist() == [7]
        assert held.execute("SELECT current_setting('enable_external_access')").fetchone() == (True,)
        assert held.execute("SELECT n_genes FROM slide_qc").fetchall() == [(7,)]
