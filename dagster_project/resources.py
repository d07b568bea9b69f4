"""Resource instances bound into the Definitions; paths come from `mihd_resources.settings`."""

from __future__ import annotations

from dagster_duckdb import DuckDBResource

from mihd_resources import AnnDataIOManager, ComputeResource, MetricsStore, StorageResource
from mihd_resources import settings
from mihd_resources.clustering import ClusteringResource
from mihd_resources.embedding_io_manager import EmbeddingIOManager
from mihd_resources.labels_io_manager import LabelsIOManager
from mihd_resources.step_executor import executor_from_env
from mihd_resources.metrics_store import metrics_dir_for
from mihd_resources.weights import ModelWeightsResource


def build_resources() -> dict:
    # The .duckdb file is a catalog of views; the rows live in Parquet files beside it
    # (docs/metrics_storage.md), so any number of steps write at once.
    catalog = settings.duckdb_path()
    duckdb = DuckDBResource(database=str(catalog))
    return {
        "storage": StorageResource(slides_root=str(settings.slides_root())),
        "anndata_io_manager": AnnDataIOManager(base_dir=str(settings.storage_root())),
        "metrics": MetricsStore(duckdb=duckdb, metrics_dir=str(metrics_dir_for(catalog))),
        "embedding_io_manager": EmbeddingIOManager(base_dir=str(settings.storage_root())),
        "compute": ComputeResource(),
        "weights": ModelWeightsResource(),
        "labels_io_manager": LabelsIOManager(base_dir=str(settings.storage_root())),
        "clustering": ClusteringResource(),
        # local (default) or slurm: env MIHD_EXECUTOR, settings file MIHD_SLURM_CONFIG.
        "step_executor": executor_from_env(),
    }
