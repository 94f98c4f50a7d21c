"""A small HTTP/1.1 server on asyncio and httptools, for the simulated venues.

Why not starlette/uvicorn: a venue simulator must be able to misbehave the way a real one
does (hold a response past the client's timeout, drop the connection with no response at
all), and it sits on the hot path of the staging load tests, so it should cost little per
request. One connection handles one request at a time (keep-alive, no pipelining), which is
how aiohttp, ccxt's transport, talks to it.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl

import httptools

__all__ = ["DropConnection", "HttpRequest", "HttpResponse", "serve"]

_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 405: "Method Not Allowed",
            418: "I'm a teapot", 429: "Too Many Requests", 500: "Internal Server Error", 503: "Service Unavailable"}


@dataclasses.dataclass(slots=True)
class HttpRequest:
    method: str
    path: str
    query_string: str
    """The raw query string, as signed by the client (no leading ``?``)."""
    headers: dict[str, str]
    """Lower-cased names."""
    body: bytes

    def params(self) -> dict[str, str]:
        """Query string and form body together (a form body wins on a repeated name)."""
        params = dict(parse_qsl(self.query_string, keep_blank_values=True))
        if self.body and self.headers.get("content-type", "").startswith("application/x-www-form-urlencoded"):
            params.update(parse_qsl(self.body.decode(), keep_blank_values=True))
        return params


@dataclasses.dataclass(slots=True)
class HttpResponse:
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


class DropConnection(Exception):
    """Raised by a handler: close the connection without answering."""


Handler = Callable[[HttpRequest], Awaitable[HttpResponse]]


class _Protocol(asyncio.Protocol):
    __slots__ = ("_body", "_handler", "_headers", "_parser", "_transport", "_url")

    def __init__(self, handler: Handler) -> None:
        self._handler = handler
        self._parser = httptools.HttpRequestParser(self)
        self._transport: asyncio.Transport | None = None
        self._url = b""
        self._headers: dict[str, str] = {}
        self._body: list[bytes] = []

    # asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]  # uvloop's is not a subclass

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None

    def data_received(self, data: bytes) -> None:
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError:
            self._write(HttpResponse(400, b'{"code":-1100,"msg":"Malformed HTTP request."}'), keep_alive=False)

    # httptools callbacks
    def on_message_begin(self) -> None:
        self._url = b""
        self._headers = {}
        self._body = []

    def on_url(self, url: bytes) -> None:
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_body(self, body: bytes) -> None:
        self._body.append(body)

    def on_message_complete(self) -> None:
        url = httptools.parse_url(self._url)
        request = HttpRequest(
            method=self._parser.get_method().decode(),
            path=url.path.decode(),
            query_string=(url.query or b"").decode(),
            headers=self._headers,
            body=b"".join(self._body),
        )
        keep_alive = self._parser.should_keep_alive()
        if self._transport is not None:
            self._transport.pause_reading()  # one request at a time per connection
        asyncio.get_running_loop().create_task(self._respond(request, keep_alive))

    async def _respond(self, request: HttpRequest, keep_alive: bool) -> None:
        try:
            response = await self._handler(request)
        except DropConnection:
            if self._transport is not None:
                self._transport.abort()
            return
        except Exception as exc:  # a bug in a handler: answer 500 rather than hang the client
            response = HttpResponse(500, f'{{"code":-1000,"msg":"internal error: {type(exc).__name__}"}}'.encode())
        self._write(response, keep_alive)
        if keep_alive and self._transport is not None:
            self._transport.resume_reading()

    def _write(self, response: HttpResponse, keep_alive: bool) -> None:
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        head = [
            f"HTTP/1.1 {response.status} {_REASONS.get(response.status, 'Unknown')}",
            f"Content-Type: {response.content_type}",
            f"Content-Length: {len(response.body)}",
        ]
        head += [f"{k}: {v}" for k, v in response.headers]
        if not keep_alive:
            head.append("Connection: close")
        transport.write(("\r\n".join(head) + "\r\n\r\n").encode() + response.body)
        if not keep_alive:
            transport.close()


async def serve(handler: Handler, host: str, port: int) -> asyncio.Server:
    """Start listening; the caller keeps the server and closes it."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _Protocol(handler), host, port, reuse_address=True, backlog=1024)
