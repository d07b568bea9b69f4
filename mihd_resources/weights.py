"""Local model weights. Nothing is fetched from a hub at run time: a model either has a
local file configured here, or runs with random initialisation recorded as `weights: random`."""

from __future__ import annotations

import os
from pathlib import Path

from dagster import ConfigurableResource
from pydantic import Field


def _env(name: str) -> str:
    return os.environ.get(name, "")


class ModelWeightsResource(ConfigurableResource):
    """Paths of local checkpoints, one field per model (empty = not configured).

    Each field defaults to an environment variable, e.g. ``MIHD_UNI_WEIGHTS`` for
    ``uni``; ``scgpt_dir`` is a folder with vocab.json, args.json and best_model.pt.
    ``allow_random`` lets a model without weights run randomly initialised (the demo and
    tests); the result then says `weights: random` everywhere it is recorded.
    """

    resnet50: str = Field(default_factory=lambda: _env("MIHD_RESNET50_WEIGHTS"))
    uni: str = Field(default_factory=lambda: _env("MIHD_UNI_WEIGHTS"))
    uni2: str = Field(default_factory=lambda: _env("MIHD_UNI2_WEIGHTS"))
    hipt: str = Field(default_factory=lambda: _env("MIHD_HIPT_WEIGHTS"))
    scgpt_dir: str = Field(default_factory=lambda: _env("MIHD_SCGPT_DIR"))
    allow_random: bool = Field(default_factory=lambda: _env("MIHD_ALLOW_RANDOM_WEIGHTS") == "1")

    def path_for(self, model: str) -> Path | None:
        """The configured local path for ``model``, or None; a configured path that does
        not exist is an error naming the setting."""
        field = "scgpt_dir" if model == "scgpt" else model
        if field not in type(self).model_fields:
            raise KeyError(f"no weights setting for model {model!r}")
        value = getattr(self, field)
        if not value:
            return None
        path = Path(value)
        if not path.exists():
            raise FileNotFoundError(f"ModelWeightsResource.{field} = {value!r} does not exist")
        return path
