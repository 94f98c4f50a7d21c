"""Settings of the routing service (``ZVT_ROUTING_``)."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import register

__all__ = ["RoutingSettings"]


@register
class RoutingSettings(BaseSettings):
    """Routing: the paper venue it trades on and the local price feed."""

    model_config = SettingsConfigDict(env_prefix="ZVT_ROUTING_", extra="ignore", frozen=True)

    paper_latency_ms: float = Field(
        0.0, ge=0, le=10_000, description="Simulated latency of every paper venue call, milliseconds."
    )
    feed_interval_s: float = Field(
        1.0, ge=0, le=3600, description="How often the local price feed moves the marks; 0 turns the feed off."
    )
    feed_volatility: Decimal = Field(
        Decimal("0.0005"), ge=0, le=Decimal("0.1"),
        description="Largest move of one feed step, as a fraction of the mark; 0 keeps marks still.",
    )
    feed_seed: int = Field(0, ge=0, description="Seed of the feed's random walk.")
