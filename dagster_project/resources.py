"""Resource instances bound into the Definitions; paths come from `mihd_resources.settings`."""

from __future__ import annotations

from dagster_duckdb import DuckDBResource

from mihd_resources import AnnDataIOManager, ComputeResource, MetricsStore, StorageResource
from mihd_resources import settings
from mihd_resources.clustering import ClusteringResource
from mihd_resources.embedding_io_manager import EmbeddingIOManager
from mihd_resources.labels_io_manager import LabelsIOManager
from mihd_resources.weights import ModelWeightsResource


def build_resources() -> dict:
    duckdb = DuckDBResource(database=str(settings.duckdb_path()))
    return {
        "storage": StorageResource(slides_root=str(settings.slides_root())),
        "anndata_io_manager": AnnDataIOManager(base_dir=str(settings.storage_root())),
        "metrics": MetricsStore(duckdb=duckdb),
        "embedding_io_manager": EmbeddingIOManager(base_dir=str(settings.storage_root())),
        "compute": ComputeResource(),
        "weights": ModelWeightsResource(),
        "labels_io_manager": LabelsIOManager(base_dir=str(settings.storage_root())),
        "clustering": ClusteringResource(),
    }
