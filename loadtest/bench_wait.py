"""What ``ZVT_BUS_WAIT_REPLICAS`` costs an order submission: the intake's submit (``OrderDesk``,
the submit script in the portfolio's slot, batched like the gateway does) with ``WAIT`` off and
on, on the devstack Redis Cluster (3 masters, 1 replica each, AOF on), in the same run.

    .venv/bin/python loadtest/bench_wait.py --orders 3000 --concurrency 1,32 --json out.json

Latency is the time ``OrderDesk.submit`` takes (the round trip, the script and, with WAIT,
the replica's acknowledgement), as the gateway's request handler sees it; no HTTP. Passes run
off, on, off, on (each after a warm-up) so that a drift of the shared machine shows up as a
difference between the two passes of one mode. Keys go to a namespace of their own, deleted
at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
import uuid
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop  # noqa: E402

from devstack import stack  # noqa: E402
from services.core.bus import Bus  # noqa: E402
from services.core.inject import seed_portfolio  # noqa: E402
from services.core.redisconn import AnyRedis, open_redis, scan_keys  # noqa: E402
from services.core.settings import BusSettings, CoreSettings  # noqa: E402
from services.intake import IntakeSettings, OrderBody, OrderDesk  # noqa: E402
from services.trading import OrderType, Side, TimeInForce  # noqa: E402

PORTFOLIOS = 32
SHARDS = 16


async def run_pass(desk: OrderDesk, label: str, orders: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    failed = 0
    counter = iter(range(orders))
    run = uuid.uuid4().hex[:8]

    async def worker() -> None:
        nonlocal failed
        for i in counter:
            body = OrderBody(
                client_order_id=f"{label}-{run}-{i}", portfolio_id=f"bw-{i % PORTFOLIOS}", symbol="BTC/USDT",
                side=Side.BUY, type=OrderType.MARKET, quantity="0.001", time_in_force=TimeInForce.GTC,
            )
            started = time.perf_counter()
            try:
                await desk.submit(body, Decimal("0.001"), None, "bench")
            except Exception:
                failed += 1
                continue
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3)

    return {"wait": label, "orders": len(latencies), "failed": failed, "concurrency": concurrency,
            "seconds": round(elapsed, 3), "orders_per_s": round(len(latencies) / elapsed, 1),
            "p50_ms": pct(0.50), "p90_ms": pct(0.90), "p99_ms": pct(0.99), "max_ms": round(latencies[-1] * 1000, 3)}


async def cleanup(redis: AnyRedis, namespace: str) -> None:
    keys = [k async for k in scan_keys(redis, f"{namespace}:*")]
    for i in range(0, len(keys), 500):
        pipe: Any = redis.pipeline(transaction=False)
        for key in keys[i : i + 500]:
            pipe.execute_command("UNLINK", key)
        await pipe.execute()


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    namespace = f"benchwait{uuid.uuid4().hex[:6]}"
    redis = await open_redis(CoreSettings(redis_url=stack.CLUSTER_URL, redis_cluster=True))
    results: list[dict[str, Any]] = []
    try:
        desks = {}
        for label, replicas in (("off", 0), ("on", args.replicas)):
            settings = BusSettings(namespace=namespace, shards=SHARDS, wait_replicas=replicas,
                                   wait_timeout_ms=args.timeout_ms)
            desks[label] = OrderDesk(Bus(redis, settings), IntakeSettings(orders_index_max=10_000, idempotency_ttl_s=3600))
        bus = next(iter(desks.values())).bus
        for i in range(PORTFOLIOS):
            await seed_portfolio(bus, f"bw-{i}", {"USDT": Decimal("1e12")})
        for concurrency in args.concurrency:
            for label in ("off", "on", "off", "on"):
                await run_pass(desks[label], f"{label}-warmup", min(300, args.orders), concurrency)
                result = await run_pass(desks[label], label, args.orders, concurrency)
                results.append(result)
                print(json.dumps(result), flush=True)
    finally:
        await cleanup(redis, namespace)
        await redis.aclose()
    return {"replicas": args.replicas, "timeout_ms": args.timeout_ms, "results": results}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--orders", type=int, default=3000, help="orders per pass")
    p.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[1, 32],
                   help="comma-separated: submissions in flight at once (one set of passes each)")
    p.add_argument("--replicas", type=int, default=1, help="ZVT_BUS_WAIT_REPLICAS of the 'on' passes")
    p.add_argument("--timeout-ms", type=int, default=250, help="ZVT_BUS_WAIT_TIMEOUT_MS")
    p.add_argument("--json", type=Path, help="also write the results here")
    args = p.parse_args()
    stack.wait_cluster_ok(60, full_topology=True)
    out = uvloop.run(main_async(args))
    print()
    print("| wait | in flight | orders/s | p50 ms | p90 ms | p99 ms | max ms |")
    print("|---|---|---|---|---|---|---|")
    for r in out["results"]:
        print(f"| {r['wait']} | {r['concurrency']} | {r['orders_per_s']} | {r['p50_ms']} | {r['p90_ms']} | "
              f"{r['p99_ms']} | {r['max_ms']} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
