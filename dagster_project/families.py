"""The research families beyond the slide pipeline, as the platform sees them.

Each family package (``mihd_assets.<family>``) exposes a ``definitions.py`` with a
``Definitions`` object (its assets, jobs, sensors, schedules) and a ``demo.py`` with
``run_demo(instance, verbose) -> int`` (number of failures) that writes the family's
demo data and materializes it. Adding a family = one line in each list below.
"""

from __future__ import annotations

import importlib
from typing import Callable

from dagster import Definitions

# (module with `defs`, module with `run_demo`) per family, in demo order.
FAMILIES: list[tuple[str, str]] = [
    ("mihd_assets.geometry.definitions", "mihd_assets.geometry.demo"),
    ("mihd_assets.segmentation.definitions", "mihd_assets.segmentation.demo"),
]


def family_definitions() -> list[Definitions]:
    return [importlib.import_module(defs_module).defs for defs_module, _ in FAMILIES]


def family_demos() -> list[tuple[str, Callable[..., int]]]:
    return [(demo_module, importlib.import_module(demo_module).run_demo) for _, demo_module in FAMILIES]
