"""The skeleton every service process runs on.

A service declares what it consumes and implements handlers; the runtime does the rest:
settings, logs, traces, Redis, consumer groups, the ``/healthz`` ``/readyz`` ``/metrics``
endpoint, stream trimming, and a graceful stop on SIGTERM: stop reading, finish, commit and
ack the batches in hand, exit within ``ZVT_DRAIN_TIMEOUT_S``.

    def build(service: Service) -> None:
        service.consume("risk", {EventType.ORDER_REQUESTED: handle_order_requested})

    if __name__ == "__main__":
        main("risk", build)
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping
from typing import Any

import uvicorn
import uvloop
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.exceptions import RedisError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route as HttpRoute

from services.core.bus import Batch, Bus, Commit, Consumer, Handler
from services.core.events import Event, EventType, Route
from services.core.redisconn import AnyRedis, StartupError, open_checked
from services.core.settings import BusSettings, CoreSettings, SettingsError, load
from services.core.telemetry import (
    BUS_DEADLETTER_ENTRIES,
    BUS_DEADLETTER_MAX_ENTRIES,
    BUS_GROUP_OLDEST_UNACKED_AGE,
    get_logger,
    setup_logging,
    setup_tracing,
)

__all__ = ["ReadinessCheck", "Service", "check_no_arguments", "main", "tune_gc"]

BatchFn = Callable[[list[tuple[Event[Any], Commit]]], Awaitable[None]]
"""A batch handler: every event of a read with its commit, in stream order."""

log = get_logger("zvt.runtime")

ReadinessCheck = Callable[[], Awaitable[bool]]


def tune_gc() -> None:
    """Fewer, later garbage collections for an allocation-heavy event loop.

    Events are untracked by the collector (``gc=False``), but batches still allocate many
    short-lived lists and tuples; the default threshold (700) makes generation-0 runs a
    visible share of the CPU per event. Objects alive after start-up are frozen out of it.
    """
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)


class _QuietServer(uvicorn.Server):
    """uvicorn without its own signal handling: the service owns SIGTERM."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


class Service:
    """One service process: its consumers, background tasks and probes."""

    def __init__(self, name: str, *, core: CoreSettings | None = None, bus: BusSettings | None = None) -> None:
        self.name = name
        self.settings = core or load(CoreSettings, service=name)
        self.bus_settings = bus or load(BusSettings)
        self.redis: AnyRedis | None = None
        self.bus: Bus | None = None
        self.consumers: list[Consumer] = []
        self._consumer_specs: list[tuple[str, Mapping[EventType, Handler], frozenset[Route], bool, bool | None]] = []
        self._task_factories: list[Callable[[], Coroutine[Any, Any, None]]] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._checks: dict[str, ReadinessCheck] = {}
        self._startup: list[Callable[[Service], Awaitable[None]]] = []
        self._shutdown: list[Callable[[Service], Awaitable[None]]] = []
        self._stop = asyncio.Event()
        self._stopping = False
        self._http: _QuietServer | None = None
        self.http_port: int | None = None

    # -- declaration -------------------------------------------------------------------------

    def consume(
        self,
        group: str,
        handlers: Mapping[EventType, Handler],
        *,
        routes: frozenset[Route] = frozenset({Route.STREAM}),
        exclusive: bool = False,
        precheck: bool | None = None,
    ) -> None:
        """Join consumer group ``group`` for these event types; ``exclusive`` for stages that
        read the state they write (one member per shard at a time, see ``Consumer``).
        ``precheck`` drops already-processed events before the handler sees them (stateful
        stages want it: a redelivered event must not be applied to state twice)."""
        self._consumer_specs.append((group, handlers, routes, exclusive, precheck))

    def stage(
        self,
        group: str,
        event_types: Iterable[EventType],
        open_handler: Callable[[Service], Awaitable[BatchFn]],
    ) -> None:
        """A stateful stage: ``open_handler`` builds its batch handler once Redis is up, and it
        joins ``group`` as an exclusive consumer (one member per shard, in order) that drops
        already-processed events before handling them, so none is applied to state twice."""
        handlers: list[BatchFn] = []

        async def open_stage(service: Service) -> None:
            handlers.append(await open_handler(service))

        async def handle(items: list[tuple[Event[Any], Commit]]) -> None:
            await handlers[0](items)

        self.on_startup(open_stage)
        self.consume(group, dict.fromkeys(event_types, Batch(handle, reads_state=True)), exclusive=True, precheck=True)

    def background(self, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run a coroutine for the life of the process; it should return when ``stopping``."""
        self._task_factories.append(factory)

    def on_startup(self, hook: Callable[[Service], Awaitable[None]]) -> None:
        self._startup.append(hook)

    def on_shutdown(self, hook: Callable[[Service], Awaitable[None]]) -> None:
        self._shutdown.append(hook)

    def readiness(self, name: str, check: ReadinessCheck) -> None:
        self._checks[name] = check

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self) -> None:
        self._stop.set()

    async def sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop; True when the service is stopping."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stop.wait(), seconds)
        return self._stop.is_set()

    # -- running -----------------------------------------------------------------------------

    async def run(self) -> int:
        setup_logging(self.settings)
        setup_tracing(self.settings)
        # a wrong password, a refused TLS handshake: StartupError, one line (``main``)
        self.redis = await open_checked(self.settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.bus = Bus(self.redis, self.bus_settings)
        try:
            await self._start_http()
            for hook in self._startup:
                await hook(self)
            for group, handlers, routes, exclusive, precheck in self._consumer_specs:
                consumer = Consumer(
                    self.bus, group, handlers, routes=routes, exclusive=exclusive, precheck_duplicates=precheck
                )
                await consumer.start()
                self.consumers.append(consumer)
            if self.consumers and self.bus_settings.trim_interval_s > 0:
                self._task_factories.append(self._trim_loop)
            self._tasks = [asyncio.create_task(factory()) for factory in self._task_factories]
            tune_gc()
            log.info("service started", http_port=self.http_port, consumers=[c.group for c in self.consumers])
            await self._stop.wait()
            return await self._drain()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)
            if self._http is not None:
                self._http.should_exit = True
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._http_task, 5)
            await self.redis.aclose()

    def _on_signal(self, sig: int) -> None:
        log.info("stop requested", signal=signal.Signals(sig).name)
        self._stop.set()

    async def _drain(self) -> int:
        """Stop reading, finish the batches in hand, exit inside the grace period."""
        self._stopping = True
        started = time.monotonic()
        for consumer in self.consumers:
            consumer.stop()
        deadline = self.settings.drain_timeout_s
        results = await asyncio.gather(*(c.wait(deadline) for c in self.consumers))
        remaining = max(0.1, deadline - (time.monotonic() - started))
        done, pending = await asyncio.wait(self._tasks, timeout=remaining) if self._tasks else (set(), set())
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        for hook in self._shutdown:
            await hook(self)
        clean = all(results) and not pending
        log.info("service stopped", clean=clean, seconds=round(time.monotonic() - started, 3))
        return 0 if clean else 1

    async def _trim_loop(self) -> None:
        assert self.bus is not None and self.redis is not None
        interval = self.bus_settings.trim_interval_s
        lock = self.bus.keys.global_key("trim-lock")
        types = list(EventType)
        BUS_DEADLETTER_MAX_ENTRIES.set(self.bus_settings.deadletter_maxlen)
        while not await self.sleep(interval):
            try:
                if await self.redis.set(lock, self.name, nx=True, px=int(interval * 1000)):
                    trimmed = await self.bus.trim(types)
                    if trimmed:
                        log.info("streams trimmed", entries=trimmed)
                    lengths = await self.bus.deadletter_lengths()
                    _export_bus_upkeep(self.bus.group_ages, lengths)
                else:
                    _export_bus_upkeep({}, {})  # another process measures this round
            except RedisError as exc:
                log.warning("trim failed", error=str(exc))
            except Exception:  # one bad pass must not end trimming for the life of the process
                log.exception("trim failed")

    # -- probes --------------------------------------------------------------------------------

    async def ready(self) -> tuple[bool, dict[str, bool]]:
        checks: dict[str, bool] = {"running": not self._stopping}
        try:
            assert self.redis is not None
            checks["redis"] = bool(await asyncio.wait_for(self.redis.ping(), 2))
        except (RedisError, TimeoutError, OSError):
            checks["redis"] = False
        checks["consumers"] = all(c.healthy for c in self.consumers)
        for name, check in self._checks.items():
            try:
                checks[name] = await check()
            except Exception:
                checks[name] = False
        return all(checks.values()), checks

    async def _start_http(self) -> None:
        async def healthz(_: Request) -> Response:
            return JSONResponse({"status": "ok", "service": self.name})

        async def readyz(_: Request) -> Response:
            ok, checks = await self.ready()
            return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

        async def metrics(_: Request) -> Response:
            return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

        app = Starlette(
            routes=[
                HttpRoute("/healthz", healthz),
                HttpRoute("/readyz", readyz),
                HttpRoute("/metrics", metrics),
            ]
        )
        config = uvicorn.Config(
            app, host=self.settings.http_host, port=self.settings.http_port, log_level="warning",
            lifespan="off", access_log=False,
        )
        self._http = _QuietServer(config)
        self._http_task = asyncio.create_task(self._http.serve())
        while not self._http.started:
            if self._http_task.done():
                self._http_task.result()
                raise RuntimeError("HTTP endpoint did not start")
            await asyncio.sleep(0.01)
        self.http_port = self._http.servers[0].sockets[0].getsockname()[1]


def _export_bus_upkeep(ages: Mapping[tuple[str, str], float], deadletters: Mapping[int, int]) -> None:
    """The trim pass's measurements as gauges; empty: this process did not run the pass, and
    exports none (so that every series comes from the one process that measured it last)."""
    BUS_GROUP_OLDEST_UNACKED_AGE.clear()
    for (stream, group), age in ages.items():
        BUS_GROUP_OLDEST_UNACKED_AGE.labels(stream, group).set(age)
    BUS_DEADLETTER_ENTRIES.clear()
    for shard, length in deadletters.items():
        BUS_DEADLETTER_ENTRIES.labels(str(shard)).set(length)


def main(name: str, build: Callable[[Service], Any], description: str = "") -> None:
    """Entry point of a service: ``python -m services.<name>``.

    The process takes no arguments, only settings from the environment; ``--help`` lists them.
    """
    check_no_arguments(name, description)
    try:
        service = Service(name)
        build(service)  # a service's own settings are loaded here
    except SettingsError as exc:
        print(f"{name}: {exc.line}", file=sys.stderr)
        raise SystemExit(2) from None
    # uvloop: the same asyncio, a faster loop (every service is I/O-bound on Redis).
    try:
        code = uvloop.run(service.run())
    except StartupError as exc:  # wrong Redis password, TLS refused, a missing role...: one line
        print(f"{name}: {exc.line}", file=sys.stderr)
        raise SystemExit(2) from None
    raise SystemExit(code)


def check_no_arguments(name: str, description: str) -> None:
    """A service takes no arguments, only settings from the environment: ``--help`` lists
    them (exit 0), anything else is refused (exit 2)."""
    if any(arg in ("-h", "--help") for arg in sys.argv[1:]):
        print(_usage(name, description))
        raise SystemExit(0)
    if len(sys.argv) > 1:
        print(f"{name}: takes no arguments (got {' '.join(sys.argv[1:])}); settings come from ZVT_* variables, see --help", file=sys.stderr)
        raise SystemExit(2)


def _usage(name: str, description: str) -> str:
    from services.core.settings import registered

    lines = [f"usage: python -m services.{name}", ""]
    if description:
        lines += [description.strip(), ""]
    lines.append("Configured by environment variables (docs/configuration.md):")
    for cls in registered():
        prefix = cls.model_config.get("env_prefix", "")
        for field_name, info in cls.model_fields.items():
            default = info.get_default(call_default_factory=True)
            lines.append(f"  {prefix}{field_name.upper():<28} {info.description or ''} [default: {default}]")
    return "\n".join(lines)
