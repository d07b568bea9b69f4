"""The research families merged into the platform's Definitions, and their demo-data writers.

Each family (``mihd_assets.<family>``) exposes a ``definitions.py`` with a ``Definitions``
object (its assets, sources, jobs, sensors) and, when it has demo data of its own, a
``demo.py`` with ``write_demo_data() -> str`` (a one-line summary). `mihd demo` writes every
family's data, then materializes everything through the same planner as `mihd materialize`.
"""

from __future__ import annotations

import importlib
from typing import Callable

from dagster import Definitions

FAMILY_DEFINITIONS = ["mihd_assets.geometry.definitions", "mihd_assets.segmentation.definitions",
                      "mihd_assets.leaderboard.definitions"]
# geometry trains on the demo slides; its demo data is a cell dataset made from the held-out one
FAMILY_DEMOS = ["mihd_assets.segmentation.demo", "mihd_assets.geometry.demo"]


def family_definitions() -> list[Definitions]:
    return [importlib.import_module(module).defs for module in FAMILY_DEFINITIONS]


def family_missing_inputs(instance) -> dict[str, str]:
    """Group name -> why that family cannot run on this instance's data (families that can are absent).

    `mihd materialize` skips such a family and says why, instead of failing its assets."""
    reasons = {}
    for module in FAMILY_DEFINITIONS:
        family = importlib.import_module(module)
        reason = family.missing_inputs(instance)
        if reason:
            reasons[module.split(".")[1]] = reason
    return reasons


def family_demo_writers() -> list[tuple[str, Callable[[], str]]]:
    return [(module, importlib.import_module(module).write_demo_data) for module in FAMILY_DEMOS]
