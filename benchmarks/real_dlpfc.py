"""A real labelled Visium slide through every matrix method that can run on it, beside scanpy's
textbook pipeline, over several seeds, through the platform's own assets.

    .venv/bin/python benchmarks/real_dlpfc.py ../shared/data/visium_dlpfc_151676_banksy5000 [--seeds 5]

A temporary MIHD home (data root = a link to the slide folder, profile `full`,
MIHD_REPLICATES = seeds) is materialized as a user would: Dagster's implicit asset job, one
run for the slide, selecting the clustering-metrics assets of every representation that
needs no image when the slide has only a lowres image (gene PCA, STAIG's no-image mode) and
everything upstream of them. In the same process, the textbook pipeline (HVG seurat_v3 3,000
-> normalize_total -> log1p -> subset -> scale -> PCA 30 -> mclust EEE, and k-means) runs on
the same seeds. One table (ARI, NMI, raw and 15-NN refined, mean and sd over seeds, seconds)
is printed and appended to benchmarks/RESULTS.md. Exits 0 with a note when the folder is absent.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
# Representations that need no image (clustered by every method of the matrix).
IMAGELESS = ("gene_pca", "staig_fusion__hvg__none")


def check_labels(folder: Path) -> tuple[object, int]:
    """The slide as read, and its number of truth layers; refuses a slide without usable labels."""
    from mihd_assets.slides.io import read_visium_slide

    raw = read_visium_slide(folder, folder.name)
    if "truth" not in raw.obs or raw.obs["truth"].notna().sum() == 0:
        raise SystemExit(f"{folder}: no truth labels (metadata.tsv or <slide>_truth.txt) for any of its "
                         f"{raw.n_obs} spots; this benchmark scores against them")
    labelled = int(raw.obs["truth"].notna().sum())
    if labelled < 0.5 * raw.n_obs:
        raise SystemExit(f"{folder}: only {labelled} of {raw.n_obs} spots have a truth label; the labels do "
                         "not match the slide's barcodes")
    return raw, int(raw.obs["truth"].dropna().nunique())


def textbook(raw, n_clusters: int, seeds: int, refine_k: int) -> list[dict]:
    import scanpy as sc

    from mihd_assets.fusion.clustering import kmeans_labels, mclust_labels, refine_labels
    from mihd_assets.fusion.metrics import agreement

    started = time.perf_counter()
    ad = raw.copy()
    ad.X = ad.layers["counts"].copy()
    sc.pp.highly_variable_genes(ad, flavor="seurat_v3", n_top_genes=3000)
    sc.pp.normalize_total(ad, target_sum=1e4)
    sc.pp.log1p(ad)
    ad = ad[:, ad.var["highly_variable"]].copy()
    sc.pp.scale(ad)
    prep_s = time.perf_counter() - started
    truth = raw.obs["truth"].to_numpy()
    coords = np.asarray(raw.obsm["spatial"], dtype=float)
    rows = []
    for seed in range(seeds):
        t0 = time.perf_counter()
        sc.tl.pca(ad, n_comps=30, random_state=seed)
        x = np.asarray(ad.obsm["X_pca"], dtype=float)
        pca_s = time.perf_counter() - t0
        for method in ("mclust", "kmeans"):
            t1 = time.perf_counter()
            labels = (mclust_labels(x, n_clusters, "EEE", 2020 + seed, "textbook") if method == "mclust"
                      else kmeans_labels(x, n_clusters, 2020 + seed, "textbook"))
            seconds = prep_s + pca_s + time.perf_counter() - t1
            for refinement, values in (("none", labels), (f"majority_k{refine_k}", refine_labels(labels, coords, refine_k))):
                rows.append({"pipeline": "textbook scanpy", "representation": "hvg3000_pca30",
                             "clustering_method": method, "refinement": refinement, "replicate": seed,
                             **{k: agreement(truth, values)[k] for k in ("ari", "nmi")}, "seconds": seconds})
    return rows


def use_home(folder: Path, seeds: int, home: Path) -> None:
    """Point the platform at a fresh home whose data root holds only this slide. Must run before
    any platform module is imported: the matrix and paths are read from the environment then."""
    data_root = home / "data"
    data_root.mkdir(parents=True)
    (data_root / folder.name).symlink_to(folder.resolve())
    os.environ.update({
        "MIHD_HOME": str(home), "DAGSTER_HOME": str(home / "dagster_home"), "MIHD_DATA_ROOT": str(data_root),
        "MIHD_PROFILE": "full", "MIHD_REPLICATES": str(seeds),
    })
    os.environ.pop("MIHD_ALLOW_RANDOM_WEIGHTS", None)


def platform_rows(folder: Path, home: Path) -> list[dict]:
    from dagster import AssetKey, AssetSelection, DagsterInstance

    from dagster_project.cli import _instance
    from dagster_project.definitions import defs
    from mihd_resources.orchestration import slides_partitions, step_errors

    instance: DagsterInstance = _instance()
    instance.add_dynamic_partitions(slides_partitions.name, [folder.name])
    graph = defs.resolve_asset_graph()
    targets = [k for k in graph.get_all_asset_keys()
               if k.path[:2] == ["evaluation", "clustering_metrics"] and k.path[-1].split("__rep")[0].rsplit("__", 1)[0] in IMAGELESS]
    if not targets:
        raise SystemExit(f"no clustering-metrics assets for {IMAGELESS} in the matrix")
    selection = AssetSelection.assets(*targets).upstream().resolve(graph) - {AssetKey(["slides", "slide_files"])}
    observe = defs.resolve_job_def("slides_observe_sources_job").execute_in_process(instance=instance)
    assert observe.success
    started = time.perf_counter()
    result = defs.resolve_implicit_global_asset_job_def().execute_in_process(
        instance=instance, partition_key=folder.name, asset_selection=sorted(selection),
        tags={"mihd/launched_by": "benchmarks/real_dlpfc.py"}, raise_on_error=False,
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}})
    print(f"platform: {len(selection)} assets in {time.perf_counter() - started:.0f} s "
          f"({'ok' if result.success else 'FAILED'})", flush=True)
    if not result.success:
        raise SystemExit("platform run failed:\n  " + "\n  ".join(step_errors(result)))
    seconds = {}
    for event in result.get_asset_materialization_events():
        mat = event.event_specific_data.materialization
        value = mat.metadata.get("seconds")
        if value is not None:
            seconds[mat.asset_key.path[-1]] = float(value.value)
    import duckdb

    with duckdb.connect(str(home / "mihd.duckdb"), read_only=True) as con:
        frame = con.execute(
            "SELECT representation, clustering_method, refinement, replicate, ari, nmi FROM clustering_latest "
            "WHERE slide_id = ? AND metrics_status = 'ok'", [folder.name]).df()
    rows = []
    for r in frame.itertuples():
        suffix = f"__rep{r.replicate}" if r.replicate else ""
        upstream = seconds.get(r.representation + suffix, seconds.get(r.representation.removeprefix("gene_"), 0.0))
        rows.append({"pipeline": "platform", "representation": r.representation,
                     "clustering_method": r.clustering_method, "refinement": r.refinement, "replicate": r.replicate,
                     "ari": r.ari, "nmi": r.nmi,
                     "seconds": upstream + seconds.get(f"{r.representation}__{r.clustering_method}{suffix}", 0.0)})
    return rows


def summarise(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    table = frame.groupby(["pipeline", "representation", "clustering_method", "refinement"]).agg(
        seeds=("replicate", "nunique"), ari_mean=("ari", "mean"), ari_sd=("ari", "std"),
        nmi_mean=("nmi", "mean"), nmi_sd=("nmi", "std"), seconds=("seconds", "mean")).reset_index()
    return table.sort_values(["refinement", "ari_mean"], ascending=[True, False])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("slide_folder", type=Path)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--home", type=Path, help="MIHD home to use (default: a temporary folder)")
    parser.add_argument("--no-append", action="store_true", help="print only; do not append to RESULTS.md")
    args = parser.parse_args()
    if not args.slide_folder.is_dir():
        print(f"skipped: no slide folder at {args.slide_folder}")
        return 0
    with tempfile.TemporaryDirectory(prefix="mihd_real_dlpfc_") as tmp:
        home = args.home or Path(tmp)
        use_home(args.slide_folder, args.seeds, home)
        from mihd_assets.matrix import MATRIX

        assert MATRIX.replicates == args.seeds
        raw, n_layers = check_labels(args.slide_folder)
        print(f"{args.slide_folder.name}: {raw.n_obs} spots x {raw.n_vars} genes, {n_layers} layers, "
              f"{args.seeds} seeds", flush=True)
        started = time.perf_counter()
        rows = textbook(raw, n_layers, args.seeds, MATRIX.refine_k)
        rows += platform_rows(args.slide_folder, home)
    table = summarise(rows)
    text = table.to_markdown(index=False, floatfmt=".3f")
    print(text)
    if not args.no_append:
        command = f"`.venv/bin/python benchmarks/real_dlpfc.py {args.slide_folder} --seeds {args.seeds}`"
        with RESULTS.open("a") as fh:
            fh.write(f"\n## Real DLPFC slide {args.slide_folder.name}: every image-free method vs the textbook, "
                     f"{args.seeds} seeds ({dt.date.today().isoformat()})\n\n{command} on {platform.node()} "
                     f"({os.cpu_count()} cores), {time.perf_counter() - started:.0f} s in all. Mean and sd over seeds; "
                     "seconds per seed (platform: representation + clustering).\n\n" + text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
