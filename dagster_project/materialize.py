"""`mihd materialize`: observe the input sources, then run what Dagster reports unsynced or missing.

Freshness is Dagster's own: an asset partition is planned when Dagster's stale-status resolver
(the one behind the UI's "Unsynced" tags) says it is ``MISSING`` or ``STALE`` (a new code
version, new data of a dependency, a changed dependency set). Dagster marks only the direct
children of changed data unsynced, so materialization goes in waves: after each wave the
status is asked again, and children whose parents got a new data version join the next one;
children of a parent whose content did not change stay in sync and are not recomputed.

A partition downstream of a failed blocking check (``spots_on_tissue``) is reported as
blocked, not retried, until its input files change. On a slide without any image (its
``raw_slide`` says ``has_image: false``) the vision embeddings and everything downstream of
them are not planned and are listed as such: they fail by design there (naming the slide),
so retrying them on every run would only repeat the failure; the gene-only assets run.

Each unit's run goes through Dagster's multiprocess executor, run by this process (or, when
several units run at once, by a child process of it each), so logs and errors stay in the
user's shell (``Execution``); every run
carries tags naming its launcher, so a later `mihd materialize` marks a run whose launcher was
killed as failed and frees its pool slots (``reap_dead_runs``).
"""

from __future__ import annotations

import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from dagster._utils.interrupts import capture_interrupts, check_captured_interrupt

from mihd_assets.embeddings.assets import VISION_KEYS
from mihd_assets.slides.assets import BLOCKING_GATES, RAW_SLIDE
from mihd_resources.orchestration import slides_partitions, step_errors


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
    # Missing or unsynced, but they need the slide's pixels and the slide has no image.
    needs_image: dict[AssetKey, str] = field(default_factory=dict)


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


def _has_no_image(instance: DagsterInstance, unit: Unit) -> bool:
    """Whether the unit's slide was read without any image (its latest ``raw_slide`` says so)."""
    if unit.partition is None or unit.partitions_name != slides_partitions.name:
        return False
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=RAW_SLIDE, asset_partitions=[unit.partition]), limit=1, ascending=False
    ).records
    if not records:
        return False
    value = records[0].asset_materialization.metadata.get("has_image")
    return getattr(value, "value", value) is False


def image_bound_keys(graph) -> set[AssetKey]:
    """The vision embeddings and every asset downstream of one."""
    bound = {key for key in VISION_KEYS if graph.has(key)}
    frontier = list(bound)
    while frontier:
        for child in graph.get(frontier.pop()).child_keys:
            if child not in bound:
                bound.add(child)
                frontier.append(child)
    return bound


def plan(instance: DagsterInstance, graph, units: list[Unit]) -> list[UnitPlan]:
    """Per unit: what Dagster reports missing or unsynced now, minus what must wait, what needs
    an image the slide does not have, and what is blocked."""
    resolver = _resolver(instance, graph)
    image_bound = None
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
        if p.todo and _has_no_image(instance, unit):
            image_bound = image_bound if image_bound is not None else image_bound_keys(graph)
            p.needs_image = {k: r for k, r in p.todo.items() if k in image_bound}
            p.todo = {k: r for k, r in p.todo.items() if k not in image_bound}
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


# --- execution -------------------------------------------------------------------------------

# Tags on every run `mihd` launches: who runs it (host, pid, the pid's start) so a later
# `mihd materialize` can tell a run whose process died from one still going, and one token per
# launch so the heartbeat finds its run while it executes.
TAG_HOST = "mihd/launcher_host"
TAG_PID = "mihd/launcher_pid"
TAG_START = "mihd/launcher_start"
TAG_ATTEMPT = "mihd/attempt"
DEFINITIONS_MODULE = "dagster_project.definitions"


def default_max_concurrent() -> int:
    """``$MIHD_MAX_CONCURRENT`` when set, else the number of CPUs, or 1 on a machine with two
    CPUs or fewer: there a step process's start and warm-up (R, numba, torch: 2-3 s each) cost
    more than two cores win back, and the demo's slide family runs about 2x slower in parallel
    than in one process (benchmarks/parallel_demo.py). One step process means in-process
    execution."""
    raw = os.environ.get("MIHD_MAX_CONCURRENT", "").strip()
    if not raw:
        cpus = os.cpu_count() or 1
        return cpus if cpus > 2 else 1
    if not raw.isdigit() or int(raw) < 1:
        raise ValueError(f"MIHD_MAX_CONCURRENT={raw!r}: give a positive number of step processes")
    return int(raw)


@dataclass(frozen=True)
class Execution:
    """How the planned runs execute.

    By default each unit's run goes through Dagster's multiprocess executor: independent steps
    run in child processes, ``max_concurrent`` step processes in all (split between the runs in
    flight), up to ``max_runs`` units at once (default: the instance's ``max_concurrent_runs``),
    each then run by a process of its own. Op-granularity pools are
    claimed through the instance, so they hold within a run and across runs (``gpu`` is the one
    pool; metric writes need none). ``serial`` runs
    each unit in this process, one step at a time (for debugging: breakpoints, one traceback).
    """

    serial: bool = False
    max_concurrent: int = field(default_factory=default_max_concurrent)
    max_runs: int | None = None


def launcher_tags() -> dict[str, str]:
    """The tags naming this process as the launcher of a run."""
    return {TAG_HOST: socket.gethostname(), TAG_PID: str(os.getpid()), TAG_START: _process_start(os.getpid()) or ""}


def _boot_id() -> str:
    path = Path("/proc/sys/kernel/random/boot_id")
    return path.read_text().strip() if path.exists() else ""


def _proc_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (None: no such process)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    return text[text.rindex(")") + 2:].split()


def _process_start(pid: int) -> str | None:
    """An identity of process ``pid`` that changes when the pid is reused (boot id and start
    tick on Linux; "" where the system does not say), or None when no such process exists."""
    if Path("/proc/self/stat").exists():
        fields = _proc_stat(pid)
        if fields is None or fields[0] == "Z":  # a zombie has finished running
            return None
        return f"{_boot_id()}:{fields[19]}"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:  # another user's process: it exists
        pass
    return ""


def _process_started_at(pid: int) -> float | None:
    """Epoch seconds at which process ``pid`` started (Linux), None when gone or unknown."""
    fields = _proc_stat(pid) if Path("/proc/stat").exists() else None
    if fields is None or fields[0] == "Z":
        return None
    btime = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                 if line.startswith("btime "))
    return btime + int(fields[19]) / os.sysconf("SC_CLK_TCK")


def launcher_alive(tags) -> bool:
    """Whether the process named by a run's launcher tags (on this host) still runs."""
    current = _process_start(int(tags[TAG_PID]))
    if current is None:
        return False
    recorded = tags.get(TAG_START, "")
    return not (recorded and current and recorded != current)


def _live_step_workers(instance: DagsterInstance, run_id: str) -> list[int]:
    """Step worker processes of a run (multiprocess executor) that still run on this host:
    a step child outlives its killed parent, and holds its pool slot's resource until it ends."""
    from dagster import DagsterEventType

    alive = []
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.STEP_WORKER_STARTED):
        pid_value = entry.dagster_event.event_specific_data.metadata.get("pid")
        if pid_value is None:
            continue
        pid = int(pid_value.value)
        started = _process_started_at(pid)
        # The same pid started after the event was logged is another process.
        if started is not None and started <= entry.timestamp + 2.0:
            alive.append(pid)
    return alive


def reap_dead_runs(instance: DagsterInstance, echo=print) -> list[str]:
    """Mark failed every unfinished run launched by `mihd` on this host whose launcher is gone,
    and free the pool slots it holds; returns their run ids.

    A run whose worker was killed (kill -9, the OOM killer) stays STARTED and keeps its ``gpu``
    slot, so every later GPU step would wait for it forever. Runs of other hosts are left to
    their own host; runs launched by the daemon are handled by run monitoring (dagster.yaml).
    """
    from dagster import DagsterRunStatus, RunsFilter

    host = socket.gethostname()
    unfinished = [DagsterRunStatus.STARTING, DagsterRunStatus.STARTED, DagsterRunStatus.CANCELING]
    reaped = []
    with_slots = None
    for record in instance.get_run_records(filters=RunsFilter(statuses=unfinished)):
        run = record.dagster_run
        short = run.run_id[:8]
        if TAG_PID not in run.tags:
            if with_slots is None:
                storage = instance.event_log_storage
                with_slots = storage.get_concurrency_run_ids() if storage.supports_global_concurrency_limits else set()
            if run.run_id in with_slots:
                echo(f"run {short} ({run.job_name}) is {run.status.value} and holds pool slots but was not launched "
                     "by mihd; if its process is gone, terminate it in the UI (Runs page)")
            continue
        if run.tags.get(TAG_HOST) != host or launcher_alive(run.tags):
            continue
        workers = _live_step_workers(instance, run.run_id)
        partition = run.tags.get("dagster/partition")
        what = f"run {short}" + (f" ({partition})" if partition else "")
        if workers:
            echo(f"{what}: its launcher (pid {run.tags[TAG_PID]}) is gone but step process(es) "
                 f"{', '.join(map(str, workers))} still run; leaving its pool slots until they end")
            continue
        message = (f"the mihd process that ran it (pid {run.tags[TAG_PID]} on {host}) is gone "
                   "(killed?); marked failed by a later `mihd materialize`")
        if run.status == DagsterRunStatus.CANCELING:
            instance.report_run_canceled(run, message=f"Run canceled: {message}")
        else:
            instance.report_run_failed(run, message=f"Run failed: {message}")
        if instance.event_log_storage.supports_global_concurrency_limits:
            instance.event_log_storage.free_concurrency_slots_for_run(run.run_id)
        echo(f"{what}: {message}; freed its pool slots")
        reaped.append(run.run_id)
    return reaped


@dataclass
class _Outcome:
    label: str
    run_id: str
    success: bool
    seconds: float
    errors: list[str]


class _Runner:
    """Executes one unit's planned assets as one Dagster run."""

    def __init__(self, defs, instance: DagsterInstance, log_level: str, tags: dict, execution: Execution):
        self.instance = instance
        self._spec = {"log_level": log_level, "tags": dict(tags), "execution": execution}
        self.tags = {**tags, **launcher_tags()}
        self.execution = execution
        self.job = defs.resolve_implicit_global_asset_job_def()
        self.loggers = {"console": {"config": {"log_level": log_level}}}
        if not execution.serial:
            from dagster._core.definitions.reconstruct import ReconstructableRepository

            repository = ReconstructableRepository.for_module(DEFINITIONS_MODULE, "defs")
            self.recon_job = repository.get_reconstructable_job(self.job.name)

    def spec(self) -> dict:
        """What a run process needs to build the same runner (its own launcher tags)."""
        return self._spec

    def run(self, p: UnitPlan, token: str, processes: int) -> _Outcome:
        tags = {**self.tags, TAG_ATTEMPT: token}
        started = time.perf_counter()
        if self.execution.serial:
            result = self.job.execute_in_process(
                instance=self.instance, partition_key=p.unit.partition, asset_selection=list(p.todo),
                raise_on_error=False, tags=tags, run_config={"loggers": self.loggers},
            )
            errors = step_errors(result) if not result.success else []
        else:
            from dagster import execute_job

            if p.unit.partition is not None:
                tags["dagster/partition"] = p.unit.partition
            # A run with one step process at a time runs its steps in its own process: a child
            # process per step would only add its start-up and warm-up (R, numba, torch).
            executor = {"in_process": {}} if processes == 1 else {
                "multiprocess": {"max_concurrent": processes, "start_method": _start_method()}}
            result = execute_job(
                self.recon_job, instance=self.instance, asset_selection=list(p.todo), tags=tags,
                raise_on_error=False, run_config={"loggers": self.loggers, "execution": {"config": executor}},
            )
            errors = _crash_explained(self.instance, result.run_id) if not result.success else []
        return _Outcome(p.unit.label, result.run_id, result.success, time.perf_counter() - started, errors)


def _crash_explained(instance: DagsterInstance, run_id: str) -> list[str]:
    """``step_errors`` of a run, a step whose process died (kill -9, the OOM killer) told by
    Dagster's own explanation ("... was terminated by signal 9 (SIGKILL)") instead of the bare
    ChildProcessCrashException."""
    from dagster import DagsterEventType

    explained = {}
    for entry in instance.all_logs(run_id, of_type=DagsterEventType.ENGINE_EVENT):
        if entry.step_key and "child process for step" in entry.message:
            explained[entry.step_key] = entry.message.strip()
    errors = []
    for line in step_errors(instance, run_id):
        step, _, message = line.partition(": ")
        errors.append(f"{step}: {explained[step]}" if message.endswith("ChildProcessCrashException") and step in explained
                      else line)
    return errors


def _start_method() -> dict:
    """Step processes forked from a server that imported the definitions once (a step then
    starts in about a second instead of re-importing torch, scanpy and every asset module)."""
    if "forkserver" in multiprocessing.get_all_start_methods():
        return {"forkserver": {"preload_modules": _PRELOAD}}
    return {"spawn": {}}


def _shares(total: int, runs: int) -> list[int]:
    """``total`` step processes split between ``runs`` runs (each at least one)."""
    base, extra = divmod(max(total, runs), runs)
    return [base + (1 if i < extra else 0) for i in range(runs)]


def execute(defs, instance: DagsterInstance, units: list[Unit], *, dry_run: bool, log_level: str, tags: dict,
            max_waves: int = 30, echo=print, execution: Execution | None = None) -> int:
    """Materialize in waves until nothing is missing or unsynced; returns the number of failed or
    blocked units. The runs of one wave go concurrently (see ``Execution``)."""
    execution = execution or Execution()
    graph = defs.resolve_asset_graph()
    runner = None if dry_run else _Runner(defs, instance, log_level, tags, execution)
    lock = threading.Lock()

    def say(message: str) -> None:
        with lock:
            echo(message, flush=True)

    if not dry_run:
        say("steps run in this process, one at a time (--max-concurrent N for N step processes)" if execution.serial
            else f"steps run through Dagster's multiprocess executor: {execution.max_concurrent} step processes")
    failed: dict[str, str] = {}
    blocked: dict[str, str] = {}
    announced_fresh: set[str] = set()
    announced_no_image: set[str] = set()
    for wave in range(1, max_waves + 1):
        plans = [p for p in plan(instance, graph, units) if p.unit.label not in failed]
        launches = []
        for p in plans:
            label = p.unit.label
            if p.blocked and not p.todo:
                if label not in blocked:
                    blocked[label] = p.blocked
                    echo(f"{label}: blocked - {p.blocked}")
                continue
            if p.needs_image and label not in announced_no_image:
                echo(f"{label}: not planned, the slide has no image: {describe(p.needs_image, full=dry_run)} "
                     "(vision embeddings and what is computed from them)", flush=True)
                announced_no_image.add(label)
            if dry_run and p.waiting:
                echo(f"{label}: after their upstream, {describe(p.waiting, full=True)}", flush=True)
            if not p.todo:
                if wave == 1 and not p.waiting and label not in announced_fresh:
                    echo(f"{label}: fresh, nothing to do")
                    announced_fresh.add(label)
                continue
            echo(f"{label}: materializing {describe(p.todo, full=dry_run)}" + (f" (wave {wave})" if wave > 1 else ""),
                 flush=True)
            launches.append(p)
        if dry_run:
            if launches:
                echo("(dry run: nothing was materialized; the sources were observed. Children of these assets "
                     "become unsynced only if their parents' data versions change.)")
            break
        progressed = False
        for outcome in _run_wave(runner, instance, launches, execution, say):
            if outcome.success:
                say(f"{outcome.label}: done in {outcome.seconds:.1f} s (run {outcome.run_id[:8]})")
                progressed = True
            else:
                failed[outcome.label] = outcome.run_id
                say(f"{outcome.label}: FAILED after {outcome.seconds:.1f} s (run {outcome.run_id[:8]})" +
                    "".join(f"\n    {line}" for line in outcome.errors))
        if not progressed:
            break
    else:
        echo(f"stopped after {max_waves} waves; run again to continue")
    return len(failed) + len(blocked)


def _run_wave(runner: _Runner, instance: DagsterInstance, launches: list[UnitPlan], execution: Execution, say):
    """Run the wave's units, at most ``runs`` at a time; yields each outcome as it finishes."""
    if not launches:
        return
    if execution.serial:
        runs = 1
    else:
        limit = execution.max_runs or instance.get_concurrency_config().run_queue_config.max_concurrent_runs
        runs = max(1, min(len(launches), limit if limit and limit > 0 else len(launches), execution.max_concurrent))
    shares = _shares(1 if execution.serial else execution.max_concurrent, runs)
    tokens = {p.unit.label: uuid.uuid4().hex for p in launches}
    with heartbeat(instance, tokens, say) as in_flight:
        if runs == 1:
            for p in launches:
                in_flight.start(p.unit.label)
                outcome = runner.run(p, tokens[p.unit.label], shares[0])
                in_flight.finish(p.unit.label)
                yield outcome
            return
        # Several runs at once go in processes of their own, each the run worker of its run:
        # Dagster reconfigures Python logging whenever a run starts (logging.config.dictConfig),
        # which deadlocks against another run logging in a thread of the same process.
        ctx = multiprocessing.get_context(_unit_start_method())
        if ctx.get_start_method() == "forkserver":
            ctx.set_forkserver_preload(_PRELOAD)
        free = list(range(runs))  # which share of the step processes each run in flight has
        queue = list(launches)
        pending: dict = {}  # connection -> (plan, share index, process)

        def submit(p: UnitPlan) -> None:
            slot = free.pop(0)
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_unit_worker, name=f"mihd-run-{p.unit.label}", daemon=False,
                               args=(send, runner.spec(), p, tokens[p.unit.label], shares[slot]))
            in_flight.start(p.unit.label)
            proc.start()
            send.close()
            pending[receive] = (p, slot, proc)

        interrupted = False
        # Ctrl-C reaches the run processes with the terminal's signal; a SIGTERM to this process
        # alone is passed on. No new run starts after either; the interrupt goes on once all stopped.
        with capture_interrupts():
            while queue and free:
                submit(queue.pop(0))
            while pending:
                ready = multiprocessing.connection.wait(list(pending), timeout=0.5)
                if check_captured_interrupt() and not interrupted:
                    interrupted = True
                    queue.clear()
                    say("interrupted: stopping the running steps")
                    for _, _, proc in pending.values():
                        if proc.is_alive():
                            os.kill(proc.pid, signal.SIGINT)
                for receive in ready:
                    p, slot, proc = pending.pop(receive)
                    try:
                        outcome = receive.recv()
                    except EOFError:  # the run process died without a word (killed)
                        proc.join()
                        outcome = _Outcome(p.unit.label, "?", False, time.perf_counter() - in_flight.now()[p.unit.label],
                                           [f"the process running this unit (pid {proc.pid}) ended with exit code "
                                            f"{proc.exitcode}; the next `mihd materialize` marks its run failed"])
                    receive.close()
                    proc.join()
                    in_flight.finish(p.unit.label)
                    free.append(slot)
                    if isinstance(outcome, Exception):  # as a run in this process would raise it
                        raise outcome
                    yield outcome
                while queue and free:
                    submit(queue.pop(0))
        if interrupted:
            raise KeyboardInterrupt


_PRELOAD = [DEFINITIONS_MODULE, "dagster_project.worker_preload"]


def _unit_start_method() -> str:
    return "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"


def _unit_worker(send, spec: dict, p: UnitPlan, token: str, processes: int) -> None:
    """In a process of its own: run one unit and send back its outcome (or the exception)."""
    from dagster_project.definitions import defs

    with DagsterInstance.get() as instance:
        runner = _Runner(defs, instance, spec["log_level"], spec["tags"], spec["execution"])
        try:
            outcome = runner.run(p, token, processes)
        except Exception as err:
            outcome = err
    send.send(outcome)
    send.close()
    if isinstance(outcome, Exception):
        raise outcome


class _InFlight:
    def __init__(self):
        self.started: dict[str, float] = {}
        self.lock = threading.Lock()

    def start(self, label: str) -> None:
        with self.lock:
            self.started[label] = time.perf_counter()

    def finish(self, label: str) -> None:
        with self.lock:
            self.started.pop(label, None)

    def now(self) -> dict[str, float]:
        with self.lock:
            return dict(self.started)


@contextmanager
def heartbeat(instance: DagsterInstance, tokens: dict[str, str], say, every_s: float = 20.0):
    """A progress line per run in flight at least every ``every_s`` seconds: elapsed time, steps
    finished, and the steps running now (read from the run's event log, found by its token tag)."""
    from dagster import DagsterEventType, RunsFilter

    stop = threading.Event()
    in_flight = _InFlight()

    def beat():
        while not stop.wait(every_s):
            for label, started in in_flight.now().items():
                line = f"  ... {label}: {time.perf_counter() - started:.0f} s"
                records = instance.get_run_records(filters=RunsFilter(tags={TAG_ATTEMPT: tokens[label]}), limit=1)
                if not records:
                    say(line)
                    continue
                run_id = records[0].dagster_run.run_id
                begun = instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)
                done = instance.all_logs(run_id, of_type={DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE})
                finished = {e.step_key for e in done}
                running = [e.step_key for e in begun if e.step_key not in finished]
                more = f" (+{len(running) - 2})" if len(running) > 2 else ""
                say(f"{line}, {len(finished)} step(s) done" +
                    (f", running {', '.join(running[-2:])}{more}" if running else ""))

    thread = threading.Thread(target=beat, name="mihd-heartbeat", daemon=True)
    thread.start()
    try:
        yield in_flight
    finally:
        stop.set()
        thread.join()
