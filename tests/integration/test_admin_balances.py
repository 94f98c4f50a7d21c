"""An admin ``PUT /v1/portfolios/{id}`` of balances while fills are being applied loses
neither: the final balance is the PUT's value plus the fills applied after it. The attack: the
PUT lands after the portfolio stage read the balances of its batch and before it commits, on
the stream path (an exclusive consumer) and on the workflow path (``Bus.apply``)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from decimal import Decimal
from typing import Any

from services.core.bus import Batch, Bus, Commit, Consumer
from services.core.events import Event, EventType, OrderExecuted
from services.core.hotstate import StateKeys, decode_balances
from services.gateway.models import PortfolioBody
from services.gateway.portfolios import Portfolios
from services.portfolio.stage import GROUP, PortfolioStage
from services.trading import Liquidity, Side
from services.workflows.stages import Stages
from tests.integration.conftest import eventually

D = Decimal


class PutWhileReading(PortfolioStage):
    """The portfolio stage, with an admin write landing right after it read its batch's state."""

    def __init__(self, bus: Bus, put: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(bus.redis, StateKeys(bus.keys))
        self.put: Callable[[], Awaitable[Any]] | None = put
        self.loads = 0

    async def load(self, items: list[tuple[Event[Any], Commit]]) -> Any:
        states = await super().load(items)
        self.loads += 1
        if self.put is not None:
            put, self.put = self.put, None
            await put()
        return states


def fill(pid: str) -> Event[Any]:
    return Event.new(
        OrderExecuted(
            order_id="0190e3c4-0000-7000-8000-00000000beef", client_order_id="c-1", symbol="BTC/USDT",
            side=Side.BUY, venue="paper", venue_order_id="v-1", fill_id="paper-7", quantity=D("1"), price=D("100"),
            commission=D("0.1"), commission_asset="USDT", liquidity=Liquidity.TAKER,
            cumulative_quantity=D("1"), leaves_quantity=D("0"),
        ),
        portfolio_id=pid,
    )


async def _setup(bus: Bus, pid: str) -> tuple[Portfolios, Callable[[], Awaitable[Any]]]:
    portfolios = Portfolios(bus)
    await portfolios.put(pid, PortfolioBody(balances={"USDT": "1000"}))

    async def put() -> None:
        await portfolios.put(pid, PortfolioBody(balances={"USDT": "5000"}))

    return portfolios, put


async def _balances(bus: Bus, pid: str) -> dict[str, Decimal]:
    return decode_balances(await bus.redis.hgetall(StateKeys(bus.keys).balances(pid)))


async def test_admin_put_when_it_lands_while_the_stream_stage_applies_a_fill_loses_neither(bus: Bus) -> None:
    pid = "admin-put-stream"
    _, put = await _setup(bus, pid)
    stage = PutWhileReading(bus, put)
    await bus.publish(fill(pid))
    consumer = Consumer(bus, GROUP, {EventType.ORDER_EXECUTED: Batch(stage.handle)}, exclusive=True)
    await consumer.start()
    try:
        async def applied() -> bool:
            return (await _balances(bus, pid)).get("BTC") == D("1")

        await eventually(applied, timeout=20)
    finally:
        consumer.stop()
        assert await consumer.wait(10)
    assert await _balances(bus, pid) == {"USDT": D("5000") - D("100") - D("0.1"), "BTC": D("1")}
    assert stage.loads >= 2  # the batch that read the old balances was redone


async def test_admin_put_when_it_lands_while_a_workflow_task_applies_a_fill_loses_neither(bus: Bus) -> None:
    pid = "admin-put-workflow"
    _, put = await _setup(bus, pid)
    stages = Stages(bus, [])
    stage = PutWhileReading(bus, put)
    stages.portfolio = stage
    await stages.run(GROUP, stage.handle, fill(pid))
    assert await _balances(bus, pid) == {"USDT": D("5000") - D("100") - D("0.1"), "BTC": D("1")}
    assert stage.loads == 2
