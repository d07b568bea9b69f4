"""The nightly automation condition, evaluated by Dagster on a small graph of the same shape
as the slide pipeline: observable source -> gate asset (blocking check) -> child."""

from __future__ import annotations

import datetime as dt

import dagster as dg

from mihd_resources.orchestration import changed_data_versions, nightly_condition

P = dg.DynamicPartitionsDefinition(name="slides")
SOURCE = dg.AssetKey(["files"])
VERSIONS: dict[str, str] = {}
CHECK_PASSES: dict[str, bool | str] = {}  # False: fails with ERROR; "warn": fails with WARN


@dg.observable_source_asset(key=SOURCE, partitions_def=P)
def files(context):
    return changed_data_versions(context.instance, SOURCE, dict(VERSIONS))


@dg.asset(deps=[SOURCE], partitions_def=P, code_version="1",
          check_specs=[dg.AssetCheckSpec("gate", asset="raw", blocking=True)])
def raw(context):
    yield dg.Output(1, data_version=dg.DataVersion(VERSIONS[context.partition_key]))
    outcome = CHECK_PASSES.get(context.partition_key, True)
    severity = dg.AssetCheckSeverity.WARN if outcome == "warn" else dg.AssetCheckSeverity.ERROR
    yield dg.AssetCheckResult(check_name="gate", passed=outcome is True, severity=severity)


@dg.asset(partitions_def=P, code_version="1")
def child(raw):
    return raw + 1


DEFS = dg.Definitions(assets=[files, raw, child], jobs=[dg.define_asset_job("observe", selection=[SOURCE])])


def _requested(instance, when, cursor=None):
    result = dg.evaluate_automation_conditions(
        defs=[files, raw.with_attributes(automation_condition=nightly_condition()),
              child.with_attributes(automation_condition=nightly_condition())],
        instance=instance, evaluation_time=when, cursor=cursor)
    got = {(k.path[-1], p) for k in (dg.AssetKey("raw"), dg.AssetKey("child"))
           for p in result.get_requested_partitions(k)}
    return got, result.cursor


def _observe(instance):
    assert DEFS.resolve_job_def("observe").execute_in_process(instance=instance).success


def _materialize(instance, partition, *assets):
    dg.materialize([files, raw, child], selection=list(assets), instance=instance, partition_key=partition)


def test_new_partitions_at_once_changes_only_at_night_children_after_parents():
    instance = dg.DagsterInstance.ephemeral()
    VERSIONS.clear()
    VERSIONS.update(a="v1")
    day = dt.datetime(2026, 12, 1, 14, 0, tzinfo=dt.timezone.utc)
    _, cursor = _requested(instance, day - dt.timedelta(minutes=1))  # the sensor runs before the slide arrives
    instance.add_dynamic_partitions("slides", ["a"])
    _observe(instance)
    got, cursor = _requested(instance, day, cursor)
    assert ("raw", "a") in got  # a new slide's first asset is requested at once
    _materialize(instance, "a", "raw", "child")
    got, cursor = _requested(instance, day + dt.timedelta(minutes=1), cursor)
    assert got == set()

    VERSIONS["a"] = "v2"  # the slide's files changed during the day
    _observe(instance)
    got, cursor = _requested(instance, day + dt.timedelta(minutes=2), cursor)
    assert got == set(), "a change is not acted on before the nightly window"
    night = dt.datetime(2026, 12, 2, 2, 1, tzinfo=dt.timezone.utc)
    got, cursor = _requested(instance, night, cursor)
    assert got == {("raw", "a")}, "the child waits for its parent's new data version"
    _materialize(instance, "a", "raw")
    got, cursor = _requested(instance, night + dt.timedelta(minutes=5), cursor)
    assert got == {("child", "a")}
    _materialize(instance, "a", "child")
    got, _ = _requested(instance, night + dt.timedelta(minutes=10), cursor)
    assert got == set()


def test_blocking_check_error_holds_back_children_a_warn_failure_does_not():
    """An ERROR failure of a blocking check holds the partition's children back. A WARN failure of a blocking check (a slide without images: its tissue check is "not
    applicable") does not stop a run's downstream steps, so it does not hold back the nightly
    automation either; an ERROR failure on another partition still does."""
    instance = dg.DagsterInstance.ephemeral()
    VERSIONS.clear()
    VERSIONS.update(w="v1", e="v1", ok="v1")
    CHECK_PASSES.update(w="warn", e=False)
    day = dt.datetime(2026, 12, 1, 14, 0, tzinfo=dt.timezone.utc)
    _, cursor = _requested(instance, day - dt.timedelta(minutes=1))
    instance.add_dynamic_partitions("slides", ["w", "e", "ok"])
    _observe(instance)
    got, cursor = _requested(instance, day, cursor)
    # New slides: raw and child in one tick (the run machinery holds the child back on ERROR).
    assert {("raw", p) for p in ("w", "e", "ok")} <= got
    for partition in ("w", "e", "ok"):  # only raw ran (the child's run never happened)
        result = dg.materialize([files, raw, child], selection=["raw"], instance=instance,
                                partition_key=partition, raise_on_error=False)
        (evaluation,) = result.get_asset_check_evaluations()
        assert evaluation.passed is (partition == "ok")
    got, cursor = _requested(instance, day + dt.timedelta(minutes=1), cursor)
    assert got == set()  # requested once already; the rest waits for the nightly window
    night = dt.datetime(2026, 12, 2, 2, 1, tzinfo=dt.timezone.utc)
    got, _ = _requested(instance, night, cursor)
    assert got == {("child", "w"), ("child", "ok")}  # not ("child", "e"): its check failed with ERROR
    CHECK_PASSES.pop("w")
    CHECK_PASSES.pop("e")
