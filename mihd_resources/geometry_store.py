"""Where the geometry family keeps its files: training set, checkpoint, evaluation table.

The checkpoint asset writes its file itself, every N training steps (atomically), so a
killed run can resume; the other geometry files live beside it for one place to look.
"""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableResource

from .storage import path_in_root

TRAINING_SET = "geometry_training_set.npz"
CHECKPOINT = "geometry_checkpoint.pt"
CHECKPOINT_RECORD = "geometry_checkpoint.json"
EVALUATION = "geometry_evaluation.csv"


class GeometryStore(ConfigurableResource):
    """``<base_dir>/geometry/<file>``."""

    base_dir: str

    def path(self, name: str) -> Path:
        """``<base_dir>/geometry/<name>``; a name that leaves that folder is a ValueError."""
        path = path_in_root(Path(self.base_dir, "geometry"), name)
        path.parent.mkdir(parents=True, exist_ok=True)
        return path

    def existing(self, name: str, produced_by: str) -> Path:
        path = self.path(name)
        if not path.is_file():
            raise FileNotFoundError(f"no {path}; materialize geometry/{produced_by} first")
        return path
