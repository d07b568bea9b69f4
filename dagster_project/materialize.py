"""`mihd materialize`: observe the input sources, then run what Dagster reports unsynced or missing.

Freshness is Dagster's own: an asset partition is planned when Dagster's stale-status resolver
(the one behind the UI's "Unsynced" tags) says it is ``MISSING`` or ``STALE`` (a new code
version, new data of a dependency, a changed dependency set). Dagster marks only the direct
children of changed data unsynced, so materialization goes in waves: after each wave the
status is asked again, and children whose parents got a new data version join the next one;
children of a parent whose content did not change stay in sync and are not recomputed.

A partition downstream of a failed blocking check (``spots_on_tissue``) is reported as
blocked, not retried, until its input files change.
"""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from mihd_assets.slides.assets import BLOCKING_GATES
from mihd_resources.orchestration import step_errors


@dataclass
class Unit:
    """What one run covers: the assets of one partition (``None``: the unpartitioned assets)."""

    partitions_name: str | None
    partition: str | None
    keys: list[AssetKey]

    @property
    def label(self) -> str:
        return self.partition if self.partition is not None else "(unpartitioned)"


@dataclass
class UnitPlan:
    unit: Unit
    todo: dict[AssetKey, str] = field(default_factory=dict)  # key -> reason
    blocked: str | None = None
    # Missing or unsynced, but an ancestor is unsynced or has planned work in another partition.
    waiting: dict[AssetKey, str] = field(default_factory=dict)


def _resolver(instance: DagsterInstance, graph):
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._core.loader import LoadingContextForTest

    # The resolver Dagster's webserver uses; a plain loading context serves one process.
    return CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))


def _reason(resolver, key: AssetKey, partition: str | None) -> str:
    causes = resolver.get_stale_root_causes(key, partition)
    if not causes:
        return "unsynced"
    parts = []
    for cause in causes[:3]:
        who = cause.asset_key.to_user_string() + (f"[{cause.partition_key}]" if cause.partition_key else "")
        parts.append(f"{who} {cause.reason}")
    return "; ".join(parts) + (f" (+{len(causes) - 3} more)" if len(causes) > 3 else "")


def describe(todo: dict[AssetKey, str], full: bool = False) -> str:
    """``N asset(s)`` and why; long lists are summarised by reason unless ``full``."""
    head = f"{len(todo)} asset(s)"
    if full or len(todo) <= 6:
        return head + ":" + "".join(f"\n    {k.to_user_string()} ({r})" for k, r in todo.items())
    by_reason: dict[str, int] = {}
    for reason in todo.values():
        if reason == "missing":
            short = "missing"
        elif "code version" in reason:
            short = "new code version"
        elif "data version" in reason or "materialization" in reason:
            short = "new upstream data"
        else:
            short = "dependencies changed"
        by_reason[short] = by_reason.get(short, 0) + 1
    return head + " (" + ", ".join(f"{n} {r}" for r, n in sorted(by_reason.items(), key=lambda x: -x[1])) + \
        "; --dry-run lists each with its reason)"


def _blocked(instance: DagsterInstance, graph, unit: Unit) -> str | None:
    """The failed blocking check upstream of this partition, if any (read from its gate asset)."""
    for gate, entry in BLOCKING_GATES.items():
        if gate not in unit.keys or unit.partition is None:
            continue
        records = instance.fetch_materializations(
            AssetRecordsFilter(asset_key=gate, asset_partitions=[unit.partition]), limit=1, ascending=False
        ).records
        if not records:
            continue
        value = records[0].asset_materialization.metadata.get(entry)
        if getattr(value, "value", value) is False:
            return f"{gate.to_user_string()} failed its blocking check; fix the input files to retry"
    return None


def plan(instance: DagsterInstance, graph, units: list[Unit]) -> list[UnitPlan]:
    """Per unit: what Dagster reports missing or unsynced now, minus what must wait or is blocked."""
    resolver = _resolver(instance, graph)
    plans = []
    for unit in units:
        p = UnitPlan(unit)
        p.blocked = _blocked(instance, graph, unit)
        for key in unit.keys:
            status = resolver.get_status(key, unit.partition).value
            if status == "MISSING":
                p.todo[key] = "missing"
            elif status == "STALE":
                p.todo[key] = _reason(resolver, key, unit.partition)
        if p.blocked:
            # Only the gate itself may re-run, and only once its inputs changed (it is unsynced).
            p.todo = {k: r for k, r in p.todo.items() if k in BLOCKING_GATES and r != "missing"}
        plans.append(p)
    # Children go after their parents: an asset waits while one of its ancestors is unsynced
    # (it becomes unsynced itself only if that ancestor's data version changes), or while an
    # ancestor of another partitioning has planned work (another run does that first).
    stale = {(k, p.unit.partition) for p in plans for k, r in p.todo.items() if r != "missing"}
    pending_keys = {k for p in plans for k in p.todo}
    for p in plans:
        for key in list(p.todo):
            for ancestor in _ancestors(graph, key):
                same = _partitions_name(graph, ancestor) == p.unit.partitions_name
                if (same and (ancestor, p.unit.partition) in stale) or (not same and ancestor in pending_keys):
                    p.waiting[key] = p.todo.pop(key)
                    break
    return plans


def _ancestors(graph, key: AssetKey) -> set[AssetKey]:
    found, frontier = set(), list(graph.get(key).parent_keys)
    while frontier:
        parent = frontier.pop()
        if parent not in found:
            found.add(parent)
            frontier.extend(graph.get(parent).parent_keys)
    return found


def _partitions_name(graph, key: AssetKey) -> str | None:
    pdef = graph.get(key).partitions_def
    return pdef.name if pdef is not None else None


def execute(defs, instance: DagsterInstance, units: list[Unit], *, dry_run: bool, log_level: str, tags: dict,
            max_waves: int = 30, echo=print) -> int:
    """Materialize in waves until nothing is missing or unsynced; returns the number of failed or
    blocked units."""
    graph = defs.resolve_asset_graph()
    job = defs.resolve_implicit_global_asset_job_def()
    failed: dict[str, str] = {}
    blocked: dict[str, str] = {}
    announced_fresh: set[str] = set()
    for wave in range(1, max_waves + 1):
        plans = [p for p in plan(instance, graph, units) if p.unit.label not in failed]
        progressed = False
        for p in plans:
            label = p.unit.label
            if p.blocked and not p.todo:
                if label not in blocked:
                    blocked[label] = p.blocked
                    echo(f"{label}: blocked - {p.blocked}")
                continue
            if dry_run and p.waiting:
                echo(f"{label}: after their upstream, {describe(p.waiting, full=True)}", flush=True)
            if not p.todo:
                if wave == 1 and not p.waiting and label not in announced_fresh:
                    echo(f"{label}: fresh, nothing to do")
                    announced_fresh.add(label)
                continue
            echo(f"{label}: materializing {describe(p.todo, full=dry_run)}" + (f" (wave {wave})" if wave > 1 else ""),
                 flush=True)
            if dry_run:
                continue
            started = time.perf_counter()
            with heartbeat(instance, label, echo):
                result = job.execute_in_process(
                    instance=instance, partition_key=p.unit.partition, asset_selection=list(p.todo),
                    raise_on_error=False, tags=tags,
                    run_config={"loggers": {"console": {"config": {"log_level": log_level}}}},
                )
            seconds = time.perf_counter() - started
            if result.success:
                echo(f"{label}: done in {seconds:.1f} s (run {result.run_id[:8]})", flush=True)
                progressed = True
            else:
                failed[label] = result.run_id
                echo(f"{label}: FAILED after {seconds:.1f} s (run {result.run_id[:8]})", flush=True)
                for line in step_errors(result):
                    echo(f"    {line}", flush=True)
        if dry_run:
            if any(p.todo for p in plans):
                echo("(dry run: nothing was materialized; the sources were observed. Children of these assets "
                     "become unsynced only if their parents' data versions change.)")
            break
        if not progressed:
            break
    else:
        echo(f"stopped after {max_waves} waves; run again to continue")
    return len(failed) + len(blocked)


@contextmanager
def heartbeat(instance: DagsterInstance, label: str, echo, every_s: float = 20.0):
    """A progress line at least every ``every_s`` seconds while a run executes in this process:
    elapsed time, steps finished, and the step running now (read from the run's event log)."""
    from dagster import DagsterEventType

    stop = threading.Event()
    started = time.perf_counter()
    newest = instance.get_run_records(limit=1)
    before = newest[0].dagster_run.run_id if newest else None

    def beat():
        while not stop.wait(every_s):
            records = instance.get_run_records(limit=1)
            line = f"  ... {label}: {time.perf_counter() - started:.0f} s"
            if not records or records[0].dagster_run.run_id == before:
                echo(line, flush=True)
                continue
            run_id = records[0].dagster_run.run_id
            begun = instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)
            done = instance.all_logs(run_id, of_type={DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE})
            finished = {e.step_key for e in done}
            running = [e.step_key for e in begun if e.step_key not in finished]
            echo(f"{line}, {len(finished)} step(s) done" + (f", running {running[-1]}" if running else ""), flush=True)

    thread = threading.Thread(target=beat, name="mihd-heartbeat", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
