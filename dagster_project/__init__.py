"""Dagster wiring of the MIHD platform; ``definitions.py`` holds the one ``Definitions``."""
