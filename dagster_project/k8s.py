"""Kubernetes settings attached to assets, read by dagster-k8s when runs launch in a cluster.

GPU-heavy assets carry ``gpu_op_tags()``: with the ``k8s_job_executor`` each such step runs
in its own pod that requests an NVIDIA GPU; locally the tag is ignored and the ``gpu``
pool (limit 1 in dagster.yaml) keeps one GPU step at a time.
"""

from __future__ import annotations

import json

from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY

GPU_POOL = "gpu"


def gpu_op_tags(gpus: int = 1, memory: str = "32Gi", cpu: str = "8") -> dict[str, str]:
    """Op tags asking dagster-k8s for a pod with ``gpus`` NVIDIA GPUs (and host RAM/CPU for loaders)."""
    config = {
        "container_config": {
            "resources": {
                "requests": {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)},
                "limits": {"memory": memory, "nvidia.com/gpu": str(gpus)},
            }
        },
        "pod_spec_config": {
            "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}],
        },
    }
    return {USER_DEFINED_K8S_CONFIG_KEY: json.dumps(config)}
