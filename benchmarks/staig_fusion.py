"""Time `staig_fusion` (real configuration: 300 epochs, k=80 pseudo-labels) on a
DLPFC-sized synthetic slide: 3,600 spots on the Visium hex grid x 3,000 HVGs, a 1,536-d
image embedding. Target (issue 4): under 5 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/staig_fusion.py [--threads 2] [--spots 3600] [--genes 3000]
"""

import argparse
import platform
import time

import numpy as np
import torch

from mihd_assets.fusion.staig import StaigConfig, staig_fusion


def synthetic_slide(n_spots: int, n_genes: int, image_dim: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    side = int(np.ceil(np.sqrt(n_spots)))
    rows, cols = np.divmod(np.arange(n_spots), side)
    xy = np.stack([cols * 100.0 + (rows % 2) * 50.0, rows * 86.6], axis=1)
    layer = np.minimum((rows * 7) // side, 6)
    hvg = np.clip(rng.normal(size=(7, n_genes))[layer] + rng.normal(size=(n_spots, n_genes)), 0, 10)
    image = rng.normal(size=(7, image_dim))[layer] + rng.normal(scale=2.0, size=(n_spots, image_dim))
    return xy, hvg.astype(np.float32), image.astype(np.float32)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--spots", type=int, default=3600)
    parser.add_argument("--genes", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=StaigConfig().epochs)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    xy, hvg, image = synthetic_slide(args.spots, args.genes, 1536)
    started = time.perf_counter()
    _, info = staig_fusion(hvg, xy, image, StaigConfig(epochs=args.epochs))
    seconds = time.perf_counter() - started
    print(f"staig_fusion: {args.spots} spots x {args.genes} genes, {args.epochs} epochs, {args.threads} threads: "
          f"{seconds:.1f} s total ({info['seconds']:.1f} s inside), final loss {info['final_loss']:.4f}; "
          f"machine {platform.machine()} {platform.processor() or ''}".strip())


if __name__ == "__main__":
    main()
