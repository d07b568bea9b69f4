"""Pipeline efficiency of vision embedding: image file -> patches -> encoder, versus the
encoder alone on pre-made tensors with the same batch size (target ratio >= 0.9).

    .venv/bin/python benchmarks/vision_pipeline.py [--encoder resnet50] [--n 256] [--batch 16] [--workers 1]

Runs unchanged on a GPU machine (device auto). Both rates are measured in one process,
side by side, on the same random-weights network (full configuration, not tiny).
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def main() -> None:
    from mihd_assets.demo.visium import DemoSlideSpec, write_demo_slide
    from mihd_assets.embeddings.patches import SpotPatchDataset, make_loader
    from mihd_assets.embeddings.vision import build_encoder, embed
    from mihd_assets.slides.io import read_visium_slide

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--encoder", default="resnet50")
    parser.add_argument("--n", type=int, default=256, help="patches to embed")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--workers", type=int, default=1)
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, info = build_encoder(args.encoder)
    model = model.to(device)
    amp = device.type == "cuda"

    with tempfile.TemporaryDirectory() as tmp:
        write_demo_slide(Path(tmp) / "bench", "bench", seed=7, spec=DemoSlideSpec())
        adata = read_visium_slide(Path(tmp) / "bench", "bench")
        coords = np.asarray(adata.obsm["spatial"])
        reps = int(np.ceil(args.n / len(coords)))
        coords = np.tile(coords, (reps, 1))[: args.n]
        tif = adata.uns["spatial"]["bench"]["metadata"]["image_paths"]["fullres"]
        dataset = SpotPatchDataset(tif, coords, 1.0, info["input_size"], info["mean"], info["std"])

        # Model only: the same number of patches as pre-made tensors, same batch size.
        tensors = torch.randn(args.batch, 3, info["input_size"], info["input_size"])
        with torch.inference_mode():
            model(tensors.to(device))  # warm-up
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
            for _ in range(int(np.ceil(args.n / args.batch))):
                with torch.autocast(device.type, enabled=amp):
                    model(tensors.to(device, non_blocking=True))
            if device.type == "cuda":
                torch.cuda.synchronize()
            model_rate = int(np.ceil(args.n / args.batch)) * args.batch / (time.perf_counter() - started)

        loader = make_loader(dataset, args.batch, args.workers, pin_memory=device.type == "cuda")
        result = embed(model, loader, device, amp=amp)
        pipeline_rate = result.patches_per_second

    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus, device {device}"
          f"{' ' + torch.cuda.get_device_name(0) if device.type == 'cuda' else ''}, torch threads {torch.get_num_threads()}")
    print(f"encoder {args.encoder} (full config, random weights), batch {args.batch}, workers {args.workers}, {args.n} patches")
    print(f"model-only forward:        {model_rate:8.2f} patches/s")
    print(f"end-to-end from the TIFF:  {pipeline_rate:8.2f} patches/s")
    print(f"efficiency ratio: {pipeline_rate / model_rate:.3f} (target >= 0.9)")


if __name__ == "__main__":
    main()
