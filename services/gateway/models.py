"""The public API's bodies, as msgspec structs: decoded and validated in one pass, and the
source of the OpenAPI schemas (``schema_components``), so the document says what the code does."""

from __future__ import annotations

import datetime as dt
import enum
import re
from decimal import Decimal
from typing import Annotated, Any, Literal, TypeVar

import msgspec

from services.gateway.problems import FieldError, Problem, ProblemBody, problem_of
from services.intake import terms
from services.intake.errors import InvalidOrder
from services.intake.terms import DECIMAL, ID, SYMBOL, DecimalString, Id, OrderBody, Symbol, exact
from services.trading import OrderType, Side, TimeInForce, TradingState
from services.trading.orders import Order, OrderStatus

__all__ = [
    "ApiKeyBody",
    "ApiKeyCreated",
    "EventsPage",
    "LimitsBody",
    "LimitsView",
    "OrderAccepted",
    "OrderBody",
    "OrderView",
    "OrdersPage",
    "PortfolioBody",
    "PortfolioView",
    "PositionView",
    "PositionsView",
    "Scope",
    "TradingStateBody",
    "decode_body",
    "openapi_components",
    "order_view",
    "positive_decimal",
]

# Patterns: each is written twice from one body, ``^body$`` (JSON Schema, FastAPI parameters)
# and ``^body\Z`` (msgspec); why, in ``services.intake.terms``, which owns the order's fields.
_ASSET = r"[A-Z0-9]{2,12}"
_NAME = r"[A-Za-z0-9 ._:-]{1,64}"

ID_PATTERN = f"^{ID}$"
"""An id as JSON Schema and FastAPI parameters read it (``$``: end of input)."""
SYMBOL_PATTERN = f"^{SYMBOL}$"
ASSET_PATTERN = f"^{_ASSET}$"
DECIMAL_PATTERN = f"^{DECIMAL}$"
NAME_PATTERN = f"^{_NAME}$"


Asset = Annotated[str, msgspec.Meta(pattern=exact(_ASSET), description="An asset, e.g. `USDT`")]
Name = Annotated[str, msgspec.Meta(min_length=1, max_length=64, pattern=exact(_NAME))]


class Scope(enum.StrEnum):
    TRADE = "trade"
    READ = "read"
    ADMIN = "admin"


# -- requests ---------------------------------------------------------------------------------


class LimitsBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Risk limits; a field left out keeps its current (or default) value."""

    max_notional_per_order: DecimalString | None = None
    max_position_per_symbol: DecimalString | None = None
    price_band: DecimalString | None = None
    max_orders_per_window: Annotated[int, msgspec.Meta(ge=1, le=10_000_000)] | None = None
    window_seconds: Annotated[int, msgspec.Meta(ge=1, le=86_400)] | None = None


class PortfolioBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Create or update a portfolio; `balances` replaces the portfolio's balances."""

    base_currency: Asset = "USDT"
    balances: Annotated[dict[Asset, DecimalString], msgspec.Meta(max_length=256)] = {}
    limits: LimitsBody | None = None


class RebalanceBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Target weights of the portfolio's equity (in `quote`), by symbol; they add up to 1 at most,
    the rest stays in `quote`. `all_or_nothing`: if a child order fails, unwind the filled ones."""

    targets: Annotated[dict[Symbol, DecimalString], msgspec.Meta(min_length=1, max_length=64)]
    quote: Asset = "USDT"
    all_or_nothing: bool = False


class WorkflowRunAccepted(msgspec.Struct, frozen=True, kw_only=True):
    run_id: str
    workflow: str
    status: str


class TradingStateBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    state: TradingState


class ApiKeyBody(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A new API key: the portfolios it may act on (`"*"`: all) and its scopes."""

    name: Name
    portfolios: Annotated[list[Id], msgspec.Meta(max_length=1000)] | Literal["*"]
    scopes: Annotated[list[Scope], msgspec.Meta(min_length=1, max_length=3)]


# -- responses --------------------------------------------------------------------------------


class OrderAccepted(msgspec.Struct, frozen=True, kw_only=True):
    """An accepted order. Answers that carry the full order carry these fields too."""

    order_id: str
    client_order_id: str
    status: OrderStatus
    correlation_id: str


class FillView(msgspec.Struct, frozen=True, kw_only=True):
    fill_id: str
    quantity: Decimal
    price: Decimal
    commission: Decimal
    commission_asset: str
    liquidity: str
    venue: str
    at: dt.datetime


class OrderView(msgspec.Struct, frozen=True, kw_only=True):
    """An order as the platform knows it now."""

    order_id: str
    client_order_id: str
    status: OrderStatus
    correlation_id: str
    portfolio_id: str
    symbol: str
    side: Side
    type: OrderType
    quantity: Decimal
    price: Decimal | None
    time_in_force: TimeInForce
    requested_venue: str | None
    venue: str | None
    filled_quantity: Decimal
    avg_fill_price: Decimal | None
    commission: Decimal
    commission_asset: str | None
    reject_code: str | None
    reject_reason: str | None
    fills: list[FillView]
    created_at: dt.datetime
    updated_at: dt.datetime


class OrdersPage(msgspec.Struct, frozen=True, kw_only=True):
    portfolio_id: str
    orders: list[OrderView]


class LimitsView(msgspec.Struct, frozen=True, kw_only=True):
    max_notional_per_order: Decimal
    max_position_per_symbol: Decimal
    price_band: Decimal
    max_orders_per_window: int
    window_seconds: int


class PortfolioView(msgspec.Struct, frozen=True, kw_only=True):
    portfolio_id: str
    base_currency: str
    balances: dict[str, Decimal]
    limits: LimitsView
    trading_state: TradingState
    created_at: dt.datetime
    updated_at: dt.datetime


class PositionView(msgspec.Struct, frozen=True, kw_only=True):
    """`unrealized_pnl` is null while there is no mark price for the symbol."""

    symbol: str
    quantity: Decimal
    average_price: Decimal
    realized_pnl: Decimal
    unrealized_pnl: Decimal | None
    mark: Decimal | None
    updated_at: dt.datetime | None


class PositionsView(msgspec.Struct, frozen=True, kw_only=True):
    portfolio_id: str
    positions: list[PositionView]


class ApiKeyCreated(msgspec.Struct, frozen=True, kw_only=True):
    """A new key. `secret` is shown only in this answer; only its hash is stored."""

    key_id: str
    name: str
    portfolios: list[str] | Literal["*"]
    scopes: list[Scope]
    created_at: dt.datetime
    secret: str


class StoredEventView(msgspec.Struct, frozen=True, kw_only=True):
    seq: int
    recorded_at: dt.datetime
    event: dict[str, Any]


class EventsPage(msgspec.Struct, frozen=True, kw_only=True):
    """Events of one correlation id in causal order (only those of portfolios the key grants)."""

    correlation_id: str
    events: list[StoredEventView]


class Health(msgspec.Struct, frozen=True, kw_only=True):
    status: str


class Readiness(msgspec.Struct, frozen=True, kw_only=True):
    ready: bool
    checks: dict[str, bool]


def order_view(r: Order) -> OrderView:
    """An order record as the API shows it."""
    return OrderView(
        order_id=r.order_id, client_order_id=r.client_order_id, status=r.status, correlation_id=r.correlation_id,
        portfolio_id=r.portfolio_id, symbol=r.symbol, side=r.side, type=r.order_type, quantity=r.quantity,
        price=r.price, time_in_force=r.time_in_force, requested_venue=r.requested_venue, venue=r.venue,
        filled_quantity=r.filled_quantity, avg_fill_price=r.avg_fill_price, commission=r.commission,
        commission_asset=r.commission_asset, reject_code=r.reject_code, reject_reason=r.reject_reason,
        fills=[
            FillView(
                fill_id=f.fill_id, quantity=f.quantity, price=f.price, commission=f.commission,
                commission_asset=f.commission_asset, liquidity=f.liquidity, venue=f.venue, at=f.at,
            )
            for f in r.fills
        ],
        created_at=r.created_at, updated_at=r.updated_at,
    )



# -- decoding ---------------------------------------------------------------------------------

T = TypeVar("T")

_decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
_AT = re.compile(r" - at `(?:key` in `)?\$\.?(.*)`$")
_NAMED = re.compile(r"field `([^`]+)`")
_EXACT_END = re.compile(r"\\\\Z'")


def decode_body(data: bytes, cls: type[T]) -> T:
    """The body as ``cls``, or a 422 ``Problem`` naming the offending field."""
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.json.Decoder(cls)
    try:
        result: T = decoder.decode(data)
    except msgspec.ValidationError as exc:
        raise _invalid(str(exc)) from None
    except msgspec.DecodeError as exc:
        raise Problem(422, "malformed_json", f"the body is not valid JSON: {exc}", errors=[FieldError("body", str(exc))]) from None
    except UnicodeDecodeError as exc:
        # msgspec decodes strings and keys lazily and lets this through: JSON text is UTF-8
        message = f"a string or key is not UTF-8 ({exc.reason})"
        raise Problem(422, "malformed_json", f"the body is not valid JSON: {message}", errors=[FieldError("body", message)]) from None
    return result


def _invalid(message: str) -> Problem:
    message = _EXACT_END.sub("$'", message)  # the pattern as the OpenAPI document writes it
    at = _AT.search(message)
    path = at.group(1) if at else ""
    text = message[: at.start()] if at else message
    named = _NAMED.search(text) if ("missing required field" in text or "unknown field" in text) else None
    if named:
        path = f"{path}.{named.group(1)}" if path else named.group(1)
    field = path.replace("[...]", "").replace("[", ".").replace("]", "") or "body"
    return Problem.invalid(field, text)


def positive_decimal(value: str, field: str, *, allow_zero: bool = False) -> Decimal:
    """The intake's ``positive_decimal`` for the gateway's other bodies: a 422 ``Problem``."""
    try:
        return terms.positive_decimal(value, field, allow_zero=allow_zero)
    except InvalidOrder as exc:
        raise problem_of(exc) from None


def openapi_components() -> dict[str, Any]:
    """JSON schemas of every body, for ``components.schemas`` of the OpenAPI document."""
    _, components = msgspec.json.schema_components(
        [
            OrderBody, PortfolioBody, RebalanceBody, WorkflowRunAccepted, TradingStateBody, ApiKeyBody, OrderAccepted, OrderView, OrdersPage,
            PortfolioView, PositionsView, ApiKeyCreated, EventsPage, ProblemBody, Health, Readiness,
        ],
        ref_template="#/components/schemas/{name}",
    )
    out: dict[str, Any] = _json_schema_patterns(components)
    return out


def _json_schema_patterns(node: Any) -> Any:
    """``node`` with every Python ``^body\\Z`` pattern written as JSON Schema's ``^body$``."""
    if isinstance(node, dict):
        return {
            k: (v[:-2] + "$" if k == "pattern" and isinstance(v, str) and v.endswith("\\Z") else _json_schema_patterns(v))
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_json_schema_patterns(v) for v in node]
    return node
