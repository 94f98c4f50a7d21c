"""Names and inputs of the workflows, shared by the worker and the clients that start them
(the gateway starts runs from a stub of the same name and input, without the task code)."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["CHILD_ORDER_PREFIX", "PLACE_ORDER", "REBALANCE", "PlaceOrderInput", "RebalanceInput"]

PLACE_ORDER = "trading.place_order"
REBALANCE = "portfolio.rebalance"
RISK_MONITOR = "risk.monitor"
MARKET_DATA = "market_data.process"
RECONCILE = "orders.reconcile"

CHILD_ORDER_PREFIX = "rb-"
"""How the client order ids of a rebalance's child orders begin (``rb-<run id>-...``): the only
orders a workflow waits for, so the only ones the bridge tells Hatchet about."""


class PlaceOrderInput(BaseModel):
    """One order for the durable path: its ``order.requested`` event, as the gateway wrote it
    (JSON, route ``workflow``), and its portfolio."""

    portfolio_id: str
    order_id: str
    event: str
    faults: dict[str, int] = Field(
        default_factory=dict,
        description="step name -> how many of the task's attempts fail on purpose at that step (honoured "
        "only by a worker with ZVT_WORKFLOWS_FAULTS_ENABLED, for tests)",
    )


class RebalanceInput(BaseModel):
    portfolio_id: str
    targets: dict[str, str]  # symbol -> target weight of the portfolio's equity (decimal string)
    quote: str = "USDT"
    all_or_nothing: bool = False
    requested_by: str = ""
    faults: dict[str, int] = Field(default_factory=dict)
