"""What can go wrong when an order is accepted or looked up, or a portfolio record written
(``services.intake.portfolios``), as domain errors.

Each carries what a caller needs to answer for it; the gateway turns them into its problem
documents in one place (``services.gateway.problems.problem_of``), the workflows catch them
or let a task fail on them. None of them is an HTTP answer."""

from __future__ import annotations

__all__ = [
    "ClientOrderIdConflict",
    "ConcurrentUpdate",
    "EventStoreUnavailable",
    "IntakeError",
    "InvalidOrder",
    "PortfolioNotFound",
]


class IntakeError(Exception):
    """Base of the intake's errors."""


class InvalidOrder(IntakeError):
    """A term of the order is invalid in a way its schema cannot express (a zero quantity, a
    limit order without a price). Nothing was written."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class PortfolioNotFound(IntakeError):
    """The order (``for_order``), or a write of the portfolio's record such as its trading
    state, names a portfolio that does not exist. Nothing was written."""

    def __init__(self, portfolio_id: str, *, for_order: bool = True) -> None:
        super().__init__(f"portfolio {portfolio_id} does not exist")
        self.portfolio_id = portfolio_id
        self.for_order = for_order


class ClientOrderIdConflict(IntakeError):
    """The ``client_order_id`` was already used, within the idempotency window, for an order
    with other terms. Nothing was written."""

    def __init__(self, client_order_id: str) -> None:
        super().__init__(f"client_order_id {client_order_id} was already used for a different order")
        self.client_order_id = client_order_id


class ConcurrentUpdate(IntakeError):
    """A portfolio's record kept changing while it was being written: every compare-and-set
    lost to another write. Nothing was written; the same write again may succeed."""

    def __init__(self, portfolio_id: str) -> None:
        super().__init__(f"portfolio {portfolio_id} kept changing")
        self.portfolio_id = portfolio_id


class EventStoreUnavailable(IntakeError):
    """An order that has left Redis had to be read from the event store, which cannot be
    reached or queried. ``detail`` says which."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail
