"""Cluster labels of one slide as stored: raw and refined labels per spot, and what ran."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..fileio import atomic_path


@dataclass
class SpotLabels:
    """Labels (0..K-1) per spot before and after spatial refinement, with the run record.

    Figures and metrics are computed from these stored labels only, never by re-running
    inference.
    """

    obs_names: list[str]
    labels: np.ndarray
    refined: np.ndarray
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        self.labels = np.asarray(self.labels, dtype=np.int64)
        self.refined = np.asarray(self.refined, dtype=np.int64)
        n = len(self.obs_names)
        if self.labels.shape != (n,) or self.refined.shape != (n,):
            raise ValueError(f"labels {self.labels.shape} / refined {self.refined.shape} do not match {n} spots")

    def save(self, path: str | Path) -> None:
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, obs_names=np.asarray(self.obs_names, dtype=str), labels=self.labels,
                         refined=self.refined, info_json=np.asarray(json.dumps(self.info, default=str)))

    @classmethod
    def load(cls, path: str | Path) -> "SpotLabels":
        with np.load(path, allow_pickle=False) as data:
            return cls(data["obs_names"].tolist(), data["labels"], data["refined"], json.loads(str(data["info_json"])))
