"""IO manager for cluster labels: ``<base_dir>/<asset key path>/<partition>.npz``, atomic."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableIOManager, InputContext, OutputContext

from mihd_assets.fusion.store import SpotLabels


class LabelsIOManager(ConfigurableIOManager):
    base_dir: str

    def _path(self, context: OutputContext | InputContext) -> Path:
        partition = context.asset_partition_key if context.has_asset_partitions else "__all__"
        return Path(self.base_dir, *context.asset_key.path, f"{partition}.npz")

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
