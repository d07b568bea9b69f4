"""The geometry demo: materialize the family's missing or stale assets on the demo slides.

Its data are the demo Visium slides the slides family already wrote and materialized
(two trained on, one held out), so it writes no data of its own.
"""

from __future__ import annotations

import time

from dagster import DagsterInstance

from mihd_assets.slides.assets import RAW_SLIDE

from .assets import PLAN
from .definitions import GEOMETRY_JOB_NAME


def run_demo(instance: DagsterInstance, verbose: bool = False) -> int:
    from dagster_project.cli import _step_errors
    from dagster_project.definitions import defs
    from dagster_project.freshness import latest_materialization, plan_for_graph

    job = defs.resolve_job_def(GEOMETRY_JOB_NAME)
    keys = set(job.asset_layer.executable_asset_keys)
    missing = [s for s in PLAN.train_slides + PLAN.heldout_slides if latest_materialization(instance, RAW_SLIDE, s) is None]
    if missing:
        print(f"geometry: slides {missing} have no raw_slide materialization; run `mihd materialize` first")
        return 1
    # raw_slide joins the plan so a newer slide materialization makes the training set stale.
    plan = plan_for_graph(instance, defs.resolve_asset_graph(), keys | {RAW_SLIDE}, None)
    todo = [k for k in plan.to_materialize if k in keys]
    if not todo:
        print("geometry: fresh, nothing to do")
        return 0
    print("geometry: materializing " + ", ".join(f"{k.to_user_string()} ({plan.reasons[k.to_user_string()]})" for k in todo), flush=True)
    started = time.perf_counter()
    result = job.execute_in_process(
        instance=instance,
        asset_selection=todo,
        raise_on_error=False,
        tags={"mihd/launched_by": "mihd demo"},
        run_config={"loggers": {"console": {"config": {"log_level": "INFO" if verbose else "WARNING"}}}},
    )
    seconds = time.perf_counter() - started
    if not result.success:
        print(f"geometry: FAILED after {seconds:.1f} s (run {result.run_id[:8]})")
        for line in _step_errors(result):
            print(f"    {line}")
        return 1
    print(f"geometry: done in {seconds:.1f} s (run {result.run_id[:8]}); "
          '.venv/bin/mihd sql "SELECT * FROM geometry_methods_latest"')
    return 0
