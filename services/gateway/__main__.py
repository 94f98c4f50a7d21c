"""``python -m services.gateway``: the public HTTP API on ``ZVT_GATEWAY_HOST:ZVT_GATEWAY_PORT``.

Accepts orders onto ``order.requested`` (one script per order, in the portfolio's slot),
answers order, portfolio and audit queries from Redis and the event store, manages API keys,
and answers 429 while the risk stage is too far behind. ``/healthz`` and ``/readyz`` are served on
the API port too; ``/metrics`` only on the runtime's probe port ``ZVT_HTTP_PORT`` (with its own
``/healthz`` and ``/readyz``), never to the API's clients.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

import uvicorn

from services.core.runtime import Service, main
from services.core.settings import PostgresSettings, load
from services.core.telemetry import get_logger
from services.gateway.app import create_app
from services.gateway.gateway import Gateway
from services.gateway.settings import GatewaySettings
from services.intake import IntakeSettings
from services.workflows.settings import HatchetSettings

log = get_logger("zvt.gateway")


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: the service runtime owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def build(service: Service) -> None:
    settings = load(GatewaySettings)
    hatchet = load(HatchetSettings)
    postgres = load(PostgresSettings)
    intake = load(IntakeSettings)
    state: dict[str, Gateway] = {}
    server: dict[str, _Server] = {}

    async def start(svc: Service) -> None:
        assert svc.bus is not None
        gateway = Gateway(svc.bus, settings, hatchet, postgres, intake)
        await gateway.start()
        state["gateway"] = gateway
        config = uvicorn.Config(
            create_app(gateway), host=settings.host, port=settings.port, log_level="warning",
            lifespan="off", access_log=False, server_header=False, http="httptools",
            # well above clients' idle expiry: a client must never reuse a connection just as
            # the server closes it for being idle (uvicorn's default, 5 s, equals httpx's)
            timeout_keep_alive=settings.keep_alive_s,
        )
        http = server["http"] = _Server(config)
        task = asyncio.create_task(http.serve(), name="gateway-http")
        while not http.started:
            if task.done():
                task.result()
                raise RuntimeError("the API server did not start")
            await asyncio.sleep(0.01)
        port = http.servers[0].sockets[0].getsockname()[1]
        log.info("gateway listening", host=settings.host, port=port)

        async def serve_until_stopped() -> None:
            await svc.sleep(10**9)
            http.should_exit = True  # stops accepting; requests in hand finish
            await task

        svc.background(serve_until_stopped)

    async def stop(_: Service) -> None:
        if "gateway" in state:
            await state["gateway"].stop()

    async def ready() -> bool:
        gateway = state.get("gateway")
        return gateway is not None and all((await gateway.ready()).values())

    service.on_startup(start)
    service.on_shutdown(stop)
    service.readiness("gateway", ready)


if __name__ == "__main__":
    main("gateway", build, __doc__ or "")
