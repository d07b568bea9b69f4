"""IO manager for cluster labels: ``<base_dir>/<asset key path>/<partition>.npz``, atomic."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableIOManager, InputContext, OutputContext

from mihd_assets.fusion.store import SpotLabels

from .io_manager import partition_file


class LabelsIOManager(ConfigurableIOManager):
    """Partition keys are checked by :func:`mihd_resources.io_manager.partition_file`."""

    base_dir: str

    def _path(self, context: OutputContext | InputContext) -> Path:
        return partition_file(self.base_dir, context, ".npz")

    def handle_output(self, context: OutputContext, obj: SpotLabels) -> None:
        if not isinstance(obj, SpotLabels):
            raise TypeError(f"{context.asset_key.to_user_string()}: expected SpotLabels, got {type(obj).__name__}")
        path = self._path(context)
        obj.save(path)
        context.add_output_metadata({"path": str(path), "n_spots": len(obj.obs_names)})

    def load_input(self, context: InputContext) -> SpotLabels:
        path = self._path(context)
        if not path.is_file():
            raise FileNotFoundError(f"no stored labels {path}; materialize the upstream partition first")
        return SpotLabels.load(path)
