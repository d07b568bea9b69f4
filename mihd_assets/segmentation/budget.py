"""E2 label efficiency: the baseline fine-tuned on growing training budgets, each scored on the test set."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import numpy as np

from .cellpose_api import load_model, segment, train
from .scoring import score_masks


def budget_runs(log, plan, base: dict, train_set, test, ids: list[str], device, profile: str,
                checkpoint_path: Callable[[str], Path]):
    """Every budget x seed fine-tune of E2 (``checkpoint_path(name)`` says where each goes) and
    its test scores: (run records, score frames, images dropped for too few masks)."""
    runs, score_frames, drops = [], [], 0
    total = len(plan.budgets) * len(plan.budget_seeds)
    for k, (budget, seed) in enumerate(((b, s) for b in plan.budgets for s in plan.budget_seeds), 1):
        chosen = sorted(np.random.default_rng(seed).permutation(len(train_set.images))[:budget].tolist())
        subset = train_set.subset(chosen)
        name = f"budget_{budget}_seed_{seed}"
        out = checkpoint_path(name)
        result = train(base["path"], subset.images, subset.masks, out, n_epochs=plan.n_epochs, learning_rate=plan.learning_rate,
                       weight_decay=plan.weight_decay, batch_size=plan.batch_size, min_train_masks=plan.min_train_masks,
                       seed=seed, device=device)
        scores = score_masks(test.masks, segment(load_model(out, device), test.images, plan.eval), ids)
        score_frames.append(scores.assign(variant=name, budget=budget, seed=seed))
        dropped = [subset.records[i]["image_id"] for i in result.dropped]
        drops += len(dropped)
        if dropped:
            log.warning(f"E2 {name}: {len(dropped)} image(s) with < {plan.min_train_masks} masks left out: {dropped}")
        runs.append({"model": name, "budget": budget, "seed": seed, "images": [subset.records[i]["image_id"] for i in range(budget)],
                     "sha256": result.sha256, "config": base["config"], "profile": profile, "init_weights": base["weights"],
                     "weights": f"finetuned_from:{base['weights']}", "n_train_given": result.n_images_given,
                     "n_train_used": result.n_images_used, "dropped_min_masks": dropped, "min_train_masks": plan.min_train_masks,
                     "n_epochs": plan.n_epochs, "learning_rate": plan.learning_rate, "final_train_loss": result.train_losses[-1],
                     "seconds": round(result.seconds, 2)})
        ap = float(scores[scores["level"] == "total"]["ap50"].iloc[0])
        log.info(f"E2 {k}/{total}: {name} test AP50 {ap:.3f} ({result.seconds:.0f} s)")
    return runs, score_frames, drops
