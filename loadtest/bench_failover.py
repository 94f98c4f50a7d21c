"""Failover benchmark: how fast an exclusive stage resumes a shard whose owner died, and what
the lease upkeep costs Redis.

    python loadtest/bench_failover.py [--kills 10] [--terms 3] [--shards 16] [--rate 400]
                                      [--idle-seconds 10] [--cluster] [--redis-url URL]
                                      [--lease-ttl-ms MS] [--lease-renew-ms MS] [--json PATH]

Two replicas of a real service process (the echo stage of the integration tests: an exclusive
consumer of ``order.requested`` that emits a derived ``order.validated`` and records, in the same
commit, which process handled the order) share the shards, at the default bus settings unless
told otherwise.

1. idle: with both replicas up and nothing published, Redis's ``INFO commandstats`` over
   ``--idle-seconds``: commands per second per member, by command.
   Script calls count once as sent, and each command a script runs counts as run.
2. failover: orders flow at ``--rate``/s over every shard; ``--kills`` times the owner of a shard
   is killed with SIGKILL (then ``--terms`` times stopped with SIGTERM), and a new replica is
   started once the survivor holds everything. Recovery time: from the signal to the first order
   of each of the victim's shards committed by the survivor (the entry id of its
   ``order.validated``, Redis's clock); a round counts its slowest shard. At the end every order
   must have been handled exactly once.

With no ``--redis-url`` it starts a throwaway redis-server (appendonly no) on a free port, so
the command counts are the members' alone; ``--cluster`` uses devstack's Redis Cluster (shared:
its command counts include whatever else runs on it). Every key of the run is deleted at the
end. The last line printed is a one-line summary.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a file: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from loadtest.bench_bus import Target, delete_keys, machine, open_target, server_version
from services.core.bus import Bus
from services.core.codec import decode
from services.core.events import Event, EventType, OrderRequested
from services.core.redisconn import AnyRedis, open_redis
from services.core.settings import BusSettings, CoreSettings
from services.trading import OrderType, Side

ROOT = Path(__file__).resolve().parent.parent
GROUP = "echo"


def make_order(i: int) -> Event[Any]:
    return Event.new(
        OrderRequested(
            order_id=f"o{i}", client_order_id=f"c{i}", symbol="BTC/USDT", side=Side.BUY,
            order_type=OrderType.MARKET, quantity=Decimal("0.5"),
        ),
        portfolio_id=f"pf-{i % 97}",
    )


class Members:
    """The echo service's replicas as real processes."""

    def __init__(self, env: dict[str, str], log_dir: Path) -> None:
        self.env = env
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def spawn(self) -> subprocess.Popen[bytes]:
        log = (self.log_dir / f"member-{len(self.procs)}.log").open("ab")
        proc = subprocess.Popen(
            [sys.executable, "-m", "tests.integration.echo_service"], cwd=ROOT, env=self.env,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        self.procs.append(proc)
        return proc

    def live(self) -> list[subprocess.Popen[bytes]]:
        return [p for p in self.procs if p.poll() is None]

    def stop_all(self) -> None:
        for proc in self.live():
            proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait()


def pid_of(member: str) -> int:
    return int(member.rsplit("-", 1)[1]) if member else 0


async def owners(redis: AnyRedis, bus: Bus) -> dict[int, int]:
    """shard -> pid of the lease's owner (0: free)."""
    out = {}
    for shard in range(bus.keys.shards):
        value = await redis.get(bus.keys.lease(shard, GROUP))
        out[shard] = pid_of(value.decode()) if value else 0
    return out


async def until(check: Any, timeout: float, interval: float = 0.02) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def split_evenly(redis: AnyRedis, bus: Bus, pids: set[int]) -> bool:
    held = list((await owners(redis, bus)).values())
    share = bus.keys.shards // len(pids)
    return set(held) == pids and all(held.count(p) in (share, share + 1) for p in pids)


async def first_commit_by(redis: AnyRedis, bus: Bus, shard: int, pid: int, after_ms: int) -> int | None:
    entries = await redis.xrange(bus.keys.stream(shard, EventType.ORDER_VALIDATED), min=str(after_ms), count=200)
    if not entries:
        return None
    ids = [decode(fields[b"d"], EventType.ORDER_VALIDATED).payload.order_id for _, fields in entries]
    by = await redis.hmget(bus.keys.state(shard, "echo", "by"), ids)
    for (entry_id, _), who in zip(entries, by, strict=True):
        if who == str(pid).encode():
            return int(entry_id.decode().partition("-")[0])
    return None


SCRIPTED = {"get", "pexpire", "hget", "hset", "hdel", "zadd", "zrem", "zrange", "zrangebyscore", "time", "del", "set"}
"""Commands that, at idle, run only inside the lease scripts (``INFO commandstats`` counts those
calls too): what is left are the commands the members send."""


def commandstats(target: Target) -> dict[str, tuple[int, int]]:
    """command -> (calls, usec), summed over the masters."""
    total: dict[str, tuple[int, int]] = {}
    for host, port in target.masters:
        for name, stats in target.node(host, port).info("commandstats").items():
            command = name.removeprefix("cmdstat_")
            calls, usec = total.get(command, (0, 0))
            total[command] = (calls + int(stats["calls"]), usec + int(stats["usec"]))
    return total


async def idle_phase(target: Target, redis: AnyRedis, bus: Bus, seconds: float) -> dict[str, Any]:
    await asyncio.sleep(2.0)  # past start-up: groups created, leases split
    before = commandstats(target)
    t0 = time.monotonic()
    await asyncio.sleep(seconds)
    after = commandstats(target)
    window = time.monotonic() - t0
    rate = window * 2  # per second, per member
    delta = {c: (n - before.get(c, (0, 0))[0], u - before.get(c, (0, 0))[1]) for c, (n, u) in after.items()}
    delta.pop("info", None)  # this measurement's own
    sent = {c: d for c, d in delta.items() if c not in SCRIPTED and d[0] > 0}
    return {
        "window_s": round(window, 2), "members": 2,
        "commands_sent_per_s_per_member": round(sum(n for n, _ in sent.values()) / rate, 1),
        "commands_run_per_s_per_member": round(sum(n for n, _ in delta.values()) / rate, 1),
        "redis_cpu_us_per_s_per_member": round(sum(u for _, u in sent.values()) / rate, 1),
        "redis_cpu_us_by_command_per_s_per_member": {
            c: round(u / rate, 1) for c, (_, u) in sorted(sent.items(), key=lambda kv: -kv[1][1])
        },
        "sent_by_command_per_s_per_member": {
            c: round(n / rate, 2) for c, (n, _) in sorted(sent.items(), key=lambda kv: -kv[1][0])
        },
        "run_by_command_per_s_per_member": {
            c: round(n / rate, 2) for c, (n, _) in sorted(delta.items(), key=lambda kv: -kv[1][0]) if n > 0
        },
    }


async def failover_phase(args: argparse.Namespace, redis: AnyRedis, bus: Bus, members: Members) -> dict[str, Any]:
    sent = 0
    stop = asyncio.Event()

    async def feed() -> None:
        nonlocal sent
        per_tick = max(1, args.rate // 100)
        while not stop.is_set():
            await bus.publish_many([make_order(sent + j) for j in range(per_tick)])
            sent += per_tick
            await asyncio.sleep(0.01)

    feeder = asyncio.create_task(feed())
    rounds: list[dict[str, Any]] = []
    try:
        plan = [signal.SIGKILL] * args.kills + [signal.SIGTERM] * args.terms
        for n, sig in enumerate(plan):
            live = members.live()
            await until(lambda: split_evenly(redis, bus, {p.pid for p in live}), 30)
            await asyncio.sleep(0.5)  # orders flowing on the settled split
            held = await owners(redis, bus)
            victim = next(p for p in live if p.pid == held[n % bus.keys.shards])
            heir = next(p for p in live if p is not victim)
            shards = [s for s, pid in held.items() if pid == victim.pid]
            sent_at = time.time()
            victim.send_signal(sig)
            code = await asyncio.to_thread(victim.wait, 60)
            after_ms = int(sent_at * 1000)
            first: dict[int, int] = {}

            async def resumed() -> bool:
                for shard in shards:
                    if shard not in first:
                        at = await first_commit_by(redis, bus, shard, heir.pid, after_ms)
                        if at is not None:
                            first[shard] = at
                return len(first) == len(shards)

            await until(resumed, 30)
            per_shard = {s: round((at - sent_at * 1000) / 1000, 3) for s, at in sorted(first.items())}
            rounds.append({"signal": sig.name, "exit_code": code, "shards": len(shards),
                           "recovery_s": max(per_shard.values()), "per_shard_s": per_shard})
            print(f"  round {n + 1:2}: {sig.name:7} -> every shard of the victim flowing again after "
                  f"{max(per_shard.values()):.3f} s (first {min(per_shard.values()):.3f} s, {len(shards)} shards)",
                  flush=True)
            members.spawn()
    finally:
        stop.set()
        await feeder

    async def all_handled() -> bool:
        total = 0
        for shard in range(bus.keys.shards):
            total += int(await redis.hlen(bus.keys.state(shard, "echo", "handled")))
        return total >= sent

    await until(all_handled, 60, 0.1)
    counts: dict[str, int] = {}
    for shard in range(bus.keys.shards):
        for oid, c in (await redis.hgetall(bus.keys.state(shard, "echo", "handled"))).items():
            counts[oid.decode()] = int(c)
    validated = sum([int(await redis.xlen(bus.keys.stream(s, EventType.ORDER_VALIDATED))) for s in range(bus.keys.shards)])
    once = set(counts) == {f"o{i}" for i in range(sent)} and set(counts.values()) == {1} and validated == sent
    return {"rounds": rounds, "orders": sent, "each_once": once,
            "kill": summarize([r["recovery_s"] for r in rounds if r["signal"] == "SIGKILL"]),
            "term": summarize([r["recovery_s"] for r in rounds if r["signal"] == "SIGTERM"])}


def summarize(values: list[float]) -> dict[str, Any]:
    if not values:
        return {}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"n": len(values), "p50_s": round(statistics.median(ordered), 3), "p90_s": pick(0.9),
            "max_s": ordered[-1], "min_s": ordered[0]}


async def run(args: argparse.Namespace, target: Target, namespace: str, log_dir: Path) -> dict[str, Any]:
    overrides: dict[str, Any] = {"namespace": namespace, "shards": args.shards}
    if args.lease_ttl_ms:
        overrides["lease_ttl_ms"] = args.lease_ttl_ms
    if args.lease_renew_ms:
        overrides["lease_renew_ms"] = args.lease_renew_ms
    settings = BusSettings(**overrides)
    env = {
        **os.environ, "PYTHONPATH": str(ROOT), "ZVT_REDIS_URL": target.url,
        "ZVT_REDIS_CLUSTER": "true" if target.cluster else "false", "ZVT_HTTP_PORT": "0",
        "ZVT_LOG_LEVEL": "WARNING", "ZVT_ECHO_EXCLUSIVE": "1", "ZVT_ECHO_DELAY_MS": "1",
        "ZVT_BUS_NAMESPACE": namespace, "ZVT_BUS_SHARDS": str(args.shards),
        "ZVT_BUS_LEASE_TTL_MS": str(settings.lease_ttl_ms), "ZVT_BUS_LEASE_RENEW_MS": str(settings.lease_renew_ms),
    }
    redis = await open_redis(CoreSettings(redis_url=target.url, redis_cluster=target.cluster))
    bus = Bus(redis, settings)
    members = Members(env, log_dir)
    try:
        first = [members.spawn(), members.spawn()]
        await until(lambda: split_evenly(redis, bus, {p.pid for p in first}), 60, 0.05)
        results: dict[str, Any] = {"lease_ttl_ms": settings.lease_ttl_ms, "lease_renew_ms": settings.lease_renew_ms,
                                   "block_ms": settings.block_ms}
        if args.idle_seconds > 0:
            print(f"idle: {args.idle_seconds:g} s, 2 members, nothing published", flush=True)
            results["idle"] = await idle_phase(target, redis, bus, args.idle_seconds)
        if args.kills + args.terms > 0:
            print(f"failover: {args.kills} x SIGKILL, {args.terms} x SIGTERM at ~{args.rate} orders/s", flush=True)
            results["failover"] = await failover_phase(args, redis, bus, members)
        return results
    finally:
        members.stop_all()
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python loadtest/bench_failover.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--kills", type=int, default=10, help="rounds with SIGKILL (default 10)")
    parser.add_argument("--terms", type=int, default=3, help="rounds with SIGTERM after those (default 3)")
    parser.add_argument("--shards", type=int, default=16, help="shards per event type (default 16)")
    parser.add_argument("--rate", type=int, default=400, help="orders/s published during the failovers (default 400)")
    parser.add_argument("--idle-seconds", type=float, default=10.0, help="window of the idle command count (0: skip)")
    parser.add_argument("--cluster", action="store_true", help="use a Redis Cluster (devstack's unless --redis-url)")
    parser.add_argument("--redis-url", help="Redis to use (default: a throwaway redis-server on a free port)")
    parser.add_argument("--lease-ttl-ms", type=int, help="ZVT_BUS_LEASE_TTL_MS of the members (default: the setting's)")
    parser.add_argument("--lease-renew-ms", type=int, help="ZVT_BUS_LEASE_RENEW_MS of the members (default: the setting's)")
    parser.add_argument("--json", metavar="PATH", help="write the results as JSON")
    args = parser.parse_args(argv)
    if args.kills < 0 or args.terms < 0 or args.shards < 2 or args.rate < 1:
        parser.error("--kills and --terms must be >= 0, --shards >= 2, --rate >= 1")

    started = dt.datetime.now(dt.UTC)
    namespace = f"zvtfail-{os.getpid()}-{int(time.time())}"
    info = machine()
    target = open_target(args)
    log_dir = Path(tempfile.mkdtemp(prefix="zvt-bench-failover-"))
    try:
        version = server_version(target)
        print(f"bench_failover: redis {version} {'cluster' if target.cluster else 'single'} at {target.url}; "
              f"{args.shards} shards; {info['nproc']} CPUs; member logs in {log_dir}", flush=True)
        results = asyncio.run(run(args, target, namespace, log_dir))
    finally:
        with contextlib.suppress(Exception):
            delete_keys(target, namespace)
        if target.cleanup is not None:
            target.cleanup()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    summary = {
        **results,
        "params": {k: getattr(args, k) for k in ("kills", "terms", "shards", "rate", "idle_seconds", "cluster", "redis_url")},
        "redis_mode": "cluster" if target.cluster else "single",
        "redis_version": version,
        "machine": info,
        "commit": commit,
        "date_utc": started.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv])),
    }
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(summary, indent=2, default=str) + "\n")
        print(f"wrote {path}")
    fo = results.get("failover", {})
    kill, term, idle = fo.get("kill", {}), fo.get("term", {}), results.get("idle", {})
    print(
        f"bench_failover: kill -9 recovery p50 {kill.get('p50_s')} s, p90 {kill.get('p90_s')} s, max {kill.get('max_s')} s "
        f"(n={kill.get('n', 0)}); SIGTERM p50 {term.get('p50_s')} s, max {term.get('max_s')} s (n={term.get('n', 0)}); "
        f"idle per member: {idle.get('commands_sent_per_s_per_member')} Redis commands/s sent "
        f"({idle.get('commands_run_per_s_per_member')} run, scripts' calls included; "
        f"{idle.get('redis_cpu_us_per_s_per_member')} us of Redis CPU/s); "
        f"each order once: {fo.get('each_once')}"
    )
    return 0 if fo.get("each_once", True) else 1


if __name__ == "__main__":
    raise SystemExit(main())
