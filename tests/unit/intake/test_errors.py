"""The intake's domain errors, and the problem documents the gateway answers them with (the
same as when the intake, or the gateway's portfolio writes, raised them as problems itself)."""

from __future__ import annotations

import msgspec
import pytest

from services.gateway.problems import FieldError, from_problem, problem_of
from services.intake import (
    ClientOrderIdConflict,
    ConcurrentUpdate,
    EventStoreUnavailable,
    IntakeError,
    InvalidOrder,
    OrderBody,
    PortfolioNotFound,
    validate,
)
from services.trading import OrderType, Side


def body(**kw: object) -> OrderBody:
    values: dict[str, object] = dict(
        client_order_id="c-1", portfolio_id="pf-1", symbol="BTC/USDT", side=Side.BUY, type=OrderType.MARKET,
        quantity="1",
    )
    values.update(kw)
    return OrderBody(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("terms", "field", "message"),
    [
        (body(quantity="0"), "quantity", "must be a positive decimal"),
        (body(type=OrderType.LIMIT), "price", "is required for limit orders"),
        (body(price="1"), "price", "is not allowed for market orders"),
        (body(type=OrderType.LIMIT, price="0"), "price", "must be a positive decimal"),
    ],
)
def test_validate_when_a_term_is_invalid_raises_invalid_order_naming_the_field(
    terms: OrderBody, field: str, message: str
) -> None:
    with pytest.raises(InvalidOrder) as caught:
        validate(terms)
    assert (caught.value.field, caught.value.message) == (field, message)


def test_validate_when_the_terms_are_valid_returns_quantity_and_price() -> None:
    quantity, price = validate(body(type=OrderType.LIMIT, quantity="0.50", price="100.5"))
    assert (str(quantity), str(price)) == ("0.50", "100.5")


@pytest.mark.parametrize(
    ("error", "status", "code", "detail", "errors"),
    [
        (InvalidOrder("price", "is required for limit orders"), 422, "validation_error",
         "price: is required for limit orders", [{"field": "price", "message": "is required for limit orders"}]),
        (PortfolioNotFound("pf-9"), 404, "portfolio_not_found",
         "portfolio pf-9 does not exist (create it with PUT /v1/portfolios/pf-9)", None),
        (PortfolioNotFound("pf-9", for_order=False), 404, "portfolio_not_found", "portfolio pf-9 does not exist", None),
        (ConcurrentUpdate("pf-9"), 409, "concurrent_update", "the portfolio kept changing; try again", None),
        (ClientOrderIdConflict("c-1"), 409, "client_order_id_conflict",
         "client_order_id c-1 was already used for a different order", None),
        (EventStoreUnavailable("the event store cannot be queried"), 503, "event_store_unavailable",
         "the event store cannot be queried", None),
    ],
)
def test_problem_of_when_the_intake_refuses_answers_the_problem_document(
    error: IntakeError, status: int, code: str, detail: str, errors: list[dict[str, str]] | None
) -> None:
    problem = problem_of(error)
    response = from_problem(problem)
    document = msgspec.json.decode(response.body)
    assert response.status_code == status and response.media_type == "application/problem+json"
    assert document == {
        "type": f"/problems/{code}", "title": document["title"], "status": status, "detail": detail, "code": code,
        **({"errors": errors} if errors is not None else {}),
    }
    assert problem.errors == (None if errors is None else [FieldError(**e) for e in errors])
