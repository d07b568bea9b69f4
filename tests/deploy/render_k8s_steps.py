"""Render the Kubernetes Job of every step of the ``*_k8s`` jobs, offline, through dagster-k8s itself.

Run as ``python -m tests.deploy.render_k8s_steps OUT.json`` (a fresh interpreter, so the step
settings file named by ``MIHD_K8S_CONFIG`` is read when the asset modules are imported, exactly
as in a code server). For each job it does what a run on the cluster does, minus the API call:

- an instance whose run launcher is ``K8sRunLauncher`` configured from ``deploy/k8s/values.yaml``
  (``runLauncher.config.k8sRunLauncher``), with an offline kubeconfig;
- the job's own executor (``k8s_job_executor`` as configured in ``dagster_project.k8s_jobs``),
  created from the resolved run config as Dagster's ``create_executor`` does;
- for every step of the execution plan, ``K8sStepHandler.launch_step`` with the
  ``StepHandlerContext`` the step-delegating executor builds; the Kubernetes batch API is replaced
  by a recorder, so the ``V1Job`` that would have been created is captured instead of sent.

Writes ``{job: {"nodes": [op names], "image": the user code image,
"steps": {step_key: {"manifest": dict, "namespace": str, "op": str, "tags": dict, "pool": str|None}}}}``.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
from pathlib import Path

import kubernetes
import yaml

REPO = Path(__file__).resolve().parents[2]
VALUES = REPO / "deploy" / "k8s" / "values.yaml"
# What the Helm chart sets on the run launcher besides values.yaml's k8sRunLauncher section.
HELM_LAUNCHER_DEFAULTS = {
    "service_account_name": "mihd-dagster",
    "instance_config_map": "mihd-dagster-instance",
    "postgres_password_secret": "dagster-postgresql-secret",
    "dagster_home": "/opt/dagster/dagster_home",
    "job_namespace": "mihd",
}
OFFLINE_KUBECONFIG = {
    "apiVersion": "v1",
    "kind": "Config",
    "clusters": [{"name": "offline", "cluster": {"server": "https://127.0.0.1:6443"}}],
    "users": [{"name": "offline", "user": {"token": "offline"}}],
    "contexts": [{"name": "offline", "context": {"cluster": "offline", "user": "offline", "namespace": "mihd"}}],
    "current-context": "offline",
}


class RecordingBatchApi:
    """Stands in for ``kubernetes.client.BatchV1Api``: keeps the Jobs instead of creating them."""

    def __init__(self):
        self.created: list[tuple[str, kubernetes.client.V1Job]] = []

    def create_namespaced_job(self, body, namespace, **_kwargs):
        self.created.append((namespace, body))
        return body


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def values_run_launcher() -> tuple[dict, str]:
    """The run launcher config the Helm chart derives from values.yaml, and the user code image."""
    values = yaml.safe_load(VALUES.read_text())
    launcher = values["runLauncher"]
    assert launcher["type"] == "K8sRunLauncher", launcher["type"]
    config = {_snake(k): v for k, v in launcher["config"]["k8sRunLauncher"].items()}
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    image = f"{deployment['image']['repository']}:{deployment['image']['tag']}"
    return {**HELM_LAUNCHER_DEFAULTS, **config}, image


def render(out: Path) -> None:
    from dagster._core.definitions.reconstruct import ReconstructableRepository
    from dagster._core.execution.api import create_execution_plan
    from dagster._core.execution.context.system import PlanData, PlanOrchestrationContext
    from dagster._core.execution.context_creation_job import create_context_free_log_manager
    from dagster._core.execution.retries import RetryMode
    from dagster._core.executor.init import InitExecutorContext
    from dagster._core.executor.step_delegating import StepHandlerContext
    from dagster._core.system_config.objects import ResolvedRunConfig
    from dagster._core.test_utils import instance_for_test
    from dagster._grpc.types import ExecuteStepArgs

    from dagster_project.k8s_jobs import K8S_JOB_NAMES

    launcher_config, image = values_run_launcher()
    result: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        kubeconfig = Path(tmp) / "kubeconfig"
        kubeconfig.write_text(yaml.safe_dump(OFFLINE_KUBECONFIG))
        launcher_config = {**launcher_config, "load_incluster_config": False, "kubeconfig_file": str(kubeconfig)}
        overrides = {"run_launcher": {"module": "dagster_k8s", "class": "K8sRunLauncher", "config": launcher_config}}
        with instance_for_test(overrides=overrides) as instance:
            # The user deployment's image, as DAGSTER_CURRENT_IMAGE makes it in the code server.
            repo = ReconstructableRepository.for_module(
                "dagster_project.definitions", "defs", working_directory=str(REPO), container_image=image
            )
            for job_name in K8S_JOB_NAMES:
                recon_job = repo.get_reconstructable_job(job_name)
                job_def = recon_job.get_definition()
                run_config = ResolvedRunConfig.build(job_def, {})
                executor = job_def.executor_def.executor_creation_fn(InitExecutorContext(
                    job=recon_job, executor_def=job_def.executor_def,
                    executor_config=run_config.execution.execution_engine_config, instance=instance,
                ))
                handler = executor._step_handler
                recorder = RecordingBatchApi()
                handler._api_client.batch_api = recorder
                plan = create_execution_plan(recon_job)
                run = instance.create_run_for_job(
                    job_def=job_def, execution_plan=plan, job_code_origin=recon_job.get_python_origin(),
                )
                plan_context = PlanOrchestrationContext(
                    plan_data=PlanData(job=recon_job, dagster_run=run, instance=instance, execution_plan=plan,
                                       raise_on_error=True, retry_mode=RetryMode.DISABLED),
                    log_manager=create_context_free_log_manager(instance, run),
                    executor=executor,
                    output_capture=None,
                )
                steps = {}
                pools = {op.name: getattr(op, "pool", None) for op in job_def.all_node_defs}
                for step in plan.get_all_steps_in_topo_order():
                    context = StepHandlerContext(
                        instance=instance, plan_context=plan_context, steps=[step], dagster_run=run,
                        execute_step_args=ExecuteStepArgs(
                            job_origin=recon_job.get_python_origin(), run_id=run.run_id,
                            step_keys_to_execute=[step.key], instance_ref=instance.get_ref(),
                            retry_mode=RetryMode.DISABLED, print_serialized_events=False,
                        ),
                    )
                    before = len(recorder.created)
                    list(handler.launch_step(context))
                    assert len(recorder.created) == before + 1, f"{job_name}: {step.key} created no Job"
                    namespace, body = recorder.created[-1]
                    steps[step.key] = {
                        "manifest": kubernetes.client.ApiClient().sanitize_for_serialization(body),
                        "namespace": namespace,
                        "op": step.op_name,
                        "tags": dict(step.tags),
                        "pool": pools.get(step.op_name),
                    }
                result[job_name] = {"nodes": sorted(n.name for n in job_def.nodes_in_topological_order),
                                    "image": image, "steps": steps}
    out.write_text(json.dumps(result, indent=1, sort_keys=True))


if __name__ == "__main__":
    render(Path(sys.argv[1]))
