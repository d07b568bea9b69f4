"""Embeddings: spot patch datasets and vision encoders (gene encoders live beside them)."""
