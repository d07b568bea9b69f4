"""Shared Dagster helpers every asset family builds on: partitions, pools, cluster tags,
the nightly automation condition, run-record metadata and progress logs.

This module sits below the families (``mihd_assets.*``) and above nothing of theirs;
``dagster_project`` only assembles what the families declare.
"""

from __future__ import annotations

import json
import time
import warnings
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

from .metrics_store import DUCKDB_WRITER_POOL

# Observable source assets, per-partition data versions and explicit output data versions
# are the mechanisms freshness rests on; Dagster marks them beta, which would print a
# warning per asset at every load.
warnings.filterwarnings("ignore", category=BetaWarning)

__all__ = [
    "changed_data_versions",
    "DUCKDB_WRITER_POOL",
    "GPU_POOL",
    "NIGHTLY_CRON",
    "gpu_op_tags",
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
      failed.
    """
    ready = (
        ~AutomationCondition.any_deps_missing()
        & ~AutomationCondition.any_deps_in_progress()
        & ~AutomationCondition.in_progress()
        & AutomationCondition.all_deps_blocking_checks_passed()
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


def gpu_op_tags(gpus: int = 1, memory: str = "32Gi", cpu: str = "8") -> dict[str, str]:
    """Op tags asking dagster-k8s for a pod with ``gpus`` NVIDIA GPUs (and host RAM/CPU for loaders).

    With the ``k8s_job_executor`` each tagged step runs in its own pod; locally the tag is
    ignored and the ``gpu`` pool keeps one GPU step at a time.
    """
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


def run_record_metadata(record: dict, exclude: tuple[str, ...] = ()) -> dict:
    """A run record as Dagster metadata: nested values as JSON, missing values and ``exclude`` left out."""
    return {
        k: (MetadataValue.json(v) if isinstance(v, (dict, list, tuple)) else v)
        for k, v in record.items()
        if v is not None and k not in exclude
    }


def throttled_log(context, label: str, every_s: float = 10.0) -> Callable[..., None]:
    """``report(message, final=False)``: an INFO line at most every ``every_s`` seconds, and always the final one."""
    last = [0.0]

    def report(message: str, final: bool = False) -> None:
        now = time.perf_counter()
        if final or now - last[0] > every_s:
            last[0] = now
            context.log.info(f"{label}: {message}")

    return report


def user_error(err):
    """The platform's own error under Dagster's wrappers ("Error occurred while executing op").

    Stops at the first non-Dagster exception: that message names the slide and the file;
    the library error it was raised from (kept as its cause) usually names neither.
    """
    while err is not None and err.cause is not None and (err.cls_name or "").startswith("Dagster"):
        err = err.cause
    return err


def step_errors(result) -> list[str]:
    """``step: message`` for every failed step of an in-process execution result."""
    errors = []
    for event in result.all_events:
        if event.event_type_value == "STEP_FAILURE":
            err = user_error(event.event_specific_data.error)
            errors.append(f"{event.step_key}: {err.message.strip() if err else 'failed'}")
    return errors
