"""What the API's routes share (``Gateway``): the bus, the keys, the order desk (the intake),
the waiters, the backlog measure, and its background tasks."""

from __future__ import annotations

import asyncio

from fastapi import Request
from redis.exceptions import RedisError

from services.core.bus import Bus
from services.core.events import EventType
from services.core.hotstate import StateKeys
from services.core.settings import PostgresSettings, load
from services.core.telemetry import get_logger
from services.gateway.auth import ApiKeys, Principal
from services.gateway.deadline import outside_deadline
from services.gateway.limits import OrderRate, WaitCap
from services.gateway.portfolios import Portfolios
from services.gateway.settings import GatewaySettings
from services.gateway.waiters import Waiters
from services.gateway.workflows import WorkflowDesk
from services.intake import EventStoreUnavailable, IntakeSettings, OrderDesk
from services.recorder.store import EventStore
from services.workflows.settings import HatchetSettings

__all__ = ["Gateway"]

log = get_logger("zvt.gateway")


class Gateway:
    """What the API's routes share, and its background tasks."""

    def __init__(
        self, bus: Bus, settings: GatewaySettings, hatchet: HatchetSettings | None = None,
        postgres: PostgresSettings | None = None, intake: IntakeSettings | None = None,
    ) -> None:
        self.bus = bus
        self.postgres = postgres or load(PostgresSettings)
        self.redis = bus.redis
        self.settings = settings
        self.api_keys = ApiKeys(
            bus.redis, StateKeys(bus.keys), settings.key_cache_ttl_s, cache_size=settings.key_cache_size,
            bad_key_ttl_s=settings.bad_key_cache_ttl_s,
        )
        self.desk = OrderDesk(bus, intake or load(IntakeSettings), archive=self.store, outside=outside_deadline)
        self.order_rate = OrderRate(bus.redis, bus.keys, settings.key_order_rate, settings.key_order_window_s)
        self.wait_cap = WaitCap(settings.key_max_waits, settings.retry_after_s)
        self.portfolios = Portfolios(bus)
        self.workflows = WorkflowDesk(bus, hatchet or load(HatchetSettings))
        self.waiters = Waiters(
            bus.redis, bus.keys, cluster=bus.cluster, block_ms=settings.wait_block_ms, poll_s=settings.wait_poll_s,
            load=self.desk.load,
        )
        self.backlog = 0
        self.backlog_measured = False
        self._store: EventStore | None = None
        self._store_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task[None]] = []
        self._stopped = False

    async def principal(self, request: Request) -> Principal:
        """The caller of a request, by its API key (401 without a valid one)."""
        return await self.api_keys.authenticate(request.headers.get("authorization"))

    @property
    def overloaded(self) -> bool:
        return self.backlog > self.settings.max_backlog

    async def start(self) -> None:
        """Upsert the bootstrap admin key, take a first backlog measure, start the tasks."""
        if self.settings.admin_api_key is not None:
            await self.api_keys.upsert_bootstrap(self.settings.admin_api_key.get_secret_value())
        await self.measure_backlog()
        self._tasks = [
            asyncio.create_task(self._backlog_loop(), name="gateway-backlog"),
            asyncio.create_task(self.waiters.run(lambda: self._stopped), name="gateway-waiters"),
        ]

    async def stop(self) -> None:
        self._stopped = True
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._store is not None:
            await self._store.close()
            self._store = None

    async def measure_backlog(self) -> None:
        self.backlog = await self.bus.backlog(self.settings.backpressure_group, [EventType.ORDER_REQUESTED])
        self.backlog_measured = True

    async def _backlog_loop(self) -> None:
        while not self._stopped:
            await asyncio.sleep(self.settings.backlog_interval_s)
            try:
                await self.measure_backlog()
            except RedisError as exc:
                log.warning("backlog measure failed", error=str(exc))

    async def store(self) -> EventStore:
        """The event store, opened on first use (the order path never needs it);
        ``EventStoreUnavailable`` when it cannot be reached."""
        if self._store is None:
            async with self._store_lock:
                if self._store is None:
                    try:
                        self._store = await EventStore.open(
                            self.settings.postgres_dsn, max_size=self.settings.postgres_pool_size,
                            namespace=self.bus.settings.namespace, libpq=self.postgres.connect_kwargs(),
                        )
                    except Exception as exc:
                        log.warning("event store unavailable", error=type(exc).__name__)
                        raise EventStoreUnavailable("the event store cannot be reached") from None
        return self._store

    async def ready(self) -> dict[str, bool]:
        checks: dict[str, bool] = {}
        try:
            # well inside the request deadline, so /readyz answers itself while Redis hangs
            timeout = min(1.0, self.settings.request_deadline_s / 2)
            checks["redis"] = bool(await asyncio.wait_for(self.redis.ping(), timeout))
        except (RedisError, TimeoutError, OSError):
            checks["redis"] = False
        checks["pipeline"] = self.backlog_measured and not self.overloaded
        return checks

