"""Compute settings shared by every model-running asset (device, batching, loaders, AMP),
and where a GPU step actually ran.

``ComputeResource.run`` hands a step's compute to the step executor and returns, with its
value, the step's device facts: ``device_requested`` (``compute.device``), ``device_used``
(``cuda`` or ``cpu``, resolved where the compute runs: a Slurm job resolves ``auto`` on its
node) and ``gpu_expected_by`` (what configured a GPU for the step: a Slurm family with
``gpus > 0``, a Kubernetes step pod with ``nvidia.com/gpu``; empty when nothing does). A step
of the ``gpu`` pool, or one a GPU is expected for, that runs on CPU is logged at WARNING; the
``device_as_requested`` check (:func:`device_check_result`) fails (WARN) when a GPU was
requested or expected and the step ran on CPU.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from typing import Any, Callable, Literal, Sequence, TypeVar

from dagster import AssetCheckResult, AssetCheckSeverity, AssetCheckSpec, AssetKey, ConfigurableResource
from pydantic import Field

from .orchestration import GPU_POOL, GPU_RESOURCE

log = logging.getLogger(__name__)
T = TypeVar("T")

DEVICE_CHECK = "device_as_requested"
# The facts ComputeResource.run returns with a step's value.
DEVICE_FACTS = ("device_requested", "device_used", "gpu_expected_by")


@dataclass(frozen=True)
class ComputeSettings:
    """The compute settings as a plain, picklable value: a step's compute function captures
    this (not the Dagster resource) so that a Slurm job resolves ``device="auto"`` on the
    node it runs on, not on the machine that submitted it."""

    device: str = "auto"
    batch_size: int = 64
    num_workers: int = 2
    pin_memory: bool = True
    amp: bool = True
    torch_threads: int = 0

    def torch_device(self):
        import torch

        if self.torch_threads:
            torch.set_num_threads(self.torch_threads)
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise RuntimeError("compute.device='cuda' but torch sees no CUDA device; set device='auto' or 'cpu'")
            return torch.device("cuda")
        if self.device == "cpu":
            return torch.device("cpu")
        chosen = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        log.info("compute.device=auto resolved to %s", chosen)
        return chosen

    def use_amp(self) -> bool:
        return self.amp and self.torch_device().type == "cuda"

    def device_facts(self, logger, where: str, gpu_pool: bool, gpu_expected_by: str) -> dict:
        """Resolve the device here and say how: ``device_requested``, ``device_used``,
        ``gpu_expected_by``. CPU is logged at WARNING (``logger``: the step's log) when a GPU
        is expected, or when ``device="auto"`` finds no CUDA device for a ``gpu``-pool step."""
        used = self.torch_device().type
        if used != "cuda" and gpu_expected_by:
            logger.warning(f"{where}: runs on {used} although {gpu_expected_by} (compute.device={self.device!r}"
                           + (", torch sees no CUDA device)" if self.device == "auto" else ")")
                           + f"; recorded as device_used={used!r}, the {DEVICE_CHECK} check fails")
        elif used != "cuda" and gpu_pool and self.device == "auto":
            logger.warning(f"{where}: a step of the '{GPU_POOL}' pool runs on {used}: compute.device='auto' and torch "
                           "sees no CUDA device (nothing configured expects a GPU for this step)")
        return {"device_requested": self.device, "device_used": used, "gpu_expected_by": gpu_expected_by}

    def describe(self) -> dict:
        import torch

        dev = self.torch_device()
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu"
        return {
            "device": str(dev),
            "device_name": name,
            "batch_size": self.batch_size,
            "num_workers": self.num_workers,
            "amp": self.use_amp(),
        }


class ComputeResource(ConfigurableResource):
    """Where and how tensors are computed.

    ``device="auto"`` picks CUDA when present, else CPU; a ``gpu``-pool step (or one whose
    executor configures a GPU) that gets CPU is logged at WARNING and recorded
    (:meth:`run`). ``device="cuda"`` on a machine without CUDA is an error, never a quiet
    CPU run.
    """

    device: Literal["auto", "cuda", "cpu"] = "auto"
    batch_size: int = Field(default=64, gt=0)
    num_workers: int = Field(default=2, ge=0, description="DataLoader worker processes")
    pin_memory: bool = True
    amp: bool = Field(default=True, description="mixed precision on CUDA (ignored on CPU)")
    torch_threads: int = Field(default=0, ge=0, description="0 = torch default")

    def settings(self) -> ComputeSettings:
        return ComputeSettings(self.device, self.batch_size, self.num_workers, self.pin_memory, self.amp,
                               self.torch_threads)

    def torch_device(self):
        return self.settings().torch_device()

    def use_amp(self) -> bool:
        return self.settings().use_amp()

    def describe(self) -> dict:
        return self.settings().describe()

    def run(self, context, step_executor, family: str, fn: Callable[[Any], T], *,
            output_name: str | Sequence[str] | None = None) -> tuple[T, dict]:
        """``step_executor.run(context, family, fn)``, and the device facts of the run.

        The device is resolved where ``fn`` runs (in a Slurm job, on its node) and logged
        through the step's log (see :meth:`ComputeSettings.device_facts`). Returns ``(value,
        facts)``; the asset records the facts in its metadata and its stored info, and yields
        :func:`device_check_result`."""
        settings = self.settings()
        expected = gpu_expectation(context, step_executor, family)
        gpu_pool = context.op_def.pool == GPU_POOL
        where = ", ".join(sorted(k.to_user_string() for k in context.selected_asset_keys)) + (
            f" (partition '{context.partition_key}')" if context.has_partition_key else "")

        def with_device(step_log):
            facts = settings.device_facts(step_log, where, gpu_pool, expected)
            return fn(step_log), facts

        return step_executor.run(context, family, with_device, output_name=output_name)


def _job_executor(context):
    """The executor of the run the step belongs to; ``None`` for a directly invoked asset."""
    from dagster._core.errors import DagsterInvalidPropertyError

    try:
        return context.job_def.executor_def
    except DagsterInvalidPropertyError:  # direct invocation (build_asset_context): no job, no executor
        return None


def gpu_expectation(context, step_executor, family: str) -> str:
    """What configures a GPU for this step, in words; ``""`` when nothing does.

    - the Slurm executor, whose settings give the family ``gpus > 0`` (``--gres=gpu:N``);
    - a run under dagster-k8s's ``k8s_job_executor``, whose step pod (the op's
      ``dagster-k8s/config`` tag) requests ``nvidia.com/gpu``.
    The ``gpu`` pool alone expects nothing: locally it only keeps one GPU step at a time."""
    from dagster_k8s import k8s_job_executor
    from dagster_k8s.job import USER_DEFINED_K8S_CONFIG_KEY

    from .step_executor import load_slurm_settings

    reasons = []
    if step_executor.executor == "slurm" and step_executor.slurm_config:
        # Without a settings file step_executor.run fails naming the setting; nothing to read here.
        gpus = load_slurm_settings(step_executor.slurm_config).spec(family).gpus
        if gpus:
            reasons.append(f"Slurm family '{family}' requests {gpus} GPU(s) (--gres=gpu)")
    executor = _job_executor(context)
    pod = context.op_def.tags.get(USER_DEFINED_K8S_CONFIG_KEY)
    if executor is not None and executor.executor_creation_fn is k8s_job_executor.executor_creation_fn and pod:
        # gpu_op_tags' pod config (StepPodSettings.k8s_config): limits name the GPUs only when there are some
        gpus = int(json.loads(pod)["container_config"]["resources"]["limits"].get(GPU_RESOURCE, 0))
        if gpus:
            reasons.append(f"the Kubernetes step pod requests {gpus} {GPU_RESOURCE}")
    return "; ".join(reasons)


def device_check_spec(key: AssetKey) -> AssetCheckSpec:
    return AssetCheckSpec(DEVICE_CHECK, asset=key, description=(
        "Fails (WARN) when a GPU was requested (compute.device='cuda') or expected (a Slurm family or Kubernetes "
        "step pod with GPUs) but the step ran on CPU."))


def device_check_result(key: AssetKey, facts: dict) -> AssetCheckResult:
    """``device_as_requested`` from a step's device facts (:meth:`ComputeResource.run`)."""
    requested, used, expected = facts["device_requested"], facts["device_used"], facts["gpu_expected_by"]
    wanted = expected or ("compute.device='cuda'" if requested == "cuda" else "")
    passed = used == "cuda" or not wanted
    if not passed:
        description = f"ran on {used} although {wanted}"
    elif used == "cuda":
        description = f"ran on cuda (compute.device={requested!r})"
    elif requested == "cpu":
        description = f"no GPU was requested: compute.device='cpu'; ran on {used}"
    else:
        description = (f"no GPU was requested: compute.device={requested!r} found no CUDA device and no Slurm or "
                       f"Kubernetes setting expects one; ran on {used}")
    return AssetCheckResult(
        check_name=DEVICE_CHECK, asset_key=key, passed=passed, severity=AssetCheckSeverity.WARN,
        description=description,
        metadata={"device_requested": requested, "device_used": used, "gpu_expected_by": expected},
    )
