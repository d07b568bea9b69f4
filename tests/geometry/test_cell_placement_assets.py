"""Cell placement through Dagster on tiny data: partitions from the sensor, one layout per dataset
with lineage to its checkpoint, the score on hidden positions in DuckDB, and each bad input
failing its own partition with a message naming the dataset."""

import argparse
import shutil
from dataclasses import replace

import anndata as ad
import duckdb
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
from dagster import AssetKey, DagsterInstance, build_sensor_context, materialize
from dagster_duckdb import DuckDBResource

from dagster_project.definitions import defs
from mihd_assets.fileio import file_sha256
from mihd_assets.geometry import assets as geo
from mihd_assets.geometry import config as geo_config
from mihd_assets.geometry.cell_datasets import (
    CELL_DATASET_FILES,
    OBSERVE_CELLS_JOB_NAME,
    cell_dataset_discovery_sensor,
    datasets_changed,
)
from mihd_assets.geometry.cells import CellSplit, cells_from_slide, write_cells
from mihd_assets.geometry.placement_assets import (
    BEATS_BASELINES_2X,
    CELL_EVALUATION_KEY,
    CELL_PLACEMENT_KEY,
    PLACEMENT_ASSETS,
)
from mihd_assets.geometry.train import read_checkpoint, save_checkpoint
from mihd_assets.slides.assets import raw_slide
from mihd_assets.slides.io import read_slide
from mihd_resources import AnnDataIOManager, ComputeResource, MetricsStore, StorageResource
from mihd_resources.compute import DEVICE_CHECK
from mihd_resources.geometry_store import CHECKPOINT, TRAINING_SET, GeometryStore
from mihd_resources.orchestration import step_errors
from mihd_resources.step_executor import StepExecutor

SLIDES = ["demo_01", "demo_02", "demo_03"]
MICRO = replace(geo_config.SIZES["tiny"], width=32, inducing=8, context_blocks=1, generator_blocks=1,
                denoiser_blocks=1, set_size_min=24, set_size_max=40, n_sets_train=64, n_sets_heldout=4,
                train=replace(geo_config.SIZES["tiny"].train, steps=30, batch_size=8, warmup_steps=5,
                              checkpoint_every=10, log_every=10))
GEOMETRY_ASSETS = [geo.geometry_training_set, geo.geometry_checkpoint]
SET_SIZE = MICRO.set_size_max


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """Three tiny demo slides, a 30-step checkpoint, and the cells of held-out demo_03 as a dataset."""
    from mihd_assets.demo.visium import generate_demo_slides, tiny_spec

    root = tmp_path_factory.mktemp("cells_home")
    generate_demo_slides(root / "slides", n_slides=3, spec=tiny_spec())
    cells_root = root / "cells"
    cells_root.mkdir()
    patch = pytest.MonkeyPatch()
    patch.setitem(geo_config.SIZES, "tiny", MICRO)
    patch.setenv("MIHD_PROFILE", "demo")
    patch.setenv("MIHD_CELLS_ROOT", str(cells_root))
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", SLIDES)
    resources = {
        "storage": StorageResource(slides_root=str(root / "slides")),
        "anndata_io_manager": AnnDataIOManager(base_dir=str(root / "storage")),
        "metrics": MetricsStore(duckdb=DuckDBResource(database=str(root / "mihd.duckdb"))),
        "compute": ComputeResource(device="cpu", batch_size=16, torch_threads=1),
        "step_executor": StepExecutor(),
        "store": GeometryStore(base_dir=str(root / "storage")),
    }
    for slide in SLIDES:
        assert materialize([raw_slide], partition_key=slide, resources=resources, instance=instance).success
    assert materialize([raw_slide, *GEOMETRY_ASSETS], selection=[a.key for a in GEOMETRY_ASSETS], resources=resources,
                       instance=instance).success
    cells = cells_from_slide(read_slide(root / "slides" / "demo_03", "demo_03"), "demo_03", CellSplit(2, seed=0))
    write_cells(cells, cells_root / "cells03.h5ad")
    yield root, instance, resources, cells
    patch.undo()


def place(home, dataset, *, evaluate=False, resources=None, config=None):
    root, instance, base, _ = home
    if dataset not in instance.get_dynamic_partitions("cell_datasets"):
        instance.add_dynamic_partitions("cell_datasets", [dataset])
    keys = [CELL_PLACEMENT_KEY] + ([CELL_EVALUATION_KEY] if evaluate else [])
    run_config = {"ops": {"geometry__cell_placement": {"config": config}}} if config else None
    return materialize(PLACEMENT_ASSETS, selection=keys, partition_key=dataset, resources=resources or base,
                       instance=instance, raise_on_error=False, run_config=run_config)


def placed(home, dataset):
    return ad.read_h5ad(home[0] / "storage" / "geometry" / "cell_placement" / f"{dataset}.h5ad")


def test_the_lineage_and_the_jobs():
    graph = defs.resolve_asset_graph()
    node = graph.get(CELL_PLACEMENT_KEY)
    assert node.parent_keys == {geo.CHECKPOINT_KEY, geo.TRAINING_SET_KEY, CELL_DATASET_FILES}
    assert node.pools == {"gpu"} and node.partitions_def.name == "cell_datasets"
    assert graph.get(CELL_EVALUATION_KEY).parent_keys == {CELL_PLACEMENT_KEY, CELL_DATASET_FILES}
    assert graph.get(CELL_DATASET_FILES).is_observable
    job = defs.resolve_job_def("cell_placement_job")
    assert set(job.asset_layer.executable_asset_keys) == {CELL_PLACEMENT_KEY, CELL_EVALUATION_KEY}
    # The unpartitioned geometry job keeps its four assets.
    assert set(defs.resolve_job_def("geometry_job").asset_layer.executable_asset_keys) == {
        geo.TRAINING_SET_KEY, geo.CHECKPOINT_KEY, geo.EVALUATION_KEY, geo.METRICS_KEY}


def test_sensor_registers_valid_datasets_refuses_others_and_observes_changes(tmp_path, monkeypatch, home):
    cells = home[3]
    monkeypatch.setenv("MIHD_CELLS_ROOT", str(tmp_path))
    write_cells(cells, tmp_path / "good.h5ad")
    write_cells(cells, tmp_path / "bad name.h5ad")
    write_cells(cells, tmp_path / "twice.h5ad")
    shutil.copy(tmp_path / "twice.h5ad", tmp_path / "twice.h5")
    (tmp_path / "notes.txt").write_text("not a dataset")
    instance = DagsterInstance.ephemeral()
    with build_sensor_context(instance=instance) as ctx:
        result = cell_dataset_discovery_sensor(ctx)
    assert [r.partition_keys for r in result.dynamic_partitions_requests] == [["good"]]
    assert len(result.run_requests) == 1
    instance.add_dynamic_partitions("cell_datasets", ["good"])
    observed = defs.resolve_job_def(OBSERVE_CELLS_JOB_NAME).execute_in_process(instance=instance)
    assert observed.success and datasets_changed(instance) == []
    with build_sensor_context(instance=instance) as ctx:
        assert cell_dataset_discovery_sensor(ctx).skip_reason is not None
    write_cells(cells[:100].copy(), tmp_path / "good.h5ad")  # a changed file: observed again
    assert datasets_changed(instance) == ["good"]


def test_placement_lays_out_the_whole_dataset_and_the_evaluation_scores_it(home):
    root, instance, _, cells = home
    result = place(home, "cells03", evaluate=True)
    assert result.success, step_errors(result)
    out = placed(home, "cells03")
    n = cells.n_obs
    assert list(out.obs_names) == list(cells.obs_names) and list(out.var_names) == list(cells.var_names)
    assert "spatial_truth" not in out.obsm and out.obsm["X_geometry"].shape == (n, 2)
    assert np.isfinite(out.obsm["X_geometry"]).all() and out.obsm["X_geometry"].std() > 0
    assert out.obsp["geometry_distances"].shape == (n, n) and out.obsp["geometry_connectivities"].shape == (n, n)
    assert (out.obsp["geometry_distances"].getnnz(axis=1) == 15).all()
    info = out.uns["geometry"]
    ckpt = root / "storage" / "geometry" / CHECKPOINT
    assert info["checkpoint_id"] == file_sha256(ckpt)[:16] and info["checkpoint_step"] == 30
    assert info["checkpoint_code_version"] == defs.resolve_assets_def(geo.CHECKPOINT_KEY).code_versions_by_key[geo.CHECKPOINT_KEY]
    assert info["set_size"] == SET_SIZE and info["overlap"] == 0.5 and info["passes"] == 2
    assert info["method"].startswith("generator: random sets of the trained size")
    assert info["gene_coverage"] == 1.0 and info["genes_matched_by"]["symbol"] == info["n_encoder_genes"]
    assert out.uns["geometry_sets"]["index"].shape == (info["n_sets"], SET_SIZE)
    assert (out.obs["geometry_estimates"] >= 2).all()  # each cell placed at least once per pass
    figure = root / "storage" / "geometry" / "cell_placement" / "cells03.png"
    assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    meta = result.asset_materializations_for_node("geometry__cell_placement")[0].metadata
    assert meta["cells"].value == n and meta["gene_coverage"].value == 1.0 and meta["sets"].value == info["n_sets"]
    assert meta["device"].value == "cpu" and meta["seconds"].value > 0
    checks = {(c.asset_key, c.check_name): c for c in result.get_asset_check_evaluations()}
    assert checks[(CELL_PLACEMENT_KEY, DEVICE_CHECK)].passed
    beats = checks[(CELL_EVALUATION_KEY, BEATS_BASELINES_2X)]

    with duckdb.connect(str(root / "mihd.duckdb"), read_only=True) as con:
        rows = con.execute("SELECT scope, method, knn_jaccard_10, n_cells, n_cells_pairs, n_sets, checkpoint_id "
                           "FROM cell_placement_metrics WHERE dataset_id = 'cells03'").df()
        view = con.execute("SELECT scope, method, knn_jaccard_10, jaccard_10_over_best_baseline "
                           "FROM cell_placement_vs_baselines WHERE dataset_id = 'cells03'").df()
    assert sorted(zip(rows.scope, rows.method)) == sorted(
        [("whole", m) for m in ("geometry", "random", "expression_spectral")]
        + [("per_set", m) for m in ("geometry", "geometry_set_estimate", "random", "expression_spectral")])
    whole = rows[rows.scope == "whole"].set_index("method")
    assert (whole.n_cells == n).all() and (whole.n_cells_pairs == n).all() and whole.n_sets.isna().all()
    assert (rows.loc[rows.scope == "per_set", "n_cells"] == SET_SIZE).all()
    assert (rows.checkpoint_id == info["checkpoint_id"]).all()
    best = whole.loc[["random", "expression_spectral"], "knn_jaccard_10"].max()
    ratio = view[(view.scope == "whole") & (view.method == "geometry")]["jaccard_10_over_best_baseline"].iloc[0]
    assert ratio == pytest.approx(whole.loc["geometry", "knn_jaccard_10"] / best, abs=0.006)
    # The check judges the numbers that reached DuckDB, with its stated rule.
    assert beats.passed == (whole.loc["geometry", "knn_jaccard_10"] >= 2 * best)
    assert beats.metadata["n_cells"].value == n


def test_placement_never_reads_the_hidden_positions(home):
    root, instance, _, cells = home
    reference = placed(home, "cells03") if (root / "storage/geometry/cell_placement/cells03.h5ad").is_file() else None
    if reference is None:
        assert place(home, "cells03").success
        reference = placed(home, "cells03")
    shuffled = cells.copy()
    shuffled.obsm["spatial_truth"] = np.random.default_rng(0).permutation(shuffled.obsm["spatial_truth"])
    deleted = cells.copy()
    del deleted.obsm["spatial_truth"]
    cells_root = root / "cells"
    write_cells(shuffled, cells_root / "shuffled.h5ad")
    write_cells(deleted, cells_root / "deleted.h5ad")
    for name in ("shuffled", "deleted"):
        assert place(home, name).success
        np.testing.assert_array_equal(placed(home, name).obsm["X_geometry"], reference.obsm["X_geometry"])
    # Without hidden positions there is nothing to score: the evaluation says so, naming the dataset.
    failed = place(home, "deleted", evaluate=True)
    assert not failed.success
    assert any("cell dataset 'deleted'" in e and "no obsm['spatial_truth']" in e for e in step_errors(failed))


def test_cells_named_by_ensembl_ids_are_placed(home):
    cells = home[3].copy()
    cells.var_names = cells.var["gene_ids"].astype(str).to_numpy()
    write_cells(cells, home[0] / "cells" / "by_id.h5ad")
    assert place(home, "by_id").success
    info = placed(home, "by_id").uns["geometry"]
    assert info["gene_coverage"] == 1.0 and info["genes_matched_by"]["ensembl_id"] == info["n_encoder_genes"]


def _other_encoder_store(home, tmp_path):
    """A store with the same training set and a checkpoint that says it was trained on scGPT embeddings."""
    root = home[0]
    folder = tmp_path / "store" / "geometry"
    folder.mkdir(parents=True)
    shutil.copy(root / "storage" / "geometry" / TRAINING_SET, folder / TRAINING_SET)
    saved = read_checkpoint(root / "storage" / "geometry" / CHECKPOINT)
    saved["encoder"] = {"kind": "embedding:scgpt"}
    save_checkpoint(folder / CHECKPOINT, {k: v for k, v in saved.items() if k != "format"})
    return {**home[2], "store": GeometryStore(base_dir=str(tmp_path / "store"))}


def test_each_bad_input_fails_its_partition_naming_the_dataset(home, tmp_path):
    root, instance, _, cells = home
    cells_root = root / "cells"
    if not (root / "storage/geometry/cell_placement/cells03.h5ad").is_file():
        assert place(home, "cells03", evaluate=True).success
    good = root / "storage" / "geometry" / "cell_placement" / "cells03.h5ad"
    good_hash = file_sha256(good)
    with duckdb.connect(str(root / "mihd.duckdb"), read_only=True) as con:
        good_rows = con.execute("SELECT count(*) FROM cell_placement_metrics WHERE dataset_id = 'cells03'").fetchone()[0]

    renamed = cells.copy()
    renamed.var_names = [f"X{i}" if i % 2 else g for i, g in enumerate(cells.var_names)]
    renamed.var = renamed.var.drop(columns=["gene_ids"])
    write_cells(renamed, cells_root / "lowcov.h5ad")
    (cells_root / "notanndata.h5ad").write_text("barcode,gene,count\n")
    nan = cells.copy()
    dense = nan.X.toarray()
    dense[5, 3] = np.nan
    nan.X = sp.csr_matrix(dense)
    write_cells(nan, cells_root / "nancounts.h5ad")
    write_cells(cells[: SET_SIZE - 1].copy(), cells_root / "fewcells.h5ad")

    cases = {
        "lowcov": "gene coverage",
        "notanndata": "not an AnnData file",
        "nancounts": "NaN or infinite count",
        "fewcells": f"{SET_SIZE - 1} cells, fewer than one set of {SET_SIZE}",
    }
    for dataset, problem in cases.items():
        result = place(home, dataset)
        errors = step_errors(result)
        assert not result.success and any(f"cell dataset '{dataset}'" in e and problem in e for e in errors), errors
    low = step_errors(place(home, "lowcov"))[0]
    assert "below the minimum 80%" in low and "first missing genes" in low
    # The same dataset passes when the minimum is lowered to its coverage (about half the genes).
    assert place(home, "lowcov", config={"min_gene_coverage": 0.3}).success
    # A checkpoint trained on another encoder's features.
    result = place(home, "cells03", resources=_other_encoder_store(home, tmp_path))
    errors = step_errors(result)
    assert not result.success and any("cell dataset 'cells03'" in e and "'embedding:scgpt'" in e for e in errors), errors
    # Other partitions are untouched: the good placement's file and its rows are as they were.
    assert file_sha256(good) == good_hash
    with duckdb.connect(str(root / "mihd.duckdb"), read_only=True) as con:
        assert con.execute("SELECT count(*) FROM cell_placement_metrics WHERE dataset_id = 'cells03'").fetchone()[0] == good_rows


def test_materialize_plans_one_unit_per_cell_dataset(home, capsys):
    from dagster_project.cli import _units

    root, instance, _, cells = home
    unscored = cells.copy()
    del unscored.obsm["spatial_truth"]
    write_cells(unscored, root / "cells" / "unscored.h5ad")
    instance.add_dynamic_partitions("cell_datasets", [d for d in ("cells03", "unscored")
                                                     if d not in instance.get_dynamic_partitions("cell_datasets")])
    units = {u.partition: u for u in _units(defs, instance, None, ["geometry"]) if u.partitions_name == "cell_datasets"}
    assert set(units["cells03"].keys) == {CELL_PLACEMENT_KEY, CELL_EVALUATION_KEY}
    # Without hidden positions the dataset is placed, and its evaluation is not planned (and says so).
    assert units["unscored"].keys == [CELL_PLACEMENT_KEY]
    assert "unscored: geometry/cell_placement_evaluation not planned" in capsys.readouterr().out


def test_cells_from_slide_command_writes_a_dataset_the_sensor_finds(home, tmp_path, monkeypatch, capsys):
    from dagster_project.cli import cmd_cells_from_slide
    from mihd_assets.geometry.cell_datasets import scan

    root = home[0]
    monkeypatch.setenv("MIHD_DATA_ROOT", str(root / "slides"))
    monkeypatch.setenv("MIHD_CELLS_ROOT", str(tmp_path))
    args = argparse.Namespace(slide="demo_02", cells_per_spot=3, seed=1, name=None, out=None, force=False)
    assert cmd_cells_from_slide(args) == 0
    written = ad.read_h5ad(tmp_path / "demo_02_cells.h5ad")
    assert written.uns["cells_from_slide"]["cells_per_spot"] == 3 and "spatial_truth" in written.obsm
    assert "cell_type" in written.obs and "3 per spot" in capsys.readouterr().out
    assert scan() == (["demo_02_cells"], [])
    assert cmd_cells_from_slide(args) == 1  # exists: refused without --force
    assert cmd_cells_from_slide(argparse.Namespace(**{**vars(args), "slide": "no_such_slide"})) == 2


def test_the_refined_estimate_is_placed_and_recorded(home):
    write_cells(home[3], home[0] / "cells" / "refined.h5ad")
    assert place(home, "refined", config={"method": "refined", "passes": 1, "overlap": 0.25}).success
    out = placed(home, "refined")
    info = out.uns["geometry"]
    assert info["estimate"] == "refined" and info["method"].startswith("refined: ")
    assert info["passes"] == 1 and info["n_anchor_cells"] == round(0.25 * SET_SIZE)
    assert (out.obs["geometry_estimates"] >= 1).all() and np.isfinite(out.obsm["X_geometry"]).all()
    if not (home[0] / "storage/geometry/cell_placement/cells03.h5ad").is_file():
        assert place(home, "cells03").success
    assert not np.allclose(out.obsm["X_geometry"], placed(home, "cells03").obsm["X_geometry"])
