"""Figures and reports rendered from stored results only (never by re-running a model)."""
