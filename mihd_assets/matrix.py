"""The one declaration of the MIHD benchmark matrix; asset factories read it.

Adding a method = one function in its family + one name here.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchmarkMatrix:
    # Gene encoders read `preprocessed_slide_<gene_preset>`.
    gene_encoders: tuple[str, ...] = ("pca", "mlp", "scgpt")
    gene_preset: str = "standard"
    # Vision encoders x patch variants: one asset each.
    vision_encoders: tuple[str, ...] = ("resnet50", "uni", "uni2", "hipt")
    vision_variants: tuple[str, ...] = ("standard", "freq", "staig_strict")
    pca_components: int = 50
    mlp_latent_dim: int = 32
    mlp_epochs: int = 100


MATRIX = BenchmarkMatrix()
