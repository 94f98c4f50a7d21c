"""The Hatchet client of a worker or of the gateway, from ``ZVT_HATCHET_*`` settings."""

from __future__ import annotations

from hatchet_sdk import ClientConfig, Hatchet
from hatchet_sdk.config import ClientTLSConfig, HealthcheckConfig

from services.workflows.settings import HatchetSettings

__all__ = ["hatchet_client"]


def hatchet_client(settings: HatchetSettings, *, health: HealthcheckConfig | None = None) -> Hatchet:
    if settings.token is None:
        raise ValueError("ZVT_HATCHET_TOKEN is not set")
    config = ClientConfig(
        token=settings.token.get_secret_value(),
        host_port=settings.host_port,
        namespace=settings.namespace,
        tls_config=ClientTLSConfig(strategy=settings.tls_strategy),
        healthcheck=health or HealthcheckConfig(enabled=False),
    )
    return Hatchet(config=config)
