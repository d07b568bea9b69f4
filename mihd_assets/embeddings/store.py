"""One spot embedding as stored: raw values exactly as the encoder produced them."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fileio import atomic_path


@dataclass
class SpotEmbedding:
    """Raw (n_spots, d) float32 values, the spot barcodes, and what produced them.

    Stored before any scaling or PCA: consumers normalise after loading, in one place,
    so the same cache serves every downstream method.
    """

    values: np.ndarray
    obs_names: list[str]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.values = np.asarray(self.values, dtype=np.float32)
        if self.values.ndim != 2 or self.values.shape[0] != len(self.obs_names):
            raise ValueError(
                f"embedding shape {self.values.shape} does not match {len(self.obs_names)} spot barcodes"
            )
        if not np.isfinite(self.values).all():
            bad = int((~np.isfinite(self.values)).any(axis=1).sum())
            raise ValueError(
                f"embedding {self.info.get('encoder', '?')} of shape {self.values.shape} has NaN/inf values "
                f"in {bad} rows"
            )

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(
                    fh,
                    values=self.values,
                    obs_names=np.asarray(self.obs_names, dtype=str),
                    info_json=np.asarray(json.dumps(self.info, default=str)),
                )

    @classmethod
    def load(cls, path: str | Path) -> "SpotEmbedding":
        with np.load(path, allow_pickle=False) as data:
            try:
                return cls(data["values"], data["obs_names"].tolist(), json.loads(str(data["info_json"])))
            except ValueError as err:
                raise ValueError(f"{path}: {err}") from err
