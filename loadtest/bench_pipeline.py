"""Pipeline benchmark: orders through all four trading stages as real processes.

    python loadtest/bench_pipeline.py [--seconds 20] [--rate 1000] [--cluster | --redis-url URL]
                                      [--shards 16] [--portfolios 64] [--warmup 3] [--tick-ms 5]
                                      [--inflight 2000] [--json PATH] [--profile DIR]

Starts ``risk``, ``order``, ``routing`` and ``portfolio`` with ``devstack.fleet`` on a fresh
namespace, seeds portfolios with ample balances and generous limits, and puts orders on the
bus with ``services.core.inject.inject_orders`` (the record + ``order.requested``, exactly as
the gateway does) from this process:

* ``--rate N``: paced, every ``--tick-ms`` the orders that are due go out in one pipelined
  call (5 orders per call at 1,000/s and 5 ms);
* ``--rate 0``: as fast as the pipeline takes them, with at most ``--inflight`` orders
  injected but not yet seen in a position (closed loop, batches of up to 200), so the
  pipeline is saturated without an unbounded backlog.

Order-to-position latency: a separate reader process XREADs (BLOCK) the ``position.updated``
streams of every shard and stamps ``time.time_ns()`` when an order's first
``position.updated`` arrives; the latency is that stamp minus ``time.time_ns()`` taken just
before the ``inject_orders`` call that carried the order. That is what a downstream consumer
of positions observes: it includes every stage, every commit and the reader's own wake-up.
Two lower bounds are reported beside it: the event's ``occurred_at`` (stamped by the
portfolio stage before its commit) and the entry id's millisecond time (Redis's clock when
the commit appended it; 1 ms resolution).

CPU: user + system CPU time (psutil) of every fleet process and of the Redis server
process(es), delta over the measured window, divided by the orders completed in it. The
injector (this process, standing in for the gateway) and the reader are reported but not
counted; Redis's figure does include their commands (the injection's SET + XADD, the reader's
XREAD), and Redis's per-command time (INFO commandstats) is listed so they can be told apart.

Redis: without ``--redis-url`` / ``--cluster`` a throwaway redis-server is started on a free
port (devstack's settings: AOF on, fsync every second), so its CPU is the benchmark's alone.
``--cluster`` uses devstack's Redis Cluster (all six nodes' CPU is counted, replicas listed
apart), ``--redis-url`` an existing server: on a shared server, other clients' load lands in
the Redis figure. Every key of the namespace is deleted at the end.

``--profile DIR`` runs the services under cProfile (``loadtest/profiled.py``), switched on
for the measured window only, and prints each service's top functions; profiling inflates
every time, so take the figures from a run without it.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import contextlib
import datetime as dt
import json
import multiprocessing as mp
import os
import platform
import pstats
import re
import shlex
import shutil
import signal
import socket
import stat
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psutil
import redis

from devstack import stack
from devstack.fleet import PIPELINE, Fleet
from services.core.bus import DATA, Bus
from services.core.codec import decode
from services.core.events import EventType
from services.core.hotstate import LimitsRecord
from services.core.inject import OrderSpec, inject_orders, seed_portfolio
from services.core.redisconn import connect
from services.core.settings import BusSettings, CoreSettings
from services.trading import OrderType, Side
from services.venues.paper import DEFAULT_PRICES

ROOT = Path(__file__).resolve().parent.parent
SYMBOLS = ("BTC/USDT", "ETH/USDT", "SOL/USDT")
QUANTITY = {"BTC/USDT": Decimal("0.001"), "ETH/USDT": Decimal("0.02"), "SOL/USDT": Decimal("0.5")}
BALANCES = {"USDT": Decimal("1000000000000"), "BTC": Decimal("1000000"), "ETH": Decimal("10000000"), "SOL": Decimal("1000000000")}
LIMITS = LimitsRecord(
    max_notional_per_order=Decimal("100000000"),
    max_position_per_symbol=Decimal("1000000000"),
    price_band=Decimal("0.05"),
    max_orders_per_window=10_000_000,
    window_seconds=1,
)
MAX_BATCH = 200
TARGET_CPU_US = 300.0
TARGET_P99_MS = 25.0
TARGET_RATE = 1000


# ---------------------------------------------------------------------------------------------
# Redis: a throwaway server, devstack's cluster, or a given URL


@dataclass
class RedisTarget:
    url: str
    cluster: bool
    description: str
    masters: list[tuple[str, int]]
    pids: dict[str, int]  # label -> pid of every redis-server whose CPU is counted
    replica_labels: set[str] = field(default_factory=set)
    shared: bool = False
    stop: Callable[[], None] | None = None

    def node(self, host: str, port: int) -> redis.Redis:
        return redis.Redis(host=host, port=port, socket_timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _server_pid(host: str, port: int) -> int | None:
    """The pid of the redis-server behind host:port, if it runs on this machine."""
    with contextlib.suppress(redis.RedisError, KeyError, ValueError):
        pid = int(redis.Redis(host=host, port=port, socket_timeout=5).info("server")["process_id"])
        if psutil.pid_exists(pid) and "redis" in psutil.Process(pid).name():
            return pid
    return None


def open_target(args: argparse.Namespace) -> RedisTarget:
    if args.cluster:
        if args.redis_url is None:
            stack.ensure_cluster()
        url = args.redis_url or stack.CLUSTER_URL
        nodes = stack.cluster_nodes()
        pids: dict[str, int] = {}
        replicas: set[str] = set()
        masters: list[tuple[str, int]] = []
        for n in nodes:
            label = f"redis:{n['port']}" + ("" if n["role"] == "master" else " (replica)")
            pid = _server_pid(stack.HOST, n["port"])
            if pid is not None:
                pids[label] = pid
            if n["role"] == "master":
                masters.append((stack.HOST, n["port"]))
            else:
                replicas.add(label)
        desc = f"Redis Cluster ({len(masters)} masters + {len(replicas)} replicas, devstack, shared)"
        return RedisTarget(url, True, desc, masters, pids, replicas, shared=True)
    if args.redis_url:
        client = redis.Redis.from_url(args.redis_url, socket_timeout=30)
        kw = client.connection_pool.connection_kwargs
        host, port = str(kw.get("host", "127.0.0.1")), int(kw.get("port", 6379))
        pid = _server_pid(host, port)
        return RedisTarget(
            args.redis_url, False, f"Redis at {host}:{port} (shared: other clients' load is counted)",
            [(host, port)], {f"redis:{port}": pid} if pid else {}, shared=True,
        )
    port = _free_port()
    folder = tempfile.mkdtemp(prefix="zvt-bench-pipeline-redis-")
    pid = stack.start_redis_server(port, folder)

    def stop() -> None:
        stack.stop_redis_server(port, folder)
        shutil.rmtree(folder, ignore_errors=True)

    return RedisTarget(
        f"redis://127.0.0.1:{port}/0", False, f"single Redis (own redis-server :{port}, AOF everysec)",
        [("127.0.0.1", port)], {f"redis:{port}": pid}, stop=stop,
    )


def delete_namespace(target: RedisTarget, namespace: str) -> int:
    deleted = 0
    for host, port in target.masters:
        node = target.node(host, port)
        keys = list(node.scan_iter(match=f"{namespace}:*", count=5000))
        for i in range(0, len(keys), 500):
            chunk = keys[i : i + 500]
            if target.cluster:  # keys of many slots: one command each
                pipe = node.pipeline(transaction=False)
                for key in chunk:
                    pipe.unlink(key)
                deleted += sum(int(n) for n in pipe.execute())
            else:
                deleted += int(node.unlink(*chunk))
    return deleted


def cleanup(target: RedisTarget, namespace: str, attempts: int = 5) -> None:
    """Delete the namespace's keys, retrying through a failover (on a cluster the masters are
    looked up again); says so loudly if the keys stay behind."""
    last: Exception | None = None
    for attempt in range(attempts):
        try:
            if target.cluster and attempt:
                cluster = redis.RedisCluster.from_url(target.url, socket_timeout=30)
                target.masters = sorted((n.host, int(n.port)) for n in cluster.get_primaries())  # type: ignore[no-untyped-call]
                cluster.close()
            n = delete_namespace(target, namespace)
            print(f"namespace {namespace}: {n} keys deleted", flush=True)
            return
        except Exception as exc:  # noqa: BLE001 - reported below
            last = exc
            time.sleep(2)
    print(f"WARNING: the keys of namespace {namespace} were not deleted ({type(last).__name__}: {last}); "
          f"delete them by SCAN MATCH '{namespace}:*' + UNLINK on every master", file=sys.stderr, flush=True)


def commandstats(target: RedisTarget) -> dict[str, tuple[int, int]]:
    out: dict[str, tuple[int, int]] = {}
    for host, port in target.masters:
        for name, st in target.node(host, port).info("commandstats").items():
            calls, usec = out.get(name, (0, 0))
            out[name] = (calls + int(st["calls"]), usec + int(st["usec"]))
    return out


def stream_total(target: RedisTarget, namespace: str, shards: int, event_type: str) -> int:
    client: Any = (
        redis.RedisCluster.from_url(target.url, socket_timeout=30) if target.cluster
        else redis.Redis.from_url(target.url, socket_timeout=30)
    )
    try:
        return sum(int(client.xlen(f"{namespace}:{{{s}}}:{event_type}")) for s in range(shards))
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------
# the reader process: position.updated -> first sighting per order


def reader_process(url: str, cluster: bool, namespace: str, shards: int, seen: Any, stop: Any, out: Any) -> None:
    try:
        asyncio.run(_read(url, cluster, namespace, shards, seen, stop, out))
    except BaseException as exc:  # report, never hang the parent
        out.put(("error", f"{type(exc).__name__}: {exc}"))
        raise


async def _read(url: str, cluster: bool, namespace: str, shards: int, seen: Any, stop: Any, out: Any) -> None:
    core = CoreSettings(redis_url=url, redis_cluster=cluster, log_level="WARNING", log_format="console")
    client: Any = connect(core)
    if cluster:
        await client.initialize()
    bus = Bus(client, BusSettings(namespace=namespace, shards=shards))
    first: dict[str, tuple[int, int, int]] = {}  # order id -> (seen ns, occurred_at ns, entry ms)
    fills = [0]
    cpu0 = time.process_time()
    out.put(("ready",))

    async def loop(streams: dict[str, bytes]) -> None:
        while not stop.is_set():
            reply = await client.xread(streams, count=2000, block=100)
            now = time.time_ns()
            for stream, entries in reply or ():
                last = b""
                for entry_id, fields in entries:
                    last = entry_id
                    event = decode(fields[DATA], EventType.POSITION_UPDATED)
                    fills[0] += 1
                    oid = event.payload.order_id
                    if oid is not None and oid not in first:
                        occurred = int(event.occurred_at.timestamp() * 1e6) * 1000
                        first[oid] = (now, occurred, int(entry_id.split(b"-")[0]))
                if last:
                    streams[stream.decode() if isinstance(stream, bytes) else stream] = last
            seen.value = len(first)

    keys = [bus.keys.stream(s, EventType.POSITION_UPDATED) for s in range(shards)]
    if cluster:  # one slot per shard: one blocking read each
        await asyncio.gather(*(loop({k: b"0-0"}) for k in keys))
    else:
        await loop(dict.fromkeys(keys, b"0-0"))
    cpu = time.process_time() - cpu0
    await client.aclose()
    ids = list(first)
    seen_ns = array.array("q", (first[i][0] for i in ids))
    occ_ns = array.array("q", (first[i][1] for i in ids))
    entry_ms = array.array("q", (first[i][2] for i in ids))
    out.put(("done", {"ids": ids, "seen": seen_ns.tobytes(), "occurred": occ_ns.tobytes(),
                      "entry_ms": entry_ms.tobytes(), "fills": fills[0], "cpu_s": cpu}))


# ---------------------------------------------------------------------------------------------
# CPU accounting


class CpuMeter:
    def __init__(self, procs: dict[str, int]) -> None:
        self.procs: dict[str, psutil.Process] = {}
        for label, pid in procs.items():
            with contextlib.suppress(psutil.Error):
                self.procs[label] = psutil.Process(pid)

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for label, proc in self.procs.items():
            try:
                t = proc.cpu_times()
                out[label] = t.user + t.system
            except psutil.Error:
                out[label] = float("nan")
        return out


# ---------------------------------------------------------------------------------------------
# the run


async def shard_split(bus: Bus, shards: int) -> dict[str, dict[str, int]]:
    """Each stage's shards by the member whose lease holds them (at the end of the window)."""
    split: dict[str, dict[str, int]] = {}
    for group in PIPELINE:
        owners: dict[str, int] = {}
        for shard in range(shards):
            owner = await bus.redis.get(bus.keys.lease(shard, group))
            name = owner.decode() if owner else "(none)"
            owners[name] = owners.get(name, 0) + 1
        split[group] = dict(sorted(owners.items()))
    return split


def _round_price(price: Decimal) -> Decimal:
    return price.quantize(Decimal("0.01"), rounding=ROUND_HALF_UP)


def order_mix(portfolios: list[str], marks: dict[str, Decimal]) -> Callable[[int], OrderSpec]:
    """Order i: symbols in turn, buys and sells alternating per portfolio (positions stay
    near flat), two market orders then one marketable limit (1 % through the mark, inside the
    5 % band) out of every three."""
    limit_px = {
        (s, side): _round_price(marks[s] * (Decimal("1.01") if side is Side.BUY else Decimal("0.99")))
        for s in SYMBOLS for side in Side
    }
    n = len(portfolios)

    def make(i: int) -> OrderSpec:
        symbol = SYMBOLS[i % 3]
        side = Side.BUY if (i // n) % 2 == 0 else Side.SELL
        if (i // 3) % 3 == 2:  # i % 3 picks the symbol, i // 3 the type
            return OrderSpec(portfolios[i % n], symbol, side, QUANTITY[symbol], OrderType.LIMIT, limit_px[(symbol, side)])
        return OrderSpec(portfolios[i % n], symbol, side, QUANTITY[symbol])

    return make


def percentiles(values_ns: list[int]) -> dict[str, float | None]:
    if not values_ns:
        return {k: None for k in ("p50_ms", "p90_ms", "p99_ms", "p999_ms", "max_ms", "mean_ms")}
    v = sorted(values_ns)

    def q(p: float) -> float:
        return v[min(len(v) - 1, int(p * len(v)))] / 1e6

    return {"p50_ms": q(0.50), "p90_ms": q(0.90), "p99_ms": q(0.99), "p999_ms": q(0.999),
            "max_ms": v[-1] / 1e6, "mean_ms": sum(v) / len(v) / 1e6}


def _wrapper(folder: Path) -> str:
    """An executable that Fleet can call like a Python: it runs the module under profiled.py."""
    script = folder / "python-profiled"
    script.write_text(f'#!/bin/sh\nexec {shlex.quote(sys.executable)} {shlex.quote(str(ROOT / "loadtest" / "profiled.py"))} "$@"\n')
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def git_state() -> dict[str, Any]:
    """The commit measured, and whether the working tree differed from it (other files in
    flight change what runs)."""
    import subprocess

    def git(*a: str) -> str:
        try:
            return subprocess.run(["git", *a], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout
        except (OSError, subprocess.SubprocessError):
            return ""

    dirty = [line[3:] for line in git("status", "--porcelain", "--untracked-files=no").splitlines() if len(line) > 3]
    return {"commit": git("rev-parse", "--short", "HEAD").strip(), "modified": dirty}


def machine() -> dict[str, Any]:
    model = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_model": model,
        "loadavg_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


async def run(args: argparse.Namespace, target: RedisTarget, namespace: str, work: Path) -> dict[str, Any]:
    env = {
        "ZVT_REDIS_URL": target.url,
        "ZVT_REDIS_CLUSTER": "true" if target.cluster else "false",
        "ZVT_BUS_NAMESPACE": namespace,
        "ZVT_BUS_SHARDS": str(args.shards),
        "ZVT_BUS_TRIM_INTERVAL_S": "0",
        "ZVT_DRAIN_TIMEOUT_S": "5",
        "ZVT_LOG_LEVEL": "INFO",  # Fleet waits for the INFO "service started" line
        "ZVT_ROUTING_FEED_VOLATILITY": "0",
        "ZVT_OTEL_ENDPOINT": "",
    }
    env = {k: v for k, v in env.items() if v != ""}
    if args.profile:
        env["ZVT_BENCH_PROFILE_DIR"] = str(Path(args.profile).resolve())
    if args.loop == "asyncio":
        env["ZVT_BENCH_LOOP"] = "asyncio"
    wrapped = bool(args.profile) or args.loop == "asyncio"
    fleet = Fleet(env, log_dir=work / "logs", python=_wrapper(work) if wrapped else sys.executable, start_timeout=60)
    ctx = mp.get_context("spawn")
    seen = ctx.Value("q", 0, lock=False)
    stop_reader = ctx.Event()
    out = ctx.Queue()
    reader = ctx.Process(
        target=reader_process, args=(target.url, target.cluster, namespace, args.shards, seen, stop_reader, out), daemon=True
    )
    core = CoreSettings(redis_url=target.url, redis_cluster=target.cluster, log_level="WARNING", log_format="console")
    client: Any = connect(core)
    result: dict[str, Any] = {}
    try:
        if target.cluster:
            await client.initialize()
        bus = Bus(client, BusSettings(namespace=namespace, shards=args.shards))
        reader.start()
        msg = await asyncio.to_thread(out.get, True, 60)
        if msg[0] != "ready":
            raise RuntimeError(f"reader: {msg}")
        t_start = time.monotonic()
        fleet.start(PIPELINE, replicas=args.replicas)
        print(f"fleet started in {time.monotonic() - t_start:.1f} s (logs: {work / 'logs'})", flush=True)
        portfolios = [f"bp-{i:04d}" for i in range(args.portfolios)]
        for portfolio_id in portfolios:
            await seed_portfolio(bus, portfolio_id, BALANCES, limits=LIMITS)
        marks: dict[str, Decimal] = {}
        deadline = time.monotonic() + 30
        while set(marks) < set(SYMBOLS):
            raw = await client.hgetall(bus.keys.global_key("marks"))
            marks = {k.decode(): Decimal(v.decode()) for k, v in raw.items()}
            if time.monotonic() > deadline:
                print("no marks from the routing service; using the paper venue's starting prices", flush=True)
                marks = dict(DEFAULT_PRICES)
                break
            if set(marks) < set(SYMBOLS):
                await asyncio.sleep(0.1)
        make = order_mix(portfolios, marks)

        fleet_pids = {p.label: p.popen.pid for procs in fleet.procs.values() for p in procs}
        redis_pids = dict(target.pids)
        meter = CpuMeter({**fleet_pids, **redis_pids, "injector (not counted)": os.getpid(),
                          "reader (not counted)": reader.pid or 0})

        injected: dict[str, int] = {}
        sent = 0
        total = args.warmup + args.seconds
        tick = args.tick_ms / 1000
        rate = args.rate
        window: dict[str, Any] = {}
        t0 = time.perf_counter()
        while True:
            now = time.perf_counter() - t0
            if now >= total:
                break
            if "start" not in window and now >= args.warmup:
                window["start"] = (time.perf_counter(), time.time_ns(), meter.sample(), seen.value, sent, commandstats(target))
                if args.profile:
                    for pid in fleet_pids.values():
                        os.kill(pid, signal.SIGUSR1)
            if rate > 0:
                due = min(int(now * rate) - sent, MAX_BATCH)
                if due <= 0:
                    await asyncio.sleep(max(0.0, (int(now / tick) + 1) * tick - now))
                    continue
            else:
                due = min(MAX_BATCH, args.inflight - (sent - seen.value))
                if due <= 0:
                    await asyncio.sleep(0.0005)
                    continue
            specs = [make(sent + k) for k in range(due)]
            stamp = time.time_ns()
            for oid in await inject_orders(bus, specs):
                injected[oid] = stamp
            sent += due
        window["end"] = (time.perf_counter(), time.time_ns(), meter.sample(), seen.value, sent, commandstats(target))
        if args.profile:
            for pid in fleet_pids.values():
                os.kill(pid, signal.SIGUSR2)

        drain_deadline = time.monotonic() + args.drain
        while seen.value < sent and time.monotonic() < drain_deadline:
            await asyncio.sleep(0.05)
        stop_reader.set()
        msg = await asyncio.to_thread(out.get, True, 60)
        if msg[0] != "done":
            raise RuntimeError(f"reader: {msg}")
        data = msg[1]
        reader.join(10)

        rejected = stream_total(target, namespace, args.shards, EventType.ORDER_REJECTED.value)
        failed = stream_total(target, namespace, args.shards, EventType.ORDER_FAILED.value)
        dl_client: Any = (
            redis.RedisCluster.from_url(target.url) if target.cluster else redis.Redis.from_url(target.url)
        )
        try:
            dead = sum(int(dl_client.xlen(bus.keys.deadletter(s))) for s in range(args.shards))
        finally:
            dl_client.close()

        wall0, ns0, cpu0, seen0, sent0, cs0 = window["start"]
        wall1, ns1, cpu1, seen1, sent1, cs1 = window["end"]
        elapsed = wall1 - wall0
        completed = seen1 - seen0
        seen_ns = array.array("q")
        seen_ns.frombytes(data["seen"])
        occ_ns = array.array("q")
        occ_ns.frombytes(data["occurred"])
        entry_ms = array.array("q")
        entry_ms.frombytes(data["entry_ms"])
        lat, lat_occ, lat_entry = [], [], []
        for i, oid in enumerate(data["ids"]):
            t_in = injected.get(oid)
            if t_in is None or not (ns0 <= t_in < ns1):
                continue
            lat.append(seen_ns[i] - t_in)
            lat_occ.append(occ_ns[i] - t_in)
            lat_entry.append(entry_ms[i] * 1_000_000 - t_in)
        in_window = sum(1 for t in injected.values() if ns0 <= t < ns1)
        missing = sent - len(data["ids"])

        cpu: dict[str, dict[str, float | None]] = {}
        fleet_cpu = 0.0
        for label in cpu0:
            d = cpu1[label] - cpu0[label]
            counted = label in fleet_pids or label in redis_pids
            if counted:
                fleet_cpu += d
            cpu[label] = {
                "cpu_s": round(d, 4),
                "us_per_order": round(d / completed * 1e6, 2) if completed else None,
                "core_share": round(d / elapsed, 3),
                "counted": counted,
                "replica": label in target.replica_labels,
            }
        redis_cmds = {
            k.removeprefix("cmdstat_"): {
                "calls": cs1[k][0] - cs0.get(k, (0, 0))[0],
                "usec_per_order": round((cs1[k][1] - cs0.get(k, (0, 0))[1]) / completed, 2) if completed else None,
            }
            for k in cs1 if cs1[k][0] - cs0.get(k, (0, 0))[0] > 0
        }
        pct = percentiles(lat)
        split = await shard_split(bus, args.shards)
        result = {
            "benchmark": "bench_pipeline",
            "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "command": " ".join(shlex.quote(a) for a in sys.argv),
            "machine": machine(),
            "git": git_state(),
            "redis": target.description,
            "redis_version": str(target.node(*target.masters[0]).info("server")["redis_version"]),
            "params": {"seconds": args.seconds, "warmup": args.warmup, "rate": args.rate, "tick_ms": args.tick_ms,
                       "inflight": args.inflight if args.rate == 0 else None, "shards": args.shards,
                       "portfolios": args.portfolios, "cluster": target.cluster, "profiled": bool(args.profile),
                       "loop": args.loop, "replicas": args.replicas},
            "window_s": round(elapsed, 3),
            "injected_in_window": sent1 - sent0,
            "injected_per_s": round((sent1 - sent0) / elapsed, 1),
            "orders": completed,
            "orders_per_s": round(completed / elapsed, 1),
            **{k: (round(v, 3) if v is not None else None) for k, v in pct.items()},
            "latency_samples": len(lat),
            "latency_samples_expected": in_window,
            "latency_definition": "time.time_ns() before the inject_orders call -> the order's first position.updated "
                                  "returned by the reader's XREAD",
            "stage_clock_latency": {k: (round(v, 3) if v is not None else None) for k, v in percentiles(lat_occ).items()},
            "commit_clock_latency": {k: (round(v, 3) if v is not None else None) for k, v in percentiles(lat_entry).items()},
            "fleet_cpu_us_per_order": round(fleet_cpu / completed * 1e6, 1) if completed else None,
            "fleet_cpu_core_share": round(fleet_cpu / elapsed, 3),
            "cpu_by_process": cpu,
            "shards_by_member": split,
            "redis_commandstats": dict(sorted(redis_cmds.items(), key=lambda kv: -(kv[1]["usec_per_order"] or 0))),
            "reader_cpu_s_total": round(data["cpu_s"], 3),
            "fills_seen": data["fills"],
            "orders_injected": sent,
            "orders_with_position": len(data["ids"]),
            "orders_missing_position": missing,
            "rejected": rejected,
            "failed": failed,
            "dead_letters": dead,
        }
        if args.profile:
            result["profile"] = profile_top(Path(args.profile), completed)
        return result
    finally:
        stop_reader.set()
        fleet.stop()
        if reader.is_alive():
            reader.join(5)
            if reader.is_alive():
                reader.kill()
        await client.aclose()


IDLE = "idle (waiting in epoll)"


def _area(file: str, fn: str) -> str:
    """Where a function's own time goes: a repository file, a third-party package, a stdlib
    module, or (for C functions) what the builtin belongs to."""
    if file == "~":
        if "select.epoll" in fn or "select.select" in fn:
            return IDLE
        owner = re.search(r"of '([^']+)' objects", fn)
        return f"C: {owner.group(1)}" if owner else f"C: {fn.strip('<>').removeprefix('built-in method ')}"
    if "site-packages/" in file:
        return file.split("site-packages/")[-1].split("/")[0].removesuffix(".py")
    if file.startswith(str(ROOT)):
        return file.removeprefix(str(ROOT) + "/")
    return "stdlib " + Path(file).stem


def profile_top(folder: Path, orders: int, limit: int = 12) -> dict[str, Any]:
    """Each service's functions by own time (tottime), and own time summed by area (file,
    package, builtin type), in µs per completed order."""
    out: dict[str, Any] = {}
    for path in sorted(folder.glob("*.pstats")):
        st = pstats.Stats(str(path))
        rows = []
        raw: Any = st.stats  # type: ignore[attr-defined]
        areas: dict[str, float] = {}
        for (file, _line, fn), v in raw.items():
            key = _area(file, fn)
            areas[key] = areas.get(key, 0.0) + v[2]
        total = sum(t for a, t in areas.items() if a != IDLE)  # shares of the busy time
        out[path.stem.rsplit("-", 1)[0] + " (by area)"] = [
            {"function": area, "calls": 0, "tottime_us_per_order": round(t / max(orders, 1) * 1e6, 2),
             "cumtime_us_per_order": None, "share": round(t / total, 3) if total and area != IDLE else None}
            for area, t in sorted(areas.items(), key=lambda kv: -kv[1])[:limit]
        ]
        busiest = [kv for kv in sorted(raw.items(), key=lambda kv: -kv[1][2]) if _area(kv[0][0], kv[0][2]) != IDLE]
        for (file, line, fn), (_cc, nc, tt, ct, _callers) in busiest[:limit]:
            short = file.split("site-packages/")[-1].replace(str(ROOT) + "/", "")
            rows.append({"function": f"{short}:{line}({fn})", "calls": nc,
                         "tottime_us_per_order": round(tt / max(orders, 1) * 1e6, 2),
                         "cumtime_us_per_order": round(ct / max(orders, 1) * 1e6, 2),
                         "share": round(tt / total, 3) if total else None})
        out[path.stem.rsplit("-", 1)[0]] = rows
    return out


def fmt(v: float | None, spec: str = ",.1f") -> str:
    return "n/a" if v is None else format(v, spec)


def report(r: dict[str, Any]) -> None:
    p = r["params"]
    print("=" * 86)
    mode = f"paced at {p['rate']:,}/s in {p['tick_ms']} ms ticks" if p["rate"] else f"max rate (closed loop, <= {p['inflight']} in flight)"
    print(f"bench_pipeline: risk -> order -> routing -> portfolio on {r['redis']}, redis {r['redis_version']}")
    print(f"  {p['shards']} shards, {p['portfolios']} portfolios, {mode}; window {r['window_s']:.1f} s after {p['warmup']} s warm-up"
          + (", services on the stdlib asyncio loop" if p.get("loop") == "asyncio" else "")
          + ("  ** PROFILED: times inflated **" if p["profiled"] else ""))
    m, g = r["machine"], r["git"]
    print(f"  machine: {m['nproc']} CPUs ({m['cpu_model']}), load at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}; "
          f"commit {g['commit']}" + (f" + modified {', '.join(g['modified'])}" if g["modified"] else ""))
    print("-" * 86)
    print(f"throughput   {r['orders_per_s']:>10,.0f} orders/s completed ({r['orders']:,} in the window; injected {r['injected_per_s']:,.0f}/s)")
    print(f"latency      p50 {fmt(r['p50_ms'], '.2f')} ms, p90 {fmt(r['p90_ms'], '.2f')} ms, p99 {fmt(r['p99_ms'], '.2f')} ms, "
          f"p99.9 {fmt(r['p999_ms'], '.2f')} ms, max {fmt(r['max_ms'], '.2f')} ms")
    print(f"             inject -> first position.updated seen by XREAD; {r['latency_samples']:,} of {r['latency_samples_expected']:,} orders injected in the window")
    so, co = r["stage_clock_latency"], r["commit_clock_latency"]
    print(f"             lower bounds: portfolio stage's occurred_at p50 {fmt(so['p50_ms'], '.2f')} / p99 {fmt(so['p99_ms'], '.2f')} ms; "
          f"commit (entry id, 1 ms res.) p50 {fmt(co['p50_ms'], '.2f')} / p99 {fmt(co['p99_ms'], '.2f')} ms")
    print(f"{'process':<28}{'CPU s':>9}{'us/order':>11}{'% core':>9}")
    for label, c in sorted(r["cpu_by_process"].items(), key=lambda kv: (not kv[1]["counted"], kv[0])):
        print(f"  {label:<26}{c['cpu_s']:>9.2f}{fmt(c['us_per_order']):>11}{100 * c['core_share']:>8.0f}%")
    print(f"  {'fleet + redis (counted)':<26}{'':>9}{fmt(r['fleet_cpu_us_per_order']):>11}{100 * r['fleet_cpu_core_share']:>8.0f}%")
    split = r.get("shards_by_member") or {}
    if p.get("replicas", 1) > 1 and split:
        print("  shards by member: " + "; ".join(
            f"{group} " + "/".join(str(n) for n in owners.values()) for group, owners in split.items()))
    top = list(r["redis_commandstats"].items())[:6]
    if top:
        print("  redis time by command (us/order; scripts' inner calls also listed): "
              + ", ".join(f"{k} {v['usec_per_order']}" for k, v in top))
    print("-" * 86)
    cpu_ok = r["fleet_cpu_us_per_order"] is not None and r["fleet_cpu_us_per_order"] <= TARGET_CPU_US
    print(f"target       fleet CPU <= {TARGET_CPU_US:.0f} us/order: {fmt(r['fleet_cpu_us_per_order'])} -> "
          + ("met" if cpu_ok else "MISSED"))
    if p["rate"] == TARGET_RATE:
        p99_ok = r["p99_ms"] is not None and r["p99_ms"] <= TARGET_P99_MS
        print(f"target       p99 <= {TARGET_P99_MS:.0f} ms at {TARGET_RATE:,}/s: {fmt(r['p99_ms'], '.2f')} ms -> " + ("met" if p99_ok else "MISSED"))
    if p["rate"] and r["injected_per_s"] < 0.97 * p["rate"]:
        print(f"WARNING      the injector fell behind: {r['injected_per_s']:,.0f}/s of {p['rate']:,}/s")
    ok = r["orders_missing_position"] == 0 and r["rejected"] == 0 and r["failed"] == 0 and r["dead_letters"] == 0
    print(f"check        {'ok' if ok else 'PROBLEM'}: {r['orders_injected']:,} injected, {r['orders_with_position']:,} reached a position "
          f"({r['fills_seen']:,} fills), {r['rejected']} rejected, {r['failed']} failed, {r['dead_letters']} dead letters")
    for service, rows in (r.get("profile") or {}).items():
        print(f"profile      {service}: top functions by own time (us/order, share of its profiled time)")
        for row in rows[:8]:
            print(f"    {row['tottime_us_per_order']:>8.1f} {100 * (row['share'] or 0):>5.1f}%  {row['function']}")
    print("=" * 86)
    print(f"bench_pipeline: {r['orders_per_s']:,.0f} orders/s, p50 {fmt(r['p50_ms'], '.2f')} ms, p99 {fmt(r['p99_ms'], '.2f')} ms, "
          f"fleet CPU {fmt(r['fleet_cpu_us_per_order'])} us/order")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the measured window")
    ap.add_argument("--rate", type=int, default=1000, help="orders/s injected; 0 = as fast as the pipeline takes them")
    ap.add_argument("--cluster", action="store_true", help="devstack's Redis Cluster (or --redis-url as a cluster node)")
    ap.add_argument("--redis-url", default=None, help="an existing Redis instead of a throwaway redis-server")
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--replicas", type=int, default=1, help="processes of every stage (they split the shards)")
    ap.add_argument("--portfolios", type=int, default=64)
    ap.add_argument("--warmup", type=float, default=3.0, help="seconds of injection before the window")
    ap.add_argument("--tick-ms", type=float, default=5.0, help="pacing interval at a fixed rate")
    ap.add_argument("--inflight", type=int, default=2000, help="at --rate 0: most orders injected and not yet in a position")
    ap.add_argument("--drain", type=float, default=20.0, help="seconds to wait for the last orders after the window")
    ap.add_argument("--json", default=None, help="write the results here (folders are created)")
    ap.add_argument("--profile", default=None, metavar="DIR", help="cProfile each service over the window into DIR")
    ap.add_argument("--loop", choices=("default", "asyncio"), default="default",
                    help="asyncio: run the services on the stdlib event loop instead of the runtime's uvloop (A/B)")
    ap.add_argument("--keep-logs", action="store_true", help="keep the services' logs (printed path)")
    args = ap.parse_args(argv)
    if args.seconds <= 0 or args.rate < 0 or args.portfolios < 1 or args.shards < 1:
        ap.error("--seconds, --portfolios and --shards must be positive, --rate not negative")
    if args.profile:
        shutil.rmtree(args.profile, ignore_errors=True)
        Path(args.profile).mkdir(parents=True)
    namespace = f"zvtpipe-{os.getpid()}-{int(time.time())}"
    work = Path(tempfile.mkdtemp(prefix="zvt-bench-pipeline-"))
    target = open_target(args)
    failed = True
    try:
        result = asyncio.run(run(args, target, namespace, work))
        failed = False
    finally:
        cleanup(target, namespace)
        if target.stop is not None:
            target.stop()
        if failed or args.keep_logs:
            print(f"service logs kept in {work / 'logs'}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report(result)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
