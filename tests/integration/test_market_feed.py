"""The market feed over the paper venue, against real Redis (single and cluster) and the real
bus: it publishes the catalogue, seeds missing marks, keeps marks still at volatility 0 and,
when the walk moves them, writes them and announces each as ``price.updated``."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from services.core.bus import Bus
from services.core.catalogue import decode_catalogue
from services.core.codec import decode_any
from services.core.events import EventType, PriceUpdated
from services.core.hotstate import StateKeys
from services.routing.market import MarketFeed
from services.venues.paper import PaperVenue

D = Decimal
SYMBOLS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")


async def marks(bus: Bus) -> dict[str, Decimal]:
    raw = await bus.redis.hgetall(StateKeys(bus.keys).marks())
    return {k.decode(): D(v.decode()) for k, v in raw.items()}


async def published(bus: Bus) -> list[Any]:
    """The ``price.updated`` events on the bus, oldest first per symbol."""
    out = []
    for symbol in SYMBOLS:
        stream = bus.keys.stream(bus.keys.shard_of(f"market:{symbol}"), EventType.PRICE_UPDATED)
        out += [decode_any(fields[b"d"]) for _, fields in await bus.redis.xrange(stream)]
    return out


async def test_feed_when_opened_publishes_the_catalogue_and_seeds_only_missing_marks(bus: Bus) -> None:
    await bus.redis.hset(StateKeys(bus.keys).marks(), "BTC/USDT", "61000")
    feed = MarketFeed(bus, [PaperVenue("paper", volatility=D(0))], owner="r1")
    await feed.open()
    catalogue = decode_catalogue(await bus.redis.get(StateKeys(bus.keys).catalogue()))
    assert sorted(catalogue.instruments) == list(SYMBOLS)
    assert await marks(bus) == {"BTC/USDT": D("61000"), "ETH/USDT": D("3000"), "SOL/USDT": D("150")}


async def test_feed_when_volatility_is_zero_keeps_the_marks_a_test_set(bus: Bus) -> None:
    venue = PaperVenue("paper", volatility=D(0))
    feed = MarketFeed(bus, [venue], owner="r1")
    await feed.open()
    await bus.redis.hset(StateKeys(bus.keys).marks(), "BTC/USDT", "58900")
    for _ in range(3):
        assert await feed.step(1.0)
    assert (await marks(bus))["BTC/USDT"] == D("58900") and not await published(bus)
    assert venue.mid("BTC/USDT") == D("58900")  # the elected process's paper venue follows the marks


async def test_feed_when_the_walk_moves_writes_the_marks_and_announces_each_move(bus: Bus) -> None:
    venue = PaperVenue("paper", volatility=D("0.01"), seed=7)
    feed = MarketFeed(bus, [venue], owner="r1")
    await feed.open()
    assert await feed.step(1.0)
    moved = {e.payload.symbol: e for e in await published(bus)}
    assert moved and all(isinstance(e.payload, PriceUpdated) for e in moved.values())
    now = await marks(bus)
    for symbol, event in moved.items():
        assert event.payload.mark == now[symbol] == venue.mid(symbol)
        assert event.payload.venue == "paper" and event.portfolio_id == f"market:{symbol}"


async def test_feed_when_another_process_holds_it_does_nothing(bus: Bus) -> None:
    first = MarketFeed(bus, [PaperVenue("paper", volatility=D("0.01"))], owner="r1")
    second = MarketFeed(bus, [PaperVenue("paper", volatility=D("0.01"))], owner="r2")
    await first.open()
    assert await first.step(1.0) and not await second.step(1.0)
