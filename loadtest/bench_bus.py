"""Bus benchmark: one pipeline stage through the real platform code.

    python -m loadtest.bench_bus [--seconds 10] [--shards 16] [--consumers 1] [--cluster]
                                 [--redis-url URL] [--rate 5000] [--batch 200] [--json PATH]
                                 [--profile PATH]

The stage: a ``Consumer`` (group ``bench``) reads ``order.requested`` from every shard, decodes
it, calls a handler that derives an ``order.validated`` and emits it with
``commit.emit(event.derive(...))``; the Lua commit appends the output, sets the dedupe mark and
acks. Events are published with ``Bus.publish_many`` from separate processes.

Phases:

1. throughput: publisher process(es) keep a backlog in the streams while the consumer
   process(es) drain it; over a window of ``--seconds`` it reports events handled per second,
   the consumer's own CPU per event and Redis's CPU per event (``INFO cpu``, all masters; that
   includes the publisher's XADDs).
2. latency: a paced publisher at ``--rate`` events/s for min(--seconds, 10) s stamps
   ``time.time_ns()`` into each envelope's metadata; the handler records now - stamp.
3. ceiling: ``redis-benchmark`` XADDs of an event-sized payload against the same server.

With no ``--redis-url`` it starts a throwaway redis-server (appendonly no) on a free port in a
temp folder, or with ``--cluster`` uses devstack's Redis Cluster. Every key of the run is
deleted at the end. The last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import cProfile
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import pstats
import queue
import re
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis
from redis.cluster import RedisCluster
from prometheus_client import REGISTRY
from redis.crc import key_slot

from services.core.runtime import tune_gc
from services.core.bus import Bus, Commit, Consumer
from services.core.codec import encode
from services.core.events import (
    Event,
    EventType,
    OrderRequested,
    OrderValidated,
)
from services.core.redisconn import connect
from services.core.settings import BusSettings, CoreSettings
from services.core.telemetry import setup_logging
from services.trading import OrderType, Side

GROUP = "bench"
STAGE = "bench.validate"
STAMP = "t_pub_ns"  # metadata key: time.time_ns() at publish
PORTFOLIOS = 512
TICK_S = 0.005  # how often a consumer publishes its counters / looks at the phase flags


# ---------------------------------------------------------------------------------------------
# events and the handler


def _payload(i: int) -> OrderRequested:
    return OrderRequested(
        order_id=f"o-{i:016x}",
        client_order_id=f"c-{i:016x}",
        symbol="BTC-USDT",
        side=Side.BUY if i & 1 else Side.SELL,
        order_type=OrderType.LIMIT,
        quantity=Decimal("0.015"),
        price=Decimal("64250.5"),
        requested_by="bench",
    )


# Payloads and portfolio ids are reused (the publisher's CPU is not what is measured); every
# event still gets a fresh event id, or the consumer group's dedupe would drop it.
_PAYLOADS = [_payload(i) for i in range(4096)]
_PORTFOLIO_IDS = [f"pf-{i:04d}" for i in range(PORTFOLIOS)]


def make_event(i: int, stamp: str | None = None) -> Event[Any]:
    return Event.new(
        _PAYLOADS[i % len(_PAYLOADS)],
        portfolio_id=_PORTFOLIO_IDS[i % PORTFOLIOS],
        metadata={STAMP: stamp or str(time.time_ns())},
    )


def make_handler(latencies: array.array[int], counter: list[int]) -> Any:
    async def handle(event: Event[Any], commit: Commit) -> None:
        p: OrderRequested = event.payload
        commit.emit(
            event.derive(
                OrderValidated(
                    order_id=p.order_id,
                    client_order_id=p.client_order_id,
                    symbol=p.symbol,
                    side=p.side,
                    order_type=p.order_type,
                    quantity=p.quantity,
                    price=p.price,
                    time_in_force=p.time_in_force,
                    venue=p.venue,
                    reference_price=p.price,
                ),
                STAGE,
            )
        )
        counter[0] += 1
        stamp = event.metadata.get(STAMP)
        if stamp is not None:
            latencies.append(time.time_ns() - int(stamp))

    return handle


# ---------------------------------------------------------------------------------------------
# child processes (spawned: everything they get is picklable)


@dataclass(frozen=True)
class ChildConfig:
    redis_url: str
    cluster: bool
    namespace: str
    shards: int
    batch: int
    read_count: int | None


def _settings(cfg: ChildConfig) -> tuple[CoreSettings, BusSettings]:
    core = CoreSettings(redis_url=cfg.redis_url, redis_cluster=cfg.cluster, log_level="WARNING", log_format="console")
    extra: dict[str, Any] = {} if cfg.read_count is None else {"batch_size": cfg.read_count}
    return core, BusSettings(namespace=cfg.namespace, shards=cfg.shards, **extra)


async def open_client(core: CoreSettings) -> Any:
    client = connect(core)
    if core.redis_cluster:
        # redis-py 8.1's async RedisCluster: concurrent first commands on a client that has not
        # loaded the slot map yet race (AttributeError ... 'writelines', or a retried command
        # running twice); Bus.ensure_group issues its XGROUP CREATEs concurrently.
        await client.initialize()
    return client


def consumer_process(cfg: ChildConfig, idx: int, counters: Any, flags: dict[str, Any], profile: bool, out: Any) -> None:
    try:
        asyncio.run(_consume(cfg, idx, counters, flags, out, profile))
    except BaseException as exc:  # report, never hang the parent
        out.put(("error", f"consumer {idx}", f"{type(exc).__name__}: {exc}"))
        raise


async def _consume(cfg: ChildConfig, idx: int, counters: Any, flags: dict[str, Any], out: Any, profile: bool) -> None:
    core, bus_settings = _settings(cfg)
    setup_logging(core)
    client = await open_client(core)
    latencies: array.array[int] = array.array("q")
    handled = [0]
    bus = Bus(client, bus_settings)
    consumer = Consumer(bus, GROUP, {EventType.ORDER_REQUESTED: make_handler(latencies, handled)}, name=f"bench-{idx}")
    await bus.ensure_group(GROUP, [EventType.ORDER_REQUESTED])
    out.put(("ready", idx))
    while not flags["go"].is_set():
        if flags["stop"].is_set():
            break
        await asyncio.sleep(TICK_S)
    await consumer.start()
    tune_gc()  # as the service runtime does after start-up
    prof = cProfile.Profile() if profile else None
    window: dict[str, float] = {}
    win_start, win_end, stop = flags["win_start"], flags["win_end"], flags["stop"]
    while not stop.is_set():
        counters[idx] = consumer.processed
        if "t0" not in window and win_start.is_set():
            window.update(t0=time.perf_counter(), cpu0=time.process_time(), n0=consumer.processed, b0=_batches())
            if prof is not None:
                prof.enable()
        if "t1" not in window and win_end.is_set() and "t0" in window:
            if prof is not None:
                prof.disable()
            window.update(t1=time.perf_counter(), cpu1=time.process_time(), n1=consumer.processed, b1=_batches())
            out.put(("window", idx))
        await asyncio.sleep(TICK_S)
    consumer.stop()
    clean = await consumer.wait(timeout=15.0)
    counters[idx] = consumer.processed
    if prof is not None and "t1" in window:
        prof.dump_stats(flags["profile_path"])
    await client.aclose()
    out.put(
        (
            "done",
            idx,
            {
                "processed": consumer.processed,
                "handled": handled[0],
                "clean_stop": clean,
                "window": window,
                "latencies": latencies.tobytes(),
            },
        )
    )


def _batches() -> float:
    """Batches this process's consumer committed so far (the bus's own histogram)."""
    return REGISTRY.get_sample_value("zvt_bus_batch_size_count", {"group": GROUP}) or 0.0


def publisher_process(
    cfg: ChildConfig, idx: int, mode: str, pub_counts: Any, cons_counts: Any, flags: dict[str, Any],
    params: dict[str, float], out: Any,
) -> None:
    try:
        asyncio.run(_publish(cfg, idx, mode, pub_counts, cons_counts, flags, out, params))
    except BaseException as exc:
        out.put(("error", f"publisher {idx}", f"{type(exc).__name__}: {exc}"))
        raise


async def _publish(
    cfg: ChildConfig, idx: int, mode: str, pub_counts: Any, cons_counts: Any, flags: dict[str, Any],
    out: Any, params: dict[str, float],
) -> None:
    core, bus_settings = _settings(cfg)
    setup_logging(core)
    client = await open_client(core)
    bus = Bus(client, bus_settings)
    seq = idx * 1_000_000_000
    stop = flags["stop"]
    cpu0 = time.process_time()
    try:
        if mode == "backlog":
            high, low = int(params["high"]), int(params["low"])

            async def pump() -> None:
                nonlocal seq
                filling = True
                while not stop.is_set():
                    backlog = sum(pub_counts) - sum(cons_counts)
                    if filling and backlog >= high:
                        filling = False
                    elif not filling and backlog < low:
                        filling = True
                    if not filling:
                        await asyncio.sleep(0.01)
                        continue
                    events = [make_event(seq + k) for k in range(cfg.batch)]
                    seq += cfg.batch
                    await bus.publish_many(events)
                    pub_counts[idx] += len(events)

            # two batches in flight: one being encoded while the other is on the wire
            await asyncio.gather(pump(), pump())
        else:  # paced
            rate, duration = params["rate"], params["duration"]
            round_trips: array.array[int] = array.array("q")  # publish_many calls, ns
            sent = 0
            t0 = time.perf_counter()
            end = t0 + duration
            while not stop.is_set():
                now = time.perf_counter()
                if now >= end:
                    break
                due = int((now - t0) * rate) - sent
                if due <= 0:
                    await asyncio.sleep(max(0.0, (sent + 1) / rate - (now - t0)))
                    continue
                n = min(due, cfg.batch)
                events = [make_event(seq + k, str(time.time_ns())) for k in range(n)]
                seq += n
                before = time.time_ns()
                await bus.publish_many(events)
                round_trips.append(time.time_ns() - before)
                sent += n
                pub_counts[idx] = sent
            out.put(("paced", idx, {"sent": sent, "seconds": time.perf_counter() - t0,
                                    "round_trips": round_trips.tobytes()}))
    finally:
        await client.aclose()
    out.put(("pub_done", idx, {"cpu_s": time.process_time() - cpu0}))


# ---------------------------------------------------------------------------------------------
# Redis administration (main process, synchronous)


@dataclass
class Target:
    url: str
    cluster: bool
    admin: Any  # redis.Redis or RedisCluster: key-routed commands
    masters: list[tuple[str, int]]
    replicas: list[tuple[str, int]] = field(default_factory=list)
    cleanup: Any = None  # callable stopping a server we started

    def node(self, host: str, port: int) -> redis.Redis:
        return redis.Redis(host=host, port=port, socket_timeout=30)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def open_target(args: argparse.Namespace) -> Target:
    from devstack import stack

    if args.redis_url:
        url = args.redis_url
        stop = None
    elif args.cluster:
        stack.ensure_cluster()
        url = stack.CLUSTER_URL
        stop = None
    else:
        port = free_port()
        folder = tempfile.mkdtemp(prefix="zvt-bench-redis-")
        stack.start_redis_server(port, folder, ["--appendonly", "no", "--save", ""])

        def stop() -> None:
            stack.stop_redis_server(port, folder)
            shutil.rmtree(folder, ignore_errors=True)

        url = f"redis://127.0.0.1:{port}/0"
    admin: Any
    try:
        if args.cluster:
            admin = RedisCluster.from_url(url, socket_timeout=30)
            masters = sorted((n.host, int(n.port)) for n in admin.get_primaries())
            replicas = sorted((n.host, int(n.port)) for n in admin.get_replicas())
        else:
            admin = redis.Redis.from_url(url, socket_timeout=30)
            admin.ping()
            info = admin.connection_pool.connection_kwargs
            masters = [(info.get("host", "127.0.0.1"), int(info.get("port", 6379)))]
            replicas = []
    except Exception:
        if stop is not None:
            stop()
        raise
    return Target(url, args.cluster, admin, masters, replicas, stop)


def redis_cpu(target: Target, nodes: list[tuple[str, int]] | None = None) -> float:
    total = 0.0
    for host, port in nodes if nodes is not None else target.masters:
        info = target.node(host, port).info("cpu")
        total += float(info["used_cpu_sys"]) + float(info["used_cpu_user"])
    return total


def commandstats(target: Target) -> dict[str, tuple[int, int]]:
    """``{command: (calls, usec)}`` summed over masters."""
    out: dict[str, tuple[int, int]] = {}
    for host, port in target.masters:
        for name, stat in target.node(host, port).info("commandstats").items():
            calls, usec = out.get(name, (0, 0))
            out[name] = (calls + int(stat["calls"]), usec + int(stat["usec"]))
    return out


def stream_sum(target: Target, namespace: str, shards: int, suffix: str) -> tuple[int, int]:
    """``(entries, pending of the bench group)`` over every shard of ``<ns>:{k}:<suffix>``."""
    length = pending = 0
    for shard in range(shards):
        key = f"{namespace}:{{{shard}}}:{suffix}"
        length += int(target.admin.xlen(key))
        with contextlib.suppress(redis.ResponseError):
            for group in target.admin.xinfo_groups(key):
                name = group["name"].decode() if isinstance(group["name"], bytes) else group["name"]
                if name == GROUP:
                    pending += int(group["pending"])
    return length, pending


def delete_keys(target: Target, prefix: str) -> int:
    """SCAN + UNLINK every key starting with ``prefix`` on every master."""
    deleted = 0
    for host, port in target.masters:
        node = target.node(host, port)
        batch: list[bytes] = []
        for key in node.scan_iter(match=f"{prefix}*", count=5000):
            batch.append(key)
            if len(batch) >= 1000:
                deleted += _unlink(node, batch, target.cluster)
                batch = []
        if batch:
            deleted += _unlink(node, batch, target.cluster)
    return deleted


def _unlink(node: redis.Redis, keys: list[bytes], cluster: bool) -> int:
    if not cluster:
        return int(node.unlink(*keys))
    pipe = node.pipeline(transaction=False)  # one key per command: keys are in many slots
    for key in keys:
        pipe.unlink(key)
    return sum(int(n) for n in pipe.execute())


def server_version(target: Target) -> str:
    host, port = target.masters[0]
    return str(target.node(host, port).info("server")["redis_version"])


# ---------------------------------------------------------------------------------------------
# phases


class Children:
    """Spawned processes plus the queue they report on; everything waited on has a deadline."""

    def __init__(self, ctx: Any) -> None:
        self.ctx = ctx
        self.out = ctx.Queue()
        self.procs: list[mp.process.BaseProcess] = []
        self.messages: list[tuple[Any, ...]] = []

    def start(self, target: Any, *args: Any) -> mp.process.BaseProcess:
        proc: mp.process.BaseProcess = self.ctx.Process(target=target, args=(*args, self.out), daemon=True)
        proc.start()
        self.procs.append(proc)
        return proc

    def wait_for(self, kind: str, count: int, timeout: float) -> list[tuple[Any, ...]]:
        deadline = time.monotonic() + timeout
        while True:
            got = [m for m in self.messages if m[0] == kind]
            if len(got) >= count:
                return got
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"waited {timeout:.0f}s for {count} '{kind}' message(s), got {len(got)}")
            try:
                message = self.out.get(timeout=min(remaining, 0.5))
            except queue.Empty:
                dead = [p for p in self.procs if p.exitcode not in (None, 0)]
                if dead:
                    self.drain()
                    errors = [m for m in self.messages if m[0] == "error"]
                    codes = [p.exitcode for p in dead]
                    raise RuntimeError(f"a child process failed: {errors or codes}")
                continue
            if message[0] == "error":
                raise RuntimeError(f"{message[1]} failed: {message[2]}")
            self.messages.append(message)

    def drain(self) -> None:
        with contextlib.suppress(queue.Empty):
            while True:
                self.messages.append(self.out.get_nowait())

    def join(self, timeout: float = 20.0) -> None:
        deadline = time.monotonic() + timeout
        for proc in self.procs:
            proc.join(max(0.1, deadline - time.monotonic()))
        for proc in self.procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        self.out.close()


def _flags(ctx: Any, profile_path: str | None = None) -> dict[str, Any]:
    flags: dict[str, Any] = {name: ctx.Event() for name in ("go", "win_start", "win_end", "stop")}
    flags["profile_path"] = profile_path
    return flags


def _cpu_of(pid: int) -> float:
    try:
        import psutil

        times = psutil.Process(pid).cpu_times()
        return float(times.user + times.system)
    except Exception:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def throughput_phase(args: argparse.Namespace, target: Target, namespace: str, ctx: Any) -> dict[str, Any]:
    cfg = ChildConfig(target.url, target.cluster, namespace, args.shards, args.batch, args.read_count)
    flags = _flags(ctx, args.profile)
    cons_counts = ctx.RawArray("q", args.consumers)
    pub_counts = ctx.RawArray("q", args.publishers)
    kids = Children(ctx)
    try:
        consumers = [
            kids.start(consumer_process, cfg, i, cons_counts, flags, bool(args.profile) and i == 0)
            for i in range(args.consumers)
        ]
        params = {"high": args.backlog, "low": args.backlog // 2}
        publishers = [
            kids.start(publisher_process, cfg, i, "backlog", pub_counts, cons_counts, flags, params)
            for i in range(args.publishers)
        ]
        kids.wait_for("ready", args.consumers, 60)
        t = time.monotonic()
        while sum(pub_counts) < args.backlog and time.monotonic() - t < 120:  # prefill
            kids.drain()
            time.sleep(0.05)
        prefilled = sum(pub_counts)
        print(f"  prefilled {prefilled} events in {time.monotonic() - t:.1f} s; consuming", flush=True)
        flags["go"].set()
        time.sleep(args.warmup)
        # the window
        redis0, stats0 = redis_cpu(target), commandstats(target)
        replica0 = redis_cpu(target, target.replicas) if target.replicas else 0.0
        pub_cpu0 = sum(_cpu_of(p.pid or 0) for p in publishers)
        published0, handled0 = sum(pub_counts), sum(cons_counts)
        flags["win_start"].set()
        t0 = time.perf_counter()
        min_backlog = sum(pub_counts) - sum(cons_counts)
        last_t, last_n = t0, handled0
        while (now := time.perf_counter()) < t0 + args.seconds:
            time.sleep(min(0.1, t0 + args.seconds - now))
            backlog = sum(pub_counts) - sum(cons_counts)
            min_backlog = min(min_backlog, backlog)
            if time.perf_counter() - last_t >= 1.0:
                n = sum(cons_counts)
                print(f"  {time.perf_counter() - t0:4.1f} s  {(n - last_n) / (time.perf_counter() - last_t):8.0f} events/s  backlog {backlog}", flush=True)
                last_t, last_n = time.perf_counter(), n
        flags["win_end"].set()
        t1 = time.perf_counter()
        redis1, stats1 = redis_cpu(target), commandstats(target)
        replica1 = redis_cpu(target, target.replicas) if target.replicas else 0.0
        pub_cpu1 = sum(_cpu_of(p.pid or 0) for p in publishers)
        published1 = sum(pub_counts)
        handled1 = sum(cons_counts)
        kids.wait_for("window", args.consumers, 30)  # each consumer saw win_end
        flags["stop"].set()
        done = kids.wait_for("done", args.consumers, 60)
        kids.wait_for("pub_done", args.publishers, 30)
    finally:
        flags["stop"].set()
        kids.join()

    results = [m[2] for m in sorted(done, key=lambda m: m[1])]
    windows = [r["window"] for r in results]
    if any("t1" not in w for w in windows):
        raise RuntimeError("a consumer missed the measuring window")
    handled = sum(w["n1"] - w["n0"] for w in windows)
    cpu = sum(w["cpu1"] - w["cpu0"] for w in windows)
    seconds = sum(w["t1"] - w["t0"] for w in windows) / len(windows)
    processed_total = sum(r["processed"] for r in results)
    handled_total = sum(r["handled"] for r in results)
    outputs, out_pending = stream_sum(target, namespace, args.shards, str(EventType.ORDER_VALIDATED))
    inputs, in_pending = stream_sum(target, namespace, args.shards, str(EventType.ORDER_REQUESTED))
    dead, _ = stream_sum(target, namespace, args.shards, "deadletter")
    cmd = {
        name: (stats1[name][0] - stats0.get(name, (0, 0))[0], stats1[name][1] - stats0.get(name, (0, 0))[1])
        for name in stats1
    }
    return {
        "events_per_s": handled / seconds if seconds else 0.0,
        "handled_in_window": handled,
        "per_consumer_in_window": [w["n1"] - w["n0"] for w in windows],
        "batches_in_window": sum(w["b1"] - w["b0"] for w in windows),
        "mean_batch": handled / max(1.0, sum(w["b1"] - w["b0"] for w in windows)),
        "window_s": seconds,
        "client_cpu_us_per_event": cpu / handled * 1e6 if handled else None,
        "client_cpu_share": cpu / seconds / args.consumers if seconds else None,
        # Redis CPU is sampled by this process: divide by what the counters say was handled in
        # this process's window (they lag by one event-loop turn of the consumer at both ends)
        "redis_cpu_us_per_event": (redis1 - redis0) / (handled1 - handled0) * 1e6 if handled1 > handled0 else None,
        "redis_cpu_share": (redis1 - redis0) / seconds if seconds else None,
        "replica_cpu_us_per_event": (replica1 - replica0) / (handled1 - handled0) * 1e6
        if handled1 > handled0 and target.replicas else None,
        "published_in_window": published1 - published0,
        "publisher_cpu_us_per_event": (pub_cpu1 - pub_cpu0) / (published1 - published0) * 1e6
        if published1 > published0 else None,
        "publisher_cpu_share": (pub_cpu1 - pub_cpu0) / seconds if seconds else None,
        "prefilled": prefilled,
        "min_backlog": min_backlog,
        "processed_total": processed_total,
        "handled_total": handled_total,
        "published_total": sum(pub_counts),
        "input_entries": inputs,
        "output_entries": outputs,
        "pending_after_stop": in_pending + out_pending,
        "dead_letters": dead,
        "outputs_match": outputs == processed_total == handled_total,
        "clean_stop": all(r["clean_stop"] for r in results),
        "redis_commandstats_window": {k: {"calls": c, "usec": u} for k, (c, u) in cmd.items() if c},
    }


def latency_phase(args: argparse.Namespace, target: Target, namespace: str, ctx: Any) -> dict[str, Any]:
    cfg = ChildConfig(target.url, target.cluster, namespace, args.shards, args.batch, args.read_count)
    flags = _flags(ctx, latency_profile_path(args.profile) if args.profile else None)
    cons_counts = ctx.RawArray("q", args.consumers)
    pub_counts = ctx.RawArray("q", 1)
    duration = min(args.seconds, 10.0)
    kids = Children(ctx)
    try:
        for i in range(args.consumers):
            kids.start(consumer_process, cfg, i, cons_counts, flags, bool(args.profile) and i == 0)
        kids.wait_for("ready", args.consumers, 60)
        flags["go"].set()
        time.sleep(0.5)  # consumers blocked in XREADGROUP on every shard
        params = {"rate": float(args.rate), "duration": duration}
        flags["win_start"].set()
        redis0 = redis_cpu(target)
        kids.start(publisher_process, cfg, 0, "paced", pub_counts, cons_counts, flags, params)
        paced = kids.wait_for("paced", 1, duration + 60)[0][2]
        deadline = time.monotonic() + 10
        while sum(cons_counts) < paced["sent"] and time.monotonic() < deadline:
            time.sleep(0.02)
        redis1 = redis_cpu(target)
        flags["win_end"].set()
        kids.wait_for("window", args.consumers, 30)
        flags["stop"].set()
        done = kids.wait_for("done", args.consumers, 60)
    finally:
        flags["stop"].set()
        kids.join()
    samples: list[int] = []
    for message in done:
        arr = array.array("q")
        arr.frombytes(message[2]["latencies"])
        samples.extend(arr)
    samples.sort()
    trips = array.array("q")
    trips.frombytes(paced["round_trips"])
    publish_ms = sorted(trips)
    windows = [m[2]["window"] for m in sorted(done, key=lambda m: m[1])]
    handled = sum(w["n1"] - w["n0"] for w in windows)
    batches = sum(w["b1"] - w["b0"] for w in windows)
    cpu = sum(w["cpu1"] - w["cpu0"] for w in windows)
    seconds = sum(w["t1"] - w["t0"] for w in windows) / len(windows)

    def pct(q: float) -> float | None:
        if not samples:
            return None
        return samples[min(len(samples) - 1, int(q * len(samples)))] / 1e6

    return {
        "rate_target": args.rate,
        "rate_achieved": paced["sent"] / paced["seconds"] if paced["seconds"] else 0.0,
        "duration_s": paced["seconds"],
        "sent": paced["sent"],
        "samples": len(samples),
        "p50_ms": pct(0.50),
        "p90_ms": pct(0.90),
        "p99_ms": pct(0.99),
        "p999_ms": pct(0.999),
        "max_ms": samples[-1] / 1e6 if samples else None,
        "publish_calls": len(publish_ms),
        "publish_p50_ms": publish_ms[len(publish_ms) // 2] / 1e6 if publish_ms else None,
        "publish_p99_ms": publish_ms[min(len(publish_ms) - 1, int(0.99 * len(publish_ms)))] / 1e6 if publish_ms else None,
        "handled": handled,
        "per_consumer": [w["n1"] - w["n0"] for w in windows],
        "batches": batches,
        "mean_batch": handled / batches if batches else None,
        "client_cpu_us_per_event": cpu / handled * 1e6 if handled else None,
        "client_cpu_share": cpu / seconds / len(windows) if seconds else None,
        "redis_cpu_us_per_event": (redis1 - redis0) / handled * 1e6 if handled else None,
    }


def ceiling_phase(target: Target, namespace: str, payload_size: int) -> dict[str, Any]:
    binary = shutil.which("redis-benchmark")
    if binary is None:
        return {"error": "redis-benchmark not found on PATH"}
    host, port = target.masters[0]
    if target.cluster:  # a hash tag whose slot this master serves
        slots = [
            (int(r[0]), int(r[1]))
            for r, node in _slot_ranges(target)
            if node == (host, port)
        ]
        i = 0
        while not any(lo <= key_slot(f"{namespace}:{{c{i}}}:ceiling".encode()) <= hi for lo, hi in slots):
            i += 1
        key = f"{namespace}:{{c{i}}}:ceiling"
    else:
        key = f"{namespace}:ceiling"
    command = [binary, "-h", host, "-p", str(port), "-n", "200000", "-P", "64", "-q",
               "XADD", key, "*", "d", "x" * payload_size]
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=180, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"error": "redis-benchmark timed out", "node": f"{host}:{port}"}
    finally:
        target.node(host, port).unlink(key)
    rates = re.findall(r"([\d.]+) requests per second", proc.stdout.replace("\r", "\n"))
    shown = [c if len(c) < 40 else c[:8] + f"...({len(c)} bytes)" for c in command]
    if not rates:
        return {"error": f"could not parse redis-benchmark output: {proc.stdout[-300:]} {proc.stderr[-300:]}",
                "command": shlex.join(shown)}
    return {"xadd_per_s": float(rates[-1]), "node": f"{host}:{port}", "key": key, "payload_bytes": payload_size,
            "command": shlex.join(shown)}


def _slot_ranges(target: Target) -> list[tuple[tuple[int, int], tuple[str, int]]]:
    host, port = target.masters[0]
    out = []
    for entry in target.node(host, port).execute_command("CLUSTER SLOTS"):
        lo, hi, primary = entry[0], entry[1], entry[2]
        h = primary[0].decode() if isinstance(primary[0], bytes) else primary[0]
        out.append(((int(lo), int(hi)), (h, int(primary[1]))))
    return out


# ---------------------------------------------------------------------------------------------
# report


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "cpu_model": model,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def profile_top(path: str, events: int, limit: int = 25) -> list[dict[str, Any]]:
    """The profile's functions by cumulative time, in microseconds per handled event."""
    stats = pstats.Stats(path)
    # the handler's own call count is the exact number of events handled while profiling
    # (the consumer's counter is read between batches, so it can be a batch or so off)
    calls = [v[1] for (f, _, name), v in stats.stats.items() if name == "handle" and f.endswith("bench_bus.py")]  # type: ignore[attr-defined]
    events = calls[0] if calls else events
    rows = []
    for (filename, line, name), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():  # type: ignore[attr-defined]
        where = f"{Path(filename).name}:{line}" if line else filename
        rows.append({"function": f"{name} ({where})", "calls_per_event": ncalls / events,
                     "cum_us_per_event": cumtime / events * 1e6, "self_us_per_event": tottime / events * 1e6})
    rows.sort(key=lambda r: -r["cum_us_per_event"])
    return rows[:limit]


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None else format(value, spec)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m loadtest.bench_bus", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0, help="measured window of the throughput phase (default 10)")
    parser.add_argument("--shards", type=int, default=16, help="shards per event type (default 16)")
    parser.add_argument("--consumers", type=int, default=1, help="consumer processes (default 1)")
    parser.add_argument("--publishers", type=int, default=1, help="publisher processes of the throughput phase (default 1)")
    parser.add_argument("--cluster", action="store_true", help="use a Redis Cluster (devstack's unless --redis-url)")
    parser.add_argument("--redis-url", help="Redis to use (default: a throwaway redis-server on a free port)")
    parser.add_argument("--rate", type=int, default=5000, help="events/s of the latency phase (default 5000)")
    parser.add_argument("--batch", type=int, default=200, help="events per publish_many call (default 200)")
    parser.add_argument("--backlog", type=int, default=100_000, help="events kept queued in the throughput phase (default 100000)")
    parser.add_argument("--read-count", type=int, help="entries per XREADGROUP per shard (default: BusSettings.batch_size)")
    parser.add_argument("--warmup", type=float, default=1.0, help="seconds consumed before the window opens (default 1)")
    parser.add_argument("--skip", action="append", choices=("throughput", "latency", "ceiling"), default=[],
                        help="leave a phase out (repeatable)")
    parser.add_argument("--profile", metavar="PATH", help="cProfile consumer 0 over the window; dump pstats to PATH")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.shards < 1 or args.consumers < 1 or args.publishers < 1 or args.batch < 1 or args.rate < 1:
        parser.error("--seconds, --shards, --consumers, --publishers, --batch and --rate must be positive")
    if args.profile:
        args.profile = str(Path(args.profile).resolve())
        Path(args.profile).parent.mkdir(parents=True, exist_ok=True)

    setup_logging(CoreSettings(log_level="WARNING", log_format="console"))
    started = dt.datetime.now(dt.UTC)
    base = f"zvtbench-{os.getpid()}-{int(time.time())}"
    ctx = mp.get_context("spawn")
    payload_size = len(encode(make_event(0)))
    info = machine()
    target = open_target(args)
    results: dict[str, Any] = {}
    try:
        version = server_version(target)
        mode = f"cluster ({len(target.masters)} masters)" if target.cluster else "single"
        print(f"bench_bus: redis {version} {mode} at {target.url}; {args.shards} shards, {args.consumers} consumer(s), "
              f"{args.publishers} publisher(s); {info['nproc']} CPUs ({info['cpu_model']}); event {payload_size} bytes",
              flush=True)
        busy = args.consumers + args.publishers + len(target.masters)
        if info["nproc"] < busy:
            print(f"  note: {busy} busy processes (consumers + publishers + redis masters) share {info['nproc']} CPUs; "
                  "they compete for CPU", flush=True)
        if "throughput" not in args.skip:
            print(f"throughput: {args.seconds:g} s window, backlog kept at {args.backlog // 2}..{args.backlog}", flush=True)
            results["throughput"] = throughput_phase(args, target, f"{base}-t", ctx)
            if args.profile:  # consumer 0 is the profiled one
                events = results["throughput"]["per_consumer_in_window"][0]
                results["throughput"]["profile_top"] = profile_top(args.profile, max(1, events))
        if "latency" not in args.skip:
            print(f"latency: {args.rate}/s for {min(args.seconds, 10.0):g} s", flush=True)
            results["latency"] = latency_phase(args, target, f"{base}-l", ctx)
            if args.profile:
                events = results["latency"]["per_consumer"][0]
                results["latency"]["profile_top"] = profile_top(latency_profile_path(args.profile), max(1, events))
        if "ceiling" not in args.skip:
            print("ceiling: redis-benchmark XADD", flush=True)
            results["ceiling"] = ceiling_phase(target, base, payload_size)
    finally:
        with contextlib.suppress(Exception):
            n = delete_keys(target, base)
            print(f"cleanup: unlinked {n} keys of {base}", flush=True)
        if target.cleanup is not None:
            target.cleanup()

    th, lat, ceil = results.get("throughput", {}), results.get("latency", {}), results.get("ceiling", {})
    report(args, th, lat, ceil)
    eps = th.get("events_per_s")
    ceiling = ceil.get("xadd_per_s")
    summary = {
        "events_per_s": eps,
        "p50_ms": lat.get("p50_ms"),
        "p99_ms": lat.get("p99_ms"),
        "client_cpu_us_per_event": th.get("client_cpu_us_per_event"),
        "redis_cpu_us_per_event": th.get("redis_cpu_us_per_event"),
        "ceiling_events_per_s": ceiling,
        "ratio_to_ceiling": eps / ceiling if eps and ceiling else None,
        "params": {k: getattr(args, k) for k in ("seconds", "shards", "consumers", "publishers", "cluster", "redis_url",
                                                 "rate", "batch", "backlog", "read_count", "warmup", "profile")},
        "redis_mode": "cluster" if target.cluster else "single",
        "redis_masters": [f"{h}:{p}" for h, p in target.masters],
        "redis_version": version,
        "event_bytes": payload_size,
        "machine": info,
        "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
        "throughput": th,
        "latency": lat,
        "ceiling": ceil,
    }
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    print(
        f"bench_bus: {fmt(eps, '.0f')} events/s, p50 {fmt(lat.get('p50_ms'), '.2f')} ms, "
        f"p99 {fmt(lat.get('p99_ms'), '.2f')} ms @{args.rate}/s, "
        f"client {fmt(th.get('client_cpu_us_per_event'))} us/event, redis {fmt(th.get('redis_cpu_us_per_event'))} us/event, "
        f"ceiling {fmt(ceiling, '.0f')} XADD/s (ratio {fmt(summary['ratio_to_ceiling'], '.2f')})"
    )
    ok = bool(th.get("outputs_match", True)) and not th.get("dead_letters")
    return 0 if ok else 1


def latency_profile_path(path: str) -> str:
    p = Path(path)
    return str(p.with_name(f"{p.stem}.latency{p.suffix or '.pstats'}"))


def print_profile(path: str | None, rows: list[dict[str, Any]] | None) -> None:
    if not rows:
        return
    print(f"  profile    {path} (consumer 0; cProfile roughly doubles times); top by cumulative us/event:")
    for row in rows[:20]:
        print(f"    {row['cum_us_per_event']:8.1f} cum {row['self_us_per_event']:7.1f} self "
              f"{row['calls_per_event']:7.2f} calls  {row['function']}")


def report(args: argparse.Namespace, th: dict[str, Any], lat: dict[str, Any], ceil: dict[str, Any]) -> None:
    print()
    print("=" * 78)
    if th:
        print(f"throughput   {th['events_per_s']:,.0f} events/s handled ({th['handled_in_window']} in {th['window_s']:.2f} s, "
              f"{args.consumers} consumer process(es))")
        print(f"  client     {fmt(th['client_cpu_us_per_event'])} us CPU/event in the consumer process(es) "
              f"(busy {fmt(100 * (th['client_cpu_share'] or 0), '.0f')}% of a core each; "
              f"{th['mean_batch']:.0f} events per committed batch)")
        print(f"  redis      {fmt(th['redis_cpu_us_per_event'])} us CPU/event (INFO cpu, masters; busy "
              f"{fmt(100 * (th['redis_cpu_share'] or 0), '.0f')}% of a core) - includes the publisher's XADDs of "
              f"{th['published_in_window']} events published in the window")
        if th.get("replica_cpu_us_per_event") is not None:
            print(f"  replicas   {fmt(th['replica_cpu_us_per_event'])} us CPU/event more (not counted above)")
        print(f"  publisher  {fmt(th['publisher_cpu_us_per_event'])} us CPU/event published "
              f"(busy {fmt(100 * (th['publisher_cpu_share'] or 0), '.0f')}% of a core); "
              f"backlog never below {th['min_backlog']}" + ("  ** RAN DRY: rate is publisher-bound **" if th['min_backlog'] <= 0 else ""))
        top = sorted(th["redis_commandstats_window"].items(), key=lambda kv: -kv[1]["usec"])[:5]
        if top and th["handled_in_window"]:
            print("  redis time by command (commandstats, us/event; Lua's inner calls also count on their own): "
                  + ", ".join(f"{k.removeprefix('cmdstat_')} {v['usec'] / th['handled_in_window']:.1f}" for k, v in top))
        check = "ok" if th["outputs_match"] else "MISMATCH"
        print(f"  check      {check}: {th['processed_total']} acked, {th['handled_total']} handled, "
              f"{th['output_entries']} order.validated entries; {th['pending_after_stop']} pending after stop, "
              f"{th['dead_letters']} dead letters")
        print_profile(args.profile, th.get("profile_top"))
    if lat:
        print(f"latency      p50 {fmt(lat['p50_ms'], '.2f')} ms, p90 {fmt(lat['p90_ms'], '.2f')} ms, "
              f"p99 {fmt(lat['p99_ms'], '.2f')} ms, p99.9 {fmt(lat['p999_ms'], '.2f')} ms, max {fmt(lat['max_ms'], '.2f')} ms "
              f"(publish to handler; {lat['samples']} events at {lat['rate_achieved']:,.0f}/s, target {lat['rate_target']}/s)")
        print(f"  at that rate: client {fmt(lat['client_cpu_us_per_event'])} us CPU/event "
              f"(busy {fmt(100 * (lat['client_cpu_share'] or 0), '.0f')}% of a core), "
              f"redis {fmt(lat['redis_cpu_us_per_event'])} us CPU/event incl. the XADDs; "
              f"{fmt(lat['mean_batch'])} events per committed batch")
        print(f"  publisher  publish_many round trip p50 {fmt(lat['publish_p50_ms'], '.2f')} ms, "
              f"p99 {fmt(lat['publish_p99_ms'], '.2f')} ms ({lat['publish_calls']} calls; part of the latency above)")
        print_profile(latency_profile_path(args.profile) if args.profile else None, lat.get("profile_top"))
    if ceil:
        if "error" in ceil:
            print(f"ceiling      {ceil['error']}")
        else:
            print(f"ceiling      {ceil['xadd_per_s']:,.0f} XADD/s of {ceil['payload_bytes']} bytes on {ceil['node']} "
                  f"(redis-benchmark -n 200000 -P 64)")
    print("=" * 78)


if __name__ == "__main__":
    sys.exit(main())
