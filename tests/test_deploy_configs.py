"""deploy/: cluster YAMLs through Ray's own config preparation and JSON schema, Serve configs
through Ray Serve's pydantic schemas, and the RayService against the KubeRay v1 CRD's required
fields and types (ray-operator/apis/ray/v1: raycluster_types.go, rayservice_types.go)."""

from __future__ import annotations

import copy
import inspect
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml
from ray._common.utils import import_attr
from ray.autoscaler._private.util import prepare_config, validate_config
from ray.serve.config import AutoscalingConfig, RequestRouterConfig
from ray.serve.schema import ServeDeploySchema

from tierserve.routing.serve_router import PrefixAwareRequestRouter

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
ROUTER_PATH = "tierserve.routing.serve_router.PrefixAwareRequestRouter"


def load(name: str) -> dict:
    with open(DEPLOY / name) as f:
        return yaml.safe_load(f)


def ray_start_resources(command: str) -> dict:
    """The --resources JSON of a `ray start` command ({} if absent)."""
    m = re.search(r"--resources='([^']*)'", command)
    return json.loads(m.group(1)) if m else {}


# ------------------------------------------------------------------ ray up
def test_aws_cluster_passes_ray_prepare_and_validate():
    raw = load("cluster.yaml")
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "aws"
    types = prepared["available_node_types"]
    head = prepared["head_node_type"]
    assert types[head]["resources"].get("GPU", 0) >= 1
    with_expert = {name for name, t in types.items() if t["resources"].get("expert_host")}
    assert with_expert == {"worker.expert_host"} and head not in with_expert
    assert types["worker.expert_host"]["node_config"]["InstanceType"].startswith("r")  # memory-optimized
    assert types["worker.expert_host"]["resources"].get("GPU", 0) == 0
    assert sum(t.get("min_workers", 0) for t in types.values()) <= prepared["max_workers"]


def test_aws_cluster_invalid_variant_is_rejected():
    # The validation above can fail: an unknown top-level key breaks Ray's schema.
    bad = load("cluster.yaml")
    bad["not_a_ray_field"] = 1
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))
    bad = load("cluster.yaml")
    bad["head_node_type"] = "missing"
    with pytest.raises(ValueError, match="head_node_type"):
        validate_config(prepare_config(bad))


def test_local_cluster_passes_ray_prepare_and_validate():
    raw = load("cluster-local.yaml")
    prepared = prepare_config(copy.deepcopy(raw))
    validate_config(prepared)
    assert prepared["provider"]["type"] == "local"
    (node_type,) = prepared["available_node_types"].values()
    n_workers = len(raw["provider"]["worker_ips"])
    assert node_type["min_workers"] == node_type["max_workers"] == n_workers
    # The local provider keeps Ray's detected resources: expert_host comes from `ray start`
    # on the workers, never on the head.
    worker_res = [ray_start_resources(c) for c in prepared["worker_start_ray_commands"]]
    head_res = [ray_start_resources(c) for c in prepared["head_start_ray_commands"]]
    assert {"expert_host": 1} in worker_res
    assert all("expert_host" not in r for r in head_res)


# ------------------------------------------------------------------- Serve
def check_serve_config(cfg: dict) -> ServeDeploySchema:
    schema = ServeDeploySchema.model_validate(cfg)
    (app,) = schema.applications
    assert app.import_path == "tierserve.server.app:build_app"
    assert {"model", "replicas"} <= set(app.args)
    deployments = {d["name"] if isinstance(d, dict) else d.name: d for d in cfg["applications"][0]["deployments"]}
    assert set(deployments) == {"OpenAIIngress", "LLMServer"}
    server = deployments["LLMServer"]
    auto = AutoscalingConfig.model_validate(server["autoscaling_config"])
    assert auto.min_replicas <= auto.initial_replicas <= auto.max_replicas
    router = RequestRouterConfig.model_validate(server["request_router_config"])
    assert router.request_router_class == ROUTER_PATH
    assert import_attr(router.request_router_class) is PrefixAwareRequestRouter
    # The kwargs are exactly what initialize_state accepts.
    params = inspect.signature(PrefixAwareRequestRouter.initialize_state).parameters
    assert set(router.request_router_kwargs) <= set(params)
    return schema


def test_serve_yaml_validates():
    check_serve_config(load("serve.yaml"))


def serve_configs() -> list[dict]:
    svc = load("kuberay/rayservice.yaml")
    return [load("serve.yaml"), yaml.safe_load(svc["spec"]["serveConfigV2"])]


@pytest.mark.parametrize("which", ["serve.yaml", "kuberay/rayservice.yaml"])
def test_serve_args_are_app_args(which):
    """The app's ``args`` pass tierserve's own AppArgs (generated from the config dataclasses) and build the
    engine config they say; the LLMServer override keeps max_ongoing_requests = max_num_seqs + queue + 1."""
    from pydantic import ValidationError

    from tierserve.server.app_args import AppArgs

    cfg = serve_configs()[["serve.yaml", "kuberay/rayservice.yaml"].index(which)]
    (app,) = cfg["applications"]
    a = AppArgs.model_validate(app["args"])
    engine, serving = a.engine_config(), a.serve_options()
    assert engine.model.model == app["args"]["model"] and serving.replicas == app["args"]["replicas"]
    assert engine.device == app["args"]["device"] == "auto"  # replicas run on the GPU Ray assigns them
    server = next(d for d in app["deployments"] if d["name"] == "LLMServer")
    assert server["ray_actor_options"]["num_gpus"] == 1
    assert server["max_ongoing_requests"] == engine.scheduler.max_num_seqs + serving.max_waiting_requests + 1
    with pytest.raises(ValidationError, match="not_an_option"):
        AppArgs.model_validate({**app["args"], "not_an_option": 1})
    with pytest.raises(ValidationError, match="offload_channel"):
        AppArgs.model_validate({**app["args"], "offload_channel": "carrier-pigeon"})


def test_serve_schema_rejects_bad_autoscaling():
    cfg = load("serve.yaml")
    server = cfg["applications"][0]["deployments"][1]
    server["autoscaling_config"]["max_replicas"] = 0
    with pytest.raises(Exception, match="max_replicas"):
        AutoscalingConfig.model_validate(server["autoscaling_config"])
    cfg = load("serve.yaml")
    cfg["applications"][0]["import_path"] = "not a path"
    with pytest.raises(Exception, match="import_path"):
        ServeDeploySchema.model_validate(cfg)


# ---------------------------------------------------------------- KubeRay
# Required fields of the KubeRay v1 CRD (json tags without omitempty) and their types.
HEAD_REQUIRED = {"rayStartParams": dict, "template": dict}
WORKER_REQUIRED = {"groupName": str, "minReplicas": int, "maxReplicas": int,
                   "rayStartParams": dict, "template": dict}
INT32_MAX = 2**31 - 1


def check_pod_template(template: dict, where: str) -> list[dict]:
    containers = template["spec"]["containers"]           # PodSpec.containers is required
    assert isinstance(containers, list) and containers, where
    for c in containers:
        assert isinstance(c["name"], str) and c["name"], where  # Container.name is required
        assert isinstance(c["image"], str) and c["image"], where
    return containers


def check_ray_start_params(params: dict, where: str) -> None:
    # map[string]string: every value must already be a string in YAML.
    for k, v in params.items():
        assert isinstance(k, str) and isinstance(v, str), f"{where}.rayStartParams.{k} must be a string"


def custom_resources(params: dict) -> dict:
    """KubeRay's rayStartParams.resources: a quoted JSON string, '"{\\"name\\": n}"'."""
    value = params.get("resources")
    if value is None:
        return {}
    assert value.startswith('"') and value.endswith('"'), "resources must be a quoted JSON string"
    return json.loads(json.loads(value))


def test_rayservice_matches_kuberay_v1_crd():
    svc = load("kuberay/rayservice.yaml")
    assert svc["apiVersion"] == "ray.io/v1" and svc["kind"] == "RayService"
    assert isinstance(svc["metadata"]["name"], str)
    spec = svc["spec"]
    assert isinstance(spec["serveConfigV2"], str)
    cluster = spec["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    assert cluster["authOptions"] == {"mode": "token"}  # KubeRay >= 1.5.1 makes the token Secret
    assert tuple(map(int, cluster["rayVersion"].split("."))) >= (2, 52, 0)  # token auth needs Ray 2.52+
    assert cluster["autoscalerOptions"]["upscalingMode"] in ("Default", "Aggressive", "Conservative")

    head = cluster["headGroupSpec"]
    for key, typ in HEAD_REQUIRED.items():
        assert isinstance(head[key], typ), f"headGroupSpec.{key}"
    check_ray_start_params(head["rayStartParams"], "headGroupSpec")
    check_pod_template(head["template"], "headGroupSpec")
    assert "expert_host" not in custom_resources(head["rayStartParams"])

    groups = {}
    for g in cluster["workerGroupSpecs"]:
        for key, typ in WORKER_REQUIRED.items():
            assert isinstance(g[key], typ) and not isinstance(g[key], bool), f"workerGroupSpecs.{key}"
        assert 0 <= g["minReplicas"] <= g.get("replicas", g["minReplicas"]) <= g["maxReplicas"] <= INT32_MAX
        check_ray_start_params(g["rayStartParams"], g["groupName"])
        groups[g["groupName"]] = g
    assert len(groups) == len(cluster["workerGroupSpecs"])  # group names are unique

    gpu_limits = [c["resources"]["limits"].get("nvidia.com/gpu")
                  for c in check_pod_template(groups["gpu"]["template"], "gpu")]
    assert gpu_limits == ["1"]
    assert custom_resources(groups["expert-host"]["rayStartParams"]) == {"expert_host": 1}
    expert_containers = check_pod_template(groups["expert-host"]["template"], "expert-host")
    assert all("nvidia.com/gpu" not in c["resources"]["limits"] for c in expert_containers)
    with_expert = {name for name, g in groups.items() if custom_resources(g["rayStartParams"])}
    assert with_expert == {"expert-host"}


def test_rayservice_serve_config_validates_and_matches_serve_yaml():
    svc = load("kuberay/rayservice.yaml")
    embedded = yaml.safe_load(svc["spec"]["serveConfigV2"])
    check_serve_config(embedded)
    assert embedded["applications"] == load("serve.yaml")["applications"]


@pytest.mark.parametrize("which", ["cluster.yaml", "cluster-local.yaml"])
def test_ray_up_clusters_use_token_auth_and_keep_the_dashboard_local(which):
    """Every node gets the token file at Ray's default path and starts Ray with token auth reading it;
    no head command puts the dashboard on all interfaces (Ray's default host is 127.0.0.1)."""
    cfg = load(which)
    assert cfg["file_mounts"]["~/.ray/auth_token"] == "deploy/ray-auth-token"
    starts = [c for c in cfg["head_start_ray_commands"] + cfg["worker_start_ray_commands"] if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        env = cmd.split("ray start")[0]
        assert "RAY_AUTH_MODE=token" in env and "RAY_AUTH_TOKEN_PATH=$HOME/.ray/auth_token" in env, cmd
        assert "dashboard-host" not in cmd, cmd
