"""Logs, metrics and traces, set up once per process.

- structlog writes JSON lines carrying ``service``, ``trace_id``, ``span_id`` and the
  ``correlation_id`` / ``event_id`` of the event being handled.
- Prometheus metrics of the bus live here so every service exports the same names.
- OpenTelemetry: the producer puts ``traceparent`` in the envelope; a consumer continues the
  trace with one CONSUMER span per event. With no exporter configured tracing stays off and
  costs nothing; derived events then inherit their cause's ``traceparent`` unchanged.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter, Gauge, Histogram

from services.core.events import Event
from services.core.settings import CoreSettings

__all__ = [
    "BUS_BATCH_SECONDS",
    "BUS_BATCH_SIZE",
    "BUS_DEAD_LETTERED",
    "BUS_DELIVERY_LATENCY",
    "BUS_LAG",
    "BUS_MESSAGES",
    "BUS_PENDING",
    "BUS_PUBLISHED",
    "BUS_STATE_CONFLICTS",
    "BUS_RECLAIMED",
    "batch_span",
    "consumer_span",
    "current_event",
    "current_trace_context",
    "get_logger",
    "setup_logging",
    "setup_tracing",
    "tracing",
]

# ---------------------------------------------------------------------------------------------
# Metrics (no ids in labels: stream is the event type, never a key with an order id)

BUS_MESSAGES = Counter(
    "zvt_bus_messages", "Entries processed, by outcome", ["stream", "group", "outcome"]
)
BUS_BATCH_SECONDS = Histogram(
    "zvt_bus_batch_processing_seconds",
    "Time to decode, handle and commit one batch read from one shard",
    ["group"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5),
)
BUS_BATCH_SIZE = Histogram(
    "zvt_bus_batch_size", "Entries per processed batch", ["group"], buckets=(1, 4, 16, 64, 256, 1024, 4096)
)
BUS_DELIVERY_LATENCY = Histogram(
    "zvt_bus_delivery_latency_seconds",
    "Publish-to-handled time of the oldest entry of each batch",
    ["group"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5, 30),
)
BUS_DEAD_LETTERED = Counter(
    "zvt_bus_dead_lettered", "Entries moved to the dead-letter stream", ["stream", "group", "reason"]
)
BUS_RECLAIMED = Counter("zvt_bus_reclaimed", "Pending entries claimed from idle consumers", ["stream", "group"])
BUS_STATE_CONFLICTS = Counter(
    "zvt_bus_state_conflicts", "Shard batches handled again because a workflow task changed their state meanwhile", ["group"]
)
BUS_PUBLISHED = Counter("zvt_bus_published", "Events published", ["stream"])
BUS_LAG = Gauge("zvt_bus_lag", "Entries not yet delivered to the group", ["stream", "group", "shard"])
BUS_PENDING = Gauge("zvt_bus_pending", "Entries delivered to the group and not yet acknowledged", ["stream", "group", "shard"])


# ---------------------------------------------------------------------------------------------
# Logging

current_event: ContextVar[Event[Any] | None] = ContextVar("zvt_current_event", default=None)


def _add_context(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    span = trace.get_current_span().get_span_context()
    if span.is_valid:
        event_dict.setdefault("trace_id", f"{span.trace_id:032x}")
        event_dict.setdefault("span_id", f"{span.span_id:016x}")
    event = current_event.get()
    if event is not None:
        event_dict.setdefault("correlation_id", event.correlation_id)
        event_dict.setdefault("event_id", event.event_id)
        if "trace_id" not in event_dict and event.traceparent:
            event_dict["trace_id"] = event.traceparent[3:35]
    return event_dict


def setup_logging(settings: CoreSettings) -> None:
    level = logging.getLevelNamesMapping()[settings.log_level]
    renderer: Any = (
        structlog.processors.JSONRenderer() if settings.log_format == "json" else structlog.dev.ConsoleRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _add_context,
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=settings.service)
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(message)s")


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)


# ---------------------------------------------------------------------------------------------
# Tracing


class _Tracing:
    """Whether spans are made; flipped on by ``setup_tracing`` (or a test's provider)."""

    enabled = False
    tracer: trace.Tracer = trace.get_tracer("zvt")


tracing = _Tracing()
_propagator = TraceContextTextMapPropagator()


def setup_tracing(settings: CoreSettings, provider: Any | None = None) -> None:
    """Export spans over OTLP when ``ZVT_OTEL_ENDPOINT`` is set, or to ``provider`` if given."""
    if provider is None:
        if not settings.otel_endpoint:
            return
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

        provider = TracerProvider(
            resource=Resource.create({"service.name": settings.service}),
            sampler=ParentBased(TraceIdRatioBased(settings.otel_sample_ratio)),
        )
        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=settings.otel_endpoint)))
        trace.set_tracer_provider(provider)
    tracing.tracer = provider.get_tracer("zvt")
    tracing.enabled = True


def current_trace_context() -> tuple[str | None, str | None]:
    """``(traceparent, tracestate)`` of the current span, for a new envelope."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get("traceparent"), carrier.get("tracestate")


def consumer_span(event: Event[Any], group: str) -> AbstractContextManager[None]:
    """Continue the event's trace around its handler: a CONSUMER span whose parent is the
    producer's span, so one order's trace runs through every stage. Without tracing it only
    names the event for the logs (a plain object: this runs once per event)."""
    if not tracing.enabled:
        return _EventContext(event)
    return _traced(event, group)


class _EventContext:
    __slots__ = ("event", "token")

    def __init__(self, event: Event[Any]) -> None:
        self.event = event

    def __enter__(self) -> None:
        self.token = current_event.set(self.event)

    def __exit__(self, *_: object) -> None:
        current_event.reset(self.token)


@contextmanager
def _traced(event: Event[Any], group: str) -> Iterator[None]:
    token = current_event.set(event)
    try:
        carrier = {"traceparent": event.traceparent} if event.traceparent else {}
        if event.tracestate:
            carrier["tracestate"] = event.tracestate
        parent = _propagator.extract(carrier)
        with tracing.tracer.start_as_current_span(
            f"{event.event_type} process",
            context=parent,
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "redis",
                "messaging.destination.name": str(event.event_type),
                "messaging.consumer.group.name": group,
                "messaging.message.id": event.event_id,
                "zvt.correlation_id": event.correlation_id,
            },
        ):
            yield
    finally:
        current_event.reset(token)


@contextmanager
def batch_span(name: str, events: list[Event[Any]], **attributes: Any) -> Iterator[None]:
    """One span for a batch handler, linked to each event's producer span."""
    if not tracing.enabled:
        yield
        return
    links = []
    for event in events:
        if event.traceparent:
            ctx = trace.get_current_span(_propagator.extract({"traceparent": event.traceparent})).get_span_context()
            links.append(Link(ctx))
    token = otel_context.attach(otel_context.Context())
    try:
        with tracing.tracer.start_as_current_span(name, kind=SpanKind.CONSUMER, links=links, attributes=attributes):
            yield
    finally:
        otel_context.detach(token)
