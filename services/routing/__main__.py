"""``python -m services.routing``: route created orders to a venue and report the fills.

Consumes ``order.created`` and ``order.cancel_requested`` as the exclusive group ``routing``
and trades on the venues of ``ZVT_ROUTING_VENUES``: the in-process paper venue and/or ccxt
venues (real exchanges, or the simulated venue servers of the staging profile). Follows the
GTC orders resting at the venues for the shards it owns (``RoutingStage.follow``, every
``ZVT_ROUTING_FOLLOW_INTERVAL_S``). Publishes the instrument catalogue of its venues' markets,
and one routing process at a time runs the market feed (``services.routing.market``): the
marks and ``price.updated`` from the venues' prices, and the catalogue again now and then.
"""

from __future__ import annotations

from services.core.bus import default_consumer_name
from services.core.hotstate import StateKeys
from services.core.marks import Marks
from services.core.replication import ReplicaWait
from services.core.runtime import BatchFn, Service, main
from services.core.settings import load
from services.core.telemetry import get_logger
from services.routing.market import MarketFeed
from services.routing.settings import RoutingSettings
from services.routing.stage import GROUP, HANDLED, RoutingStage, VenueHealth
from services.routing.venues import build_venues
from services.venues.ccxt import close_shared_clients

log = get_logger("zvt.routing")


def build(service: Service) -> None:
    settings = load(RoutingSettings)
    feeds: list[MarketFeed] = []
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
        feed = MarketFeed(
            service.bus, venues, owner=default_consumer_name(service.name),
            catalogue_interval_s=settings.catalogue_interval_s,
        )
        await feed.open()
        feeds.append(feed)
        return stage.handle

    async def run_feed() -> None:
        interval = settings.feed_interval_s
        if interval <= 0:
            return
        while not await service.sleep(interval):
            if not feeds:
                continue
            try:
                await feeds[0].step(interval)
            except Exception:
                log.exception("the market feed failed; next step in a moment")

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
