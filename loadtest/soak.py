"""Soak benchmark: Redis memory stays bounded under sustained load (issue 12.4).

    python loadtest/soak.py --minutes 10 --rate 100 --retention-s 60 --json .zvt/bench/soak.json
                            [--shards 4] [--portfolios 16] [--sample-s 5] [--open-probe 2000]
                            [--redis-url URL]

Starts the fleet with ``loadtest.localfleet`` (risk, order, routing, portfolio, recorder,
gateway) on a throwaway redis-server of its own (AOF everysec, as devstack runs it) unless
``--redis-url`` names one, so that ``INFO memory`` and ``DBSIZE`` count this run alone. Every
per-order lifetime is set to the retention: finished order records
(``ZVT_ORDER_TERMINAL_RETENTION_S``), applied fill ids (``ZVT_ORDER_FILL_MEMORY_S``) and the
consumer groups' dedupe marks (``ZVT_BUS_DEDUPE_TTL_S``); the streams keep
``--stream-retention-s`` (``ZVT_BUS_RETENTION_S``, default the smaller of 10 s and the
retention) and are trimmed every 2 s behind the recorder, which runs, so trimming proceeds.

The soak: orders are injected at ``--rate`` per second with
``services.core.inject.inject_orders`` and the mix of ``bench_pipeline.py`` (market orders and
marketable limits, each fills at once), for ``--minutes``. Every ``--sample-s`` seconds:
``used_memory``, ``DBSIZE`` and the orders placed so far. The JSON holds every sample and the
least-squares slope of ``used_memory`` against orders placed, before the retention age is
first reached (from the first order to ``retention_s`` later) and after it (from
``retention_s + --settle-s`` on, once expiry and trimming have caught up): bytes a placed
order adds while nothing has expired yet, and what it adds in steady state. The target: the
second at most 5 % of the first.

Then, once the load has stopped and one retention (plus ``--settle-s``) has passed, so that
what it left has expired (``used_memory_before`` of the probe: the quiet baseline), the
open-order probe: ``--open-probe`` GTC limit buys 3 % under the mark (inside the price band,
so risk takes them, and not marketable, so they rest with routing and stay open) are injected
and waited for; ``used_memory`` after minus before, divided by their number, is the memory of
an open order, measured right away (``bytes_per_open_order_with_events``: with its events'
stream entries and dedupe marks) and once those are trimmed and expired, one retention later
(``bytes_per_open_order``: its record, its open-index entry, its reservation, its resting
entry); the ``MEMORY USAGE`` of the record and those structures is reported beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import psycopg

from devstack import stack
from loadtest.bench_pipeline import (
    BALANCES,
    LIMITS,
    SYMBOLS,
    QUANTITY,
    RedisTarget,
    git_state,
    machine,
    open_target,
    order_mix,
)
from loadtest.localfleet import http_fleet
from services.core.bus import Bus
from services.core.hotstate import StateKeys
from services.core.inject import OrderSpec, inject_orders, seed_portfolio
from services.core.redisconn import connect
from services.core.settings import BusSettings, CoreSettings
from services.trading import OrderType, Side
from services.venues.paper import DEFAULT_PRICES

TARGET_RATIO = 0.05


def slope(points: list[tuple[float, float]]) -> float | None:
    """Least-squares slope of y over x; None with fewer than 3 points or no spread in x."""
    if len(points) < 3:
        return None
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx == 0:
        return None
    return sum((x - mx) * (y - my) for x, y in points) / sxx


async def used_memory(client: Any) -> int:
    return int((await client.info("memory"))["used_memory"])


async def marks_of(client: Any, bus: Bus) -> dict[str, Decimal]:
    deadline = time.monotonic() + 30
    while True:
        raw = await client.hgetall(bus.keys.global_key("marks"))
        marks = {k.decode(): Decimal(v.decode()) for k, v in raw.items()}
        if set(marks) >= set(SYMBOLS):
            return marks
        if time.monotonic() > deadline:
            print("no marks from the routing service; using the paper venue's starting prices", flush=True)
            return dict(DEFAULT_PRICES)
        await asyncio.sleep(0.1)


async def open_count(client: Any, sk: StateKeys, shards: int) -> int:
    return sum([int(await client.zcard(sk.open_orders(s))) for s in range(shards)])


async def structure_bytes(client: Any, keys: list[str]) -> int:
    total = 0
    for key in keys:
        total += int(await client.memory_usage(key, samples=0) or 0)
    return total


async def open_probe(client: Any, bus: Bus, portfolios: list[str], marks: dict[str, Decimal], n: int,
                     settle_s: float) -> dict[str, Any]:
    sk = StateKeys(bus.keys)
    shards = bus.keys.shards
    before = await used_memory(client)
    keys_before = int(await client.dbsize())
    symbol = SYMBOLS[0]
    price = (marks[symbol] * Decimal("0.97")).quantize(Decimal("0.01"))
    specs = [OrderSpec(portfolios[i % len(portfolios)], symbol, Side.BUY, QUANTITY[symbol], OrderType.LIMIT, price)
             for i in range(n)]
    ids: list[str] = []
    for i in range(0, n, 200):
        ids += await inject_orders(bus, specs[i : i + 200])
    deadline = time.monotonic() + 60
    resting = 0
    while time.monotonic() < deadline:
        resting = sum([int(await client.hlen(sk.resting(p))) for p in portfolios])
        if resting >= n:
            break
        await asyncio.sleep(0.2)
    opened = await open_count(client, sk, shards)
    await asyncio.sleep(1)
    with_events = await used_memory(client)
    await asyncio.sleep(settle_s)  # their events' stream entries trimmed, dedupe marks expired
    after = await used_memory(client)
    sample = ids[: min(200, len(ids))]
    record_bytes = await structure_bytes(client, [sk.order(s.portfolio_id, oid) for s, oid in zip(specs, sample)])
    index_bytes = await structure_bytes(client, [sk.open_orders(s) for s in range(shards)])
    reservation_bytes = await structure_bytes(client, [sk.reservations(p) for p in portfolios])
    resting_bytes = await structure_bytes(client, [sk.resting(p) for p in portfolios])
    per_record = record_bytes / max(1, len(sample))
    structures = per_record + (index_bytes + reservation_bytes + resting_bytes) / max(1, opened)
    return {
        "open_orders": opened,
        "resting": resting,
        "keys_before": keys_before,
        "used_memory_before": before,
        "used_memory_with_events": with_events,
        "used_memory_after": after,
        "bytes_per_open_order_with_events": (with_events - before) / max(1, opened),
        "bytes_per_open_order": (after - before) / max(1, opened),
        "bytes_per_open_order_structures": structures,
        "open_order_record_bytes": per_record,
    }


async def soak(args: argparse.Namespace, redis_url: str) -> dict[str, Any]:
    retention = args.retention_s
    stream_retention = args.stream_retention_s if args.stream_retention_s is not None else min(10, retention)
    env = {
        "ZVT_ORDER_TERMINAL_RETENTION_S": str(retention),
        "ZVT_ORDER_FILL_MEMORY_S": str(retention),
        "ZVT_BUS_DEDUPE_TTL_S": str(retention),
        "ZVT_BUS_RETENTION_S": str(stream_retention),
        "ZVT_BUS_TRIM_INTERVAL_S": "2",
        "ZVT_GATEWAY_IDEMPOTENCY_TTL_S": str(max(60, retention)),
        "ZVT_OTEL_ENDPOINT": "",
    }
    env = {k: v for k, v in env.items() if v}
    postgres_dsn = stack.ensure_postgres()
    t_start = time.monotonic()
    with http_fleet(redis_url=redis_url, postgres_dsn=postgres_dsn, shards=args.shards, env=env) as fleet:
        print(f"fleet started in {time.monotonic() - t_start:.1f} s (namespace {fleet.namespace}, logs: {fleet.log_dir})",
              flush=True)
        core = CoreSettings(redis_url=redis_url, log_level="WARNING", log_format="console")
        client: Any = connect(core)
        try:
            bus = Bus(client, BusSettings(namespace=fleet.namespace, shards=args.shards))
            portfolios = [f"soak-{i:03d}" for i in range(args.portfolios)]
            for pid in portfolios:
                await seed_portfolio(bus, pid, BALANCES, limits=LIMITS)
            marks = await marks_of(client, bus)
            result = await _run(args, client, bus, portfolios, marks)
            print(f"soak done: {result['orders']:,} orders", flush=True)
            probe: dict[str, Any] = {"open_orders": 0}
            if args.open_probe > 0:
                # once everything the load left has expired or been trimmed: the quiet baseline
                await asyncio.sleep(args.retention_s + args.settle_s)
                probe = await open_probe(client, bus, portfolios, marks, args.open_probe,
                                         args.retention_s + args.settle_s)
                print(f"open-order probe: {probe}", flush=True)
            result["open_probe"] = probe
            result["stream_retention_s"] = stream_retention
            result["env"] = env
        finally:
            await client.aclose()
        _delete_events(postgres_dsn, fleet.namespace)
    return result


async def _run(args: argparse.Namespace, client: Any, bus: Bus, portfolios: list[str], marks: dict[str, Decimal]
               ) -> dict[str, Any]:
    make = order_mix(portfolios, marks)
    duration = args.minutes * 60
    tick = args.tick_ms / 1000
    samples: list[dict[str, Any]] = []
    sent = 0
    t0 = time.monotonic()
    next_sample = t0

    async def sample(now: float) -> None:
        samples.append({"t_s": round(now - t0, 3), "orders": sent, "used_memory": await used_memory(client),
                        "keys": int(await client.dbsize())})

    while True:
        now = time.monotonic()
        if now - t0 >= duration:
            break
        if now >= next_sample:
            await sample(now)
            next_sample += args.sample_s
        due = int((now - t0) * args.rate) - sent
        if due > 0:
            await inject_orders(bus, [make(sent + i) for i in range(due)])
            sent += due
        await asyncio.sleep(tick)
    await sample(time.monotonic())
    sk = StateKeys(bus.keys)
    still_open = await open_count(client, sk, bus.keys.shards)

    retention = args.retention_s
    before = [(s["orders"], s["used_memory"]) for s in samples if s["t_s"] <= retention]
    after = [(s["orders"], s["used_memory"]) for s in samples if s["t_s"] >= retention + args.settle_s]
    slope_before = slope(before)
    slope_after = slope(after)
    ratio = slope_after / slope_before if slope_before and slope_after is not None else None
    steady = [s["used_memory"] for s in samples if s["t_s"] >= retention + args.settle_s]
    return {
        "orders": sent,
        "rate": args.rate,
        "achieved_rate": sent / duration if duration else 0,
        "minutes": args.minutes,
        "retention_s": retention,
        "settle_s": args.settle_s,
        "memory_slope_bytes_per_order_before_retention": slope_before,
        "memory_slope_bytes_per_order_after_retention": slope_after,
        "slope_ratio_after_before": ratio,
        "target_ratio": TARGET_RATIO,
        "met": ratio is not None and ratio <= TARGET_RATIO,
        "bytes_per_retained_order": slope_before,
        "steady_used_memory_mean": sum(steady) / len(steady) if steady else None,
        "steady_used_memory_max": max(steady) if steady else None,
        "open_orders_at_end": still_open,
        "samples": samples,
    }


def _delete_events(dsn: str, namespace: str) -> None:
    """The run's rows in the (shared) event store."""
    try:
        with psycopg.connect(dsn, connect_timeout=10) as conn:
            deleted = conn.execute("DELETE FROM zvt_events WHERE namespace = %s", (namespace,)).rowcount
        print(f"event store: {deleted} events of namespace {namespace} deleted", flush=True)
    except psycopg.Error as exc:
        print(f"WARNING: the events of namespace {namespace} were not deleted ({exc})", file=sys.stderr)


def report(r: dict[str, Any]) -> None:
    def kb(v: float | None) -> str:
        return "n/a" if v is None else f"{v:,.0f} B"

    probe = r.get("open_probe", {})
    print("=" * 86)
    print(f"orders {r['orders']:,} at {r['rate']}/s for {r['minutes']} min, retention {r['retention_s']} s")
    print(f"slope before retention: {kb(r['memory_slope_bytes_per_order_before_retention'])}/order; "
          f"after: {kb(r['memory_slope_bytes_per_order_after_retention'])}/order; "
          f"ratio {r['slope_ratio_after_before'] if r['slope_ratio_after_before'] is None else round(r['slope_ratio_after_before'], 4)} "
          f"(target <= {TARGET_RATIO})")
    if probe.get("open_orders"):
        print(f"open order: {kb(probe['bytes_per_open_order'])} (used_memory delta; "
              f"{kb(probe['bytes_per_open_order_with_events'])} before its events left), "
              f"{kb(probe['bytes_per_open_order_structures'])} (record + indexes, MEMORY USAGE)")
    print(f"soak: {'met' if r['met'] else 'MISSED'}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--minutes", type=float, required=True, help="length of the soak")
    ap.add_argument("--rate", type=int, default=100, help="orders/s injected")
    ap.add_argument("--retention-s", type=int, required=True, help="ZVT_ORDER_TERMINAL_RETENTION_S and the other per-order lifetimes")
    ap.add_argument("--stream-retention-s", type=int, default=None, help="ZVT_BUS_RETENTION_S (default min(10, retention))")
    ap.add_argument("--settle-s", type=float, default=10.0, help="seconds past the retention before the 'after' window")
    ap.add_argument("--sample-s", type=float, default=5.0, help="seconds between samples")
    ap.add_argument("--tick-ms", type=float, default=20.0, help="pacing interval")
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--portfolios", type=int, default=16)
    ap.add_argument("--open-probe", type=int, default=2000, help="open orders for the per-open-order figure (0: none)")
    ap.add_argument("--redis-url", default=None, help="an existing Redis instead of a throwaway redis-server "
                    "(its other clients' memory is then counted too)")
    ap.add_argument("--json", default=None, help="write the results here (folders are created)")
    args = ap.parse_args(argv)
    if args.minutes <= 0 or args.rate <= 0 or args.retention_s < 1 or args.sample_s <= 0:
        ap.error("--minutes, --rate, --sample-s must be positive, --retention-s at least 1")
    target: RedisTarget = open_target(argparse.Namespace(cluster=False, redis_url=args.redis_url))
    try:
        result = asyncio.run(soak(args, target.url))
    finally:
        if target.stop is not None:
            target.stop()
    result.update({
        "command": " ".join(["python", "loadtest/soak.py", *(argv if argv is not None else sys.argv[1:])]),
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "redis": target.description,
        "git": git_state(),
        "machine": machine(),
    })
    report(result)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
