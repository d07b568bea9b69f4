"""staig_fusion vs the synthetic slide's shape, over four seeds.

    .venv/bin/python benchmarks/staig_slide_shape.py N_ROWS N_COLS SLIDE_SEED

Writes one demo slide of N_ROWS x N_COLS array positions (the layers run across the rows) into
/tmp, preprocesses it with the `staig` preset and runs staig_fusion (published configuration)
with seeds 39788 (published), 1, 2, 3, then mclust EEE and the 15-neighbour vote; prints the ARI
against the planted layers. The image embedding is Gaussian noise (uninformative: edge drops
near uniform, pseudo-labels random), so only the slide's shape differs between runs.
"""
import sys, time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dataclasses import replace
from sklearn.metrics import adjusted_rand_score
from mihd_assets.demo.visium import write_demo_slide, DemoSlideSpec
from mihd_assets.slides.io import read_visium_slide
from mihd_assets.slides.preprocess import preprocess
from mihd_assets.fusion.staig import staig_fusion, StaigConfig
from mihd_assets.fusion.clustering import mclust_labels, refine_labels
torch.set_num_threads(2)
rows, cols, seed = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
folder = f"/tmp/mihd_staig_shape/slide_{rows}x{cols}_{seed}"
write_demo_slide(folder, "x", seed, replace(DemoSlideSpec(), n_rows=rows, n_cols=cols))
a = read_visium_slide(folder, "x")
pre, _, _ = preprocess(a, "staig")
truth = pre.obs["truth"].astype(str).values
keep = ~np.isin(truth, ["nan", "None", ""])
xy = np.asarray(pre.obsm["spatial"], dtype=float)
img = np.random.default_rng(0).normal(size=(pre.n_obs, 64)).astype(np.float32)
X = pre.X.toarray() if hasattr(pre.X, "toarray") else np.asarray(pre.X)
print(f"{rows}x{cols} slide seed {seed}: {pre.n_obs} spots", flush=True)
for s in (39788, 1, 2, 3):
    t0 = time.time()
    out, info = staig_fusion(X, xy, img, replace(StaigConfig(), seed=s))
    ref = refine_labels(mclust_labels(out, 7), xy, 15)
    print(f"  seed {s}: ARI refined {adjusted_rand_score(truth[keep], ref[keep]):.3f} ({time.time()-t0:.0f} s)", flush=True)
