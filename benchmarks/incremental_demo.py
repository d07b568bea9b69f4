"""Time the demo command twice in a fresh MIHD home: the second run must recompute nothing.

    .venv/bin/python benchmarks/incremental_demo.py [--keep]

Prints both wall times, the ratio (target <= 0.10), whether the second run materialized
anything, the longest silence between two output lines of the first run (target <= 30 s) and
the five slowest steps. Both runs are measured side by side in one invocation on the same machine.
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


def run_demo(env: dict) -> tuple[float, str, float]:
    """Wall seconds, stdout, and the longest gap between two lines of output (stdout or stderr)."""
    started = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dagster_project.cli", "demo"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines, last, longest = [], started, 0.0
    for line in proc.stdout:
        now = time.perf_counter()
        longest = max(longest, now - last)
        last = now
        lines.append(line)
    proc.wait()
    seconds = time.perf_counter() - started
    out = "".join(lines)
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({proc.returncode}):\n{out[-5000:]}")
    return seconds, out, longest


def step_durations(dagster_home: Path) -> list[tuple[str, float]]:
    """(step key, seconds) of every successful step of every run in the home."""
    from dagster import DagsterEventType, DagsterInstance
    from dagster._core.instance.ref import InstanceRef

    instance = DagsterInstance.from_ref(InstanceRef.from_dir(str(dagster_home)))
    steps = []
    for record in instance.get_run_records():
        for event in instance.all_logs(record.dagster_run.run_id, of_type=DagsterEventType.STEP_SUCCESS):
            steps.append((event.step_key, event.dagster_event.event_specific_data.duration_ms / 1000))
    return sorted(steps, key=lambda s: -s[1])


def by_family(steps: list[tuple[str, float]]) -> list[tuple[str, int, float]]:
    """(family, steps, seconds) with the family the step key's first path part, slowest first."""
    totals: dict[str, list] = {}
    for key, seconds in steps:
        family = key.split("__", 1)[0]
        entry = totals.setdefault(family, [0, 0.0])
        entry[0] += 1
        entry[1] += seconds
    return sorted(((f, n, s) for f, (n, s) in totals.items()), key=lambda t: -t[2])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the temporary MIHD home")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mihd_bench_"))
    env = {k: v for k, v in os.environ.items() if k not in ("MIHD_DATA_ROOT", "MIHD_DUCKDB", "MIHD_STORAGE")}
    env.update(MIHD_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home"))
    try:
        first, _, silence = run_demo(env)
        steps = step_durations(home / "dagster_home")
        second, out2, _ = run_demo(env)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    materialized = "materializing" in out2
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus")
    print(f"first run (fresh home):      {first:8.1f} s (longest silence between output lines {silence:.1f} s)")
    print(f"second run (nothing changed): {second:8.1f} s")
    print(f"ratio second/first: {second / first:.3f} (target <= 0.10); second run materialized anything: {materialized}")
    print("slowest steps of the first run: " + ", ".join(f"{k} {s:.1f} s" for k, s in steps[:5]))
    in_steps = sum(s for _, s in steps)
    print(f"{len(steps)} steps, {in_steps:.1f} s inside steps, {first - in_steps:.1f} s outside them "
          "(demo data, run start-up, Dagster's bookkeeping between steps)")
    print("per family: " + ", ".join(f"{f} {n} steps {s:.1f} s" for f, n, s in by_family(steps)))
    if materialized or second / first > 0.10 or silence > 30:
        sys.exit(1)


if __name__ == "__main__":
    main()
