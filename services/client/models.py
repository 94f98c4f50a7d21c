"""What the client sends and gets back: Decimal money, UTC datetimes, one error type."""

from __future__ import annotations

import dataclasses
import datetime as dt
import uuid
from decimal import Decimal
from typing import Any

__all__ = ["ApiError", "Fill", "OrderRequest", "OrderResult", "decimals"]

TERMINAL = frozenset({"rejected", "filled", "canceled", "failed", "expired"})


class ApiError(Exception):
    """An error answer: ``status`` (HTTP), ``code`` (machine-readable), ``detail``, and for
    invalid input ``errors`` (``[{field, message}]``)."""

    def __init__(
        self, status: int, code: str, detail: str = "", *, errors: list[dict[str, str]] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(f"{status} {code}: {detail}" if detail else f"{status} {code}")
        self.status = status
        self.code = code
        self.detail = detail
        self.errors = errors or []
        self.retry_after = retry_after


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrderRequest:
    """A new order. ``client_order_id`` makes a retry safe: the same id and body return the
    same order; a fresh one is made up if not given."""

    portfolio_id: str
    symbol: str
    side: str
    quantity: Decimal
    order_type: str = "market"
    price: Decimal | None = None
    time_in_force: str = "gtc"
    venue: str | None = None
    client_order_id: str = dataclasses.field(default_factory=lambda: uuid.uuid4().hex)

    def to_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "client_order_id": self.client_order_id,
            "portfolio_id": self.portfolio_id,
            "symbol": self.symbol,
            "side": str(getattr(self.side, "value", self.side)),
            "type": str(getattr(self.order_type, "value", self.order_type)),
            "quantity": _dec(self.quantity),
            "time_in_force": str(getattr(self.time_in_force, "value", self.time_in_force)),
        }
        if self.price is not None:
            body["price"] = _dec(self.price)
        if self.venue is not None:
            body["venue"] = self.venue
        return body


@dataclasses.dataclass(frozen=True, kw_only=True)
class Fill:
    fill_id: str
    quantity: Decimal
    price: Decimal
    commission: Decimal
    commission_asset: str
    liquidity: str
    venue: str
    at: dt.datetime


@dataclasses.dataclass(frozen=True, kw_only=True)
class OrderResult:
    """An order as the gateway answered it: always its ids and status; the other fields when
    the answer carried the full order (``GET``, a repeat, ``wait``), else ``None``."""

    order_id: str
    client_order_id: str
    status: str
    correlation_id: str
    http_status: int = 200
    portfolio_id: str | None = None
    symbol: str | None = None
    side: str | None = None
    order_type: str | None = None
    quantity: Decimal | None = None
    price: Decimal | None = None
    time_in_force: str | None = None
    venue: str | None = None
    filled_quantity: Decimal | None = None
    avg_fill_price: Decimal | None = None
    commission: Decimal | None = None
    commission_asset: str | None = None
    reject_code: str | None = None
    reject_reason: str | None = None
    fills: tuple[Fill, ...] = ()
    created_at: dt.datetime | None = None
    updated_at: dt.datetime | None = None

    @property
    def is_terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def success(self) -> bool:
        """Accepted and not (yet) rejected or failed: the seeds' ``OrderResult.success``."""
        return self.status not in ("rejected", "failed")

    @property
    def message(self) -> str:
        return self.reject_reason or self.status

    @classmethod
    def from_json(cls, data: dict[str, Any], http_status: int = 200) -> OrderResult:
        return cls(
            order_id=data["order_id"],
            client_order_id=data["client_order_id"],
            status=data["status"],
            correlation_id=data["correlation_id"],
            http_status=http_status,
            portfolio_id=data.get("portfolio_id"),
            symbol=data.get("symbol"),
            side=data.get("side"),
            order_type=data.get("type"),
            quantity=_opt_dec(data.get("quantity")),
            price=_opt_dec(data.get("price")),
            time_in_force=data.get("time_in_force"),
            venue=data.get("venue"),
            filled_quantity=_opt_dec(data.get("filled_quantity")),
            avg_fill_price=_opt_dec(data.get("avg_fill_price")),
            commission=_opt_dec(data.get("commission")),
            commission_asset=data.get("commission_asset"),
            reject_code=data.get("reject_code"),
            reject_reason=data.get("reject_reason"),
            fills=tuple(
                Fill(
                    fill_id=f["fill_id"], quantity=Decimal(f["quantity"]), price=Decimal(f["price"]),
                    commission=Decimal(f["commission"]), commission_asset=f["commission_asset"],
                    liquidity=f["liquidity"], venue=f["venue"], at=dt.datetime.fromisoformat(f["at"]),
                )
                for f in data.get("fills") or ()
            ),
            created_at=_opt_time(data.get("created_at")),
            updated_at=_opt_time(data.get("updated_at")),
        )


_DECIMAL_FIELDS = frozenset({
    "quantity", "average_price", "realized_pnl", "unrealized_pnl", "mark", "max_notional_per_order",
    "max_position_per_symbol", "price_band",
})


def decimals(value: Any, key: str = "") -> Any:
    """JSON with the API's decimal strings turned into ``Decimal`` (balances and the known
    money fields)."""
    if isinstance(value, dict):
        if key == "balances":
            return {k: Decimal(v) for k, v in value.items()}
        return {k: decimals(v, k) for k, v in value.items()}
    if isinstance(value, list):
        return [decimals(v, key) for v in value]
    if isinstance(value, str) and key in _DECIMAL_FIELDS:
        return Decimal(value)
    return value


def _dec(value: Decimal | str | int) -> str:
    number = value if isinstance(value, Decimal) else Decimal(str(value))
    if not number.is_finite():
        raise ValueError(f"not a finite decimal: {value}")
    return format(number, "f")


def _opt_dec(value: Any) -> Decimal | None:
    return None if value is None else Decimal(value)


def _opt_time(value: Any) -> dt.datetime | None:
    return None if value is None else dt.datetime.fromisoformat(value)
