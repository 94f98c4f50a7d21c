"""``python -m services.workflows``: the Hatchet worker of ZVT Fleet's workflows.

Runs ``trading.place_order`` (and the other workflows) on the Hatchet engine at
``ZVT_HATCHET_HOST_PORT`` with ``ZVT_WORKFLOWS_SLOTS`` slots. The SDK's health and metrics
server answers on ``ZVT_HTTP_HOST:ZVT_HTTP_PORT`` (``/health``, ``/metrics``). SIGTERM stops
taking tasks and finishes the ones in hand.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from typing import Any

from hatchet_sdk.config import HealthcheckConfig

from services.core.redisconn import RedisStartupError, open_checked
from services.core.runtime import check_no_arguments
from services.core.settings import BusSettings, CoreSettings, SettingsError, load
from services.core.telemetry import get_logger, setup_logging, setup_tracing
from services.workflows.client import hatchet_client
from services.workflows.deps import make_lifespan
from services.workflows.monitor import define_market_data, define_risk_monitor
from services.workflows.place_order import define_place_order
from services.workflows.reconcile import define_reconcile
from services.workflows.rebalance import define_rebalance
from services.workflows.settings import HatchetSettings, WorkflowSettings

NAME = "workflows"


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


async def _check_redis(core: CoreSettings) -> None:
    client = await open_checked(core)
    await client.aclose()


def main() -> None:
    check_no_arguments(NAME, __doc__ or "")
    try:
        core = load(CoreSettings)
        bus_settings = load(BusSettings)
        hatchet_settings = load(HatchetSettings)
        settings = load(WorkflowSettings)
        if hatchet_settings.token is None:
            raise SettingsError("invalid setting ZVT_HATCHET_TOKEN: required by the workflows worker")
    except SettingsError as exc:
        print(f"{NAME}: {exc.line}", file=sys.stderr)
        raise SystemExit(2) from None
    try:  # a wrong password or a refused TLS handshake: one line, as every other service
        asyncio.run(_check_redis(core))
    except RedisStartupError as exc:
        print(f"{NAME}: {exc.line}", file=sys.stderr)
        raise SystemExit(2) from None
    setup_logging(core)
    setup_tracing(core)
    log = get_logger("zvt.workflows")
    port = core.http_port or _free_port(core.http_host)
    health = HealthcheckConfig(enabled=True, port=port, bind_address=core.http_host)
    hatchet = hatchet_client(hatchet_settings, health=health, worker=True)
    workflows: list[Any] = [
        define_place_order(hatchet),
        define_rebalance(hatchet),
        define_risk_monitor(hatchet, settings.risk_monitor_cron),
        define_market_data(hatchet),
        define_reconcile(hatchet, settings.reconcile_cron),
    ]
    worker = hatchet.worker(
        settings.worker_name, slots=settings.slots, workflows=workflows,
        lifespan=make_lifespan(core, bus_settings, settings, hatchet),
    )
    log.info("service started", http_port=port, workflows=[w.name for w in workflows], slots=settings.slots,
             engine=hatchet_settings.host_port)
    worker.start()


if __name__ == "__main__":
    main()
