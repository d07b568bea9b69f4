"""What the leaderboard adds to a `mihd materialize` run, at the demo's size and larger.

Builds a temporary platform: ``--slides`` slides of ``--spots`` spots with truth, one
`clustering_metrics` partition per slide for every clustering of the benchmark matrix (the
platform's built-in entries, as the evaluation assets write them), and ``--submissions``
queued bundles (labels for every slide). Then times, through Dagster as `mihd materialize`
runs them: the queue observation job, the ingest asset and the site asset.

    .venv/bin/python benchmarks/leaderboard_site.py                       # demo size: 3 slides, no submissions
    .venv/bin/python benchmarks/leaderboard_site.py --submissions 50 --spots 4000
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slides", type=int, default=3)
    parser.add_argument("--spots", type=int, default=700)
    parser.add_argument("--submissions", type=int, default=0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        os.environ.update({"MIHD_HOME": str(tmp), "MIHD_STORAGE": str(tmp / "storage"),
                           "MIHD_DUCKDB": str(tmp / "mihd.duckdb"), "MIHD_RELAY_QUEUE": str(tmp / "queue")})
        import anndata as ad
        import pandas as pd
        from dagster import DagsterInstance, Definitions, materialize
        from dagster_duckdb import DuckDBResource

        from mihd_assets.fusion.assets import ALL_METRICS_KEYS
        from mihd_assets.leaderboard.assets import (
            OBSERVE_QUEUE_JOB_NAME, leaderboard_site, leaderboard_submissions, observe_queue_job, submission_queue)
        from mihd_relay.bundle import build_bundle
        from mihd_relay.queue import SubmissionQueue
        from mihd_resources import AnnDataIOManager, MetricsStore
        from mihd_resources.metrics_store import write_partition_tables

        rng = np.random.default_rng(0)
        instance = DagsterInstance.ephemeral()
        slides = [f"bench_{i:02d}" for i in range(args.slides)]
        instance.add_dynamic_partitions("slides", slides)
        store = tmp / "storage"
        barcodes = {}
        for slide in slides:
            side = int(np.ceil(np.sqrt(args.spots)))
            xy = np.asarray([(i % side, i // side) for i in range(args.spots)], dtype=np.float64) * 100
            truth = pd.Categorical([f"L{min(int(y / (xy[:, 1].max() + 1) * 7), 6) + 1}" for y in xy[:, 1]])
            codes = [f"{''.join(rng.choice(list('ACGT'), 16))}-1" for _ in range(args.spots)]
            barcodes[slide] = (codes, np.asarray(truth.codes))
            adata = ad.AnnData(X=np.zeros((args.spots, 1), np.float32),
                               obs=pd.DataFrame({"truth": truth}, index=codes))
            adata.obsm["spatial"] = xy
            path = store / "slides" / "raw_slide" / f"{slide}.h5ad"
            path.parent.mkdir(parents=True, exist_ok=True)
            adata.write_h5ad(path)
        started = time.perf_counter()
        for key in ALL_METRICS_KEYS:
            name = key.path[-1]
            representation, method = name.rsplit("__", 1)
            for slide in slides:
                rows = [{"slide_id": slide, "representation": representation, "kind": "gene", "clustering_method": method,
                         "clustering_method_used": method, "refinement": refinement, "ari": float(rng.random()),
                         "nmi": float(rng.random()), "chaos": 0.05, "pas": 0.1, "metrics_status": "ok",
                         "weights": "random", "replicate": 0} for refinement in ("none", "majority_k15")]
                write_partition_tables(tmp / "mihd.duckdb", None, key.to_user_string(), slide,
                                       {"clustering_metrics": rows}, run_id="bench", code_version="1")
        print(f"{len(ALL_METRICS_KEYS)} clusterings x {len(slides)} slides of platform rows written in "
              f"{time.perf_counter() - started:.1f} s (setup, not timed below)")
        queue = SubmissionQueue(tmp / "queue", max_queued=100_000)
        for i in range(args.submissions):
            labels = {s: {b: f"c{(t + (rng.random() < 0.3)) % 7}" for b, t in zip(*barcodes[s])} for s in slides}
            queue.receive(build_bundle(name=f"Bench {i}", version="1", description="benchmark", link="https://e.org",
                                       labels=labels, software={"python": "3", "packages": {}},
                                       platform={"name": "mihd-platform", "version": "0.1.0", "commit": None}),
                          "0" * 32)
        resources = {"metrics": MetricsStore(duckdb=DuckDBResource(database=str(tmp / "mihd.duckdb"))),
                     "anndata_io_manager": AnnDataIOManager(base_dir=str(store))}
        timings = {}
        started = time.perf_counter()
        # As `mihd materialize` observes its sources: the observation job, in process.
        job = Definitions(assets=[submission_queue], jobs=[observe_queue_job]).resolve_job_def(OBSERVE_QUEUE_JOB_NAME)
        result = job.execute_in_process(instance=instance)
        timings["observe queue"] = time.perf_counter() - started
        assert result.success
        for asset in (leaderboard_submissions, leaderboard_site):
            started = time.perf_counter()
            result = materialize([asset], instance=instance, resources=resources)
            timings[asset.key.to_user_string()] = time.perf_counter() - started
            assert result.success
        site = store / "reports" / "leaderboard_site"
        files = [p for p in site.rglob("*") if p.is_file()]
        print(f"site: {len(files)} files, {sum(p.stat().st_size for p in files) / 1e6:.1f} MB, "
              f"{len(list((site / 'methods').glob('*.html')))} entry pages")
        for name, seconds in timings.items():
            print(f"  {name}: {seconds:.2f} s")
        print(f"  total: {sum(timings.values()):.2f} s")


if __name__ == "__main__":
    main()
