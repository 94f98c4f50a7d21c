"""Settings of the risk service (``ZVT_RISK_``)."""

from __future__ import annotations

from decimal import Decimal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import register

__all__ = ["DEFAULT_MARKET_SLIPPAGE", "RiskSettings"]

DEFAULT_MARKET_SLIPPAGE = Decimal("0.01")


@register
class RiskSettings(BaseSettings):
    """Risk: what a market order may cost beyond its reference price."""

    model_config = SettingsConfigDict(env_prefix="ZVT_RISK_", extra="ignore", frozen=True)

    market_slippage: Decimal = Field(
        DEFAULT_MARKET_SLIPPAGE, ge=0, le=Decimal("0.5"),
        description="How far past the reference price a market order may fill, as a fraction (0.01 = 1%): a "
        "market buy must afford and holds its quantity at the reference price plus this much (plus the taker "
        "fee), and routing caps its fills there.",
    )
