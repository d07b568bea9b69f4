"""DuckDB metrics store: schema from sql/, idempotent per asset+partition, read-only queries."""

import duckdb
import pandas as pd
import pytest

from mihd_resources.metrics_store import apply_schema, read_only_query, replace_partition_rows


def _qc_row(slide, n):
    return {"slide_id": slide, "n_spots": n, "n_genes": 10}


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "m.duckdb"
    with duckdb.connect(str(path)) as con:
        apply_schema(con)
    return path


def test_replace_is_idempotent_and_partition_scoped(db):
    with duckdb.connect(str(db)) as con:
        for _ in range(3):
            replace_partition_rows(con, "slide_qc", "slides/slide_qc_metrics", "a", pd.DataFrame([_qc_row("a", 5)]), "run1", "1")
        replace_partition_rows(con, "slide_qc", "slides/slide_qc_metrics", "b", pd.DataFrame([_qc_row("b", 7)]), "run2", "1")
        replace_partition_rows(con, "slide_qc", "slides/slide_qc_metrics", "a", pd.DataFrame([_qc_row("a", 6)]), "run3", "2")
        rows = con.execute("SELECT partition_key, n_spots, run_id, code_version FROM slide_qc ORDER BY 1").fetchall()
    assert rows == [("a", 6, "run3", "2"), ("b", 7, "run2", "1")]


def test_failed_write_keeps_previous_rows(db):
    with duckdb.connect(str(db)) as con:
        replace_partition_rows(con, "slide_qc", "k", "a", pd.DataFrame([_qc_row("a", 5)]), "run1", "1")
        bad = pd.DataFrame([{"slide_id": None, "n_spots": 9}])  # slide_id is NOT NULL
        with pytest.raises(duckdb.ConstraintException):
            replace_partition_rows(con, "slide_qc", "k", "a", bad, "run2", "1")
        assert con.execute("SELECT n_spots, run_id FROM slide_qc").fetchall() == [(5, "run1")]


def test_unknown_column_or_table_is_an_error(db):
    with duckdb.connect(str(db)) as con:
        with pytest.raises(KeyError, match=r"columns \['bogus'\] are not in DuckDB table 'slide_qc'"):
            replace_partition_rows(con, "slide_qc", "k", "a", pd.DataFrame([{"slide_id": "a", "bogus": 1}]), "r", "1")
        with pytest.raises(KeyError, match="does not exist"):
            replace_partition_rows(con, "nope", "k", "a", pd.DataFrame([{"x": 1}]), "r", "1")


def test_views_exist_and_read_only_query_refuses_writes(db):
    with duckdb.connect(str(db)) as con:
        replace_partition_rows(con, "slide_qc", "k", "a", pd.DataFrame([_qc_row("a", 5)]), "r", "1")
    frame = read_only_query(db, "SELECT slide_id, n_spots FROM slide_qc_latest")
    assert frame.to_dict("records") == [{"slide_id": "a", "n_spots": 5}]
    with pytest.raises(duckdb.Error, match="read-only"):
        read_only_query(db, "DELETE FROM slide_qc")


def test_missing_database_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no DuckDB database"):
        read_only_query(tmp_path / "absent.duckdb", "SELECT 1")
