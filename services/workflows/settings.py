"""Settings of the workflows worker and of the clients that start workflows (``ZVT_HATCHET_``,
``ZVT_WORKFLOWS_``)."""

from __future__ import annotations

from pydantic import Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

from services.core.settings import register

__all__ = ["HatchetSettings", "WorkflowSettings"]


@register
class HatchetSettings(BaseSettings):
    """How a worker or the gateway reaches the Hatchet engine."""

    model_config = SettingsConfigDict(env_prefix="ZVT_HATCHET_", extra="ignore", frozen=True)

    token: SecretStr | None = Field(
        None, description="Tenant API token of the Hatchet engine (a Secret in a pod); unset: no workflows."
    )
    host_port: str = Field(
        "127.0.0.1:17077", pattern=r"^[^:\s]+:\d+$", description="The engine's gRPC address, `host:port`."
    )
    tls_strategy: str = Field("none", pattern=r"^(none|tls|mtls)$", description="`none` on loopback, `tls` in a cluster.")
    namespace: str = Field(
        "", max_length=64, description="Prefix of workflow names, so deployments (or test runs) sharing an engine stay apart."
    )


@register
class WorkflowSettings(BaseSettings):
    """The workflows worker."""

    model_config = SettingsConfigDict(env_prefix="ZVT_WORKFLOWS_", extra="ignore", frozen=True)

    slots: int = Field(50, ge=1, le=10_000, description="Tasks one worker runs at once.")
    worker_name: str = Field("zvt-workflows", min_length=1, max_length=100, description="The worker's name in Hatchet.")
    risk_monitor_cron: str = Field(
        "* * * * *", description="When `risk.monitor` runs (cron, UTC); empty: only when started by hand."
    )
    reconcile_cron: str = Field(
        "*/5 * * * *", description="When `orders.reconcile` runs (cron, UTC); empty: only when started by hand."
    )
    reducing_drawdown: float = Field(
        0.1, gt=0, lt=1, description="`risk.monitor`: drawdown from peak equity that moves a portfolio to REDUCING."
    )
    max_drawdown: float = Field(
        0.2, gt=0, lt=1, description="`risk.monitor`: drawdown from peak equity that moves a portfolio to HALTED."
    )
    faults_enabled: bool = Field(
        False, description="Honour the `faults` field of workflow inputs (tests only: makes tasks fail on purpose)."
    )
