"""Wall time of the geometry demo configuration: training set, training + checkpoints, evaluation.

    .venv/bin/python benchmarks/geometry_demo.py [--threads 2]

Writes the three demo slides into a temporary MIHD home, materializes their raw_slide
(not timed: the slides family's work), then times the geometry family as `mihd demo` runs
it (`mihd materialize --only geometry`: tiny size, CPU) and prints each step's seconds and
the held-out metrics; a second pass must find everything fresh.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the bar: 2 cores)")
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="mihd_geometry_bench_"))
    os.environ.update({"MIHD_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home"), "MIHD_PROFILE": "demo"})
    os.environ.pop("MIHD_DATA_ROOT", None)

    import torch

    torch.set_num_threads(args.threads)
    from dagster_project.cli import _instance, cmd_demo_data, cmd_materialize
    from dagster_project.definitions import defs
    from dagster_project.jobs import SLIDE_JOB_NAME
    from mihd_assets.demo.visium import slide_ids
    from mihd_assets.slides.assets import RAW_SLIDE
    from mihd_resources.metrics_store import read_only_query
    from mihd_resources import settings

    cmd_demo_data(argparse.Namespace(slides=3))
    instance = _instance()
    instance.add_dynamic_partitions("slides", slide_ids(3))
    slide_job = defs.resolve_job_def(SLIDE_JOB_NAME)
    for slide in slide_ids(3):
        assert slide_job.execute_in_process(instance=instance, partition_key=slide, asset_selection=[RAW_SLIDE]).success

    def geometry(dry_run: bool = False) -> int:
        return cmd_materialize(argparse.Namespace(partition=None, only=["geometry"], dry_run=dry_run, verbose=False,
                                                  serial=True, max_concurrent=None))

    started = time.perf_counter()
    failures = geometry()
    total = time.perf_counter() - started
    run = instance.get_run_records(limit=1)[0].dagster_run
    print(f"\ngeometry job: {total:.1f} s wall with {args.threads} torch threads on {os.cpu_count()} CPUs "
          f"(load average before: {os.getloadavg()[0]:.1f}); failures: {failures}")
    for stat in instance.get_run_step_stats(run.run_id):
        print(f"  {stat.step_key}: {stat.end_time - stat.start_time:.1f} s")
    print(read_only_query(settings.duckdb_path(), "SELECT * FROM geometry_methods_latest").to_string(index=False))
    print(read_only_query(settings.duckdb_path(), "SELECT sigma_bin, n, round(scale_ratio, 3) AS scale_ratio, "
                          "round(knn_jaccard, 3) AS knn_jaccard FROM geometry_scale_by_sigma").to_string(index=False))
    again = time.perf_counter()
    failures += geometry()  # unchanged inputs: must say "fresh"
    print(f"second run: {time.perf_counter() - again:.1f} s")
    print(f"(home: {home})")
    return failures


if __name__ == "__main__":
    sys.exit(main())
