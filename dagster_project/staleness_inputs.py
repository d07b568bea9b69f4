"""Per-family facts the staleness rule needs: which assets read raw files, which are gated."""

from __future__ import annotations

from typing import Callable

from dagster import AssetKey

from mihd_assets.slides.assets import RAW_SLIDE, slide_input_fingerprint
from mihd_resources import StorageResource


def slide_fingerprints(storage: StorageResource) -> dict[AssetKey, Callable[[str], str]]:
    return {RAW_SLIDE: lambda slide_id: slide_input_fingerprint(storage, slide_id)}


def slide_gates() -> dict[AssetKey, str]:
    """raw_slide records `tissue_check_passed`; a False blocks its downstream assets."""
    return {RAW_SLIDE: "tissue_check_passed"}
