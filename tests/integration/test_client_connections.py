"""The Python client against a real gateway process when a connection fails under it.

The demo job once got ``httpx.ReadError`` on ``POST /v1/orders`` with a healthy stack: a
keep-alive race. uvicorn closed a connection for being idle (its default 5 s) just as the
client's pool (httpx's default expiry, also 5 s) reused it for the next request, so the
server reset the connection instead of answering. A cutting proxy in front of the gateway
makes that moment happen on demand: it closes (resets) the client's connection as a request
arrives on it, or after the gateway answered but before the answer is passed on.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from decimal import Decimal

import httpx
import pytest

from services.client import AsyncClient, Client, OrderRequest
from services.client.client import KEEPALIVE_EXPIRY_S
from services.gateway.settings import GatewaySettings
from tests.integration.gateway_proc import ADMIN, gateway_process

KEEP_ALIVE_S = 1  # the gateway's here: short, so the keep-alive test needs no long idle


@pytest.fixture(scope="module")
def gateway(redis_single_url: str) -> Iterator[str]:
    with gateway_process(redis_single_url, ZVT_GATEWAY_KEEP_ALIVE_S=str(KEEP_ALIVE_S)) as base:
        yield base


@dataclass
class CuttingProxy:
    """HTTP/1.1 proxy to the gateway. ``plans[n]`` scripts the n-th client connection, one
    step per request: ``forward``, ``reset_before`` (the request never reaches the gateway)
    or ``reset_after`` (it does; the answer is dropped). Requests past the plan: forwarded."""

    upstream: tuple[str, int]
    plans: list[list[str]] = field(default_factory=list)
    connections: int = 0
    forwarded: int = 0
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        plan = list(self.plans[self.connections]) if self.connections < len(self.plans) else []
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(*self.upstream)
        try:
            while True:
                request = await _message(reader)
                if request is None:
                    return
                step = plan.pop(0) if plan else "forward"
                if step == "reset_before":
                    _reset(writer)
                    return
                up_writer.write(request)
                await up_writer.drain()
                self.forwarded += 1
                response = await _message(up_reader)
                assert response is not None
                if step == "reset_after":
                    _reset(writer)
                    return
                writer.write(response)
                await writer.drain()
        finally:
            up_writer.close()
            if not writer.is_closing():
                writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self.handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        async with server:
            yield f"http://127.0.0.1:{self.port}"


async def _message(reader: asyncio.StreamReader) -> bytes | None:
    """One HTTP/1.1 message (head and Content-Length body), or None at the end."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    length = 0
    for line in head.split(b"\r\n"):
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
    return head + (await reader.readexactly(length) if length else b"")


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with RST, as a server does when a request arrives on a socket it just closed."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


def upstream(gateway: str) -> tuple[str, int]:
    host, port = gateway.removeprefix("http://").split(":")
    return host, int(port)


async def orders_of(gateway: str, portfolio: str) -> list[str]:
    async with AsyncClient(gateway, ADMIN) as api:
        return [o.client_order_id for o in await api.orders(portfolio)]


def new_order(portfolio: str) -> OrderRequest:
    return OrderRequest(portfolio_id=portfolio, symbol="BTC/USDT", side="buy", quantity=Decimal("0.01"))


async def test_client_when_connection_reset_as_submit_reuses_it_retries_to_exactly_one_order(gateway: str) -> None:
    portfolio = f"pf-{uuid.uuid4().hex[:8]}"
    # connection 1: the portfolio call, then the submit arrives as the server drops the connection
    proxy = CuttingProxy(upstream(gateway), plans=[["forward", "reset_before"]])
    async with proxy.serving() as url, AsyncClient(url, ADMIN) as api:
        await api.put_portfolio(portfolio, balances={"USDT": "1000"})
        request = new_order(portfolio)
        placed = await api.place_order(request)
    assert placed.http_status == 202 and proxy.connections == 2
    assert await orders_of(gateway, portfolio) == [request.client_order_id]


async def test_client_when_connection_drops_after_submit_reached_gateway_retries_to_the_same_order(
    gateway: str,
) -> None:
    portfolio = f"pf-{uuid.uuid4().hex[:8]}"
    proxy = CuttingProxy(upstream(gateway), plans=[["forward", "reset_after"]])
    async with proxy.serving() as url, AsyncClient(url, ADMIN) as api:
        await api.put_portfolio(portfolio, balances={"USDT": "1000"})
        request = new_order(portfolio)
        placed = await api.place_order(request)
    # the first try made the order; the repeat found it: 200, the same order, no second one
    assert placed.http_status == 200 and placed.client_order_id == request.client_order_id
    assert proxy.forwarded == 3
    assert await orders_of(gateway, portfolio) == [request.client_order_id]


async def test_sync_client_when_connection_reset_under_submit_retries_to_exactly_one_order(gateway: str) -> None:
    portfolio = f"pf-{uuid.uuid4().hex[:8]}"
    proxy = CuttingProxy(upstream(gateway), plans=[["forward", "reset_after"], ["reset_before"]])
    async with proxy.serving() as url:
        def run() -> int:
            with Client(url, ADMIN) as api:
                api.put_portfolio(portfolio, balances={"USDT": "1000"})
                return api.place_order(new_order(portfolio)).http_status

        # two lost answers in a row (one after the gateway took the order, one before), then an answer
        assert await asyncio.to_thread(run) == 200
    assert len(await orders_of(gateway, portfolio)) == 1


async def test_client_when_call_not_repeatable_raises_the_transport_error_without_retrying(gateway: str) -> None:
    proxy = CuttingProxy(upstream(gateway), plans=[["reset_after"]])
    async with proxy.serving() as url, AsyncClient(url, ADMIN) as api:
        with pytest.raises(httpx.TransportError):
            await api.create_api_key("once", portfolios=["p"], scopes=["read"])
    assert proxy.connections == 1 and proxy.forwarded == 1  # the key was made once; never asked again


def test_gateway_when_connection_idle_closes_it_after_its_keep_alive_setting(gateway: str) -> None:
    # the configured keep-alive is honoured (uvicorn's own default, 5 s, was in effect before)
    host, port = upstream(gateway)
    with socket.create_connection((host, port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: gw\r\n\r\n")
        answer = b""
        while not answer.endswith(b'{"status":"ok"}'):
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 200")
        started = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the gateway
        idle = time.monotonic() - started
    assert KEEP_ALIVE_S - 0.3 <= idle <= KEEP_ALIVE_S + 1.5
    # and by default far longer than the client ever keeps an idle connection
    assert GatewaySettings().keep_alive_s >= 10 * KEEPALIVE_EXPIRY_S
