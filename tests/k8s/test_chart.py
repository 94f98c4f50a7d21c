"""The chart with the real helm CLI: lint, render with every values file, validate every object
against the Kubernetes schemas of two minor versions and the KEDA / Prometheus Operator CRDs,
and hold the rendered output to the fleet's policies."""

from __future__ import annotations

import copy
import json
import re
import subprocess
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from tests.k8s.conftest import CHART, CRDS, KUBE_VERSIONS, VALUES, Rendered, render, values_args

CRD_KINDS = {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PodMonitor", "PrometheusRule"}
CONSUMER_ROLES = {"stage", "consumer", "worker"}
SECRET_ENV = re.compile(r"^ZVT_.*(TOKEN|DSN|SECRET|API_KEY|PASSWORD)$")


# --- helm lint / template ---------------------------------------------------------------------


@pytest.mark.parametrize("values", VALUES)
def test_lint_when_strict_passes_with_every_values_file(helm: Path, values: str) -> None:
    proc = subprocess.run(
        [str(helm), "lint", "--strict", str(CHART), "--namespace", "trading", *values_args(values)],
        capture_output=True, text=True, timeout=120,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "0 chart(s) failed" in out
    # helm lint reports a template's `fail` as INFO and still passes: refuse that here
    assert not re.search(r"\[(ERROR|WARNING)\]|Fail:", out), out


def test_render_when_default_values_has_every_service(rendered: Rendered) -> None:
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"] for d in rendered.of_kind("Deployment")}
    assert {"gateway", "risk", "order", "routing", "portfolio", "recorder"} <= deployments
    services = {s["metadata"]["labels"]["app.kubernetes.io/component"] for s in rendered.of_kind("Service")}
    assert services == deployments
    assert not rendered.of_kind("Secret"), "the chart must only reference secrets"


# --- schemas ----------------------------------------------------------------------------------


@pytest.mark.parametrize("version", KUBE_VERSIONS)
def test_objects_when_validated_match_the_kubernetes_schemas(rendered: Rendered, version: str) -> None:
    checked = 0
    for obj in rendered.objects:
        if obj["kind"] in CRD_KINDS:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            path = ".".join(str(p) for p in exc.path)
            pytest.fail(f"{rendered.values}: {obj['kind']}/{obj['metadata']['name']} on {version}: {path}: {exc.message}")
        checked += 1
    assert checked >= 10


def _strict(schema: Any) -> Any:
    """The CRD schema as the API server's strict field validation sees it: no unknown fields
    where the schema lists the properties and does not preserve unknown ones."""
    if isinstance(schema, dict):
        out = {k: _strict(v) for k, v in schema.items()}
        if "properties" in out and not out.get("x-kubernetes-preserve-unknown-fields"):
            out.setdefault("additionalProperties", False)
        return out
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_schemas() -> dict[tuple[str, str], dict[str, Any]]:
    schemas: dict[tuple[str, str], dict[str, Any]] = {}
    for path in sorted(CRDS.glob("*.yaml")):
        crd = yaml.safe_load(path.read_text())
        group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
        for version in crd["spec"]["versions"]:
            schema = copy.deepcopy(version["schema"]["openAPIV3Schema"])
            schema["properties"]["metadata"] = {"type": "object"}
            schemas[(f"{group}/{version['name']}", kind)] = _strict(schema)
    return schemas


def crd_errors(obj: dict[str, Any]) -> list[str]:
    schema = crd_schemas().get((obj["apiVersion"], obj["kind"]))
    assert schema is not None, f"no CRD in {CRDS} for {obj['apiVersion']} {obj['kind']}"
    validator = jsonschema.Draft7Validator(schema)
    return [f"{'.'.join(str(p) for p in e.absolute_path)}: {e.message}" for e in validator.iter_errors(obj)]


def test_crds_when_loaded_cover_keda_and_the_prometheus_operator() -> None:
    kinds = {kind for _, kind in crd_schemas()}
    assert {"ScaledObject", "TriggerAuthentication", "ServiceMonitor", "PrometheusRule"} <= kinds


def test_custom_resources_when_validated_match_their_crds(rendered: Rendered) -> None:
    custom = [o for o in rendered.objects if o["kind"] in CRD_KINDS]
    for obj in custom:
        errors = crd_errors(obj)
        assert not errors, f"{rendered.values}: {obj['kind']}/{obj['metadata']['name']}: {errors}"
    if rendered.values != "minimal-values.yaml":
        assert {o["kind"] for o in custom} >= {"ServiceMonitor", "PrometheusRule"}


def test_crd_validation_when_a_field_is_wrong_names_it(rendered: Rendered) -> None:
    scaled = rendered.of_kind("ScaledObject")
    if not scaled:
        return
    broken = copy.deepcopy(scaled[0])
    broken["spec"]["minReplicaCount"] = "two"
    broken["spec"]["triggerz"] = broken["spec"].pop("triggers")
    errors = "\n".join(crd_errors(broken))
    assert "minReplicaCount" in errors and "triggers" in errors and "triggerz" in errors


def test_kubernetes_validation_when_a_field_is_unknown_fails() -> None:
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "x"},
           "spec": {"containers": [{"name": "x", "image": "x:1", "securityContxt": {}}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(pod, KUBE_VERSIONS[0], strict=True)


# --- policies ---------------------------------------------------------------------------------


def pod_specs(rendered: Rendered) -> list[tuple[str, dict[str, Any]]]:
    specs = [(f"Deployment/{d['metadata']['name']}", d["spec"]["template"]["spec"]) for d in rendered.of_kind("Deployment")]
    specs += [(f"Pod/{p['metadata']['name']}", p["spec"]) for p in rendered.of_kind("Pod")]
    return specs


def test_containers_when_rendered_run_restricted(rendered: Rendered) -> None:
    for where, spec in pod_specs(rendered):
        pod = spec["securityContext"]
        assert pod["runAsNonRoot"] is True and pod["runAsUser"] > 0, where
        assert pod["seccompProfile"]["type"] == "RuntimeDefault", where
        assert spec.get("automountServiceAccountToken") is False, where
        for c in spec["containers"] + spec.get("initContainers", []):
            sc = c["securityContext"]
            assert sc["runAsNonRoot"] is True, where
            assert sc["allowPrivilegeEscalation"] is False, where
            assert sc["readOnlyRootFilesystem"] is True, where
            assert sc.get("privileged", False) is False, where
            assert sc["capabilities"]["drop"] == ["ALL"] and not sc["capabilities"].get("add"), where
            assert sc["seccompProfile"]["type"] == "RuntimeDefault", where


def test_containers_when_rendered_have_resources_and_pinned_images(rendered: Rendered) -> None:
    for where, spec in pod_specs(rendered):
        for c in spec["containers"]:
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{where}: {kind}"
            image = c["image"]
            assert not image.endswith(":latest") and ":latest@" not in image, f"{where}: {image}"
            assert "@sha256:" in image or re.search(r":[\w.-]+$", image.rsplit("/", 1)[-1]), f"{where}: untagged {image}"


def test_deployments_when_rendered_have_probes_spread_and_grace_above_the_drain(rendered: Rendered) -> None:
    for d in rendered.of_kind("Deployment"):
        name = d["metadata"]["name"]
        spec = d["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        for probe in ("livenessProbe", "readinessProbe", "startupProbe"):
            assert c[probe]["httpGet"]["path"].startswith("/"), f"{name}: {probe}"
        ports = {p["name"] for p in c["ports"]}
        assert c["readinessProbe"]["httpGet"]["port"] in ports, name
        env = {e["name"]: e.get("value") for e in c["env"]}
        drain = float(env["ZVT_DRAIN_TIMEOUT_S"])
        pre_stop = c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)
        assert spec["terminationGracePeriodSeconds"] > drain + pre_stop, name
        if rendered.values != "minimal-values.yaml":
            keys = {t["topologyKey"] for t in spec["topologySpreadConstraints"]}
            assert keys == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}, name
        assert d["spec"]["template"]["metadata"]["annotations"]["checksum/config"], name


def _targets(rendered: Rendered, kind: str) -> list[str]:
    return [o["spec"]["scaleTargetRef"]["name"] for o in rendered.of_kind(kind)]


def test_autoscalers_when_rendered_never_double_up_and_cover_every_consumer(rendered: Rendered) -> None:
    hpa, keda = _targets(rendered, "HorizontalPodAutoscaler"), _targets(rendered, "ScaledObject")
    assert not set(hpa) & set(keda), f"both an HPA and a ScaledObject for {set(hpa) & set(keda)}"
    assert len(hpa) == len(set(hpa)) and len(keda) == len(set(keda))
    autoscaled = set(hpa) | set(keda)
    deployments = {d["metadata"]["name"]: d for d in rendered.of_kind("Deployment")}
    assert autoscaled <= set(deployments)
    for name, d in deployments.items():
        if d["metadata"]["labels"]["zvt.io/role"] in CONSUMER_ROLES:
            assert name in autoscaled, f"{rendered.values}: consumer {name} is not autoscaled"
        # replicas is left to the autoscaler, and set where there is none
        assert ("replicas" in d["spec"]) == (name not in autoscaled), name


def test_scaled_objects_when_rendered_scale_consumers_on_lag_and_workflows_on_queue_depth(rendered: Rendered) -> None:
    deployments = {d["metadata"]["name"]: d for d in rendered.of_kind("Deployment")}
    for so in rendered.of_kind("ScaledObject"):
        d = deployments[so["spec"]["scaleTargetRef"]["name"]]
        role = d["metadata"]["labels"]["zvt.io/role"]
        (trigger,) = so["spec"]["triggers"]
        if role in {"stage", "consumer"}:
            component = d["metadata"]["labels"]["app.kubernetes.io/component"]
            assert trigger["type"] == "prometheus"
            query = trigger["metadata"]["query"]
            assert query.startswith("sum(max by (stream, shard) (zvt_bus_lag{"), query
            assert f'group="{component}"' in query and 'namespace="trading"' in query, query
        elif role == "worker":
            assert trigger["type"] == "prometheus"
            assert "hatchet_tenant_queue_size" in trigger["metadata"]["query"]
        if role == "stage":  # an exclusive stage owns whole shards
            shards = int(rendered.named("ConfigMap", "zvt-zvt-fleet-config")["data"]["ZVT_BUS_SHARDS"])
            assert so["spec"]["maxReplicaCount"] <= shards


def test_secrets_when_rendered_are_only_references(rendered: Rendered) -> None:
    for where, spec in pod_specs(rendered):
        for c in spec["containers"]:
            for e in c.get("env", []):
                if SECRET_ENV.match(e["name"]):
                    assert "value" not in e and "secretKeyRef" in e["valueFrom"], f"{where}: {e['name']}"
    config = rendered.named("ConfigMap", "zvt-zvt-fleet-config")["data"]
    assert not [k for k in config if SECRET_ENV.match(k)]


def test_config_when_rendered_waits_for_a_replica_and_is_valid_bus_settings(rendered: Rendered) -> None:
    """A fleet on a Redis Cluster (with a replica per master) has an accepted order (and a route
    intent) on a replica before the gateway answers 202 (docs/operations.md); the single-Redis
    install without replicas turns it off."""
    from services.core.replication import ReplicaWait
    from services.core.settings import BusSettings

    config = rendered.named("ConfigMap", "zvt-zvt-fleet-config")["data"]
    settings = BusSettings(**{k[len("ZVT_BUS_"):].lower(): v for k, v in config.items() if k.startswith("ZVT_BUS_")})
    wait = ReplicaWait.of(settings)
    if config["ZVT_REDIS_CLUSTER"] == "true":
        assert wait is not None and wait.replicas >= 1
        assert wait.timeout_ms == int(config["ZVT_BUS_WAIT_TIMEOUT_MS"])
    else:
        assert wait is None


def test_selectors_when_rendered_match_the_pods_they_are_for(rendered: Rendered) -> None:
    pods = [d["spec"]["template"]["metadata"]["labels"] for d in rendered.of_kind("Deployment")]

    def matches(selector: dict[str, str]) -> int:
        return sum(all(labels.get(k) == v for k, v in selector.items()) for labels in pods)

    for kind in ("Service", "PodDisruptionBudget"):
        for o in rendered.of_kind(kind):
            sel = o["spec"]["selector"]
            assert matches(sel.get("matchLabels", sel)) == 1, f"{kind}/{o['metadata']['name']}"
    services = rendered.of_kind("Service")
    for sm in rendered.of_kind("ServiceMonitor"):
        want = sm["spec"]["selector"]["matchLabels"]
        selected = [s for s in services if all(s["metadata"]["labels"].get(k) == v for k, v in want.items())]
        assert len(selected) == len(services)
        assert all(any(p["name"] == "http" for p in s["spec"]["ports"]) for s in selected)
        assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"


def test_helm_test_pod_when_rendered_places_an_order_through_the_gateway(rendered: Rendered) -> None:
    pods = rendered.of_kind("Pod")
    if rendered.values == "k8s/values-loadtest.yaml":  # tests.enabled: false
        assert not pods
        return
    (pod,) = pods
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    (c,) = pod["spec"]["containers"]
    assert c["args"][0] == "services.client.smoke"
    env = {e["name"]: e for e in c["env"]}
    gateway = rendered.named("Service", "zvt-zvt-fleet-gateway")
    api = next(p["port"] for p in gateway["spec"]["ports"] if p["name"] == "api")
    assert env["ZVT_GATEWAY_URL"]["value"] == f"http://zvt-zvt-fleet-gateway:{api}"
    assert env["ZVT_API_KEY"]["valueFrom"]["secretKeyRef"]["name"] == "zvt-gateway"


def test_dashboard_when_rendered_is_json_with_queries(rendered: Rendered) -> None:
    maps = [c for c in rendered.of_kind("ConfigMap") if c["metadata"]["name"].endswith("-dashboard")]
    if rendered.values == "minimal-values.yaml":
        assert not maps
        return
    (cm,) = maps
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    dashboard = json.loads(cm["data"]["zvt-fleet.json"])
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert dashboard["uid"] == "zvt-fleet" and len(exprs) >= 15


# --- network and connections --------------------------------------------------------------------

EGRESS_DESTINATIONS = {"dns", "redis", "postgres", "hatchet", "otel", "venues", "webhooks"}


def _egress_policies(rendered: Rendered) -> dict[str, dict[str, Any]]:
    return {
        p["metadata"]["labels"]["zvt.io/egress"]: p
        for p in rendered.of_kind("NetworkPolicy") if "zvt.io/egress" in p["metadata"]["labels"]
    }


def _selects(policy: dict[str, Any], pod_labels: dict[str, str]) -> bool:
    selector = policy["spec"]["podSelector"]
    if any(pod_labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        assert expr["operator"] == "In", expr
        if pod_labels.get(expr["key"]) not in expr["values"]:
            return False
    return True


def test_network_policies_when_rendered_allow_egress_only_to_named_destinations(rendered: Rendered) -> None:
    policies = rendered.of_kind("NetworkPolicy")
    if rendered.values == "minimal-values.yaml":  # networkPolicy.enabled: false
        assert not policies
        return
    for policy in policies:
        for rule in policy["spec"].get("egress", []):
            assert rule.get("to"), f"{policy['metadata']['name']}: an egress rule without `to` allows every destination"
            assert rule.get("ports"), f"{policy['metadata']['name']}: an egress rule without ports allows every port"
            for peer in rule["to"]:
                block = peer.get("ipBlock")
                if block and block["cidr"] in ("0.0.0.0/0", "::/0"):
                    # the internet, never the cluster's own networks or the cloud metadata endpoint
                    assert {"10.0.0.0/8", "169.254.0.0/16"} <= set(block.get("except", [])), policy["metadata"]["name"]
    egress = _egress_policies(rendered)
    pods = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d["spec"]["template"]["metadata"]["labels"]
            for d in rendered.of_kind("Deployment")}
    # a destination only the disabled services need (webhooks: notifications) gets no policy
    expected = EGRESS_DESTINATIONS - (set() if "notifications" in pods else {"webhooks"})
    assert set(egress) == expected, sorted(egress)
    reach = {name: {dest for dest, p in egress.items() if _selects(p, labels)} for name, labels in pods.items()}
    for name, dests in reach.items():
        assert {"dns", "redis", "otel"} <= dests, f"{name}: {dests}"
        assert ("postgres" in dests) == (name in {"recorder", "gateway"}), f"{name}: {dests}"
        assert ("hatchet" in dests) == (name in {"gateway", "workflows"}), f"{name}: {dests}"
        assert ("venues" in dests) == (name in {"routing", "workflows"}), f"{name}: {dests}"
        assert ("webhooks" in dests) == (name == "notifications"), f"{name}: {dests}"
    ports = {dest: {p["port"] for r in pol["spec"]["egress"] for p in r["ports"]} for dest, pol in egress.items()}
    assert ports["dns"] == {53} and ports["hatchet"] == {7070} and ports["otel"] == {4318}
    assert ports["venues"] == ports.get("webhooks", {443}) == {443}


def test_metrics_when_rendered_are_scraped_on_the_probe_port_not_the_api(rendered: Rendered) -> None:
    for sm in rendered.of_kind("ServiceMonitor"):
        assert [(e["port"], e["path"]) for e in sm["spec"]["endpoints"]] == [("http", "/metrics")]
    gateway = rendered.named("Deployment", "zvt-zvt-fleet-gateway")
    (c,) = gateway["spec"]["template"]["spec"]["containers"]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    env = {e["name"]: e.get("value") for e in c["env"]}
    assert ports["http"] != ports["api"] and env["ZVT_HTTP_PORT"] == str(ports["http"])


def test_gateway_when_rendered_reads_the_event_store_as_the_reader_role(rendered: Rendered) -> None:
    def dsn_ref(service: str, variable: str) -> dict[str, str]:
        (c,) = rendered.named("Deployment", f"zvt-zvt-fleet-{service}")["spec"]["template"]["spec"]["containers"]
        (ref,) = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == variable]
        return dict(ref)

    assert dsn_ref("gateway", "ZVT_GATEWAY_POSTGRES_DSN") == {"name": "zvt-postgres", "key": "reader-dsn"}
    assert dsn_ref("recorder", "ZVT_RECORDER_POSTGRES_DSN") == {"name": "zvt-postgres", "key": "dsn"}
    config = rendered.named("ConfigMap", "zvt-zvt-fleet-config")["data"]
    assert config["ZVT_RECORDER_READER_ROLE"] == "zvt_reader"


def test_tls_when_configured_mounts_each_ca_where_its_setting_points(rendered: Rendered) -> None:
    config = rendered.named("ConfigMap", "zvt-zvt-fleet-config")["data"]
    files = {k: v for k, v in config.items() if k.endswith(("_FILE", "_SSLROOTCERT"))}
    if rendered.values != "full-values.yaml":
        assert not files and config["ZVT_REDIS_TLS_CHECK_HOSTNAME"] == "true"
        return
    assert config["ZVT_REDIS_URL"].startswith("rediss://") and config["ZVT_POSTGRES_SSLMODE"] == "verify-full"
    assert set(files) == {"ZVT_REDIS_TLS_CA_FILE", "ZVT_REDIS_TLS_CERT_FILE", "ZVT_REDIS_TLS_KEY_FILE",
                          "ZVT_POSTGRES_SSLROOTCERT"}
    sources = {"redis-ca": ("secret", "zvt-redis-ca"), "redis-client": ("secret", "zvt-redis-client"),
               "postgres-ca": ("configMap", "zvt-postgres-ca")}
    for where, spec in pod_specs(rendered):
        if where.startswith("Pod/"):
            continue  # the helm test talks HTTP only
        volumes = {v["name"]: v for v in spec["volumes"]}
        for name, (kind, source) in sources.items():
            assert volumes[name][kind].get("secretName", volumes[name][kind].get("name")) == source, where
        (c,) = spec["containers"]
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        for variable, path in files.items():
            folder, key = path.rsplit("/", 1)
            mount = mounts[folder]
            assert mount["readOnly"] is True, f"{where}: {variable}"
            items = volumes[mount["name"]].get("secret", volumes[mount["name"]].get("configMap", {})).get("items")
            assert items is None or {"key": key, "path": key} in items, f"{where}: {variable} {path}"
        env = {e["name"]: e for e in c["env"]}
        assert env["ZVT_REDIS_PASSWORD"]["valueFrom"]["secretKeyRef"] == {"name": "zvt-redis", "key": "password"}


# --- the chart refuses what would break ---------------------------------------------------------


@pytest.mark.parametrize(("flags", "message"), [
    (["--set", "services.risk.terminationGracePeriodSeconds=10"],
     "services.risk: terminationGracePeriodSeconds (10) must exceed drainTimeoutSeconds (20)"),
    (["--set", "bus.shards=4"], "autoscaling.maxReplicas (16) must not exceed bus.shards (4)"),
    (["--set", "services.notifications.enabled=true"], "set env.ZVT_NOTIFICATIONS_WEBHOOK_URLS"),
    (["--set", "image.tag=latest"], "at '/image/tag': 'not' failed"),
    (["--set", "services.risk.secretEnv.ZVT_X=nope"], '"nope" is not an entry of secrets'),
    (["--set", "services.order.autoscaling.trigger=queue"], "at '/services/order/autoscaling/trigger'"),
    (["--set", "services.risk.replicaz=3"], "additional properties 'replicaz' not allowed"),
    (["--set", "bus.waitReplicas=-1"], "at '/bus/waitReplicas'"),
    (["--set", "bus.waitTimeoutMs=0"], "at '/bus/waitTimeoutMs'"),
    (["--set", "networkPolicy.egress.redis.to=null"], "at '/networkPolicy/egress/redis': missing property 'to'"),
    (["--set-json", "networkPolicy.egress.redis.to=[]"], "at '/networkPolicy/egress/redis/to': minItems: got 0"),
    (["--set-json", 'networkPolicy.egress.kafka={"enabled": true, "to": [], "ports": [{"port": 9092}]}'],
     "at '/networkPolicy/egress/kafka/to': minItems: got 0"),
    (["--set", "redis.tls.ca.secret=ca", "--set", "redis.tls.ca.configMap=ca"],
     "redis.tls.ca: name either secret or configMap, not both"),
    (["--set", "redis.tls.ca.secret=ca"], "redis.tls: a CA or client certificate needs a rediss:// redis.url"),
    (["--set", "postgres.sslmode=verify"], "at '/postgres/sslmode'"),
])
def test_template_when_values_are_wrong_fails_naming_the_problem(helm: Path, flags: list[str], message: str) -> None:
    proc = render(helm, "default", *flags)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
