"""Every step pod of the ``*_k8s`` jobs, rendered by dagster-k8s and validated against the Kubernetes API.

``render_k8s_steps`` runs the jobs' own ``k8s_job_executor`` and ``K8sStepHandler.launch_step``
for every step (the Kubernetes API replaced by a recorder), once with the built-in step settings
and once with ``MIHD_K8S_CONFIG=deploy/k8s/step-pods.yaml``; each captured Job is validated
offline with ``kubernetes_validate`` (schema of Kubernetes 1.31, strict: unknown fields fail).
No cluster is contacted.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys

import kubernetes_validate
import pytest
import yaml

from mihd_resources.orchestration import (
    GPU_FAMILIES,
    GPU_RESOURCE,
    K8S_CONFIG_ENV,
    K8S_FAMILY_TAG,
    K8sConfigError,
    gpu_op_tags,
    load_k8s_step_settings,
)
from tests.conftest import BASE_ENV, REPO

K8S_VERSION = "1.31"
EXAMPLE = REPO / "deploy" / "k8s" / "step-pods.yaml"
JOBS = ("slide_pipeline_k8s", "geometry_k8s", "segmentation_benchmark_k8s", "segmentation_e5_donor_k8s",
        "cell_placement_k8s")


@pytest.fixture(scope="module")
def rendered(tmp_path_factory) -> dict[str, dict]:
    """``{"default": render, "configured": render}``; both renders run at once in fresh interpreters."""
    tmp = tmp_path_factory.mktemp("k8s_render")
    env = {k: v for k, v in BASE_ENV.items() if k != K8S_CONFIG_ENV}
    env["MIHD_HOME"] = str(tmp / "home")
    cases = {"default": env, "configured": {**env, K8S_CONFIG_ENV: str(EXAMPLE)}}
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-m", "tests.deploy.render_k8s_steps", str(tmp / f"{name}.json")],
            cwd=REPO, env=case_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )
        for name, case_env in cases.items()
    }
    out = {}
    for name, proc in procs.items():
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"rendering the {name} step pods failed:\n{err[-4000:]}"
        out[name] = json.loads((tmp / f"{name}.json").read_text())
    return out


def _pod(step: dict) -> dict:
    return step["manifest"]["spec"]["template"]["spec"]


def _container(step: dict) -> dict:
    (container,) = _pod(step)["containers"]
    return container


def _steps(render: dict):
    for job in JOBS:
        for key, step in render[job]["steps"].items():
            yield job, key, step


def _is_gpu_step(step: dict) -> bool:
    return step["pool"] == "gpu"


def test_every_step_of_every_k8s_job_is_rendered(rendered):
    for render in rendered.values():
        assert sorted(render) == sorted(JOBS)
        for job in JOBS:
            steps = render[job]["steps"]
            assert sorted(s["op"] for s in steps.values()) == render[job]["nodes"], job
            assert steps, job
    default = rendered["default"]
    families = {step["tags"].get(K8S_FAMILY_TAG) for _, _, step in _steps(default) if _is_gpu_step(step)}
    assert families == set(GPU_FAMILIES)
    slide = default["slide_pipeline_k8s"]["steps"]
    assert "embeddings__vision_standard" in slide and "slides__raw_slide" in slide
    assert sum(_is_gpu_step(s) for s in slide.values()) >= 10


def test_every_manifest_is_valid_against_the_kubernetes_schema(rendered):
    count = 0
    for render in rendered.values():
        for job, key, step in _steps(render):
            manifest = step["manifest"]
            assert manifest["apiVersion"] == "batch/v1" and manifest["kind"] == "Job"
            kubernetes_validate.validate(manifest, K8S_VERSION, strict=True)
            count += 1
    assert count > 2 * 100  # the slide pipeline alone has over 80 steps


def test_the_validator_rejects_an_invalid_manifest(rendered):
    step = rendered["default"]["slide_pipeline_k8s"]["steps"]["embeddings__vision_standard"]
    unknown_field = copy.deepcopy(step["manifest"])
    unknown_field["spec"]["template"]["spec"]["containers"][0]["gpus"] = 1
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(unknown_field, K8S_VERSION, strict=True)
    wrong_type = copy.deepcopy(step["manifest"])
    wrong_type["spec"]["template"]["spec"]["tolerations"] = {"key": GPU_RESOURCE}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(wrong_type, K8S_VERSION, strict=True)


def test_default_gpu_steps_request_a_gpu_and_cpu_steps_stay_small(rendered):
    default_tolerations = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
    for job, key, step in _steps(rendered["default"]):
        resources = _container(step)["resources"]
        pod = _pod(step)
        assert "nodeSelector" not in pod, (job, key)
        assert _container(step)["image"] == rendered["default"][job]["image"]
        if _is_gpu_step(step):
            assert resources["requests"] == {"cpu": "8", "memory": "32Gi", GPU_RESOURCE: "1"}, (job, key)
            assert resources["limits"] == {"memory": "32Gi", GPU_RESOURCE: "1"}, (job, key)
            assert pod["tolerations"] == default_tolerations, (job, key)
        else:
            assert resources == {"requests": {"cpu": "500m", "memory": "2Gi"}, "limits": {"memory": "8Gi"}}, (job, key)
            assert "tolerations" not in pod, (job, key)


def test_the_settings_file_changes_the_pods(rendered):
    settings = load_k8s_step_settings(str(EXAMPLE))
    example = yaml.safe_load(EXAMPLE.read_text())
    for job, key, step in _steps(rendered["configured"]):
        container, pod = _container(step), _pod(step)
        if _is_gpu_step(step):
            family = step["tags"][K8S_FAMILY_TAG]
            expected = settings.gpu(family)
            assert container["resources"] == expected.resources(), (job, key)
            assert container["image"] == example["gpu_defaults"]["image"], (job, key)
            assert container["imagePullPolicy"] == "IfNotPresent"
            assert pod["nodeSelector"] == expected.node_selector, (job, key)
            assert pod["tolerations"] == expected.tolerations, (job, key)
        else:
            assert GPU_RESOURCE not in json.dumps(container["resources"]), (job, key)
            assert container["resources"] == settings.cpu_steps.resources()
            assert container["image"] == rendered["configured"][job]["image"]
            assert "nodeSelector" not in pod and "tolerations" not in pod, (job, key)
    seg = rendered["configured"]["segmentation_e5_donor_k8s"]["steps"]["segmentation__e5_tile_counts"]
    assert _container(seg)["resources"]["requests"]["memory"] == "64Gi"
    assert {"key": "dedicated", "operator": "Equal", "value": "segmentation", "effect": "NoSchedule"} in _pod(seg)["tolerations"]
    emb = rendered["configured"]["slide_pipeline_k8s"]["steps"]["embeddings__vision_standard"]
    assert _container(emb)["resources"]["limits"] == {"memory": "64Gi", GPU_RESOURCE: "1"}
    assert _pod(emb)["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


def test_step_pods_get_the_helm_run_launcher_volumes_and_env(rendered):
    for render in rendered.values():
        for job, key, step in _steps(render):
            pod, container = _pod(step), _container(step)
            assert {"name": "mihd-data", "persistentVolumeClaim": {"claimName": "mihd-data"}} in pod["volumes"]
            assert {"name": "mihd-step-pods", "configMap": {"name": "mihd-step-pods"}} in pod["volumes"]
            assert {"mountPath": "/mihd", "name": "mihd-data"} in container["volumeMounts"]
            env = {e["name"]: e.get("value") for e in container["env"]}
            assert env["MIHD_K8S_CONFIG"] == "/etc/mihd/step-pods.yaml"
            assert env["DAGSTER_RUN_STEP_KEY"] == key
            assert step["namespace"] == "mihd"


# --- the settings loader (in this process: no definitions needed) -------------------------------

def test_gpu_op_tags_without_configuration_keep_todays_tag(monkeypatch):
    monkeypatch.delenv(K8S_CONFIG_ENV, raising=False)
    tags = gpu_op_tags()
    assert json.loads(tags["dagster-k8s/config"]) == {
        "container_config": {"resources": {
            "requests": {"cpu": "8", "memory": "32Gi", GPU_RESOURCE: "1"},
            "limits": {"memory": "32Gi", GPU_RESOURCE: "1"},
        }},
        "pod_spec_config": {"tolerations": [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]},
    }


def test_gpu_op_tags_read_the_family_from_the_file(monkeypatch):
    monkeypatch.setenv(K8S_CONFIG_ENV, str(EXAMPLE))
    config = json.loads(gpu_op_tags(family="segmentation")["dagster-k8s/config"])
    assert config["container_config"]["resources"]["requests"]["memory"] == "64Gi"
    assert config["pod_spec_config"]["node_selector"]["nvidia.com/gpu.present"] == "true"
    # explicit arguments still win over the file
    config = json.loads(gpu_op_tags(gpus=2, family="fusion")["dagster-k8s/config"])
    assert config["container_config"]["resources"]["limits"][GPU_RESOURCE] == "2"
    with pytest.raises(K8sConfigError, match="unknown GPU asset family 'vision'"):
        gpu_op_tags(family="vision")


@pytest.mark.parametrize("text, message", [
    ("families: {imaging: {gpus: 1}}", r"families has unknown families \['imaging'\]"),
    ("families: {embeddings: {memory: 32GB}}", r"families\.embeddings\.memory = '32GB' is not a Kubernetes quantity"),
    ("gpu_defaults: {gpus: -1}", r"gpu_defaults\.gpus must be a whole number >= 0"),
    ("cpu_steps: {memory: 4Gi, memory_limit: 1Gi}", r"cpu_steps\.memory_limit = '1Gi' is below cpu_steps\.memory"),
    ("gpu_defaults: {node_selector: {nvidia.com/gpu.present: true}}", r"gpu_defaults\.node_selector must map"),
    ("families: {fusion: {tolerations: [{key: x, operator: Maybe}]}}", r"families\.fusion\.tolerations\[0\]\.operator"),
    ("families: {fusion: {image_pull_policy: Sometimes}}", r"families\.fusion\.image_pull_policy"),
    ("cpu_steps: {gpus: 1}", r"cpu_steps has unknown settings \['gpus'\]"),
    ("gpu_pods: {}", r"unknown sections \['gpu_pods'\]"),
    ("families: [embeddings]", r"families must map a family"),
])
def test_bad_settings_name_the_setting_and_the_file(tmp_path, monkeypatch, text, message):
    bad = tmp_path / "step-pods.yaml"
    bad.write_text(text)
    monkeypatch.setenv(K8S_CONFIG_ENV, str(bad))
    with pytest.raises(K8sConfigError, match=message) as err:
        load_k8s_step_settings()
    assert f"{K8S_CONFIG_ENV} file {bad}" in str(err.value)


def test_a_missing_settings_file_is_an_error(tmp_path, monkeypatch):
    monkeypatch.setenv(K8S_CONFIG_ENV, str(tmp_path / "absent.yaml"))
    with pytest.raises(K8sConfigError, match="no such file"):
        gpu_op_tags()


def test_the_example_file_sets_every_family():
    example = yaml.safe_load(EXAMPLE.read_text())
    assert set(example["families"]) == set(GPU_FAMILIES)
    settings = load_k8s_step_settings(str(EXAMPLE))
    assert settings.source == f"file {EXAMPLE}"
    assert all(settings.gpu(f).gpus >= 1 for f in GPU_FAMILIES)
