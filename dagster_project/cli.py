"""`mihd`: the platform's command line.

    mihd demo                 write the demo data and materialize every asset on it
    mihd demo-data            only write the demo data (idempotent)
    mihd materialize          register new slides, materialize missing or stale assets
    mihd sql "SELECT ..."     run read-only SQL against the metrics database
    mihd import-embeddings D  record an old embeddings_cache/ folder as embedding materializations
    mihd cells-from-slide S   turn a labelled Visium slide into a cell dataset with hidden positions
    mihd relay                run the leaderboard's submission relay (uvicorn)
    mihd submit ...           package labels as a submission bundle, show it, send it with consent
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from dagster_project.instance_check import InstanceStorageError, check_instance_storage
from mihd_resources import settings

DEMO_SLIDES = 3


def _instance():
    from dagster import DagsterInstance

    if not os.environ.get("DAGSTER_HOME"):
        home = settings.mihd_home() / "dagster_home"
        os.environ["DAGSTER_HOME"] = str(home)
    home = Path(os.environ["DAGSTER_HOME"])
    home.mkdir(parents=True, exist_ok=True)
    if not (home / "dagster.yaml").exists():
        (home / "dagster.yaml").write_text((Path(__file__).parent / "dagster.yaml").read_text())
    check_instance_storage(home)  # a Postgres instance: connect once, name the setting if that fails
    return DagsterInstance.get()


def cmd_demo_data(args) -> int:
    from mihd_assets.demo.visium import generate_demo_slides

    root = settings.demo_root() / "visium"
    started = time.perf_counter()
    print(f"demo slides in {root}:", flush=True)

    def ready(s: dict) -> None:  # one line per slide as it is written (about 11 s each)
        print(f"  {s['slide_id']}: {s['n_spots']} spots x {s['n_genes']} genes, image {s['image_px'][1]}x{s['image_px'][0]} px "
              f"({time.perf_counter() - started:.1f} s)", flush=True)

    generate_demo_slides(root, n_slides=args.slides, progress=ready)
    return 0


def _register_partitions(instance, echo=print) -> None:
    """Register new slide, donor and cell dataset folders as partitions (invalid names are refused)."""
    from dagster_project.sensors import discover_slides
    from mihd_assets.geometry.cell_datasets import cell_datasets_partitions, discover_cell_datasets
    from mihd_assets.segmentation.partitions import discover_donors, donors_partitions
    from mihd_resources import StorageResource
    from mihd_resources.orchestration import slides_partitions

    storage = StorageResource(slides_root=str(settings.slides_root()))
    found = [(discover_slides(storage, instance), slides_partitions)]
    if settings.tiles_root().is_dir():
        found.append((discover_donors(instance), donors_partitions))
    if settings.cells_root().is_dir():
        found.append((discover_cell_datasets(instance), cell_datasets_partitions))
    for (new, refused), pdef in found:
        for message in refused:
            print(f"refused: {message}", file=sys.stderr)
        if new:
            instance.add_dynamic_partitions(pdef.name, new)
            echo(f"registered {pdef.name} partitions: {', '.join(new)}")


def _observe_sources(defs, instance) -> None:
    """Observe every input source (slide folders, donor tiles, annotations, clinical table, the
    leaderboard relay's queue)."""
    from dagster_project.jobs import OBSERVE_SLIDES_JOB_NAME
    from dagster_project.materialize import launcher_tags
    from mihd_assets.geometry.cell_datasets import OBSERVE_CELLS_JOB_NAME
    from mihd_assets.leaderboard.assets import OBSERVE_QUEUE_JOB_NAME
    from mihd_assets.segmentation.partitions import OBSERVE_JOB_NAME
    from mihd_resources.orchestration import step_errors

    for name in (OBSERVE_SLIDES_JOB_NAME, OBSERVE_JOB_NAME, OBSERVE_QUEUE_JOB_NAME, OBSERVE_CELLS_JOB_NAME):
        result = defs.resolve_job_def(name).execute_in_process(
            instance=instance, raise_on_error=False, tags={"mihd/launched_by": "mihd materialize", **launcher_tags()},
            run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        )
        if not result.success:
            raise RuntimeError(f"observing input sources ({name}) failed: " + "; ".join(step_errors(result)))


def _units(defs, instance, partitions: list[str] | None, groups: list[str] | None):
    """One unit per slide, one for the unpartitioned assets, one per donor, one per cell dataset
    (the order runs go in)."""
    from dagster_project.materialize import Unit
    from mihd_assets.geometry.cell_datasets import can_be_scored
    from mihd_assets.geometry.cells import CELL_DATASETS
    from mihd_assets.geometry.placement_assets import CELL_EVALUATION_KEY
    from mihd_assets.segmentation.partitions import donors_partitions
    from mihd_resources.orchestration import slides_partitions

    from dagster_project.families import family_missing_inputs

    graph = defs.resolve_asset_graph()
    skipped = family_missing_inputs(instance)
    for group, reason in sorted(skipped.items()):
        if not groups or group in groups:
            print(f"{group}: skipped - {reason}")
    by_partitioning: dict[str | None, list] = {}
    for key in graph.toposorted_asset_keys:
        node = graph.get(key)
        if not node.is_materializable or (groups and node.group_name not in groups) or node.group_name in skipped:
            continue
        by_partitioning.setdefault(node.partitions_def.name if node.partitions_def else None, []).append(key)
    units = []
    slides = partitions or instance.get_dynamic_partitions(slides_partitions.name)
    for slide in slides:
        units.append(Unit(slides_partitions.name, slide, by_partitioning.get(slides_partitions.name, [])))
    if not partitions:
        units.append(Unit(None, None, by_partitioning.get(None, [])))
        for donor in instance.get_dynamic_partitions(donors_partitions.name):
            units.append(Unit(donors_partitions.name, donor, by_partitioning.get(donors_partitions.name, [])))
        for dataset in instance.get_dynamic_partitions(CELL_DATASETS):
            keys = by_partitioning.get(CELL_DATASETS, [])
            if CELL_EVALUATION_KEY in keys and not can_be_scored(dataset):
                # Placed, not scored: a dataset without hidden positions has nothing to score against.
                print(f"{dataset}: {CELL_EVALUATION_KEY.to_user_string()} not planned - the dataset carries no "
                      "hidden positions (obsm['spatial_truth'])")
                keys = [k for k in keys if k != CELL_EVALUATION_KEY]
            units.append(Unit(CELL_DATASETS, dataset, keys))
    return [u for u in units if u.keys]


def _execution(args):
    """How runs execute: ``--serial`` in this process; else the multiprocess executor with
    ``--max-concurrent`` (or $MIHD_MAX_CONCURRENT, default: the CPUs) step processes."""
    from dagster_project.materialize import Execution, default_max_concurrent

    max_concurrent = getattr(args, "max_concurrent", None)
    if max_concurrent is not None and max_concurrent < 1:
        raise SystemExit("mihd: --max-concurrent must be at least 1")
    max_concurrent = max_concurrent or default_max_concurrent()
    # One step process at a time is in-process execution (no per-step process start-up).
    return Execution(serial=bool(getattr(args, "serial", False)) or max_concurrent == 1,
                     max_concurrent=max_concurrent)


def cmd_materialize(args) -> int:
    from dagster_project.definitions import defs
    from dagster_project.materialize import execute, reap_dead_runs

    try:
        execution = _execution(args)
    except ValueError as err:  # a malformed $MIHD_MAX_CONCURRENT
        print(f"mihd: {err}", file=sys.stderr)
        return 2
    instance = _instance()
    started = time.perf_counter()
    # Runs whose `mihd` process was killed would hold their gpu slots forever.
    reap_dead_runs(instance)
    _register_partitions(instance)
    _observe_sources(defs, instance)
    units = _units(defs, instance, args.partition, getattr(args, "only", None))
    if not units:
        print(f"no slides under {settings.slides_root()} and nothing else selected; nothing to do")
        return 0
    failures = execute(
        defs, instance, units, dry_run=args.dry_run, log_level="INFO" if args.verbose else "WARNING",
        tags={"mihd/launched_by": "mihd materialize", "mihd/profile": settings.profile()}, execution=execution,
    )
    print(f"materialize finished in {time.perf_counter() - started:.1f} s; "
          f"{failures} partition(s) failed or blocked", flush=True)
    return 1 if failures else 0


def cmd_sql(args) -> int:
    from tabulate import tabulate

    from mihd_resources.metrics_store import ensure_catalog, metrics_dir_for, read_only_query

    sql = Path(args.file).read_text() if args.file else args.query
    if not sql:
        print("give a query or --file", file=sys.stderr)
        return 2
    import duckdb

    database = args.db or settings.duckdb_path()
    if metrics_dir_for(database).is_dir():
        # Metrics written as Parquet: (re)build the catalog of views if it is missing or older
        # than sql/ (into a new file that replaces it; other readers are not blocked).
        ensure_catalog(database, metrics_dir_for(database))
    if not Path(database).is_file():
        print(f"mihd sql: no metrics database at {database} yet; run `make demo` or `mihd materialize` first "
              "(or pass --db PATH)", file=sys.stderr)
        return 1
    try:
        frame = read_only_query(database, sql)
    except duckdb.PermissionException as exc:  # a statement or a file outside what mihd sql may touch
        print(f"mihd sql: refused in {database}: {exc}\n"
              "mihd sql runs SELECT statements only, and reads only the metrics database and its Parquet folder "
              f"({metrics_dir_for(database)}); other files, COPY, EXPORT, ATTACH, SET, INSTALL/LOAD are refused",
              file=sys.stderr)
        return 1
    except duckdb.Error as exc:  # a wrong column, table or syntax: DuckDB's message is the answer
        print(f"mihd sql: {type(exc).__name__} in {database}: {exc}", file=sys.stderr)
        return 1
    if args.csv:
        frame.to_csv(sys.stdout, index=False)
    else:
        print(tabulate(frame, headers="keys", tablefmt="simple", showindex=False, floatfmt=".4g"))
        print(f"({len(frame)} row{'s' if len(frame) != 1 else ''})")
    return 0


def _imported_provenance(instance, graph, key, partition: str, sha256: str) -> dict[str, str]:
    """Dagster's provenance tags for an imported value: its own data version (the file's hash),
    the asset's current code version, and the data versions of its inputs as they are now, so
    Dagster counts the import as in sync with its upstream instead of re-computing it."""
    from dagster._core.definitions.data_version import (
        CODE_VERSION_TAG,
        DATA_VERSION_TAG,
        CachingStaleStatusResolver,
        get_input_data_version_tag,
        get_input_event_pointer_tag,
    )
    from dagster._core.loader import LoadingContextForTest

    resolver = CachingStaleStatusResolver(instance, graph, LoadingContextForTest(instance))
    tags = {DATA_VERSION_TAG: f"imported-{sha256[:20]}", CODE_VERSION_TAG: graph.get(key).code_version}
    for parent in graph.get(key).parent_keys:
        source = graph.get(parent).is_external
        record = instance.get_latest_data_version_record(parent, is_source=source, partition_key=partition)
        if record is None:
            raise ValueError(f"cannot import {key.to_user_string()} [{partition}]: its input {parent.to_user_string()} "
                             "has no materialization for that slide")
        tags[get_input_data_version_tag(parent)] = resolver.get_current_data_version(parent, partition).value
        tags[get_input_event_pointer_tag(parent)] = str(record.storage_id)
    return tags


def cmd_import_embeddings(args) -> int:
    """Store each cached array as its embedding asset's partition and report the materialization.

    The event carries the asset's current code version, so downstream assets use the
    imported values instead of recomputing them; its metadata says where they came from.
    """
    import anndata as ad
    from dagster import AssetMaterialization, MetadataValue

    from dagster import AssetRecordsFilter

    from dagster_project.definitions import defs
    from mihd_resources.orchestration import slides_partitions
    from mihd_assets.embeddings.assets import ALL_EMBEDDING_KEYS
    from mihd_assets.embeddings.import_cache import load_entry, scan_cache
    from mihd_assets.fileio import file_sha256
    from mihd_assets.matrix import MATRIX
    from mihd_assets.slides.assets import RAW_SLIDE

    instance = _instance()
    graph = defs.resolve_asset_graph()
    known = {k.path[-1]: k for k in ALL_EMBEDDING_KEYS}
    scan = scan_cache(Path(args.cache), tuple(MATRIX.vision_variants))
    for path, why in scan.unrecognised:
        print(f"skipped {path}: {why}")
    registered = set(instance.get_dynamic_partitions(slides_partitions.name))
    failures = imported = 0
    obs_cache: dict[str, list[str]] = {}
    for entry in scan.entries:
        if args.slide and entry.slide_id not in args.slide:
            continue
        key = known.get(entry.asset_name)
        if key is None:
            print(f"skipped {entry.path}: no asset {entry.asset_name} in the benchmark matrix "
                  f"(known: {', '.join(sorted(known))})")
            continue
        has_raw = entry.slide_id in registered and instance.fetch_materializations(
            AssetRecordsFilter(asset_key=RAW_SLIDE, asset_partitions=[entry.slide_id]), limit=1).records
        if not has_raw:
            print(f"FAILED {entry.path}: slide {entry.slide_id!r} has no raw_slide materialization to align the "
                  "spots with; run `mihd materialize --partition <slide>` first", file=sys.stderr)
            failures += 1
            continue
        if entry.slide_id not in obs_cache:
            raw_path = settings.storage_root().joinpath(*RAW_SLIDE.path, f"{entry.slide_id}.h5ad")
            obs_cache[entry.slide_id] = list(ad.read_h5ad(raw_path, backed="r").obs_names)
        try:
            embedding, info = load_entry(entry, obs_cache[entry.slide_id])
        except ValueError as err:
            print(f"FAILED {err}", file=sys.stderr)
            failures += 1
            continue
        target = settings.storage_root().joinpath(*key.path, f"{entry.slide_id}.npz")
        if args.dry_run:
            print(f"would import {entry.path} -> {key.to_user_string()} [{entry.slide_id}] {embedding.values.shape}")
            continue
        embedding.save(target)
        tags = _imported_provenance(instance, graph, key, entry.slide_id, file_sha256(entry.path))
        instance.report_runless_asset_event(AssetMaterialization(
            asset_key=key,
            partition=entry.slide_id,
            description=f"imported from the old embedding cache ({entry.path})",
            metadata={
                **{k: v for k, v in info.items() if v is not None},
                "path": MetadataValue.path(str(target)),
                "dims": int(embedding.values.shape[1]),
                "n_spots": int(embedding.values.shape[0]),
            },
            tags={**tags, "mihd/imported": "true"},
        ))
        imported += 1
        print(f"imported {entry.path} -> {key.to_user_string()} [{entry.slide_id}] {embedding.values.shape} "
              f"({info['alignment']})")
    print(f"{imported} embedding(s) imported, {failures} failed")
    return 1 if failures else 0


def cmd_cells_from_slide(args) -> int:
    """Write an expression-only cell dataset made from a slide's spots (positions hidden in
    obsm['spatial_truth'], labels as obs['cell_type']) under the cells root."""
    from mihd_assets.geometry.cells import CELL_DATASETS, CellSplit, cells_from_slide, write_cells
    from mihd_assets.slides.io import SlideInputError, read_slide
    from mihd_resources import StorageResource
    from mihd_resources.storage import InvalidPartitionKey, validate_partition_key

    given = Path(args.slide)
    try:
        if given.exists():
            source, slide_id = given, given.name[: -len(".h5ad")] if given.name.endswith(".h5ad") else given.name
        else:
            slide_id = args.slide
            source = StorageResource(slides_root=str(settings.slides_root())).slide_source(slide_id)
            if not source.exists():
                print(f"mihd cells-from-slide: no slide {slide_id!r} under {settings.slides_root()} (MIHD_DATA_ROOT) "
                      "and no such path", file=sys.stderr)
                return 2
        name = validate_partition_key(args.name or f"{slide_id}_cells", CELL_DATASETS)
    except (InvalidPartitionKey, SlideInputError) as exc:
        print(f"mihd cells-from-slide: {exc}", file=sys.stderr)
        return 2
    target = Path(args.out) if args.out else settings.cells_root() / f"{name}.h5ad"
    if target.exists() and not args.force:
        print(f"mihd cells-from-slide: {target} exists; --force replaces it", file=sys.stderr)
        return 1
    try:
        adata = read_slide(source, slide_id)
        cells = cells_from_slide(adata, slide_id, CellSplit(cells_per_spot=args.cells_per_spot, seed=args.seed))
    except (SlideInputError, ValueError) as exc:
        print(f"mihd cells-from-slide: {exc}", file=sys.stderr)
        return 1
    write_cells(cells, target)
    n_spots = cells.uns["cells_from_slide"]["n_spots"]
    labels = ("cell_type from the slide's labels" if "cell_type" in cells.obs
              else "the slide has no labels, so no obs['cell_type']")
    print(f"{target}: {cells.n_obs} cells x {cells.n_vars} genes from the {n_spots} spots on tissue of {slide_id} "
          f"({args.cells_per_spot} per spot); positions only in obsm['spatial_truth']; {labels}")
    print("next: mihd materialize registers it as a cell_datasets partition, places it (geometry/cell_placement) "
          "and scores it (geometry/cell_placement_evaluation)")
    return 0


def cmd_demo(args) -> int:
    os.environ.setdefault("MIHD_PROFILE", "demo")
    # Offline demo: encoders without local weights run randomly initialised, and every
    # result says `weights: random` (metadata, DuckDB, the weights_not_random check).
    os.environ.setdefault("MIHD_ALLOW_RANDOM_WEIGHTS", "1")
    if os.environ.get("MIHD_DATA_ROOT"):
        print("MIHD_DATA_ROOT is set; `mihd demo` runs on the embedded demo data only - unset it", file=sys.stderr)
        return 2
    from dagster_project.families import family_demo_writers

    started = time.perf_counter()
    cmd_demo_data(argparse.Namespace(slides=DEMO_SLIDES))
    for name, write in family_demo_writers():
        family_started = time.perf_counter()
        print(f"{name}: {write()} ({time.perf_counter() - family_started:.1f} s)", flush=True)
    code = cmd_materialize(argparse.Namespace(partition=None, dry_run=False, verbose=args.verbose, only=None,
                                              serial=args.serial, max_concurrent=args.max_concurrent))
    home = settings.mihd_home()
    print(
        f"\nDemo finished in {time.perf_counter() - started:.1f} s (profile: {settings.profile()}).\n"
        "Where to look:\n"
        f"  UI:      make ui   (= DAGSTER_HOME={home / 'dagster_home'} MIHD_HOME={home} "
        ".venv/bin/dagster dev -w workspace.yaml), then http://127.0.0.1:3000\n"
        f"  DuckDB:  {settings.duckdb_path()}\n"
        '  SQL:     .venv/bin/mihd sql "SELECT * FROM slide_qc_latest"\n'
        f"  Assets:  {settings.storage_root()}\n"
        f"  Leaderboard: {settings.storage_root() / 'reports' / 'leaderboard_site' / 'index.html'}"
    )
    return code


def _add_execution_args(p) -> None:
    p.add_argument("--max-concurrent", type=int, metavar="N",
                   help="step processes at once, over all runs in flight (default: $MIHD_MAX_CONCURRENT, else the CPUs; 1, i.e. in process, with 2 CPUs or fewer)")
    p.add_argument("--serial", action="store_true",
                   help="run each slide's steps in this process, one at a time (debugging)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="mihd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("demo", help="write demo data and materialize every asset on it")
    p.add_argument("--verbose", action="store_true", help="show Dagster's INFO logs")
    _add_execution_args(p)
    p.set_defaults(fn=cmd_demo)
    p = sub.add_parser("demo-data", help="write the demo slides (idempotent)")
    p.add_argument("--slides", type=int, default=DEMO_SLIDES)
    p.set_defaults(fn=cmd_demo_data)
    p = sub.add_parser("materialize", help="materialize missing or stale assets of every slide")
    p.add_argument("--partition", action="append", help="only this slide (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.add_argument("--verbose", action="store_true", help="show Dagster's INFO logs")
    p.add_argument("--only", action="append", metavar="GROUP",
                   help="only assets of this group (slides, embeddings, fusion, clustering, evaluation, reports, geometry, segmentation); repeatable")
    _add_execution_args(p)
    p.set_defaults(fn=cmd_materialize)
    p = sub.add_parser("sql", help="run read-only SQL on the metrics database")
    p.add_argument("query", nargs="?")
    p.add_argument("--file", help="read the query from a .sql file (e.g. sql/queries/...)")
    p.add_argument("--db", help="DuckDB catalog file (default: $MIHD_DUCKDB or $MIHD_HOME/mihd.duckdb); "
                                "its rows are the Parquet files in <stem>_metrics/ beside it")
    p.add_argument("--csv", action="store_true", help="print CSV instead of a table")
    p.set_defaults(fn=cmd_sql)
    p = sub.add_parser("import-embeddings", help="record an old .npz/.npy embedding cache as materializations")
    p.add_argument("cache", help="the old embeddings_cache/ folder (<slide_id>/gene_<enc>.npz, vision_<enc>_<variant>.npz)")
    p.add_argument("--slide", action="append", help="only this slide (repeatable)")
    p.add_argument("--dry-run", action="store_true", help="check and print, store nothing")
    p.set_defaults(fn=cmd_import_embeddings)
    p = sub.add_parser("cells-from-slide", help="make a cell dataset with hidden positions from a labelled slide")
    p.add_argument("slide", help="a slide under the data root (its partition key), or the path of a slide folder / .h5ad")
    p.add_argument("--cells-per-spot", type=int, default=2, help="cells each spot on tissue is split into (default 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", help="the dataset's name (default <slide>_cells)")
    p.add_argument("--out", help="where to write the .h5ad (default <cells root>/<name>.h5ad; MIHD_CELLS_ROOT)")
    p.add_argument("--force", action="store_true", help="replace an existing file")
    p.set_defaults(fn=cmd_cells_from_slide)
    from dagster_project.leaderboard_cli import add_parsers as add_leaderboard_parsers

    add_leaderboard_parsers(sub)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except InstanceStorageError as exc:
        print(f"mihd: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
