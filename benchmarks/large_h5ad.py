"""A Slide-seq-scale AnnData slide through the platform's own assets: time and peak memory.

    .venv/bin/python benchmarks/large_h5ad.py [--spots 50000] [--genes 5000] [--keep DIR]

Writes one synthetic ``.h5ad`` slide (raw integer counts in ``X``, coordinates in
``obsm["spatial"]`` in the file's own units, seven spatial domains as truth in
``obs["truth"]``, no image), then materializes in this process, with ``dagster.materialize``
and the pipeline's resources, exactly the assets a gene-only baseline needs:
``slides/raw_slide``, both preprocessed slides (``standard`` and ``staig`` presets),
``embeddings/gene_pca``, its k-means, leiden and mclust clusterings and their metric rows.
Printed: seconds per step (from Dagster's step events), the whole run's wall time, the
process's peak resident memory (``ru_maxrss``, which includes the embedded R of mclust), and
ARI of each clustering against the planted domains. The target is the whole run in under
5 minutes on 2 CPU cores.

The counts: each spot belongs to one of seven bands across the tissue; each band raises 60
marker genes; library sizes are log-normal around 300 UMIs, as on Slide-seq beads; the
counts are negative binomial (Poisson with gamma-distributed rates, dispersion 0.5).
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SLIDE = "slideseq_like"
N_DOMAINS = 7


def synthetic_slide(path: Path, n_spots: int, n_genes: int, seed: int = 0) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    rng = np.random.default_rng(seed)
    # Beads in a disc of radius 1,500 file units (Slide-seq pucks are 3 mm across, in um).
    r = 1500 * np.sqrt(rng.random(n_spots))
    theta = rng.random(n_spots) * 2 * np.pi
    xy = np.c_[r * np.cos(theta), r * np.sin(theta)] + 1500
    domain = np.minimum((xy[:, 1] / 3000 * N_DOMAINS).astype(int), N_DOMAINS - 1)
    base = rng.gamma(0.3, 1.0, n_genes)
    base /= base.sum()
    programs = np.tile(base, (N_DOMAINS, 1))
    for d in range(N_DOMAINS):
        markers = rng.choice(n_genes, 60, replace=False)
        programs[d, markers] *= 8.0
    programs /= programs.sum(axis=1, keepdims=True)
    library = rng.lognormal(np.log(300), 0.4, n_spots)
    rows, cols, vals = [], [], []
    chunk = 5000
    for start in range(0, n_spots, chunk):
        stop = min(start + chunk, n_spots)
        mean = programs[domain[start:stop]] * library[start:stop, None]
        rate = rng.gamma(2.0, mean / 2.0)  # dispersion 1/2: NB variance mean + mean^2 / 2
        counts = rng.poisson(rate)
        i, j = np.nonzero(counts)
        rows.append(i + start)
        cols.append(j)
        vals.append(counts[i, j])
    x = sp.csr_matrix((np.concatenate(vals).astype(np.float32), (np.concatenate(rows), np.concatenate(cols))),
                      shape=(n_spots, n_genes))
    obs = pd.DataFrame({"truth": pd.Categorical([f"domain_{d}" for d in domain])},
                       index=[f"bead_{i:06d}" for i in range(n_spots)])
    var = pd.DataFrame(index=[f"GENE{j:05d}" for j in range(n_genes)])
    adata = ad.AnnData(X=x, obs=obs, var=var)
    adata.obsm["spatial"] = xy.astype(np.float64)
    adata.write_h5ad(path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--spots", type=int, default=50_000)
    parser.add_argument("--genes", type=int, default=5_000)
    parser.add_argument("--keep", type=Path, help="work folder to keep (default: a temporary one)")
    args = parser.parse_args()

    work = args.keep or Path(tempfile.mkdtemp(prefix="mihd-large-h5ad-"))
    work.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("MIHD_HOME", str(work / "home"))
    os.environ["MIHD_PROFILE"] = "full"  # real sizes: this is the size the lab runs
    slides_root = work / "slides"
    slides_root.mkdir(exist_ok=True)
    h5ad = slides_root / f"{SLIDE}.h5ad"
    started = time.perf_counter()
    synthetic_slide(h5ad, args.spots, args.genes)
    print(f"wrote {h5ad} ({h5ad.stat().st_size / 1e6:.0f} MB) in {time.perf_counter() - started:.1f} s", flush=True)

    import duckdb
    from dagster import DagsterEventType, DagsterInstance, materialize
    from dagster_duckdb import DuckDBResource

    from mihd_assets.embeddings import assets as emb
    from mihd_assets.fusion import assets as fa
    from mihd_assets.slides import assets as slides
    from mihd_resources import AnnDataIOManager, ComputeResource, MetricsStore, StorageResource
    from mihd_resources.clustering import ClusteringResource
    from mihd_resources.embedding_io_manager import EmbeddingIOManager
    from mihd_resources.labels_io_manager import LabelsIOManager
    from mihd_resources.step_executor import StepExecutor
    from mihd_resources.weights import ModelWeightsResource

    store, database = work / "store", work / "metrics.duckdb"
    resources = {
        "storage": StorageResource(slides_root=str(slides_root)),
        "anndata_io_manager": AnnDataIOManager(base_dir=str(store)),
        "embedding_io_manager": EmbeddingIOManager(base_dir=str(store)),
        "labels_io_manager": LabelsIOManager(base_dir=str(store)),
        "compute": ComputeResource(device="cpu", num_workers=0),
        "step_executor": StepExecutor(),
        "metrics": MetricsStore(duckdb=DuckDBResource(database=str(database))),
        "clustering": ClusteringResource(),
        "weights": ModelWeightsResource(allow_random=True),
    }
    pca = next(a for a in emb.gene_embeddings if a.key == emb.gene_key("pca"))
    cluster_keys = [fa.clustering_key("gene_pca", m) for m in ("kmeans", "leiden", "mclust")]
    clusterings = [a for a in fa.clusterings if a.key in cluster_keys]
    metrics = [a for a in fa.clustering_metrics if a.key in [fa.metrics_key(k) for k in cluster_keys]]
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("slides", [SLIDE])
    started = time.perf_counter()
    result = materialize([slides.raw_slide, *slides.preprocessed_slides, pca, *clusterings, *metrics],
                         partition_key=SLIDE, instance=instance, resources=resources, raise_on_error=False)
    wall = time.perf_counter() - started
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    starts, spans = {}, {}
    for record in instance.all_logs(result.run_id):
        event = record.dagster_event
        if event is None:
            continue
        if event.event_type == DagsterEventType.STEP_START:
            starts[event.step_key] = record.timestamp
        elif event.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            spans[event.step_key] = (record.timestamp - starts[event.step_key], event.event_type.value)
    print(f"\n{args.spots:,} spots x {args.genes:,} genes; {os.cpu_count()} CPUs; profile full")
    for step, (seconds, outcome) in sorted(spans.items(), key=lambda kv: -kv[1][0]):
        print(f"  {seconds:7.1f} s  {outcome:13s} {step}")
    for event in result.all_events:
        if event.event_type == DagsterEventType.STEP_FAILURE:
            print(f"  FAILED {event.step_key}: {event.event_specific_data.error.message.strip()[:400]}")
    with duckdb.connect(str(database), read_only=True) as con:
        rows = con.execute(
            "SELECT asset_key, refinement, metrics_status, ari, nmi FROM clustering_metrics "
            "WHERE slide_id = ? ORDER BY asset_key, refinement", [SLIDE]).fetchall()
    for row in rows:
        print(f"  {row[0]:55s} {row[1]:12s} {row[2]:6s} ARI {row[3]}  NMI {row[4]}")
    print(f"materialize wall time {wall:.1f} s (target < 300 s); peak resident memory {peak_mb:,.0f} MB; "
          f"run {'succeeded' if result.success else 'FAILED'}")
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if result.success and wall < 300 else 1


if __name__ == "__main__":
    sys.exit(main())
