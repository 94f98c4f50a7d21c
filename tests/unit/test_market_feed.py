"""The market feed over the paper venue, with Redis and the bus replaced by dictionaries: it
publishes the catalogue, seeds missing marks, keeps marks still at volatility 0 and, when the
walk moves them, writes them and announces each as ``price.updated``."""

from __future__ import annotations

from decimal import Decimal
from typing import Any

from services.core.catalogue import decode_catalogue
from services.core.events import Event, PriceUpdated
from services.core.hotstate import StateKeys
from services.core.keys import Keys
from services.routing.market import MarketFeed
from services.venues.paper import PaperVenue

D = Decimal
KEYS = Keys("u", 4)
MARKS = StateKeys(KEYS).marks()


class FakeRedis:
    def __init__(self) -> None:
        self.strings: dict[str, bytes] = {}
        self.hashes: dict[str, dict[bytes, bytes]] = {}

    async def set(self, key: str, value: Any, nx: bool = False, px: int | None = None) -> bool:
        if nx and key in self.strings:
            return False
        self.strings[key] = value if isinstance(value, bytes) else str(value).encode()
        return True

    async def get(self, key: str) -> bytes | None:
        return self.strings.get(key)

    async def pexpire(self, key: str, ms: int) -> bool:
        return key in self.strings

    async def hgetall(self, key: str) -> dict[bytes, bytes]:
        return dict(self.hashes.get(key, {}))

    async def hset(self, key: str, mapping: dict[str, str]) -> int:
        self.hashes.setdefault(key, {}).update({k.encode(): v.encode() for k, v in mapping.items()})
        return len(mapping)

    async def hsetnx(self, key: str, field: str, value: str) -> bool:
        h = self.hashes.setdefault(key, {})
        if field.encode() in h:
            return False
        h[field.encode()] = value.encode()
        return True


class FakeBus:
    def __init__(self) -> None:
        self.redis = FakeRedis()
        self.keys = KEYS
        self.published: list[Event[Any]] = []

    async def publish_many(self, events: list[Event[Any]]) -> list[bytes]:
        self.published += events
        return [b"0-0"] * len(events)


def marks(bus: FakeBus) -> dict[str, Decimal]:
    return {k.decode(): D(v.decode()) for k, v in bus.redis.hashes.get(MARKS, {}).items()}


async def test_feed_when_opened_publishes_the_catalogue_and_seeds_only_missing_marks() -> None:
    bus = FakeBus()
    await bus.redis.hset(MARKS, {"BTC/USDT": "61000"})
    feed = MarketFeed(bus, [PaperVenue("paper", volatility=D(0))], owner="r1")  # type: ignore[arg-type]
    await feed.open()
    catalogue = decode_catalogue(bus.redis.strings[StateKeys(KEYS).catalogue()])
    assert sorted(catalogue.instruments) == ["BTC/USDT", "ETH/USDT", "SOL/USDT"]
    assert marks(bus) == {"BTC/USDT": D("61000"), "ETH/USDT": D("3000"), "SOL/USDT": D("150")}


async def test_feed_when_volatility_is_zero_keeps_the_marks_a_test_set() -> None:
    bus = FakeBus()
    venue = PaperVenue("paper", volatility=D(0))
    feed = MarketFeed(bus, [venue], owner="r1")  # type: ignore[arg-type]
    await feed.open()
    await bus.redis.hset(MARKS, {"BTC/USDT": "58900"})
    for _ in range(3):
        assert await feed.step(1.0)
    assert marks(bus)["BTC/USDT"] == D("58900") and not bus.published
    assert venue.mid("BTC/USDT") == D("58900")  # the elected process's paper venue follows the marks


async def test_feed_when_the_walk_moves_writes_the_marks_and_announces_each_move() -> None:
    bus = FakeBus()
    venue = PaperVenue("paper", volatility=D("0.01"), seed=7)
    feed = MarketFeed(bus, [venue], owner="r1")  # type: ignore[arg-type]
    await feed.open()
    assert await feed.step(1.0)
    moved = {e.payload.symbol: e for e in bus.published}
    assert moved and all(isinstance(e.payload, PriceUpdated) for e in moved.values())
    for symbol, event in moved.items():
        assert event.payload.mark == marks(bus)[symbol] == venue.mid(symbol)
        assert event.payload.venue == "paper" and event.portfolio_id == f"market:{symbol}"


async def test_feed_when_another_process_holds_it_does_nothing() -> None:
    bus = FakeBus()
    first = MarketFeed(bus, [PaperVenue("paper", volatility=D("0.01"))], owner="r1")  # type: ignore[arg-type]
    second = MarketFeed(bus, [PaperVenue("paper", volatility=D("0.01"))], owner="r2")  # type: ignore[arg-type]
    await first.open()
    assert await first.step(1.0) and not await second.step(1.0)
