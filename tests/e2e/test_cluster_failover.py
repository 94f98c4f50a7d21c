"""An accepted order survives a Redis master failover (ARCHITECTURE section 11, invariants 1,
2, 3 and 5; issue 12 item 5).

The fleet (risk, order, routing to a simulated venue server over ccxt, portfolio, recorder,
gateway) runs on the Redis Cluster with ``ZVT_BUS_WAIT_REPLICAS=1`` as the chart sets it.
Clients send 1,200 orders over HTTP, each retried with its ``client_order_id`` after a 503 or a
lost answer. In the middle, the master that owns shard 0 falls behind: its replica has to sync
in full (the master's replication id is changed and the link cut) and a diskless full sync waits
5 s to start, so for 0.8 s the master acknowledges writes its replica does not have; then it is
killed with SIGKILL. Its replica takes over with what it had, and the killed node comes back
as the new master's replica. Then:

- no ``client_order_id`` was answered 2xx with two different orders (a second order for the
  same id means the first, already acknowledged, was lost with the master), and every order
  answered 2xx exists and reaches exactly one terminal status;
- no client order id reached the venue twice, and the venue's fills are the books' fills
  (one ``exchange.routed`` and one set of fills per order);
- replaying the event store reproduces the live positions.

With ``ZVT_BUS_WAIT_REPLICAS=0`` (asynchronous replication only) the orders the dead master
acknowledged during the lag are gone: their client got 202 and the order does not exist.
(Without the lag, a plain kill on loopback loses nothing: the replica is faster than the kill.)

The test holds devstack's lock from the lag until the cluster is whole again, and restores the
cluster (all six nodes, an in-sync replica per master) whatever happens.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections import defaultdict
from decimal import Decimal
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.asyncio import Redis

from devstack import stack as devstack
from devstack.fleet import STAGING_VENUES, logged, start_venue, venues_setting
from services.client import ApiError, AsyncClient, OrderRequest
from services.core.events import EventType
from services.core.hotstate import LimitsRecord, PositionRecord, StateKeys, load
from services.core.inject import read_orders, seed_portfolio
from services.trading import Side
from tests.e2e.conftest import ROOT, Stack
from tests.e2e.test_crash_safety import stream_events, terminal_and_fill_events
from tests.integration.conftest import Target, eventually

pytestmark = pytest.mark.cluster_chaos

D = Decimal
ADMIN = "failover-admin-" + uuid.uuid4().hex
ORDERS = 1_200
WORKERS = 24
RATE = 250.0  # orders per second, all workers together
KILL_AFTER = 450  # orders answered 2xx before the replica falls behind
LAG_S = 0.8  # how long the master takes orders its replica does not get before it is killed
WAIT_REPLICAS = "1"
PORTFOLIOS = [f"fo-{i}" for i in range(16)]
LIMITS = LimitsRecord(
    max_notional_per_order=D("1000000"), max_position_per_symbol=D("1000000000"), price_band=D("0.05"),
    max_orders_per_window=100_000, window_seconds=1,
)
QTY = {"BTC/USDT": D("0.001"), "ETH/USDT": D("0.01"), "SOL/USDT": D("0.1")}


@pytest.fixture
def e2e_target(redis_cluster_url: str) -> Target:
    return Target("cluster", redis_cluster_url)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sim_orders(port: int) -> list[dict[str, Any]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/sim/orders", timeout=10) as response:
        orders: list[dict[str, Any]] = json.load(response)["orders"]
        return orders


def _master_of_slot(slot: int) -> dict[str, Any]:
    for node in devstack.cluster_nodes():
        if node["role"] == "master" and not node["failed"] and any(lo <= slot <= hi for lo, hi in node["slots"]):
            return dict(node)
    raise AssertionError(f"no live master serves slot {slot}")


async def test_accepted_orders_when_a_master_fails_over_under_load_all_survive(stack: Stack, tmp_path: Path) -> None:
    await asyncio.to_thread(devstack.wait_cluster_ok, 60, full_topology=True)
    t0 = time.monotonic()
    venue_port = _free_port()
    name, args = STAGING_VENUES[0]
    venue = start_venue(name, venue_port, tmp_path / "venues", args)
    fleet = stack.fleet
    client: AsyncClient | None = None
    lock = contextlib.ExitStack()
    victim: int | None = None
    restored = False
    try:
        wait_env = {"ZVT_BUS_WAIT_REPLICAS": WAIT_REPLICAS, "ZVT_BUS_WAIT_TIMEOUT_MS": "250"}
        fleet.start(["risk", "order", "portfolio", "recorder"], env=wait_env)
        fleet.start(["routing"], env={
            **wait_env, "ZVT_ROUTING_VENUES": venues_setting([(name, venue_port)]), "ZVT_ROUTING_CCXT_TIMEOUT_S": "2",
        })
        (gateway,) = fleet.start(["gateway"], env={**wait_env, "ZVT_GATEWAY_ADMIN_API_KEY": ADMIN})
        port = await asyncio.to_thread(logged, gateway, "gateway listening", "port")
        client = AsyncClient(f"http://127.0.0.1:{port}", ADMIN, timeout=10.0)
        for pid in PORTFOLIOS:
            await seed_portfolio(
                stack.bus, pid, {"USDT": D("1000000000"), "BTC": D("100000"), "ETH": D("1000000"), "SOL": D("10000000")},
                limits=LIMITS,
            )

        rng = random.Random(12)
        requests = []
        for n in range(ORDERS):
            symbol = rng.choice(list(QTY))
            requests.append(OrderRequest(
                portfolio_id=PORTFOLIOS[n % len(PORTFOLIOS)], symbol=symbol, side=rng.choice(["buy", "sell"]),
                quantity=QTY[symbol] * rng.randint(1, 5), client_order_id=f"fo-{uuid.uuid4().hex[:12]}-{n}",
            ))
        answered: dict[str, set[str]] = defaultdict(set)  # client order id -> order ids answered 2xx
        first_2xx: dict[str, tuple[str, str]] = {}  # client order id -> (portfolio, order id)
        statuses: dict[int, int] = defaultdict(int)
        unanswered: list[str] = []
        cursor = iter(range(ORDERS))
        started = time.monotonic()
        deadline = started + 60.0

        async def send(request: OrderRequest) -> None:
            assert client is not None
            while time.monotonic() < deadline:
                try:
                    result = await client.place_order(request)
                except ApiError as exc:
                    statuses[exc.status] += 1
                    if exc.status not in (429, 503):
                        raise
                    await asyncio.sleep(min(exc.retry_after or 0.2, 0.2))
                    continue
                except httpx.TransportError:
                    statuses[0] += 1
                    await asyncio.sleep(0.1)
                    continue
                statuses[result.http_status] += 1
                answered[request.client_order_id].add(result.order_id)
                first_2xx.setdefault(request.client_order_id, (request.portfolio_id, result.order_id))
                return
            unanswered.append(request.client_order_id)

        async def worker() -> None:
            for n in cursor:
                due = started + n / RATE
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await send(requests[n])

        workers = [asyncio.create_task(worker()) for _ in range(WORKERS)]
        phases = {"fleet_up_s": round(started - t0, 1)}

        # -- the failover, in the middle of the flow ---------------------------------------
        await eventually(lambda: len(first_2xx) >= KILL_AFTER, timeout=30, interval=0.01)
        slot = int(await stack.redis.cluster_keyslot(stack.bus.keys.stream(0, EventType.ORDER_REQUESTED)))
        master = _master_of_slot(slot)
        victim = int(master["port"])
        lock.enter_context(devstack.exclusive())
        master_conn = Redis(host="127.0.0.1", port=victim)
        try:
            # The replica must sync in full (new replication id: its offsets mean nothing), and a
            # diskless full sync waits repl-diskless-sync-delay (5 s) before it starts: until then
            # the replica has none of what the master acknowledges. (A plain kill on loopback
            # loses nothing: the replica link is faster than the kill, and a cut link is back
            # with a partial resync within ~0.1 s.)
            await master_conn.execute_command("DEBUG", "CHANGE-REPL-ID")
            await master_conn.execute_command("CLIENT", "KILL", "TYPE", "replica")
            cut_at = len(first_2xx)
            await asyncio.sleep(LAG_S)
            accepted_at_kill = len(first_2xx)
            devstack.kill_node(victim)
        finally:
            with contextlib.suppress(Exception):
                await master_conn.aclose()
        killed_at = time.monotonic()
        await asyncio.to_thread(devstack.wait_cluster_ok, 30.0)
        promoted = _master_of_slot(slot)
        assert int(promoted["port"]) != victim
        failover_s = time.monotonic() - killed_at
        # The dead node comes back as the new master's replica (in a pod: its restart), so the
        # promoted master has a replica to confirm writes to again; it syncs at once.
        new_master = Redis(host="127.0.0.1", port=int(promoted["port"]))
        try:
            delay = (await new_master.config_get("repl-diskless-sync-delay"))["repl-diskless-sync-delay"]
            await new_master.config_set("repl-diskless-sync-delay", 0)
            devstack.start_node(victim)
            await asyncio.to_thread(devstack.wait_cluster_ok, 60.0, full_topology=True)
            await new_master.config_set("repl-diskless-sync-delay", delay)
        finally:
            await new_master.aclose()
        whole_s = time.monotonic() - killed_at
        restored = True
        lock.close()

        await asyncio.gather(*workers)
        elapsed = time.monotonic() - started
        print(
            f"\nfailover: {len(first_2xx)} orders answered 2xx in {elapsed:.1f}s ({cut_at} before the replica fell "
            f"behind, {accepted_at_kill} before the kill); "
            f"replica promoted after {failover_s:.1f}s, cluster whole after {whole_s:.1f}s; "
            f"answers {dict(sorted(statuses.items()))}; wait replicas {WAIT_REPLICAS}"
        )
        assert not unanswered, f"{len(unanswered)} orders never answered 2xx within the test's minute"

        # 1. one order per client order id, and every answered order exists and ends once
        twice = {coid: ids for coid, ids in answered.items() if len(ids) > 1}
        refs = list(first_2xx.values())
        records: list[Any] = []

        async def all_terminal() -> bool:
            nonlocal records
            records = await read_orders(stack.bus, refs)
            return all(r is not None and r.is_terminal for r in records)

        with contextlib.suppress(AssertionError):
            await eventually(all_terminal, timeout=45, interval=0.5)
        phases["terminal_s"] = round(time.monotonic() - started - elapsed, 1)
        lost = [oid for (_, oid), r in zip(refs, records, strict=True) if r is None]
        assert not twice and not lost, (
            f"accepted orders lost in the failover: {len(lost)} answered orders do not exist "
            f"(e.g. {lost[:3]}), {len(twice)} client order ids were answered with two different orders "
            f"(e.g. {list(twice.items())[:2]})"
        )
        stuck = [(r.order_id, r.status) for r in records if not r.is_terminal]
        assert not stuck, f"{len(stuck)} orders not terminal, e.g. {stuck[:5]}"

        terminal, fills = await terminal_and_fill_events(stack)
        ids = {oid for _, oid in refs}
        assert {oid for oid, events in terminal.items() if oid in ids and len(events) == 1} == ids
        assert all(len(events) == 1 for events in fills.values()), "a fill was emitted twice"

        # 2. the venue saw each order once, and its fills are the books' fills
        routed: dict[str, set[str]] = defaultdict(set)
        for event in await stream_events(stack, EventType.EXCHANGE_ROUTED):
            routed[event.payload.order_id].add(event.event_id)
        assert all(len(events) == 1 for events in routed.values()), "an order was routed twice"
        at_venue: dict[str, list[Decimal]] = defaultdict(list)
        for o in await asyncio.to_thread(_sim_orders, venue_port):
            at_venue[o["clientOrderId"]].append(D(o["executedQty"]))
        assert all(len(q) == 1 for q in at_venue.values()), "a client order id reached the venue twice"
        for r in records:
            assert "Duplicate" not in (r.reject_reason or ""), r
            filled = sum((f.quantity for f in r.fills), D(0))
            assert at_venue.get(r.order_id, [D(0)]) == [filled], (r.order_id, r.status, filled, at_venue.get(r.order_id))
        assert {str(r.status) for r in records} >= {"filled"}

        # ... and fills equal position changes
        expected: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
        for r in records:
            for f in r.fills:
                expected[(r.portfolio_id, r.symbol)] += f.quantity if r.side is Side.BUY else -f.quantity
        sk = StateKeys(stack.bus.keys)
        live: dict[tuple[str, str], Decimal] = {}
        for pid in PORTFOLIOS:
            for held, raw in (await stack.redis.hgetall(sk.positions(pid))).items():
                live[(pid, held.decode())] = load(PositionRecord, raw).quantity
        assert {k: v for k, v in expected.items() if v} == {k: v for k, v in live.items() if v}

        # 3. replay of the event store equals live
        env = {**os.environ, **stack.env}
        result = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-m", "services.replay", "--wait", "60"],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "replay equals live" in result.stdout
        phases["total_s"] = round(time.monotonic() - t0, 1)
        print(f"phases: {phases}")
    finally:
        if client is not None:
            await client.aclose()
        fleet.stop()
        venue.terminate()
        venue.wait(timeout=10)
        with lock:
            if victim is not None and not restored:
                devstack.start_node(victim)
                await asyncio.to_thread(devstack.wait_cluster_ok, 60.0, full_topology=True)
