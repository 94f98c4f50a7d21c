"""The shards' open-order indexes (issue 12.4), on real Redis, single and cluster: the order
stage adds an order when it creates it and takes it out, with an expiry on its record, in the
commit that finishes it; reconciliation finds the open orders through the index (no key
scan), oldest first, only those that have not moved since its cutoff."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

from services.core.bus import Bus, Commit
from services.core.events import Event, OrderCanceled, OrderValidated, utcnow
from services.core.hotstate import StateKeys, load
from services.core.inject import OrderSpec, inject_orders
from services.order.stage import EXPIRED_REASON, GROUP, OrderStage
from services.trading import Order, OrderType, Side
from services.trading.orders import OrderStatus
from services.workflows.reconcile import open_orders

D = Decimal
RETENTION_S = 600


async def _handle(bus: Bus, stage: OrderStage, event: Event[Any]) -> None:
    """``event`` through the order stage and its commit (as a workflow task commits it)."""
    shard = bus.keys.shard_of(event.portfolio_id)
    version = await bus.state_version(GROUP, shard)
    commit = Commit(bus.keys, shard)
    await stage.handle([(event, commit)])
    assert commit.error is None, commit.error
    assert await bus.apply(GROUP, event, commit, version) is not None


def _validated(record: Order) -> Event[Any]:
    return Event.new(
        OrderValidated(
            order_id=record.order_id, client_order_id=record.client_order_id, symbol=record.symbol, side=record.side,
            order_type=record.order_type, quantity=record.quantity,
        ),
        portfolio_id=record.portfolio_id, correlation_id=record.order_id,
    )


def _expired(record: Order) -> Event[Any]:
    return Event.new(
        OrderCanceled(
            order_id=record.order_id, client_order_id=record.client_order_id, reason=EXPIRED_REASON,
            filled_quantity=D(0), canceled_quantity=record.quantity,
        ),
        portfolio_id=record.portfolio_id, correlation_id=record.order_id,
    )


async def test_open_orders_when_created_are_indexed_and_found_by_reconcile_until_they_finish(bus: Bus) -> None:
    sk = StateKeys(bus.keys)
    stage = OrderStage(bus.redis, sk, terminal_retention_s=RETENTION_S)
    portfolios = [f"oo-{i}" for i in range(6)]  # several shards
    specs = [OrderSpec(pid, "BTC/USDT", Side.BUY, D("0.1"), OrderType.MARKET) for pid in portfolios for _ in range(2)]
    ids = await inject_orders(bus, specs)
    refs = [(s.portfolio_id, oid) for s, oid in zip(specs, ids, strict=True)]

    async def record(pid: str, oid: str) -> Order:
        return load(Order, await bus.redis.get(sk.order(pid, oid)))

    later = utcnow() + dt.timedelta(seconds=1)
    assert [r async for r in open_orders(bus.redis, sk, later)] == []  # requested only: not open yet

    for pid, oid in refs:
        await _handle(bus, stage, _validated(await record(pid, oid)))
    for pid, oid in refs:
        shard = bus.keys.shard_of(pid)
        assert await bus.redis.zscore(sk.open_orders(shard), oid) is not None
        assert int(await bus.redis.ttl(sk.order(pid, oid))) == -1  # an open order never expires

    later = utcnow() + dt.timedelta(seconds=1)
    found = [r async for r in open_orders(bus.redis, sk, later)]
    assert sorted(r.order_id for r in found) == sorted(ids)
    assert all(r.status is OrderStatus.CREATED for r in found)
    # the cutoff: none of them has been still for an hour
    assert [r async for r in open_orders(bus.redis, sk, utcnow() - dt.timedelta(hours=1))] == []

    finished = refs[::2]
    for pid, oid in finished:
        await _handle(bus, stage, _expired(await record(pid, oid)))
    for pid, oid in finished:
        shard = bus.keys.shard_of(pid)
        assert await bus.redis.zscore(sk.open_orders(shard), oid) is None
        assert 0 < int(await bus.redis.ttl(sk.order(pid, oid))) <= RETENTION_S
        assert (await record(pid, oid)).status is OrderStatus.EXPIRED

    later = utcnow() + dt.timedelta(seconds=1)
    still = {r.order_id for r in [r async for r in open_orders(bus.redis, sk, later)]}
    assert still == {oid for _, oid in refs[1::2]}
    total = sum([int(await bus.redis.zcard(sk.open_orders(s))) for s in range(bus.keys.shards)])
    assert total == len(refs) - len(finished)
