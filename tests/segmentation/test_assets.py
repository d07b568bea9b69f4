"""E0/E1/E5/report assets through Dagster on the tiny cohort: random tiny weights recorded,
a donor without readable tiles fails alone, skipped tiles reach DuckDB, the report renders."""

import shutil

import duckdb
import pytest
from dagster import AssetKey, DagsterInstance, materialize
from dagster_duckdb import DuckDBResource

from mihd_resources import ComputeResource, MetricsStore
from mihd_resources.weights import ModelWeightsResource
from mihd_resources.step_executor import StepExecutor

from .conftest import write_tiff


@pytest.fixture
def env(tmp_path, tiny_cohort, monkeypatch):
    root = tmp_path / "rosmap"
    shutil.copytree(tiny_cohort, root)
    bad = root / "tiles" / "99999999"
    write_tiff(bad / "99999999_GFAP_1_b0c0.tif", __import__("numpy").zeros((96, 96), "uint16"))
    (bad / "99999999_GFAP_1_b0c1.tif").write_bytes(b"not a tiff")
    (bad / "99999999_GFAP_1_metadata.xml").write_text("<xml/>")
    for name, value in {"MIHD_HOME": tmp_path / "home", "MIHD_TILES_ROOT": root / "tiles", "MIHD_CLINICAL": root / "clinical.csv",
                        "MIHD_ANNOTATIONS_ROOT": root / "annotations", "MIHD_PROFILE": "demo", "MIHD_SEG_EPOCHS": "2"}.items():
        monkeypatch.setenv(name, str(value))
    monkeypatch.delenv("MIHD_CELLPOSE_WEIGHTS", raising=False)
    db = tmp_path / "metrics.duckdb"
    resources = {"metrics": MetricsStore(duckdb=DuckDBResource(database=str(db))), "compute": ComputeResource(device="cpu"), "step_executor": StepExecutor(),
                 "weights": ModelWeightsResource(allow_random=True)}
    return root, db, resources


def _key(name):
    return AssetKey(["segmentation", name])


def test_e5_partitions_fail_alone_and_report_renders(env):
    from mihd_assets.segmentation import assets as seg
    from mihd_assets.segmentation.definitions import all_assets
    from mihd_assets.segmentation.partitions import donors_partitions

    root, db, resources = env
    instance = DagsterInstance.ephemeral()
    setup = materialize(all_assets, instance=instance, resources=resources, selection=[
        _key("e0_donor_split"), _key("e0_training_set"), _key("e1_checkpoint_baseline"), _key("e1_checkpoint_generic")])
    assert setup.success
    base = setup.asset_materializations_for_node("segmentation__e1_checkpoint_baseline")[0].metadata
    assert base["weights"].value == "random" and base["config"].value == "tiny"
    checks = {c.check_name: c for c in setup.get_asset_check_evaluations()}
    assert checks["weights_not_random"].passed is False
    donors = sorted(p.name for p in (root / "tiles").iterdir())
    corrupt_donor = donors[2]  # the cohort's corrupt tile sits in the third donor (sorted ids)
    chosen = [donors[0], corrupt_donor, "99999999"]
    instance.add_dynamic_partitions(donors_partitions.name, chosen)
    e5 = [_key("e5_tile_counts"), _key("e5_tile_counts_metrics")]
    results = {d: materialize(all_assets, instance=instance, resources=resources, selection=e5, partition_key=d, raise_on_error=False)
               for d in chosen}
    assert results[donors[0]].success and results[corrupt_donor].success
    bad = results["99999999"]
    assert not bad.success
    failure = next(e for e in bad.all_events if e.event_type_value == "STEP_FAILURE")
    err = failure.event_specific_data.error
    while err.cause is not None:
        err = err.cause
    assert "donor 99999999: no readable GFAP tile" in err.message and "99999999_GFAP_1_b0c1.tif" in err.message
    skipped_check = [c for c in results[corrupt_donor].get_asset_check_evaluations() if c.check_name == "no_skipped_tiles"][0]
    assert skipped_check.passed is False

    final = materialize(all_assets, instance=instance, resources=resources, selection=[seg.E5_STATS, seg.REPORT])
    assert final.success
    stats_meta = final.asset_materializations_for_node("segmentation__e5_donor_statistics")[0].metadata
    assert stats_meta["donors_without_counts"].value == ["99999999"]
    with duckdb.connect(str(db), read_only=True) as con:
        skipped = con.execute("SELECT donor_id, file FROM skipped_tiles").fetchall()
        counts = con.execute("SELECT DISTINCT donor_id, model, weights, config FROM tile_counts ORDER BY 1, 2").fetchall()
        spearman = con.execute("SELECT count(*), count(DISTINCT model) FROM e5_spearman").fetchone()
        ratios = con.execute("SELECT donor_id, model, n_cells, n_positive, ratio FROM donor_ratios").fetchall()
    assert [s[0] for s in skipped] == [corrupt_donor] and skipped[0][1].endswith("_b0c1.tif")
    assert {c[0] for c in counts} == {donors[0], corrupt_donor}
    assert {(c[1], c[2]) for c in counts} == {("baseline", "random"), ("finetuned", "finetuned_from:random")}
    assert {c[3] for c in counts} == {"tiny"}
    assert spearman == (16, 2)
    for _, _, cells, positive, ratio in ratios:
        assert (ratio is None and cells == 0) or ratio == pytest.approx(positive / cells)
    report = final.asset_materializations_for_node("segmentation__segmentation_report")[0].metadata
    page = open(report["report_html"].value).read()
    assert "plotly" in page.lower() and "E5 donor-level association" in report["summary"].value
