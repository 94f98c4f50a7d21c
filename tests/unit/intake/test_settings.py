"""The intake's settings: one set, read alike by the gateway and the workflows worker."""

from __future__ import annotations

import pytest
from redis.asyncio import Redis

from services.core.bus import Bus
from services.core.settings import BusSettings, PostgresSettings
from services.gateway import Gateway, GatewaySettings
from services.intake import IntakeSettings, OrderDesk
from services.workflows.deps import order_desk
from services.workflows.settings import HatchetSettings


def desks() -> tuple[OrderDesk, OrderDesk]:
    """(the gateway's desk, the workflows worker's), built as each process builds it; no I/O."""
    bus = Bus(Redis(), BusSettings(namespace="u", shards=2))
    gateway = Gateway(bus, GatewaySettings(), HatchetSettings(), PostgresSettings())
    return gateway.desk, order_desk(bus)


def test_intake_when_the_environment_sets_it_the_gateway_and_the_worker_keep_the_same_index_and_window(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZVT_GATEWAY_ORDERS_INDEX_MAX", "1234")
    monkeypatch.setenv("ZVT_GATEWAY_IDEMPOTENCY_TTL_S", "4321")
    gateway, worker = desks()
    assert (gateway.index_max, gateway.coid_ttl_s) == (1234, 4321)
    assert (worker.index_max, worker.coid_ttl_s) == (1234, 4321)


def test_intake_when_nothing_is_set_the_worker_keeps_the_gateways_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZVT_GATEWAY_ORDERS_INDEX_MAX", raising=False)
    monkeypatch.delenv("ZVT_GATEWAY_IDEMPOTENCY_TTL_S", raising=False)
    gateway, worker = desks()
    assert (worker.index_max, worker.coid_ttl_s) == (gateway.index_max, gateway.coid_ttl_s) == (10_000, 7 * 86_400)


def test_intake_settings_keep_the_gateways_environment_names() -> None:
    assert IntakeSettings.model_config.get("env_prefix") == "ZVT_GATEWAY_"
    assert set(IntakeSettings.model_fields) == {"orders_index_max", "idempotency_ttl_s"}
