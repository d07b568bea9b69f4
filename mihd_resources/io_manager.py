"""IO manager storing AnnData outputs as ``.h5ad`` files, one per asset and partition."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pathlib import Path

from dagster import ConfigurableIOManager, DagsterInvariantViolationError, InputContext, OutputContext

from mihd_assets.fileio import atomic_path

from .storage import InvalidPartitionKey, partition_path, partitions_label, path_in_root

if TYPE_CHECKING:
    import anndata as ad


class AnnDataIOManager(ConfigurableIOManager):
    """``<base_dir>/<asset key path>/<partition>.h5ad``, written atomically.

    The files are plain AnnData: open them with ``anndata.read_h5ad`` in any notebook.
    """

    base_dir: str

    def _path(self, context: OutputContext | InputContext) -> Path:
        return partition_file(self.base_dir, context, ".h5ad")

    def handle_output(self, context: OutputContext, obj: ad.AnnData) -> None:
        import anndata as ad

        if not isinstance(obj, ad.AnnData):
            raise TypeError(f"{context.asset_key.to_user_string()}: expected AnnData, got {type(obj).__name__}")
        path = self._path(context)
        with atomic_path(path) as tmp:
            obj.write_h5ad(tmp)
        context.add_output_metadata({"path": str(path), "n_obs": obj.n_obs, "n_vars": obj.n_vars})

    def load_input(self, context: InputContext) -> ad.AnnData | dict[str, ad.AnnData]:
        import anndata as ad

        keys = partitions_for_unpartitioned_consumer(context)
        if keys is not None:
            return {k: ad.read_h5ad(self._existing(context, k)) for k in keys}
        return ad.read_h5ad(self._existing(context, None))

    def _existing(self, context: InputContext, partition: str | None) -> Path:
        path = self._path(context) if partition is None else partition_file(self.base_dir, context, ".h5ad", partition)
        if not path.is_file():
            raise FileNotFoundError(
                f"{context.asset_key.to_user_string()}: no stored file {path}; materialize the upstream partition first"
            )
        return path


UNPARTITIONED = "__all__"  # the file name of an unpartitioned asset's object


def partition_file(base_dir: str, context: OutputContext | InputContext, suffix: str, key: str | None = None) -> Path:
    """``<base_dir>/<asset key path>/<partition key><suffix>`` of ``context``'s partition (or of
    ``key``, one of several upstream partitions), ``__all__<suffix>`` when unpartitioned.

    The partition key must be a plain file name and the path must stay inside ``base_dir``
    (:func:`mihd_resources.storage.partition_path`); otherwise InvalidPartitionKey naming the
    asset, the key and the partitions definition."""
    if key is None and not context.has_asset_partitions:
        return path_in_root(base_dir, *context.asset_key.path, UNPARTITIONED + suffix)
    partition = context.asset_partition_key if key is None else key
    try:
        partitions_def = context.asset_partitions_def
    except DagsterInvariantViolationError:  # a context built with a partition key but no definition
        partitions_def = None
    try:
        return partition_path(base_dir, partition, partitions=partitions_label(partitions_def),
                              prefix=tuple(context.asset_key.path), suffix=suffix)
    except ValueError as exc:
        raise InvalidPartitionKey(f"{context.asset_key.to_user_string()}: {exc}") from None


def partitions_for_unpartitioned_consumer(context: InputContext) -> list[str] | None:
    """The upstream partitions an unpartitioned asset reads (it gets ``{partition: object}``),
    or None when one object is loaded (same partition, or no partitions at all)."""
    if context.has_asset_partitions and not context.has_partition_key:
        return sorted(context.asset_partition_keys)
    return None
