"""Settings of the recorder (``ZVT_RECORDER_``)."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import register

__all__ = ["RecorderSettings"]


@register
class RecorderSettings(BaseSettings):
    """The recorder: where the event store lives."""

    model_config = SettingsConfigDict(env_prefix="ZVT_RECORDER_", extra="ignore", frozen=True)

    postgres_dsn: str = Field(
        "postgresql://zvt:zvt@127.0.0.1:15432/zvt",
        pattern=r"^postgres(ql)?://",
        description="PostgreSQL of the event store (a secret in production: pass it by reference).",
    )
    pool_size: int = Field(4, ge=1, le=64, description="Connections to the event store.")
