"""``python -m services.gateway`` as a real process: probes, the sync client end to end, and
schemathesis checking every operation's answers against the served OpenAPI document."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from decimal import Decimal

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from services.client import ApiError, Client, OrderRequest
from services.core.redisconn import open_redis
from services.core.settings import CoreSettings
from tests.integration.conftest import ROOT, delete_namespace

ADMIN = "admin-secret-for-the-process-01"
METRICS_PORT = [0]
"""The gateway process's probe port (ZVT_HTTP_PORT), where its /metrics is served."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def gateway(redis_single_url: str, postgres_dsn: str) -> Iterator[str]:
    namespace = f"t{uuid.uuid4().hex[:10]}"
    port = _free_port()
    METRICS_PORT[0] = _free_port()
    env = dict(os.environ)
    env.update({
        "ZVT_REDIS_URL": redis_single_url, "ZVT_BUS_NAMESPACE": namespace, "ZVT_BUS_SHARDS": "4",
        "ZVT_HTTP_PORT": str(METRICS_PORT[0]), "ZVT_LOG_LEVEL": "WARNING", "ZVT_GATEWAY_PORT": str(port),
        "ZVT_GATEWAY_ADMIN_API_KEY": ADMIN, "ZVT_GATEWAY_POSTGRES_DSN": postgres_dsn, "PYTHONPATH": str(ROOT),
    })
    proc = subprocess.Popen([sys.executable, "-m", "services.gateway"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"gateway did not start: {proc.stderr.read().decode() if proc.stderr else ''}")
            time.sleep(0.1)
        yield base
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            assert proc.wait(20) == 0, proc.stderr.read().decode() if proc.stderr else ""
        finally:
            if proc.poll() is None:
                proc.kill()

            async def clean() -> None:
                redis = await open_redis(CoreSettings(redis_url=redis_single_url))
                await delete_namespace(redis, namespace)
                await redis.aclose()

            asyncio.run(clean())


def test_process_when_started_answers_probes_and_the_sync_client(gateway: str) -> None:
    assert httpx.get(f"{gateway}/healthz").json() == {"status": "ok"}
    assert httpx.get(f"{gateway}/readyz").json() == {"ready": True, "checks": {"redis": True, "pipeline": True}}
    with Client(gateway, ADMIN) as zvt:
        zvt.put_portfolio("proc-1", balances={"USDT": "1000"})
        result = zvt.place_order(OrderRequest(portfolio_id="proc-1", symbol="BTC/USDT", side="buy",
                                              quantity=Decimal("0.01")), wait=0.2)
        # no risk stage runs here: the wait runs out and the order is still requested
        assert result.http_status == 202 and result.status == "requested" and result.quantity == Decimal("0.01")
        assert zvt.get_order(result.order_id).client_order_id == result.client_order_id
        with pytest.raises(ApiError) as info:
            Client(gateway, "wrong").get_portfolio("proc-1")
        assert (info.value.status, info.value.code) == (401, "unauthorized")
    # metrics only on the probe port, never on the public API port
    assert httpx.get(f"{gateway}/metrics").status_code == 404
    assert "/metrics" not in httpx.get(f"{gateway}/openapi.json").json()["paths"]
    assert "zvt_http_requests_total" in httpx.get(f"http://127.0.0.1:{METRICS_PORT[0]}/metrics").text


def test_openapi_when_fuzzed_answers_without_5xx_and_as_documented(gateway: str) -> None:
    schema = schemathesis.openapi.from_url(f"{gateway}/openapi.json")
    checks = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
    headers = {"Authorization": f"Bearer {ADMIN}"}
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        @given(case=operation.as_strategy())
        @settings(max_examples=8, deadline=None, derandomize=True, database=None,
                  suppress_health_check=list(HealthCheck))
        def fuzz(case: schemathesis.Case) -> None:
            case.call_and_validate(base_url=gateway, headers=headers, checks=checks, timeout=10)

        fuzz()
