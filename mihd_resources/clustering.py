"""The R/mclust bridge as a resource: mclust by default, a fallback only when configured."""

from __future__ import annotations

import logging
import os
from typing import Literal

from dagster import ConfigurableResource
from pydantic import Field

log = logging.getLogger(__name__)


class ClusteringResource(ConfigurableResource):
    """How clustering methods run.

    ``mclust`` goes through rpy2 to R's mclust (``Mclust(X, G, modelNames)`` after
    ``set.seed``). When R or mclust is missing the asset fails with install instructions,
    unless ``allow_mclust_fallback`` is set (env ``MIHD_ALLOW_MCLUST_FALLBACK=1``): then the
    fallback method runs, a WARNING is logged, and the method actually used is recorded in
    metadata and DuckDB and fails the ``clustering_method_as_requested`` check.
    """

    mclust_model: str = "EEE"
    seed: int = 2020
    allow_mclust_fallback: bool = Field(
        default_factory=lambda: os.environ.get("MIHD_ALLOW_MCLUST_FALLBACK", "") == "1"
    )
    fallback_method: Literal["kmeans"] = "kmeans"
    refine_k: int = Field(default=15, ge=1, description="neighbours in the spatial majority vote")
