"""Secrets are never printed: the redaction helper over URL and DSN shapes, and the settings
error line of each component when the rejected value carries a credential."""

from __future__ import annotations

import pytest

from services.core.redact import redact
from services.core.settings import CoreSettings, SettingsError, load
from services.gateway.settings import GatewaySettings
from services.notifications.settings import NotificationsSettings
from services.routing.settings import RoutingSettings

PW = "hunter2xyzzy"
JWT = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ0ZW5hbnQiLCJhdWQiOiJoYXRjaGV0In0.c2lnbmF0dXJlLXBhcnQ"


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        # Redis: password only, user and password, TLS, a lone userinfo (a token as user name)
        (f"redis://:{PW}@cache.internal:6379/0", "redis://:***@cache.internal:6379/0"),
        (f"redis://app:{PW}@cache.internal:6379/0", "redis://app:***@cache.internal:6379/0"),
        (f"rediss://default:{PW}@cache.internal:6380", "rediss://default:***@cache.internal:6380"),
        (f"redis://{PW}@cache.internal", "redis://***@cache.internal"),
        # percent-encoded, and a raw '@' in the password (redis-py splits at the last one)
        ("redis://:hunter%402%3Axyzzy@cache.internal:6379", "redis://:***@cache.internal:6379"),
        (f"redis://:hun@{PW}@cache.internal:6379/0", "redis://:***@cache.internal:6379/0"),
        # PostgreSQL URIs: userinfo, query parameters, IPv6 host
        (f"postgresql://zvt:{PW}@db.internal:5432/zvt", "postgresql://zvt:***@db.internal:5432/zvt"),
        (f"postgres://zvt:{PW}@db/zvt?sslmode=require", "postgres://zvt:***@db/zvt?sslmode=require"),
        (f"postgresql://db.internal/zvt?user=zvt&password={PW}&sslmode=require",
         "postgresql://db.internal/zvt?user=zvt&password=***&sslmode=require"),
        (f"postgresql://db/zvt?sslpassword={PW}", "postgresql://db/zvt?sslpassword=***"),
        (f"postgresql://zvt:{PW}@[::1]:5432/zvt", "postgresql://zvt:***@[::1]:5432/zvt"),
        # key=value DSNs: plain, quoted with a space, quoted with an escaped quote, spaced '='
        (f"host=db port=5432 user=zvt password={PW} dbname=zvt", "host=db port=5432 user=zvt password=*** dbname=zvt"),
        ("host=db password='hunter2 xyzzy' dbname=zvt", "host=db password=*** dbname=zvt"),
        ("host=db password='hunter2\\'xyzzy' dbname=zvt", "host=db password=*** dbname=zvt"),
        (f"host=db PASSWORD = {PW}", "host=db PASSWORD = ***"),
        # webhooks: credentials in the URL or in the query
        (f"https://hook:{PW}@hooks.example/x", "https://hook:***@hooks.example/x"),
        (f"https://hooks.example/x?token={PW}&a=1", "https://hooks.example/x?token=***&a=1"),
        (f"https://hooks.example/x?api_key={PW}", "https://hooks.example/x?api_key=***"),
        # secrets named by their variable, a Hatchet (JWT) token, a bearer header
        (f"ZVT_NOTIFICATIONS_WEBHOOK_SECRET={PW}", "ZVT_NOTIFICATIONS_WEBHOOK_SECRET=***"),
        (f"ZVT_GATEWAY_ADMIN_API_KEY={PW}", "ZVT_GATEWAY_ADMIN_API_KEY=***"),
        (f"HATCHET_CLIENT_TOKEN={JWT}", "HATCHET_CLIENT_TOKEN=***"),
        (f"dial failed with token {JWT}: unauthenticated", "dial failed with token ***: unauthenticated"),
        (f"Authorization: Bearer {PW}", "Authorization: Bearer ***"),
        (f"{{'password': '{PW}', 'host': 'db'}}", "{'password': ***, 'host': 'db'}"),
        # inside the messages that carry them: psycopg, pydantic, a list repr
        (f'end of string reached in URI: "postgresql://zvt:{PW}@[::1/zvt"',
         'end of string reached in URI: "postgresql://zvt:***@[::1/zvt"'),
        (f"input_value='redis://:{PW}@h:1/0', input_type=str", "input_value='redis://:***@h:1/0', input_type=str"),
        (f"['https://a.example/h', 'https://u:{PW}@b.example/h']", "['https://a.example/h', 'https://u:***@b.example/h']"),
        (f"sima=binance@http://key:{PW}@venue:9101,paper", "sima=binance@http://key:***@venue:9101,paper"),
    ],
)
def test_redact_when_text_carries_a_credential_masks_only_the_credential(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.mark.parametrize(
    "text",
    [
        "redis://127.0.0.1:6390/0",
        "rediss://cache.internal:6380",
        "postgresql://db.internal:5432/zvt?sslmode=require",
        "http://[::1]:9000/h",
        "https://hooks.example/x?k=v#top",
        "sima=binance@http://127.0.0.1:9101,simb=binance@http://127.0.0.1:9102",
        "invalid setting ZVT_NOTIFICATIONS_WEBHOOK_SECRET: String should have at most 512 characters",
        "Error 111 connecting to 127.0.0.1:6379. Connection refused.",
        "mail ops@example.com about http://host/path?x=a@b",
        "token_count=5 tokens=3 secret_set=True",
        "",
    ],
)
def test_redact_when_text_carries_no_credential_leaves_it_unchanged(text: str) -> None:
    assert redact(text) == text


def test_load_when_redis_url_with_password_is_invalid_names_it_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZVT_REDIS_URL", f"reddis://app:{PW}@cache.internal:6379/0")
    with pytest.raises(SettingsError) as info:
        load(CoreSettings)
    assert info.value.line.startswith("invalid setting ZVT_REDIS_URL:")
    assert PW not in info.value.line
    assert "reddis://app:***@cache.internal:6379/0" in info.value.line


def test_load_when_dsn_with_password_is_invalid_names_it_without_the_password(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_GATEWAY_POSTGRES_DSN", f"mysql://zvt:{PW}@db/zvt")
    with pytest.raises(SettingsError) as info:
        load(GatewaySettings)
    assert info.value.line.startswith("invalid setting ZVT_GATEWAY_POSTGRES_DSN:")
    assert PW not in info.value.line


def test_load_when_webhook_url_with_password_is_invalid_names_it_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZVT_NOTIFICATIONS_WEBHOOK_URLS", f"ftp://hook:{PW}@hooks.example/x")
    with pytest.raises(SettingsError) as info:
        load(NotificationsSettings)
    assert info.value.line.startswith("invalid setting ZVT_NOTIFICATIONS_WEBHOOK_URLS:")
    assert PW not in info.value.line
    assert "ftp://hook:***@hooks.example/x" in info.value.line


def test_load_when_venue_url_with_password_is_invalid_names_it_without_the_password(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZVT_ROUTING_VENUES", f"sima=binance@ftp://key:{PW}@venue:9101")
    with pytest.raises(SettingsError) as info:
        load(RoutingSettings)
    assert info.value.line.startswith("invalid setting ZVT_ROUTING_VENUES:")
    assert PW not in info.value.line


def test_load_when_secret_field_is_invalid_names_it_without_its_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_GATEWAY_ADMIN_API_KEY", PW)  # shorter than 16 characters
    with pytest.raises(SettingsError) as info:
        load(GatewaySettings)
    assert info.value.line.startswith("invalid setting ZVT_GATEWAY_ADMIN_API_KEY:")
    assert PW not in info.value.line


def test_load_when_other_field_echoes_a_secret_value_masks_it(monkeypatch: pytest.MonkeyPatch) -> None:
    # A secret pasted into the wrong variable still never shows, since it is a secret's value.
    monkeypatch.setenv("ZVT_NOTIFICATIONS_WEBHOOK_SECRET", "s3cr3t-webhook-key-0123")
    monkeypatch.setenv("ZVT_NOTIFICATIONS_WEBHOOK_URLS", "s3cr3t-webhook-key-0123")
    with pytest.raises(SettingsError) as info:
        load(NotificationsSettings)
    assert info.value.line.startswith("invalid setting ZVT_NOTIFICATIONS_WEBHOOK_URLS:")
    assert "s3cr3t-webhook-key-0123" not in info.value.line
