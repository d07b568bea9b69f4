"""Time the demo's slide family through `mihd materialize`: parallel (the multiprocess executor,
several slides at once) against `--serial` (in process, one step at a time), side by side.

    .venv/bin/python benchmarks/parallel_demo.py [--slides 2] [--tiny] [--max-concurrent N] [--keep]

Each path runs in its own fresh MIHD home on the same demo slides (MIHD_PROFILE=demo, random
weights), the parallel one first. Prints both wall times, the ratio parallel/serial, how many
steps overlapped in time in the parallel run (its widest moment), and that both materialized
the same assets. Exits 1 when a run fails or the two paths differ in what they materialized.
``--tiny``: the tests' tiny demo slides (same generator, ~150 spots) instead of full demo ones.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GROUPS = ["slides", "embeddings", "fusion", "clustering", "evaluation", "reports"]


def run_materialize(env: dict, extra: list[str]) -> tuple[float, str]:
    started = time.perf_counter()
    args = [sys.executable, "-m", "dagster_project.cli", "materialize", *sum((["--only", g] for g in GROUPS), []), *extra]
    proc = subprocess.run(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"`{' '.join(args[2:])}` failed ({proc.returncode}):\n{proc.stdout[-5000:]}")
    return seconds, proc.stdout


def step_profile(dagster_home: Path) -> tuple[int, int, set[tuple[str, str]]]:
    """(steps run, most steps running at one moment, materialized (asset, partition) pairs)."""
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home)))
    edges, steps, materialized = [], 0, set()
    for record in instance.get_run_records():
        run_id = record.dagster_run.run_id
        starts = {e.step_key: e.timestamp for e in instance.all_logs(run_id, of_type=DagsterEventType.STEP_START)}
        for e in instance.all_logs(run_id, of_type={DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE}):
            if e.step_key in starts:
                steps += 1
                edges += [(starts[e.step_key], 1), (e.timestamp, -1)]
        for e in instance.all_logs(run_id, of_type=DagsterEventType.ASSET_MATERIALIZATION):
            m = e.dagster_event.event_specific_data.materialization
            materialized.add((m.asset_key.to_user_string(), m.partition or ""))
    widest = running = 0
    for _, delta in sorted(edges, key=lambda x: (x[0], x[1])):
        running += delta
        widest = max(widest, running)
    return steps, widest, materialized


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=2, help="demo slides (1 or 2; default 2)")
    parser.add_argument("--max-concurrent", type=int, default=os.cpu_count(), help="step processes (default: the CPUs)")
    parser.add_argument("--tiny", action="store_true", help="tiny demo slides (the tests' spec)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary homes")
    args = parser.parse_args()
    from mihd_assets.demo.visium import generate_demo_slides, tiny_spec

    root = Path(tempfile.mkdtemp(prefix="mihd_parallel_bench_"))
    if args.keep:
        print(f"homes and data under {root}", flush=True)
    base = {k: v for k, v in os.environ.items() if k not in ("MIHD_DUCKDB", "MIHD_STORAGE", "MIHD_MAX_CONCURRENT")}
    base.update(MIHD_DATA_ROOT=str(root / "visium"), MIHD_PROFILE="demo", MIHD_ALLOW_RANDOM_WEIGHTS="1")
    figures = {}
    try:
        generate_demo_slides(root / "visium", n_slides=args.slides, **({"spec": tiny_spec()} if args.tiny else {}))
        for name, extra in (("parallel", ["--max-concurrent", str(args.max_concurrent)]), ("serial", ["--serial"])):
            home = root / name
            env = {**base, "MIHD_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home")}
            seconds, _ = run_materialize(env, extra)
            figures[name] = (seconds, *step_profile(home / "dagster_home"))
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    (p_s, p_steps, p_wide, p_mat), (s_s, s_steps, s_wide, s_mat) = figures["parallel"], figures["serial"]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, load average now {load:.1f}")
    print(f"demo slides: {args.slides}{' (tiny)' if args.tiny else ''}; groups: {', '.join(GROUPS)}")
    print(f"parallel (--max-concurrent {args.max_concurrent}): {p_s:8.1f} s, {p_steps} steps, "
          f"at most {p_wide} at once")
    print(f"serial (--serial):           {s_s:8.1f} s, {s_steps} steps, at most {s_wide} at once")
    print(f"ratio parallel/serial: {p_s / s_s:.3f}; same assets materialized: {p_mat == s_mat} ({len(p_mat)})")
    if p_mat != s_mat:
        print(f"  only parallel: {sorted(p_mat - s_mat)[:10]}\n  only serial: {sorted(s_mat - p_mat)[:10]}")
        sys.exit(1)


if __name__ == "__main__":
    main()
