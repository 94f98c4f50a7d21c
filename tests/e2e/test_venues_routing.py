"""Routing across three simulated venue servers through ccxt, with the fleet's stages as real
processes: the best net price wins, a venue that accepts and then times out leaves one order
resolved to its final state, a 429 reroutes and the venue comes back after its Retry-After, a
venue that goes down is skipped. No client order id ever reaches two venues or one venue twice."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import urllib.request
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest

from devstack.fleet import STAGING_VENUES, start_venue, venues_setting
from services.core.codec import decode_any
from services.core.events import EventType, ExchangeRouted
from services.core.hotstate import PositionRecord, StateKeys, load
from services.core.inject import OrderSpec, inject_orders, read_orders, seed_portfolio
from services.trading import OrderType, Side
from services.trading.orders import OrderStatus
from tests.e2e.conftest import SHARDS, Stack
from tests.e2e.test_pipeline import wait_terminal
from tests.integration.conftest import Target, eventually

D = Decimal


@pytest.fixture
def e2e_target(redis_single_url: str) -> Target:
    """Single Redis only: the bus topologies are covered elsewhere; here it is the venues."""
    return Target("single", redis_single_url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Venues:
    def __init__(self, log_dir: Path) -> None:
        self.ports: dict[str, int] = {}
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        for name, args in STAGING_VENUES:
            port = _free_port()
            self.ports[name] = port
            self.procs[name] = start_venue(name, port, log_dir, args)

    def control(self, name: str, path: str, body: dict[str, Any] | None = None) -> Any:
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(f"http://127.0.0.1:{self.ports[name]}{path}", data=data,
                                         method="POST" if data is not None else "GET")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def holders(self, client_order_id: str) -> list[str]:
        """Every venue order with this client id, as venue names (one entry per order)."""
        out = []
        for name, proc in self.procs.items():
            if proc.poll() is None:
                orders = self.control(name, "/sim/orders")["orders"]
                out += [name for o in orders if o["clientOrderId"] == client_order_id]
        return out

    def stop(self, name: str) -> None:
        self.procs[name].terminate()
        self.procs[name].wait(timeout=10)


@pytest.fixture
def venues(tmp_path: Path) -> Iterator[Venues]:
    v = Venues(tmp_path / "venues")
    try:
        yield v
    finally:
        for proc in v.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(timeout=10)


def _start(stack: Stack, venues: Venues) -> None:
    stack.fleet.start(["risk", "order", "portfolio"])
    stack.fleet.start(["routing"], env={
        "ZVT_ROUTING_VENUES": venues_setting(venues.ports.items()),
        "ZVT_ROUTING_CCXT_TIMEOUT_S": "1",
        "ZVT_ROUTING_BREAKER_COOLDOWN_S": "60",
        "ZVT_ROUTING_QUOTE_INTERVAL_S": "0.2",
    })


async def _routed(stack: Stack, order_id: str) -> ExchangeRouted:
    for shard in range(SHARDS):
        for _, fields in await stack.redis.xrange(stack.bus.keys.stream(shard, EventType.EXCHANGE_ROUTED)):
            event = decode_any(fields[b"d"])
            if event.payload.order_id == order_id:
                payload: ExchangeRouted = event.payload
                return payload
    raise AssertionError(f"no exchange.routed for {order_id}")


async def _place(stack: Stack, specs: list[OrderSpec]) -> tuple[list[str], list[Any]]:
    ids = await inject_orders(stack.bus, specs)
    records = await wait_terminal(stack, [(s.portfolio_id, i) for s, i in zip(specs, ids, strict=True)], timeout=60)
    return ids, records


async def test_routing_across_sim_venues_when_one_accepts_then_times_out_resolves_once(
    stack: Stack, venues: Venues
) -> None:
    _start(stack, venues)
    await seed_portfolio(stack.bus, "pf-v", {"USDT": D("10000000"), "BTC": D("10")})
    # simc quotes a little above sima with far lower fees: the best net price both ways.
    ids, records = await _place(stack, [
        OrderSpec("pf-v", "BTC/USDT", Side.BUY, D("0.01")),
        OrderSpec("pf-v", "BTC/USDT", Side.SELL, D("0.02")),
    ])
    assert [(r.status, r.venue) for r in records] == [(OrderStatus.FILLED, "simc")] * 2
    routed = await _routed(stack, ids[0])
    assert routed.venue == "simc" and {c.venue for c in routed.candidates} == {"sima", "simb", "simc"}
    assert all(c.healthy for c in routed.candidates) and "best net buy price of 3" in routed.reason
    quotes = {c.venue: c for c in routed.candidates}
    assert quotes["simc"].fee_rate == D("0.0005") and quotes["simb"].fee_rate == D("0.0015")
    assert quotes["simb"].expected_price is not None and quotes["simc"].expected_price is not None
    assert quotes["simb"].expected_price < quotes["simc"].expected_price  # cheaper, but dearer net of fees

    # simc takes the next order, then answers 3 s late (the client gives up after 1 s).
    venues.control("simc", "/sim/faults", {"kind": "accept_then_timeout", "delay_s": 3})
    [timed_out], [record] = await _place(stack, [OrderSpec("pf-v", "BTC/USDT", Side.BUY, D("0.03"))])
    assert (record.status, record.venue, record.filled_quantity) == (OrderStatus.FILLED, "simc", D("0.03"))
    assert venues.holders(timed_out) == ["simc"]
    for order_id in ids:
        assert venues.holders(order_id) == ["simc"]


async def test_routing_across_sim_venues_when_rate_limited_or_down_reroutes_without_duplicates(
    stack: Stack, venues: Venues
) -> None:
    _start(stack, venues)
    await seed_portfolio(stack.bus, "pf-w", {"USDT": D("10000000")})
    # A 429 from simc: the order was not placed there; it goes to the next best (sima) and
    # simc is skipped for its Retry-After, then used again.
    venues.control("simc", "/sim/faults", {"kind": "rate_limit", "retry_after": 2})
    [limited], [record] = await _place(stack, [OrderSpec("pf-w", "BTC/USDT", Side.BUY, D("0.01"))])
    assert (record.status, record.venue) == (OrderStatus.FILLED, "sima")
    assert venues.holders(limited) == ["sima"]
    routed = await _routed(stack, limited)
    assert "skipped after a failed submit: simc (RateLimited)" in routed.reason
    await asyncio.sleep(2.5)
    [after], [record] = await _place(stack, [OrderSpec("pf-w", "BTC/USDT", Side.BUY, D("0.01"))])
    assert record.venue == "simc" and venues.holders(after) == ["simc"]

    # simc goes away entirely: orders go to sima, each exactly once.
    venues.stop("simc")
    specs = [OrderSpec("pf-w", "BTC/USDT", Side.BUY, D("0.01")) for _ in range(5)]
    ids, records = await _place(stack, specs)
    assert [(r.status, r.venue) for r in records] == [(OrderStatus.FILLED, "sima")] * 5
    for order_id in ids:
        assert venues.holders(order_id) == ["sima"]
    routed = await _routed(stack, ids[-1])
    assert {c.venue: c.healthy for c in routed.candidates}["simc"] is False


async def test_resting_limit_at_a_sim_venue_when_its_price_moves_through_fills_later_and_moves_the_position(
    stack: Stack, venues: Venues
) -> None:
    """A GTC limit away from the market rests at the venue it was routed to (through ccxt);
    each ``POST /sim/price`` that brings the venue's market to its price fills part of it
    there, routing reports every fill with the venue's id, and the position follows."""
    _start(stack, venues)
    await seed_portfolio(stack.bus, "pf-rv", {"USDT": D("10000000")})
    (oid,) = await inject_orders(stack.bus, [OrderSpec("pf-rv", "BTC/USDT", Side.BUY, D("2"), OrderType.LIMIT, D("58000"))])

    async def record() -> Any:
        (r,) = await read_orders(stack.bus, [("pf-rv", oid)])
        return r

    await eventually(lambda: _status_in(record, OrderStatus.ROUTED), timeout=30)
    routed = await record()
    assert venues.holders(oid) == [routed.venue] and routed.filled_quantity == 0
    for _ in range(6):  # the venue's best ask near 58,000 holds less than 1 BTC
        venues.control(routed.venue, "/sim/price", {"symbol": "BTC/USDT", "price": "57950"})
        venues.control(routed.venue, "/sim/price", {"symbol": "BTC/USDT", "price": "59000"})
        if (await record()).status is OrderStatus.FILLED:
            break
        await asyncio.sleep(1.0)
    (done,) = await wait_terminal(stack, [("pf-rv", oid)], timeout=30)
    assert done.status is OrderStatus.FILLED and done.filled_quantity == D("2") and len(done.fills) >= 3
    assert {f.price for f in done.fills} == {D("58000")} and {f.liquidity for f in done.fills} == {"maker"}
    assert all(f.venue == routed.venue and f.venue_fill_id for f in done.fills)
    assert venues.holders(oid) == [routed.venue]  # never placed anywhere else, nor twice
    sk = StateKeys(stack.bus.keys)

    async def position_follows() -> bool:
        raw = await stack.redis.hget(sk.positions("pf-rv"), "BTC/USDT")
        return raw is not None and load(PositionRecord, raw).quantity == D("2")

    await eventually(position_follows, timeout=20)
    assert not await stack.redis.hexists(sk.resting("pf-rv"), oid)


async def _status_in(read: Any, *wanted: OrderStatus) -> bool:
    r = await read()
    return r is not None and r.status in wanted


async def test_submit_when_its_answer_is_lost_and_the_venue_cannot_be_asked_shows_unknown_until_resolved(
    stack: Stack, venues: Venues
) -> None:
    """The venue takes the order and its answer never comes; the lookup fails too (the venue
    goes down): the order says ``unknown``, not ``created``, while routing retries. Once the
    venue answers again the retry finds the order there, and it ends once, at that venue."""
    _start(stack, venues)
    await seed_portfolio(stack.bus, "pf-u", {"USDT": D("10000000")})
    venues.control("simc", "/sim/faults", {"kind": "accept_then_timeout", "delay_s": 30})
    (oid,) = await inject_orders(stack.bus, [OrderSpec("pf-u", "BTC/USDT", Side.BUY, D("0.01"))])

    async def record() -> Any:
        (r,) = await read_orders(stack.bus, [("pf-u", oid)])
        return r

    async def held() -> bool:
        return venues.holders(oid) == ["simc"]

    await eventually(held, timeout=30)
    venues.control("simc", "/sim/faults", {"kind": "down"})  # the lookup cannot reach it either
    await eventually(lambda: _status_in(record, OrderStatus.UNKNOWN), timeout=40)
    unknown = await record()
    assert unknown.venue == "simc" and not unknown.fills
    venues.control("simc", "/sim/faults", {"kind": "up"})
    (done,) = await wait_terminal(stack, [("pf-u", oid)], timeout=90)
    assert (done.status, done.venue, done.filled_quantity) == (OrderStatus.FILLED, "simc", D("0.01"))
    assert venues.holders(oid) == ["simc"]  # looked up, never submitted again
