"""The venues a process trades on, from ``ZVT_ROUTING_VENUES``: the routing service and the
workflows worker (``execute_order``, ``orders.reconcile``) build the same set."""

from __future__ import annotations

from typing import Any

from services.core.keys import Keys
from services.routing.settings import RoutingSettings, parse_venues
from services.venues.base import Venue
from services.venues.ccxt import CcxtVenue, CcxtVenueConfig
from services.venues.paper import PaperFaults, PaperVenue

__all__ = ["build_venues"]


def build_venues(settings: RoutingSettings, redis: Any, keys: Keys) -> list[Venue]:
    venues: list[Venue] = []
    for name, exchange, url in parse_venues(settings.venues):
        if exchange is None:
            venues.append(PaperVenue(
                name, faults=PaperFaults(latency=settings.paper_latency_ms / 1000),
                volatility=settings.feed_volatility, seed=settings.feed_seed,
            ))
            continue
        config = CcxtVenueConfig(
            name=name, exchange=exchange, account=settings.ccxt_account, api_url=url,
            api_key=settings.ccxt_api_key.get_secret_value(), secret=settings.ccxt_secret.get_secret_value(),
            timeout_s=settings.ccxt_timeout_s, rate_per_s=settings.ccxt_rate_per_s, burst=settings.ccxt_burst,
            breaker_failures=settings.breaker_failures, breaker_cooldown_s=settings.breaker_cooldown_s,
        )
        venues.append(CcxtVenue(config, redis=redis, keys=keys))
    return venues
