"""Hot state in Redis: the records the trading services keep, and where each one lives.

Every record of a portfolio sits under its shard's hash tag (``<ns>:{k}:...``), in the same
Redis Cluster slot as the portfolio's streams, so a stage commits its state change with its
output events and its ack in one script. One owner writes each record:

============================  ===================  =============================================
key (shard k of portfolio p)  owner                what
============================  ===================  =============================================
``order:<order_id>``          gateway creates,     ``Order`` (``services.trading``) as it is:
                              order service after  status, fills, reject reason; expires
                                                   ``ZVT_ORDER_TERMINAL_RETENTION_S`` after it
                                                   reaches a terminal status
``open-orders``               order service        sorted set of the shard's open order ids (from
                                                   ``created`` to terminal) by creation time (ms)
``coid:<p>:<client_order_id>`` gateway             the order id a client order id was given
                                                   (expires with the idempotency window)
``orders:<p>``                gateway adds,        sorted set of order ids by creation time (ms);
                              order service trims  entries older than the retention are trimmed
``portfolio:<p>``             gateway (admin API)  ``PortfolioRecord``: limits, trading state
``balances:<p>``              portfolio service    hash asset -> Decimal (the admin API seeds it)
``positions:<p>``             portfolio service    hash symbol -> ``PositionRecord``
``risk:<p>``                  risk service         ``RiskRecord``: recent orders, funds reserved
``reservations:<p>``          risk service         hash order id -> ``Reservation`` of open orders
``resting``                   routing service      hash order id -> ``RestingOrder`` (per shard)
``applied:<order_id>``        portfolio service    set of the fill ids applied to balances
                                                   (expires: ``ZVT_ORDER_FILL_MEMORY_S``)
``cancel:<order_id>``         routing service      a cancel that overtook its order (expires)
``route-intent:<order_id>``   routing service      the venue of a submit in flight (expires)
============================  ===================  =============================================

Every per-order key is bounded: it expires, or it is removed when its order ends (the
``reservations`` and ``resting`` fields, the ``open-orders`` entry), so Redis holds the open
orders plus the finished ones of the last retention period (docs/trading.md, Retention).

Outside the shards: ``<ns>:global:marks`` (hash symbol -> mark price, written by the market
feed), ``<ns>:global:catalogue`` (the instrument catalogue, ``services.core.catalogue``) and
the API keys (``<ns>:global:apikey:<sha256 of the secret>``).

Records are msgpack (msgspec); Decimals travel as strings, timestamps are UTC.
"""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
import os
import time
from typing import Any, TypeVar

import msgspec

from services.core.bus import STATE_READ_LUA, current_state_read, state_read_call
from services.core.events import (
    Event,
    OrderRequested,
    Route,
    UtcDatetime,
)
from services.core.keys import Keys
from services.trading import OrderTerms, OrderType, Side, TimeInForce, TradingState
from services.trading.funds import Hold
from services.trading.money import ZERO
from services.trading.orders import Order
from services.trading.terms import carry
from services.trading.positions import Position
from services.trading.risk import RiskLimits

__all__ = [
    "DEFAULT_LIMITS",
    "PortfolioRecord",
    "PositionRecord",
    "RestingOrder",
    "RiskRecord",
    "StateKeys",
    "StateReader",
    "order_requested",
    "pairs",
    "requested_order",
    "decode_balances",
    "dump",
    "load",
    "new_order_id",
    "shard_of_order_id",
]


class LimitsRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    max_notional_per_order: Decimal
    max_position_per_symbol: Decimal
    price_band: Decimal
    max_orders_per_window: int
    window_seconds: int

    def to_limits(self) -> RiskLimits:
        return RiskLimits(
            max_notional_per_order=self.max_notional_per_order,
            max_position_per_symbol=self.max_position_per_symbol,
            price_band=self.price_band,
            max_orders_per_window=self.max_orders_per_window,
            window_seconds=self.window_seconds,
        )


DEFAULT_LIMITS = LimitsRecord(
    max_notional_per_order=Decimal("1000000"),
    max_position_per_symbol=Decimal("1000"),
    price_band=Decimal("0.05"),
    max_orders_per_window=1000,
    window_seconds=1,
)
"""Limits of a portfolio created without any."""


class PortfolioRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    portfolio_id: str
    base_currency: str = "USDT"
    limits: LimitsRecord = DEFAULT_LIMITS
    trading_state: TradingState = TradingState.ACTIVE
    created_at: UtcDatetime
    updated_at: UtcDatetime


class PositionRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    symbol: str
    quantity: Decimal = ZERO
    cost_basis: Decimal = ZERO
    realized_pnl: Decimal = ZERO
    fills: int = 0
    updated_at: UtcDatetime | None = None

    def to_position(self) -> Position:
        return Position(
            symbol=self.symbol, quantity=self.quantity, cost_basis=self.cost_basis, realized_pnl=self.realized_pnl
        )

    @classmethod
    def of(cls, position: Position, fills: int, at: dt.datetime) -> PositionRecord:
        return cls(
            symbol=position.symbol,
            quantity=position.quantity,
            cost_basis=position.cost_basis,
            realized_pnl=position.realized_pnl,
            fills=fills,
            updated_at=at,
        )


class Reservation(msgspec.Struct, frozen=True, array_like=True, gc=False):
    """What an open order holds (``services.trading.funds.Hold``, as stored). A reservation
    written before holds tracked fills has no quantity: it is released whole when its order ends."""

    asset: str
    amount: Decimal
    quantity: Decimal = ZERO
    confirmed: Decimal = ZERO
    final: Decimal | None = None

    def to_hold(self) -> Hold:
        return Hold(self.asset, self.amount, self.quantity or ZERO, self.confirmed, self.final)

    @classmethod
    def of(cls, hold: Hold) -> Reservation:
        return cls(hold.asset, hold.amount, hold.quantity, hold.confirmed, hold.final)


class RiskRecord(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """What the risk service remembers of a portfolio between orders (small: it is rewritten
    with every decision). Each open order's own reservation is in ``reservations:<p>``."""

    recent: tuple[int, ...] = ()
    """Epoch milliseconds of the orders approved in the current rate window."""
    reserved: dict[str, Decimal] = {}
    """Funds set aside, per asset, for the approved orders that have not finished yet."""


class RestingOrder(msgspec.Struct, frozen=True, kw_only=True, gc=False):
    """A GTC limit order working at a venue, as routing follows it: what its immediate match
    left open rests at the venue, and routing reports each later fill and its end.

    ``fills`` counts the venue order's executions already reported (a venue lists an order's
    executions oldest first), ``filled_quantity`` what the whole order has filled. An order
    re-placed at an in-process venue (its book did not survive a restart) gets a new
    ``venue_order_id`` and its ``fills`` start again from 0; ``filled_quantity`` goes on."""

    order_id: str
    client_order_id: str
    symbol: str
    side: Side
    price: Decimal
    quantity: Decimal
    filled_quantity: Decimal
    venue: str
    venue_order_id: str
    fills: int
    since: UtcDatetime
    portfolio_id: str = ""
    correlation_id: str = ""
    origin_id: str = ""
    """The ``order.created`` event the order was routed for: the cause of what routing reports
    of it later."""

    @property
    def leaves_quantity(self) -> Decimal:
        return self.quantity - self.filled_quantity


_encoder = msgspec.msgpack.Encoder()


def dump(record: msgspec.Struct) -> bytes:
    return _encoder.encode(record)


_decoders: dict[type[Any], msgspec.msgpack.Decoder[Any]] = {}


T = TypeVar("T")


def load(cls: type[T], data: bytes) -> T:
    decoder = _decoders.get(cls)
    if decoder is None:
        decoder = _decoders[cls] = msgspec.msgpack.Decoder(cls)
    result: T = decoder.decode(data)
    return result


def decode_balances(raw: dict[Any, Any]) -> dict[str, Decimal]:
    return {(k.decode() if isinstance(k, bytes) else k): Decimal(v.decode() if isinstance(v, bytes) else v) for k, v in raw.items()}


def requested_order(
    *,
    order_id: str,
    portfolio_id: str,
    client_order_id: str,
    symbol: str,
    side: Side,
    order_type: OrderType,
    quantity: Decimal,
    price: Decimal | None,
    time_in_force: TimeInForce,
    venue: str | None,
    at: dt.datetime,
    requested_by: str | None = None,
    body_hash: str = "",
    route: Route = Route.STREAM,
    event_id: str | None = None,
) -> tuple[Order, Event[Any]]:
    """A new order as the platform takes it in: its first record and its ``order.requested``
    (correlated by the order id), written together by whoever accepts it. ``route``: which
    path drives it (``workflow``: a ``trading.place_order`` run)."""
    terms = OrderTerms(
        order_id=order_id, client_order_id=client_order_id, symbol=symbol, side=side, order_type=order_type,
        quantity=quantity, price=price, time_in_force=time_in_force, venue=venue,
    )
    order = Order.requested(
        terms, portfolio_id=portfolio_id, at=at, requested_by=requested_by, body_hash=body_hash, route=route
    )
    return order, order_requested(order, route=route, event_id=event_id)


def order_requested(order: Order, *, route: Route, event_id: str | None = None) -> Event[Any]:
    """The ``order.requested`` of ``order``, made from the order itself (the same event again,
    given the same ``event_id``)."""
    return Event.new(
        carry(order.terms, OrderRequested, requested_by=order.requested_by),
        portfolio_id=order.portfolio_id, correlation_id=order.correlation_id, occurred_at=order.created_at,
        route=route, event_id=event_id,
    )


_last_ms = 0
_sequence = 0


def new_order_id(shard: int) -> str:
    """A fresh order id: a UUIDv7 (time-ordered) whose last four hex digits are the order's
    shard, so ``GET /v1/orders/{id}`` finds the record without an index.

    Its 12 bits after the version are a counter within the millisecond (RFC 9562, method 1),
    so the ids one process makes sort in the order it made them, even within a millisecond:
    the portfolio's order index breaks ties between equal times by id."""
    global _last_ms, _sequence
    if not 0 <= shard < 0x10000:
        raise ValueError("shard out of range")
    ms = time.time_ns() // 1_000_000
    if ms <= _last_ms:
        _sequence += 1
        if _sequence > 0xFFF:  # 4,096 ids in one millisecond: borrow the next one
            _last_ms, _sequence = _last_ms + 1, 0
        ms = _last_ms
    else:
        _last_ms, _sequence = ms, 0
    h = f"{ms & 0xFFFF_FFFF_FFFF:012x}" + os.urandom(8).hex() + f"{shard:04x}"
    variant = "89ab"[int(h[16], 16) & 3]
    return f"{h[:8]}-{h[8:12]}-7{_sequence:03x}-{variant}{h[17:20]}-{h[20:32]}"


def shard_of_order_id(order_id: str) -> int | None:
    """The shard an order id names, or ``None`` if it is not one of ours."""
    if len(order_id) != 36 or order_id[14] != "7":
        return None
    try:
        return int(order_id[-4:], 16)
    except ValueError:
        return None


class StateReader:
    """Many reads of hot state in one command: a stage loads everything a batch needs with
    one script call (one slot on a cluster: a batch is one shard there), which costs the
    client a fraction of the same reads pipelined one by one.

    Under a consumer batch of a ``Batch(reads_state=True)`` handler the read goes through the
    consumer (``services.core.bus.StateRead``), which sends its duplicate check and state
    versions along with it."""

    def __init__(self, redis: Any) -> None:
        self._redis = redis
        self._script: Any = None

    async def read(self, ops: list[tuple[str, ...]]) -> list[Any]:
        """``ops``: ``(command, key, *args)`` each (GET, HGET, HGETALL, EXISTS, ...); the
        replies in order (HGETALL as a flat ``[field, value, ...]`` list)."""
        batch = current_state_read.get()
        if batch is not None:
            return await batch.read(ops)
        if not ops:
            return []
        if self._script is None:
            self._script = self._redis.register_script(STATE_READ_LUA)
        keys, args = state_read_call(ops)
        result: list[Any] = await self._script(keys=keys, args=args)
        return result


def pairs(flat: list[Any] | None) -> dict[str, bytes]:
    """A flat HGETALL reply as a dict with str keys."""
    if not flat:
        return {}
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in zip(flat[::2], flat[1::2], strict=True)}


class StateKeys:
    """Key names of the hot state (module docstring)."""

    def __init__(self, keys: Keys) -> None:
        self.keys = keys

    def shard(self, portfolio_id: str) -> int:
        return self.keys.shard_of(portfolio_id)

    def order(self, portfolio_id: str, order_id: str) -> str:
        return self.keys.state(self.keys.shard_of(portfolio_id), "order", order_id)

    def order_in_shard(self, shard: int, order_id: str) -> str:
        return self.keys.state(shard, "order", order_id)

    def client_order(self, portfolio_id: str, client_order_id: str) -> str:
        return self.keys.state(self.keys.shard_of(portfolio_id), "coid", portfolio_id, client_order_id)

    def orders(self, portfolio_id: str) -> str:
        return self.keys.state(self.keys.shard_of(portfolio_id), "orders", portfolio_id)

    def open_orders(self, shard: int) -> str:
        """Sorted set of the shard's open order ids (created, not yet terminal) by creation
        time in ms: what reconciliation looks up instead of scanning keys."""
        return self.keys.state(shard, "open-orders")

    def portfolio(self, portfolio_id: str) -> str:
        return self.keys.state(self.keys.shard_of(portfolio_id), "portfolio", portfolio_id)

    def balances(self, portfolio_id: str) -> str:
        return self.keys.state(self.keys.shard_of(portfolio_id), "balances", portfolio_id)

    def positions(self, portfolio_id: str) -> str:
        return self.keys.state(self.keys.shard_of(portfolio_id), "positions", portfolio_id)

    def risk(self, portfolio_id: str) -> str:
        return self.keys.state(self.keys.shard_of(portfolio_id), "risk", portfolio_id)

    def reservations(self, portfolio_id: str) -> str:
        return self.keys.state(self.keys.shard_of(portfolio_id), "reservations", portfolio_id)

    def resting(self, portfolio_id: str) -> str:
        """The hash of the resting orders of this portfolio's shard (order id -> ``RestingOrder``)."""
        return self.resting_in_shard(self.keys.shard_of(portfolio_id))

    def resting_in_shard(self, shard: int) -> str:
        """Hash order id -> ``RestingOrder``: the GTC orders working at venues that routing
        follows, one hash per shard, so the routing process owning a shard finds them all."""
        return self.keys.state(shard, "resting")

    def applied_fills(self, portfolio_id: str, order_id: str) -> str:
        """Set of the fill ids of an order the portfolio stage has applied (expires)."""
        return self.keys.state(self.keys.shard_of(portfolio_id), "applied", order_id)

    def cancel(self, portfolio_id: str, order_id: str) -> str:
        return self.keys.state(self.keys.shard_of(portfolio_id), "cancel", order_id)

    def marks(self) -> str:
        return self.keys.global_key("marks")

    def catalogue(self) -> str:
        return self.keys.global_key("catalogue")

    def api_key(self, secret_hash: str) -> str:
        return self.keys.global_key("apikey", secret_hash)

    def api_key_index(self) -> str:
        """Hash key id -> secret hash, to revoke a key by its id."""
        return self.keys.global_key("apikeys")
