"""Small helpers every asset family uses to report what ran (metadata, progress logs)."""

from __future__ import annotations

import time
from typing import Callable

from dagster import MetadataValue


def run_record_metadata(record: dict, exclude: tuple[str, ...] = ()) -> dict:
    """A run record as Dagster metadata: nested values as JSON, missing values and ``exclude`` left out."""
    return {
        k: (MetadataValue.json(v) if isinstance(v, (dict, list, tuple)) else v)
        for k, v in record.items()
        if v is not None and k not in exclude
    }


def throttled_log(context, label: str, every_s: float = 10.0) -> Callable[..., None]:
    """``report(message, final=False)``: an INFO line at most every ``every_s`` seconds, and always the final one."""
    last = [0.0]

    def report(message: str, final: bool = False) -> None:
        now = time.perf_counter()
        if final or now - last[0] > every_s:
            last[0] = now
            context.log.info(f"{label}: {message}")

    return report
