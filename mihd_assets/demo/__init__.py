"""Deterministic demo-data generators (the platform's embedded default data)."""
