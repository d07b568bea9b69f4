"""The one declaration of the E0-E5 experiment sizes, per profile (demo shrinks, same code)."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, replace

from mihd_resources import settings

from .gating import GATING_QUANTILES, MIN_AREAS

MODELS = ("baseline", "generic", "marker_specific", "marker_only")
FINE_TUNED = ("generic", "marker_specific", "marker_only")


@dataclass(frozen=True)
class EvalSettings:
    """cellpose ``eval`` thresholds (its defaults), recorded with every prediction."""

    flow_threshold: float = 0.4
    cellprob_threshold: float = 0.0
    min_size: int = 15
    batch_size: int = 8


@dataclass(frozen=True)
class SegmentationPlan:
    marker: str = "GFAP"  # marker of the marker-specific fine-tune and of E5's counts
    split_fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)
    split_seed: int = 0
    n_epochs: int = 100
    learning_rate: float = 1e-5  # cellpose's fine-tuning defaults
    weight_decay: float = 0.1
    batch_size: int = 8
    min_train_masks: int = 5
    budgets: tuple[int, ...] = (2, 5, 10, 20, 30)
    budget_seeds: tuple[int, ...] = (0, 1, 2)
    gating_quantiles: tuple = GATING_QUANTILES
    min_areas: tuple[int, ...] = MIN_AREAS
    points_per_side: tuple[int, ...] = (8, 16, 32, 64)
    e5_finetuned_model: str = "generic"
    # A cell is marker-positive when its mean marker intensity (raw units) reaches this.
    marker_threshold: float = 500.0
    bootstrap_replicates: int = 1000
    bootstrap_fraction: float = 0.8
    bootstrap_seed: int = 0
    eval: EvalSettings = EvalSettings()

    def describe(self) -> dict:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(self).items()}


def plan_for_profile(profile: str | None = None) -> SegmentationPlan:
    """Full sizes by default; the demo profile trains a random tiny network (a higher
    learning rate and more epochs, since it starts from random weights: with 30 epochs only
    training sets of 30+ images learned at all, which flattened the E2 curve) and uses one E2
    seed per budget (the ten 150-epoch runs of two seeds were a fifth of the whole demo's time
    on two CPU cores) and fewer bootstrap replicates.
    ``MIHD_SEG_MARKER_THRESHOLD`` overrides the positivity threshold for real data and
    ``MIHD_SEG_EPOCHS`` the training epochs (smoke runs); both are recorded with the results."""
    profile = profile or settings.profile()
    plan = SegmentationPlan()
    if profile == "demo":
        plan = replace(plan, n_epochs=150, learning_rate=1e-3, weight_decay=0.01, budget_seeds=(0,),
                       bootstrap_replicates=500)
    if os.environ.get("MIHD_SEG_MARKER_THRESHOLD"):
        plan = replace(plan, marker_threshold=float(os.environ["MIHD_SEG_MARKER_THRESHOLD"]))
    if os.environ.get("MIHD_SEG_EPOCHS"):
        plan = replace(plan, n_epochs=int(os.environ["MIHD_SEG_EPOCHS"]))
    if plan.n_epochs < 2:
        # cellpose's train_seg warms its learning rate up from 0: epoch 1 runs at rate 0, so a
        # one-epoch "fine-tune" returns the base network unchanged.
        raise ValueError(f"segmentation training needs at least 2 epochs (MIHD_SEG_EPOCHS={plan.n_epochs}): cellpose "
                         "trains its first epoch at learning rate 0, so one epoch changes no weight")
    return plan
