"""``orders.reconcile`` on a real Hatchet engine and Redis, with the stream stages as processes,
routing on the in-process paper venue and on a simulated venue server (through ccxt): a fill
routing applied is never applied again, a fill the store missed is added once (and routing's
late copy of it is dropped), and an order resting with routing is never failed or expired."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from typing import Any

import pytest
from hatchet_sdk import Hatchet

from devstack.fleet import Fleet, logged, start_venue
from services.client import AsyncClient, OrderRequest, OrderResult
from services.core.bus import Bus
from services.core.events import EventType
from services.core.hotstate import StateKeys
from services.core.redisconn import open_redis
from services.core.settings import BusSettings
from services.venues.base import BookLevel
from services.venues.ccxt import CcxtVenue, CcxtVenueConfig, close_shared_clients
from services.workflows.client import hatchet_client
from services.workflows.contracts import RECONCILE
from services.workflows.reconcile import ReconcileInput
from services.workflows.settings import HatchetSettings
from tests.e2e.conftest import SHARDS, stack_env
from tests.integration.conftest import Target, delete_namespace

D = Decimal
ADMIN = "rc-admin-" + uuid.uuid4().hex
FUNDS = {"USDT": D("10000000"), "BTC": D("100")}
SIM = "simrc"
STAGES = ["risk", "order", "routing", "portfolio", "gateway", "workflows"]


@dataclass
class Recon:
    fleet: Fleet
    client: AsyncClient
    bus: Bus
    hatchet: Hatchet
    sim_url: str


@pytest.fixture
async def recon(redis_single_url: str, postgres_dsn: str, hatchet_env: dict[str, str],
                tmp_path: Path) -> AsyncIterator[Recon]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    sim: subprocess.Popen[bytes] = start_venue(SIM, port, tmp_path / "venue")
    sim_url = f"http://127.0.0.1:{port}"
    target = Target("single", redis_single_url)
    namespace = f"r{uuid.uuid4().hex[:10]}"
    env = stack_env(
        target, namespace, postgres_dsn, **hatchet_env,
        ZVT_GATEWAY_ADMIN_API_KEY=ADMIN, ZVT_HATCHET_NAMESPACE=f"{namespace}_",
        ZVT_WORKFLOWS_RISK_MONITOR_CRON="", ZVT_WORKFLOWS_RECONCILE_CRON="", ZVT_WORKFLOWS_SLOTS="10",
        ZVT_WORKFLOWS_WORKER_NAME=f"{namespace}-w",
        # routing and the worker trade on the same two venues: paper (in-process: each process
        # has its own) and the simulated venue server (one, shared, through ccxt)
        ZVT_ROUTING_VENUES=f"paper,{SIM}=binance@{sim_url}",
    )
    fleet = Fleet(env, log_dir=tmp_path / "logs", start_timeout=60)
    redis = await open_redis(target.core())
    bus = Bus(redis, BusSettings(namespace=namespace, shards=SHARDS))
    try:
        procs = fleet.start(STAGES)
        gateway = next(p for p in procs if p.name == "gateway")
        gw_port = await asyncio.to_thread(logged, gateway, "gateway listening", "port")
        client = AsyncClient(f"http://127.0.0.1:{gw_port}", ADMIN)
        hatchet = hatchet_client(HatchetSettings(
            token=hatchet_env["ZVT_HATCHET_TOKEN"], host_port=hatchet_env["ZVT_HATCHET_HOST_PORT"],
            tls_strategy="none", namespace=f"{namespace}_",
        ))
        try:
            yield Recon(fleet, client, bus, hatchet, sim_url)
        finally:
            await client.aclose()
    finally:
        fleet.stop()
        sim.terminate()
        sim.wait(timeout=10)
        await delete_namespace(redis, namespace)
        await redis.aclose()


async def reconcile(r: Recon) -> dict[str, list[str]]:
    """One ``orders.reconcile`` run over every open order (no grace); order id -> corrections."""
    stub = r.hatchet.workflow(name=RECONCILE, input_validator=ReconcileInput)
    ref = await stub.aio_run_no_wait(ReconcileInput(grace_s=0))
    out: dict[str, Any] = await asyncio.wait_for(ref.aio_result(), 60)
    return {f["order_id"]: f["corrections"] for f in out["reconcile"]["fixed"]}


async def best_ask(r: Recon) -> BookLevel:
    """The simulated venue's first ask level (what a limit buy at its price takes at once)."""
    venue = CcxtVenue(CcxtVenueConfig(name="probe", api_key="sim-key", secret="sim-secret", api_url=r.sim_url))
    try:
        return (await venue.order_book("BTC/USDT", 1)).asks[0]
    finally:
        await close_shared_clients()


async def until(r: Recon, order_id: str, status: str, timeout: float = 30) -> OrderResult:
    deadline = time.monotonic() + timeout
    while True:
        got = await r.client.get_order(order_id)
        if got.status == status:
            return got
        assert time.monotonic() < deadline, f"order {order_id} is {got.status}, never {status}"
        await asyncio.sleep(0.1)


async def position(r: Recon, pid: str) -> Decimal:
    return {p["symbol"]: D(p["quantity"]) for p in await r.client.positions(pid)}.get("BTC/USDT", D(0))


def resting_buy(pid: str, quantity: Decimal, price: Decimal, venue: str) -> OrderRequest:
    return OrderRequest(portfolio_id=pid, symbol="BTC/USDT", side="buy", quantity=quantity, order_type="limit",
                        price=price, time_in_force="gtc", venue=venue)


def partial_at_the_sim(pid: str, ask: BookLevel) -> OrderRequest:
    """A GTC limit buy at the first ask for more than it holds: that level fills at once, the
    rest expires at the venue (routing sends IOC) and rests with routing."""
    quantity = (ask.quantity * 2).quantize(D("0.00001"), rounding=ROUND_FLOOR)
    return resting_buy(pid, quantity, ask.price, SIM)


async def test_reconcile_gives_no_correction_for_a_partially_filled_order_resting_with_routing(recon: Recon) -> None:
    r = recon
    await r.client.put_portfolio("pf-part", balances=FUNDS)
    ask = await best_ask(r)
    placed = await r.client.place_order(partial_at_the_sim("pf-part", ask))
    got = await until(r, placed.order_id, "partially_filled")
    assert got.filled_quantity == ask.quantity and len(got.fills) == 1

    assert placed.order_id not in await reconcile(r)
    after = await r.client.get_order(placed.order_id)
    assert after.status == "partially_filled" and after.fills == got.fills
    assert await position(r, "pf-part") == ask.quantity
    # still live: routing cancels its remainder
    await r.client.cancel_order(placed.order_id)
    await until(r, placed.order_id, "canceled")


async def test_reconcile_never_fails_an_order_resting_with_routing_at_the_in_process_paper_venue(
    recon: Recon,
) -> None:
    r = recon
    await r.client.put_portfolio("pf-rest", balances=FUNDS)
    # well below the market (inside risk's price band): nothing crosses, all of it rests
    placed = await r.client.place_order(resting_buy("pf-rest", D("0.01"), D("58000"), "paper"))
    await until(r, placed.order_id, "routed")
    assert placed.order_id not in await reconcile(r)
    assert (await r.client.get_order(placed.order_id)).status == "routed"
    await r.client.cancel_order(placed.order_id)
    await until(r, placed.order_id, "canceled")


async def drained(r: Recon, pid: str, event_type: EventType, group: str) -> bool:
    stream = r.bus.keys.stream(r.bus.keys.shard_of(pid), event_type)
    for g in await r.bus.redis.xinfo_groups(stream):
        name = g["name"].decode() if isinstance(g["name"], bytes) else g["name"]
        if name == group:
            return bool(g["pending"] == 0 and g.get("lag") == 0)
    return False


async def test_reconcile_adds_a_fill_the_store_missed_once_and_routing_s_late_copy_is_dropped(recon: Recon) -> None:
    r = recon
    pid = "pf-miss"
    await r.client.put_portfolio(pid, balances=FUNDS)
    ask = await best_ask(r)
    # the order stage is down while routing fills part of the order: the store misses the fill
    r.fleet.kill("routing")
    placed = await r.client.place_order(partial_at_the_sim(pid, ask))
    await until(r, placed.order_id, "created")
    r.fleet.kill("order")
    r.fleet.start(["routing"])
    sk = StateKeys(r.bus.keys)
    deadline = time.monotonic() + 30
    while not await r.bus.redis.hexists(sk.resting(pid), placed.order_id):
        assert time.monotonic() < deadline, "routing never routed the order"
        await asyncio.sleep(0.1)
    assert (await r.client.get_order(placed.order_id)).status == "created"

    assert (await reconcile(r)).get(placed.order_id) == ["order.executed"]  # exactly one correction
    got = await r.client.get_order(placed.order_id)
    assert got.status == "partially_filled" and got.filled_quantity == ask.quantity and len(got.fills) == 1
    assert placed.order_id not in await reconcile(r)  # a second run finds nothing

    # the order stage comes back and reads routing's own report of the same venue fill
    r.fleet.start(["order"])
    deadline = time.monotonic() + 30
    while not await drained(r, pid, EventType.ORDER_EXECUTED, "order"):
        assert time.monotonic() < deadline, "the order stage never caught up"
        await asyncio.sleep(0.2)
    again = await r.client.get_order(placed.order_id)
    assert again.status == "partially_filled" and again.fills == got.fills
    # the portfolio took the fill once too (routing's copy has the same fill id)
    assert await position(r, pid) == ask.quantity
    assert await r.bus.dead_letters(r.bus.keys.shard_of(pid)) == []
