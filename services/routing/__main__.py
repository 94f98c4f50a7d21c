"""``python -m services.routing``: route created orders to a venue and report the fills.

Consumes ``order.created`` and ``order.cancel_requested`` as the exclusive group ``routing``
and trades on the venues of ``ZVT_ROUTING_VENUES``: the in-process paper venue and/or ccxt
venues (real exchanges, or the simulated venue servers of the staging profile). Follows the
GTC orders resting at the venues for the shards it owns (``RoutingStage.follow``, every
``ZVT_ROUTING_FOLLOW_INTERVAL_S``). One routing process at a time also runs the local price
feed (marks in Redis).
"""

from __future__ import annotations

from services.core.bus import default_consumer_name
from services.core.hotstate import StateKeys
from services.core.marks import Marks
from services.core.replication import ReplicaWait
from services.core.runtime import BatchFn, Service, main
from services.core.settings import load
from services.core.telemetry import get_logger
from services.routing.feed import PriceFeed
from services.routing.settings import RoutingSettings
from services.routing.stage import GROUP, HANDLED, RoutingStage, VenueHealth
from services.routing.venues import build_venues
from services.venues.ccxt import close_shared_clients
from services.venues.paper import DEFAULT_MARKETS, DEFAULT_PRICES

log = get_logger("zvt.routing")


def build(service: Service) -> None:
    settings = load(RoutingSettings)
    feeds: list[PriceFeed] = []
    stages: list[RoutingStage] = []

    async def open_stage(service: Service) -> BatchFn:
        assert service.redis is not None and service.bus is not None
        keys = service.bus.keys
        venues = build_venues(settings, service.redis, keys)
        stage = RoutingStage(
            service.redis, StateKeys(keys), Marks(service.redis, keys), venues,
            health=VenueHealth(settings.breaker_cooldown_s), replica_wait=ReplicaWait.of(service.bus_settings),
            bus=service.bus,
        )
        await stage.start()
        stages.append(stage)
        feed = PriceFeed(
            service.redis,
            keys,
            DEFAULT_PRICES,
            {s: m.price_step for s, m in DEFAULT_MARKETS.items()},
            volatility=settings.feed_volatility,
            seed=settings.feed_seed,
            owner=default_consumer_name(service.name),
        )
        await feed.seed_marks()
        feeds.append(feed)
        return stage.handle

    async def run_feed() -> None:
        interval = settings.feed_interval_s
        if interval <= 0 or settings.feed_volatility == 0:
            return
        while not await service.sleep(interval):
            await feeds[0].step(interval)

    async def run_follow() -> None:
        while not await service.sleep(settings.follow_interval_s):
            if not stages or service.bus is None:
                continue
            shards = sorted({s for c in service.consumers if c.group == GROUP for s in c.owned_shards})
            try:
                await stages[0].follow(service.bus, shards)
            except Exception:
                log.exception("following the resting orders failed; next pass in a moment")

    async def run_quotes() -> None:
        while not await service.sleep(settings.quote_interval_s):
            if stages:
                await stages[0].refresh_quotes()

    async def close_clients(service: Service) -> None:
        await close_shared_clients()

    service.stage(GROUP, HANDLED, open_stage)
    service.background(run_feed)
    service.background(run_quotes)
    service.background(run_follow)
    service.on_shutdown(close_clients)


if __name__ == "__main__":
    main("routing", build, __doc__ or "")
