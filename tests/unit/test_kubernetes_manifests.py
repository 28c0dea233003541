"""deploy/kubernetes/: every manifest valid against the Kubernetes schemas (kubernetes-validate bundles them,
so this runs offline, strictly: an unknown field fails), and the pieces pointing at each other line up."""

from __future__ import annotations

import copy
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from pagewire.cli import build_parser
from scheduler_service.executor_discovery import ExecutorTarget
from shared.bearer_auth import EXECUTOR_TOKEN_ENV

REPO_ROOT = Path(__file__).resolve().parents[2]
MANIFEST_DIR = REPO_ROOT / "deploy" / "kubernetes"
# gRPC probes are GA since 1.27; validate against a release clusters run today.
KUBERNETES_VERSION = "1.30"


def load_documents() -> dict[tuple[str, str], dict]:
    documents = {}
    for path in sorted(MANIFEST_DIR.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            documents[(document["kind"], document["metadata"]["name"])] = document
    return documents


DOCUMENTS = load_documents()


@pytest.mark.parametrize("key", sorted(DOCUMENTS), ids=lambda key: f"{key[0]}/{key[1]}")
def test_every_manifest_is_valid_against_the_kubernetes_schema(key: tuple[str, str]) -> None:
    kubernetes_validate.validate(DOCUMENTS[key], KUBERNETES_VERSION, strict=True)


def test_the_validator_really_rejects_a_broken_manifest() -> None:
    broken = copy.deepcopy(DOCUMENTS[("StatefulSet", "pagewire-executor")])
    broken["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["grpc"]["prot"] = 50061
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)
    broken = copy.deepcopy(DOCUMENTS[("Service", "pagewire-executor")])
    broken["spec"]["ports"][0]["port"] = "fifty"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBERNETES_VERSION, strict=True)


def test_the_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((MANIFEST_DIR / "kustomization.yaml").read_text())
    files = {path.name for path in MANIFEST_DIR.glob("*.yaml")} - {"kustomization.yaml"}
    assert sorted(kustomization["resources"]) == sorted(files)


def container(kind: str, name: str) -> dict:
    (only,) = DOCUMENTS[(kind, name)]["spec"]["template"]["spec"]["containers"]
    return only


def port_named(container_spec: dict, name: str) -> int:
    return next(p["containerPort"] for p in container_spec["ports"] if p["name"] == name)


def selects(service: dict, workload: dict) -> bool:
    labels = workload["spec"]["template"]["metadata"]["labels"]
    return service["spec"]["selector"].items() <= labels.items()


def test_executors_get_one_gpu_each_and_a_headless_service_the_scheduler_resolves() -> None:
    statefulset = DOCUMENTS[("StatefulSet", "pagewire-executor")]
    service = DOCUMENTS[("Service", "pagewire-executor")]
    executor = container("StatefulSet", "pagewire-executor")
    args = build_parser().parse_args(executor["args"])
    assert (args.command, args.host, args.port, args.device) == ("executor", "0.0.0.0", 50061, "cuda")
    assert executor["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert port_named(executor, "grpc") == args.port
    assert statefulset["spec"]["serviceName"] == service["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert selects(service, statefulset)
    spec = statefulset["spec"]
    assert spec["selector"]["matchLabels"] == spec["template"]["metadata"]["labels"]
    assert service["spec"]["ports"][0]["port"] == args.port

    scheduler_args = build_parser().parse_args(container("Deployment", "pagewire-scheduler")["args"])
    (target_text,) = scheduler_args.executor_addresses
    target = ExecutorTarget.parse(target_text)
    assert (target.is_dns, target.host, target.port) == (True, service["metadata"]["name"], args.port)


def test_probes_are_grpc_health_checks_on_the_serving_ports() -> None:
    executor = container("StatefulSet", "pagewire-executor")
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert executor[probe]["grpc"] == {"port": 50061}
    # Up to 10 minutes of model loading before liveness starts counting.
    startup = executor["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    scheduler = container("Deployment", "pagewire-scheduler")
    assert scheduler["readinessProbe"]["grpc"] == {"port": 50051, "service": "pagewire.v1.Generation"}
    assert scheduler["livenessProbe"]["grpc"] == {"port": 50051}


def test_the_scheduler_serves_http_on_8000_and_grpc_behind_a_service_and_a_headless_one() -> None:
    deployment = DOCUMENTS[("Deployment", "pagewire-scheduler")]
    scheduler = container("Deployment", "pagewire-scheduler")
    args = build_parser().parse_args(scheduler["args"])
    assert (args.command, args.host, args.port, args.http_port) == ("scheduler", "0.0.0.0", 50051, 8000)
    assert args.scheduler_id == "$(POD_NAME)"  # Kubernetes expands it from the env entry below
    pod_name = {"fieldRef": {"fieldPath": "metadata.name"}}
    assert scheduler["env"][0] == {"name": "POD_NAME", "valueFrom": pod_name}
    assert (port_named(scheduler, "http"), port_named(scheduler, "grpc")) == (8000, 50051)
    front = DOCUMENTS[("Service", "pagewire-scheduler")]
    assert selects(front, deployment)
    assert {p["name"]: (p["port"], p["targetPort"]) for p in front["spec"]["ports"]} == {
        "http": (8000, "http"), "grpc": (50051, "grpc")}
    headless = DOCUMENTS[("Service", "pagewire-scheduler-grpc")]
    assert headless["spec"]["clusterIP"] == "None" and selects(headless, deployment)


def test_executors_and_schedulers_share_the_models_volume() -> None:
    claim = DOCUMENTS[("PersistentVolumeClaim", "pagewire-models")]
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for kind, name in (("StatefulSet", "pagewire-executor"), ("Deployment", "pagewire-scheduler")):
        volumes = DOCUMENTS[(kind, name)]["spec"]["template"]["spec"]["volumes"]
        models = next(v for v in volumes if v["name"] == "models")
        assert models["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
        mount = next(m for m in container(kind, name)["volumeMounts"] if m["name"] == "models")
        assert mount["mountPath"] == "/models"


def test_both_workloads_take_the_executor_token_from_one_secret_that_is_not_committed() -> None:
    """The executor hop is authenticated in the cluster too: the same Secret key on both sides, required
    (no `optional`), and no Secret with a value in the manifests that every install would share."""
    token_source = {"secretKeyRef": {"name": "pagewire-executor-token", "key": "token"}}
    for kind, name in (("StatefulSet", "pagewire-executor"), ("Deployment", "pagewire-scheduler")):
        entries = [e for e in container(kind, name)["env"] if e["name"] == EXECUTOR_TOKEN_ENV]
        assert entries == [{"name": EXECUTOR_TOKEN_ENV, "valueFrom": token_source}], (kind, name)
        args = build_parser().parse_args(container(kind, name)["args"])
        assert args.executor_token is None, "a token on argv would show in every process listing"
    assert not [key for key in DOCUMENTS if key[0] == "Secret"]
    kustomization = (MANIFEST_DIR / "kustomization.yaml").read_text()
    assert "kubectl create secret generic pagewire-executor-token --from-literal=token=" in kustomization


def test_the_images_are_the_two_dockerfile_targets_compose_builds() -> None:
    compose = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())["services"]
    assert container("StatefulSet", "pagewire-executor")["image"] == compose["executor"]["image"]
    assert container("Deployment", "pagewire-scheduler")["image"] == compose["scheduler"]["image"]
    assert (compose["executor"]["build"]["target"], compose["scheduler"]["build"]["target"]) == (
        "executor", "scheduler")
