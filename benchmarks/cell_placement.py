"""Wall time of geometry/cell_placement at 2,500 / 5,000 / 10,000 cells with the demo checkpoint.

    .venv/bin/python benchmarks/cell_placement.py [--home DIR] [--sizes 2500 5000 10000] [--threads 2] [--evaluate]
    .venv/bin/python benchmarks/cell_placement.py --home DIR --demo   # the demo's own dataset, as `mihd demo` runs it

``--home``: a MIHD home whose demo checkpoint to use (``make demo`` leaves one in ``.mihd``);
without it a temporary home is made and the demo checkpoint trained there as `mihd demo` does
(demo slides, raw_slide, training set, checkpoint: a few minutes on 2 cores, not timed). The
cell datasets are made from the held-out demo slide (each spot split into as many cells as the
size needs, then the first N of the shuffled cells) under ``<home>/bench_cells``, and each is
placed by the real asset (one in-process Dagster run per size, CPU). Prints, per size, the
run's wall time, the asset's own ``seconds`` (read to written), the model's and the join's
seconds, and the cost per cell relative to the smallest size (1.0 = linear).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _train_demo_checkpoint(home: Path) -> None:
    from dagster_project.cli import _instance, cmd_demo_data
    from dagster_project.definitions import defs
    from dagster_project.jobs import SLIDE_JOB_NAME
    from mihd_assets.demo.visium import slide_ids
    from mihd_assets.geometry import assets as geo
    from mihd_assets.slides.assets import RAW_SLIDE

    cmd_demo_data(argparse.Namespace(slides=3))
    instance = _instance()
    instance.add_dynamic_partitions("slides", [s for s in slide_ids(3)
                                               if s not in instance.get_dynamic_partitions("slides")])
    slide_job = defs.resolve_job_def(SLIDE_JOB_NAME)
    for slide in slide_ids(3):
        assert slide_job.execute_in_process(instance=instance, partition_key=slide, asset_selection=[RAW_SLIDE]).success
    result = defs.resolve_job_def("geometry_job").execute_in_process(
        instance=instance, asset_selection=[geo.TRAINING_SET_KEY, geo.CHECKPOINT_KEY])
    assert result.success


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--home", type=Path, help="MIHD home holding the demo checkpoint (default: train one in a temporary home)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2500, 5000, 10000])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the bar: 2 cores)")
    parser.add_argument("--evaluate", action="store_true", help="also score each layout (not timed as placement)")
    parser.add_argument("--demo", action="store_true",
                        help="instead: the demo's own cell dataset as `mihd demo` makes it (writer, observation, placement, "
                             "evaluation), each timed, and the whole-layout score beside the baselines and the per-set score")
    args = parser.parse_args()
    home = (args.home or Path(tempfile.mkdtemp(prefix="mihd_cells_bench_"))).resolve()
    cells_root = home / "bench_cells"
    os.environ.update({"MIHD_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home"), "MIHD_PROFILE": "demo",
                       "MIHD_CELLS_ROOT": str(cells_root)})
    os.environ.pop("MIHD_DATA_ROOT", None)

    import torch

    torch.set_num_threads(args.threads)
    from dagster_project.cli import _instance
    from dagster_project.definitions import defs
    from mihd_assets.geometry.cells import CellSplit, cells_from_slide, write_cells
    from mihd_assets.geometry.config import geometry_plan
    from mihd_assets.geometry.placement_assets import CELL_EVALUATION_KEY, CELL_PLACEMENT_KEY
    from mihd_assets.slides.io import read_slide
    from mihd_resources import settings
    from mihd_resources.geometry_store import CHECKPOINT

    checkpoint = settings.storage_root() / "geometry" / CHECKPOINT
    if not checkpoint.is_file():
        print(f"no demo checkpoint at {checkpoint}: training it (not timed)", flush=True)
        started = time.perf_counter()
        _train_demo_checkpoint(home)
        print(f"  trained in {time.perf_counter() - started:.0f} s", flush=True)
    instance = _instance()
    if args.demo:
        return _demo(instance, defs)
    slide = geometry_plan().heldout_slides[0]
    spots = read_slide(settings.demo_root() / "visium" / slide, slide)
    n_spots = int((spots.obs["in_tissue"] == 1).sum())
    job = defs.resolve_job_def("cell_placement_job")
    rows = []
    for n in args.sizes:
        name = f"bench_{n}"
        per_spot = math.ceil(n / n_spots)
        cells = cells_from_slide(spots, slide, CellSplit(cells_per_spot=per_spot, seed=0))[:n].copy()
        write_cells(cells, cells_root / f"{name}.h5ad")
        if name not in instance.get_dynamic_partitions("cell_datasets"):
            instance.add_dynamic_partitions("cell_datasets", [name])
        started = time.perf_counter()
        result = job.execute_in_process(instance=instance, partition_key=name, asset_selection=[CELL_PLACEMENT_KEY],
                                        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
        wall = time.perf_counter() - started
        assert result.success
        meta = result.asset_materializations_for_node("geometry__cell_placement")[0].metadata
        row = {"cells": n, "cells_per_spot": per_spot, "sets": meta["sets"].value, "set_size": meta["set_size"].value,
               "run_wall_s": round(wall, 2), "asset_s": meta["seconds"].value,
               "model_s": meta["model_seconds"].value, "join_s": meta["join_seconds"].value}
        if args.evaluate:
            scored = job.execute_in_process(instance=instance, partition_key=name, asset_selection=[CELL_EVALUATION_KEY])
            jac = scored.asset_materializations_for_node("geometry__cell_placement_evaluation")[0].metadata["knn_jaccard_10"].value
            row.update({f"jaccard10_{k}": v for k, v in jac.items()})
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["asset_s"] / rows[0]["cells"]
    print(f"\ncell_placement on {os.cpu_count()} CPUs, {args.threads} torch threads, load average "
          f"{os.getloadavg()[0]:.1f}; checkpoint {checkpoint}")
    print("| cells | sets x size | run wall s | asset s | model s | join s | cost per cell vs smallest |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['cells']:,} | {r['sets']} x {r['set_size']} | {r['run_wall_s']} | {r['asset_s']} | {r['model_s']} | "
              f"{r['join_s']} | {r['asset_s'] / r['cells'] / base:.2f} |")
    return 0


def _demo(instance, defs) -> int:
    """The demo's cell dataset through the same steps as `mihd demo`, each timed."""
    from mihd_assets.geometry.cell_datasets import OBSERVE_CELLS_JOB_NAME, discover_cell_datasets
    from mihd_assets.geometry.config import geometry_plan
    from mihd_assets.geometry.demo import demo_dataset_name, write_demo_data
    from mihd_assets.geometry.placement_assets import CELL_EVALUATION_KEY, CELL_PLACEMENT_KEY
    from mihd_resources import settings
    from mihd_resources.metrics_store import read_only_query

    os.environ["MIHD_CELLS_ROOT"] = str(settings.demo_root() / "cells")
    quiet = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}
    seconds = {}
    started = time.perf_counter()
    print(write_demo_data())
    seconds["demo cell dataset written"] = time.perf_counter() - started
    new, refused = discover_cell_datasets(instance)
    assert not refused, refused
    if new:
        instance.add_dynamic_partitions("cell_datasets", new)
    started = time.perf_counter()
    assert defs.resolve_job_def(OBSERVE_CELLS_JOB_NAME).execute_in_process(instance=instance, run_config=quiet).success
    seconds["cell dataset files observed"] = time.perf_counter() - started
    name = demo_dataset_name(geometry_plan().heldout_slides[0])
    job = defs.resolve_job_def("cell_placement_job")
    for key in (CELL_PLACEMENT_KEY, CELL_EVALUATION_KEY):
        started = time.perf_counter()
        result = job.execute_in_process(instance=instance, partition_key=name, asset_selection=[key], run_config=quiet)
        assert result.success
        seconds[key.to_user_string()] = time.perf_counter() - started
    for what, value in seconds.items():
        print(f"  {what}: {value:.1f} s")
    print(f"  total: {sum(seconds.values()):.1f} s (load average {os.getloadavg()[0]:.1f})")
    print(read_only_query(settings.duckdb_path(), (
        "SELECT scope, method, knn_jaccard_10, knn_jaccard_30, distance_spearman, trustworthiness, n_cells, "
        f"n_cells_pairs, n_sets, jaccard_10_over_best_baseline FROM cell_placement_vs_baselines WHERE dataset_id = '{name}'"
    )).to_string(index=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
