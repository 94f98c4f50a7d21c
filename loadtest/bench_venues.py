"""Orders/s and latency of one venue submit: the ccxt path (ccxt's binance client against a
local simulated venue server process) next to the paper path (in-process), in the same run.

    .venv/bin/python loadtest/bench_venues.py --orders 2000 --concurrency 16 --json out.json [--profile]

Each order is a market buy of 0.001 BTC/USDT with a fresh client order id; latency is the
time ``Venue.submit`` takes, as the routing stage sees it. ``--profile`` runs the ccxt pass
again under cProfile and prints where the client process spends its CPU per order (the sim
server runs in its own process and is not in that profile).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import json
import os
import pstats
import socket
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import uvloop  # noqa: E402

from devstack.fleet import start_venue  # noqa: E402
from services.trading import OrderType, Side  # noqa: E402
from services.venues.base import Venue, VenueOrderRequest  # noqa: E402
from services.venues.ccxt import CcxtVenue, CcxtVenueConfig, close_shared_clients  # noqa: E402
from services.venues.paper import PaperVenue  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_pass(venue: Venue, label: str, orders: int, concurrency: int) -> dict[str, Any]:
    latencies: list[float] = []
    counter = iter(range(orders))

    async def worker() -> None:
        for i in counter:
            request = VenueOrderRequest(client_order_id=f"{label}-{os.getpid()}-{time.monotonic_ns()}-{i}",
                                        symbol="BTC/USDT", side=Side.BUY, order_type=OrderType.MARKET,
                                        quantity=Decimal("0.001"))
            started = time.perf_counter()
            await venue.submit(request)
            latencies.append(time.perf_counter() - started)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - started
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 3)

    return {"path": label, "orders": len(latencies), "concurrency": concurrency, "seconds": round(elapsed, 3),
            "orders_per_s": round(len(latencies) / elapsed, 1), "p50_ms": pct(0.50), "p99_ms": pct(0.99),
            "max_ms": round(latencies[-1] * 1000, 3)}


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    paper = PaperVenue("paper", balances={"USDT": Decimal("1e15"), "BTC": Decimal("1e15")})
    await run_pass(paper, "paper-warmup", 200, args.concurrency)
    results = [await run_pass(paper, "paper", args.orders, args.concurrency)]
    port = _free_port()
    log_dir = Path(tempfile.mkdtemp(prefix="bench-venues-"))
    proc = start_venue("bench", port, log_dir)
    profile_text = ""
    try:
        venue = CcxtVenue(CcxtVenueConfig(name="bench", api_key="sim-key", secret="sim-secret",
                                          api_url=f"http://127.0.0.1:{port}", rate_per_s=1e6, burst=1_000_000))
        await venue.markets()
        await run_pass(venue, "ccxt-warmup", 200, args.concurrency)
        results.append(await run_pass(venue, "ccxt", args.orders, args.concurrency))
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            await run_pass(venue, "ccxt-profiled", args.orders, args.concurrency)
            profiler.disable()
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats("tottime").print_stats(25)
            profile_text = out.getvalue()
        await close_shared_clients()
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    return {"results": results, "profile": profile_text}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--orders", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--json", type=Path, help="write the results here")
    p.add_argument("--profile", action="store_true", help="profile a second ccxt pass (client side)")
    args = p.parse_args()
    if args.orders < 1 or args.concurrency < 1:
        p.error("--orders and --concurrency must be positive")
    out = uvloop.run(main_async(args))
    for r in out["results"]:
        print(json.dumps(r))
    if out["profile"]:
        print(out["profile"])
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out["results"], indent=2) + "\n")


if __name__ == "__main__":
    main()
