"""IO manager for spot embeddings: ``<base_dir>/<asset key path>/<partition>.npz``, atomic."""

from __future__ import annotations

from pathlib import Path

from dagster import ConfigurableIOManager, InputContext, OutputContext

from mihd_assets.embeddings.store import SpotEmbedding

from .io_manager import partition_file, partitions_for_unpartitioned_consumer


class EmbeddingIOManager(ConfigurableIOManager):
    """Partition keys are checked by :func:`mihd_resources.io_manager.partition_file`."""

    base_dir: str

    def _path(self, context: OutputContext | InputContext) -> Path:
        return partition_file(self.base_dir, context, ".npz")

    def handle_output(self, context: OutputContext, obj: SpotEmbedding) -> None:
        if not isinstance(obj, SpotEmbedding):
            raise TypeError(f"{context.asset_key.to_user_string()}: expected SpotEmbedding, got {type(obj).__name__}")
        path = self._path(context)
        obj.save(path)
        context.add_output_metadata({"path": str(path), "shape": list(obj.values.shape)})

    def load_input(self, context: InputContext) -> SpotEmbedding | dict[str, SpotEmbedding]:
        keys = partitions_for_unpartitioned_consumer(context)
        if keys is not None:
            return {k: self._load(partition_file(self.base_dir, context, ".npz", k)) for k in keys}
        return self._load(self._path(context))

    @staticmethod
    def _load(path: Path) -> SpotEmbedding:
        if not path.is_file():
            raise FileNotFoundError(f"no stored embedding {path}; materialize the upstream partition first")
        return SpotEmbedding.load(path)
