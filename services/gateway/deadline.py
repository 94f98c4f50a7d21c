"""The per-request deadline (``ZVT_GATEWAY_REQUEST_DEADLINE_S``, 2 s by default) and the
``503`` answers of Redis trouble.

Every API request runs under a deadline: when Redis is slow, frozen or unreachable the
caller gets ``503`` problem+json with ``Retry-After`` within it, never a hung connection or
a ``500`` after the Redis client's own timeouts and retries (about 20 s). The deadline
counts the gateway's own work only: the time spent receiving the request body, and calls to
dependencies with their own timeouts and answers (the workflow engine, the event store),
run outside it (``outside_deadline``); ``POST /v1/orders?wait=`` gets its wait on top.

- a Redis error (connection refused or reset, a Redis timeout, no free connection):
  ``503 redis_unavailable``;
- the deadline passed: ``503 deadline_exceeded``.

A ``503`` to ``POST /v1/orders`` does not say whether the order was accepted (the script may
have run just before Redis stopped answering): send the same request again, with the same
``client_order_id``; the order, if it exists, comes back (``200``), else it is made now.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterator
from contextvars import ContextVar, Token
from types import TracebackType
from urllib.parse import parse_qsl

from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.telemetry import get_logger
from services.gateway.problems import Problem, from_problem

__all__ = [
    "Deadline",
    "RequestDeadlines",
    "deadline_exceeded",
    "not_replicated",
    "outside_deadline",
    "redis_unavailable",
    "wait_allowance",
]

log = get_logger("zvt.gateway")

_current: ContextVar[Deadline | None] = ContextVar("zvt_gateway_deadline", default=None)
_ORDERS = "/v1/orders"
_RETRY_BODY = " The order may or may not have been accepted: send the same request again (same client_order_id)."


class Deadline:
    """``asyncio.timeout`` for one request that can be extended, and paused around work that
    does not count (``outside_deadline``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._timeout: asyncio.Timeout | None = None
        self._token: Token[Deadline | None] | None = None

    async def __aenter__(self) -> Deadline:
        self._timeout = asyncio.timeout(self.seconds)
        await self._timeout.__aenter__()
        self._token = _current.set(self)
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._timeout is not None and self._token is not None
        _current.reset(self._token)
        await self._timeout.__aexit__(et, ev, tb)

    @property
    def expired(self) -> bool:
        return self._timeout is not None and self._timeout.expired()

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        timeout = self._timeout
        when = timeout.when() if timeout is not None else None
        if timeout is None or when is None or timeout.expired():
            yield  # not running, already paused, or already spent
            return
        loop = asyncio.get_running_loop()
        remaining = when - loop.time()
        timeout.reschedule(None)
        try:
            yield
        finally:
            if not timeout.expired():
                timeout.reschedule(loop.time() + max(remaining, 0.0))


@contextlib.contextmanager
def outside_deadline() -> Iterator[None]:
    """Work that does not count against the current request's deadline (if any)."""
    deadline = _current.get()
    if deadline is None:
        yield
        return
    with deadline.paused():
        yield


def wait_allowance(raw: str | None, most: float) -> float:
    """The seconds a ``?wait=`` adds to the deadline (none for a value the route will refuse)."""
    if raw is None:
        return 0.0
    try:
        wait = float(raw)
    except ValueError:
        return 0.0
    return wait if 0 < wait <= most else 0.0


_last_warned = 0.0


def _warn(what: str, path: str) -> None:
    global _last_warned
    now = time.monotonic()
    if now - _last_warned >= 1.0:  # an outage answers thousands of requests: one line a second
        _last_warned = now
        log.warning("answering 503: Redis unavailable or too slow", reason=what, path=path)


def redis_unavailable(path: str, retry_after_s: int) -> Problem:
    _warn("redis_unavailable", path)
    return Problem(
        503, "redis_unavailable",
        "Redis cannot be reached; retry after `Retry-After` seconds." + (_RETRY_BODY if path == _ORDERS else ""),
        headers={"Retry-After": str(retry_after_s)},
    )


def not_replicated(exc: Exception, retry_after_s: int) -> Problem:
    """503 for an order written on the Redis master but confirmed by too few replicas
    (``ZVT_BUS_WAIT_REPLICAS``): it could be lost in a failover, so it is not reported accepted."""
    _warn("not_replicated", _ORDERS)
    return Problem(
        503, "not_replicated",
        f"Redis could not confirm the order on its replicas in time ({exc}); retry after `Retry-After` seconds."
        + _RETRY_BODY,
        headers={"Retry-After": str(retry_after_s)},
    )


def deadline_exceeded(path: str, seconds: float, retry_after_s: int) -> Problem:
    _warn("deadline_exceeded", path)
    return Problem(
        503, "deadline_exceeded",
        f"no answer within the gateway's deadline of {seconds:g} s (Redis is slow or unreachable); "
        "retry after `Retry-After` seconds." + (_RETRY_BODY if path == _ORDERS else ""),
        headers={"Retry-After": str(retry_after_s)},
    )


class RequestDeadlines:
    """ASGI middleware: every HTTP request under a ``Deadline``; one that runs out before its
    answer started gets ``503 deadline_exceeded``. (Redis errors become ``503
    redis_unavailable`` in the app's exception handler, inside this.)"""

    def __init__(self, app: ASGIApp, *, seconds: float, retry_after_s: int, max_wait_s: float) -> None:
        self.app = app
        self.seconds = seconds
        self.retry_after_s = retry_after_s
        self.max_wait_s = max_wait_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_started(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        async def receive_outside() -> Message:
            with outside_deadline():
                return await receive()

        wait: str | None = None
        if scope["path"] == _ORDERS and scope.get("query_string"):
            wait = dict(parse_qsl(scope["query_string"].decode("latin-1"))).get("wait")
        deadline = Deadline(self.seconds + wait_allowance(wait, self.max_wait_s))
        try:
            async with deadline:
                await self.app(scope, receive_outside, send_started)
        except TimeoutError:
            if not deadline.expired or started:
                raise
            response: Response = from_problem(deadline_exceeded(scope["path"], self.seconds, self.retry_after_s))
            await response(scope, receive, send)
