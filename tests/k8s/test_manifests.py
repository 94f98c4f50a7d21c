"""k8s/ and skaffold.yaml: the platform and load-test manifests are valid Kubernetes (and
Prometheus Operator) objects, the kind config and skaffold config point at what exists, and
k8s/README.md covers every file it should."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from tests.k8s.conftest import CHART, K8S, KUBE_VERSIONS, ROOT
from tests.k8s.test_chart import CRD_KINDS, crd_errors

MANIFESTS = sorted([*K8S.glob("loadtest/*.yaml"), K8S / "platform" / "hatchet-engine-servicemonitor.yaml"])


def objects(path: Path) -> list[dict[str, Any]]:
    return [o for o in yaml.safe_load_all(path.read_text()) if o]


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: str(p.relative_to(K8S)))
@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_manifests_when_validated_match_their_schemas(path: Path, version: str) -> None:
    found = objects(path)
    assert found
    for obj in found:
        if obj["kind"] in CRD_KINDS:
            assert not crd_errors(obj), f"{path.name}: {crd_errors(obj)}"
        else:
            kubernetes_validate.validate(obj, version, strict=True)


def test_locust_when_deployed_runs_master_and_workers_on_one_locustfile() -> None:
    master = {o["kind"]: o for o in objects(K8S / "loadtest" / "locust-master.yaml")}
    (worker,) = objects(K8S / "loadtest" / "locust-workers.yaml")
    m = master["Job"]["spec"]["template"]["spec"]["containers"][0]
    w = worker["spec"]["template"]["spec"]["containers"][0]
    assert m["image"] == w["image"] and not m["image"].endswith(":latest")
    assert "--master" in m["args"] and "--worker" in w["args"] and "--master-host=locust-master" in w["args"]
    expect = int(next(a for a in m["args"] if a.startswith("--expect-workers=")).split("=")[1])
    assert worker["spec"]["replicas"] == expect
    assert master["Service"]["metadata"]["name"] == "locust-master"
    gateway = next(a for a in m["args"] if a.startswith("--host="))
    assert gateway == "--host=http://zvt-zvt-fleet-gateway.trading.svc.cluster.local"  # release zvt, namespace trading


def test_kind_config_when_read_has_workers_in_three_zones() -> None:
    config = yaml.safe_load((K8S / "kind-config.yaml").read_text())
    assert config["kind"] == "Cluster" and config["apiVersion"] == "kind.x-k8s.io/v1alpha4"
    zones = {n["labels"]["topology.kubernetes.io/zone"] for n in config["nodes"] if n["role"] == "worker"}
    assert len(zones) == 3
    ports = [p["containerPort"] for n in config["nodes"] for p in n.get("extraPortMappings", [])]
    assert yaml.safe_load((K8S / "values-kind.yaml").read_text())["gatewayService"]["nodePort"] in ports


def test_skaffold_when_read_builds_the_image_and_deploys_the_chart() -> None:
    config = yaml.safe_load((ROOT / "skaffold.yaml").read_text())
    assert re.fullmatch(r"skaffold/v4beta\d+", config["apiVersion"]) and config["kind"] == "Config"
    (artifact,) = config["build"]["artifacts"]
    assert (ROOT / artifact["docker"]["dockerfile"]).is_file()
    (release,) = config["deploy"]["helm"]["releases"]
    assert (ROOT / release["chartPath"]) == CHART
    assert release["setValueTemplates"]["image.repository"] == "{{.IMAGE_REPO_%s}}" % artifact["image"].replace("-", "_")
    profiles = {p["name"]: p for p in config["profiles"]}
    assert set(profiles) == {"dev", "loadtest"}
    for profile in profiles.values():
        for patch in profile["patches"]:
            value = patch["value"]
            files = value if patch["path"].endswith("valuesFiles") else value.get("rawYaml", []) if isinstance(value, dict) else []
            for f in files:
                assert (ROOT / f).is_file(), f"skaffold profile {profile['name']}: {f} does not exist"


def test_readme_when_read_names_every_file_in_k8s_in_install_order() -> None:
    readme = (K8S / "README.md").read_text()
    for path in sorted(K8S.rglob("*.yaml")):
        assert str(path.relative_to(ROOT)) in readme, f"k8s/README.md does not mention {path.relative_to(ROOT)}"
    body = readme[readme.index("## 0."):]
    steps = [body.index(s) for s in ("kind-config.yaml", "kube-prometheus-stack-values.yaml", "keda-values.yaml",
                                        "redis-cluster-values.yaml", "hatchet-ha-values.yaml", "otel-collector-values.yaml",
                                        "helm install zvt", "helm test zvt", "k8s/loadtest/")]
    assert steps == sorted(steps), "k8s/README.md: the install steps are out of order"
