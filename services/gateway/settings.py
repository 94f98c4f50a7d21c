"""Settings of the HTTP gateway (``ZVT_GATEWAY_``)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import register

__all__ = ["GatewaySettings"]


@register
class GatewaySettings(BaseSettings):
    """The HTTP gateway: where the public API listens, its keys, limits and backpressure."""

    model_config = SettingsConfigDict(env_prefix="ZVT_GATEWAY_", extra="ignore", frozen=True)

    host: str = Field("127.0.0.1", min_length=1, max_length=255, description="Address of the public API; `0.0.0.0` in a pod.")
    port: int = Field(8080, ge=0, le=65535, description="Port of the public API (with its own `/healthz`, `/readyz`; `/metrics` is on `ZVT_HTTP_PORT` only); 0 picks a free one.")
    admin_api_key: SecretStr | None = Field(
        None,
        min_length=16,
        max_length=256,
        description="Bootstrap admin API key, upserted (hashed) at start-up so operators can create the others. "
        "A secret: pass it by reference.",
    )
    postgres_dsn: str = Field(
        "postgresql://zvt:zvt@127.0.0.1:15432/zvt",
        pattern=r"^postgres(ql)?://",
        description="PostgreSQL event store read by `GET /v1/events` (a secret in production: pass it by reference). "
        "In production a read-only role (`ZVT_RECORDER_READER_ROLE`), not the recorder's; TLS: `ZVT_POSTGRES_*` "
        "or `?sslmode=verify-full&sslrootcert=...`.",
    )
    postgres_pool_size: int = Field(2, ge=1, le=64, description="Connections to the event store.")
    max_body_bytes: int = Field(65_536, ge=256, le=16 * 1024 * 1024, description="Largest request body accepted; larger gets 413.")
    key_cache_ttl_s: float = Field(
        1.0, ge=0, le=60, description="How long a process caches an API key lookup; a revoked key stops working within it."
    )
    key_cache_size: int = Field(
        10_000, ge=1, le=1_000_000,
        description="API key lookups a process caches, least recently used evicted first; as many again for unknown keys.",
    )
    bad_key_cache_ttl_s: float = Field(
        10.0, ge=0, le=600,
        description="How long a process remembers that a secret is no key, answering it 401 without asking Redis.",
    )
    key_order_rate: int = Field(
        1_000, ge=0, le=1_000_000,
        description="Orders one API key may submit per `ZVT_GATEWAY_KEY_ORDER_WINDOW_S`, counted in Redis over all "
        "gateway replicas; more get 429 `rate_limited`. 0: no limit.",
    )
    key_order_window_s: int = Field(
        1, ge=1, le=3600, description="The fixed window of `ZVT_GATEWAY_KEY_ORDER_RATE`, seconds."
    )
    key_max_waits: int = Field(
        256, ge=1, le=100_000,
        description="`POST /v1/orders?wait=` requests one API key may have open at once in one gateway process; "
        "more get 429 `too_many_waits`.",
    )
    backpressure_group: str = Field(
        "risk", min_length=1, max_length=64, description="Consumer group of `order.requested` whose backlog is watched."
    )
    max_backlog: int = Field(
        100_000, ge=1, le=100_000_000,
        description="Backlog (lag + pending) of that group over all shards above which new orders get 429.",
    )
    backlog_interval_s: float = Field(0.25, gt=0, le=60, description="How often the backlog is measured.")
    retry_after_s: int = Field(
        1, ge=1, le=3600, description="`Retry-After` of a 429 (backpressure) or 503 (Redis unavailable) answer, seconds."
    )
    request_deadline_s: float = Field(
        2.0, ge=0.1, le=30,
        description="Longest a request may take on the gateway's own work (Redis), seconds; then it gets 503 "
        "`deadline_exceeded` with `Retry-After`. Not counted: receiving the body, calls to the workflow engine "
        "and the event store; `POST /v1/orders?wait=` adds its wait.",
    )
    keep_alive_s: int = Field(
        75, ge=1, le=3600,
        description="How long an idle HTTP keep-alive connection stays open, seconds. Keep it well above the "
        "clients' own idle expiry (the Python client's is 2 s), so a client never reuses a connection the gateway "
        "is closing at that moment.",
    )
    wait_block_ms: int = Field(
        1_000, ge=10, le=4_000,
        description="How long the waiter's read of terminal-status events blocks (below the Redis socket timeout).",
    )
    wait_poll_s: float = Field(
        1.0, gt=0, le=30, description="Safety-net poll of a waited order's record when no event names it."
    )
