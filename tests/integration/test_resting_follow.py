"""Routing following its resting orders, against real Redis (single and cluster) with two
routing stages, each with its own in-process paper venue, as two processes would be: a shard
changing hands, both following it at once, the old owner coming back to a stale copy at its
venue. Every execution reported reaches the stream once, and never more than the order."""

from __future__ import annotations

import asyncio
from decimal import Decimal
from typing import Any

from services.core.bus import Bus, Commit
from services.core.codec import decode_any
from services.core.events import Event, EventType, OrderCreated
from services.core.hotstate import StateKeys
from services.core.marks import Marks
from services.routing.stage import GROUP, RoutingStage
from services.trading import OrderType, Side
from services.venues.paper import PaperVenue

D = Decimal
PID = "pf-follow"


async def _mark(bus: Bus, price: str) -> None:
    await bus.redis.hset(Marks(bus.redis, bus.keys).key, "BTC/USDT", price)


async def _stage(bus: Bus) -> RoutingStage:
    stage = RoutingStage(bus.redis, StateKeys(bus.keys), Marks(bus.redis, bus.keys, refresh_s=0), [PaperVenue()], bus=bus)
    await stage.start()
    return stage


async def _route(bus: Bus, stage: RoutingStage, quantity: str, price: str) -> Event[Any]:
    """Route one GTC limit buy through ``stage`` and commit it as the workflow path does."""
    created = Event.new(
        OrderCreated(order_id="o-follow", client_order_id="c-follow", symbol="BTC/USDT", side=Side.BUY,
                     order_type=OrderType.LIMIT, quantity=D(quantity), price=D(price)),
        portfolio_id=PID,
    )
    shard = bus.keys.shard_of(PID)
    version = await bus.state_version(GROUP, shard)
    commit = Commit(bus.keys, shard)
    await stage.handle([(created, commit)])
    assert await bus.apply(GROUP, created, commit, version) is not None
    return created


async def _fills(bus: Bus) -> list[Any]:
    stream = bus.keys.stream(bus.keys.shard_of(PID), EventType.ORDER_EXECUTED)
    return [decode_any(fields[b"d"]).payload for _, fields in await bus.redis.xrange(stream)]


async def test_follow_when_the_market_reaches_a_resting_order_reports_each_fill_once(bus: Bus) -> None:
    await _mark(bus, "60000")
    stage = await _stage(bus)
    await _route(bus, stage, "2", "59000")
    shard = bus.keys.shard_of(PID)
    assert await stage.follow(bus, [shard]) == 0  # nothing moved: nothing to say
    await _mark(bus, "58900")
    assert await stage.follow(bus, [shard]) == 1  # one move: one partial fill, as maker
    (fill,) = await _fills(bus)
    assert fill.price == D("59000") and D(0) < fill.quantity < D("2") and fill.leaves_quantity == 2 - fill.quantity
    assert await stage.follow(bus, [shard]) == 0  # the mark did not move again
    for price in ("59500", "58900") * 3:
        await _mark(bus, price)
        await stage.follow(bus, [shard])
    fills = await _fills(bus)
    assert sum(f.quantity for f in fills) == D("2") and len({f.fill_id for f in fills}) == len(fills) >= 3
    assert fills[-1].leaves_quantity == 0 and fills[-1].cumulative_quantity == D("2")
    assert not await bus.redis.hlen(StateKeys(bus.keys).resting(PID))


async def test_follow_when_two_routers_follow_one_shard_never_reports_more_than_the_order(bus: Bus) -> None:
    """The shard moves from ``a`` to ``b`` and back while both keep following: ``b``'s paper
    venue never saw the order and places the rest again; ``a`` finds only a stale copy at its
    own, cancels it and places the rest again. Whatever each venue fills, the stream holds
    each reported execution once and never more than the order's quantity."""
    await _mark(bus, "60000")
    a, b = await _stage(bus), await _stage(bus)
    await _route(bus, a, "3", "59000")
    shard = bus.keys.shard_of(PID)
    for round_ in range(12):
        await _mark(bus, "58900" if round_ % 2 == 0 else "59500")
        await asyncio.gather(a.follow(bus, [shard]), b.follow(bus, [shard]))
        fills = await _fills(bus)
        assert sum(f.quantity for f in fills) <= D("3")
        assert len({f.fill_id for f in fills}) == len(fills)
        if not await bus.redis.hlen(StateKeys(bus.keys).resting(PID)):
            break
    fills = await _fills(bus)
    assert sum(f.quantity for f in fills) == D("3"), fills
    assert {f.venue_order_id for f in fills} >= {fills[0].venue_order_id}
    assert [f.cumulative_quantity for f in fills] == sorted(f.cumulative_quantity for f in fills)


async def test_follow_when_the_shard_comes_back_to_a_router_holding_a_stale_copy_places_the_rest_again(
    bus: Bus,
) -> None:
    """``a`` placed the order; ``b`` took the shard and placed the rest again at its venue;
    the shard comes back to ``a``, whose venue still holds its first venue order under the
    same client id. ``a`` cancels that copy and places the rest again, and the order fills."""
    await _mark(bus, "60000")
    a, b = await _stage(bus), await _stage(bus)
    await _route(bus, a, "2", "59000")
    shard = bus.keys.shard_of(PID)
    await _mark(bus, "58900")
    assert await a.follow(bus, [shard]) == 1  # a first fill at a's venue
    await _mark(bus, "59500")
    await b.follow(bus, [shard])  # b's venue never saw it: the rest placed again there
    await a.follow(bus, [shard])  # a's venue holds only its first copy: canceled, the rest placed again
    for price in ("58900", "59500") * 4:
        await _mark(bus, price)
        await a.follow(bus, [shard])
    fills = await _fills(bus)
    assert sum(f.quantity for f in fills) == D("2"), fills
    assert not await bus.redis.hlen(StateKeys(bus.keys).resting(PID))
    (venue,) = a.venues.values()
    assert isinstance(venue, PaperVenue) and venue.open_orders_now() == []
