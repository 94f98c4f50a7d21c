"""Settings of the routing service (``ZVT_ROUTING_``)."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import register

__all__ = ["RoutingSettings", "parse_venues"]


@register
class RoutingSettings(BaseSettings):
    """Routing: the venues it trades on (the in-process paper venue, ccxt venues) and the
    market feed (the marks and the instrument catalogue, from the venues)."""

    model_config = SettingsConfigDict(env_prefix="ZVT_ROUTING_", extra="ignore", frozen=True)

    paper_latency_ms: float = Field(
        0.0, ge=0, le=10_000, description="Simulated latency of every paper venue call, milliseconds."
    )
    feed_interval_s: float = Field(
        1.0, ge=0, le=3600,
        description="How often the market feed sets the marks from the venues' prices (and steps the paper "
        "venue's random walk); 0 turns the feed off.",
    )
    feed_volatility: Decimal = Field(
        Decimal("0.0005"), ge=0, le=Decimal("0.1"),
        description="Largest move of one step of the paper venue's random walk, as a fraction of its price; "
        "0 keeps its prices (and marks made from them alone) still.",
    )
    feed_seed: int = Field(0, ge=0, description="Seed of the paper venue's random walk.")
    catalogue_interval_s: float = Field(
        300.0, gt=0, le=86_400,
        description="How often the market feed builds the instrument catalogue from the venues' markets again.",
    )
    follow_interval_s: float = Field(
        0.5, gt=0, le=60,
        description="How often routing asks the venues about the GTC orders resting there (new fills, their end).",
    )
    venues: str = Field(
        "paper",
        description="The venues, comma-separated: `paper` (in-process) and/or `NAME=EXCHANGE@URL` (ccxt's client "
        "for EXCHANGE, e.g. `binance`, against URL; a simulated venue server in staging), e.g. "
        "`sima=binance@http://127.0.0.1:9101,simb=binance@http://127.0.0.1:9102`.",
    )
    ccxt_api_key: SecretStr = Field(SecretStr("sim-key"), description="API key of the ccxt venues' account.")
    ccxt_secret: SecretStr = Field(SecretStr("sim-secret"), description="Signing secret of the ccxt venues' account.")
    ccxt_account: str = Field("default", description="Account name: rate limits and breakers are per (venue, account).")
    ccxt_timeout_s: float = Field(5.0, gt=0, le=120, description="Timeout of one ccxt request, seconds.")
    ccxt_rate_per_s: float = Field(
        50.0, gt=0, le=100_000, description="Requests a second per (venue, account), shared by every routing process."
    )
    ccxt_burst: int = Field(100, ge=1, le=1_000_000, description="Burst of that shared token bucket.")
    breaker_failures: int = Field(3, ge=1, le=1000, description="Unreachable calls in a row that open a venue's breaker.")
    breaker_cooldown_s: float = Field(
        5.0, gt=0, le=3600, description="How long an open breaker skips a venue (a 418/429 uses its Retry-After)."
    )
    quote_interval_s: float = Field(
        0.5, gt=0, le=60, description="How often routing refreshes the best bid/ask of each ccxt venue."
    )

    @field_validator("venues")
    @classmethod
    def _check_venues(cls, value: str) -> str:
        parse_venues(value)
        return value


def parse_venues(text: str) -> list[tuple[str, str | None, str | None]]:
    """``paper,a=binance@http://h:1`` -> ``[("paper", None, None), ("a", "binance", "http://h:1")]``."""
    out: list[tuple[str, str | None, str | None]] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part == "paper":
            out.append(("paper", None, None))
            continue
        name, sep, rest = part.partition("=")
        exchange, _, url = rest.partition("@")
        if not sep or not name or not exchange:
            raise ValueError(f"venue {part!r}: expected `paper` or NAME=EXCHANGE@URL")
        if url and not url.startswith(("http://", "https://")):
            raise ValueError(f"venue {part!r}: the URL must start with http:// or https://")
        out.append((name, exchange, url or None))
    names = [n for n, _, _ in out]
    if not out or len(set(names)) != len(names):
        raise ValueError("venues: at least one, names unique")
    return out
