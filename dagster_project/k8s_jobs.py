"""Jobs that run every step in its own Kubernetes pod (``dagster_k8s.k8s_job_executor``).

The same assets as the default jobs; only the executor differs. What each pod asks for comes
from configuration alone (``mihd_resources.orchestration.load_k8s_step_settings``: the YAML
file named by ``MIHD_K8S_CONFIG``, else the built-in defaults):

- a GPU step (an asset in the ``gpu`` pool) carries its family's pod in its own
  ``dagster-k8s/config`` op tag (``gpu_op_tags``): ``nvidia.com/gpu`` requests and limits,
  CPU/memory for the loaders, node selector, tolerations, image and pull policy;
- every other step gets the small ``cpu_steps`` pod through the executor's
  ``per_step_k8s_config`` (keyed by op name), so it never lands on a GPU node by accident
  and never holds more than it needs.

Everything else of a step pod (image, volumes, env, namespace, service account) comes from the
``K8sRunLauncher`` of the Helm chart, exactly as for run pods. See deploy/k8s/README.md.
"""

from __future__ import annotations

import json

from dagster import (
    AssetSelection,
    AssetsDefinition,
    ExecutorDefinition,
    GraphDefinition,
    define_asset_job,
    load_assets_from_modules,
)
from dagster_k8s import k8s_job_executor
from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY

from mihd_assets.embeddings import assets as embedding_assets
from mihd_assets.fusion import assets as fusion_assets
from mihd_assets.geometry import assets as geometry_assets
from mihd_assets.geometry import placement_assets
from mihd_assets.geometry.cell_datasets import cell_datasets_partitions
from mihd_assets.reports import assets as report_assets
from mihd_assets.segmentation import assets as segmentation_assets
from mihd_assets.segmentation.definitions import BENCHMARK_KEYS, E5_DONOR_KEYS
from mihd_assets.segmentation.partitions import donors_partitions
from mihd_assets.slides import assets as slide_assets
from mihd_resources.orchestration import GPU_POOL, K8sStepSettings, load_k8s_step_settings, slides_partitions

SLIDE_K8S_JOB_NAME = "slide_pipeline_k8s"
GEOMETRY_K8S_JOB_NAME = "geometry_k8s"
SEGMENTATION_BENCHMARK_K8S_JOB_NAME = "segmentation_benchmark_k8s"
SEGMENTATION_E5_DONOR_K8S_JOB_NAME = "segmentation_e5_donor_k8s"
CELL_PLACEMENT_K8S_JOB_NAME = "cell_placement_k8s"
K8S_JOB_NAMES = (SLIDE_K8S_JOB_NAME, GEOMETRY_K8S_JOB_NAME, SEGMENTATION_BENCHMARK_K8S_JOB_NAME,
                 SEGMENTATION_E5_DONOR_K8S_JOB_NAME, CELL_PLACEMENT_K8S_JOB_NAME)
EXECUTOR_NAME = "mihd_k8s_step_executor"

# The modules whose assets run in these jobs (the slide pipeline's and the research families').
ASSET_MODULES = (slide_assets, embedding_assets, fusion_assets, report_assets, geometry_assets, placement_assets,
                 segmentation_assets)
SLIDE_PIPELINE_MODULES = (slide_assets, embedding_assets, fusion_assets, report_assets)


def _assets(modules) -> list[AssetsDefinition]:
    return [a for a in load_assets_from_modules(list(modules)) if isinstance(a, AssetsDefinition)]


def _op_defs(asset: AssetsDefinition):
    node = asset.node_def
    return list(node.iterate_op_defs()) if isinstance(node, GraphDefinition) else [node]


def gpu_steps(assets: list[AssetsDefinition]) -> dict[str, dict]:
    """Op name -> its own ``dagster-k8s/config`` tag (parsed), for every op that carries one."""
    return {
        op.name: json.loads(op.tags[USER_DEFINED_K8S_CONFIG_KEY])
        for a in assets for op in _op_defs(a) if USER_DEFINED_K8S_CONFIG_KEY in op.tags
    }


def cpu_step_config(assets: list[AssetsDefinition], settings: K8sStepSettings) -> dict[str, dict]:
    """``per_step_k8s_config`` for the executor: the ``cpu_steps`` pod for every op without a pod tag."""
    config = settings.cpu_steps.k8s_config()
    return {op.name: config for a in assets for op in _op_defs(a) if USER_DEFINED_K8S_CONFIG_KEY not in op.tags}


def untagged_gpu_pool_ops(assets: list[AssetsDefinition]) -> list[str]:
    """Ops in the ``gpu`` pool without a pod tag: they would get a CPU pod on Kubernetes."""
    return sorted(op.name for a in assets for op in _op_defs(a)
                  if getattr(op, "pool", None) == GPU_POOL and USER_DEFINED_K8S_CONFIG_KEY not in op.tags)


def k8s_step_executor(assets: list[AssetsDefinition], settings: K8sStepSettings | None = None) -> ExecutorDefinition:
    """``k8s_job_executor`` with the CPU steps' pods set; GPU steps bring theirs in their op tags."""
    settings = settings or load_k8s_step_settings()
    missing = untagged_gpu_pool_ops(assets)
    if missing:
        raise ValueError(f"ops {missing} are in the '{GPU_POOL}' pool but carry no dagster-k8s/config tag: "
                         "give them op_tags=gpu_op_tags(family=...) so their Kubernetes pod gets a GPU")
    return k8s_job_executor.configured(
        {"per_step_k8s_config": cpu_step_config(assets, settings)}, name=EXECUTOR_NAME,
    )


def k8s_jobs(settings: K8sStepSettings | None = None) -> list:
    """The Kubernetes variants of the slide, geometry, cell placement and segmentation jobs (one pod per step)."""
    assets = _assets(ASSET_MODULES)
    executor = k8s_step_executor(assets, settings)
    slide_keys = [k for a in _assets(SLIDE_PIPELINE_MODULES) if a.partitions_def == slides_partitions for k in a.keys]
    placement_keys = [a.key for a in placement_assets.PLACEMENT_ASSETS]
    return [
        define_asset_job(
            SLIDE_K8S_JOB_NAME, selection=AssetSelection.assets(*slide_keys), partitions_def=slides_partitions,
            executor_def=executor,
            description="Every slide-partitioned asset for one slide per run, each step in its own Kubernetes pod "
            "(GPU steps on GPU nodes, per family settings from MIHD_K8S_CONFIG).",
        ),
        define_asset_job(
            GEOMETRY_K8S_JOB_NAME, executor_def=executor,
            selection=AssetSelection.groups(geometry_assets.GROUP) - AssetSelection.assets(*placement_keys),
            description="The geometry family (training, checkpoint, evaluation), each step in its own Kubernetes pod.",
        ),
        define_asset_job(
            CELL_PLACEMENT_K8S_JOB_NAME, selection=AssetSelection.assets(*placement_keys),
            partitions_def=cell_datasets_partitions, executor_def=executor,
            description="One cell dataset's placement and its evaluation, each step in its own Kubernetes pod.",
        ),
        define_asset_job(
            SEGMENTATION_BENCHMARK_K8S_JOB_NAME, selection=AssetSelection.assets(*BENCHMARK_KEYS),
            executor_def=executor,
            description="Segmentation E0-E4, each step in its own Kubernetes pod.",
        ),
        define_asset_job(
            SEGMENTATION_E5_DONOR_K8S_JOB_NAME, selection=AssetSelection.assets(*E5_DONOR_KEYS),
            partitions_def=donors_partitions, executor_def=executor,
            description="Segmentation E5 tile counts of one donor, each step in its own Kubernetes pod.",
        ),
    ]
