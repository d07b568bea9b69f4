"""Time `staig_fusion` (real configuration: 300 epochs, k=80 pseudo-labels) on a
DLPFC-sized synthetic slide: 3,600 spots on the Visium hex grid x 3,000 HVGs, a 1,536-d
image embedding. Target (issue 4): under 5 minutes on 2 CPU cores.

    .venv/bin/python benchmarks/staig_fusion.py [--threads 2] [--spots 3600] [--genes 3000] [--image-mode image|none]

Besides wall time it prints this process's user and system CPU seconds, minor page faults
and peak RSS (getrusage), the figures GNU ``time -v`` reports for the whole command.
"""

import argparse
import platform
import resource
import time

import numpy as np
import torch

from mihd_assets.fusion.staig import IMAGE_MODES, StaigConfig, staig_fusion


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
    parser.add_argument("--image-mode", choices=IMAGE_MODES, default="image")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    xy, hvg, image = synthetic_slide(args.spots, args.genes, 1536)
    config = StaigConfig(epochs=args.epochs, image_mode=args.image_mode)
    before = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    _, info = staig_fusion(hvg, xy, image if args.image_mode == "image" else None, config)
    seconds = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_SELF)
    print(f"staig_fusion ({args.image_mode} mode): {args.spots} spots x {args.genes} genes, {args.epochs} epochs, "
          f"{args.threads} threads: {seconds:.1f} s wall ({info['seconds']:.1f} s inside), "
          f"{after.ru_utime - before.ru_utime:.1f} s user, {after.ru_stime - before.ru_stime:.1f} s system, "
          f"{after.ru_minflt - before.ru_minflt:,} minor page faults, peak RSS {after.ru_maxrss / 1024:.0f} MiB; "
          f"final loss {info['final_loss']:.4f}; machine {platform.machine()} {platform.processor() or ''}".strip())


if __name__ == "__main__":
    main()
