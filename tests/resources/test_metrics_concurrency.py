"""Many writers at once: Parquet files per asset partition, a DuckDB catalog of views.

Real DuckDB, real processes ('spawn'): four writers re-write their own partitions while a
reader queries the catalog the whole time; refused writes keep the previous rows; files
follow the umask.
"""

import json
import multiprocessing as mp
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

import duckdb
import pandas as pd
import pytest
from dagster import AssetKey, Config, StaticPartitionsDefinition, asset, build_asset_context
from dagster_duckdb import DuckDBResource

from mihd_resources import MetricsStore
from mihd_resources import metrics_store as ms

PARTITIONS = [f"slide_{i}" for i in range(4)]
ASSET = "tests/qc_metrics"
WRITES = 30


class QcRows(Config):
    n_rows: int
    write_no: int
    extra_column: bool = False


@asset(key=AssetKey(["tests", "qc_metrics"]), partitions_def=StaticPartitionsDefinition(PARTITIONS),
       code_version="7")
def qc_metrics(context, config: QcRows, metrics: MetricsStore) -> dict:
    """slide_qc rows (n_genes = the write's number) and one slide_image_checks row per row."""
    slide = context.partition_key
    qc = [{"slide_id": slide, "n_spots": i, "n_genes": config.write_no} for i in range(config.n_rows)]
    if config.extra_column:
        qc = [{**row, "bogus_column": 1} for row in qc]
    images = [{"slide_id": slide, "image": f"img{i}", "passed": True, "frac_on_tissue": 0.5}
              for i in range(config.n_rows)]
    return metrics.write(context, {"slide_qc": qc, "slide_image_checks": images})


@asset(key=AssetKey(["tests", "summary"]))
def summary(context, metrics: MetricsStore) -> dict:
    """Unpartitioned: its partition key is ''."""
    return metrics.write(context, {"preprocessing_runs": [
        {"slide_id": "all", "preset": "p", "steps": "a -> b", "override": False}]})


def _store(database: Path) -> MetricsStore:
    return MetricsStore(duckdb=DuckDBResource(database=str(database)))


def _write(store: MetricsStore, partition: str, n_rows: int, write_no: int, extra_column: bool = False) -> dict:
    with build_asset_context(partition_key=partition, resources={"metrics": store}) as context:
        return qc_metrics(context, QcRows(n_rows=n_rows, write_no=write_no, extra_column=extra_column))


def _rows_for(write_no: int) -> int:
    return write_no % 4 + 1  # 1..4 rows: every re-write changes the partition's row count


def _writer(database: str, partition: str, results) -> None:
    try:
        store = _store(Path(database))
        for write_no in range(WRITES):
            got = _write(store, partition, _rows_for(write_no), write_no)
            assert got == {"slide_qc": _rows_for(write_no), "slide_image_checks": _rows_for(write_no)}, got
        results.put(("writer", partition, None))
    except BaseException:
        results.put(("writer", partition, traceback.format_exc()))


def _check_snapshot(rows: list[tuple]) -> None:
    """Each partition shows one whole write: every row has that write's number, and as many rows."""
    by_partition: dict[str, set] = {}
    counts: dict[str, int] = {}
    for partition_key, write_no in rows:
        by_partition.setdefault(partition_key, set()).add(write_no)
        counts[partition_key] = counts.get(partition_key, 0) + 1
    for partition_key, writes in by_partition.items():
        assert len(writes) == 1, f"{partition_key}: rows of writes {sorted(writes)} mixed"
        assert counts[partition_key] == _rows_for(writes.pop()), f"{partition_key}: {counts[partition_key]} rows"


def _reader(database: str, stop, results) -> None:
    try:
        reads = 0
        while not Path(database).is_file():
            time.sleep(0.01)
        held = duckdb.connect(database, read_only=True)  # kept open across catalog rebuilds
        while not stop.is_set():
            frame = ms.read_only_query(database, "SELECT partition_key, n_genes FROM slide_qc")
            _check_snapshot(list(frame.itertuples(index=False, name=None)))
            with duckdb.connect(database, read_only=True) as con:
                _check_snapshot(con.execute("SELECT partition_key, n_genes FROM slide_qc").fetchall())
                con.execute("SELECT count(*) FROM slide_qc_latest").fetchone()
            held.execute("SELECT count(*) FROM slide_image_checks").fetchone()
            reads += 1
        held.close()
        results.put(("reader", reads, None))
    except BaseException:
        results.put(("reader", -1, traceback.format_exc()))


def test_four_writers_and_a_reader_at_once(tmp_path):
    database = tmp_path / "mihd.duckdb"
    ctx = mp.get_context("spawn")
    results, stop = ctx.Queue(), ctx.Event()
    writers = [ctx.Process(target=_writer, args=(str(database), p, results)) for p in PARTITIONS]
    reader = ctx.Process(target=_reader, args=(str(database), stop, results))
    for proc in (reader, *writers):
        proc.start()
    # Force catalog rebuilds while everyone works: a missing stamp makes the next writer
    # rebuild (under the lock) and replace the catalog the reader is reading.
    rebuilds_forced = 0
    deadline = time.monotonic() + 300
    while any(w.is_alive() for w in writers) and time.monotonic() < deadline:
        time.sleep(0.5)
        if ms.stamp_path(database).exists() and rebuilds_forced < 3:
            ms.stamp_path(database).unlink(missing_ok=True)
            rebuilds_forced += 1
    for w in writers:
        w.join(timeout=max(1, deadline - time.monotonic()))
    stop.set()
    reader.join(timeout=60)
    outcomes = [results.get(timeout=10) for _ in range(5)]
    errors = [f"{kind} {who}:\n{err}" for kind, who, err in outcomes if err]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in (reader, *writers))
    assert [who for kind, who, _ in outcomes if kind == "reader"][0] > 0, "the reader never read"

    last = _rows_for(WRITES - 1)
    with duckdb.connect(str(database), read_only=True) as con:
        counts = con.execute("SELECT partition_key, count(*), min(n_genes), max(n_genes), count(DISTINCT run_id) "
                             "FROM slide_qc GROUP BY 1 ORDER BY 1").fetchall()
        images = con.execute("SELECT count(*), count(DISTINCT (partition_key, image)) FROM slide_image_checks").fetchone()
        meta = con.execute("SELECT DISTINCT asset_key, code_version FROM slide_qc").fetchall()
    assert counts == [(p, last, WRITES - 1, WRITES - 1, 1) for p in PARTITIONS]
    assert images == (4 * last, 4 * last)  # no lost row, no duplicate
    assert meta == [(ASSET, "7")]
    files = sorted(p.relative_to(tmp_path) for p in (tmp_path / "mihd_metrics").rglob("*") if p.is_file())
    assert not [f for f in files if f.name.endswith(".tmp")], files  # no temp file left behind
    for p in PARTITIONS:  # one immutable file per write; the view reads the newest
        assert len(ms.partition_files(tmp_path / "mihd_metrics", "slide_qc", ASSET, p)) == WRITES
    assert len(list((tmp_path / "mihd_metrics" / "slide_qc" / ms.SCHEMA_FOLDER).rglob("*.parquet"))) == 1


def test_unknown_column_is_refused_and_previous_rows_stay(tmp_path):
    database = tmp_path / "m.duckdb"
    store = _store(database)
    _write(store, "slide_0", 2, 1)
    before = ms.partition_files(store.parquet_dir, "slide_qc", ASSET, "slide_0")
    assert len(before) == 1
    with pytest.raises(ms.MetricsWriteError, match=r"table 'slide_qc'.*\['bogus_column'\]") as err:
        _write(store, "slide_0", 3, 2, extra_column=True)
    assert "partition 'slide_0'" in str(err.value) and ASSET in str(err.value)
    assert ms.partition_files(store.parquet_dir, "slide_qc", ASSET, "slide_0") == before
    assert len(ms.partition_files(store.parquet_dir, "slide_image_checks", ASSET, "slide_0")) == 1
    # the other table of the refused write was not replaced either
    assert ms.read_only_query(database, "SELECT count(*) AS n FROM slide_image_checks")["n"].tolist() == [2]
    assert ms.read_only_query(database, "SELECT n_genes FROM slide_qc")["n_genes"].tolist() == [1, 1]
    with pytest.raises(ms.MetricsWriteError, match="NOT NULL.*previous rows kept"):
        ms.write_partition_tables(database, None, ASSET, "slide_0", {"slide_qc": [{"n_spots": 1}]}, "r", "7")
    with pytest.raises(ms.MetricsWriteError, match="no table 'nope'"):
        ms.write_partition_tables(database, None, ASSET, "slide_0", {"nope": [{"x": 1}]}, "r", "7")
    assert ms.partition_files(store.parquet_dir, "slide_qc", ASSET, "slide_0") == before
    assert not list(store.parquet_dir.rglob("*.tmp"))


def test_rewrite_replaces_empty_write_empties_and_files_follow_the_umask(tmp_path):
    database = tmp_path / "cat" / "m.duckdb"
    store = _store(database)
    old_umask = os.umask(0o002)
    try:
        _write(store, "slide_0", 3, 1)
        _write(store, "slide_1", 2, 1)
        _write(store, "slide_0", 1, 2)
        with build_asset_context(resources={"metrics": store}) as context:
            assert summary(context) == {"preprocessing_runs": 1}
    finally:
        os.umask(old_umask)
    rows = ms.read_only_query(database, "SELECT partition_key, n_genes FROM slide_qc ORDER BY 1, 2")
    assert rows.values.tolist() == [["slide_0", 2], ["slide_1", 1], ["slide_1", 1]]
    assert ms.read_only_query(database, "SELECT partition_key, asset_key FROM preprocessing_runs").values.tolist() == [
        ["", "tests/summary"]]
    written = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert ms.partition_files(store.parquet_dir, "preprocessing_runs", "tests/summary", "")[0] in written
    for path in written:
        mode = path.stat().st_mode & 0o777
        assert mode == 0o664, f"{path}: {oct(mode)}"
    for path in (p for p in tmp_path.rglob("*") if p.is_dir()):
        assert path.stat().st_mode & 0o070 == 0o070, path

    # An empty write replaces the partition's rows by none; the other partition keeps its rows.
    ms.write_partition_tables(database, None, ASSET, "slide_1", {"slide_qc": []}, "r9", "7")
    assert ms.read_only_query(database, "SELECT partition_key FROM slide_qc").values.tolist() == [["slide_0"]]
    assert ms.read_only_query(database, "SELECT count(*) FROM slide_image_checks").iloc[0, 0] == 3
    # ... and a later write fills it again
    ms.write_partition_tables(database, None, ASSET, "slide_1", {"slide_qc": [{"slide_id": "s1", "n_genes": 5}]},
                              "r10", "7")
    assert ms.read_only_query(database, "SELECT partition_key, n_genes FROM slide_qc ORDER BY 1").values.tolist() == [
        ["slide_0", 2], ["slide_1", 5]]


def test_prune_superseded_keeps_the_current_rows(tmp_path):
    database = tmp_path / "m.duckdb"
    store = _store(database)
    for write_no in range(3):
        _write(store, "slide_0", 2, write_no)
    _write(store, "slide_1", 1, 0)
    files = ms.partition_files(store.parquet_dir, "slide_qc", ASSET, "slide_0")
    assert len(files) == 3
    assert ms.prune_superseded(store.parquet_dir, keep_seconds=3600) == []
    deleted = ms.prune_superseded(store.parquet_dir, keep_seconds=0)
    assert set(files[:2]) <= set(deleted) and files[2] not in deleted
    assert ms.partition_files(store.parquet_dir, "slide_qc", ASSET, "slide_0") == files[2:]
    rows = ms.read_only_query(database, "SELECT partition_key, n_genes FROM slide_qc ORDER BY 1, 2")
    assert rows.values.tolist() == [["slide_0", 2], ["slide_0", 2], ["slide_1", 0]]


def test_catalog_names_every_table_and_view_and_opens_read_only_elsewhere(tmp_path):
    database = tmp_path / "m.duckdb"
    with ms.schema_connection() as mem:
        tables = set(ms.base_tables(mem))
    views = set()
    for path in ms.view_files():
        views |= {line.split()[4] for line in path.read_text().splitlines()
                  if line.upper().startswith("CREATE OR REPLACE VIEW")}
    assert ms.ensure_catalog(database) is True and ms.ensure_catalog(database) is False
    # Another process opens it read-only (absolute parquet globs). A plain subprocess with a
    # timeout: a multiprocessing pool waits forever when its worker dies.
    code = ("import duckdb, json, sys; con = duckdb.connect(sys.argv[1], read_only=True); "
            "print(json.dumps([r[0] for r in con.execute('SELECT table_name FROM information_schema.tables').fetchall()]))")
    out = subprocess.run([sys.executable, "-c", code, str(database)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    names = set(json.loads(out.stdout))
    assert tables | views <= names
    assert {"clustering_metrics", "slide_qc", "method_leaderboard", "slide_qc_latest"} <= names
    with duckdb.connect(str(database), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM clustering_metrics").fetchone() == (0,)
        for name in sorted(tables | views):
            con.execute(f'SELECT * FROM "{name}" LIMIT 1').fetchall()
        with pytest.raises(duckdb.Error, match="read-only"):
            con.execute("CREATE TABLE x (a INTEGER)")
    # Every query under sql/queries runs on the empty catalog.
    for path in sorted((ms.SQL_DIR / "queries").glob("*.sql")):
        ms.read_only_query(database, path.read_text())


def test_schema_change_rebuilds_the_catalog_and_old_files_stay_readable(tmp_path):
    import shutil

    sql_dir = tmp_path / "sql"
    shutil.copytree(ms.SQL_DIR, sql_dir)
    database = tmp_path / "m.duckdb"
    ms.write_partition_tables(database, None, ASSET, "a", {"slide_qc": [{"slide_id": "a", "n_spots": 1}]}, "r1", "1",
                              sql_dir=sql_dir)
    with (sql_dir / "schema.sql").open("a") as f:
        f.write("\nALTER TABLE slide_qc ADD COLUMN IF NOT EXISTS new_metric DOUBLE;\n")
    assert not ms.catalog_is_current(database, ms.metrics_dir_for(database), sql_dir)
    ms.write_partition_tables(database, None, ASSET, "b",
                              {"slide_qc": [{"slide_id": "b", "n_spots": 2, "new_metric": 0.5}]}, "r2", "1",
                              sql_dir=sql_dir)
    rows = ms.read_only_query(database, "SELECT partition_key, new_metric FROM slide_qc ORDER BY 1")
    assert rows["partition_key"].tolist() == ["a", "b"]
    assert pd.isna(rows["new_metric"][0]) and rows["new_metric"][1] == 0.5


def test_a_single_file_database_is_exported_when_its_catalog_is_built(tmp_path):
    database = tmp_path / "m.duckdb"
    with duckdb.connect(str(database)) as con:
        ms.apply_schema(con)
        ms.replace_partition_rows(con, "slide_qc", ASSET, "old", pd.DataFrame([{"slide_id": "old", "n_spots": 4}]),
                                  "r0", "1")
    _write(_store(database), "slide_0", 1, 1)
    rows = ms.read_only_query(database, "SELECT partition_key, n_spots, run_id FROM slide_qc ORDER BY 1")
    assert rows.values.tolist() == [["old", 4, "r0"], ["slide_0", 0, "EPHEMERAL"]]  # direct invocation's run id
    assert len(ms.partition_files(ms.metrics_dir_for(database), "slide_qc", ASSET, "old")) == 1
    with duckdb.connect(str(database), read_only=True) as con:  # now a catalog: views, no tables of rows
        assert ms.base_tables(con) == [ms.CATALOG_TABLE]


def test_names_are_reversible_and_safe():
    for value in ["", "slides/slide_qc_metrics", "_schema", ".hidden", "a|b", "151673", "x=y", "%41", "..", "é"]:
        name = ms.encode_name(value)
        assert "/" not in name and "=" not in name and not name.startswith(".") and name not in ("", ".", "..")
        assert name == "_" or not name.startswith("_")
        assert ms.decode_name(name) == value
    assert ms.encode_name("k" * 300).startswith("_h")


def test_weekly_prune_job_deletes_superseded_files_and_keeps_current_rows(tmp_path):
    from dagster_project.maintenance import metrics_prune_job, metrics_prune_schedule

    database = tmp_path / "m.duckdb"
    store = _store(database)
    for write_no in range(3):
        _write(store, "slide_0", 2, write_no)
    files = ms.partition_files(store.parquet_dir, "slide_qc", ASSET, "slide_0")
    run_config = {"ops": {"prune_superseded_metric_files": {"config": {"keep_hours": 0}}}}
    result = metrics_prune_job.execute_in_process(run_config=run_config, resources={"metrics": store})
    assert result.success
    # two superseded slide_qc files and their slide_image_checks twins
    assert result.output_for_node("prune_superseded_metric_files") == 4
    assert ms.partition_files(store.parquet_dir, "slide_qc", ASSET, "slide_0") == files[2:]
    assert ms.read_only_query(database, "SELECT count(*) FROM slide_qc").iloc[0, 0] == 2
    assert metrics_prune_schedule.job_name == metrics_prune_job.name
    bad = {"ops": {"prune_superseded_metric_files": {"config": {"keep_hours": -1}}}}
    assert not metrics_prune_job.execute_in_process(run_config=bad, resources={"metrics": store},
                                                    raise_on_error=False).success
