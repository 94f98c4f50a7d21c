"""Workflow benchmark: ``trading.place_order`` on the local Hatchet engine, next to the fast
path, in one run.

    python loadtest/bench_workflows.py [--seconds 20] [--concurrency 8] [--portfolios 32] [--json PATH]

Starts the engine (devstack), then gateway, risk, order, routing, portfolio, recorder and the
workflows worker as local processes on a namespace of their own (``loadtest/localfleet.py``).
``--concurrency`` callers each place market orders in a closed loop through the public API with
``?wait`` (submit to terminal status, as a client sees it): first for ``--seconds`` on the fast
path, then for ``--seconds`` with ``?durable=true``. Orders go round ``--portfolios``
portfolios (the workflow's concurrency key is the portfolio).

Where a run's time goes: each task reports how long its body took; the rest of the run's
latency is the engine's dispatch (queueing a task, assigning it to the worker, reporting its
result, starting the next) plus the gateway's submit and its wait.

Where the machine's CPU goes: for each phase, the CPU time each process used (user + system,
a service with its child processes; the engine; PostgreSQL's processes together; Redis; this
client), per order. On a machine whose cores are all busy that, not the wait, sets how many
runs a second it can do.

Prints a summary and, with ``--json``, writes ``p50_ms``, ``p99_ms``, ``runs_per_s``,
``fastpath_p50_ms``, ``fastpath_p99_ms``, ``cpu_ms_per_order`` and the breakdown.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import psutil
import psycopg
import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devstack import hatchet, stack  # noqa: E402
from loadtest.localfleet import SERVICES, http_fleet  # noqa: E402
from services.client import AsyncClient, OrderRequest  # noqa: E402

FUNDS = {"USDT": Decimal("100000000"), "BTC": Decimal("1000")}
LIMITS = {"max_notional_per_order": "1000000", "max_position_per_symbol": "100000",
          "max_orders_per_window": 1_000_000, "window_seconds": 1}


class CpuMeter:
    """CPU seconds used so far, by group of processes (a group's children and, for PostgreSQL,
    every server process, however short-lived, are counted while they live)."""

    def __init__(self, groups: dict[str, list[int]], by_name: dict[str, str]) -> None:
        self.groups = {label: [psutil.Process(pid) for pid in pids if psutil.pid_exists(pid)]
                       for label, pids in groups.items()}
        self.by_name = by_name  # label -> process name (all processes of that name)
        self.me = psutil.Process()

    def _cpu(self, procs: list[psutil.Process]) -> float:
        total = 0.0
        seen: set[int] = set()
        for proc in procs:
            try:  # this client's children are the fleet, counted on their own
                family = [proc] if proc.pid == self.me.pid else [proc, *proc.children(recursive=True)]
            except psutil.Error:
                continue
            for p in family:
                if p.pid in seen:
                    continue
                seen.add(p.pid)
                try:
                    t = p.cpu_times()
                    total += t.user + t.system
                except psutil.Error:
                    pass
        return total

    def sample(self) -> dict[str, float]:
        out = {label: self._cpu(procs) for label, procs in self.groups.items()}
        for label, name in self.by_name.items():
            out[label] = self._cpu([p for p in psutil.process_iter(["name"]) if p.info["name"] == name])
        return out


class Counts:
    """Work counted, not timed (the same on a busy machine): the commands the fleet's Redis
    served and the transactions the engine's database committed."""

    def __init__(self, redis_url: str, postgres_dsn: str) -> None:
        self.redis = redis.Redis.from_url(redis_url)
        self.dsn = postgres_dsn

    def sample(self) -> dict[str, int]:
        stats = self.redis.info("commandstats")
        out = {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}
        with psycopg.connect(self.dsn, autocommit=True) as conn:
            row = conn.execute("SELECT xact_commit FROM pg_stat_database WHERE datname = %s",
                               (hatchet.DATABASE,)).fetchone()
        out["hatchet-db transactions"] = int(row[0]) if row else 0
        return out


def counts_per_order(before: dict[str, int], after: dict[str, int], orders: int) -> dict[str, float]:
    """Redis commands per order (``redis total`` and the busiest commands) and the engine
    database's transactions per order."""
    if not orders:
        return {}
    delta = {k: (after.get(k, 0) - before.get(k, 0)) / orders for k in after}
    txn = delta.pop("hatchet-db transactions", 0.0)
    delta.pop("info", None)  # this meter's own
    top = sorted(((k, v) for k, v in delta.items() if v > 0), key=lambda kv: -kv[1])
    out = {"redis total": round(sum(delta.values()), 2)}
    out.update({f"redis {k}": round(v, 2) for k, v in top[:6]})
    out["hatchet-db transactions"] = round(txn, 2)
    return out


def cpu_per_order(before: dict[str, float], after: dict[str, float], orders: int) -> dict[str, float]:
    """CPU milliseconds per order by group, and ``total``."""
    if not orders:
        return {}
    out = {label: round((after[label] - before[label]) * 1000 / orders, 2) for label in before}
    out["total"] = round(sum(out.values()), 2)
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def phase(client: AsyncClient, portfolios: list[str], seconds: float, concurrency: int, durable: bool,
                sample: Callable[[], Any] = lambda: None
                ) -> tuple[list[float], list[dict[str, Any]], float, int, Any]:
    """The latencies, the runs' results (durable), the seconds, the errors, and what
    ``sample`` said at the end of the orders, before the runs' results were read."""
    latencies: list[float] = []
    runs: list[str] = []
    errors = 0
    deadline = time.monotonic() + seconds

    async def caller(i: int) -> None:
        nonlocal errors
        n = 0
        while time.monotonic() < deadline:
            pid = portfolios[(i + n * concurrency) % len(portfolios)]
            n += 1
            request = OrderRequest(portfolio_id=pid, symbol="BTC/USDT", side="buy" if n % 2 else "sell",
                                   quantity=Decimal("0.001"))
            started = time.perf_counter()
            try:
                result = await client.place_order(request, wait=30, durable=durable)
            except Exception:  # noqa: BLE001 - counted and reported
                errors += 1
                continue
            if result.status != "filled":
                errors += 1
                continue
            latencies.append((time.perf_counter() - started) * 1000)
            if durable:
                runs.append(result.order_id)

    began = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(concurrency)))
    elapsed = time.perf_counter() - began
    at_end = sample()
    results: list[dict[str, Any]] = []
    if durable:
        results = await run_results(client, runs)
    return latencies, results, elapsed, errors, at_end


async def run_results(client: AsyncClient, order_ids: list[str]) -> list[dict[str, Any]]:
    """The task timings of each order's run (from its workflow.started event's run id)."""
    out: list[dict[str, Any]] = []
    for order_id in order_ids[-400:]:
        trail = [e["event"] for e in await client.events(order_id)]
        started = next((e for e in trail if e["event_type"] == "workflow.started"), None)
        requested = next((e for e in trail if e["event_type"] == "order.requested"), None)
        if started is None:
            continue
        run = await client.workflow(started["payload"]["run_id"])
        if run.get("result"):
            result = dict(run["result"])
            if requested is not None:
                # accepted by the gateway -> the run's first step under way on the worker: the
                # gateway's trigger, the engine's scheduling and dispatch, the SDK's hand-over
                result["start_ms"] = (dt.datetime.fromisoformat(started["occurred_at"])
                                      - dt.datetime.fromisoformat(requested["occurred_at"])).total_seconds() * 1000
            out.append(result)
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    engine = hatchet.ensure_hatchet()
    namespace = f"bw{uuid.uuid4().hex[:8]}"
    env = {
        "ZVT_HATCHET_TOKEN": engine["HATCHET_CLIENT_TOKEN"], "ZVT_HATCHET_HOST_PORT": engine["HATCHET_CLIENT_HOST_PORT"],
        "ZVT_HATCHET_TLS_STRATEGY": "none", "ZVT_HATCHET_NAMESPACE": f"{namespace}_",
        "ZVT_WORKFLOWS_SLOTS": str(max(20, args.concurrency * 5)), "ZVT_WORKFLOWS_WORKER_NAME": f"{namespace}-w",
        "ZVT_WORKFLOWS_RISK_MONITOR_CRON": "", "ZVT_WORKFLOWS_RECONCILE_CRON": "",
    }
    with http_fleet(env=env, services=(*SERVICES, "workflows")) as fleet:
        groups = {name: [p.popen.pid for p in procs] for name, procs in fleet.fleet.procs.items()}
        groups["bench-client"] = [os.getpid()]
        meter = CpuMeter(groups, {"hatchet-engine": "hatchet-engine", "postgres": "postgres", "redis": "redis-server"})
        counter = Counts(fleet.redis_url, stack.ensure_postgres().rsplit("/", 1)[0] + f"/{hatchet.DATABASE}")
        async with AsyncClient(fleet.url, fleet.admin_key, timeout=60) as client:
            portfolios = [f"bench-{i}" for i in range(args.portfolios)]
            for pid in portfolios:
                await client.put_portfolio(pid, balances=FUNDS, limits=LIMITS)
            # warm both paths
            await phase(client, portfolios, 2, args.concurrency, durable=False)
            await phase(client, portfolios, 2, args.concurrency, durable=True)
            def sample() -> tuple[dict[str, float], dict[str, int]]:
                return meter.sample(), counter.sample()

            cpu0, n0 = sample()
            fast, _, fast_s, fast_err, (cpu1, n1) = await phase(client, portfolios, args.seconds, args.concurrency,
                                                                durable=False, sample=sample)
            slow, results, slow_s, slow_err, (cpu2, n2) = await phase(
                client, portfolios, args.seconds, args.concurrency, durable=True, sample=sample)
    tasks = ["validate_request", "check_risk_limits", "create_order_record", "execute_order", "update_portfolio"]
    bodies = {t: statistics.median([r["task_ms"][t] for r in results if "task_ms" in r]) if results else None
              for t in tasks}
    body_total = sum(v for v in bodies.values() if v is not None)
    starts = [r["start_ms"] for r in results if "start_ms" in r]
    p50 = statistics.median(slow) if slow else float("nan")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": f"{platform.node()} {os.cpu_count()} CPU, {platform.platform()}",
        "seconds": args.seconds, "concurrency": args.concurrency, "portfolios": args.portfolios,
        "runs": len(slow), "runs_per_s": round(len(slow) / slow_s, 1), "errors": slow_err,
        "p50_ms": round(p50, 1), "p90_ms": round(pct(slow, 0.90), 1), "p99_ms": round(pct(slow, 0.99), 1),
        "fastpath_orders": len(fast), "fastpath_orders_per_s": round(len(fast) / fast_s, 1), "fastpath_errors": fast_err,
        "fastpath_p50_ms": round(statistics.median(fast), 1) if fast else None,
        "fastpath_p99_ms": round(pct(fast, 0.99), 1),
        "task_body_p50_ms": {t: round(v, 2) if v is not None else None for t, v in bodies.items()},
        "task_bodies_ms": round(body_total, 1),
        "dispatch_and_api_ms": round(p50 - body_total, 1),
        "start_p50_ms": round(statistics.median(starts), 1) if starts else None,
        "cpu_ms_per_order": cpu_per_order(cpu1, cpu2, len(slow)),
        "fastpath_cpu_ms_per_order": cpu_per_order(cpu0, cpu1, len(fast)),
        "counts_per_order": counts_per_order(n1, n2, len(slow)),
        "fastpath_counts_per_order": counts_per_order(n0, n1, len(fast)),
        "target_p50_ms": 75,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--portfolios", type=int, default=32)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    report = asyncio.run(main_async(args))
    print(f"trading.place_order  runs {report['runs']} ({report['runs_per_s']}/s at concurrency "
          f"{args.concurrency}), p50 {report['p50_ms']} ms, p90 {report['p90_ms']} ms, p99 {report['p99_ms']} ms, "
          f"errors {report['errors']}   (target p50 < 75 ms)")
    print(f"fast path            orders {report['fastpath_orders']} ({report['fastpath_orders_per_s']}/s), "
          f"p50 {report['fastpath_p50_ms']} ms, p99 {report['fastpath_p99_ms']} ms, errors {report['fastpath_errors']}")
    print(f"where a run's p50 goes: task bodies {report['task_bodies_ms']} ms "
          f"{report['task_body_p50_ms']}, engine dispatch + API {report['dispatch_and_api_ms']} ms; "
          f"accepted to first step (trigger, engine, SDK) p50 {report['start_p50_ms']} ms")
    for label in ("cpu_ms_per_order", "fastpath_cpu_ms_per_order", "counts_per_order", "fastpath_counts_per_order"):
        print(f"{label:26} " + ", ".join(f"{k} {v}" for k, v in report[label].items()))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")
    if report["errors"] or report["fastpath_errors"] or not report["runs"]:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
