"""``python -m services.demo.webhooks``: the local stack's webhook receiver.

The notifications service needs somewhere to post; in the local stack this is it. It listens
on ``ZVT_DEMO_WEBHOOKS_HOST:ZVT_DEMO_WEBHOOKS_PORT`` (127.0.0.1:8081), checks each delivery's
``X-ZVT-Signature`` against ``ZVT_NOTIFICATIONS_WEBHOOK_SECRET`` (when set), counts events once
per ``X-ZVT-Event-Id`` and appends each to ``ZVT_DEMO_WEBHOOKS_FILE`` as a JSON line. It
answers ``GET /stats[?portfolio_prefix=…]`` (what arrived, by event type) and ``GET /healthz``.

Standard library only. Writes the fleet's ``service started`` log line (with its port) so
``devstack.fleet`` can start and stop it like the services.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import os
import signal
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import FrameType
from typing import Any, TextIO
from urllib.parse import parse_qs, urlsplit

from services.notifications.signing import verify_signature

__all__ = ["Sink", "main"]

MAX_BODY = 1 << 20


class Sink:
    """What arrived: each event once, by portfolio and type; optionally a JSON-lines file."""

    def __init__(self, secret: str | None, file: TextIO | None) -> None:
        self.secret = secret
        self.file = file
        self.lock = threading.Lock()
        self.seen: set[str] = set()
        self.by_portfolio: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
        self.deliveries = 0
        self.bad_signatures = 0

    def accept(self, headers: Any, body: bytes) -> HTTPStatus:
        if self.secret is not None:
            ok = verify_signature(
                self.secret, headers.get("X-ZVT-Timestamp", ""), body, headers.get("X-ZVT-Signature", "")
            )
            if not ok:
                with self.lock:
                    self.bad_signatures += 1
                return HTTPStatus.UNAUTHORIZED
        try:
            event = json.loads(body)
        except ValueError:
            return HTTPStatus.BAD_REQUEST
        if not isinstance(event, dict):
            return HTTPStatus.BAD_REQUEST
        event_id = str(headers.get("X-ZVT-Event-Id") or event.get("event_id") or "")
        with self.lock:
            self.deliveries += 1
            if event_id in self.seen:
                return HTTPStatus.NO_CONTENT
            self.seen.add(event_id)
            portfolio = str(event.get("portfolio_id") or "")
            self.by_portfolio[portfolio][str(event.get("event_type") or "?")] += 1
            if self.file is not None:
                received = dt.datetime.now(dt.UTC).isoformat()
                self.file.write(json.dumps({"received_at": received, "event": event}, separators=(",", ":")) + "\n")
                self.file.flush()
        return HTTPStatus.NO_CONTENT

    def stats(self, portfolio_prefix: str = "") -> dict[str, Any]:
        with self.lock:
            by_type: collections.Counter[str] = collections.Counter()
            for portfolio, counts in self.by_portfolio.items():
                if portfolio.startswith(portfolio_prefix):
                    by_type.update(counts)
            return {
                "events": sum(by_type.values()),
                "by_type": dict(sorted(by_type.items())),
                "deliveries": self.deliveries,
                "bad_signatures": self.bad_signatures,
            }


def _handler(sink: Sink) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "zvt-webhooks"
        protocol_version = "HTTP/1.1"

        def do_POST(self) -> None:  # noqa: N802 - http.server's naming
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._answer(HTTPStatus.REQUEST_ENTITY_TOO_LARGE)
                return
            self._answer(sink.accept(self.headers, self.rfile.read(length)))

        def do_GET(self) -> None:  # noqa: N802
            url = urlsplit(self.path)
            if url.path == "/healthz":
                self._answer(HTTPStatus.OK, {"status": "ok"})
            elif url.path == "/stats":
                prefix = parse_qs(url.query).get("portfolio_prefix", [""])[0]
                self._answer(HTTPStatus.OK, sink.stats(prefix))
            else:
                self._answer(HTTPStatus.NOT_FOUND, {"code": "not_found"})

        def _answer(self, status: HTTPStatus, body: dict[str, Any] | None = None) -> None:
            data = json.dumps(body).encode() if body is not None else b""
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
            return

    return Handler


def _log(message: str, **fields: Any) -> None:
    line = {"event": message, "service": "demo.webhooks", "level": "info",
            "timestamp": dt.datetime.now(dt.UTC).isoformat(), **fields}
    print(json.dumps(line), flush=True)


def main() -> int:
    host = os.environ.get("ZVT_DEMO_WEBHOOKS_HOST", "127.0.0.1")
    port = int(os.environ.get("ZVT_DEMO_WEBHOOKS_PORT", "8081"))
    secret = os.environ.get("ZVT_NOTIFICATIONS_WEBHOOK_SECRET") or None
    path = os.environ.get("ZVT_DEMO_WEBHOOKS_FILE")
    file: TextIO | None = None
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - open for the process's life
    sink = Sink(secret, file)
    server = ThreadingHTTPServer((host, port), _handler(sink))
    server.daemon_threads = True

    def stop(signum: int, _: FrameType | None) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    bound = int(server.server_address[1])
    _log("service started", http_port=bound, url=f"http://{host}:{bound}/webhooks", file=path, signed=secret is not None)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        server.server_close()
        if file is not None:
            file.close()
        _log("service stopped", **sink.stats())
    return 0


if __name__ == "__main__":
    sys.exit(main())
