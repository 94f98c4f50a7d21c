"""The fleet in a Kubernetes cluster, through the official ``kubernetes`` client.

``Fleet.connect`` finds the cluster as kubectl does: ``--kubeconfig``, else ``KUBECONFIG``, else
``~/.kube/config``, with ``--context``; in a pod without either, the in-cluster service account.
The namespace: ``-n``, else the context's, else the pod's own, else ``default``.

A service is a Deployment of the chart (``app.kubernetes.io/part-of=zvt-fleet``) named by its
``app.kubernetes.io/component`` label; its autoscaler is the ScaledObject or
HorizontalPodAutoscaler whose target is that Deployment, its budget the PodDisruptionBudget whose
selector is the Deployment's. Every call here uses only the verbs of the chart's ``opsRbac``
Role (templates/ops-rbac.yaml); add one there when you add one here.

The client's exceptions stop here: each becomes an ``OpsError`` with one line an operator acts
on (no cluster, no permission, unknown service, ...).
"""

from __future__ import annotations

import datetime as dt
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import urllib3
from kubernetes import client
from kubernetes import config as _config
from kubernetes import watch as _watch
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

__all__ = [
    "CHAOS_LABEL",
    "CONSUMER_GROUP_ANNOTATION",
    "KEDA_PAUSED",
    "Autoscaler",
    "Budget",
    "Fleet",
    "OpsError",
    "Service",
]

PART_OF = "app.kubernetes.io/part-of=zvt-fleet"
COMPONENT = "app.kubernetes.io/component"
CONSUMER_GROUP_ANNOTATION = "zvt.io/consumer-group"
KEDA_PAUSED = "autoscaling.keda.sh/paused"
RESTARTED_AT = "kubectl.kubernetes.io/restartedAt"  # what `kubectl rollout restart` sets
CHAOS_LABEL = ("zvt.io/chaos", "allowed")
config: Any = _config  # the client's config and watch modules are untyped
watch: Any = _watch
_SA_NAMESPACE = Path("/var/run/secrets/kubernetes.io/serviceaccount/namespace")


class OpsError(Exception):
    """A problem the operator fixes (exit 2): one line, no traceback."""


@dataclass(frozen=True)
class Autoscaler:
    kind: str  # ScaledObject | HorizontalPodAutoscaler
    name: str
    min_replicas: int | None
    max_replicas: int | None
    paused: bool


@dataclass(frozen=True)
class Budget:
    name: str
    max_unavailable: str | None
    min_available: str | None
    disruptions_allowed: int


@dataclass(frozen=True)
class Service:
    name: str
    deployment: str
    desired: int
    ready: int
    available: int
    updated: int
    consumer_group: str | None
    selector: dict[str, str]
    autoscaler: Autoscaler | None = None
    budget: Budget | None = None
    generation_seen: bool = True

    @property
    def settled(self) -> bool:
        """Every desired replica is updated, ready and available, as the controller saw the
        latest spec."""
        return self.generation_seen and self.desired == self.ready == self.available == self.updated


@dataclass
class Fleet:
    api: client.ApiClient
    namespace: str
    context: str | None = None
    _services: dict[str, Service] | None = field(default=None, repr=False)

    @classmethod
    def connect(cls, namespace: str | None = None, context: str | None = None,
                kubeconfig: str | None = None) -> Fleet:
        configuration = client.Configuration()
        path = kubeconfig or os.environ.get("KUBECONFIG")
        in_pod = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not path and context is None
        try:
            if in_pod:
                config.load_incluster_config(client_configuration=configuration)
                ns = namespace or (_SA_NAMESPACE.read_text().strip() if _SA_NAMESPACE.exists() else "default")
            else:
                files = path.split(os.pathsep)[0] if path else None
                config.load_kube_config(config_file=files, context=context, client_configuration=configuration)
                _, active = config.list_kube_config_contexts(config_file=files)
                chosen = context or active["name"]
                contexts, _ = config.list_kube_config_contexts(config_file=files)
                ctx = next((c for c in contexts if c["name"] == chosen), active)
                ns = namespace or ctx["context"].get("namespace") or "default"
        except (ConfigException, OSError) as exc:
            raise OpsError(f"no cluster: {_first_line(exc)}") from None
        configuration.retries = 0
        return cls(client.ApiClient(configuration), ns, context)

    # --- reading ---------------------------------------------------------------------------

    def services(self) -> dict[str, Service]:
        if self._services is None:
            self._services = self._read()
        return self._services

    def service(self, name: str) -> Service:
        services = self.services()
        if name not in services:
            known = ", ".join(sorted(services)) or "none"
            raise OpsError(f"unknown service {name!r} in namespace {self.namespace} (the fleet's: {known})")
        return services[name]

    def refresh(self, name: str) -> Service:
        self._services = None
        return self.service(name)

    def _read(self) -> dict[str, Service]:
        apps = client.AppsV1Api(self.api)
        deployments = self._call("list deployments", apps.list_namespaced_deployment, self.namespace,
                                 label_selector=PART_OF).items
        scalers = self._scaled_objects()
        hpas = self._call("list horizontalpodautoscalers", client.AutoscalingV2Api(self.api)
                          .list_namespaced_horizontal_pod_autoscaler, self.namespace).items
        pdbs = self._call("list poddisruptionbudgets", client.PolicyV1Api(self.api)
                          .list_namespaced_pod_disruption_budget, self.namespace).items
        out: dict[str, Service] = {}
        for d in deployments:
            name = (d.metadata.labels or {}).get(COMPONENT)
            if not name:
                continue
            selector = dict(d.spec.selector.match_labels or {})
            status = d.status
            out[name] = Service(
                name=name, deployment=d.metadata.name, desired=int(d.spec.replicas or 0),
                ready=int(status.ready_replicas or 0), available=int(status.available_replicas or 0),
                updated=int(status.updated_replicas or 0),
                consumer_group=(d.metadata.annotations or {}).get(CONSUMER_GROUP_ANNOTATION),
                selector=selector,
                autoscaler=_autoscaler_of(d.metadata.name, scalers, hpas),
                budget=_budget_of(selector, pdbs),
                generation_seen=int(status.observed_generation or 0) >= int(d.metadata.generation or 0),
            )
        return dict(sorted(out.items()))

    def _scaled_objects(self) -> list[dict[str, Any]]:
        api = client.CustomObjectsApi(self.api)
        try:
            reply: Any = api.list_namespaced_custom_object("keda.sh", "v1alpha1", self.namespace, "scaledobjects")
        except ApiException as exc:
            if exc.status == 404:  # KEDA's CRDs are not installed: no ScaledObjects
                return []
            raise self._error("list scaledobjects", exc) from None
        except urllib3.exceptions.HTTPError as exc:
            raise self._unreachable(exc) from None
        items: list[dict[str, Any]] = reply.get("items", [])
        return items

    def pods(self, service: Service, terminating: bool = False) -> list[Any]:
        """The service's pods; those already going away only with ``terminating``."""
        selector = ",".join(f"{k}={v}" for k, v in sorted(service.selector.items()))
        pods = self._call("list pods", client.CoreV1Api(self.api).list_namespaced_pod, self.namespace,
                          label_selector=selector).items
        return [p for p in pods if terminating or p.metadata.deletion_timestamp is None]

    def namespace_labels(self) -> dict[str, str]:
        ns = self._call(f"get namespace {self.namespace}", client.CoreV1Api(self.api).read_namespace, self.namespace)
        return dict(ns.metadata.labels or {})

    def events(self, timeout_s: float | None) -> Iterator[Any]:
        """The namespace's events: those already there, then a watch of new ones for
        ``timeout_s`` (None: until interrupted). The API server ends the watch then; the read
        timeout is only a guard against a server that does not."""
        core = client.CoreV1Api(self.api)
        listed = self._call("list events", core.list_namespaced_event, self.namespace)
        yield from sorted(listed.items, key=_event_time)
        limits = {} if timeout_s is None else {"timeout_seconds": max(1, round(timeout_s)),
                                                "_request_timeout": (10, timeout_s + 30)}
        stream = watch.Watch().stream(
            core.list_namespaced_event, self.namespace, resource_version=listed.metadata.resource_version, **limits,
        )
        try:
            for change in stream:
                if change["type"] in ("ADDED", "MODIFIED"):
                    yield change["object"]
        except ApiException as exc:
            raise self._error("watch events", exc) from None
        except urllib3.exceptions.HTTPError as exc:
            raise self._unreachable(exc) from None

    # --- changing ----------------------------------------------------------------------------

    def scale(self, service: Service, replicas: int) -> None:
        self._call(f"scale deployment {service.deployment}", client.AppsV1Api(self.api)
                   .patch_namespaced_deployment_scale, service.deployment, self.namespace,
                   {"spec": {"replicas": replicas}})

    def restart(self, service: Service) -> str:
        at = dt.datetime.now(dt.UTC).isoformat(timespec="seconds").replace("+00:00", "Z")
        body = {"spec": {"template": {"metadata": {"annotations": {RESTARTED_AT: at}}}}}
        self._call(f"patch deployment {service.deployment}", client.AppsV1Api(self.api)
                   .patch_namespaced_deployment, service.deployment, self.namespace, body)
        return at

    def set_paused(self, service: Service, paused: bool) -> None:
        scaler = service.autoscaler
        if scaler is None or scaler.kind != "ScaledObject":
            what = "a HorizontalPodAutoscaler, which has no pause" if scaler else "no autoscaler"
            raise OpsError(f"{service.name} has {what}: only a KEDA ScaledObject can be paused")
        body = {"metadata": {"annotations": {KEDA_PAUSED: "true" if paused else None}}}
        self._call(f"patch scaledobject {scaler.name}", client.CustomObjectsApi(self.api)
                   .patch_namespaced_custom_object, "keda.sh", "v1alpha1", self.namespace, "scaledobjects",
                   scaler.name, body)

    def evict(self, pod_name: str) -> str | None:
        """Evict one pod; None when done, else why not (the PodDisruptionBudget refused, or
        the pod is already gone)."""
        body = client.V1Eviction(metadata=client.V1ObjectMeta(name=pod_name, namespace=self.namespace))
        try:
            client.CoreV1Api(self.api).create_namespaced_pod_eviction(pod_name, self.namespace, body)
        except ApiException as exc:
            if exc.status == 429:
                return "refused: it would break the PodDisruptionBudget"
            if exc.status == 404:
                return "already gone"
            raise self._error(f"evict pod {pod_name}", exc) from None
        except urllib3.exceptions.HTTPError as exc:
            raise self._unreachable(exc) from None
        return None

    # --- errors ------------------------------------------------------------------------------

    def _call(self, what: str, fn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            raise self._error(what, exc) from None
        except urllib3.exceptions.HTTPError as exc:
            raise self._unreachable(exc) from None

    def _error(self, what: str, exc: ApiException) -> OpsError:
        if exc.status in (401, 403):
            return OpsError(f"no permission to {what} in namespace {self.namespace}: {_reason(exc)}")
        if exc.status == 404:
            return OpsError(f"cannot {what} in namespace {self.namespace}: not found")
        return OpsError(f"cannot {what} in namespace {self.namespace}: {exc.status} {_reason(exc)}")

    def _unreachable(self, exc: Exception) -> OpsError:
        return OpsError(f"no cluster: cannot reach the API server at {self.api.configuration.host} "
                        f"({_first_line(getattr(exc, 'reason', None) or exc)})")


def _autoscaler_of(deployment: str, scalers: list[dict[str, Any]], hpas: list[Any]) -> Autoscaler | None:
    for so in scalers:
        spec = so.get("spec", {})
        if spec.get("scaleTargetRef", {}).get("name") == deployment:
            annotations = so.get("metadata", {}).get("annotations") or {}
            return Autoscaler(
                "ScaledObject", so["metadata"]["name"], spec.get("minReplicaCount"), spec.get("maxReplicaCount"),
                paused=annotations.get(KEDA_PAUSED) == "true" or "autoscaling.keda.sh/paused-replicas" in annotations,
            )
    for hpa in hpas:
        if hpa.spec.scale_target_ref.name == deployment and hpa.spec.scale_target_ref.kind == "Deployment":
            return Autoscaler("HorizontalPodAutoscaler", hpa.metadata.name, hpa.spec.min_replicas,
                              hpa.spec.max_replicas, paused=False)
    return None


def _budget_of(selector: dict[str, str], pdbs: list[Any]) -> Budget | None:
    for pdb in pdbs:
        labels = pdb.spec.selector.match_labels if pdb.spec.selector else None
        if labels and dict(labels) == selector:
            def text(v: Any) -> str | None:
                return None if v is None else str(v)

            return Budget(pdb.metadata.name, text(pdb.spec.max_unavailable), text(pdb.spec.min_available),
                          int(pdb.status.disruptions_allowed or 0) if pdb.status else 0)
    return None


def _event_time(event: Any) -> dt.datetime:
    when = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
    return when if isinstance(when, dt.datetime) else dt.datetime.min.replace(tzinfo=dt.UTC)


def _reason(exc: ApiException) -> str:
    import json

    try:
        message = json.loads(exc.body or "{}").get("message")
    except ValueError:
        message = None
    return str(message or exc.reason or exc.status)


def _first_line(exc: object) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
