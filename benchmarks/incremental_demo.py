"""Time the demo command twice in a fresh MIHD home: the second run must recompute nothing.

    .venv/bin/python benchmarks/incremental_demo.py [--keep]

Prints both wall times, the ratio (target <= 0.10) and whether the second run started any
Dagster run. Both runs are measured side by side in one invocation on the same machine.
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


def run_demo(env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "dagster_project.cli", "demo"],
        cwd=REPO, env=env, capture_output=True, text=True,
    )
    seconds = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"demo failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return seconds, proc.stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--keep", action="store_true", help="keep the temporary MIHD home")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mihd_bench_"))
    env = {k: v for k, v in os.environ.items() if k not in ("MIHD_DATA_ROOT", "MIHD_DUCKDB", "MIHD_STORAGE")}
    env.update(MIHD_HOME=str(home), DAGSTER_HOME=str(home / "dagster_home"))
    try:
        first, _ = run_demo(env)
        second, out2 = run_demo(env)
    finally:
        if not args.keep:
            shutil.rmtree(home, ignore_errors=True)
    materialized = "materializing" in out2
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus")
    print(f"first run (fresh home):      {first:8.1f} s")
    print(f"second run (nothing changed): {second:8.1f} s")
    print(f"ratio second/first: {second / first:.3f} (target <= 0.10); second run materialized anything: {materialized}")
    if materialized or second / first > 0.10:
        sys.exit(1)


if __name__ == "__main__":
    main()
