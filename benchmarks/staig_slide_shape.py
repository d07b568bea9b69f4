"""staig_fusion vs the synthetic slide's shape, over four seeds.

    .venv/bin/python benchmarks/staig_slide_shape.py N_ROWS N_COLS SLIDE_SEED

Writes one demo slide of N_ROWS x N_COLS array positions (the layers run across the rows) into
/tmp, preprocesses it with the `staig` preset and runs staig_fusion (published configuration)
with seeds 39788 (published), 1, 2, 3, then mclust EEE and the 15-neighbour vote; prints the ARI
against the planted layers. The image embedding is Gaussian noise (uninformative: edge drops
near uniform, pseudo-labels random), so only the slide's shape differs between runs.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SEEDS = (39788, 1, 2, 3)  # the published seed first


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("rows", type=int, help="Visium array rows (the layers run across them)")
    parser.add_argument("cols", type=int, help="Visium array columns")
    parser.add_argument("slide_seed", type=int, help="demo generator seed (demo_01..03 use 1673..1675)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch
    from sklearn.metrics import adjusted_rand_score

    from mihd_assets.demo.visium import DemoSlideSpec, write_demo_slide
    from mihd_assets.fusion.clustering import mclust_labels, refine_labels
    from mihd_assets.fusion.staig import StaigConfig, staig_fusion
    from mihd_assets.slides.io import read_visium_slide
    from mihd_assets.slides.preprocess import preprocess

    torch.set_num_threads(args.threads)
    folder = Path(tempfile.mkdtemp(prefix="mihd_staig_shape_"))
    write_demo_slide(folder, "shape", args.slide_seed, replace(DemoSlideSpec(), n_rows=args.rows, n_cols=args.cols))
    pre, _, _ = preprocess(read_visium_slide(folder, "shape"), "staig")
    truth = pre.obs["truth"].astype(str).to_numpy()
    labelled = ~np.isin(truth, ["nan", "None", ""])
    xy = np.asarray(pre.obsm["spatial"], dtype=float)
    hvg = pre.X.toarray() if hasattr(pre.X, "toarray") else np.asarray(pre.X)
    image = np.random.default_rng(0).normal(size=(pre.n_obs, 64)).astype(np.float32)  # uninformative
    print(f"{args.rows} x {args.cols} array, slide seed {args.slide_seed}: {pre.n_obs} spots", flush=True)
    for seed in SEEDS:
        started = time.perf_counter()
        out, _ = staig_fusion(hvg, xy, image, replace(StaigConfig(), seed=seed))
        labels = refine_labels(mclust_labels(out, 7), xy, 15)
        ari = adjusted_rand_score(truth[labelled], labels[labelled])
        print(f"  seed {seed}: ARI after mclust + 15-neighbour vote {ari:.3f} ({time.perf_counter() - started:.0f} s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
