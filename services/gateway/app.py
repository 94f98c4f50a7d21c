"""The public HTTP API (ARCHITECTURE section 8): a FastAPI app over Redis hot state.

``Gateway`` holds what the routes share (the bus, keys, the order desk, the waiters, the
backlog measure) and its background tasks; ``create_app`` builds the ASGI app on it. The
order submission route is lean on purpose: it takes the raw request and decodes the body
with msgspec in one pass (the OpenAPI document still describes it, via ``openapi_extra``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from decimal import Decimal
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl

import msgspec
import psycopg
from fastapi import FastAPI, Path, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from opentelemetry.trace import SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from prometheus_client import Counter, Histogram
from redis.exceptions import RedisError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.bus import Bus
from services.core.events import EventType
from services.core.hotstate import OrderRecord, StateKeys
from services.core.replication import NotReplicated
from services.core.settings import PostgresSettings, load
from services.core.telemetry import get_logger, tracing
from services.gateway.auth import ApiKeys, Principal
from services.gateway.deadline import (
    Deadline,
    RequestDeadlines,
    deadline_exceeded,
    outside_deadline,
    not_replicated,
    redis_unavailable,
    wait_allowance,
)
from services.gateway.models import (
    ID_PATTERN,
    ApiKeyBody,
    ApiKeyCreated,
    EventsPage,
    Health,
    OrderAccepted,
    OrderBody,
    OrdersPage,
    PortfolioBody,
    Readiness,
    RebalanceBody,
    Scope as KeyScope,
    StoredEventView,
    TradingStateBody,
    WorkflowRunAccepted,
    decode_body,
    openapi_components,
    order_view,
)
from services.gateway.portfolios import Portfolios
from services.gateway.limits import OrderRate, WaitCap
from services.gateway.problems import FieldError, Problem, field_of, from_problem, problem_of, problem_response
from services.gateway.settings import GatewaySettings
from services.gateway.waiters import Waiters
from services.gateway.workflows import WorkflowDesk
from services.intake import EventStoreUnavailable, IntakeError, IntakeSettings, OrderDesk, Submitted
from services.workflows.contracts import REBALANCE, RebalanceInput
from services.workflows.settings import HatchetSettings
from services.recorder.store import EventStore
from services.trading.orders import OrderStatus

__all__ = ["HTTP_REQUESTS", "HTTP_SECONDS", "Gateway", "create_app"]

log = get_logger("zvt.gateway")

HTTP_REQUESTS = Counter("zvt_http_requests", "HTTP requests answered", ["method", "route", "status"])
HTTP_SECONDS = Histogram(
    "zvt_http_request_duration_seconds",
    "Time to answer an HTTP request",
    ["method", "route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

MAX_WAIT_S = 30.0
JSON = "application/json"
_json = msgspec.json.Encoder().encode


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_json(body), status_code=status, media_type=JSON, headers=headers)


class Gateway:
    """What the API's routes share, and its background tasks."""

    def __init__(
        self, bus: Bus, settings: GatewaySettings, hatchet: HatchetSettings | None = None,
        postgres: PostgresSettings | None = None, intake: IntakeSettings | None = None,
    ) -> None:
        self.bus = bus
        self.postgres = postgres or load(PostgresSettings)
        self.redis = bus.redis
        self.settings = settings
        self.api_keys = ApiKeys(
            bus.redis, StateKeys(bus.keys), settings.key_cache_ttl_s, cache_size=settings.key_cache_size,
            bad_key_ttl_s=settings.bad_key_cache_ttl_s,
        )
        self.desk = OrderDesk(bus, intake or load(IntakeSettings), archive=self.store, outside=outside_deadline)
        self.order_rate = OrderRate(bus.redis, bus.keys, settings.key_order_rate, settings.key_order_window_s)
        self.wait_cap = WaitCap(settings.key_max_waits, settings.retry_after_s)
        self.portfolios = Portfolios(bus)
        self.workflows = WorkflowDesk(bus, hatchet or load(HatchetSettings))
        self.waiters = Waiters(
            bus.redis, bus.keys, cluster=bus.cluster, block_ms=settings.wait_block_ms, poll_s=settings.wait_poll_s,
            load=self.desk.load,
        )
        self.backlog = 0
        self.backlog_measured = False
        self._store: EventStore | None = None
        self._store_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    @property
    def overloaded(self) -> bool:
        return self.backlog > self.settings.max_backlog

    async def start(self) -> None:
        """Upsert the bootstrap admin key, take a first backlog measure, start the tasks."""
        if self.settings.admin_api_key is not None:
            await self.api_keys.upsert_bootstrap(self.settings.admin_api_key.get_secret_value())
        await self.measure_backlog()
        self._tasks = [
            asyncio.create_task(self._backlog_loop(), name="gateway-backlog"),
            asyncio.create_task(self.waiters.run(lambda: self._stopped), name="gateway-waiters"),
        ]

    async def stop(self) -> None:
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def measure_backlog(self) -> None:
        self.backlog = await self.bus.backlog(self.settings.backpressure_group, [EventType.ORDER_REQUESTED])
        self.backlog_measured = True

    async def _backlog_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.settings.backlog_interval_s)
            try:
                await self.measure_backlog()
            except RedisError as exc:
                log.warning("backlog measure failed", error=str(exc))

    async def store(self) -> EventStore:
        """The event store, opened on first use (the order path never needs it);
        ``EventStoreUnavailable`` when it cannot be reached."""
        if self._store is None:
            async with self._store_lock:
                if self._store is None:
                    try:
                        self._store = await EventStore.open(
                            self.settings.postgres_dsn, max_size=self.settings.postgres_pool_size,
                            namespace=self.bus.settings.namespace, libpq=self.postgres.connect_kwargs(),
                        )
                    except Exception as exc:
                        log.warning("event store unavailable", error=type(exc).__name__)
                        raise EventStoreUnavailable("the event store cannot be reached") from None
        return self._store

    async def ready(self) -> dict[str, bool]:
        checks: dict[str, bool] = {}
        try:
            # well inside the request deadline, so /readyz answers itself while Redis hangs
            timeout = min(1.0, self.settings.request_deadline_s / 2)
            checks["redis"] = bool(await asyncio.wait_for(self.redis.ping(), timeout))
        except (RedisError, TimeoutError, OSError):
            checks["redis"] = False
        checks["pipeline"] = self.backlog_measured and not self.overloaded
        return checks


# ---------------------------------------------------------------------------------------------
# Request plumbing


async def read_body(request: Request, limit: int) -> bytes:
    """The body, or 413 when it is over ``limit`` (declared or streamed)."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Problem(413, "payload_too_large", f"the body is over {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Problem(413, "payload_too_large", f"the body is over {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_flag(raw: str, name: str) -> bool:
    value = raw.strip().lower()
    if value in ("true", "1", "yes"):
        return True
    if value in ("false", "0", "no", ""):
        return False
    raise Problem.invalid(name, "must be true or false")


def parse_wait(raw: str | None) -> float | None:
    if raw is None:
        return None
    try:
        wait = float(raw)
    except ValueError:
        raise Problem.invalid("wait", "must be a number of seconds") from None
    if not 0 < wait <= MAX_WAIT_S:
        raise Problem.invalid("wait", f"must be above 0 and at most {MAX_WAIT_S:g} seconds")
    return wait


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
# OpenAPI


def _ref(name: str) -> dict[str, Any]:
    return {"$ref": f"#/components/schemas/{name}"}


def _ok(description: str, schema: str) -> dict[str, Any]:
    return {"description": description, "content": {JSON: {"schema": _ref(schema)}}}


_PROBLEM_TEXT = {
    401: "Missing, unknown or revoked API key",
    403: "The key lacks the scope or does not grant the portfolio (`forbidden`)",
    404: "Not found (or not visible to this key)",
    409: "Conflict",
    413: "Body too large (`payload_too_large`)",
    422: "Invalid input; `errors` names each field",
    429: "The pipeline is behind (`backpressure`), or the key is over its order rate (`rate_limited`) or its "
         "open waits (`too_many_waits`); retry after `Retry-After` seconds",
    503: "A dependency is unavailable: Redis (`redis_unavailable`, or `deadline_exceeded` when it does not answer "
         "within the request deadline, or `not_replicated` when too few Redis replicas confirmed an order in time; "
         "with `Retry-After`), the event store or the workflow engine",
}


def _problems(*codes: int) -> dict[int | str, dict[str, Any]]:
    out: dict[int | str, dict[str, Any]] = {}
    for code in (401, 403, 422, *codes):
        out[code] = {"description": _PROBLEM_TEXT[code], "content": {"application/problem+json": {"schema": _ref("ProblemBody")}}}
    if 429 in codes:
        out[429]["headers"] = {"Retry-After": {"description": "Seconds to wait", "schema": {"type": "integer"}}}
    out[401]["headers"] = {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}
    return out


def _install_openapi(app: FastAPI) -> None:
    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return app.openapi_schema
        schema = get_openapi(
            title=app.title, version=app.version, description=app.description, routes=app.routes,
        )
        components = schema.setdefault("components", {})
        schemas = components.setdefault("schemas", {})
        schemas.pop("HTTPValidationError", None)
        schemas.pop("ValidationError", None)
        schemas.update(openapi_components())
        components["securitySchemes"] = {"bearer": {"type": "http", "scheme": "bearer"}}
        problem = {"content": {"application/problem+json": {"schema": _ref("ProblemBody")}}}
        for path, operations in schema.get("paths", {}).items():
            for operation in operations.values():
                responses = operation.setdefault("responses", {})
                if "422" in responses:
                    responses["422"] = {"description": _PROBLEM_TEXT[422], **problem}
                if path.startswith("/v1/"):
                    operation["security"] = [{"bearer": []}]
                    responses.setdefault("503", {"description": _PROBLEM_TEXT[503], **problem})
                    responses["503"]["headers"] = {
                        "Retry-After": {"description": "Seconds to wait (Redis unavailable or too slow)",
                                        "schema": {"type": "integer"}},
                    }
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


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
    _install_openapi(app)

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

    async def principal(request: Request) -> Principal:
        return await gw.api_keys.authenticate(request.headers.get("authorization"))

    # -- orders --------------------------------------------------------------------------------

    @app.post(
        "/v1/orders",
        status_code=202,
        summary="Submit an order",
        tags=["orders"],
        openapi_extra={
            "requestBody": {"required": True, "content": {JSON: {"schema": _ref("OrderBody")}}},
            "parameters": [
                {
                    "name": "wait", "in": "query", "required": False,
                    "description": "Wait up to this many seconds for a terminal status, then answer with the full order "
                    "(200 if terminal, 202 if not yet).",
                    "schema": {"type": "number", "exclusiveMinimum": 0, "maximum": MAX_WAIT_S},
                },
                {
                    "name": "durable", "in": "query", "required": False,
                    "description": "`true`: drive the order through the `trading.place_order` Hatchet workflow "
                    "instead of the streams; the same responses (the run id in `X-Workflow-Run-Id`).",
                    "schema": {"type": "boolean"},
                },
            ],
        },
        responses={
            200: _ok("The same order submitted before with this `client_order_id` and body, or (with `wait`) the "
                     "order in a terminal status", "OrderView"),
            202: _ok("Accepted; with `wait`, the full order as it is when the wait ran out", "OrderAccepted"),
            **_problems(404, 409, 413, 429),
        },
    )
    async def submit_order(request: Request) -> Response:
        # Served by ``LeanOrders`` in front of the app; this route documents it in OpenAPI and
        # answers when the app is mounted without that middleware.
        return await place_order(
            request.headers.get("authorization"),
            lambda: read_body(request, settings.max_body_bytes),
            request.query_params.get("wait") if request.scope["query_string"] else None,
            request.query_params.get("durable") if request.scope["query_string"] else None,
        )

    async def place_order(
        authorization: str | None, read: Callable[[], Awaitable[bytes]], wait_param: str | None,
        durable_param: str | None = None,
    ) -> Response:
        caller = await gw.api_keys.authenticate(authorization)
        caller.require(KeyScope.TRADE)
        body = decode_body(await read(), OrderBody)
        quantity, price = OrderDesk.validate(body)
        caller.require(KeyScope.TRADE, body.portfolio_id)
        wait = parse_wait(wait_param) if wait_param is not None else None
        durable = parse_flag(durable_param, "durable") if durable_param is not None else False
        if durable and not gw.workflows.enabled:
            raise Problem(503, "workflows_unavailable", "durable orders need the workflow engine, which is not configured")
        if gw.overloaded:
            raise Problem(
                429, "backpressure", "the order pipeline is behind; retry later",
                headers={"Retry-After": str(settings.retry_after_s)},
            )
        if wait is not None:
            gw.wait_cap.take(caller.key_id)  # 429 too_many_waits: nothing submitted
        try:
            await gw.order_rate.check(caller.key_id)  # 429 rate_limited: one round trip
            try:
                submitted = await gw.desk.submit(body, quantity, price, caller.key_id, durable=durable)
            except NotReplicated as exc:
                raise not_replicated(exc, settings.retry_after_s) from None
            record = submitted.record
            headers: dict[str, str] = {}
            if durable:
                headers["X-Workflow-Run-Id"] = await start_durable(submitted)
            if wait is not None:
                key = gw.desk.record_key(record.order_id)
                if key is not None and not record.is_terminal:
                    record = await gw.waiters.wait(record.order_id, key, wait) or record
                done = record.is_terminal or not submitted.created
                return json_response(order_view(record), 200 if done else 202, headers)
            if not submitted.created:
                return json_response(order_view(record), 200, headers)
            return json_response(
                OrderAccepted(
                    order_id=record.order_id, client_order_id=record.client_order_id, status=record.status,
                    correlation_id=record.correlation_id,
                ),
                202,
                headers,
            )
        finally:
            if wait is not None:
                gw.wait_cap.give_back(caller.key_id)

    async def start_durable(submitted: Submitted) -> str:
        """The run of a durable order: started now, or the one started before. A repeat of an
        order whose run could not be started (the engine was down) starts it now."""
        record = submitted.record
        event = submitted.event
        if event is None:
            run_id = await gw.workflows.run_of_order(record)
            if run_id is not None:
                return run_id
            event = OrderDesk.durable_request(record)
        try:
            return await gw.workflows.start_order(record, event)
        except Exception as exc:
            log.error("could not start trading.place_order", order_id=record.order_id, error=str(exc))
            raise Problem(
                503, "workflows_unavailable",
                f"order {record.order_id} was accepted but its workflow could not be started; "
                "send the same request again",
            ) from exc

    async def visible_order(caller: Principal, order_id: str) -> tuple[OrderRecord, bool]:
        """The order (live, or rebuilt from the event store once it left Redis) and whether
        it is live; 404 when neither has it or the key does not grant its portfolio."""
        record, live = await gw.desk.find(order_id)
        if record is None or not caller.grants(record.portfolio_id):
            raise Problem(404, "order_not_found", f"no order {order_id}")
        return record, live

    @app.get(
        "/v1/orders/{order_id}", summary="An order (from the event store once it has left Redis)", tags=["orders"],
        responses={200: _ok("The order", "OrderView"), **_problems(404, 503)},
    )
    async def get_order(request: Request, order_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.READ)
        record, _ = await visible_order(caller, order_id)
        return json_response(order_view(record))

    @app.delete(
        "/v1/orders/{order_id}", status_code=202, summary="Cancel an order", tags=["orders"],
        responses={202: _ok("Cancel requested; the order as it is now", "OrderView"), **_problems(404, 409)},
    )
    async def cancel_order(request: Request, order_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.TRADE)
        record, live = await visible_order(caller, order_id)
        if record.is_terminal or not live:  # only a finished order leaves Redis
            raise Problem(409, "order_terminal", f"order {order_id} is already {record.status}")
        await gw.desk.request_cancel(record, caller.key_id)
        return json_response(order_view(record), 202)

    # -- workflows -----------------------------------------------------------------------------

    @app.get(
        "/v1/workflows/{run_id}", summary="A workflow run: status and result", tags=["workflows"],
        responses={200: {"description": "The run: `workflow`, `status` (queued, running, completed, failed), "
                                        "`result` or `error`, `step` (where it is, or where it failed) "
                                        "and `steps` (each step's start, end and events)"}, **_problems(404)},
    )
    async def get_workflow(request: Request, run_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.READ)
        run = await gw.workflows.runs.get(run_id)
        if run is None or not caller.grants(run.portfolio_id):
            raise Problem(404, "workflow_run_not_found", f"no workflow run {run_id}")
        return json_response(run)

    @app.post(
        "/v1/portfolios/{portfolio_id}/rebalance", status_code=202, summary="Start a rebalance (workflow)",
        tags=["workflows"],
        openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": _ref("RebalanceBody")}}}},
        responses={202: _ok("Started; follow it at /v1/workflows/{run_id}", "WorkflowRunAccepted"), **_problems(404)},
    )
    async def rebalance(request: Request, portfolio_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.TRADE, portfolio_id)
        body = decode_body(await read_body(request, settings.max_body_bytes), RebalanceBody)
        total = Decimal(0)
        for symbol, raw in body.targets.items():
            weight = Decimal(raw)
            if not 0 <= weight <= 1:
                raise Problem.invalid(f"targets.{symbol}", "must be between 0 and 1")
            total += weight
        if total > 1:
            raise Problem.invalid("targets", "weights add up to more than 1")
        if not gw.workflows.enabled:
            raise Problem(503, "workflows_unavailable", "rebalancing needs the workflow engine, which is not configured")
        if await gw.portfolios.get(portfolio_id) is None:
            raise Problem(404, "portfolio_not_found", f"no portfolio {portfolio_id}")
        run_id = await gw.workflows.start_rebalance(RebalanceInput(
            portfolio_id=portfolio_id, targets=dict(body.targets), quote=body.quote,
            all_or_nothing=body.all_or_nothing, requested_by=caller.key_id,
        ))
        return json_response(WorkflowRunAccepted(run_id=run_id, workflow=REBALANCE, status="queued"), 202)

    # -- portfolios ----------------------------------------------------------------------------

    pid = Path(pattern=ID_PATTERN, description="Portfolio id")

    @app.put(
        "/v1/portfolios/{portfolio_id}", status_code=200, summary="Create or update a portfolio (admin)",
        tags=["portfolios"],
        openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": _ref("PortfolioBody")}}}},
        responses={
            200: _ok("Updated", "PortfolioView"), 201: _ok("Created", "PortfolioView"), **_problems(409, 413),
        },
    )
    async def put_portfolio(request: Request, portfolio_id: str = pid) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.ADMIN, portfolio_id)
        body = decode_body(await read_body(request, settings.max_body_bytes), PortfolioBody)
        created, view = await gw.portfolios.put(portfolio_id, body)
        return json_response(view, 201 if created else 200)

    @app.get(
        "/v1/portfolios/{portfolio_id}", summary="A portfolio: balances, limits, trading state", tags=["portfolios"],
        responses={200: _ok("The portfolio", "PortfolioView"), **_problems(404)},
    )
    async def get_portfolio(request: Request, portfolio_id: str = pid) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.READ, portfolio_id)
        view = await gw.portfolios.get(portfolio_id)
        if view is None:
            raise Problem(404, "portfolio_not_found", f"no portfolio {portfolio_id}")
        return json_response(view)

    @app.put(
        "/v1/portfolios/{portfolio_id}/trading-state", summary="Set the trading state (admin)", tags=["portfolios"],
        openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": _ref("TradingStateBody")}}}},
        responses={200: _ok("The portfolio", "PortfolioView"), **_problems(404, 409, 413)},
    )
    async def put_trading_state(request: Request, portfolio_id: str = pid) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.ADMIN, portfolio_id)
        body = decode_body(await read_body(request, settings.max_body_bytes), TradingStateBody)
        return json_response(await gw.portfolios.set_trading_state(portfolio_id, body.state))

    async def existing_portfolio(caller: Principal, portfolio_id: str) -> None:
        caller.require(KeyScope.READ, portfolio_id)
        if await gw.portfolios.record(portfolio_id) is None:
            raise Problem(404, "portfolio_not_found", f"no portfolio {portfolio_id}")

    @app.get(
        "/v1/portfolios/{portfolio_id}/positions", summary="Positions with realized and unrealized PnL",
        tags=["portfolios"], responses={200: _ok("The positions", "PositionsView"), **_problems(404)},
    )
    async def get_positions(request: Request, portfolio_id: str = pid) -> Response:
        await existing_portfolio(await principal(request), portfolio_id)
        return json_response(await gw.portfolios.positions(portfolio_id))

    @app.get(
        "/v1/portfolios/{portfolio_id}/orders", summary="Recent orders, newest first", tags=["portfolios"],
        responses={200: _ok("The orders", "OrdersPage"), **_problems(404)},
    )
    async def list_orders(
        request: Request,
        portfolio_id: str = pid,
        status: OrderStatus | None = Query(None, description="Only orders in this status"),
        limit: int = Query(50, ge=1, le=500, description="At most this many orders"),
    ) -> Response:
        await existing_portfolio(await principal(request), portfolio_id)
        records = await gw.desk.recent(portfolio_id, status, limit)
        return json_response(OrdersPage(portfolio_id=portfolio_id, orders=[order_view(r) for r in records]))

    # -- API keys --------------------------------------------------------------------------------

    @app.post(
        "/v1/api-keys", status_code=201,
        summary="Create an API key (admin) granting no more than the caller's own; the secret is shown once",
        tags=["api-keys"],
        openapi_extra={"requestBody": {"required": True, "content": {JSON: {"schema": _ref("ApiKeyBody")}}}},
        responses={201: _ok("The key and its secret", "ApiKeyCreated"), **_problems(413)},
    )
    async def create_api_key(request: Request) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.ADMIN)
        body = decode_body(await read_body(request, settings.max_body_bytes), ApiKeyBody)
        record, secret = await gw.api_keys.create(body, caller)
        return json_response(
            ApiKeyCreated(
                key_id=record.key_id, name=record.name, portfolios=record.portfolios, scopes=record.scopes,
                created_at=record.created_at, secret=secret,
            ),
            201,
        )

    @app.delete(
        "/v1/api-keys/{key_id}", status_code=204,
        summary="Revoke an API key (admin) whose grant lies within the caller's; any other is a 404", tags=["api-keys"],
        responses={204: {"description": f"Revoked (other processes within {settings.key_cache_ttl_s:g} s)"},
                   **_problems(404)},
    )
    async def revoke_api_key(request: Request, key_id: str = Path(pattern=ID_PATTERN)) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.ADMIN)
        if not await gw.api_keys.revoke(key_id, caller):
            raise Problem(404, "api_key_not_found", f"no API key {key_id}")
        return Response(status_code=204)

    # -- audit ---------------------------------------------------------------------------------

    @app.get(
        "/v1/events", summary="The audit trail of one order or workflow run, in causal order", tags=["events"],
        responses={200: _ok("The events this key may see", "EventsPage"), **_problems(503)},
    )
    async def get_events(
        request: Request,
        correlation_id: str = Query(pattern=ID_PATTERN, description="An order id or workflow run id"),
        limit: int = Query(1000, ge=1, le=10_000),
    ) -> Response:
        caller = await principal(request)
        caller.require(KeyScope.READ)
        try:
            with outside_deadline():  # the event store has its own timeouts and 503
                store = await gw.store()
                stored = await store.events_for_correlation(correlation_id, limit)
        except psycopg.errors.UndefinedTable:
            stored = []  # nothing recorded yet: the recorder creates the table
        except psycopg.Error as exc:
            log.warning("event store query failed", error=type(exc).__name__)
            raise Problem(503, "event_store_unavailable", "the event store cannot be queried") from None
        events = [
            StoredEventView(seq=s.seq, recorded_at=s.recorded_at, event=msgspec.to_builtins(s.event))
            for s in stored
            if caller.grants(s.event.portfolio_id)
        ]
        return json_response(EventsPage(correlation_id=correlation_id, events=events))

    # -- probes ----------------------------------------------------------------------------------

    @app.get("/healthz", summary="Liveness", tags=["probes"], responses={200: _ok("Alive", "Health")})
    async def healthz() -> Response:
        return json_response(Health(status="ok"))

    @app.get(
        "/readyz", summary="Readiness: Redis reachable and the pipeline caught up", tags=["probes"],
        responses={200: _ok("Ready", "Readiness"), 503: _ok("Not ready", "Readiness")},
    )
    async def readyz() -> Response:
        checks = await gw.ready()
        ok = all(checks.values())
        return json_response(Readiness(ready=ok, checks=checks), 200 if ok else 503)

    app.add_middleware(
        RequestDeadlines, seconds=settings.request_deadline_s, retry_after_s=settings.retry_after_s, max_wait_s=MAX_WAIT_S
    )
    app.add_middleware(Observe)
    app.add_middleware(
        LeanOrders, place=place_order, max_body=settings.max_body_bytes, deadline_s=settings.request_deadline_s,
        retry_after_s=settings.retry_after_s,
    )
    return app


