"""Peak memory of embedding every spot of a real-size (13,332 x 13,332 RGB) full-resolution
TIFF, side by side with a naive whole-image load.

    .venv/bin/python benchmarks/vision_memory.py [--side 13332] [--spots 3600]

Each measurement runs in its own child process and reports the rise of its peak RSS over
its RSS after imports and model construction; both embed every spot with the same tiny
ResNet50-family network and batch size, so the difference is the image handling. Target: the lazy pipeline raises peak RSS
by at most 25% of the decoded image size (533 MB at 13,332 px). Patch reading runs in the
measured process (num_workers=0) so every byte it holds is counted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def write_tiff(path: Path, side: int, tile: int = 512) -> None:
    """A tiled zlib TIFF written tile by tile (never holding the whole image)."""
    import tifffile

    rng = np.random.default_rng(0)

    def tiles():
        for y in range(0, side, tile):
            for x in range(0, side, tile):
                block = np.empty((tile, tile, 3), dtype=np.uint8)
                block[:] = (225, 160, 196)
                block += rng.integers(0, 20, size=(tile, tile, 3), dtype=np.uint8)
                yield block

    tifffile.imwrite(path, tiles(), shape=(side, side, 3), dtype=np.uint8, tile=(tile, tile),
                     compression="zlib", photometric="rgb")


def child(mode: str, tif: str, side: int, n_spots: int, batch: int) -> None:
    import torch

    from mihd_assets.embeddings.patches import SpotPatchDataset, make_loader
    from mihd_assets.embeddings.vision import build_encoder, embed

    model, info = build_encoder("resnet50", tiny=True)
    grid = int(np.ceil(np.sqrt(n_spots)))
    pitch = side / (grid + 1)
    xs, ys = np.meshgrid(np.arange(1, grid + 1) * pitch, np.arange(1, grid + 1) * pitch)
    coords = np.stack([xs.ravel(), ys.ravel()], axis=1)[:n_spots]
    baseline = peak_rss_mb()
    started = time.perf_counter()
    if mode == "naive":
        import tifffile
        import torch.nn.functional as F

        # What the lab's scripts did: decode the whole image, cut patches from the array.
        image = tifffile.imread(tif)
        half = int(pitch // 2)
        mean = torch.tensor(info["mean"]).view(1, 3, 1, 1)
        std = torch.tensor(info["std"]).view(1, 3, 1, 1)
        with torch.inference_mode():
            for start in range(0, len(coords), batch):
                crops = [image[y - half:y + half, x - half:x + half] for x, y in coords[start:start + batch].astype(int)]
                x = torch.from_numpy(np.stack(crops)).permute(0, 3, 1, 2).float() / 255.0
                x = F.interpolate(x, size=(info["input_size"], info["input_size"]), mode="bilinear", antialias=True)
                model((x - mean) / std)
    else:
        dataset = SpotPatchDataset(tif, coords, 1.0, info["input_size"], info["mean"], info["std"], patch_side_fullres=pitch)
        embed(model, make_loader(dataset, batch_size=batch, num_workers=0), torch.device("cpu"), amp=False)
    print(json.dumps({"mode": mode, "baseline_mb": baseline, "peak_mb": peak_rss_mb(),
                      "rise_mb": peak_rss_mb() - baseline, "seconds": time.perf_counter() - started}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--side", type=int, default=13332)
    parser.add_argument("--spots", type=int, default=3600)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--child", nargs=2, metavar=("MODE", "TIFF"))
    args = parser.parse_args()
    if args.child:
        child(args.child[0], args.child[1], args.side, args.spots, args.batch)
        return
    decoded_mb = args.side * args.side * 3 / 1e6
    with tempfile.TemporaryDirectory() as tmp:
        tif = Path(tmp) / "fullres.tif"
        t0 = time.perf_counter()
        write_tiff(tif, args.side)
        print(f"wrote {tif.stat().st_size / 1e6:.0f} MB TIFF ({args.side} px, decoded {decoded_mb:.0f} MB) in {time.perf_counter() - t0:.0f} s")
        results = {}
        for mode in ("naive", "lazy"):
            out = subprocess.run(
                [sys.executable, __file__, "--side", str(args.side), "--spots", str(args.spots), "--batch", str(args.batch),
                 "--child", mode, str(tif)],
                cwd=REPO, capture_output=True, text=True, check=True,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cpus; batch {args.batch}, {args.spots} spots")
    for mode, r in results.items():
        print(f"{mode:5s}: peak RSS rise {r['rise_mb']:7.1f} MB ({r['rise_mb'] / decoded_mb:.1%} of decoded image), {r['seconds']:.0f} s")
    ratio = results["lazy"]["rise_mb"] / decoded_mb
    print(f"lazy rise / decoded image = {ratio:.3f} (target <= 0.25)")


if __name__ == "__main__":
    main()
