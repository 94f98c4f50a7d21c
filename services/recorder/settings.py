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
        description="PostgreSQL of the event store, as the role that owns its tables (a secret in production: "
        "pass it by reference). TLS: `ZVT_POSTGRES_*` or `?sslmode=verify-full&sslrootcert=...`.",
    )
    pool_size: int = Field(4, ge=1, le=64, description="Connections to the event store.")
    reader_role: str | None = Field(
        None,
        min_length=1,
        max_length=63,
        pattern=r"^[A-Za-z_][A-Za-z0-9_$]*$",
        description="An existing PostgreSQL role the recorder grants `SELECT` on the event store to at every "
        "start, and nothing else: the gateway's (`ZVT_GATEWAY_POSTGRES_DSN` logs in as it), so the public API "
        "can read the audit trail but never write it. Create the role first (docs/operations.md).",
    )
    connect_timeout_s: int = Field(
        5,
        ge=2,
        le=60,
        description="How long opening a connection to the event store may take, seconds (libpq's "
        "`connect_timeout`, whose minimum is 2).",
    )
    pool_timeout_s: float = Field(
        2.0,
        ge=0.1,
        le=60,
        description="How long a write waits for a pooled connection before the event store counts as down "
        "(the recorder then pauses and retries, spending none of the entries' delivery budget).",
    )
    write_timeout_s: float = Field(
        10.0,
        ge=0.5,
        le=300,
        description="How long one batch's write may take before the event store counts as down (a hung "
        "server; the driver may spend up to 10 s more cancelling the query). Keep this plus "
        "`ZVT_RECORDER_POOL_TIMEOUT_S` plus 10 s below `ZVT_BUS_RECLAIM_IDLE_MS`.",
    )
    health_interval_s: float = Field(
        2.0,
        ge=0.1,
        le=60,
        description="How often the event store is probed (`SELECT 1`) for `/readyz`; a write that finds it "
        "down or up tells at once.",
    )
