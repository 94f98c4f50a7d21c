"""Every metric the dashboard, the alert rules and the KEDA triggers query is one the services
really export: a local fleet (its own bus namespace and ports) runs, ``helm test``'s smoke
command places orders through it, a real Prometheus (Debian's package) scrapes every
service's /metrics, and its HTTP API is asked for each name. Every query also runs on that
Prometheus without error."""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from devstack.fleet import PIPELINE, Fleet
from services.core.redisconn import open_redis
from services.core.settings import CoreSettings
from tests.integration.conftest import delete_namespace
from tests.k8s.conftest import CHART, NAMESPACE, RELEASE, ROOT, render

ADMIN = "admin-key-of-the-k8s-metrics-test"
SERVICES = (*PIPELINE, "recorder", "notifications", "gateway")
METRIC = re.compile(r"\b(zvt_[a-z0-9_]+)\b(?!:)")
SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class _Sink(http.server.BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the http.server API
        self.rfile.read(int(self.headers.get("content-length") or 0))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *_: Any) -> None:
        pass


@dataclass
class Scraped:
    prometheus: str
    series: set[str]
    metadata: set[str]


def queries(helm: Path) -> dict[str, list[str]]:
    """Every PromQL expression the chart ships, by where it comes from."""
    proc = render(helm, "default", "--set", "hatchet.tenantId=t1")
    assert proc.returncode == 0, proc.stderr
    objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
    (rule,) = [o for o in objects if o["kind"] == "PrometheusRule"]
    dashboard = json.loads((CHART / "files" / "dashboard.json").read_text())
    return {
        "dashboard": [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])],
        "rules": [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]],
        "keda": [t["metadata"]["query"] for o in objects if o["kind"] == "ScaledObject"
                 for t in o["spec"]["triggers"] if t["type"] == "prometheus"],
    }


def metric_names(exprs: list[str]) -> set[str]:
    return {m for e in exprs for m in METRIC.findall(e)}


def unexported(names: set[str], scraped: Scraped) -> list[str]:
    """Names no scraped service exports. A name counts as exported when Prometheus holds
    series of it, or when a target declared its family (HELP/TYPE) but has had no event to
    count yet (a labelled counter such as dead letters only has series once one happens)."""
    missing = []
    for name in sorted(names):
        if name in scraped.series:
            continue
        family = next((name.removesuffix(s) for s in SUFFIXES if name.endswith(s)), name)
        if not {name, family, f"{family}_total"} & scraped.metadata:
            missing.append(name)
    return missing


@pytest.fixture(scope="module")
def scraped(redis_single_url: str, postgres_dsn: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scraped]:
    exe = shutil.which("prometheus")
    assert exe, "prometheus not found: `make deps` installs Debian's prometheus package"
    work = tmp_path_factory.mktemp("metrics")
    namespace = f"k{uuid.uuid4().hex[:10]}"
    sink = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    gateway_port = _free_port()
    env = {
        "ZVT_REDIS_URL": redis_single_url, "ZVT_REDIS_CLUSTER": "false", "ZVT_BUS_NAMESPACE": namespace,
        "ZVT_BUS_SHARDS": "4", "ZVT_BUS_BLOCK_MS": "100", "ZVT_BUS_LAG_INTERVAL_S": "0.5",
        "ZVT_BUS_TRIM_INTERVAL_S": "0", "ZVT_DRAIN_TIMEOUT_S": "5", "ZVT_LOG_LEVEL": "INFO",
        "ZVT_ROUTING_FEED_VOLATILITY": "0", "ZVT_RECORDER_POSTGRES_DSN": postgres_dsn,
        "ZVT_GATEWAY_POSTGRES_DSN": postgres_dsn, "ZVT_GATEWAY_PORT": str(gateway_port),
        "ZVT_GATEWAY_ADMIN_API_KEY": ADMIN,
        "ZVT_NOTIFICATIONS_WEBHOOK_URLS": f"http://127.0.0.1:{sink.server_address[1]}/hook",
    }
    fleet = Fleet(env, log_dir=work / "logs", start_timeout=60)
    prometheus: subprocess.Popen[bytes] | None = None
    try:
        procs = fleet.start(SERVICES)
        # helm test's command, against the local gateway: places orders that fill
        for i in range(3):
            smoke = subprocess.run(
                [sys.executable, "-m", "services.client.smoke", "--url", f"http://127.0.0.1:{gateway_port}",
                 "--api-key", ADMIN, "--portfolio", f"smoke{i}", "--timeout", "20"],
                cwd=ROOT, capture_output=True, text=True, timeout=60,
            )
            assert smoke.returncode == 0, smoke.stdout + smoke.stderr
            assert "filled" in smoke.stdout
        # scrape each process as the ServiceMonitor would, with the labels it would add
        targets = [{"targets": [f"127.0.0.1:{p.http_port}"],
                    "labels": {"namespace": NAMESPACE, "service": f"{RELEASE}-zvt-fleet-{p.name}"}} for p in procs]
        port = _free_port()
        config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                  "scrape_configs": [{"job_name": "zvt", "static_configs": targets}]}
        (work / "prometheus.yml").write_text(yaml.safe_dump(config))
        log = (work / "prometheus.log").open("wb")
        prometheus = subprocess.Popen(
            [exe, f"--config.file={work / 'prometheus.yml'}", f"--storage.tsdb.path={work / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--web.enable-lifecycle"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        series: set[str] = set()
        while time.monotonic() < deadline:
            assert prometheus.poll() is None, (work / "prometheus.log").read_text()[-3000:]
            try:
                up = httpx.get(f"{base}/api/v1/query", params={"query": "up"}, timeout=2).json()["data"]["result"]
                series = set(httpx.get(f"{base}/api/v1/label/__name__/values", timeout=2).json()["data"])
            except (httpx.HTTPError, KeyError, ValueError):
                time.sleep(0.5)
                continue
            if len(up) == len(procs) and all(r["value"][1] == "1" for r in up) and {
                "zvt_bus_lag", "zvt_http_requests_total", "zvt_notifications_deliveries_total",
            } <= series:
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"Prometheus did not scrape every service in 60 s: up={up}, series={sorted(series)[:20]}")
        time.sleep(2)  # a couple more scrapes, so rate() has two points
        series = set(httpx.get(f"{base}/api/v1/label/__name__/values", timeout=5).json()["data"])
        metadata = set(httpx.get(f"{base}/api/v1/metadata", timeout=5).json()["data"])
        yield Scraped(base, series, metadata)
    finally:
        if prometheus is not None:
            prometheus.terminate()
            prometheus.wait(30)
        fleet.stop()
        sink.shutdown()

        async def clean() -> None:
            redis = await open_redis(CoreSettings(redis_url=redis_single_url))
            await delete_namespace(redis, namespace)
            await redis.aclose()

        asyncio.run(clean())


def test_queries_when_checked_use_only_metrics_the_services_export(helm: Path, scraped: Scraped) -> None:
    by_source = queries(helm)
    for source, exprs in by_source.items():
        names = metric_names(exprs)
        assert names, f"no zvt_ metric in the {source} queries"
        missing = unexported(names, scraped)
        assert not missing, f"the {source} queries use metrics no service exports: {missing}"
    used = metric_names([e for exprs in by_source.values() for e in exprs])
    # the metrics that carry the alerts and the autoscaling have live series, not only metadata
    assert {"zvt_bus_lag", "zvt_bus_pending", "zvt_bus_messages_total", "zvt_http_requests_total",
            "zvt_http_request_duration_seconds_bucket", "zvt_bus_delivery_latency_seconds_bucket"} <= used & scraped.series


def test_check_when_a_name_is_made_up_reports_it(scraped: Scraped) -> None:
    assert unexported({"zvt_bus_lag", "zvt_bus_lagz", "zvt_orders_latency_seconds_bucket"}, scraped) == [
        "zvt_bus_lagz", "zvt_orders_latency_seconds_bucket",
    ]


def test_queries_when_run_on_prometheus_evaluate(helm: Path, scraped: Scraped) -> None:
    answered = {}
    for source, exprs in queries(helm).items():
        for expr in exprs:
            promql = expr.replace("$__rate_interval", "1m").replace("$namespace", NAMESPACE)
            reply = httpx.get(f"{scraped.prometheus}/api/v1/query", params={"query": promql}, timeout=10).json()
            assert reply["status"] == "success", f"{source}: {promql}: {reply.get('error')}"
            answered[promql] = reply["data"]["result"]
    # the lag the autoscalers read, for this release's labels, has a value per group
    lag = [r for q, r in answered.items() if q.startswith('sum(max by (stream, shard) (zvt_bus_lag{namespace="trading", service="zvt-zvt-fleet-risk"')]
    assert lag and lag[0], "the risk ScaledObject's lag query returned nothing"
