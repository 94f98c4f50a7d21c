"""The notifications service against real Redis and a real HTTP receiver on loopback:
signed delivery, retries, dead letters, subscription filters, and the process itself."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from decimal import Decimal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest

from services.core.bus import Bus
from services.core.codec import decode_any
from services.core.events import (
    Event,
    EventType,
    OrderExecuted,
    OrderFailed,
    RiskBreached,
    Route,
)
from services.core.redisconn import AnyRedis
from services.core.runtime import Service
from services.core.settings import BusSettings
from services.notifications import verify_signature
from services.notifications.__main__ import GROUP, build
from services.notifications.settings import NotificationsSettings
from services.trading import Liquidity, Side, TradingState
from tests.integration.conftest import ROOT, Target, eventually

SECRET = "s3cret-for-tests-only-0123456789"


@pytest.fixture(params=["single"])
def target(request: pytest.FixtureRequest) -> Target:
    """Single Redis unless a test asks for the cluster too (indirect parametrization)."""
    if request.param == "single":
        return Target("single", request.getfixturevalue("redis_single_url"))
    return Target("cluster", request.getfixturevalue("redis_cluster_url"))


# ---------------------------------------------------------------------------------------------
# A webhook receiver: stdlib HTTP server on 127.0.0.1, port 0, in a thread


@dataclass
class Received:
    path: str
    headers: dict[str, str]
    body: bytes
    at: float


@dataclass
class Receiver:
    """Records every request; answers each path from its script, then 200."""

    server: ThreadingHTTPServer
    requests: list[Received] = field(default_factory=list)
    scripts: dict[str, list[tuple[int, dict[str, str]]]] = field(default_factory=dict)
    always: dict[str, int] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def to(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def answer(self, path: str) -> tuple[int, dict[str, str]]:
        with self.lock:
            script = self.scripts.get(path)
            if script:
                return script.pop(0)
            return self.always.get(path, 200), {}


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    holder: list[Receiver] = []

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive: the notifier's pool reuses connections
        disable_nagle_algorithm = True  # headers and body go out in two writes

        def do_POST(self) -> None:  # noqa: N802 - the stdlib's naming
            rec = holder[0]
            body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
            with rec.lock:
                rec.requests.append(Received(self.path, {k.lower(): v for k, v in self.headers.items()}, body, time.monotonic()))
            status, headers = rec.answer(self.path)
            payload = b'{"ok": true}' if status < 300 else b'{"error": "scripted"}'
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    holder.append(Receiver(server))
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield holder[0]
    server.shutdown()
    server.server_close()


# ---------------------------------------------------------------------------------------------
# helpers


def fast_bus(bus_settings: Callable[..., BusSettings], **overrides: Any) -> BusSettings:
    """Short waits, and a reclaim idle time that leaves the retries room (the notifier spends
    at most 80% of it on one batch)."""
    values: dict[str, Any] = {"reclaim_idle_ms": 5000, "reclaim_interval_ms": 200}
    values.update(overrides)
    return bus_settings(**values)


def notifications(receiver: Receiver, path: str = "/hook", **overrides: Any) -> NotificationsSettings:
    values: dict[str, Any] = {
        "webhook_urls": [receiver.base + path], "webhook_secret": SECRET, "max_attempts": 3,
        "backoff_base_s": 0.02, "backoff_max_s": 0.1, "request_timeout_s": 2.0,
    }
    values.update(overrides)
    return NotificationsSettings(**values)


def executed(i: int, route: Route = Route.STREAM) -> Event[Any]:
    return Event.new(
        OrderExecuted(
            order_id=f"o{i}", client_order_id=f"c{i}", symbol="BTC/USDT", side=Side.BUY, venue="paper",
            venue_order_id=f"v{i}", fill_id=f"f{i}", quantity=Decimal("0.5"), price=Decimal("64123.45"),
            commission=Decimal("0.00005"), commission_asset="BTC", liquidity=Liquidity.TAKER,
            cumulative_quantity=Decimal("0.5"), leaves_quantity=Decimal("0"),
        ),
        portfolio_id=f"pf-{i}",
        route=route,
    )


def failed(i: int) -> Event[Any]:
    return Event.new(
        OrderFailed(order_id=f"o{i}", client_order_id=f"c{i}", reason_code="VENUE_DOWN", reason="venue down"),
        portfolio_id=f"pf-{i}",
    )


def breached(i: int) -> Event[Any]:
    return Event.new(
        RiskBreached(rule="drawdown", value=Decimal("0.21"), limit=Decimal("0.2"), action=TradingState.HALTED,
                     message="drawdown over limit"),
        portfolio_id=f"pf-{i}",
    )


@contextlib.asynccontextmanager
async def running(target: Target, bus: BusSettings, settings: NotificationsSettings) -> AsyncIterator[Service]:
    service = Service("notifications", core=target.core(http_port=0, log_level="WARNING"), bus=bus)
    build(service, settings)
    task = asyncio.create_task(service.run())
    try:
        await eventually(lambda: bool(service.consumers and service.consumers[0].healthy), timeout=20)
        yield service
    finally:
        service.stop()
        assert await asyncio.wait_for(task, 15) == 0


def assert_signed(req: Received, event: Event[Any]) -> None:
    h = req.headers
    assert h["content-type"] == "application/json"
    assert h["x-zvt-event-id"] == event.event_id
    assert h["x-zvt-event-type"] == str(event.event_type)
    assert abs(int(h["x-zvt-timestamp"]) - time.time()) < 60
    assert h["x-zvt-signature"].startswith("sha256=")
    assert verify_signature(SECRET, h["x-zvt-timestamp"], req.body, h["x-zvt-signature"], tolerance_s=300)
    assert not verify_signature("another-secret-0123456789", h["x-zvt-timestamp"], req.body, h["x-zvt-signature"])


async def drained(redis: AnyRedis, settings: BusSettings, types: list[EventType]) -> bool:
    """Whether the group has finished (acked) everything of these types."""
    return await Bus(redis, settings).backlog(GROUP, types) == 0


# ---------------------------------------------------------------------------------------------
# tests


@pytest.mark.parametrize("target", ["single", "cluster"], indirect=True)
async def test_notifications_when_order_executed_published_delivers_it_once_signed_and_equal(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], receiver: Receiver
) -> None:
    bus_cfg = fast_bus(bus_settings)
    bus = Bus(redis, bus_cfg)
    event = executed(1)
    async with running(target, bus_cfg, notifications(receiver)) as service:
        await bus.publish(event)
        await eventually(lambda: len(receiver.to("/hook")) == 1, timeout=15)
        await eventually(lambda: drained(redis, bus_cfg, [EventType.ORDER_EXECUTED]), timeout=10)
        await bus.publish(event)  # the same event again: the group has delivered it already
        await asyncio.sleep(0.5)
        async with httpx.AsyncClient() as http:
            metrics = (await http.get(f"http://127.0.0.1:{service.http_port}/metrics")).text

    [req] = receiver.to("/hook")
    assert_signed(req, event)
    assert req.headers["x-zvt-delivery-attempt"] == "1"
    decoded = decode_any(req.body)
    assert decoded == event  # the wire envelope, Decimals and all
    assert b'"price":"64123.45"' in req.body  # decimals travel as strings
    assert await bus.dead_letters() == []
    assert 'zvt_notifications_deliveries_total{endpoint="127.0.0.1:' in metrics
    assert 'outcome="delivered"' in metrics and "zvt_notifications_delivery_seconds_bucket" in metrics


async def test_notifications_when_receiver_fails_twice_with_500_delivers_on_the_third_attempt(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], receiver: Receiver
) -> None:
    receiver.scripts["/flaky"] = [(500, {}), (500, {})]
    bus_cfg = fast_bus(bus_settings)
    bus = Bus(redis, bus_cfg)
    event = executed(2)
    async with running(target, bus_cfg, notifications(receiver, "/flaky")):
        await bus.publish(event)
        await eventually(lambda: len(receiver.to("/flaky")) == 3, timeout=15)
        await eventually(lambda: drained(redis, bus_cfg, [EventType.ORDER_EXECUTED]), timeout=10)
        await asyncio.sleep(0.3)

    reqs = receiver.to("/flaky")
    assert len(reqs) == 3
    assert [r.headers["x-zvt-delivery-attempt"] for r in reqs] == ["1", "2", "3"]
    for req in reqs:
        assert_signed(req, event)
        assert req.body == reqs[0].body
    assert reqs[1].at - reqs[0].at >= 0.01  # backed off (half the 20 ms base at least)
    assert await bus.dead_letters() == []


async def test_notifications_when_receiver_always_fails_dead_letters_the_event_with_the_reason_and_acks_it(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], receiver: Receiver
) -> None:
    receiver.always["/down"] = 500
    bus_cfg = fast_bus(bus_settings)
    bus = Bus(redis, bus_cfg)
    event = executed(3)
    async with running(target, bus_cfg, notifications(receiver, "/down")):
        await bus.publish(event)

        async def dead() -> bool:
            return len(await bus.dead_letters()) == 1

        await eventually(dead, timeout=15)
        await eventually(lambda: drained(redis, bus_cfg, [EventType.ORDER_EXECUTED]), timeout=10)
        await asyncio.sleep(0.3)

    assert len(receiver.to("/down")) == 3  # max_attempts, then no more
    [letter] = await bus.dead_letters()
    assert letter.group == GROUP and letter.reason == "rejected_by_handler"
    assert f"{receiver.base}/down" in letter.error
    assert "HTTP 500" in letter.error and "3 attempts" in letter.error
    assert decode_any(letter.data) == event
    assert SECRET not in letter.error


async def test_notifications_when_receiver_answers_400_dead_letters_without_retrying(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], receiver: Receiver
) -> None:
    receiver.always["/bad"] = 400
    bus_cfg = fast_bus(bus_settings)
    bus = Bus(redis, bus_cfg)
    event = executed(4)
    async with running(target, bus_cfg, notifications(receiver, "/bad")):
        await bus.publish(event)

        async def dead() -> bool:
            return len(await bus.dead_letters()) == 1

        await eventually(dead, timeout=15)
        await eventually(lambda: drained(redis, bus_cfg, [EventType.ORDER_EXECUTED]), timeout=10)
        await asyncio.sleep(0.3)

    assert len(receiver.to("/bad")) == 1
    [letter] = await bus.dead_letters()
    assert "HTTP 400 after 1 attempt" in letter.error and "not retried" in letter.error


async def test_notifications_when_type_or_route_not_subscribed_delivers_nothing_of_it(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], receiver: Receiver
) -> None:
    bus_cfg = fast_bus(bus_settings)
    bus = Bus(redis, bus_cfg)
    settings = notifications(receiver, event_types=[EventType.ORDER_EXECUTED], routes=[Route.STREAM])
    marker = executed(10)
    async with running(target, bus_cfg, settings):
        await bus.publish_many([failed(11), breached(12), executed(13, route=Route.WORKFLOW), marker])
        await eventually(lambda: len(receiver.to("/hook")) >= 1, timeout=15)
        await eventually(lambda: drained(redis, bus_cfg, [EventType.ORDER_EXECUTED]), timeout=10)
        await asyncio.sleep(0.3)
    assert [r.headers["x-zvt-event-id"] for r in receiver.to("/hook")] == [marker.event_id]


async def test_notifications_when_many_events_and_urls_delivers_each_to_each_concurrently(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], receiver: Receiver
) -> None:
    receiver.scripts["/b"] = [(503, {"Retry-After": "0"})]  # one hiccup: retried, others unaffected
    bus_cfg = fast_bus(bus_settings)
    bus = Bus(redis, bus_cfg)
    events = [executed(100 + i) for i in range(30)] + [failed(200), breached(201), executed(202, route=Route.WORKFLOW)]
    settings = notifications(receiver, webhook_urls=[receiver.base + "/a", receiver.base + "/b"])
    async with running(target, bus_cfg, settings):
        await bus.publish_many(events)
        await eventually(lambda: len(receiver.to("/a")) == len(events) and len(receiver.to("/b")) == len(events) + 1)
        await eventually(lambda: drained(redis, bus_cfg, list(settings.event_types)), timeout=10)
    want = sorted(e.event_id for e in events)
    assert sorted(r.headers["x-zvt-event-id"] for r in receiver.to("/a")) == want
    assert sorted(set(r.headers["x-zvt-event-id"] for r in receiver.to("/b"))) == want
    assert await bus.dead_letters() == []


async def test_notifications_when_retry_after_is_long_leaves_it_to_the_bus_to_redeliver_later(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], receiver: Receiver
) -> None:
    receiver.scripts["/busy"] = [(503, {"Retry-After": "60"})]
    bus_cfg = fast_bus(bus_settings, reclaim_idle_ms=1000)
    bus = Bus(redis, bus_cfg)
    event = executed(7)
    async with running(target, bus_cfg, notifications(receiver, "/busy")):
        await bus.publish(event)
        await eventually(lambda: len(receiver.to("/busy")) == 2, timeout=15)
        await eventually(lambda: drained(redis, bus_cfg, [EventType.ORDER_EXECUTED]), timeout=10)
    first, second = receiver.to("/busy")
    assert second.at - first.at >= 0.9  # not retried in-process: redelivered after the reclaim idle time
    assert second.headers["x-zvt-event-id"] == event.event_id
    assert await bus.dead_letters() == []


async def test_notifications_when_stopped_between_retries_stops_at_once_and_leaves_the_event_pending(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], receiver: Receiver
) -> None:
    receiver.always["/slow"] = 500
    bus_cfg = fast_bus(bus_settings, reclaim_idle_ms=30_000)  # a budget the backoff fits in
    bus = Bus(redis, bus_cfg)
    settings = notifications(receiver, "/slow", backoff_base_s=10.0, backoff_max_s=10.0)  # 5 to 10 s
    async with running(target, bus_cfg, settings):
        await bus.publish(executed(6))
        await eventually(lambda: len(receiver.to("/slow")) == 1, timeout=15)
        await asyncio.sleep(0.1)  # now in its backoff
        stopping = time.monotonic()
    assert time.monotonic() - stopping < 3  # the backoff was cut short
    assert len(receiver.to("/slow")) == 1
    lags = await bus.group_lag(GROUP, [EventType.ORDER_EXECUTED])
    assert sum(pending for _, pending in lags.values()) == 1  # not acked: redelivered later
    errors = [e for s in range(bus.keys.shards) for e in (await redis.hgetall(bus.keys.errors(s, GROUP))).values()]
    assert len(errors) == 1 and errors[0].decode().startswith("DeliveryDeferred: ")
    assert errors[0].decode().endswith("HTTP 500 after 1 attempt (stopping)")
    assert await bus.dead_letters() == []


# ---------------------------------------------------------------------------------------------
# the process


def _env(target: Target, settings: BusSettings, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(target.env())
    env.update({f"ZVT_BUS_{k.upper()}": str(v) for k, v in settings.model_dump().items() if k != "must_persist_groups"})
    env.update({"ZVT_HTTP_PORT": "0", "ZVT_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)})
    env.update(extra)
    return env


async def test_notifications_process_delivers_and_stops_cleanly_on_sigterm(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings], receiver: Receiver
) -> None:
    bus_cfg = fast_bus(bus_settings)
    bus = Bus(redis, bus_cfg)
    env = _env(
        target, bus_cfg, ZVT_NOTIFICATIONS_WEBHOOK_URLS=receiver.base + "/proc",
        ZVT_NOTIFICATIONS_WEBHOOK_SECRET=SECRET, ZVT_DRAIN_TIMEOUT_S="5",
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "services.notifications"], cwd=ROOT, env=env,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        event = executed(5)
        await bus.publish(event)
        await eventually(lambda: len(receiver.to("/proc")) == 1, timeout=30)
        await eventually(lambda: drained(redis, bus_cfg, [EventType.ORDER_EXECUTED]), timeout=10)
        sent = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(proc.wait, 10)
        took = time.monotonic() - sent
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    assert code == 0, stderr
    assert took < 5
    assert SECRET not in stderr
    [req] = receiver.to("/proc")
    assert_signed(req, event)
    assert decode_any(req.body) == event


def test_notifications_process_when_url_is_invalid_exits_2_with_one_line_naming_it() -> None:
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), ZVT_NOTIFICATIONS_WEBHOOK_URLS="ftp://example.invalid/hook",
        ZVT_NOTIFICATIONS_WEBHOOK_SECRET=SECRET,
    )
    proc = subprocess.run(
        [sys.executable, "-m", "services.notifications"], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=60,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("notifications: invalid setting ZVT_NOTIFICATIONS_WEBHOOK_URLS:")
    assert "ftp://example.invalid/hook" in lines[0]
    assert SECRET not in proc.stderr
