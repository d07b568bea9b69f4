"""Dagster resources and IO managers of the MIHD platform."""

from .compute import ComputeResource
from .io_manager import AnnDataIOManager
from .metrics_store import MetricsStore
from .storage import StorageResource

__all__ = ["AnnDataIOManager", "ComputeResource", "MetricsStore", "StorageResource"]
