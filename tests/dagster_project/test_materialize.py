"""End to end through a real Dagster instance and a real DuckDB file, via `mihd materialize`."""

import datetime
import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pytest
import tifffile
from dagster import AssetKey, DagsterEventType, DagsterInstance
from dagster._core.instance.ref import InstanceRef

from tests.conftest import home_env, run_cli

pytestmark = pytest.mark.slow


def _db(env):
    return duckdb.connect(f"{env['MIHD_HOME']}/mihd.duckdb", read_only=True)


def _instance(env):
    return DagsterInstance.from_ref(InstanceRef.from_dir(env["DAGSTER_HOME"]))


def test_first_run_materializes_everything(materialized_home):
    with _db(materialized_home) as con:
        qc = con.execute("SELECT slide_id, n_spots, frac_spots_on_tissue_image FROM slide_qc ORDER BY 1").fetchall()
        assert [r[0] for r in qc] == ["demo_01", "demo_02"]
        # Every in-tissue spot of the slide's Space Ranger positions file is counted.
        in_tissue = [int((pd.read_csv(Path(materialized_home["MIHD_DATA_ROOT"]) / s / "spatial" / "tissue_positions_list.csv",
                                      header=None)[1] == 1).sum()) for s in ("demo_01", "demo_02")]
        assert [r[1] for r in qc] == in_tissue and all(r[2] >= 0.95 for r in qc)
        assert con.execute("SELECT count(*) FROM slide_image_checks WHERE passed").fetchone()[0] == 6
        presets = con.execute("SELECT slide_id, preset, steps FROM preprocessing_latest ORDER BY 1, 2").fetchall()
        assert [(s, p) for s, p, _ in presets] == [
            ("demo_01", "staig"), ("demo_01", "standard"), ("demo_02", "staig"), ("demo_02", "standard"),
        ]
        assert presets[0][2].startswith("filter_genes(min_cells=1) -> highly_variable_genes(flavor=seurat_v3")
        runs = con.execute(
            "SELECT modality, count(*), count(DISTINCT encoder), bool_and(weights = 'random') "
            "FROM embedding_runs WHERE slide_id = 'demo_01' AND encoder <> 'pca' AND encoder <> 'mlp' GROUP BY 1 ORDER BY 1"
        ).fetchall()
        assert runs == [("gene", 1, 1, True), ("vision", 12, 4, True)]
        assert con.execute("SELECT count(*) FROM embedding_runs").fetchone()[0] == 2 * 15
    instance = _instance(materialized_home)
    for key in ("raw_slide", "preprocessed_slide_staig", "slide_qc_metrics"):
        mats = instance.get_materialized_partitions(AssetKey(["slides", key]))
        assert mats == {"demo_01", "demo_02"}, key
    event = instance.get_latest_materialization_event(AssetKey(["slides", "raw_slide"]))
    meta = event.asset_materialization.metadata
    assert meta["profile"].value == "demo"
    assert meta["tissue_check_passed"].value is True
    assert meta["truth_source"].value == "metadata.tsv:layer_guess_reordered"


def test_second_run_recomputes_nothing_and_sql_cli_reads(materialized_home):
    instance = _instance(materialized_home)
    runs_before = len(instance.get_run_records())
    result = run_cli(["materialize"], materialized_home)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "demo_01: fresh, nothing to do" in result.stdout and "demo_02: fresh, nothing to do" in result.stdout
    assert "(unpartitioned): fresh, nothing to do" in result.stdout
    # Only the observation runs of the input sources; nothing was materialized.
    records = _instance(materialized_home).get_run_records()  # newest first
    new_runs = [r.dagster_run for r in records[: len(records) - runs_before]]
    assert new_runs
    # Each new run only observed (its job is an observation job) and materialized nothing.
    assert all("observe" in r.job_name for r in new_runs), [r.job_name for r in new_runs]
    later = _instance(materialized_home)
    for run in new_runs:
        kinds = {e.dagster_event_type for e in later.all_logs(run.run_id) if e.is_dagster_event}
        assert DagsterEventType.ASSET_MATERIALIZATION not in kinds, (run.job_name, kinds)
    out = run_cli(["sql", "SELECT slide_id, n_spots FROM slide_qc_latest ORDER BY slide_id"], materialized_home)
    assert out.returncode == 0 and "demo_01" in out.stdout and "(2 rows)" in out.stdout
    refused = run_cli(["sql", "DROP TABLE slide_qc"], materialized_home)
    assert refused.returncode != 0 and "read-only" in refused.stderr and "Traceback" not in refused.stderr
    typo = run_cli(["sql", "SELECT slide_idd FROM slide_qc_latest"], materialized_home)
    assert typo.returncode == 1 and "slide_idd" in typo.stderr and "Traceback" not in typo.stderr


def test_nightly_automation_sensor_evaluates_every_asset_of_the_materialized_home(materialized_home, monkeypatch):
    """The sensor the daemon ticks, evaluated as the code server does, on a home whose asset checks
    have results: it requests nothing for a fresh home and raises for no asset or check."""
    from dagster import build_sensor_context
    from dagster._core.test_utils import freeze_time

    for name, value in materialized_home.items():
        monkeypatch.setenv(name, value)
    from dagster_project.definitions import AUTOMATION_SENSOR_NAME, defs

    instance = _instance(materialized_home)
    sensor = defs.resolve_sensor_def(AUTOMATION_SENSOR_NAME)
    # Outside the nightly window (02:00-08:00 UTC), so the outcome does not depend on the hour the
    # test runs: then only newly missing partitions may be requested, and a fresh home has none.
    now = datetime.datetime.now(datetime.timezone.utc)
    if 2 <= now.hour < 8:
        now = now.replace(hour=8, minute=30)
    with freeze_time(now):
        result = sensor.evaluate_tick(build_sensor_context(instance=instance, repository_def=defs.get_repository_def()))
    assert result.run_requests == [], [(r.partition_key, r.asset_selection) for r in result.run_requests]
    evaluated = {e.key for e in result.automation_condition_evaluations or []}
    assert AssetKey(["slides", "raw_slide"]) in evaluated
    assert all(isinstance(k, AssetKey) for k in evaluated), "checks run in their asset's step, never alone"


@pytest.fixture
def mixed_root(tiny_slides, tmp_path):
    root = tmp_path / "root"
    for name in ("demo_01", "demo_02"):
        shutil.copytree(tiny_slides / name, root / name)
    return root


def test_bad_partition_fails_alone_and_rows_stay(mixed_root, tmp_path):
    env = home_env(tmp_path / "home", mixed_root)
    assert run_cli(["materialize", "--only", "slides"], env).returncode == 0
    with _db(env) as con:
        before = con.execute("SELECT * FROM slide_qc ORDER BY slide_id").fetchall()

    broken = mixed_root / "broken_slide"
    shutil.copytree(mixed_root / "demo_01", broken)
    (broken / "spatial" / "scalefactors_json.json").unlink()
    result = run_cli(["materialize", "--only", "slides"], env)
    assert result.returncode == 1
    assert "broken_slide: FAILED" in result.stdout
    assert "slide 'broken_slide'" in result.stdout and "scalefactors_json.json: scale factors file is missing" in result.stdout
    assert "demo_01: fresh, nothing to do" in result.stdout and "demo_02: fresh, nothing to do" in result.stdout
    with _db(env) as con:
        assert con.execute("SELECT * FROM slide_qc ORDER BY slide_id").fetchall() == before

    # A touched but unchanged file: a new fingerprint re-runs raw_slide, whose content (its
    # data version) is unchanged, so nothing downstream runs.
    truth = mixed_root / "demo_02" / "metadata.tsv"
    truth.touch()
    result = run_cli(["materialize", "--only", "slides", "--partition", "demo_02"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "slides/raw_slide (slides/slide_files[demo_02] has a new data version)" in result.stdout
    assert "wave 2" not in result.stdout
    with _db(env) as con:
        assert con.execute("SELECT * FROM slide_qc ORDER BY slide_id").fetchall() == before

    # Changed content: raw_slide gets a new data version, its children run in the next wave and
    # replace their rows (one per slide, never duplicated).
    lines = truth.read_text().splitlines()
    label = lines[1].split("\t")[-1]
    lines[1] = lines[1][: -len(label)] + ("Layer1" if label != "Layer1" else "Layer2")
    truth.write_text("\n".join(lines) + "\n")
    dry = run_cli(["materialize", "--only", "slides", "--partition", "demo_02", "--dry-run"], env)
    assert dry.returncode == 0 and "slides/raw_slide (slides/slide_files[demo_02] has a new data version)" in dry.stdout
    result = run_cli(["materialize", "--only", "slides", "--partition", "demo_02"], env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "(wave 2)" in result.stdout and "slides/raw_slide[demo_02] has a new data version" in result.stdout
    with _db(env) as con:
        assert con.execute("SELECT count(*) FROM slide_qc WHERE slide_id = 'demo_02'").fetchone()[0] == 1
        assert con.execute("SELECT count(*) FROM preprocessing_runs WHERE slide_id = 'demo_02'").fetchone()[0] == 2
        assert con.execute("SELECT * FROM slide_qc WHERE slide_id = 'demo_01'").fetchall() == before[:1]


def test_failed_tissue_check_blocks_downstream(mixed_root, tmp_path):
    """A full-res image with no tissue: raw_slide's blocking check fails, nothing downstream
    runs, and later runs report the slide as blocked instead of retrying it forever."""
    shutil.rmtree(mixed_root / "demo_02")
    tif = next((mixed_root / "demo_01").glob("*.tif"))
    flat = np.full_like(tifffile.imread(tif), 235)
    tifffile.imwrite(tif, flat, tile=(256, 256), photometric="rgb")
    env = home_env(tmp_path / "home", mixed_root)
    result = run_cli(["materialize", "--only", "slides"], env)
    assert result.returncode == 1
    assert "spots_on_tissue" in result.stdout or "FAILED" in result.stdout
    instance = _instance(env)
    assert instance.get_materialized_partitions(AssetKey(["slides", "preprocessed_slide_standard"])) == set()
    again = run_cli(["materialize", "--only", "slides"], env)
    assert again.returncode == 1 and "blocked" in again.stdout and "fix the input files" in again.stdout


def test_slide_without_images_is_not_retried_for_its_vision_assets(mixed_root, tmp_path):
    """Once raw_slide recorded that a slide has no image, `mihd materialize` lists its vision
    embeddings and what is computed from them as not planned (they fail by design there)
    instead of retrying them on every run; its gene-only embeddings stay planned."""
    shutil.rmtree(mixed_root / "demo_02")
    folder = mixed_root / "demo_01"
    for image in [*folder.glob("*.tif"), *(folder / "spatial").glob("tissue_*_image.png")]:
        image.unlink()
    env = home_env(tmp_path / "home", mixed_root)
    first = run_cli(["materialize", "--only", "slides"], env)
    assert first.returncode == 0, first.stdout + first.stderr
    dry = run_cli(["materialize", "--only", "embeddings", "--dry-run"], env)
    assert dry.returncode == 0, dry.stdout + dry.stderr
    planned, _, rest = dry.stdout.partition("not planned, the slide has no image")
    assert rest, dry.stdout
    assert "embeddings/vision_resnet50_standard (missing)" in rest.split("materializing")[0]
    materializing = dry.stdout[dry.stdout.index("materializing"):]
    assert "embeddings/gene_pca (missing)" in materializing
    assert "vision_" not in materializing.split("(dry run")[0]
    # Its figures of image-free clusterings are planned (their first panel draws the spot
    # coordinates), those of clusterings computed from pixels are not.
    reports = run_cli(["materialize", "--only", "reports", "--dry-run"], env)
    assert reports.returncode == 0, reports.stdout + reports.stderr
    skipped, _, planned = reports.stdout.partition("demo_01: materializing")
    assert "reports/slide_figures_image (missing)" in skipped.split("not planned, the slide has no image")[1]
    assert "reports/slide_figures (missing)" in planned and "slide_figures_image" not in planned
