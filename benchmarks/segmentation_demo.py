"""Wall time of the segmentation family's demo (E0-E5 on the synthetic ROSMAP cohort), run
twice in a fresh MIHD home: the second run must find everything fresh.

    .venv/bin/python benchmarks/segmentation_demo.py [--home DIR]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--home", help="MIHD_HOME to use (default: a new temporary folder)")
    parser.add_argument("--once", action="store_true", help="run the demo once only")
    args = parser.parse_args()
    home = Path(args.home or tempfile.mkdtemp(prefix="mihd_seg_demo_"))
    os.environ.update({"MIHD_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home"), "MIHD_PROFILE": "demo",
                       "MIHD_ALLOW_RANDOM_WEIGHTS": "1"})
    for name in ("MIHD_TILES_ROOT", "MIHD_CLINICAL", "MIHD_CELLPOSE_WEIGHTS"):
        os.environ.pop(name, None)
    import torch

    from dagster_project.cli import _instance
    from mihd_assets.segmentation.demo import run_demo

    print(f"MIHD_HOME={home}; torch threads {torch.get_num_threads()}; cpus {os.cpu_count()}", flush=True)
    times = []
    for attempt in (1,) if args.once else (1, 2):
        started = time.perf_counter()
        failures = run_demo(_instance(), verbose=False)
        times.append(time.perf_counter() - started)
        print(f"run {attempt}: {times[-1]:.1f} s, {failures} failure(s)", flush=True)
        if failures:
            return 1
    if len(times) == 2:
        print(f"second/first = {times[1] / times[0]:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
