"""The one declaration of the geometry experiment: slides, encoder, sizes, training, evaluation.

Two sizes of the same code: ``tiny`` (CPU: tests and the demo) and ``full`` (GPU: larger
sets and network, bf16 autocast from the compute resource). The demo profile picks
``tiny``, the full profile ``full``; ``MIHD_GEOMETRY_SIZE`` overrides. Which slides train
and which are held out comes from ``MIHD_GEOMETRY_TRAIN_SLIDES`` /
``MIHD_GEOMETRY_HELDOUT_SLIDES`` (comma-separated), by default the demo slides.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

# Noise-level bins of the per-sigma scale table (the bins the EDM denoiser's scale
# collapse was first measured in), and the sigmas evaluated inside each bin (the last
# bin stops at 2.4, where that collapse was measured at a scale ratio of about 0.08).
SIGMA_BINS: tuple[tuple[float, float], ...] = ((0.0, 0.1), (0.1, 0.3), (0.3, 0.5), (0.5, 1.0), (1.0, float("inf")))
SIGMAS_PER_BIN: tuple[tuple[float, ...], ...] = (
    (0.02, 0.05, 0.08), (0.12, 0.2, 0.28), (0.32, 0.4, 0.48), (0.55, 0.7, 0.9), (1.2, 1.8, 2.4),
)


def sigma_bin_label(lo: float, hi: float) -> str:
    return f"[{lo:.2f},{'inf' if hi == float('inf') else f'{hi:.2f}'})"


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 800
    batch_size: int = 16
    lr: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 100
    grad_clip: float = 1.0
    # Gaussian noise added to the features of every training batch: with few training slides
    # the network can otherwise memorise each spot's features instead of learning the mapping.
    feature_noise: float = 0.3
    checkpoint_every: int = 200
    log_every: int = 50
    seed: int = 0
    # EDM training noise: ln sigma ~ N(p_mean, p_std^2) (Karras et al.)
    p_mean: float = -1.2
    p_std: float = 1.2
    # Noise matching (SDEdit-style): the generator's estimate counts as the target plus noise of
    # the generator's own RMS error sigma_gen (an average over training batches, momentum below,
    # kept in the checkpoint). Noise levels above sigma_gen are trained from the estimate plus
    # sqrt(sigma^2 - sigma_gen^2) of fresh noise, which is what refinement feeds the denoiser;
    # levels below it from the target plus noise, as in plain EDM. Both predict the target.
    generator_noise_matching: bool = True
    sigma_gen_momentum: float = 0.98
    # Loss weights: generator (Procrustes-aligned MSE, log-scale), denoiser (EDM), optional geometry.
    w_gen_align: float = 1.0
    w_gen_scale: float = 1.0
    w_score: float = 1.0
    w_knn_nca: float = 0.0
    w_edge: float = 0.0
    knn_k: int = 10

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class GeometrySize:
    name: str
    width: int
    heads: int
    inducing: int
    context_blocks: int
    generator_blocks: int
    denoiser_blocks: int
    set_size_min: int
    set_size_max: int
    n_sets_train: int
    n_sets_heldout: int  # per held-out slide
    train: TrainConfig = field(default_factory=TrainConfig)


SIZES = {
    "tiny": GeometrySize("tiny", width=64, heads=4, inducing=16, context_blocks=2, generator_blocks=2,
                         denoiser_blocks=2, set_size_min=64, set_size_max=128, n_sets_train=1024, n_sets_heldout=24),
    "full": GeometrySize("full", width=256, heads=8, inducing=32, context_blocks=2, generator_blocks=2,
                         denoiser_blocks=4, set_size_min=256, set_size_max=512, n_sets_train=20000,
                         n_sets_heldout=64, train=TrainConfig(steps=20000, batch_size=32, lr=3e-4,
                                                              warmup_steps=500, checkpoint_every=1000, log_every=200)),
}


@dataclass(frozen=True)
class GeometryPlan:
    train_slides: tuple[str, ...]
    heldout_slides: tuple[str, ...]
    gene_encoder: str = "shared_pca"  # or the name of a frozen gene-embedding asset: "scgpt"
    dims: int = 2
    pca_genes: int = 200  # spatially variable genes (Moran's I on the training slides)
    pca_components: int = 32
    # Slides whose gene lists differ train on the genes they all share; fewer than this is an error.
    min_shared_genes: int = 50
    seed: int = 0
    knn_k: int = 10
    # Inference: generator -> noise at sigma_refine_factor x sigma_data -> a few Heun steps. With
    # the generator's error sigma_gen the noisy estimate sits at sqrt(sigma_refine^2 + sigma_gen^2),
    # where the steps start; they stop at refine_stop_factor x sigma_gen (the final step to 0 is
    # the denoiser's estimate there). Below the generator's error the denoiser can only invent
    # detail the expression does not determine (benchmarks/RESULTS.md, "Noise-matched refinement").
    sigma_refine_factor: float = 1.5
    refine_steps: int = 4
    refine_stop_factor: float = 2.0
    # Full sampler (diagnostic), range in units of sigma_data (Karras: 0.002..80 at sigma_data 0.5).
    sampler_steps: int = 18
    sigma_min_factor: float = 0.004
    sigma_max_factor: float = 160.0

    def __post_init__(self):
        overlap = set(self.train_slides) & set(self.heldout_slides)
        if overlap:
            raise ValueError(f"geometry slides both trained on and held out: {sorted(overlap)}")
        if not self.train_slides or not self.heldout_slides:
            raise ValueError("geometry needs at least one training and one held-out slide")


DEFAULT_TRAIN = ("demo_01", "demo_02")
DEFAULT_HELDOUT = ("demo_03",)


def _slides_from_env(name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = os.environ.get(name)
    if not raw:
        return default
    return tuple(s.strip() for s in raw.split(",") if s.strip())


def geometry_plan() -> GeometryPlan:
    return GeometryPlan(
        train_slides=_slides_from_env("MIHD_GEOMETRY_TRAIN_SLIDES", DEFAULT_TRAIN),
        heldout_slides=_slides_from_env("MIHD_GEOMETRY_HELDOUT_SLIDES", DEFAULT_HELDOUT),
        gene_encoder=os.environ.get("MIHD_GEOMETRY_ENCODER", "shared_pca"),
        min_shared_genes=int(os.environ.get("MIHD_GEOMETRY_MIN_SHARED_GENES", "50")),
    )


def geometry_size(profile: str) -> GeometrySize:
    name = os.environ.get("MIHD_GEOMETRY_SIZE") or ("tiny" if profile == "demo" else "full")
    if name not in SIZES:
        raise ValueError(f"MIHD_GEOMETRY_SIZE must be one of {sorted(SIZES)}, got {name!r}")
    return SIZES[name]
