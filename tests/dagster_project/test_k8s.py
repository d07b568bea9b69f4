"""GPU op tags parse with dagster-k8s's own reader into a pod requesting a GPU."""

import yaml
from dagster_k8s.job import get_user_defined_k8s_config

from mihd_resources.orchestration import gpu_op_tags
from tests.conftest import REPO


def test_gpu_tags_request_a_gpu_through_dagster_k8s():
    config = get_user_defined_k8s_config(gpu_op_tags(gpus=2, memory="16Gi"))
    resources = config.container_config["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "2"
    assert resources["limits"]["nvidia.com/gpu"] == "2"
    assert resources["limits"]["memory"] == "16Gi"
    assert config.pod_spec_config["tolerations"][0]["key"] == "nvidia.com/gpu"


def test_helm_values_are_valid_yaml_and_serve_the_definitions():
    values = yaml.safe_load((REPO / "deploy" / "k8s" / "values.yaml").read_text())
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    assert deployment["dagsterApiGrpcArgs"] == ["--module-name", "dagster_project.definitions"]
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["dagsterDaemon"]["runMonitoring"]["enabled"] is True
