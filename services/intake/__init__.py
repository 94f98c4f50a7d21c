"""The intake: accepting an order onto the pipeline, whoever asks.

Validates the terms (``terms``), writes the order's record, the portfolio's index entry and
its ``order.requested`` in one script in the portfolio's slot, idempotent on the client order
id within a window (``desk``), and looks orders up and lists them, live or rebuilt from the
event store; it also writes portfolio records, their balances and trading state, each with
its ``portfolio.updated`` (``portfolios``). The gateway (``POST /v1/orders``) and the
workflows (a rebalance's child orders) both accept orders through it, with one
``IntakeSettings``, and both write portfolio records through it (the admin API;
``risk.monitor`` tightening a trading state).

A package of its own rather than part of ``services/core``: accepting an order is a step of
the trading pipeline, the first one, not platform plumbing; it reads like its job like the
stage packages do (it decides what the order says and emits ``order.requested``), it just has
no process of its own. It sits below the gateway and the workflows and imports neither; its
errors (``errors``) are domain errors, which the gateway answers as problem documents
(``services.gateway.problems.problem_of``)."""

from services.intake.desk import OrderDesk, Submitted
from services.intake.errors import (
    ClientOrderIdConflict,
    ConcurrentUpdate,
    EventStoreUnavailable,
    IntakeError,
    InvalidOrder,
    PortfolioNotFound,
)
from services.intake.portfolios import PortfolioBook
from services.intake.settings import IntakeSettings
from services.intake.terms import OrderBody, validate

__all__ = [
    "ClientOrderIdConflict",
    "ConcurrentUpdate",
    "EventStoreUnavailable",
    "IntakeError",
    "IntakeSettings",
    "InvalidOrder",
    "OrderBody",
    "OrderDesk",
    "PortfolioBook",
    "PortfolioNotFound",
    "Submitted",
    "validate",
]
