"""Settings of the notifications service (``ZVT_NOTIFICATIONS_``)."""

from __future__ import annotations

from typing import Annotated, Any
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from services.core.events import EventType, Route
from services.core.settings import load, register

__all__ = ["NOTIFIABLE", "NotificationsSettings", "load_settings"]

NOTIFIABLE: tuple[EventType, ...] = (
    EventType.ORDER_REJECTED,
    EventType.ORDER_EXECUTED,
    EventType.ORDER_FAILED,
    EventType.ORDER_CANCELED,
    EventType.RISK_BREACHED,
    EventType.ALERT_TRIGGERED,
    EventType.PORTFOLIO_REBALANCED,
    EventType.WORKFLOW_FAILED,
)
"""The event types people want to hear about: what the service can subscribe to."""


def _csv(value: Any) -> Any:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


@register
class NotificationsSettings(BaseSettings):
    """The notifications service: webhooks it posts events to, which events, and how it retries."""

    model_config = SettingsConfigDict(env_prefix="ZVT_NOTIFICATIONS_", extra="ignore", frozen=True)

    webhook_urls: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validate_default=True,
        max_length=16,
        description="Comma-separated http(s) URLs every subscribed event is POSTed to; at least one. Logs and "
        "dead letters show them without credentials or query string.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        max_length=512,
        description="HMAC-SHA256 key of the `X-ZVT-Signature` header, at least 16 characters (a secret: pass it "
        "by reference; never logged). Unset: deliveries are unsigned, and a warning says so at start.",
    )
    event_types: Annotated[list[EventType], NoDecode] = Field(
        default_factory=lambda: list(NOTIFIABLE),
        min_length=1,
        max_length=len(NOTIFIABLE),
        description="Comma-separated event types to deliver, a subset of the default.",
    )
    routes: Annotated[list[Route], NoDecode] = Field(
        default_factory=lambda: list(Route),
        min_length=1,
        max_length=len(Route),
        description="Comma-separated routes whose events are delivered: `stream`, `workflow` or both.",
    )
    max_attempts: int = Field(
        5, ge=1, le=50, description="HTTP attempts per event and URL before the event is dead-lettered."
    )
    backoff_base_s: float = Field(
        0.5, gt=0, le=60, description="Delay before the second attempt; doubled for each further one, with jitter."
    )
    backoff_max_s: float = Field(
        10.0,
        gt=0,
        le=600,
        description="Longest delay between attempts; a `Retry-After` longer than this leaves the event pending, "
        "to be redelivered after `ZVT_BUS_RECLAIM_IDLE_MS`.",
    )
    request_timeout_s: float = Field(5.0, gt=0, le=120, description="Limit of one HTTP request, seconds.")
    concurrency: int = Field(
        32, ge=1, le=1024, description="HTTP requests in flight at once per process (also the connection pool size)."
    )

    @field_validator("webhook_urls", "event_types", "routes", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        return _csv(value)

    @field_validator("webhook_urls")
    @classmethod
    def _urls(cls, urls: list[str]) -> list[str]:
        if not urls:
            raise ValueError("set at least one webhook URL")
        for url in urls:
            try:
                parts = urlsplit(url)
                parts.port  # noqa: B018 - raises on a bad port
            except ValueError:
                raise ValueError(f"not a valid URL: {url!r}") from None
            if parts.scheme not in ("http", "https") or not parts.hostname:
                raise ValueError(f"not an http(s) URL with a host: {url!r}")
            if parts.fragment:
                raise ValueError(f"a webhook URL takes no #fragment: {url!r}")
        if len(set(urls)) != len(urls):
            raise ValueError("a webhook URL is listed twice")
        return urls

    @field_validator("webhook_secret")
    @classmethod
    def _secret(cls, secret: SecretStr | None) -> SecretStr | None:
        if secret is not None and len(secret.get_secret_value()) < 16:
            raise ValueError("the webhook secret needs at least 16 characters")
        return secret

    @field_validator("event_types")
    @classmethod
    def _notifiable(cls, types: list[EventType]) -> list[EventType]:
        others = [str(t) for t in types if t not in NOTIFIABLE]
        if others:
            raise ValueError(f"not a notifiable event type: {', '.join(others)} (choose from {', '.join(NOTIFIABLE)})")
        return list(dict.fromkeys(types))


def load_settings() -> NotificationsSettings:
    """``load(NotificationsSettings)``: its one line at start-up never shows the webhook secret,
    nor the credentials of a webhook URL (``services.core.settings.load`` masks both)."""
    return load(NotificationsSettings)
