"""Held-out kNN Jaccard@10 of refinement schedules, side by side on one checkpoint.

    .venv/bin/python benchmarks/geometry_refinement.py [MIHD_HOME]

Reads the geometry checkpoint and training set of a MIHD home (default: $MIHD_HOME, e.g. the
temporary home `benchmarks/geometry_demo.py` prints) and scores, on every held-out set, the
generator and refinement (generator -> noise at sigma_refine -> Heun steps) for several step
counts and stopping levels: sigma_min (the sampler's floor) and multiples of sigma_gen, the
generator's RMS error stored in the checkpoint. Three noise draws per schedule: mean and spread.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    home = Path(sys.argv[1] if len(sys.argv) > 1 else os.environ["MIHD_HOME"])
    from mihd_assets.geometry.config import geometry_plan
    from mihd_assets.geometry.evaluate import Inference, set_metrics
    from mihd_assets.geometry.targets import GeometryTrainingSet
    from mihd_assets.geometry.train import checkpoint_sigma_gen, load_model, set_batch

    torch.set_num_threads(2)
    root = home / "storage" / "geometry"
    ts = GeometryTrainingSet.load(root / "geometry_training_set.npz")
    ckpt = root / "geometry_checkpoint.pt"
    model, saved = load_model(ckpt)
    plan = geometry_plan()
    sd, sg = ts.sigma_data, checkpoint_sigma_gen(saved, str(ckpt))
    inf = Inference(model, sd, torch.device("cpu"), sigma_gen=sg)
    sets = ts.heldout
    feats, target, mask = set_batch(ts, sets, np.arange(len(sets.size)), "cpu")
    context, v_gen = inf.generate(feats, mask)

    def jaccard(out: torch.Tensor) -> float:
        return float(np.mean([
            set_metrics(out[j, :n].numpy().astype(np.float64), target[j, :n].numpy().astype(np.float64), plan.knn_k)["knn_jaccard"]
            for j, n in enumerate(sets.size.astype(int))
        ]))

    sigma_refine = plan.sigma_refine_factor * sd
    print(f"checkpoint step {saved['step']}, sigma_data {sd:.3f}, sigma_gen {sg:.3f}, sigma_refine {sigma_refine:.3f}, "
          f"{len(sets.size)} held-out sets")
    print(f"generator: {jaccard(v_gen):.4f}")
    gen = torch.Generator().manual_seed(plan.seed)
    stops = {"sigma_min": plan.sigma_min_factor * sd, "1 x sigma_gen": sg, "2 x sigma_gen": 2 * sg, "3 x sigma_gen": 3 * sg}
    print("| stop at | " + " | ".join(f"{s} steps" for s in (1, 2, 4, 8)) + " |")
    print("|---|---|---|---|---|")
    for name, stop in stops.items():
        cells = []
        for steps in (1, 2, 4, 8):
            scores = [jaccard(inf.refine(context, v_gen, mask, sigma_refine, steps, stop, gen)) for _ in range(3)]
            cells.append(f"{np.mean(scores):.4f} ± {np.std(scores):.4f}")
        print(f"| {name} ({stop:.3f}) | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
