"""`mihd demo` for the segmentation family: synthetic ROSMAP tiles, then E0-E5 on them.

Idempotent: the data generator skips an unchanged cohort, and every job selects only the
assets that are missing or stale (code version, input files, newer upstream).
"""

from __future__ import annotations

import time

from dagster import AssetKey, AssetRecordsFilter, DagsterInstance

from mihd_assets.fileio import tree_fingerprint
from mihd_resources import settings

DEMO_FOLDER = "rosmap"


def _root_cause(result) -> list[str]:
    lines = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = event.event_specific_data.error
            while err is not None and err.cause is not None:
                err = err.cause
            lines.append(f"{event.step_key}: {err.message.strip() if err else 'failed'}")
    return lines


def _latest_storage_id(instance: DagsterInstance, key: AssetKey) -> int | None:
    records = instance.fetch_materializations(AssetRecordsFilter(asset_key=key), limit=1, ascending=False).records
    return records[0].storage_id if records else None


def _execute(job, instance, selection, partition, verbose: bool, label: str) -> bool:
    started = time.perf_counter()
    result = job.execute_in_process(
        instance=instance, partition_key=partition, asset_selection=selection, raise_on_error=False,
        tags={"mihd/launched_by": "mihd demo", "mihd/profile": settings.profile()},
        run_config={"loggers": {"console": {"config": {"log_level": "INFO" if verbose else "WARNING"}}}},
    )
    seconds = time.perf_counter() - started
    print(f"  {label}: {'done' if result.success else 'FAILED'} in {seconds:.1f} s", flush=True)
    for line in _root_cause(result):
        print(f"    {line}", flush=True)
    return result.success


def run_demo(instance: DagsterInstance, verbose: bool = False) -> int:
    from dagster_project.definitions import defs
    from dagster_project.freshness import plan_for_graph
    from mihd_assets.demo.rosmap import generate_rosmap_demo

    from .assets import E5_COUNTS, E5_STATS
    from .definitions import BENCHMARK_JOB_NAME, BENCHMARK_KEYS, E5_DONOR_JOB_NAME, SUMMARY_JOB_NAME, SUMMARY_KEYS
    from .partitions import discover_donors, donors_partitions

    root = settings.demo_root() / DEMO_FOLDER
    if settings.tiles_root() != root / "tiles":
        print(f"  MIHD_TILES_ROOT points at {settings.tiles_root()}; the segmentation demo runs on its own data only - unset it")
        return 1
    started = time.perf_counter()
    manifest = generate_rosmap_demo(root)
    print(f"  demo cohort: {manifest['n_donors']} donors, {manifest['n_tiles']} tiles, {manifest['n_annotated']} annotated "
          f"({time.perf_counter() - started:.1f} s)", flush=True)
    new, refused = discover_donors(instance)
    for message in refused:
        print(f"  refused donor folder: {message}")
    if new:
        instance.add_dynamic_partitions(donors_partitions.name, new)
        print(f"  registered {len(new)} donor partition(s)")
    graph = defs.resolve_asset_graph()
    failures = 0

    unpartitioned = set(BENCHMARK_KEYS) | set(SUMMARY_KEYS)
    plan = plan_for_graph(instance, graph, unpartitioned, None)
    todo = [k for k in plan.to_materialize if k in set(BENCHMARK_KEYS)]
    if todo:
        print(f"  E0-E4: materializing {len(todo)} asset(s)", flush=True)
        failures += not _execute(defs.resolve_job_def(BENCHMARK_JOB_NAME), instance, todo, None, verbose, "E0-E4")
    else:
        print("  E0-E4: fresh, nothing to do")

    donor_job = defs.resolve_job_def(E5_DONOR_JOB_NAME)
    donor_keys = set(donor_job.asset_layer.executable_asset_keys)
    donors = instance.get_dynamic_partitions(donors_partitions.name)
    fingerprints = {E5_COUNTS: lambda d: tree_fingerprint(settings.tiles_root() / d)}
    fresh = 0
    for i, donor in enumerate(donors, 1):
        donor_plan = plan_for_graph(instance, graph, donor_keys, donor, fingerprints)
        # A newer checkpoint upstream (unpartitioned) makes every donor's counts stale.
        counts_at = _latest_for_partition(instance, E5_COUNTS, donor)
        upstream_newer = counts_at is not None and any(
            (_latest_storage_id(instance, k) or 0) > counts_at for k in graph.get(E5_COUNTS).parent_keys
        )
        selection = donor_plan.to_materialize or (sorted(donor_keys) if upstream_newer else [])
        if not selection:
            fresh += 1
            continue
        failures += not _execute(donor_job, instance, selection, donor, verbose, f"E5 donor {i}/{len(donors)} {donor}")
    if fresh:
        print(f"  E5: {fresh} donor(s) fresh")

    plan = plan_for_graph(instance, graph, unpartitioned, None)
    todo = [k for k in plan.to_materialize if k in set(SUMMARY_KEYS)]
    stats_at = _latest_storage_id(instance, E5_STATS)
    if stats_at is not None and (_latest_storage_id(instance, E5_COUNTS) or 0) > stats_at:
        todo = list(SUMMARY_KEYS)
    if todo:
        failures += not _execute(defs.resolve_job_def(SUMMARY_JOB_NAME), instance, todo, None, verbose, "E5 statistics + report")
    else:
        print("  E5 statistics + report: fresh, nothing to do")
    print(f"  segmentation demo: {failures} failure(s) in {time.perf_counter() - started:.1f} s", flush=True)
    return failures


def _latest_for_partition(instance: DagsterInstance, key: AssetKey, partition: str) -> int | None:
    records = instance.fetch_materializations(
        AssetRecordsFilter(asset_key=key, asset_partitions=[partition]), limit=1, ascending=False
    ).records
    return records[0].storage_id if records else None
