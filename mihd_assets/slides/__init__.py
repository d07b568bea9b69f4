"""Visium slides: readers for real 10x layouts, preprocessing presets, coordinate checks."""
