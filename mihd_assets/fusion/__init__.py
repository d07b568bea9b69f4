"""Fusion of gene and vision embeddings, clustering, refinement, metrics and image-only methods."""
