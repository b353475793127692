"""ops/k8s: every Kubernetes object validates against the Kubernetes schemas (kubernetes-validate,
strict: unknown fields are errors); the KEDA objects, whose CRD schemas that package does not carry,
have what KEDA requires; and the manifests fit the pool (queues, probes, grace periods, secrets)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from inferpool.constants import Priority, queue_name

K8S = Path(__file__).resolve().parent.parent / "ops" / "k8s"
MANIFESTS = ["config.yaml", "scheduler.yaml", "workers.yaml", "gateway.yaml", "flower.yaml", "keda.yaml",
             "secrets.example.yaml"]  # fmt: skip


def documents(name: str) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def every_document() -> list[dict[str, Any]]:
    return [doc for name in MANIFESTS for doc in documents(name)]


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for doc in every_document() if doc["kind"] == kind}


@pytest.mark.parametrize("name", MANIFESTS)
def test_objects_validate_against_the_kubernetes_schemas(name: str) -> None:
    for doc in documents(name):
        if doc["apiVersion"].startswith("keda.sh/"):
            continue
        kubernetes_validate.validate(doc, "1.30", strict=True)


def test_the_kustomization_lists_every_manifest_but_the_example_secrets() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert sorted(kustomization["resources"]) == sorted(m for m in MANIFESTS if m != "secrets.example.yaml")


def test_each_worker_scales_on_its_three_queues_and_its_requests_in_flight() -> None:
    workers = {name: doc for name, doc in by_kind("Deployment").items() if name.startswith("worker-")}
    scaled = by_kind("ScaledObject")
    assert set(scaled) == set(workers)
    for name, scaler in scaled.items():
        model = workers[name]["metadata"]["labels"]["inferpool/model"]
        spec = scaler["spec"]
        assert spec["scaleTargetRef"]["name"] == name
        assert 0 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]
        lists = sorted(t["metadata"]["listName"] for t in spec["triggers"] if t["type"] == "redis-sentinel")
        assert lists == sorted(queue_name(model, priority) for priority in Priority)
        for trigger in spec["triggers"]:
            assert {"type", "metadata"} <= set(trigger)
            if trigger["type"] == "redis-sentinel":
                assert {"addresses", "sentinelMaster", "listName", "listLength"} <= set(trigger["metadata"])
                assert trigger["authenticationRef"]["name"] in by_kind("TriggerAuthentication")
        queries = [t["metadata"]["query"] for t in spec["triggers"] if t["type"] == "prometheus"]
        assert queries == [f'sum(inferpool_in_flight{{model="{model}"}})']
    assert by_kind("ScaledObject")["worker-gpt-4o-mini"]["spec"]["minReplicaCount"] == 0  # idle API model: none


def test_processes_get_probes_grace_and_their_secrets_only_from_secrets() -> None:
    registry = yaml.safe_load(by_kind("ConfigMap")["inferpool-registry"]["data"]["registry.yaml"])
    served = {model["name"] for model in registry["models"]}
    for name, deployment in by_kind("Deployment").items():
        pod = deployment["spec"]["template"]["spec"]
        (container,) = pod["containers"]
        assert "livenessProbe" in container, name
        for variable in container.get("env", []):
            if variable["name"] in ("REDIS_URL", "OPENAI_API_KEY", "INFERPOOL_FLOWER_AUTH"):
                assert "secretKeyRef" in variable["valueFrom"], (name, variable["name"])
        if name.startswith("worker-"):
            model = container["args"][container["args"].index("--model") + 1]
            assert model in served
            assert container["livenessProbe"]["exec"]["command"] == ["inferpool", "probe", "worker", model]
            assert pod["terminationGracePeriodSeconds"] >= 60  # warm shutdown finishes the chunks in hand
    assert by_kind("Deployment")["inferpool-scheduler"]["spec"]["replicas"] >= 2
    assert "nvidia.com/gpu" in str(by_kind("Deployment")["worker-llama-3-8b"]["spec"]["template"])
    for secret in by_kind("Secret").values():  # the example carries placeholders only
        assert all("CHANGE-ME" in value for value in secret["stringData"].values())


@pytest.mark.usefixtures("echo_worker")
def test_the_worker_probe_the_manifests_use(redis_url: str) -> None:
    from .test_cli import run_cli

    live = run_cli("probe", "worker", "echo", env={"REDIS_URL": redis_url})
    assert live.returncode == 0, live.stderr
    nobody = run_cli("probe", "worker", "echo-unserved", env={"REDIS_URL": redis_url})
    assert nobody.returncode == 1
    assert "no live worker of echo-unserved on this host" in nobody.stderr
