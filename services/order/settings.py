"""Settings of the order records' lifetime in Redis (``ZVT_ORDER_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import register

__all__ = ["OrderSettings"]


@register
class OrderSettings(BaseSettings):
    """How long Redis keeps what it knows of each order once the order is over. Past it, the API
    serves the order from the event store (rebuilt from its events), so these bound Redis memory
    under sustained load, not what clients can see."""

    model_config = SettingsConfigDict(env_prefix="ZVT_ORDER_", extra="ignore", frozen=True)

    terminal_retention_s: int = Field(
        86_400,
        ge=1,
        le=90 * 86_400,
        description="How long a finished order's record stays in Redis after the order stage moves it to a "
        "terminal status (the record is set to expire in the same commit); its entry in the portfolio's "
        "orders index is trimmed once the order is this old. After that `GET /v1/orders/{id}` and "
        "`GET /v1/portfolios/{id}/orders` rebuild the order from the event store. Redis memory of "
        "finished orders ≈ orders/s × this × ~1 KB.",
    )
    fill_memory_s: int = Field(
        30 * 86_400,
        ge=1,
        le=90 * 86_400,
        description="How long the portfolio stage remembers the fill ids it applied to each order "
        "(`applied:<order>`, renewed with each fill), so that the same venue fill reported again under "
        "another event id is not applied twice. ≈ 150 B per filled order while remembered; keep it "
        "longer than a venue's late report can be (and than `ZVT_ORDER_TERMINAL_RETENTION_S`).",
    )
