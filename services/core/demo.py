"""A short live demo of the bus: ``python -m services.core.demo [--seconds 5] [--cluster|--single]``.

Publishes ``order.requested`` events for about 20 portfolios, picked so that every shard gets
some, while a ``Consumer`` (group ``demo``) in the same process validates each one and emits an
``order.validated`` through the Lua commit. Then it shows how many were published and handled,
the rate, which shards were used and which Redis Cluster master serves each (CLUSTER KEYSLOT,
CLUSTER NODES), and the dead letters (there should be none). Uses namespace ``demo`` and
deletes its keys at the end. Needs the local stack: ``python -m devstack start``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import sys
import time
from decimal import Decimal
from typing import Any

from redis.asyncio import RedisCluster
from redis.exceptions import RedisClusterException, RedisError

from services.core.bus import Bus, Commit, Consumer
from services.core.events import Event, EventType, OrderRequested, OrderValidated
from services.core.keys import shard_of
from services.core.redact import redact
from services.core.redisconn import AnyRedis, connect
from services.core.settings import BusSettings, CoreSettings, load
from services.core.telemetry import setup_logging
from services.trading import OrderType, Side

CLUSTER_URL = "redis://127.0.0.1:7101/0"  # devstack's Redis Cluster
SINGLE_URL = "redis://127.0.0.1:6390/0"  # devstack's single Redis
NAMESPACE = "demo"
GROUP = "demo"


def pick_portfolios(count: int, shards: int) -> list[str]:
    """``count`` portfolio ids covering every shard (as far as ``count`` allows)."""
    chosen: dict[int, str] = {}
    extra: list[str] = []
    i = 0
    while len(chosen) < min(count, shards) or len(chosen) + len(extra) < count:
        pid = f"pf-{i:04d}"
        shard = shard_of(pid, shards)
        if shard not in chosen:
            chosen[shard] = pid
        elif len(extra) < count - min(count, shards):
            extra.append(pid)
        i += 1
    return [*chosen.values(), *extra][:count]


def order(portfolio: str, n: int) -> Event[Any]:
    return Event.new(
        OrderRequested(
            order_id=f"demo-{portfolio}-{n}",
            client_order_id=f"c-{portfolio}-{n}",
            symbol=("BTC-USDT", "ETH-USDT", "SOL-USDT")[n % 3],
            side=Side.BUY if n % 2 else Side.SELL,
            order_type=OrderType.LIMIT,
            quantity=Decimal("0.01") * (1 + n % 5),
            price=Decimal("100.5"),
            requested_by="demo",
        ),
        portfolio_id=portfolio,
    )


async def delete_namespace(client: AnyRedis) -> int:
    """SCAN (every master, on a cluster) + UNLINK every ``demo:`` key (split by slot on a cluster)."""
    keys = [key async for key in client.scan_iter(match=f"{NAMESPACE}:*", count=1000)]
    deleted = 0
    for i in range(0, len(keys), 500):
        deleted += int(await client.unlink(*keys[i : i + 500]))
    return deleted


async def masters_by_slot(client: RedisCluster) -> list[tuple[int, int, str]]:
    """``(first slot, last slot, master address)`` from CLUSTER NODES."""
    ranges = []
    nodes: dict[str, Any] = await client.cluster_nodes()
    for address, node in nodes.items():
        if "master" not in node["flags"] or "fail" in node["flags"]:
            continue
        for slot_range in node["slots"]:
            first, last = (int(slot_range[0]), int(slot_range[-1]))
            ranges.append((first, last, address.split("@", 1)[0]))
    return sorted(ranges)


async def run(args: argparse.Namespace) -> int:
    core = load(CoreSettings, service="demo", redis_url=args.redis_url, redis_cluster=args.cluster,
                log_level="WARNING", log_format="console")
    setup_logging(core)
    settings = load(BusSettings, namespace=NAMESPACE)
    client = connect(core)
    try:
        if args.cluster:
            await client.initialize()  # load the slot map before concurrent commands
        await client.ping()
    except (RedisError, RedisClusterException, OSError) as exc:
        print(f"demo: cannot reach Redis at {redact(core.redis_url)} ({redact(str(exc))}); start it with `python -m devstack start`",
              file=sys.stderr)
        await client.aclose()
        return 1
    try:
        await delete_namespace(client)  # leftovers of an interrupted run
        return await demo(args, client, settings)
    finally:
        deleted = await delete_namespace(client)
        print(f"cleanup: deleted {deleted} keys of namespace '{NAMESPACE}'")
        await client.aclose()


async def demo(args: argparse.Namespace, client: AnyRedis, settings: BusSettings) -> int:
    bus = Bus(client, settings)
    handled_by_shard: collections.Counter[int] = collections.Counter()

    async def validate(event: Event[Any], commit: Commit) -> None:
        p = event.payload
        commit.emit(event.derive(OrderValidated(
            order_id=p.order_id, client_order_id=p.client_order_id, symbol=p.symbol, side=p.side,
            order_type=p.order_type, quantity=p.quantity, price=p.price, reference_price=p.price,
        ), "demo.validate"))
        handled_by_shard[commit.shard] += 1

    consumer = Consumer(bus, GROUP, {EventType.ORDER_REQUESTED: validate}, name="demo-1")
    await consumer.start()
    portfolios = pick_portfolios(args.portfolios, settings.shards)
    mode = "Redis Cluster" if args.cluster else "single Redis"
    print(f"demo: {mode} at {redact(args.redis_url)}; {len(portfolios)} portfolios over {settings.shards} shards; "
          f"publishing {args.rate}/s for {args.seconds:g} s while consumer group '{GROUP}' handles them")

    published = 0
    started = time.perf_counter()
    next_report = started + 1.0
    while (now := time.perf_counter()) - started < args.seconds:
        due = int((now - started) * args.rate) - published
        if due > 0:
            batch = [order(portfolios[(published + k) % len(portfolios)], published + k) for k in range(min(due, 500))]
            await bus.publish_many(batch)
            published += len(batch)
        else:
            await asyncio.sleep(0.005)
        if now >= next_report:
            print(f"  {now - started:4.1f} s  published {published:7d}  handled {sum(handled_by_shard.values()):7d}")
            next_report += 1.0
    deadline = time.perf_counter() + 15
    while consumer.processed < published and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    elapsed = time.perf_counter() - started
    consumer.stop()
    await consumer.wait(timeout=10)
    handled = sum(handled_by_shard.values())

    print()
    print(f"published {published}, handled {handled} in {elapsed:.1f} s ({handled / elapsed:,.0f} events/s)")
    ranges = await masters_by_slot(client) if isinstance(client, RedisCluster) else []
    per_master: collections.Counter[str] = collections.Counter()
    print(f"shards used: {len(handled_by_shard)} of {settings.shards}")
    print("  shard  events  stream key                     slot  master")
    for shard in sorted(handled_by_shard):
        key = bus.keys.stream(shard, EventType.ORDER_REQUESTED)
        slot, master = "-", "(single)"
        if isinstance(client, RedisCluster):
            n = int(await client.cluster_keyslot(key))
            slot, master = str(n), next((addr for first, last, addr in ranges if first <= n <= last), "?")
            per_master[master] += 1
        print(f"  {shard:5d}  {handled_by_shard[shard]:6d}  {key:<29}  {slot:>5}  {master}")
    if per_master:
        print("masters: " + ", ".join(f"{addr} ({n} shards)" for addr, n in sorted(per_master.items())))
    dead = await bus.dead_letters()
    print(f"dead letters: {len(dead)}")
    for letter in dead[:5]:
        print(f"  {letter.stream} {letter.entry_id}: {letter.reason}: {letter.error}")
    ok = handled == published and not dead
    print("demo: ok" if ok else "demo: FAILED (not everything was handled, or something was dead-lettered)")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m services.core.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=5.0, help="how long to publish (default 5)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--cluster", dest="cluster", action="store_true", default=True,
                      help=f"use devstack's Redis Cluster, {CLUSTER_URL} (default)")
    mode.add_argument("--single", dest="cluster", action="store_false", help=f"use devstack's single Redis, {SINGLE_URL}")
    parser.add_argument("--redis-url", help="another Redis (a node of it, with --cluster)")
    parser.add_argument("--portfolios", type=int, default=20, help="portfolios to publish for (default 20)")
    parser.add_argument("--rate", type=int, default=2000, help="events published per second (default 2000)")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.portfolios < 1 or args.rate < 1:
        parser.error("--seconds, --portfolios and --rate must be positive")
    args.redis_url = args.redis_url or (CLUSTER_URL if args.cluster else SINGLE_URL)
    return asyncio.run(run(args))


if __name__ == "__main__":
    sys.exit(main())
