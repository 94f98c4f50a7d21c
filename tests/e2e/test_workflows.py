"""``trading.place_order`` on a real Hatchet engine, driven through the gateway
(``?durable=true``) and by starting runs directly: the happy path, a task that fails once and
succeeds on retry, retries exhausted (on-failure: ``workflow.failed``, the order failed, nothing
left reserved), and a worker killed with -9 in the middle of ``execute_order`` whose run
completes on a second worker with no duplicate order or fill."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

import pytest
from hatchet_sdk import EmptyModel, Hatchet

from devstack.fleet import Fleet, logged
from services.client import AsyncClient, OrderRequest
from services.core.bus import Bus
from services.core.hotstate import StateKeys
from services.core.redisconn import open_redis
from services.core.settings import BusSettings
from services.intake import IntakeSettings, OrderBody, OrderDesk, validate
from services.gateway.workflows import WorkflowDesk
from services.workflows.client import hatchet_client
from services.workflows.contracts import MARKET_DATA, RECONCILE, RISK_MONITOR
from services.workflows.reconcile import ReconcileInput
from services.workflows.monitor import MarketSnapshot
from services.workflows.place_order import STEPS
from services.workflows.settings import HatchetSettings
from tests.e2e.conftest import SHARDS, stack_env
from tests.integration.conftest import Target, delete_namespace

D = Decimal
ADMIN = "wf-admin-" + uuid.uuid4().hex
FUNDS = {"USDT": D("1000000"), "BTC": D("10"), "ETH": D("100"), "SOL": D("1000")}


@dataclass
class Durable:
    env: dict[str, str]
    fleet: Fleet
    client: AsyncClient
    bus: Bus
    desk: OrderDesk
    workflows: WorkflowDesk
    hatchet: Hatchet


@pytest.fixture
async def durable(request: pytest.FixtureRequest, postgres_dsn: str, hatchet_env: dict[str, str],
                  tmp_path: Path) -> AsyncIterator[Durable]:
    # single Redis unless a test asks for both (the stages' code is the same on both; the
    # happy path proves the workflow side on a cluster too)
    topology = getattr(request, "param", "single")
    url = request.getfixturevalue("redis_single_url" if topology == "single" else "redis_cluster_url")
    target = Target(topology, url)
    namespace = f"w{uuid.uuid4().hex[:10]}"
    env = stack_env(
        target, namespace, postgres_dsn, **hatchet_env,
        ZVT_GATEWAY_ADMIN_API_KEY=ADMIN, ZVT_HATCHET_NAMESPACE=f"{namespace}_",
        ZVT_WORKFLOWS_FAULTS_ENABLED="true", ZVT_ROUTING_PAPER_LATENCY_MS="1500", ZVT_WORKFLOWS_RISK_MONITOR_CRON="",
        ZVT_WORKFLOWS_RECONCILE_CRON="", ZVT_WORKFLOWS_SLOTS="20", ZVT_WORKFLOWS_WORKER_NAME=f"{namespace}-w",
    )
    fleet = Fleet(env, log_dir=tmp_path / "logs", start_timeout=60)
    # the stream stages too: a rebalance's children go by the fast path
    procs = fleet.start(["risk", "order", "routing", "portfolio", "recorder", "gateway", "workflows"])
    gateway = next(p for p in procs if p.name == "gateway")
    port = await asyncio.to_thread(logged, gateway, "gateway listening", "port")
    client = AsyncClient(f"http://127.0.0.1:{port}", ADMIN)
    redis = await open_redis(target.core())
    bus = Bus(redis, BusSettings(namespace=namespace, shards=SHARDS))
    hatchet = HatchetSettings(
        token=hatchet_env["ZVT_HATCHET_TOKEN"], host_port=hatchet_env["ZVT_HATCHET_HOST_PORT"],
        tls_strategy="none", namespace=f"{namespace}_",
    )
    try:
        desk = OrderDesk(bus, IntakeSettings(orders_index_max=1000, idempotency_ttl_s=3600))
        yield Durable(env, fleet, client, bus, desk, WorkflowDesk(bus, hatchet), hatchet_client(hatchet))
    finally:
        await client.aclose()
        fleet.stop()
        await delete_namespace(redis, namespace)
        await redis.aclose()


def order(pid: str, qty: str = "0.01", **kw: Any) -> OrderRequest:
    return OrderRequest(portfolio_id=pid, symbol="BTC/USDT", side="buy", quantity=D(qty), **kw)


async def start_with_faults(d: Durable, pid: str, faults: dict[str, int], qty: str = "0.01") -> tuple[str, str]:
    """Accept an order as the gateway does and start its run with injected faults."""
    body = OrderBody(client_order_id=uuid.uuid4().hex, portfolio_id=pid, symbol="BTC/USDT", side="buy",
                     type="market", quantity=qty)
    quantity, price = validate(body)
    submitted = await d.desk.submit(body, quantity, price, "test", durable=True)
    assert submitted.event is not None
    run_id = await d.workflows.start_order(submitted.record, submitted.event, faults=faults)
    return submitted.record.order_id, run_id


async def finished_run(d: Durable, run_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        run = await d.client.workflow(run_id)
        if run["status"] in ("completed", "failed"):
            return run
        await asyncio.sleep(0.2)
    raise AssertionError(f"run {run_id} did not finish: {await d.client.workflow(run_id)}")


async def reservations(d: Durable, pid: str) -> dict[Any, Any]:
    raw: Any = await d.bus.redis.hgetall(StateKeys(d.bus.keys).reservations(pid))
    return dict(raw)


@pytest.mark.parametrize("durable", ["single", "cluster"], indirect=True)
async def test_durable_order_through_the_gateway_fills_and_reads_like_the_fast_path(durable: Durable) -> None:
    c = durable.client
    await c.put_portfolio("pf-w", balances=FUNDS)
    request = order("pf-w")
    placed = await c.place_order(request, wait=30, durable=True)
    assert placed.status == "filled" and placed.filled_quantity == D("0.01") and placed.fills
    again = await c.place_order(request, durable=True)  # idempotent on client_order_id
    assert again.order_id == placed.order_id and again.status == "filled"
    fetched = await c.get_order(placed.order_id)
    assert fetched == placed or (fetched.order_id, fetched.status, fetched.fills) == (placed.order_id, "filled", placed.fills)
    positions = {p["symbol"]: p for p in await c.positions("pf-w")}
    assert D(positions["BTC/USDT"]["quantity"]) == D("0.01")
    assert await reservations(durable, "pf-w") == {}

    # the audit trail: every event of the order came by the workflow route, started to completed
    deadline = time.monotonic() + 30
    while True:
        trail = await c.events(placed.order_id)
        types = [e["event"]["event_type"] for e in trail]
        if "workflow.completed" in types or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    assert types[0] == "order.requested" and "workflow.started" in types and types[-1] in (
        "workflow.completed", "portfolio.updated", "position.updated")
    for expected in ("order.validated", "order.created", "exchange.routed", "order.executed", "position.updated"):
        assert expected in types, types
    assert {e["event"]["route"] for e in trail} == {"workflow"}
    run_id = next(e["event"]["payload"]["run_id"] for e in trail if e["event"]["event_type"] == "workflow.started")
    run = await c.workflow(run_id)
    assert run["status"] == "completed" and run["result"]["status"] == "filled"
    assert run["portfolio_id"] == "pf-w"
    # the five steps, each with its start, end and result, in the run and in its output
    assert [s["name"] for s in run["steps"]] == list(STEPS)
    for step in run["steps"]:
        assert step["status"] == "completed" and step["ended_at"] >= step["started_at"] and step["ms"] >= 0, step
    by_name = {s["name"]: s for s in run["steps"]}
    assert by_name["check_risk_limits"]["events"] == ["order.validated"]
    assert by_name["create_order_record"]["events"] == ["order.created"]
    assert "order.executed" in by_name["execute_order"]["events"]
    assert "position.updated" in by_name["update_portfolio"]["events"]
    assert [s["name"] for s in run["result"]["steps"]] == list(STEPS)


async def test_durable_limit_when_it_rests_fills_later_through_the_routing_service(durable: Durable) -> None:
    """A GTC limit placed by ``trading.place_order`` rests; the run ends with it routed. The
    worker's in-process paper venue is nobody's to follow, so the routing service places the
    rest at its own and reports the fill once the market comes to its price."""
    d = durable
    await d.client.put_portfolio("pf-wr", balances=FUNDS)
    marks = StateKeys(d.bus.keys).marks()
    await d.bus.redis.hset(marks, "BTC/USDT", "60000")
    placed = await d.client.place_order(order("pf-wr", order_type="limit", price=D("59000")), wait=30, durable=True)
    assert placed.status == "routed" and not placed.fills
    await d.bus.redis.hset(marks, "BTC/USDT", "58900")
    deadline = time.monotonic() + 60
    while (got := await d.client.get_order(placed.order_id)).status != "filled":
        assert time.monotonic() < deadline, got
        await asyncio.sleep(0.3)
    assert got.filled_quantity == D("0.01") and len(got.fills) == 1 and got.fills[0].price == D("59000")
    while not (positions := {p["symbol"]: p for p in await d.client.positions("pf-wr")}).get("BTC/USDT"):
        assert time.monotonic() < deadline, "the position never moved"
        await asyncio.sleep(0.3)
    assert D(positions["BTC/USDT"]["quantity"]) == D("0.01")
    while await reservations(d, "pf-wr"):
        assert time.monotonic() < deadline, "the reservation was never released"
        await asyncio.sleep(0.3)


async def test_a_task_that_fails_once_succeeds_on_retry(durable: Durable) -> None:
    await durable.client.put_portfolio("pf-r", balances=FUNDS)
    order_id, run_id = await start_with_faults(durable, "pf-r", {"check_risk_limits": 1, "execute_order": 1})
    run = await finished_run(durable, run_id)
    assert run["status"] == "completed", run
    got = await durable.client.get_order(order_id)
    assert got.status == "filled" and len(got.fills) == 1


async def test_retries_exhausted_fail_the_order_and_release_its_reservation(durable: Durable) -> None:
    await durable.client.put_portfolio("pf-x", balances=FUNDS)
    order_id, run_id = await start_with_faults(durable, "pf-x", {"execute_order": 10})
    run = await finished_run(durable, run_id, timeout=120)
    assert run["status"] == "failed" and run["step"] == "execute_order" and "execute_order" in run["error"], run
    got = await durable.client.get_order(order_id)
    assert got.status == "failed" and not got.fills
    assert await reservations(durable, "pf-x") == {}
    deadline = time.monotonic() + 30
    while "workflow.failed" not in [e["event"]["event_type"] for e in await durable.client.events(order_id)]:
        assert time.monotonic() < deadline, "no workflow.failed recorded"
        await asyncio.sleep(0.3)


async def test_worker_killed_mid_place_order_completes_on_a_second_worker_without_duplicates(durable: Durable) -> None:
    d = durable
    await d.client.put_portfolio("pf-k", balances=FUNDS)
    # the fixture's worker has a slow venue (ZVT_ROUTING_PAPER_LATENCY_MS), so the run can be
    # caught inside execute_order
    slow = d.fleet.live("workflows")[0]
    order_id, run_id = await start_with_faults(d, "pf-k", {})
    deadline = time.monotonic() + 60
    while (await d.client.get_order(order_id)).status != "created":
        assert time.monotonic() < deadline, "the run never reached execute_order"
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # inside the venue call
    mid = await d.client.workflow(run_id)
    assert mid["status"] == "running" and mid["step"] == "execute_order", mid
    assert [s["name"] for s in mid["steps"]] == list(STEPS[:4]) and mid["steps"][-1]["status"] == "running", mid
    helpers = _children(slow.popen.pid)  # the SDK's action-listener process, at least
    assert helpers, "the worker has no child processes"
    d.fleet.kill("workflows")
    assert not slow.alive
    # none outlives it: a listener left behind would keep taking the run's retries and never run them
    deadline = time.monotonic() + 10
    while alive := {pid for pid in helpers if _exists(pid)}:
        assert time.monotonic() < deadline, f"processes of the killed worker still running: {alive}"
        await asyncio.sleep(0.1)
    d.fleet.start(["workflows"], env={"ZVT_ROUTING_PAPER_LATENCY_MS": "0"})  # a healthy worker takes it over
    run = await finished_run(d, run_id, timeout=150)
    assert run["status"] == "completed", run
    got = await d.client.get_order(order_id)
    assert got.status == "filled" and len(got.fills) == 1 and got.filled_quantity == D("0.01")
    positions = {p["symbol"]: p for p in await d.client.positions("pf-k")}
    assert D(positions["BTC/USDT"]["quantity"]) == D("0.01")
    assert await reservations(d, "pf-k") == {}
    # one order.executed per fill id, in the stream the portfolio reads
    deadline = time.monotonic() + 30
    while True:
        trail = [e["event"] for e in await d.client.events(order_id)]
        if any(e["event_type"] == "workflow.completed" for e in trail) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.3)
    fills = [e["payload"]["fill_id"] for e in trail if e["event_type"] == "order.executed"]
    assert len(fills) == len(set(fills)) == 1
    assert sum(e["event_type"] == "order.created" for e in trail) == 1


def _children(pid: int) -> set[int]:
    kids = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                kids.add(int(entry.name))
    return kids


def _exists(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def positions_of(d: Durable, pid: str) -> dict[str, Decimal]:
    return {p["symbol"]: D(p["quantity"]) for p in await d.client.positions(pid)}


async def test_rebalance_places_children_waits_for_them_and_records_portfolio_rebalanced(durable: Durable) -> None:
    c = durable.client
    await c.put_portfolio("pf-rb", balances={"USDT": D("100000")})
    run_id = await c.rebalance("pf-rb", {"BTC/USDT": "0.1", "ETH/USDT": "0.05"})
    run = await finished_run(durable, run_id, timeout=120)
    assert run["status"] == "completed", run
    children = run["result"]["child_order_ids"]
    assert len(children) == 2 and set(run["result"]["statuses"].values()) == {"filled"}
    held = await positions_of(durable, "pf-rb")
    # about 10 % and 5 % of 100,000 USDT at the marks (rounded down to the quantity step)
    assert D("0.15") < held["BTC/USDT"] <= D("0.17") and D("1.6") < held["ETH/USDT"] <= D("1.7"), held
    deadline = time.monotonic() + 30
    while "portfolio.rebalanced" not in [e["event"]["event_type"] for e in await c.events(run_id)]:
        assert time.monotonic() < deadline, "no portfolio.rebalanced recorded"
        await asyncio.sleep(0.3)


async def test_rebalance_with_a_rejected_child_compensates_and_leaves_no_open_child(durable: Durable) -> None:
    c = durable.client
    # the BTC leg (50,000) is over the notional limit: risk rejects it; the ETH leg fills
    await c.put_portfolio("pf-rx", balances={"USDT": D("100000")}, limits={"max_notional_per_order": "20000"})
    run_id = await c.rebalance("pf-rx", {"BTC/USDT": "0.5", "ETH/USDT": "0.1"}, all_or_nothing=True)
    run = await finished_run(durable, run_id, timeout=120)
    assert run["status"] == "failed" and "did not fill" in run["error"], run
    rb_orders = [o for o in await c.orders("pf-rx", limit=50) if o.client_order_id.startswith("rb-")]
    deadline = time.monotonic() + 30
    while any(o.status not in ("filled", "rejected", "canceled", "failed", "expired") for o in rb_orders):
        assert time.monotonic() < deadline, f"open child orders left: {rb_orders}"
        await asyncio.sleep(0.3)
        rb_orders = [o for o in await c.orders("pf-rx", limit=50) if o.client_order_id.startswith("rb-")]
    statuses = sorted(o.status for o in rb_orders)
    assert "rejected" in statuses and statuses.count("filled") == 2, statuses  # the ETH leg and its unwind
    deadline = time.monotonic() + 30
    while (await positions_of(durable, "pf-rx")).get("ETH/USDT", D(0)) != 0:
        assert time.monotonic() < deadline, await positions_of(durable, "pf-rx")
        await asyncio.sleep(0.3)


async def run_workflow(d: Durable, name: str, payload: Any) -> tuple[str, dict[str, Any]]:
    stub = d.hatchet.workflow(name=name, input_validator=type(payload))
    ref = await stub.aio_run_no_wait(payload)
    return str(ref.workflow_run_id), await asyncio.wait_for(ref.aio_result(), 60)


async def test_market_data_moves_marks_and_risk_monitor_tightens_on_drawdown(durable: Durable) -> None:
    d = durable
    await d.client.put_portfolio("pf-dd", balances={"USDT": D("0"), "BTC": D("1")})
    _, first = await run_workflow(d, RISK_MONITOR, EmptyModel())
    assert first["assess_portfolios"]["portfolios"] == 1 and not first["assess_portfolios"]["breaches"]
    mark = D((await d.bus.redis.hget(StateKeys(d.bus.keys).marks(), "BTC/USDT")).decode())

    async def move(to: Decimal, seq: str) -> None:
        _, out = await run_workflow(d, MARKET_DATA, MarketSnapshot(
            venue="sim", symbol="BTC/USDT", bid=str(to - 1), ask=str(to + 1), sequence=seq,
            bids=[(str(to - 1), "2")], asks=[(str(to + 1), "3")]))
        assert D(out["process"]["mark"]) == to and out["process"]["events"] == 2

    await move(mark * D("0.85"), "1")  # 15 % down: REDUCING
    run_id, second = await run_workflow(d, RISK_MONITOR, EmptyModel())
    (breach,) = second["assess_portfolios"]["breaches"]
    assert breach["state"] == "REDUCING" and D(breach["drawdown"]) == D("0.15")
    assert (await d.client.get_portfolio("pf-dd"))["trading_state"] == "REDUCING"
    deadline = time.monotonic() + 30
    while "risk.breached" not in [e["event"]["event_type"] for e in await d.client.events(run_id)]:
        assert time.monotonic() < deadline, "no risk.breached recorded"
        await asyncio.sleep(0.3)

    await move(mark * D("0.7"), "2")  # 30 % down: HALTED
    _, third = await run_workflow(d, RISK_MONITOR, EmptyModel())
    assert [b["state"] for b in third["assess_portfolios"]["breaches"]] == ["HALTED"]
    assert (await d.client.get_portfolio("pf-dd"))["trading_state"] == "HALTED"
    # a halted portfolio's new orders are refused by risk
    refused = await d.client.place_order(order("pf-dd"), wait=20)
    assert refused.status == "rejected" and refused.reject_code == "TRADING_HALTED"


async def test_reconcile_finds_an_order_the_store_missed_at_the_venue_and_fixes_it(
    durable: Durable, tmp_path: Path
) -> None:
    from devstack.fleet import start_venue
    from services.trading import OrderType, Side, TimeInForce
    from services.venues.base import VenueOrderRequest
    from services.venues.ccxt import CcxtVenue, CcxtVenueConfig, close_shared_clients

    d = durable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    sim = start_venue("simrc", port, tmp_path / "venue")
    try:
        # the worker trades on (and reconciles with) the simulated venue
        d.fleet.kill("workflows", signal.SIGTERM)
        d.fleet.start(["workflows"], env={"ZVT_ROUTING_VENUES": f"simrc=binance@http://127.0.0.1:{port}"})
        # routing is down: the order is created in the store, and never routed
        d.fleet.kill("routing")
        await d.client.put_portfolio("pf-rc", balances=FUNDS)
        placed = await d.client.place_order(order("pf-rc"))
        deadline = time.monotonic() + 30
        while (await d.client.get_order(placed.order_id)).status != "created":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        # ... yet the venue has it, filled (say routing's submit went out and its answer was lost)
        venue = CcxtVenue(CcxtVenueConfig(name="simrc", api_key="sim-key", secret="sim-secret",
                                          api_url=f"http://127.0.0.1:{port}"))
        try:
            at_venue = await venue.submit(VenueOrderRequest(
                client_order_id=placed.order_id, symbol="BTC/USDT", side=Side.BUY, order_type=OrderType.MARKET,
                quantity=D("0.01"), price=None, time_in_force=TimeInForce.IOC))
        finally:
            await close_shared_clients()
        assert at_venue.filled_quantity == D("0.01")

        _, out = await run_workflow(d, RECONCILE, ReconcileInput(grace_s=0))
        fixed = {f["order_id"]: f["corrections"] for f in out["reconcile"]["fixed"]}
        assert fixed[placed.order_id] == ["order.executed"], out
        got = await d.client.get_order(placed.order_id)
        assert got.status == "filled" and got.filled_quantity == D("0.01") and len(got.fills) == 1
        assert (await positions_of(d, "pf-rc"))["BTC/USDT"] == D("0.01")
        assert await reservations(d, "pf-rc") == {}
        # a second run finds nothing left to fix
        _, again = await run_workflow(d, RECONCILE, ReconcileInput(grace_s=0))
        assert placed.order_id not in {f["order_id"] for f in again["reconcile"]["fixed"]}
    finally:
        sim.terminate()
        sim.wait(timeout=10)
