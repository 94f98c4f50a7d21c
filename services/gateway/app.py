"""The public HTTP API (ARCHITECTURE section 8): a FastAPI app over Redis hot state.

``create_app`` builds the ASGI app on a ``Gateway`` (``gateway.py``: what the routes share and
its background tasks): the exception handlers that answer problem documents, one router a
resource (``routes/``: orders, workflows, portfolios, API keys, events, probes) and the
middleware. The order submission route is lean on purpose: ``LeanOrders`` serves it straight
from ASGI, taking the raw request and decoding the body with msgspec in one pass (the OpenAPI
document still describes it, via ``openapi_extra``).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.telemetry import get_logger, tracing
from services.gateway.deadline import (
    Deadline,
    RequestDeadlines,
    deadline_exceeded,
    outside_deadline,
    redis_unavailable,
    wait_allowance,
)
from services.gateway.gateway import Gateway
from services.gateway.http import MAX_WAIT_S
from services.gateway.openapi import install_openapi
from services.gateway.problems import FieldError, Problem, field_of, from_problem, problem_of, problem_response
from services.gateway.routes import api_keys, events, orders, portfolios, probes, workflows
from services.intake import IntakeError

__all__ = ["HTTP_REQUESTS", "HTTP_SECONDS", "LeanOrders", "Observe", "create_app"]

log = get_logger("zvt.gateway")

HTTP_REQUESTS = Counter("zvt_http_requests", "HTTP requests answered", ["method", "route", "status"])
HTTP_SECONDS = Histogram(
    "zvt_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)


_propagator = TraceContextTextMapPropagator()


class Observe:
    """HTTP RED metrics (labelled by route template, never ids) and, when tracing is on, one
    SERVER span per request that the events it publishes point at."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        method = scope["method"]
        span_cm: Any = contextlib.nullcontext()
        if tracing.enabled:
            carrier = {
                k.decode("latin-1"): v.decode("latin-1")
                for k, v in scope.get("headers", ())
                if k in (b"traceparent", b"tracestate")
            }
            span_cm = tracing.tracer.start_as_current_span(
                method, context=_propagator.extract(carrier), kind=SpanKind.SERVER,
                attributes={"http.request.method": method, "url.path": scope.get("path", "")},
            )
        try:
            with span_cm as span:
                await self.app(scope, receive, send_status)
                if span is not None:
                    _finish_span(span, scope, method, status)
        finally:
            route = scope.get("route")
            template = getattr(route, "path", None) or "unmatched"
            HTTP_REQUESTS.labels(method, template, str(status)).inc()
            HTTP_SECONDS.labels(method, template).observe(time.perf_counter() - started)


class LeanOrders:
    """``POST /v1/orders`` straight from ASGI: the busiest route skips FastAPI's routing,
    dependency solving and request objects (about half the CPU of an accepted order); every
    other request goes on to the app. Same answers, metrics and server span as ``Observe``."""

    ROUTE = "/v1/orders"

    def __init__(
        self, app: ASGIApp, *,
        place: Callable[[str | None, Callable[[], Awaitable[bytes]], str | None, str | None], Awaitable[Response]],
        max_body: int,
        deadline_s: float,
        retry_after_s: int,
    ) -> None:
        self.app = app
        self.place = place
        self.max_body = max_body
        self.deadline_s = deadline_s
        self.retry_after_s = retry_after_s
        self._seconds = HTTP_SECONDS.labels("POST", self.ROUTE)
        self._counts: dict[int, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] != self.ROUTE or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        authorization: str | None = None
        declared: bytes | None = None
        carrier: dict[str, str] = {}
        for name, value in scope["headers"]:
            if name == b"authorization":
                authorization = value.decode("latin-1")
            elif name == b"content-length":
                declared = value
            elif name in (b"traceparent", b"tracestate"):
                carrier[name.decode()] = value.decode("latin-1")
        query = scope["query_string"]
        wait = _query_value(query, "wait") if query else None
        durable = _query_value(query, "durable") if query else None
        limit = self.max_body

        async def read() -> bytes:
            if declared is not None and declared.isdigit() and int(declared) > limit:
                raise Problem(413, "payload_too_large", f"the body is over {limit} bytes")
            chunks: list[bytes] = []
            size = 0
            while True:
                with outside_deadline():  # a slow upload is not the gateway's time
                    message = await receive()
                if message["type"] == "http.disconnect":
                    raise Problem(400, "client_disconnected", "the client went away")
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise Problem(413, "payload_too_large", f"the body is over {limit} bytes")
                chunks.append(chunk)
                if not message.get("more_body", False):
                    return chunks[0] if len(chunks) == 1 else b"".join(chunks)

        span_cm: Any = contextlib.nullcontext()
        if tracing.enabled:
            span_cm = tracing.tracer.start_as_current_span(
                f"POST {self.ROUTE}", context=_propagator.extract(carrier), kind=SpanKind.SERVER,
                attributes={"http.request.method": "POST", "url.path": self.ROUTE, "http.route": self.ROUTE},
            )
        with span_cm as span:
            deadline = Deadline(self.deadline_s + wait_allowance(wait, MAX_WAIT_S))
            try:
                async with deadline:
                    response = await self.place(authorization, read, wait, durable)
            except Problem as exc:
                response = from_problem(exc)
            except IntakeError as exc:
                response = from_problem(problem_of(exc))
            except RedisError:
                response = from_problem(redis_unavailable(self.ROUTE, self.retry_after_s))
            except TimeoutError:
                if not deadline.expired:
                    log.exception("order submission failed")
                    response = problem_response(500, "internal_error", "the order could not be submitted")
                else:
                    response = from_problem(deadline_exceeded(self.ROUTE, self.deadline_s, self.retry_after_s))
            except Exception:
                log.exception("order submission failed")
                response = problem_response(500, "internal_error", "the order could not be submitted")
            status = response.status_code
            if span is not None:
                span.set_attribute("http.response.status_code", status)
                if status >= 500:
                    span.set_status(Status(StatusCode.ERROR))
            await send({"type": "http.response.start", "status": status, "headers": response.raw_headers})
            await send({"type": "http.response.body", "body": response.body})
        counter = self._counts.get(status)
        if counter is None:
            counter = self._counts[status] = HTTP_REQUESTS.labels("POST", self.ROUTE, str(status))
        counter.inc()
        self._seconds.observe(time.perf_counter() - started)


def _query_value(query: bytes, name: str) -> str | None:
    for key, value in parse_qsl(query.decode("latin-1"), keep_blank_values=True):
        if key == name:
            return value
    return None


def _finish_span(span: Any, scope: Scope, method: str, status: int) -> None:
    template = getattr(scope.get("route"), "path", None)
    if template:
        span.update_name(f"{method} {template}")
        span.set_attribute("http.route", template)
    span.set_attribute("http.response.status_code", status)
    if status >= 500:
        span.set_status(Status(StatusCode.ERROR))


# ---------------------------------------------------------------------------------------------
# The app


def create_app(gw: Gateway) -> FastAPI:
    settings = gw.settings
    app = FastAPI(
        title="ZVT Fleet API",
        version="1.0.0",
        description="The public HTTP API of ZVT Fleet (v1). Decimals are strings; errors are "
        "`application/problem+json` with a machine-readable `code`. Authenticate with "
        "`Authorization: Bearer <api key>`.",
        docs_url=None,
        redoc_url=None,
        # Spans and RED metrics are ours (``Observe``, ``LeanOrders``); FastAPI's own would
        # double them and cost a provider lookup per request.
        telemetry={"tracing": False, "metrics": False, "logs": False},
    )
    install_openapi(app)

    @app.exception_handler(Problem)
    async def on_problem(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, Problem)
        return from_problem(exc)

    @app.exception_handler(IntakeError)
    async def on_intake(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, IntakeError)
        return from_problem(problem_of(exc))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return problem_response(exc.status_code, code, str(exc.detail), headers=dict(exc.headers or {}))

    @app.exception_handler(RedisError)
    async def on_redis(request: Request, exc: Exception) -> Response:
        return from_problem(redis_unavailable(request.url.path, settings.retry_after_s))

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, RequestValidationError)
        errors = [FieldError(field_of(e.get("loc", ())), str(e.get("msg", "invalid"))) for e in exc.errors()]
        detail = "; ".join(f"{e.field}: {e.message}" for e in errors) or "invalid input"
        return problem_response(422, "validation_error", detail, errors=errors)

    place_order = orders.place(gw)
    app.include_router(orders.router(gw, place_order))
    app.include_router(workflows.router(gw))
    app.include_router(portfolios.router(gw))
    app.include_router(api_keys.router(gw))
    app.include_router(events.router(gw))
    app.include_router(probes.router(gw))

    app.add_middleware(
        RequestDeadlines, seconds=settings.request_deadline_s, retry_after_s=settings.retry_after_s, max_wait_s=MAX_WAIT_S
    )
    app.add_middleware(Observe)
    app.add_middleware(
        LeanOrders, place=place_order, max_body=settings.max_body_bytes, deadline_s=settings.request_deadline_s,
        retry_after_s=settings.retry_after_s,
    )
    return app
