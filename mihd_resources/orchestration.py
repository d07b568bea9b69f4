"""Shared Dagster helpers every asset family builds on: partitions, pools, cluster tags,
the nightly automation condition, run-record metadata and progress logs.

This module sits below the families (``mihd_assets.*``) and above nothing of theirs;
``dagster_project`` only assembles what the families declare.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

from dagster import (
    AssetKey,
    AutomationCondition,
    BetaWarning,
    DataVersion,
    DataVersionsByPartition,
    DynamicPartitionsDefinition,
    MetadataValue,
)
from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY


# Observable source assets, per-partition data versions and explicit output data versions
# are the mechanisms freshness rests on; Dagster marks them beta, which would print a
# warning per asset at every load.
warnings.filterwarnings("ignore", category=BetaWarning)

__all__ = [
    "changed_data_versions",
    "GPU_FAMILIES",
    "GPU_POOL",
    "K8S_CONFIG_ENV",
    "K8sConfigError",
    "NIGHTLY_CRON",
    "gpu_op_tags",
    "load_k8s_step_settings",
    "nightly_condition",
    "run_record_metadata",
    "slides_partitions",
    "step_errors",
    "throttled_log",
]

# One partition per slide under the data root; keys are registered by the slide discovery
# sensor (or `mihd materialize`) after validation.
slides_partitions = DynamicPartitionsDefinition(name="slides")

# One accelerator per pool slot (dagster.yaml gives every pool a limit of 1 by default).
GPU_POOL = "gpu"

NIGHTLY_CRON = "0 2 * * *"
NIGHTLY_WINDOW_END_CRON = "0 8 * * *"


def nightly_condition(cron: str = NIGHTLY_CRON, window_end_cron: str = NIGHTLY_WINDOW_END_CRON,
                      timezone: str = "UTC") -> AutomationCondition:
    """When the automation sensor requests an asset partition.

    - A partition that newly appears missing (a new slide or donor) is requested at once.
    - Otherwise, from the nightly tick until the window closes, a partition whose code version
      changed or one of whose dependencies got new data since it was last handled is requested.
      Children wait for their parents: a parent's new data version makes them eligible in a
      later evaluation of the same window, so unchanged data never cascades.
    - Nothing is requested while a dependency is missing or in progress, while the partition
      itself is in progress, or when a dependency's blocking check (e.g. ``spots_on_tissue``)
      failed with ERROR severity. A WARN failure (``spots_on_tissue`` "not applicable: no
      image" on a slide without images) holds nothing back, as in a run, where Dagster stops
      downstream steps only for ERROR failures of blocking checks.
    """
    ready = (
        ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
        & all_deps_blocking_checks_without_error()
    )
    new = AutomationCondition.newly_missing().since_last_handled().with_label("newly missing")
    in_window = AutomationCondition.cron_tick_passed(cron, timezone).since(
        AutomationCondition.newly_requested()
        | AutomationCondition.newly_updated()
        | AutomationCondition.cron_tick_passed(window_end_cron, timezone)
    ).with_label(f"nightly window ({cron} until {window_end_cron} {timezone})")
    # A dependency's new *data version*, not merely a new materialization: a parent re-run on
    # unchanged content leaves its children alone, and children are requested only after their
    # parent has run (the next evaluation), exactly when Dagster marks them unsynced.
    new_upstream_data = AutomationCondition.any_deps_match(AutomationCondition.data_version_changed())
    changed = (
        AutomationCondition.missing()
        | (AutomationCondition.code_version_changed() | new_upstream_data).since_last_handled()
    ).with_label("missing, new code version or new upstream data version")
    return ((new | (in_window & changed)) & ready).with_label("nightly backfill")


class BlockingCheckFailedWithError(AutomationCondition):
    """True for the partitions of an asset whose latest materialization has a blocking check
    that failed with ERROR severity (or was planned and never evaluated: the check crashed).

    Dagster's ``all_deps_blocking_checks_passed`` differs in two ways that matter here: it
    treats a WARN failure like an ERROR one, so a slide without images (its tissue check
    "not applicable", a WARN) would never get its gene-only assets requested although a run
    materializes them (a run stops downstream steps only for ERROR failures of blocking
    checks); and a check on a partitioned asset is one unpartitioned entity to it, so the
    latest evaluation of any slide decides for every slide. This reads each partition's own
    latest evaluation.
    """

    @property
    def name(self) -> str:
        return "blocking_check_failed_with_error"

    @property
    def description(self) -> str:
        return "a blocking check of the latest materialization failed with ERROR severity"

    async def evaluate(self, context):
        from dagster import AssetCheckSeverity, AssetRecordsFilter, AutomationResult
        from dagster._core.definitions.partitions.context import partition_loading_context
        from dagster import DagsterEventType

        graph, view = context.asset_graph, context.asset_graph_view
        blocking = [k for k in graph.get(context.key).check_keys if graph.get(k).blocking]
        if not blocking or context.candidate_subset.is_empty:
            return AutomationResult(context, context.get_empty_subset())
        instance = view.instance
        if context.partitions_def is None:
            partitions: list[str | None] = [None]
        else:
            with partition_loading_context(new_ctx=view.partition_loading_context):
                partitions = sorted(context.candidate_subset.expensively_compute_partition_keys())

        def failed_with_error(partition: str | None) -> bool:
            latest = instance.fetch_materializations(
                AssetRecordsFilter(asset_key=context.key, asset_partitions=[partition] if partition else None),
                limit=1).records
            if not latest:
                return False  # missing: any_deps_missing holds the child back
            # The checks evaluated against exactly this materialization, from its run's events.
            evaluations = {}
            for entry in instance.all_logs(latest[0].run_id, of_type=DagsterEventType.ASSET_CHECK_EVALUATION):
                evaluation = entry.asset_check_evaluation
                target = evaluation.target_materialization_data if evaluation else None
                if target is not None and target.storage_id == latest[0].storage_id:
                    evaluations[evaluation.asset_check_key] = evaluation
            for check_key in blocking:
                evaluation = evaluations.get(check_key)
                if evaluation is None:
                    return True  # planned and never evaluated (the check crashed or was skipped)
                if not evaluation.passed and evaluation.severity == AssetCheckSeverity.ERROR:
                    return True
            return False

        bad = {p for p in partitions if failed_with_error(p)}
        if context.partitions_def is None:
            subset = context.candidate_subset if bad else context.get_empty_subset()
        else:
            subset = view.get_subset_from_partition_keys(context.key, context.partitions_def, bad)
        return AutomationResult(context, subset)


def all_deps_blocking_checks_without_error() -> AutomationCondition:
    """True where no dependency's latest materialization has a blocking check that failed with
    ERROR severity (passed or failed with WARN), or where the dependency is requested on this
    tick (its run's checks then gate the child, as in ``all_deps_blocking_checks_passed``)."""
    return AutomationCondition.all_deps_match(
        ~BlockingCheckFailedWithError() | AutomationCondition.will_be_requested()
    ).with_label("all_deps_blocking_checks_without_error")


def changed_data_versions(instance, key: AssetKey, current: dict[str, str]) -> DataVersionsByPartition:
    """Only the partitions whose fingerprint differs from their last observed data version.

    An unchanged folder records no new observation, so repeated observations never count
    as new upstream data (for staleness or for the nightly automation condition).
    """
    from dagster._core.definitions.data_version import extract_data_version_from_entry

    changed = {}
    for partition, fingerprint in current.items():
        record = instance.get_latest_data_version_record(key, is_source=True, partition_key=partition)
        previous = extract_data_version_from_entry(record.event_log_entry) if record else None
        if previous is None or previous.value != fingerprint:
            changed[partition] = DataVersion(fingerprint)
    return DataVersionsByPartition(changed)


# --- Kubernetes step pods ---------------------------------------------------------------------
# Which pod each step gets under dagster-k8s's ``k8s_job_executor`` comes from configuration only:
# the YAML file named by MIHD_K8S_CONFIG (see deploy/k8s/README.md), or the built-in defaults.

K8S_CONFIG_ENV = "MIHD_K8S_CONFIG"
GPU_FAMILIES = ("embeddings", "fusion", "geometry", "segmentation")
GPU_RESOURCE = "nvidia.com/gpu"
# The op tag naming the settings a GPU step's pod was built from (shown with the op's tags in the UI).
K8S_FAMILY_TAG = "mihd/k8s-family"

_POD_SETTING_KEYS = ("cpu", "memory", "cpu_limit", "memory_limit", "node_selector", "tolerations",
                     "image", "image_pull_policy")
_GPU_SETTING_KEYS = ("gpus", *_POD_SETTING_KEYS)
_TOP_LEVEL_KEYS = ("gpu_defaults", "families", "cpu_steps")
_PULL_POLICIES = ("Always", "IfNotPresent", "Never")
_TOLERATION_KEYS = {"key", "operator", "value", "effect", "tolerationSeconds", "toleration_seconds"}
_TOLERATION_OPERATORS = ("Exists", "Equal")
_TOLERATION_EFFECTS = ("NoSchedule", "PreferNoSchedule", "NoExecute")

# Without a settings file: today's GPU request (one GPU, 8 CPUs and 32Gi for the data loaders,
# tolerating the usual GPU-node taint) and small CPU steps.
DEFAULT_GPU_SETTINGS = {
    "gpus": 1,
    "cpu": "8",
    "memory": "32Gi",
    "tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}],
}
DEFAULT_CPU_SETTINGS = {"cpu": "500m", "memory": "2Gi", "memory_limit": "8Gi"}


class K8sConfigError(ValueError):
    """A Kubernetes step setting that cannot be used; the message names the setting and its source."""


@dataclass(frozen=True)
class StepPodSettings:
    """What one step's pod asks Kubernetes for (resources, placement, image)."""

    cpu: str
    memory: str
    gpus: int = 0
    cpu_limit: str | None = None
    memory_limit: str | None = None
    node_selector: dict = field(default_factory=dict)
    tolerations: list = field(default_factory=list)
    image: str | None = None
    image_pull_policy: str | None = None

    def resources(self) -> dict:
        requests = {"cpu": self.cpu, "memory": self.memory}
        limits = {"memory": self.memory_limit or self.memory}
        if self.cpu_limit:
            limits["cpu"] = self.cpu_limit
        if self.gpus:
            # Extended resources (GPUs) must have requests equal to limits.
            requests[GPU_RESOURCE] = str(self.gpus)
            limits[GPU_RESOURCE] = str(self.gpus)
        return {"requests": requests, "limits": limits}

    def k8s_config(self) -> dict:
        """The ``dagster-k8s/config`` body (UserDefinedDagsterK8sConfig) for this pod.

        Only configured keys appear, so what the run launcher sets (volumes, env, a cluster-wide
        node selector) stays underneath unless a setting here replaces it.
        """
        container: dict = {"resources": self.resources()}
        if self.image:
            container["image"] = self.image
        if self.image_pull_policy:
            container["image_pull_policy"] = self.image_pull_policy
        pod: dict = {}
        if self.node_selector:
            pod["node_selector"] = dict(self.node_selector)
        if self.tolerations:
            pod["tolerations"] = [dict(t) for t in self.tolerations]
        config: dict = {"container_config": container}
        if pod:
            config["pod_spec_config"] = pod
        return config


@dataclass(frozen=True)
class K8sStepSettings:
    """Per family GPU pod settings and the CPU steps' settings, with where they came from."""

    source: str
    families: dict  # family -> StepPodSettings (GPU steps)
    gpu_defaults: StepPodSettings
    cpu_steps: StepPodSettings

    def gpu(self, family: str | None = None) -> StepPodSettings:
        if family is None:
            return self.gpu_defaults
        if family not in self.families:
            raise K8sConfigError(f"unknown GPU asset family {family!r} (known: {', '.join(GPU_FAMILIES)})")
        return self.families[family]


def _quantity(value, setting: str, source: str) -> str:
    from kubernetes.utils import parse_quantity

    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise K8sConfigError(f"{source}: {setting} must be a Kubernetes quantity such as '8', '500m' or "
                             f"'32Gi', got {value!r}")
    try:
        parse_quantity(value)
    except ValueError:
        raise K8sConfigError(f"{source}: {setting} = {value!r} is not a Kubernetes quantity "
                             "(e.g. '8', '500m', '32Gi')") from None
    return str(value)


def _toleration(item, setting: str, source: str) -> dict:
    if not isinstance(item, dict):
        raise K8sConfigError(f"{source}: {setting} must be a mapping like "
                             "{key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}, got {item!r}")
    unknown = set(item) - _TOLERATION_KEYS
    if unknown:
        raise K8sConfigError(f"{source}: {setting} has unknown keys {sorted(unknown)} "
                             f"(allowed: key, operator, value, effect, tolerationSeconds)")
    operator = item.get("operator", "Equal")
    if operator not in _TOLERATION_OPERATORS:
        raise K8sConfigError(f"{source}: {setting}.operator must be one of {_TOLERATION_OPERATORS}, got {operator!r}")
    if operator == "Exists" and item.get("value") not in (None, ""):
        raise K8sConfigError(f"{source}: {setting} has operator Exists, which takes no value")
    if "effect" in item and item["effect"] not in _TOLERATION_EFFECTS:
        raise K8sConfigError(f"{source}: {setting}.effect must be one of {_TOLERATION_EFFECTS}, "
                             f"got {item['effect']!r}")
    for name in ("key", "value", "effect"):
        if name in item and not isinstance(item[name], str):
            raise K8sConfigError(f"{source}: {setting}.{name} must be a string, got {item[name]!r}")
    seconds = item.get("tolerationSeconds", item.get("toleration_seconds"))
    if seconds is not None and (isinstance(seconds, bool) or not isinstance(seconds, int)):
        raise K8sConfigError(f"{source}: {setting}.tolerationSeconds must be an integer, got {seconds!r}")
    return dict(item)


def _pod_settings(raw: dict, base: dict, setting: str, source: str, gpu: bool) -> StepPodSettings:
    """``base`` with ``raw``'s keys replacing it (a list or mapping is replaced, not merged)."""
    allowed = _GPU_SETTING_KEYS if gpu else _POD_SETTING_KEYS
    if not isinstance(raw, dict):
        raise K8sConfigError(f"{source}: {setting} must be a mapping of {', '.join(allowed)}, got {raw!r}")
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise K8sConfigError(f"{source}: {setting} has unknown settings {unknown} (allowed: {', '.join(allowed)})")
    merged = {**base, **raw}
    kwargs: dict = {}
    for name in ("cpu", "memory"):
        kwargs[name] = _quantity(merged.get(name), f"{setting}.{name}", source)
    for name in ("cpu_limit", "memory_limit"):
        if merged.get(name) is not None:
            kwargs[name] = _quantity(merged[name], f"{setting}.{name}", source)
    if gpu:
        gpus = merged.get("gpus", 1)
        if isinstance(gpus, bool) or not isinstance(gpus, int) or gpus < 0:
            raise K8sConfigError(f"{source}: {setting}.gpus must be a whole number >= 0, got {gpus!r}")
        kwargs["gpus"] = gpus
    from kubernetes.utils import parse_quantity

    for request, limit in (("cpu", "cpu_limit"), ("memory", "memory_limit")):
        if kwargs.get(limit) is not None and parse_quantity(kwargs[limit]) < parse_quantity(kwargs[request]):
            raise K8sConfigError(f"{source}: {setting}.{limit} = {kwargs[limit]!r} is below "
                                 f"{setting}.{request} = {kwargs[request]!r}; Kubernetes rejects a limit under its request")
    selector = merged.get("node_selector") or {}
    if not isinstance(selector, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in selector.items()):
        raise K8sConfigError(f"{source}: {setting}.node_selector must map label names to string values "
                             f"(quote YAML booleans and numbers: \"true\"), got {selector!r}")
    kwargs["node_selector"] = dict(selector)
    tolerations = merged.get("tolerations") or []
    if not isinstance(tolerations, list):
        raise K8sConfigError(f"{source}: {setting}.tolerations must be a list, got {tolerations!r}")
    kwargs["tolerations"] = [_toleration(t, f"{setting}.tolerations[{i}]", source) for i, t in enumerate(tolerations)]
    image = merged.get("image")
    if image is not None and (not isinstance(image, str) or not image.strip()):
        raise K8sConfigError(f"{source}: {setting}.image must be an image reference string, got {image!r}")
    kwargs["image"] = image
    policy = merged.get("image_pull_policy")
    if policy is not None and policy not in _PULL_POLICIES:
        raise K8sConfigError(f"{source}: {setting}.image_pull_policy must be one of {_PULL_POLICIES}, got {policy!r}")
    kwargs["image_pull_policy"] = policy
    return StepPodSettings(**kwargs)


def load_k8s_step_settings(path: str | None = None) -> K8sStepSettings:
    """The step pod settings from ``path`` (default: the file named by MIHD_K8S_CONFIG), else the defaults.

    The file (YAML) has three optional sections::

        gpu_defaults: {gpus, cpu, memory, cpu_limit, memory_limit, node_selector, tolerations,
                       image, image_pull_policy}   # every GPU family starts from these
        families: {embeddings: {...}, fusion: {...}, geometry: {...}, segmentation: {...}}
        cpu_steps: {cpu, memory, cpu_limit, memory_limit, node_selector, tolerations, image,
                    image_pull_policy}             # every step outside the gpu pool

    A family's keys replace the defaults' keys (a tolerations list or node_selector is replaced
    whole). Any unknown key, family or malformed value raises ``K8sConfigError`` naming it.
    """
    import os
    from pathlib import Path

    import yaml

    path = path if path is not None else os.environ.get(K8S_CONFIG_ENV) or None
    raw: dict = {}
    source = "built-in defaults"
    if path is not None:
        file = Path(path)
        source = f"{K8S_CONFIG_ENV} file {file}" if path == os.environ.get(K8S_CONFIG_ENV) else f"file {file}"
        if not file.is_file():
            raise K8sConfigError(f"{source}: no such file (unset {K8S_CONFIG_ENV} for the built-in defaults)")
        try:
            raw = yaml.safe_load(file.read_text()) or {}
        except yaml.YAMLError as err:
            raise K8sConfigError(f"{source}: not valid YAML: {err}") from None
        if not isinstance(raw, dict):
            raise K8sConfigError(f"{source}: must be a mapping with sections {', '.join(_TOP_LEVEL_KEYS)}")
        unknown = sorted(set(raw) - set(_TOP_LEVEL_KEYS))
        if unknown:
            raise K8sConfigError(f"{source}: unknown sections {unknown} (allowed: {', '.join(_TOP_LEVEL_KEYS)})")
    gpu_raw = raw.get("gpu_defaults") or {}
    gpu_defaults = _pod_settings(gpu_raw, DEFAULT_GPU_SETTINGS, "gpu_defaults", source, gpu=True)
    gpu_base = {**DEFAULT_GPU_SETTINGS, **(gpu_raw if isinstance(gpu_raw, dict) else {})}
    families_raw = raw.get("families") or {}
    if not isinstance(families_raw, dict):
        raise K8sConfigError(f"{source}: families must map a family ({', '.join(GPU_FAMILIES)}) to its settings")
    unknown = sorted(set(families_raw) - set(GPU_FAMILIES))
    if unknown:
        raise K8sConfigError(f"{source}: families has unknown families {unknown} (known: {', '.join(GPU_FAMILIES)})")
    families = {
        family: _pod_settings(families_raw.get(family) or {}, gpu_base, f"families.{family}", source, gpu=True)
        for family in GPU_FAMILIES
    }
    cpu_steps = _pod_settings(raw.get("cpu_steps") or {}, DEFAULT_CPU_SETTINGS, "cpu_steps", source, gpu=False)
    return K8sStepSettings(source=source, families=families, gpu_defaults=gpu_defaults, cpu_steps=cpu_steps)


def _caller_family(depth: int = 2) -> str | None:
    """The GPU family of the module calling ``gpu_op_tags`` (``mihd_assets.<family>...``), if any."""
    import sys

    module = sys._getframe(depth).f_globals.get("__name__", "")
    parts = module.split(".")
    if len(parts) > 1 and parts[0] == "mihd_assets" and parts[1] in GPU_FAMILIES:
        return parts[1]
    return None


def gpu_op_tags(gpus: int | None = None, memory: str | None = None, cpu: str | None = None,
                family: str | None = None) -> dict[str, str]:
    """Op tags asking dagster-k8s for a pod with NVIDIA GPUs (and host RAM/CPU for the loaders).

    The pod comes from the step settings (``load_k8s_step_settings``: the MIHD_K8S_CONFIG file,
    else the built-in one GPU / 8 CPU / 32Gi) of ``family`` (one of ``GPU_FAMILIES``). Without
    ``family`` it is the calling module's family (``mihd_assets.<family>.*``), and outside the
    families the ``gpu_defaults``. ``gpus``, ``memory`` and ``cpu`` given here override the file.
    With the ``k8s_job_executor`` each tagged step runs in its own pod; locally the tag is ignored
    and the ``gpu`` pool keeps one GPU step at a time. Settings are read when the asset modules
    are imported: restart the code server after changing the file.
    """
    family = family if family is not None else _caller_family()
    step_settings = load_k8s_step_settings()
    pod = step_settings.gpu(family)
    overrides = {k: v for k, v in (("gpus", gpus), ("memory", memory), ("cpu", cpu)) if v is not None}
    if overrides:
        base = {k: getattr(pod, k) for k in _GPU_SETTING_KEYS}
        if "memory" in overrides and pod.memory_limit == pod.memory:
            base["memory_limit"] = None
        base.update(overrides)
        pod = _pod_settings({k: v for k, v in base.items() if v is not None}, {}, "gpu_op_tags(...)",
                            f"gpu_op_tags arguments over {step_settings.source}", gpu=True)
    return {USER_DEFINED_K8S_CONFIG_KEY: json.dumps(pod.k8s_config()), K8S_FAMILY_TAG: family or "gpu_defaults"}


def run_record_metadata(record: dict, exclude: tuple[str, ...] = ()) -> dict:
    """A run record as Dagster metadata: nested values as JSON, missing values and ``exclude`` left out."""
    return {
        k: (MetadataValue.json(v) if isinstance(v, (dict, list, tuple)) else v)
        for k, v in record.items()
        if v is not None and k not in exclude
    }


def throttled_log(context, label: str, every_s: float = 10.0) -> Callable[..., None]:
    """``report(message, final=False)``: an INFO line at most every ``every_s`` seconds, and always the final one.

    ``context`` is a Dagster context or a logger (the one a step's compute function receives,
    which in a Slurm job is the Dagster Pipes logger)."""
    logger = context if isinstance(context, (logging.Logger, logging.LoggerAdapter)) else context.log
    last = [0.0]

    def report(message: str, final: bool = False) -> None:
        now = time.perf_counter()
        if final or now - last[0] > every_s:
            last[0] = now
            logger.info(f"{label}: {message}")

    return report


def user_error(err):
    """The platform's own error under Dagster's wrappers ("Error occurred while executing op").

    Stops at the first non-Dagster exception: that message names the slide and the file;
    the library error it was raised from (kept as its cause) usually names neither.
    """
    while err is not None and err.cause is not None and (err.cls_name or "").startswith("Dagster"):
        err = err.cause
    return err


def step_errors(result, run_id: str | None = None) -> list[str]:
    """``step: message`` for every failed step of a run.

    ``step_errors(result)`` reads an in-process execution result; ``step_errors(instance, run_id)``
    reads the run's STEP_FAILURE events from the instance (runs of the multiprocess executor,
    whose steps ran in other processes). A run that failed outside any step (a resource, the
    executor) reports its RUN_FAILURE message instead.
    """
    from dagster import DagsterEventType

    if run_id is None:
        events = list(result.all_events)
    else:
        events = [entry.dagster_event for entry in result.all_logs(
            run_id, of_type={DagsterEventType.STEP_FAILURE, DagsterEventType.RUN_FAILURE})]
    errors = []
    for event in events:
        if event.event_type_value == "STEP_FAILURE":
            err = user_error(event.event_specific_data.error)
            errors.append(f"{event.step_key}: {err.message.strip() if err else 'failed'}")
    if not errors:
        for event in events:
            if event.event_type_value == "RUN_FAILURE":
                data = event.event_specific_data
                err = user_error(data.error) if data is not None and data.error is not None else None
                errors.append(f"run: {err.message.strip() if err else event.message}")
    return errors
