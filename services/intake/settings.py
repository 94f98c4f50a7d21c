"""Settings of the intake (``ZVT_GATEWAY_ORDERS_INDEX_MAX``, ``ZVT_GATEWAY_IDEMPOTENCY_TTL_S``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import register

__all__ = ["IntakeSettings"]


@register
class IntakeSettings(BaseSettings):
    """Accepting orders, the same in the gateway and the workflows worker (a rebalance's child
    orders): read by both, so set them for every service (the chart's `config`), not for one.
    Named `ZVT_GATEWAY_` from when only the gateway accepted orders; deployments set them so."""

    model_config = SettingsConfigDict(env_prefix="ZVT_GATEWAY_", extra="ignore", frozen=True)

    orders_index_max: int = Field(
        10_000, ge=10, le=1_000_000, description="Newest order ids kept per portfolio in its order index."
    )
    idempotency_ttl_s: int = Field(
        7 * 86_400, ge=60, le=365 * 86_400, description="How long a client order id maps to its order (idempotency window)."
    )
