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
            return {k: self._load(partition_file(self.base_dir, context, ".npz", k), context, k) for k in keys}
        partition = context.asset_partition_key if context.has_asset_partitions else None
        return self._load(self._path(context), context, partition)

    def _load(self, path: Path, context: InputContext, partition: str | None) -> SpotEmbedding:
        if not path.is_file():
            name = context.asset_key.path[-1]
            if partition is not None and name.startswith("vision_") and self._slide_has_no_image(partition):
                raise FileNotFoundError(
                    f"slide '{partition}' has no image (no full-resolution TIFF, no hires or lowres PNG): the vision "
                    f"embedding {name} is never computed for it, and what reads it needs the slide's pixels and does "
                    "not run for it; gene-only assets do"
                )
            raise FileNotFoundError(f"no stored embedding {path}; materialize the upstream partition first")
        return SpotEmbedding.load(path)

    def _slide_has_no_image(self, slide: str) -> bool:
        """Whether the slide's stored raw_slide (same storage root) was read without any image."""
        import h5py

        raw = Path(self.base_dir) / "slides" / "raw_slide" / f"{slide}.h5ad"
        if not raw.is_file():
            return False
        with h5py.File(raw, "r") as f:
            group = f.get(f"uns/spatial/{slide}/metadata/image_paths")
            return group is not None and len(group.keys()) == 0
