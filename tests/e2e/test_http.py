"""The whole fleet over its public HTTP API, on single Redis and on Redis Cluster: orders fill,
risk rejects with its codes, idempotency, cancel, HALTED and REDUCING, the audit trail in
causal order, one trace across the stages, and replay equal to live."""

from __future__ import annotations

import asyncio
import gzip
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest

from devstack.fleet import Fleet, logged
from services.client import ApiError, AsyncClient, OrderRequest
from tests.e2e.conftest import ROOT, stack_env
from tests.integration.conftest import Target, delete_namespace

D = Decimal
ADMIN = "e2e-admin-" + uuid.uuid4().hex
SERVICES = ["risk", "order", "routing", "portfolio", "recorder", "gateway"]


class Spans:
    """A minimal OTLP/HTTP traces receiver: (service, span name, trace id) of every span."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()
        spans = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802
                body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
                if self.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
                request = ExportTraceServiceRequest.FromString(body)
                with spans.lock:
                    for rs in request.resource_spans:
                        service = next(
                            (a.value.string_value for a in rs.resource.attributes if a.key == "service.name"), "?"
                        )
                        for ss in rs.scope_spans:
                            for span in ss.spans:
                                spans.spans.append((service, span.name, span.trace_id.hex()))
                self.send_response(200)
                self.send_header("Content-Type", "application/x-protobuf")
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}/v1/traces"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@dataclass
class Http:
    target: Target
    env: dict[str, str]
    fleet: Fleet
    client: AsyncClient
    spans: Spans


@pytest.fixture(params=["single", "cluster"])
async def http(request: pytest.FixtureRequest, postgres_dsn: str, tmp_path: Path) -> AsyncIterator[Http]:
    url = request.getfixturevalue("redis_single_url" if request.param == "single" else "redis_cluster_url")
    target = Target(request.param, url)
    namespace = f"h{uuid.uuid4().hex[:10]}"
    spans = Spans()
    env = stack_env(
        target, namespace, postgres_dsn,
        ZVT_GATEWAY_ADMIN_API_KEY=ADMIN, ZVT_OTEL_ENDPOINT=spans.endpoint, OTEL_BSP_SCHEDULE_DELAY="100",
    )
    fleet = Fleet(env, log_dir=tmp_path / "logs")
    procs = fleet.start(SERVICES)
    gateway = next(p for p in procs if p.name == "gateway")
    port = await asyncio.to_thread(logged, gateway, "gateway listening", "port")
    client = AsyncClient(f"http://127.0.0.1:{port}", ADMIN)
    try:
        yield Http(target, env, fleet, client, spans)
    finally:
        await client.aclose()
        fleet.stop()
        spans.close()
        from services.core.redisconn import open_redis

        redis = await open_redis(target.core())
        await delete_namespace(redis, namespace)
        await redis.aclose()


FUNDS = {"USDT": D("1000000"), "BTC": D("10"), "ETH": D("100"), "SOL": D("1000")}


def order(pid: str, symbol: str = "BTC/USDT", side: str = "buy", qty: str = "0.01", **kw: Any) -> OrderRequest:
    return OrderRequest(portfolio_id=pid, symbol=symbol, side=side, quantity=D(qty), **kw)


async def test_orders_over_http_fill_reject_cancel_and_tell_their_story(http: Http) -> None:
    c = http.client
    await c.put_portfolio("pf-1", balances=FUNDS)
    await c.put_portfolio(
        "pf-lim", balances={"USDT": D("5000")},
        limits={"max_notional_per_order": "10000", "max_position_per_symbol": "1", "price_band": "0.05",
                "max_orders_per_window": 1000, "window_seconds": 1},
    )

    # market and limit orders fill
    market = await c.place_order(order("pf-1"), wait=20)
    limit = await c.place_order(order("pf-1", "ETH/USDT", "sell", "0.5", order_type="limit", price=D("2950")), wait=20)
    assert (market.status, limit.status) == ("filled", "filled")
    assert market.filled_quantity == D("0.01") and market.avg_fill_price and market.commission and market.fills
    positions = {p["symbol"]: p for p in await c.positions("pf-1")}
    assert D(positions["BTC/USDT"]["quantity"]) == D("0.01") and D(positions["ETH/USDT"]["quantity"]) == D("-0.5")

    # every risk rule rejects with its code
    cases = {
        "UNKNOWN_SYMBOL": order("pf-lim", "DOGE/USDT", qty="1"),
        "MAX_NOTIONAL": order("pf-lim", qty="0.5"),
        "PRICE_BAND": order("pf-lim", order_type="limit", price=D("70000")),
        "PRECISION": order("pf-lim", qty="0.000015"),
        "INVALID_QUANTITY": order("pf-lim", "SOL/USDT", qty="0.0001"),
        "INSUFFICIENT_BALANCE": order("pf-lim", qty="0.1"),
        "MAX_POSITION": order("pf-lim", "SOL/USDT", qty="2"),
        "MIN_NOTIONAL": order("pf-lim", "SOL/USDT", qty="0.01"),
    }
    results = await asyncio.gather(*(c.place_order(r, wait=20) for r in cases.values()))
    assert {code: r.reject_code for code, r in zip(cases, results, strict=True)} == {k: k for k in cases}
    assert {r.status for r in results} == {"rejected"}

    # the same client order id returns the same order; another body with it is a conflict
    again = await c.place_order(order("pf-1", client_order_id=market.client_order_id))
    assert (again.order_id, again.http_status) == (market.order_id, 200)
    with pytest.raises(ApiError) as conflict:
        await c.place_order(order("pf-1", qty="0.02", client_order_id=market.client_order_id))
    assert conflict.value.status == 409

    # a resting limit order is canceled; a finished one cannot be
    resting = await c.place_order(order("pf-1", order_type="limit", price=D("59000")), wait=1)
    assert resting.status == "routed"
    assert (await c.cancel_order(resting.order_id)).http_status == 202
    for _ in range(200):
        if (await c.get_order(resting.order_id)).status == "canceled":
            break
        await asyncio.sleep(0.05)
    assert (await c.get_order(resting.order_id)).status == "canceled"
    with pytest.raises(ApiError) as terminal:
        await c.cancel_order(market.order_id)
    assert terminal.value.status == 409

    # a resting limit fills later, in parts, as the market comes to its price (the history
    # replayed below holds those fills)
    later = await c.place_order(order("pf-1", qty="1.5", order_type="limit", price=D("59000")), wait=1)
    assert later.status == "routed" and later.filled_quantity == 0
    from services.core.keys import Keys
    from services.core.marks import Marks
    from services.core.redisconn import open_redis

    redis = await open_redis(http.target.core())
    marks = Marks(redis, Keys(http.env["ZVT_BUS_NAMESPACE"], int(http.env["ZVT_BUS_SHARDS"]))).key
    try:
        for _ in range(40):
            await redis.hset(marks, "BTC/USDT", "58900" if _ % 2 == 0 else "59500")
            await asyncio.sleep(0.6)
            if (await c.get_order(later.order_id)).status == "filled":
                break
    finally:
        await redis.hset(marks, "BTC/USDT", "60000")
        await redis.aclose()
    filled_later = await c.get_order(later.order_id)
    assert filled_later.status == "filled" and len(filled_later.fills) >= 2
    assert {f.price for f in filled_later.fills} == {D("59000")}

    # the audit trail is complete and in causal order
    trail: list[dict[str, Any]] = []
    for _ in range(200):
        trail = await c.events(market.correlation_id)
        if any(e["event"]["event_type"] == "portfolio.updated" for e in trail):
            break
        await asyncio.sleep(0.05)
    types = [e["event"]["event_type"] for e in trail]
    assert types[:3] == ["order.requested", "order.validated", "order.created"]
    assert {"exchange.routed", "order.executed", "position.updated", "portfolio.updated"} <= set(types)
    seen: set[str] = set()
    for e in trail:
        cause = e["event"]["causation_id"]
        assert cause is None or cause in seen, f"{e['event']['event_type']} before its cause"
        seen.add(e["event"]["event_id"])

    # one trace runs through gateway, risk, order, routing and portfolio
    wanted = {"gateway", "risk", "order", "routing", "portfolio"}
    by_trace: dict[str, set[str]] = {}
    for _ in range(100):
        with http.spans.lock:
            by_trace = {}
            for service, _name, trace_id in http.spans.spans:
                by_trace.setdefault(trace_id, set()).add(service)
        if any(wanted <= services for services in by_trace.values()):
            break
        await asyncio.sleep(0.1)
    assert any(wanted <= services for services in by_trace.values()), by_trace

    # replay of the event store equals live
    result = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "services.replay", "--wait", "30"],
        cwd=ROOT, env={**os.environ, **http.env}, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr


async def test_trading_state_when_halted_or_reducing_limits_new_orders(http: Http) -> None:
    c = http.client
    await c.put_portfolio("pf-s", balances=FUNDS)
    bought = await c.place_order(order("pf-s", qty="0.02"), wait=20)
    assert bought.status == "filled"

    await c.set_trading_state("pf-s", "REDUCING")
    grow = await c.place_order(order("pf-s", qty="0.01"), wait=20)
    shrink = await c.place_order(order("pf-s", side="sell", qty="0.01"), wait=20)
    assert (grow.status, grow.reject_code) == ("rejected", "REDUCE_ONLY")
    assert shrink.status == "filled"

    await c.set_trading_state("pf-s", "HALTED")
    halted = await c.place_order(order("pf-s", side="sell", qty="0.01"), wait=20)
    assert (halted.status, halted.reject_code) == ("rejected", "TRADING_HALTED")
    assert (await c.get_portfolio("pf-s"))["trading_state"] == "HALTED"

    await c.set_trading_state("pf-s", "ACTIVE")
    assert (await c.place_order(order("pf-s", qty="0.01"), wait=20)).status == "filled"


