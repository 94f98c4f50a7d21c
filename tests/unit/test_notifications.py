"""Notifications without Redis: signing and verification, the retry policy against an
in-memory HTTP transport, and the settings' start-up errors."""

from __future__ import annotations

import asyncio
import email.utils
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

import httpx
import pytest

from services.core.bus import Commit, PermanentError
from services.core.codec import decode_any
from services.core.events import Event, OrderRejected
from services.core.keys import Keys
from services.core.settings import SettingsError
from services.notifications import sign, signature_header, verify_signature
from services.notifications.settings import NotificationsSettings, load_settings
from services.notifications.webhooks import DeliveryDeferred, Notifier, _retry_after, redact_url

SECRET = "unit-test-secret-0123456789abcdef"
URL = "https://hooks.test/zvt"

# -- signing -----------------------------------------------------------------------------------


def test_verify_signature_when_signed_by_the_sender_accepts_it() -> None:
    body = b'{"event_id":"e1","payload":{"price":"1.5"}}'
    ts = str(int(time.time()))
    header = signature_header(SECRET, ts, body)
    assert header == "sha256=" + sign(SECRET, ts, body)
    assert verify_signature(SECRET, ts, body, header)
    assert verify_signature(SECRET.encode(), int(ts), body, header.upper().replace("SHA256=", "sha256="))


def test_verify_signature_when_body_is_tampered_rejects_it() -> None:
    body = b'{"price":"1.5"}'
    ts = str(int(time.time()))
    header = signature_header(SECRET, ts, body)
    assert not verify_signature(SECRET, ts, b'{"price":"9.5"}', header)
    assert not verify_signature(SECRET, ts, body + b" ", header)


def test_verify_signature_when_secret_or_timestamp_differ_rejects_it() -> None:
    body = b"{}"
    ts = int(time.time())
    header = signature_header(SECRET, ts, body)
    assert not verify_signature("another-secret-0123456789", ts, body, header)
    assert not verify_signature(SECRET, ts + 1, body, header)  # the timestamp is signed too


def test_verify_signature_when_timestamp_is_old_or_far_future_rejects_it() -> None:
    body = b"{}"
    now = 1_750_000_000.0
    old = int(now) - 301
    assert not verify_signature(SECRET, old, body, signature_header(SECRET, old, body), tolerance_s=300, now=now)
    assert verify_signature(SECRET, old, body, signature_header(SECRET, old, body), tolerance_s=400, now=now)
    future = int(now) + 301
    assert not verify_signature(SECRET, future, body, signature_header(SECRET, future, body), 300, now=now)


@pytest.mark.parametrize(
    ("timestamp", "header"),
    [
        ("not-a-number", None),
        ("-5", None),
        ("1e9", None),
        (None, "sha256"),
        (None, "md5=abc"),
        (None, "sha256=zz"),
        (None, ""),
        (None, "sha256=é"),
    ],
)
def test_verify_signature_when_input_is_malformed_returns_false(timestamp: str | None, header: str | None) -> None:
    body = b"{}"
    ts = str(int(time.time()))
    good = signature_header(SECRET, ts, body)
    assert not verify_signature(SECRET, timestamp or ts, body, good if header is None else header)


# -- delivery ----------------------------------------------------------------------------------

Responder = Callable[[httpx.Request], Awaitable[httpx.Response]]


def rejected(i: int = 1) -> Event[Any]:
    return Event.new(
        OrderRejected(order_id=f"o{i}", client_order_id=f"c{i}", reason_code="MAX_NOTIONAL",
                      reason=f"notional over {Decimal('1000.50')}", stage="risk"),
        portfolio_id="pf-1",
    )


def settings(**overrides: Any) -> NotificationsSettings:
    values: dict[str, Any] = {
        "webhook_urls": [URL], "webhook_secret": SECRET, "max_attempts": 4, "backoff_base_s": 0.5,
        "backoff_max_s": 5.0, "request_timeout_s": 1.0,
    }
    values.update(overrides)
    return NotificationsSettings(**values)


class Harness:
    """A notifier over an in-memory transport; its sleeps are recorded, not slept."""

    def __init__(self, responder: Responder, *, stop_after: int | None = None, budget_s: float = 60.0,
                 **overrides: Any) -> None:
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

        async def handler(request: httpx.Request) -> httpx.Response:
            self.requests.append(request)
            return await responder(request)

        async def sleep(seconds: float) -> bool:
            self.sleeps.append(seconds)
            return stop_after is not None and len(self.sleeps) >= stop_after

        self.client = httpx.AsyncClient(transport=httpx.MockTransport(handler))
        self.notifier = Notifier(settings(**overrides), budget_s=budget_s, sleep=sleep, client=self.client,
                                 rng=lambda: 1.0)

    async def run(self, *events: Event[Any]) -> list[Commit]:
        commits = [Commit(Keys("t", 1), 0) for _ in events]
        await self.notifier.handle(list(zip(events, commits, strict=True)))
        await self.client.aclose()
        return commits


def answers(*responses: httpx.Response | Exception) -> Responder:
    queue = list(responses)

    async def respond(request: httpx.Request) -> httpx.Response:
        item = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(item, Exception):
            raise item
        return item

    return respond


async def test_notifier_when_receiver_answers_200_posts_the_signed_envelope_once() -> None:
    h = Harness(answers(httpx.Response(200)))
    event = rejected()
    [commit] = await h.run(event)
    assert commit.error is None
    [req] = h.requests
    assert req.method == "POST" and str(req.url) == URL
    assert req.headers["content-type"] == "application/json"
    assert req.headers["x-zvt-event-id"] == event.event_id
    assert req.headers["x-zvt-event-type"] == "order.rejected"
    assert req.headers["x-zvt-delivery-attempt"] == "1"
    assert verify_signature(SECRET, req.headers["x-zvt-timestamp"], req.content, req.headers["x-zvt-signature"])
    assert decode_any(req.content) == event
    assert h.sleeps == []


async def test_notifier_when_no_secret_sends_no_signature() -> None:
    h = Harness(answers(httpx.Response(204)), webhook_secret=None)
    [commit] = await h.run(rejected())
    assert commit.error is None
    assert "x-zvt-signature" not in h.requests[0].headers


async def test_notifier_when_failures_are_transient_backs_off_exponentially_and_capped() -> None:
    h = Harness(
        answers(httpx.Response(502), httpx.Response(408), httpx.ConnectError("refused"),
                httpx.ReadTimeout("slow"), httpx.Response(200)),
        max_attempts=5, backoff_base_s=1.0, backoff_max_s=3.0,
    )
    [commit] = await h.run(rejected())
    assert commit.error is None
    assert len(h.requests) == 5
    assert h.sleeps == [1.0, 2.0, 3.0, 3.0]  # rng pinned to the top of the jitter
    assert [r.headers["x-zvt-delivery-attempt"] for r in h.requests] == ["1", "2", "3", "4", "5"]


async def test_notifier_backoff_jitter_stays_in_the_upper_half() -> None:
    s = settings(backoff_base_s=2.0, backoff_max_s=100.0)
    low = Notifier(s, budget_s=1, rng=lambda: 0.0)
    high = Notifier(s, budget_s=1, rng=lambda: 1.0)
    assert [low._backoff(n) for n in (1, 2, 3)] == [1.0, 2.0, 4.0]
    assert [high._backoff(n) for n in (1, 2, 3)] == [2.0, 4.0, 8.0]


async def test_notifier_when_attempts_spent_fails_permanently_naming_url_status_and_attempts() -> None:
    h = Harness(answers(httpx.Response(500)), max_attempts=3)
    [commit] = await h.run(rejected())
    assert isinstance(commit.error, PermanentError)
    assert str(commit.error) == f"webhook {URL}: HTTP 500 after 3 attempts (attempts spent)"
    assert len(h.requests) == 3


async def test_notifier_when_connection_keeps_failing_names_the_error() -> None:
    h = Harness(answers(httpx.ConnectError("refused")), max_attempts=2)
    [commit] = await h.run(rejected())
    assert isinstance(commit.error, PermanentError)
    assert "ConnectError after 2 attempts" in str(commit.error)


@pytest.mark.parametrize("status", [400, 401, 404, 410, 422, 301])
async def test_notifier_when_receiver_refuses_fails_permanently_without_retry(status: int) -> None:
    h = Harness(answers(httpx.Response(status)))
    [commit] = await h.run(rejected())
    assert isinstance(commit.error, PermanentError)
    assert f"HTTP {status} after 1 attempt (not retried)" in str(commit.error)
    assert len(h.requests) == 1 and h.sleeps == []


async def test_notifier_when_429_with_retry_after_waits_at_least_that_long() -> None:
    h = Harness(answers(httpx.Response(429, headers={"Retry-After": "4"}), httpx.Response(200)))
    [commit] = await h.run(rejected())
    assert commit.error is None
    assert h.sleeps == [4.0]  # more than the 0.5 s backoff


async def test_notifier_when_retry_after_exceeds_backoff_max_leaves_the_event_pending() -> None:
    h = Harness(answers(httpx.Response(503, headers={"Retry-After": "120"})))
    [commit] = await h.run(rejected())
    assert isinstance(commit.error, DeliveryDeferred) and not isinstance(commit.error, PermanentError)
    assert "Retry-After 120s" in str(commit.error)
    assert len(h.requests) == 1


async def test_notifier_when_stopping_ends_retries_and_leaves_the_event_pending() -> None:
    h = Harness(answers(httpx.Response(500)), stop_after=1)
    [commit] = await h.run(rejected())
    assert isinstance(commit.error, DeliveryDeferred)
    assert "(stopping)" in str(commit.error)
    assert len(h.requests) == 1


async def test_notifier_when_retries_would_outlive_the_budget_leaves_the_event_pending() -> None:
    h = Harness(answers(httpx.Response(500)), budget_s=0.2)
    [commit] = await h.run(rejected())
    assert isinstance(commit.error, DeliveryDeferred)
    assert "out of time" in str(commit.error)


async def test_notifier_with_two_urls_dead_letters_naming_only_the_one_that_refused() -> None:
    async def respond(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200 if request.url.path == "/ok" else 400)

    other = "https://user:pw@hooks.test/bad?token=abc"
    h = Harness(respond, webhook_urls=["https://hooks.test/ok", other])
    [commit] = await h.run(rejected())
    assert isinstance(commit.error, PermanentError)
    assert str(commit.error) == "webhook https://hooks.test/bad?…: HTTP 400 after 1 attempt (not retried)"
    assert "pw" not in str(commit.error) and "abc" not in str(commit.error)
    assert len(h.requests) == 2


async def test_notifier_delivers_a_batch_concurrently_within_its_limit() -> None:
    in_flight = peak = 0

    async def respond(request: httpx.Request) -> httpx.Response:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.02)
        in_flight -= 1
        return httpx.Response(200)

    h = Harness(respond, concurrency=3)
    events = [rejected(i) for i in range(10)]
    started = time.monotonic()
    commits = await h.run(*events)
    assert all(c.error is None for c in commits)
    assert peak == 3
    assert time.monotonic() - started < 10 * 0.02  # not one after another
    assert sorted(r.headers["x-zvt-event-id"] for r in h.requests) == sorted(e.event_id for e in events)


def test_retry_after_reads_seconds_and_http_dates() -> None:
    assert _retry_after("7") == 7.0
    assert _retry_after(None) is None and _retry_after("soon") is None
    later = email.utils.formatdate(time.time() + 30, usegmt=True)
    wait = _retry_after(later)
    assert wait is not None and 25 < wait <= 31
    assert _retry_after(email.utils.formatdate(time.time() - 30, usegmt=True)) == 0.0


def test_redact_url_drops_credentials_and_query() -> None:
    assert redact_url("https://u:p@example.test:8443/a/b?k=v") == "https://example.test:8443/a/b?…"
    assert redact_url("http://[::1]:9000/h") == "http://[::1]:9000/h"


# -- settings ----------------------------------------------------------------------------------


def test_settings_when_secret_is_too_short_name_it_without_showing_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_NOTIFICATIONS_WEBHOOK_URLS", URL)
    monkeypatch.setenv("ZVT_NOTIFICATIONS_WEBHOOK_SECRET", "tiny-secret")
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.line.startswith("invalid setting ZVT_NOTIFICATIONS_WEBHOOK_SECRET:")
    assert "tiny-secret" not in info.value.line


@pytest.mark.parametrize(
    ("name", "value", "expect"),
    [
        ("WEBHOOK_URLS", "", "set at least one webhook URL"),
        ("WEBHOOK_URLS", "ftp://x/y", "not an http(s) URL"),
        ("WEBHOOK_URLS", "http://x:99999/", "not a valid URL"),
        ("WEBHOOK_URLS", "http://x/a,http://x/a", "listed twice"),
        ("EVENT_TYPES", "order.executed,price.updated", "not a notifiable event type: price.updated"),
        ("ROUTES", "sideways", "Input should be"),
        ("MAX_ATTEMPTS", "0", "greater than or equal to 1"),
        ("REQUEST_TIMEOUT_S", "0", "greater than 0"),
    ],
)
def test_settings_when_invalid_give_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str, expect: str
) -> None:
    monkeypatch.setenv("ZVT_NOTIFICATIONS_WEBHOOK_URLS", URL)
    monkeypatch.setenv(f"ZVT_NOTIFICATIONS_{name}", value)
    with pytest.raises(SettingsError) as info:
        load_settings()
    assert info.value.code == 2 and "\n" not in info.value.line
    assert info.value.line.startswith(f"invalid setting ZVT_NOTIFICATIONS_{name}:")
    assert expect in info.value.line


def test_settings_when_lists_given_as_csv_split_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_NOTIFICATIONS_WEBHOOK_URLS", f"{URL}, http://127.0.0.1:9/x")
    monkeypatch.setenv("ZVT_NOTIFICATIONS_EVENT_TYPES", "order.failed, risk.breached")
    monkeypatch.setenv("ZVT_NOTIFICATIONS_ROUTES", "workflow")
    s = load_settings()
    assert s.webhook_urls == [URL, "http://127.0.0.1:9/x"]
    assert [str(t) for t in s.event_types] == ["order.failed", "risk.breached"]
    assert [str(r) for r in s.routes] == ["workflow"]
    assert s.webhook_secret is None
