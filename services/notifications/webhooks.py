"""Webhook delivery: POST each event to every configured URL, signed, with retries.

``Notifier.handle`` is a ``Batch`` handler. It delivers every event of a batch at once (at
most ``concurrency`` requests in flight in the process, over one pooled ``httpx.AsyncClient``),
and marks each event's commit by its outcome:

- delivered to every URL: the commit stands, and the bus acks the entry;
- refused for good by some URL (a 4xx other than 408 and 429, a redirect), or its attempts
  spent: ``commit.fail(PermanentError(...))``, so the bus moves the entry to the dead-letter
  stream with a reason naming the URL, the last status and the attempts, and acks it;
- not finished in time (the process is stopping, the retries would outlive the entry's
  reclaim idle time, or a ``Retry-After`` longer than ``backoff_max_s``): ``commit.fail`` with
  a ``DeliveryDeferred``, so the entry stays pending and the bus redelivers it later (and
  dead-letters it after ``ZVT_BUS_MAX_DELIVERIES``).

Nothing is acked before it was delivered or dead-lettered. Delivery is at least once: a URL
may see an event again after a crash or a redelivery, so receivers dedupe on
``X-ZVT-Event-Id``.
"""

from __future__ import annotations

import asyncio
import email.utils
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx
from prometheus_client import Counter, Histogram

from services.core.bus import Commit, PermanentError
from services.core.codec import encode
from services.core.events import Event
from services.core.telemetry import get_logger
from services.notifications.settings import NotificationsSettings
from services.notifications.signing import signature_header

__all__ = ["DeliveryDeferred", "Endpoint", "Notifier", "redact_url"]

log = get_logger("zvt.notifications")

USER_AGENT = "zvt-notifications/1"

# No ids in labels: an endpoint is a configured URL's host (there are at most 16).
DELIVERIES = Counter(
    "zvt_notifications_deliveries",
    "Webhook deliveries of one event to one URL, by final outcome "
    "(delivered, rejected, exhausted, deferred)",
    ["event_type", "endpoint", "outcome"],
)
ATTEMPTS = Counter(
    "zvt_notifications_attempts",
    "Webhook HTTP attempts, by result (2xx, 3xx, 4xx, 408, 429, 5xx, timeout, connect_error)",
    ["endpoint", "result"],
)
DELIVERY_SECONDS = Histogram(
    "zvt_notifications_delivery_seconds",
    "Time from the first attempt to the final outcome of one event's delivery to one URL, retries included",
    ["endpoint", "outcome"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
REQUEST_SECONDS = Histogram(
    "zvt_notifications_request_seconds",
    "Duration of one webhook HTTP request",
    ["endpoint"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
EVENT_AGE_SECONDS = Histogram(
    "zvt_notifications_event_age_seconds",
    "Time from an event's occurred_at to its delivery to a URL",
    ["endpoint"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)

_RETRYABLE = frozenset({408, 429})


class DeliveryDeferred(Exception):
    """A delivery not finished in time: the entry stays pending and is redelivered later."""


def redact_url(url: str) -> str:
    """``url`` fit for logs and dead letters: no credentials, no query string."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port else host
    query = "?…" if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}{query}"


@dataclass(frozen=True, slots=True)
class Endpoint:
    url: str
    shown: str  # redacted, for logs and dead letters
    label: str  # metric label: the host, made unique among the configured URLs

    @staticmethod
    def from_urls(urls: Sequence[str]) -> list[Endpoint]:
        out: list[Endpoint] = []
        seen: dict[str, int] = {}
        for url in urls:
            parts = urlsplit(url)
            host = f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)
            seen[host] = seen.get(host, 0) + 1
            label = host if seen[host] == 1 else f"{host}#{seen[host]}"
            out.append(Endpoint(url, redact_url(url), label))
        return out


@dataclass(frozen=True, slots=True)
class _Result:
    endpoint: Endpoint
    outcome: str  # delivered | rejected | exhausted | deferred
    detail: str


Sleep = Callable[[float], Awaitable[bool]]


async def _plain_sleep(seconds: float) -> bool:
    await asyncio.sleep(seconds)
    return False


class Notifier:
    """Delivers events to the configured webhooks; ``handle`` is the consumer's batch handler.

    ``budget_s`` bounds how long one batch may spend on retries: keep it below the bus's
    ``reclaim_idle_ms``, or an entry still being retried would be reclaimed and sent twice.
    ``sleep(seconds)`` waits between attempts and returns True when the process is stopping,
    which ends the retries (the entries in question stay pending).
    """

    def __init__(
        self,
        settings: NotificationsSettings,
        *,
        budget_s: float,
        sleep: Sleep = _plain_sleep,
        client: httpx.AsyncClient | None = None,
        rng: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.endpoints = Endpoint.from_urls(settings.webhook_urls)
        self.budget_s = budget_s
        self._secret = settings.webhook_secret.get_secret_value().encode() if settings.webhook_secret else None
        self._sleep = sleep
        self._client = client
        self._own_client = client is None
        self._rng = rng
        self._slots = asyncio.Semaphore(settings.concurrency)

    # -- lifecycle -------------------------------------------------------------------------

    def _make_client(self) -> httpx.AsyncClient:
        n = self.settings.concurrency
        return httpx.AsyncClient(
            timeout=httpx.Timeout(self.settings.request_timeout_s),
            limits=httpx.Limits(max_connections=n, max_keepalive_connections=n, keepalive_expiry=30),
            follow_redirects=False,
            headers={"User-Agent": USER_AGENT},
        )

    async def start(self) -> None:
        if self._client is None:
            self._client = self._make_client()
        if self._secret is None:
            log.warning("webhook secret not set: deliveries are unsigned")
        log.info(
            "webhooks configured", urls=[e.shown for e in self.endpoints],
            event_types=[str(t) for t in self.settings.event_types], routes=[str(r) for r in self.settings.routes],
            budget_s=round(self.budget_s, 3),
        )

    async def close(self) -> None:
        if self._client is not None and self._own_client:
            await self._client.aclose()
            self._client = None

    @property
    def started(self) -> bool:
        return self._client is not None

    # -- handling --------------------------------------------------------------------------

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        """Deliver a batch concurrently; mark each commit with its event's outcome."""
        if self._client is None:
            self._client = self._make_client()
            self._own_client = True
        deadline = time.monotonic() + self.budget_s
        await asyncio.gather(*(self._notify(event, commit, deadline) for event, commit in items))

    async def _notify(self, event: Event[Any], commit: Commit, deadline: float) -> None:
        try:
            body = encode(event)
            results = await asyncio.gather(*(self._deliver(ep, event, body, deadline) for ep in self.endpoints))
        except Exception as exc:  # a bug, not a receiver's answer: retry like a failed handler
            log.exception("webhook delivery crashed", event_id=event.event_id, event_type=str(event.event_type))
            commit.fail(exc)
            return
        failed = [r for r in results if r.outcome != "delivered"]
        if not failed:
            return
        summary = "; ".join(r.detail for r in failed)
        if any(r.outcome == "deferred" for r in failed):
            commit.fail(DeliveryDeferred(summary))
        else:
            commit.fail(PermanentError(summary))

    async def _deliver(self, endpoint: Endpoint, event: Event[Any], body: bytes, deadline: float) -> _Result:
        """One event to one URL, with retries; returns how it ended."""
        settings = self.settings
        client = self._client
        assert client is not None
        started = time.monotonic()
        attempt = 0
        last = ""
        while True:
            attempt += 1
            status: int | None = None
            retry_after: float | None = None
            async with self._slots:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return self._done(endpoint, event, started, "deferred", attempt - 1, last, "out of time")
                timestamp = str(int(time.time()))
                headers = {
                    "Content-Type": "application/json",
                    "X-ZVT-Event-Id": event.event_id,
                    "X-ZVT-Event-Type": str(event.event_type),
                    "X-ZVT-Timestamp": timestamp,
                    "X-ZVT-Delivery-Attempt": str(attempt),
                }
                if self._secret is not None:
                    headers["X-ZVT-Signature"] = signature_header(self._secret, timestamp, body)
                sent = time.monotonic()
                try:
                    async with asyncio.timeout(min(settings.request_timeout_s, remaining)):
                        response = await client.post(endpoint.url, content=body, headers=headers)
                    status = response.status_code
                    result = _status_class(status)
                    last = f"HTTP {status}"
                    if status in (429, 503):
                        retry_after = _retry_after(response.headers.get("Retry-After"))
                except (TimeoutError, httpx.TimeoutException):
                    result, last = "timeout", "timed out"
                except httpx.TransportError as exc:
                    result, last = "connect_error", f"{type(exc).__name__}"
                ATTEMPTS.labels(endpoint.label, result).inc()
                REQUEST_SECONDS.labels(endpoint.label).observe(time.monotonic() - sent)

            if status is not None and 200 <= status < 300:
                EVENT_AGE_SECONDS.labels(endpoint.label).observe(max(0.0, time.time() - event.occurred_at.timestamp()))
                return self._done(endpoint, event, started, "delivered", attempt, last)
            if status is not None and status < 500 and status not in _RETRYABLE:
                return self._done(endpoint, event, started, "rejected", attempt, last, "not retried")
            if attempt >= settings.max_attempts:
                return self._done(endpoint, event, started, "exhausted", attempt, last, "attempts spent")
            delay = self._backoff(attempt)
            if retry_after is not None:
                if retry_after > settings.backoff_max_s:
                    return self._done(
                        endpoint, event, started, "deferred", attempt, last, f"Retry-After {retry_after:g}s"
                    )
                delay = max(delay, retry_after)
            if time.monotonic() + delay >= deadline:
                return self._done(endpoint, event, started, "deferred", attempt, last, "out of time")
            if await self._sleep(delay):
                return self._done(endpoint, event, started, "deferred", attempt, last, "stopping")

    def _backoff(self, attempt: int) -> float:
        """Delay after ``attempt`` failed: exponential, capped, the upper half jittered."""
        ceiling = min(self.settings.backoff_max_s, self.settings.backoff_base_s * 2.0 ** (attempt - 1))
        return ceiling / 2 + self._rng() * ceiling / 2

    def _done(
        self, endpoint: Endpoint, event: Event[Any], started: float, outcome: str, attempts: int, last: str,
        why: str = "",
    ) -> _Result:
        DELIVERIES.labels(event.event_type, endpoint.label, outcome).inc()
        DELIVERY_SECONDS.labels(endpoint.label, outcome).observe(time.monotonic() - started)
        plural = "" if attempts == 1 else "s"
        detail = f"webhook {endpoint.shown}: {last or 'not attempted'} after {attempts} attempt{plural}"
        if why:
            detail += f" ({why})"
        if outcome != "delivered":
            (log.info if outcome == "deferred" else log.warning)(
                "webhook delivery " + outcome, url=endpoint.shown, event_id=event.event_id,
                event_type=str(event.event_type), correlation_id=event.correlation_id, attempts=attempts,
                last=last, reason=why,
            )
        return _Result(endpoint, outcome, detail)


def _status_class(status: int) -> str:
    if status in _RETRYABLE:
        return str(status)
    return f"{status // 100}xx" if 100 <= status < 600 else "other"


def _retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (seconds or an HTTP date), or None."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        return None
    wait: float = when.timestamp() - time.time()
    return max(0.0, wait)
