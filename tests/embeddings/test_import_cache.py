"""The one-off import of the lab's old embedding cache: alignment, bad files, and the
materializations it reports (downstream uses the imported values instead of recomputing)."""

import re
import shutil

import duckdb
import numpy as np
import pytest
from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from mihd_assets.embeddings.import_cache import CacheEntry, load_entry, scan_cache
from mihd_assets.embeddings.store import SpotEmbedding
from tests.conftest import run_cli

VARIANTS = ("standard", "freq", "staig_strict")
SPOTS = ["AAAC-1", "AAAG-1", "AACT-1", "AAGG-1"]


def _entry(path, modality="gene", encoder="pca", variant=""):
    return CacheEntry("s1", path, modality, encoder, variant)


def test_scan_parses_names_and_lists_the_rest(tmp_path):
    slide = tmp_path / "151673"
    slide.mkdir()
    for name in ("gene_pca.npz", "vision_uni2_staig_strict.npy", "vision_resnet50.npz", "notes.txt", "clusters.npz"):
        (slide / name).write_bytes(b"")
    (tmp_path / "stray.npy").write_bytes(b"")
    scan = scan_cache(tmp_path, VARIANTS)
    assert {(e.modality, e.encoder, e.variant) for e in scan.entries} == {
        ("gene", "pca", ""), ("vision", "uni2", "staig_strict"), ("vision", "resnet50", "standard")
    }
    assert {p.name for p, _ in scan.unrecognised} == {"notes.txt", "clusters.npz", "stray.npy"}


def test_barcodes_reorder_rows_to_the_slide(tmp_path):
    values = np.arange(12, dtype=np.float64).reshape(4, 3)
    order = [2, 0, 3, 1]
    np.savez(tmp_path / "gene_pca.npz", embeddings=values[order], barcodes=np.asarray(SPOTS)[order])
    emb, info = load_entry(_entry(tmp_path / "gene_pca.npz"), SPOTS)
    np.testing.assert_array_equal(emb.values, values.astype(np.float32))
    assert info["alignment"] == "by barcode" and info["source"] == "imported"
    assert info["weights"].startswith("unknown")


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"embeddings": np.ones((3, 2))}, "3 rows but the slide has 4 spots"),
        ({"embeddings": np.full((4, 2), np.nan)}, "4 of 4 rows have NaN/inf"),
        ({"embeddings": np.ones((4, 0))}, "shape (4, 0)"),
        ({"a": np.ones((4, 2)), "b": np.ones((4, 2))}, "2 candidates"),
        ({"embeddings": np.ones((4, 2)), "barcodes": np.asarray(["x", "y", "z", "w"])}, "4 of the slide's 4 spots are not in the cache"),
    ],
)
def test_bad_cache_files_are_refused_naming_file_and_slide(tmp_path, arrays, message):
    np.savez(tmp_path / "gene_pca.npz", **arrays)
    with pytest.raises(ValueError) as err:
        load_entry(_entry(tmp_path / "gene_pca.npz"), SPOTS)
    assert message in str(err.value) and "gene_pca.npz" in str(err.value) and "slide s1" in str(err.value)


def test_import_command_reports_materializations_that_downstream_reuses(materialized_home, tmp_path):
    home = tmp_path / "home"
    shutil.copytree(materialized_home["MIHD_HOME"], home)
    env = {**materialized_home, "MIHD_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home")}
    stored = SpotEmbedding.load(home / "storage" / "embeddings" / "gene_pca" / "demo_01.npz")
    n = len(stored.obs_names)
    old = np.random.default_rng(0).normal(size=(n, 7))
    perm = np.random.default_rng(1).permutation(n)
    cache = tmp_path / "embeddings_cache"
    (cache / "demo_01").mkdir(parents=True)
    np.savez(cache / "demo_01" / "gene_pca.npz", embeddings=old[perm], barcodes=np.asarray(stored.obs_names)[perm])
    np.save(cache / "demo_01" / "vision_resnet50_freq.npy", old[:, :5])
    np.save(cache / "demo_01" / "vision_resnet50_standard.npy", old[:-1])  # one row short: refused
    np.save(cache / "demo_01" / "vision_vgg16.npy", old)  # not in the benchmark matrix: skipped

    result = run_cli(["import-embeddings", str(cache)], env)
    assert result.returncode == 1, result.stdout + result.stderr  # the short file failed
    assert "2 embedding(s) imported, 1 failed" in result.stdout
    assert "vision_resnet50_standard.npy" in result.stderr and f"{n - 1} rows but the slide has {n} spots" in result.stderr
    assert "no asset vision_vgg16" in result.stdout

    imported = SpotEmbedding.load(home / "storage" / "embeddings" / "gene_pca" / "demo_01.npz")
    np.testing.assert_allclose(imported.values, old.astype(np.float32))
    instance = DagsterInstance.from_config(str(home / "dagster_home"))
    record = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=AssetKey(["embeddings", "gene_pca"]), asset_partitions=["demo_01"]), limit=1,
        ascending=False,
    ).records[0]
    assert record.asset_materialization.tags["mihd/imported"] == "true"
    assert record.asset_materialization.metadata["source_file"].value.endswith("gene_pca.npz")

    plan = run_cli(["materialize", "--only", "embeddings", "--partition", "demo_01", "--dry-run"], env)
    assert plan.returncode == 0, plan.stdout + plan.stderr
    # Of the embeddings group only the two DuckDB writers run again, each for its own imported
    # embedding; the imported embeddings are not recomputed (fusions and clusterings downstream
    # of them are, as they should be).
    assert "materializing 2 asset(s):" in plan.stdout, plan.stdout
    assert re.search(r"\n    embeddings/embedding_runs_metrics \(embeddings/gene_pca\[demo_01\] has a new data version",
                     plan.stdout), plan.stdout
    assert re.search(r"\n    embeddings/vision_embedding_runs_metrics \(embeddings/vision_resnet50_freq\[demo_01\] has a "
                     r"new data version", plan.stdout), plan.stdout
    assert "embeddings/gene_pca (" not in plan.stdout and "embeddings/vision_resnet50_freq (" not in plan.stdout
    done = run_cli(["materialize", "--only", "embeddings", "--partition", "demo_01"], env)
    assert done.returncode == 0, done.stdout + done.stderr
    with duckdb.connect(str(home / "mihd.duckdb"), read_only=True) as con:
        rows = con.execute(
            "SELECT dims, weights FROM embedding_runs WHERE slide_id = 'demo_01' AND encoder = 'pca'"
        ).fetchall()
    assert rows == [(7, "unknown (imported from old cache)")]
