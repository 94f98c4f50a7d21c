"""Logs, metrics and traces, set up once per process.

- structlog writes JSON lines carrying ``service``, ``trace_id``, ``span_id`` and the
  ``correlation_id`` / ``event_id`` of the event being handled.
- Secrets are never printed: every log event (its message, fields and exception text), every
  stdlib ``logging`` record (libraries: psycopg, hatchet, asyncio, uvicorn) and the traceback
  of an uncaught exception pass through ``services.core.redact.redact`` first.
- Prometheus metrics of the bus live here so every service exports the same names.
- OpenTelemetry: the producer puts ``traceparent`` in the envelope; a consumer continues the
  trace with one CONSUMER span per event. With no exporter configured tracing stays off and
  costs nothing; derived events then inherit their cause's ``traceparent`` unchanged.
"""

from __future__ import annotations

import logging
import sys
import threading
import traceback
from collections.abc import Iterator, MutableMapping
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from types import TracebackType
from typing import Any

import structlog
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.trace import Link, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter, Gauge, Histogram

from services.core.events import Event
from services.core.redact import MASK, SECRET_KEY, redact
from services.core.settings import CoreSettings

__all__ = [
    "BUS_BATCH_SECONDS",
    "BUS_BATCH_SIZE",
    "BUS_DEAD_LETTERED",
    "BUS_DEADLETTER_ENTRIES",
    "BUS_DEADLETTER_MAX_ENTRIES",
    "BUS_GROUP_OLDEST_UNACKED_AGE",
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
    "redact_event",
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
BUS_PAUSED = Gauge(
    "zvt_bus_consumer_paused",
    "1 while the group's consumer in this process holds back because a handler's dependency is down",
    ["group"],
)
BUS_LAG = Gauge("zvt_bus_lag", "Entries not yet delivered to the group", ["stream", "group", "shard"])
BUS_PENDING = Gauge("zvt_bus_pending", "Entries delivered to the group and not yet acknowledged", ["stream", "group", "shard"])
# Measured by the trim pass (one process of the fleet at a time, for every group on every
# stream, including groups whose own consumers are stopped or frozen); the other processes
# export none of these series.
BUS_GROUP_OLDEST_UNACKED_AGE = Gauge(
    "zvt_bus_group_oldest_unacked_age_seconds",
    "Age of the oldest entry the group has not acknowledged (pending or not yet delivered), over the "
    "stream's shards; 0 when it has everything. Trimming waits for it.",
    ["stream", "group"],
)
BUS_DEADLETTER_ENTRIES = Gauge(
    "zvt_bus_deadletter_entries", "Entries in a shard's dead-letter stream now", ["shard"]
)
BUS_DEADLETTER_MAX_ENTRIES = Gauge(
    "zvt_bus_deadletter_max_entries", "Bound of each dead-letter stream (ZVT_BUS_DEADLETTER_MAXLEN)"
)


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


_PLAIN = (int, float, bool, type(None))


def _scrub(key: str, value: Any) -> Any:
    if isinstance(value, str):
        return MASK if value and SECRET_KEY.match(key) else redact(value)
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, dict):
        return {k: _scrub(str(k), v) for k, v in value.items()}
    if type(value) in (list, tuple):
        return type(value)(_scrub("", v) for v in value)
    # Anything else is rendered by its repr (an exception, a set, a settings model).
    shown = repr(value)
    masked = redact(shown)
    return value if masked == shown else masked


def redact_event(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """structlog processor: mask credentials in every field of the event (message and
    exception text included), and the whole value of a field named like a secret."""
    for key, value in event_dict.items():
        event_dict[key] = _scrub(key, value)
    return event_dict


class _RedactingRecord(logging.LogRecord):
    """A stdlib log record whose message and exception text are redacted once, when made,
    so that every handler and formatter (ours, uvicorn's, a library's) shows them masked."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        try:
            message = self.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return
        masked = redact(message)
        if masked != message:
            self.msg, self.args = masked, None
        if self.exc_info and self.exc_info[0] is not None:
            self.exc_text = redact(logging.Formatter().formatException(self.exc_info))
        if self.stack_info:
            self.stack_info = redact(self.stack_info)


def _excepthook(exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None) -> None:
    sys.stderr.write(redact("".join(traceback.format_exception(exc_type, exc, tb))))
    sys.stderr.flush()


def _thread_excepthook(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit:
        return
    name = args.thread.name if args.thread is not None else "?"
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    sys.stderr.write(redact(f"Exception in thread {name}:\n{text}"))
    sys.stderr.flush()


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
            redact_event,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(level),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
        cache_logger_on_first_use=True,
    )
    structlog.contextvars.bind_contextvars(service=settings.service)
    logging.basicConfig(level=max(level, logging.WARNING), stream=sys.stderr, format="%(message)s")
    # Only over the defaults: a test runner's own hooks, or another record factory, stay.
    if logging.getLogRecordFactory() is logging.LogRecord:
        logging.setLogRecordFactory(_RedactingRecord)
    if sys.excepthook is sys.__excepthook__:
        sys.excepthook = _excepthook
    if threading.excepthook is threading.__excepthook__:
        threading.excepthook = _thread_excepthook


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
