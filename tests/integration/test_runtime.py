"""The service runtime in-process: probes, metrics, trace propagation through the bus."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from prometheus_client import REGISTRY
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

from services.core import telemetry
from services.core.bus import Bus, Commit, Consumer
from services.core.codec import decode_any
from services.core.events import Event, EventType
from services.core.redisconn import AnyRedis
from services.core.runtime import Service
from services.core.settings import BusSettings
from tests.integration.conftest import Target, eventually, handled_counts, order
from tests.integration.echo_service import build
from tests.integration.echo_service import handle as echo


async def test_service_when_running_answers_probes_and_exports_bus_metrics(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    settings = bus_settings()
    service = Service("echo", core=target.core(http_port=0, log_level="WARNING"), bus=settings)
    build(service)
    running = asyncio.create_task(service.run())
    try:
        await eventually(lambda: bool(service.consumers and service.consumers[0].healthy), timeout=20)
        base = f"http://127.0.0.1:{service.http_port}"
        async with httpx.AsyncClient(base_url=base) as http:
            assert (await http.get("/healthz")).json()["status"] == "ok"
            ready = await http.get("/readyz")
            assert ready.status_code == 200 and ready.json()["checks"] == {"running": True, "redis": True, "consumers": True}

            bus = Bus(redis, settings)
            await bus.publish_many([order(i) for i in range(20)])

            async def handled() -> bool:
                return len(await handled_counts(redis, bus)) == 20

            await eventually(handled)
            metrics = (await http.get("/metrics")).text
            assert 'zvt_bus_messages_total{group="echo",outcome="ok",stream="order.requested"}' in metrics
            assert "zvt_bus_batch_processing_seconds_bucket" in metrics
            assert 'zvt_bus_lag{group="echo",shard="0",stream="order.requested"}' in metrics
    finally:
        service.stop()
        assert await asyncio.wait_for(running, 15) == 0



@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    telemetry.setup_tracing(target_core_settings(), provider=provider)
    yield exporter
    telemetry.tracing.enabled = False


def target_core_settings() -> Any:
    from services.core.settings import CoreSettings

    return CoreSettings()


async def test_trace_when_event_flows_through_a_stage_continues_under_one_trace_id(
    spans: InMemorySpanExporter, redis: AnyRedis, bus: Bus
) -> None:
    seen_logs: list[dict[str, Any]] = []

    async def traced_echo(event: Event[Any], commit: Commit) -> None:
        seen_logs.append(telemetry._add_context(None, "info", {}))
        await echo(event, commit)

    tracer = telemetry.tracing.tracer
    with tracer.start_as_current_span("POST /v1/orders", kind=SpanKind.SERVER) as gateway_span:
        source = order(1)
        await bus.publish(source)
    gateway = gateway_span.get_span_context()

    consumer = Consumer(bus, "echo", {EventType.ORDER_REQUESTED: traced_echo})
    await consumer.start()
    try:
        async def emitted() -> bool:
            return bool(await redis.xlen(bus.keys.stream(bus.keys.shard_of(source.portfolio_id), EventType.ORDER_VALIDATED)))

        await eventually(emitted)
    finally:
        consumer.stop()
        await consumer.wait(10)

    stream = bus.keys.stream(bus.keys.shard_of(source.portfolio_id), EventType.ORDER_REQUESTED)
    published = decode_any((await redis.xrange(stream))[0][1][b"d"])
    assert published.traceparent.startswith(f"00-{gateway.trace_id:032x}-{gateway.span_id:016x}-")

    consumer_spans = [s for s in spans.get_finished_spans() if s.kind is SpanKind.CONSUMER]
    assert len(consumer_spans) == 1
    span = consumer_spans[0]
    assert span.context.trace_id == gateway.trace_id
    assert span.parent is not None and span.parent.span_id == gateway.span_id
    assert span.attributes["messaging.consumer.group.name"] == "echo"
    assert span.attributes["zvt.correlation_id"] == source.correlation_id

    out_stream = bus.keys.stream(bus.keys.shard_of(source.portfolio_id), EventType.ORDER_VALIDATED)
    output = decode_any((await redis.xrange(out_stream))[0][1][b"d"])
    assert output.traceparent.startswith(f"00-{gateway.trace_id:032x}-{span.context.span_id:016x}-")

    assert seen_logs[0]["trace_id"] == f"{gateway.trace_id:032x}"
    assert seen_logs[0]["span_id"] == f"{span.context.span_id:016x}"
    assert seen_logs[0]["correlation_id"] == source.correlation_id


async def test_service_when_a_group_stalls_keeps_its_entries_and_exports_their_age(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    """The trim pass holds for a group that reads nothing (a frozen or dead service) and
    exports how old its oldest unacknowledged entry is, with the dead-letter streams' length."""
    settings = bus_settings(trim_interval_s=0.2, retention_s=0, must_persist_groups="echo", deadletter_maxlen=500)
    bus = Bus(redis, settings)
    await bus.ensure_group("stalled", [EventType.ORDER_REQUESTED])
    service = Service("echo", core=target.core(http_port=0, log_level="WARNING"), bus=settings)
    build(service)
    running = asyncio.create_task(service.run())
    try:
        await eventually(lambda: bool(service.consumers and service.consumers[0].healthy), timeout=20)
        await bus.publish_many([order(i) for i in range(30)])

        def sample(name: str, labels: dict[str, str]) -> float | None:
            return REGISTRY.get_sample_value(name, labels)

        async def measured() -> bool:
            age = sample("zvt_bus_group_oldest_unacked_age_seconds", {"stream": "order.requested", "group": "stalled"})
            return len(await handled_counts(redis, bus)) == 30 and age is not None and age > 0.5

        await eventually(measured, timeout=20)
        # echo has everything, stalled nothing: nothing trimmed
        assert sum([await redis.xlen(bus.keys.stream(s, EventType.ORDER_REQUESTED)) for s in range(bus.keys.shards)]) == 30
        assert sample("zvt_bus_group_oldest_unacked_age_seconds", {"stream": "order.requested", "group": "echo"}) == 0
        assert sample("zvt_bus_deadletter_entries", {"shard": "0"}) == 0
        assert sample("zvt_bus_deadletter_max_entries", {}) == 500
    finally:
        service.stop()
        assert await asyncio.wait_for(running, 15) == 0


async def test_service_when_trimming_is_on_trims_streams_behind_the_must_persist_group(
    target: Target, redis: AnyRedis, bus_settings: Callable[..., BusSettings]
) -> None:
    settings = bus_settings(trim_interval_s=0.2, retention_s=0, must_persist_groups="echo")
    service = Service("echo", core=target.core(http_port=0, log_level="WARNING"), bus=settings)
    build(service)
    running = asyncio.create_task(service.run())
    try:
        bus = Bus(redis, settings)
        await eventually(lambda: bool(service.consumers and service.consumers[0].healthy), timeout=20)
        await bus.publish_many([order(i) for i in range(30)])

        async def trimmed() -> bool:
            handled = len(await handled_counts(redis, bus)) == 30
            left = sum([await redis.xlen(bus.keys.stream(s, EventType.ORDER_REQUESTED)) for s in range(bus.keys.shards)])
            return handled and left == 0

        await eventually(trimmed, timeout=20)
        # the outputs have no must-persist group reading them yet: they are all kept
        assert sum([await redis.xlen(bus.keys.stream(s, EventType.ORDER_VALIDATED)) for s in range(bus.keys.shards)]) == 30
    finally:
        service.stop()
        assert await asyncio.wait_for(running, 15) == 0
