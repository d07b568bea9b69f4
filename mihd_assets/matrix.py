"""The one declaration of the MIHD benchmark matrix; asset factories read it.

Adding a method = one function in its family + one name here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


@dataclass(frozen=True)
class BenchmarkMatrix:
    # Gene encoders read `preprocessed_slide_<gene_preset>`.
    gene_encoders: tuple[str, ...] = ("pca", "mlp", "scgpt")
    gene_preset: str = "standard"
    # Vision encoders x patch variants: one asset each.
    vision_encoders: tuple[str, ...] = ("resnet50", "uni", "uni2", "hipt")
    vision_variants: tuple[str, ...] = ("standard", "freq", "staig_strict")
    # 30 PCs: the textbook scanpy pipeline (HVG 3000 -> PCA 30 -> mclust EEE).
    pca_components: int = 30
    mlp_latent_dim: int = 32
    mlp_epochs: int = 100

    # Fusion: each method x each (gene encoder, "<vision encoder>_<variant>") pair.
    fusion_methods: tuple[str, ...] = ("concat", "mean", "llava_mlp", "basic_contrastive", "qformer")
    fusion_inputs: tuple[tuple[str, str], ...] = (("pca", "uni2_standard"),)
    # STAIG reads the HVG matrix of the `staig` preset and this image embedding.
    staig_vision: str = "uni2_staig_strict"
    # Single-modality baselines clustered beside the fusions.
    gene_only: tuple[str, ...] = ("pca",)
    vision_only: tuple[str, ...] = ("uni2_standard",)
    # Image-only clustering methods on this vision embedding (BYOL+GAT also reads the patches).
    image_only_methods: tuple[str, ...] = ("scan", "stego", "byol_gat")
    image_only_vision: str = "uni2_standard"

    # Clustering x refinement: every clustering asset stores raw and refined labels and
    # both get metric rows (refinement = "none" | "majority_k<k>").
    clustering_methods: tuple[str, ...] = ("mclust", "kmeans", "leiden")
    refine_k: int = 15
    # Representations wider than this are reduced to `cluster_pcs` principal components
    # before clustering (mclust's EEE covariance is singular on ~1,000-d inputs); recorded.
    max_cluster_dims: int = 64
    cluster_pcs: int = 30

    # Cluster counts: DLPFC has 7 domains, 5 on 151669-151672; other slides use the number
    # of truth labels when they have them, else `default_clusters`.
    default_clusters: int = 7
    cluster_overrides: tuple[tuple[str, int], ...] = (
        ("151669", 5), ("151670", 5), ("151671", 5), ("151672", 5),
    )
    # Replicates of every stochastic step (trained fusions, STAIG, image-only methods,
    # clusterings). Replicate 0 uses each method's default seed (STAIG's published 39788,
    # mclust's 2020, ...), replicate r that seed + r; r > 0 adds `__rep<r>` to the asset keys.
    # DuckDB rows carry `replicate` and `seed`; the leaderboard views average over replicates.
    replicates: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.replicates <= 50:
            raise ValueError(f"benchmark matrix: replicates must be 1..50, got {self.replicates}")


def replicate_suffix(replicate: int) -> str:
    """The asset-key suffix of a replicate: none for replicate 0, ``__rep<r>`` otherwise."""
    return f"__rep{replicate}" if replicate else ""


def cluster_count(slide_id: str, truth_labels=None, matrix: "BenchmarkMatrix | None" = None) -> tuple[int, str]:
    """How many clusters to ask for on this slide, and where that number came from."""
    import pandas as pd

    m = matrix or MATRIX
    overrides = dict(m.cluster_overrides)
    if slide_id in overrides:
        return overrides[slide_id], "matrix (DLPFC slide)"
    if truth_labels is not None:
        labels = pd.Series(truth_labels, dtype=object).dropna().astype(str)
        labels = labels[labels != "nan"]
        if labels.nunique() > 1:
            return int(labels.nunique()), "truth labels"
    return m.default_clusters, "default"


def _replicates_from_env() -> int:
    value = os.environ.get("MIHD_REPLICATES", "1")
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"MIHD_REPLICATES must be an integer number of replicates, got {value!r}") from None


MATRIX = BenchmarkMatrix(replicates=_replicates_from_env())
