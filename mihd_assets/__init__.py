"""Science code of the MIHD platform: one package per asset family.

Every family keeps pure modules (arrays / AnnData in, results out, no dagster import)
and one ``assets.py`` that wires them into Dagster.
"""
