"""The routing stage: send each created order to a venue and report what the venue did.

Consumes ``order.created`` and ``order.cancel_requested``. For an order it picks a venue
(``services.trading.routing.choose_venue``: best expected price net of fees among healthy
venues listing the symbol), submits it, and emits ``exchange.routed`` with the decision and
its inputs, one ``order.executed`` per fill, and then what became of the rest:

- market, IOC and FOK orders: whatever did not fill at once expires
  (``order.canceled`` with reason ``expired``);
- a GTC limit order rests at the venue: what its immediate match left open works there, and
  routing keeps a ``RestingOrder`` of it in its shard's ``resting`` hash. ``follow`` (run by
  the routing service for the shards it owns) asks the venues about those orders through the
  ``Venue`` protocol (open orders per symbol, then the order itself when it changed) and
  reports each later fill as ``order.executed`` with the venue's fill id, and the order's end
  (filled, or canceled or expired by the venue). A client cancel cancels it at the venue. An
  in-process (paper) venue's book lives in one process: an order it no longer knows (the
  process restarted, another one placed it) is placed there again for what is left.

Venues: the in-process paper venue and/or ccxt venues (real exchanges or the simulated venue
servers). A venue whose breaker is open is skipped; a submit that fails without placing the
order (unreachable, 429/418) opens that venue's breaker and the order is routed again among
the rest, so it lands once. A submit whose outcome is unknown is resolved by the adapter (lookup
by client order id); if even that fails the event fails and is delivered again, and the
intent written before the submit (``route-intent:<order id>``) sends the retry to the same
venue, where the order is looked up before anything is submitted.

A refused submit becomes ``order.failed``. A cancel for an order routing has not seen yet is
remembered (``cancel:<order id>``, a day) and applied when the order arrives.

Every event is derived from the one that caused it, so a batch handled again after a crash
emits the same event ids, which every consumer drops. A fill's id is
``platform_fill_id(order id, venue, venue fill id)`` and the event carries the venue's own id
(``venue_fill_id``): ``orders.reconcile`` names a fill it finds at the venue the same way, so
the same execution reported by both is one fill to the order record and the portfolio.
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any

import msgspec

from services.core.bus import Bus, Commit, Unavailable
from services.core.events import (
    Event,
    EventType,
    ExchangeRouted,
    OrderCanceled,
    OrderCancelRequested,
    OrderCreated,
    OrderExecuted,
    OrderFailed,
    Route,
    derive_event_id,
    utcnow,
)
from services.core.hotstate import RestingOrder, StateKeys, StateReader, dump, load, pairs
from services.core.marks import Marks
from services.core.replication import NotReplicated, ReplicaWait, run_replicated
from services.core.telemetry import consumer_span, get_logger
from services.trading import OrderType, TimeInForce
from services.trading.money import ZERO, money_context
from services.trading.orders import Order, OrderStatus
from services.trading.routing import NoVenueAvailable, RouteDecision, VenueOption, choose_venue
from services.venues.base import (
    InsufficientFunds,
    OrderNotFound,
    OrderRejected,
    RateLimited,
    UnknownOutcome,
    Venue,
    VenueOrder,
    VenueOrderRequest,
    VenueError,
    VenueOrderStatus,
    VenueUnavailable,
    in_process,
    platform_fill_id,
)
from services.venues.paper import PaperVenue

__all__ = ["CANCEL_TTL_S", "GROUP", "HANDLED", "RoutingStage"]

log = get_logger("zvt.routing")

GROUP = "routing"
STAGE = "routing"
HANDLED = (EventType.ORDER_CREATED, EventType.ORDER_CANCEL_REQUESTED)
CANCEL_TTL_S = 86_400
EXPIRED = "expired"  # the order stage's reason for an expiry (services.order.stage.EXPIRED_REASON)
_FUNDS = Decimal("1000000000000")
INTENT_TTL_S = 86_400


class VenueHealth:
    """This process's view of which venues to skip: a local breaker per venue (opened by a
    failed submit, for ``cooldown_s`` or the venue's Retry-After), and the venue's own shared
    breaker when it has one (``CcxtVenue.healthy``)."""

    def __init__(self, cooldown_s: float = 5.0) -> None:
        self.cooldown_s = cooldown_s
        self._down_until: dict[str, float] = {}

    def trip(self, venue: str, seconds: float | None = None) -> None:
        self._down_until[venue] = time.monotonic() + (seconds if seconds else self.cooldown_s)

    async def healthy(self, venue: Venue) -> bool:
        if time.monotonic() < self._down_until.get(venue.name, 0.0):
            return False
        check = getattr(venue, "healthy", None)
        return bool(await check()) if check is not None else True


class Quotes:
    """The best bid and ask of each (venue, symbol), refreshed in the background for remote
    venues (``refresh``); a paper venue follows the marks, so it needs none."""

    def __init__(self, max_age_s: float = 5.0) -> None:
        self.max_age_s = max_age_s
        self._quotes: dict[tuple[str, str], tuple[float, Decimal | None, Decimal | None]] = {}

    def get(self, venue: str, symbol: str) -> tuple[Decimal | None, Decimal | None] | None:
        entry = self._quotes.get((venue, symbol))
        if entry is None or time.monotonic() - entry[0] > self.max_age_s:
            return None
        return entry[1], entry[2]

    async def refresh(self, venue: Venue, symbols: Sequence[str]) -> None:
        for symbol in symbols:
            try:
                ticker = await venue.ticker(symbol)
            except Exception:
                continue  # a stale quote ages out; health is the breaker's business
            self._quotes[(venue.name, symbol)] = (time.monotonic(), ticker.bid, ticker.ask)


@dataclass(slots=True)
class _Batch:
    resting: dict[tuple[str, str], RestingOrder | None] = field(default_factory=dict)
    cancels: dict[str, bool] = field(default_factory=dict)
    records: dict[str, Order | None] = field(default_factory=dict)
    intents: dict[str, str] = field(default_factory=dict)
    """Order id -> the venue a previous attempt submitted to (outcome unknown)."""


class RoutingStage:
    def __init__(
        self,
        redis: Any,
        state_keys: StateKeys,
        marks: Marks,
        venues: Sequence[Venue],
        *,
        clock: Callable[[], dt.datetime] = utcnow,
        health: VenueHealth | None = None,
        quotes: Quotes | None = None,
        replica_wait: ReplicaWait | None = None,
        follows: bool = True,
        bus: Bus | None = None,
    ) -> None:
        """``follows``: this process runs ``follow`` (the routing service). The workflows
        worker routes too but does not follow: an order it leaves resting at its in-process
        paper venue is canceled there, and the routing service places the rest again at its own."""
        self.redis = redis
        self.follows = follows
        self.bus = bus
        """Where an unknown outcome is told at once (``exchange.routed`` with
        ``outcome_unknown``), before the event that caused it fails and is retried."""
        self.replica_wait = replica_wait
        self.reader = StateReader(redis)
        self.sk = state_keys
        self.marks = marks
        self.venues: dict[str, Venue] = {v.name: v for v in venues}
        self.clock = clock
        self.health = health if health is not None else VenueHealth()
        self.quotes = quotes if quotes is not None else Quotes()
        self.reroutes = 0
        self._markets: dict[str, set[str]] = {}
        self._fees: dict[tuple[str, str], Decimal] = {}

    async def start(self) -> None:
        for name, venue in self.venues.items():
            markets = await venue.markets()
            if isinstance(venue, PaperVenue):
                # Balances are risk's business; the paper account never runs dry.
                venue.fund({asset: _FUNDS for m in markets.values() for asset in (m.base, m.quote)})
            else:
                await self.quotes.refresh(venue, sorted(markets))
            self._markets[name] = set(markets)
            for symbol, market in markets.items():
                self._fees[(name, symbol)] = market.taker_fee

    async def load(self, items: list[tuple[Event[Any], Commit]]) -> _Batch:
        batch = _Batch()
        ops: list[tuple[str, ...]] = []
        asked: list[tuple[str, Any]] = []
        for event, _ in items:
            pid, oid = event.portfolio_id, event.payload.order_id
            if event.event_type is EventType.ORDER_CREATED:
                ops.append(("EXISTS", self.sk.cancel(pid, oid)))
                asked.append(("cancel", oid))
                if self._remote:
                    ops.append(("GET", self._intent_key(pid, oid)))
                    asked.append(("intent", oid))
            else:
                ops.append(("HGET", self.sk.resting(pid), oid))
                asked.append(("resting", (pid, oid)))
                ops.append(("GET", self.sk.order(pid, oid)))
                asked.append(("record", oid))
        replies = await self.reader.read(ops)
        for (kind, ref), reply in zip(asked, replies, strict=True):
            if kind == "cancel":
                batch.cancels[ref] = bool(reply)
            elif kind == "intent":
                if reply:
                    batch.intents[ref] = reply.decode() if isinstance(reply, bytes) else str(reply)
            elif kind == "resting":
                batch.resting[ref] = load(RestingOrder, reply) if reply else None
            else:
                batch.records[ref] = load(Order, reply) if reply else None
        return batch

    @property
    def _remote(self) -> bool:
        return any(not isinstance(v, PaperVenue) for v in self.venues.values())

    def _intent_key(self, portfolio_id: str, order_id: str) -> str:
        return self.sk.keys.state(self.sk.shard(portfolio_id), "route-intent", order_id)

    async def refresh_quotes(self) -> None:
        """One round of quotes from every remote venue (the routing service runs this in the
        background)."""
        for name, venue in self.venues.items():
            if not isinstance(venue, PaperVenue):
                await self.quotes.refresh(venue, sorted(self._markets.get(name, ())))

    async def handle(self, items: list[tuple[Event[Any], Commit]]) -> None:
        batch = await self.load(items)
        # Created orders are routed concurrently (remote venues answer in milliseconds);
        # a cancel waits for the creates before it, so stream order still holds per order.
        group: list[Coroutine[Any, Any, None]] = []
        for event, commit in items:
            if commit.duplicate:
                continue
            if event.event_type is EventType.ORDER_CREATED:
                group.append(self._route_one(event, commit, batch))
                continue
            await self._flush(group)
            with consumer_span(event, GROUP):
                try:
                    await self.cancel(event, commit, batch)
                except Exception as exc:
                    commit.fail(exc)
        await self._flush(group)

    @staticmethod
    async def _flush(group: list[Coroutine[Any, Any, None]]) -> None:
        if len(group) == 1:
            await group[0]
        elif group:
            await asyncio.gather(*group)
        group.clear()

    async def _route_one(self, event: Event[Any], commit: Commit, batch: _Batch) -> None:
        with consumer_span(event, GROUP):
            try:
                await self.route(event, commit, batch)
            except Exception as exc:
                commit.fail(exc)

    async def route(self, event: Event[OrderCreated], commit: Commit, batch: _Batch) -> None:
        order = event.payload
        pid = event.portfolio_id
        if batch.cancels.get(order.order_id):
            commit.emit(event.derive(_canceled(order, ZERO, order.quantity, "canceled before it reached a venue"), STAGE))
            commit.write("DEL", self.sk.cancel(pid, order.order_id))
            batch.cancels[order.order_id] = False
            return
        marks = await self.marks.current()
        mark = marks.get(order.symbol)
        # The venue matches what crosses now; a GTC limit's remainder rests at the venue.
        rests = order.order_type is OrderType.LIMIT and order.time_in_force is TimeInForce.GTC
        request = VenueOrderRequest(
            client_order_id=order.order_id,
            symbol=order.symbol,
            side=order.side,
            order_type=order.order_type,
            quantity=order.quantity,
            price=order.price,
            time_in_force=order.time_in_force,
        )
        if order.order_type is OrderType.MARKET and order.price_cap is not None:
            # A market order with a price cap (risk held funds up to it): an IOC limit at the
            # cap, so no fill costs more than was held; what cannot fill there expires.
            request = dataclasses.replace(
                request, order_type=OrderType.LIMIT, price=order.price_cap, time_in_force=TimeInForce.IOC
            )
        skipped: dict[str, str] = {}
        resumed = batch.intents.pop(order.order_id, None)
        while True:
            options = [
                VenueOption(
                    venue=name,
                    healthy=name not in skipped and await self.health.healthy(venue),
                    lists_symbol=order.symbol in self._markets.get(name, ()),
                    expected_price=self._expected_price(venue, order, mark),
                    fee_rate=self._fees.get((name, order.symbol), ZERO),
                )
                for name, venue in self.venues.items()
            ]
            if resumed is not None and resumed in self.venues:
                options = [dataclasses.replace(o, healthy=True) if o.venue == resumed else o for o in options]
            try:
                decision = choose_venue(
                    order.symbol, order.side, options, requested_venue=resumed if resumed in self.venues else order.venue
                )
            except NoVenueAvailable as exc:
                why = "; ".join(f"{k}: {v}" for k, v in skipped.items())
                commit.emit(event.derive(_failed(order, "NO_VENUE", f"{exc}{' (' + why + ')' if why else ''}", None), STAGE))
                return
            venue = self.venues[decision.venue]
            if isinstance(venue, PaperVenue):
                if mark is not None and venue.mid(order.symbol) != mark:
                    venue.set_price(order.symbol, mark)
            elif resumed is None or self.replica_wait is not None:
                # Written before the submit: a crash or an unresolved outcome sends the retry
                # of this event to the same venue, to look the order up before anything else.
                # With ZVT_BUS_WAIT_REPLICAS an intent found by a retry is written (and waited
                # for) again: the retry may be the one after its first WAIT failed, and the
                # intent, as this order, may still be on the master only.
                await self._write_intent(self._intent_key(pid, order.order_id), decision.venue)
            try:
                placed = await self._submit(venue, request, resumed=resumed is not None)
            except (OrderRejected, InsufficientFunds) as exc:
                code = "INSUFFICIENT_FUNDS" if isinstance(exc, InsufficientFunds) else "VENUE_REJECTED"
                commit.emit(event.derive(_failed(order, code, str(exc), venue.name), STAGE))
                self._clear_intent(commit, pid, order.order_id, venue)
                return
            except UnknownOutcome:
                # The venue may hold the order and could not say: the order is unknown until a
                # retry of this event looks it up there (the intent sends it to this venue).
                await self._tell_unknown(event, decision)
                raise
            except (VenueUnavailable, RateLimited) as exc:
                # Not placed: skip this venue (its breaker), route again among the others.
                self.health.trip(venue.name, exc.retry_after if isinstance(exc, RateLimited) else None)
                skipped[venue.name] = type(exc).__name__
                resumed = None
                self.reroutes += 1
                log.warning("venue failed, rerouting", venue=venue.name, order_id=order.order_id, error=str(exc))
                continue
            finally:
                if isinstance(venue, PaperVenue):
                    venue.forget(order.order_id)
            break
        self._clear_intent(commit, pid, order.order_id, venue)
        if skipped:
            decision = dataclasses.replace(
                decision, reason=f"{decision.reason}; skipped after a failed submit: "
                + ", ".join(f"{k} ({v})" for k, v in skipped.items())
            )
        commit.emit(
            event.derive(
                ExchangeRouted(
                    order_id=order.order_id,
                    venue=decision.venue,
                    expected_price=decision.expected_price,
                    fee_rate=decision.fee_rate,
                    reason=decision.reason,
                    candidates=decision.quotes(),
                ),
                STAGE,
            )
        )
        cumulative = ZERO
        index = 0
        for index, fill in enumerate(placed.fills, start=1):
            with money_context():
                cumulative += fill.quantity
                leaves = order.quantity - cumulative
            commit.emit(
                event.derive(
                    OrderExecuted(
                        order_id=order.order_id,
                        client_order_id=order.client_order_id,
                        symbol=order.symbol,
                        side=order.side,
                        venue=venue.name,
                        venue_order_id=placed.venue_order_id,
                        fill_id=platform_fill_id(order.order_id, venue.name, fill.fill_id),
                        quantity=fill.quantity,
                        price=fill.price,
                        commission=fill.fee,
                        commission_asset=fill.fee_asset,
                        liquidity=fill.liquidity,
                        cumulative_quantity=cumulative,
                        leaves_quantity=leaves,
                        venue_fill_id=fill.fill_id,
                    ),
                    STAGE,
                    index=index,
                )
            )
        with money_context():
            remaining = order.quantity - cumulative
        if remaining <= 0:
            return
        if rests and not placed.is_terminal:
            assert order.price is not None
            resting = RestingOrder(
                order_id=order.order_id,
                client_order_id=order.client_order_id,
                symbol=order.symbol,
                side=order.side,
                price=order.price,
                quantity=order.quantity,
                filled_quantity=cumulative,
                venue=venue.name,
                venue_order_id=placed.venue_order_id,
                fills=index,
                since=self.clock(),
                portfolio_id=pid,
                correlation_id=event.correlation_id,
                origin_id=event.event_id,
            )
            if in_process(venue) and not self.follows:
                # Nobody follows this process's paper venue: the routing service places the
                # rest again at its own (``follow``, an order its venue does not know).
                assert isinstance(venue, PaperVenue)
                venue.cancel_now(order.symbol, client_order_id=order.order_id)
                venue.forget(order.order_id)
            batch.resting[(pid, order.order_id)] = resting
            commit.write("HSET", self.sk.resting(pid), order.order_id, dump(resting))
            return
        assert placed.status in (VenueOrderStatus.EXPIRED, VenueOrderStatus.CANCELED, VenueOrderStatus.FILLED)
        reason = "canceled at the venue" if placed.status is VenueOrderStatus.CANCELED else EXPIRED
        commit.emit(event.derive(_canceled(order, cumulative, remaining, reason), STAGE, index=index + 1))

    async def _tell_unknown(self, event: Event[OrderCreated], decision: RouteDecision) -> None:
        """Publish that the order's outcome at ``decision.venue`` is unknown (the order shows
        ``unknown``). Its id is derived, so every retry that fails the same way publishes the
        same event, which the order stage takes once; on the stream route whichever path
        created the order, since the stream's order stage is what shows it."""
        if self.bus is None:
            return
        told = event.derive(
            ExchangeRouted(
                order_id=event.payload.order_id, venue=decision.venue, expected_price=decision.expected_price,
                fee_rate=decision.fee_rate, candidates=decision.quotes(), outcome_unknown=True,
                reason=f"{decision.reason}; the submit's answer was lost and the lookup failed: outcome unknown",
            ),
            f"{STAGE}:unknown",
        )
        await self.bus.publish(msgspec.structs.replace(told, route=Route.STREAM))

    def _expected_price(self, venue: Venue, order: OrderCreated, mark: Decimal | None) -> Decimal | None:
        """What a fill is expected to cost at this venue: the limit price for a limit order;
        for a market order the venue's touch (ask to buy, bid to sell) from the quotes, or
        the mark where there is none (the paper venue trades at the mark)."""
        if order.order_type is not OrderType.MARKET:
            return order.price
        quote = self.quotes.get(venue.name, order.symbol)
        if quote is None:
            return mark
        bid, ask = quote
        return ask if order.side.value == "buy" else bid

    async def _submit(self, venue: Venue, request: VenueOrderRequest, *, resumed: bool) -> VenueOrder:
        if resumed:
            try:
                return await venue.fetch_order(request.symbol, client_order_id=request.client_order_id)
            except OrderNotFound:
                pass  # the earlier attempt never landed: submit now
        return await venue.submit(request)

    async def _write_intent(self, key: str, venue: str) -> None:
        """The intent, and with ``ZVT_BUS_WAIT_REPLICAS`` the replicas' confirmation of it, before
        the venue hears of the order: an intent lost in a failover would let the retry submit the
        order again (to this venue, or another) instead of looking it up. Too few replicas:
        ``Unavailable`` holds the whole read (no delivery counted) and it is retried with
        backoff; nothing was sent to a venue, and the retry finds the intent if it was kept."""
        if self.replica_wait is None:
            await self.redis.set(key, venue, ex=INTENT_TTL_S)
            return
        (reply,) = await run_replicated(self.redis, self.replica_wait, [(key, ("SET", key, venue, "EX", INTENT_TTL_S))])
        if isinstance(reply, NotReplicated):
            raise Unavailable(f"route intent not confirmed by the Redis replicas: {reply}") from reply
        if isinstance(reply, Exception):
            raise reply

    def _clear_intent(self, commit: Commit, portfolio_id: str, order_id: str, venue: Venue) -> None:
        if not isinstance(venue, PaperVenue):
            commit.write("DEL", self._intent_key(portfolio_id, order_id))

    async def cancel(self, event: Event[OrderCancelRequested], commit: Commit, batch: _Batch) -> None:
        request = event.payload
        pid = event.portfolio_id
        resting = batch.resting.get((pid, request.order_id))
        if resting is not None:
            # Cancel it at the venue; the venue's answer has every fill up to the cancel, so the
            # fills not reported yet go out first, then the end (a cancel too late to matter
            # ends in the fill that finished the order).
            venue = self.venues.get(resting.venue)
            if venue is None:
                raise Unavailable(f"order {request.order_id} rests at {resting.venue}, which this router does not trade on")
            try:
                found = await venue.cancel(
                    resting.symbol, venue_order_id=resting.venue_order_id, client_order_id=resting.order_id
                )
            except OrderNotFound:
                if not in_process(venue):
                    raise
                found = None  # its book is gone with the process that placed it: nothing works there
            except VenueError as exc:
                raise Unavailable(f"cancel at {venue.name}: {exc}") from exc
            if found is not None:
                self._report(commit, resting, found, end=event)
            else:
                commit.emit(event.derive(_resting_canceled(resting, "canceled by client"), STAGE))
                commit.write("HDEL", self.sk.resting(pid), request.order_id)
            batch.resting[(pid, request.order_id)] = None
            return
        record = batch.records.get(request.order_id)
        if record is not None and record.is_terminal:
            return  # finished before the cancel got here: nothing to do
        if record is not None and record.status in (OrderStatus.ROUTED, OrderStatus.PARTIALLY_FILLED):
            return  # at the venue and not resting: its outcome is already on its way
        # Not at routing yet (still at risk or the order stage): cancel it when it arrives.
        batch.cancels[request.order_id] = True
        commit.write("SET", self.sk.cancel(pid, request.order_id), b"1", "EX", CANCEL_TTL_S)

    # -- following resting orders ------------------------------------------------------------

    async def follow(self, bus: Bus, shards: Sequence[int]) -> int:
        """One pass over the resting orders of ``shards``: report what their venues did since
        the last pass. Returns how many events it committed.

        Each shard's findings are one ``Bus.apply`` at the state version read before them, so
        a batch of the consumer (a cancel, a new resting order) that commits meanwhile makes
        this pass's commit refused and the shard is looked at again; an observation committed
        once (another process saw the same) is not committed twice. Every event's id is
        derived from the fill or the end it reports, so whoever reports it, it is one event."""
        await self._paper_prices()
        committed = 0
        for shard in shards:
            for _ in range(3):
                outcome = await self._follow_shard(bus, shard)
                if outcome is not None:
                    committed += outcome
                    break
        return committed

    async def _paper_prices(self) -> None:
        """The in-process venues' markets follow the marks: a mark moving through a resting
        order's price fills it there, as a price move does at a real venue."""
        paper = [v for v in self.venues.values() if isinstance(v, PaperVenue)]
        if not paper:
            return
        marks = await self.marks.current()
        for venue in paper:
            for symbol, mark in marks.items():
                if symbol in self._markets.get(venue.name, ()) and venue.mid(symbol) != mark:
                    venue.set_price(symbol, mark)

    async def _follow_shard(self, bus: Bus, shard: int) -> int | None:
        # the state version and the resting orders in one read (one slot): the version is
        # what ``apply`` checks, so a commit after this read refuses this pass's
        version_raw, flat = await bus.read_state(
            [("GET", bus.keys.version(shard, GROUP)), ("HGETALL", self.sk.resting_in_shard(shard))]
        )
        if not flat:
            return 0
        version = version_raw.decode() if isinstance(version_raw, bytes) else str(version_raw or "0")
        orders = sorted((load(RestingOrder, v) for v in pairs(flat).values()), key=lambda r: r.since)
        commit = Commit(self.sk.keys, shard)
        seen: list[str] = []
        for resting in await self._changed(orders):
            venue = self.venues[resting.venue]
            placed_again = False
            try:
                found = await venue.fetch_order(
                    resting.symbol, venue_order_id=resting.venue_order_id, client_order_id=resting.order_id
                )
            except OrderNotFound:
                if not in_process(venue):
                    log.warning("a resting order is not at its venue", order_id=resting.order_id, venue=venue.name)
                    continue  # reconciliation's business: the venue and the platform disagree
                placed = await self._place_again(venue, resting)
                if placed is None:
                    continue
                resting, found = placed
                placed_again = True
                commit.write("HSET", self.sk.resting_in_shard(shard), resting.order_id, dump(resting))
            except VenueError as exc:
                log.warning("could not follow a resting order", order_id=resting.order_id, venue=venue.name,
                            error=str(exc))
                continue
            if self._report(commit, resting, found) or placed_again:
                seen.append(f"{resting.order_id}:{found.venue_order_id}:{len(found.fills)}:{found.status}")
        if not commit.outputs and not commit.writes:
            return 0
        observation = derive_event_id("|".join(seen), f"{STAGE}:follow")
        emitted = await bus.apply(GROUP, observation, commit, version)
        return None if emitted is None else len(emitted)

    async def _changed(self, orders: list[RestingOrder]) -> list[RestingOrder]:
        """The resting orders whose venue order may have moved: per (venue, symbol) one
        ``open_orders`` call; an order still open there with the quantity filled that routing
        knows of has not. A venue that does not answer is asked again next pass."""
        by_market: dict[tuple[str, str], list[RestingOrder]] = {}
        for resting in orders:
            if resting.venue in self.venues:
                by_market.setdefault((resting.venue, resting.symbol), []).append(resting)
        changed: list[RestingOrder] = []
        for (name, symbol), group in by_market.items():
            try:
                working = {o.venue_order_id: o for o in await self.venues[name].open_orders(symbol)}
            except VenueError as exc:
                log.warning("could not list open orders", venue=name, symbol=symbol, error=str(exc))
                continue
            for resting in group:
                now = working.get(resting.venue_order_id)
                if now is None or now.filled_quantity != resting.filled_quantity - self._filled_before(resting, now):
                    changed.append(resting)
        return changed

    @staticmethod
    def _filled_before(resting: RestingOrder, now: VenueOrder) -> Decimal:
        """What the order filled before this venue order (placed again for the rest)."""
        with money_context():
            return resting.quantity - now.quantity

    async def _place_again(self, venue: Venue, resting: RestingOrder) -> tuple[RestingOrder, VenueOrder] | None:
        """Place what is left of ``resting`` at an in-process venue that no longer knows it
        (as this venue order). A copy it still holds under the client id is an older venue
        order of this one, from before another process placed it again (this process lost the
        shard for a while): it is canceled here first, and its fills, never reported, are the
        paper account's alone."""
        if isinstance(venue, PaperVenue):
            try:
                venue.cancel_now(resting.symbol, client_order_id=resting.order_id)
            except OrderNotFound:
                pass
            venue.forget(resting.order_id)
        request = VenueOrderRequest(
            client_order_id=resting.order_id, symbol=resting.symbol, side=resting.side, order_type=OrderType.LIMIT,
            quantity=resting.leaves_quantity, price=resting.price, time_in_force=TimeInForce.GTC,
        )
        try:
            placed = await venue.submit(request)
        except VenueError as exc:
            log.warning("could not place a resting order again", order_id=resting.order_id, venue=venue.name,
                        error=str(exc))
            return None
        log.info("resting order placed again", order_id=resting.order_id, venue=venue.name,
                 quantity=str(request.quantity))
        return msgspec.structs.replace(resting, venue_order_id=placed.venue_order_id, fills=0), placed

    def _report(
        self, commit: Commit, resting: RestingOrder, found: VenueOrder, *, end: Event[Any] | None = None
    ) -> bool:
        """Emit the fills of ``found`` not reported yet and, if it is over, its end; write the
        resting record as it now is (or remove it). ``end``: the event to derive the end from
        (the client's cancel request); otherwise its id is derived from the venue order. Returns whether
        anything changed."""
        new = found.fills[resting.fills:]
        key = self.sk.resting_in_shard(commit.shard)
        filled = resting.filled_quantity
        for fill in new:
            with money_context():
                filled += fill.quantity
            fill_id = platform_fill_id(resting.order_id, found.venue, fill.fill_id)
            commit.emit(self._later(resting, OrderExecuted(
                order_id=resting.order_id, client_order_id=resting.client_order_id, symbol=resting.symbol,
                side=resting.side, venue=found.venue, venue_order_id=found.venue_order_id, fill_id=fill_id,
                quantity=fill.quantity, price=fill.price, commission=fill.fee, commission_asset=fill.fee_asset,
                liquidity=fill.liquidity, cumulative_quantity=filled, leaves_quantity=resting.quantity - filled,
                venue_fill_id=fill.fill_id,
            ), fill_id))
        after = msgspec.structs.replace(resting, filled_quantity=filled, fills=len(found.fills))
        if not found.is_terminal:
            if new:
                commit.write("HSET", key, resting.order_id, dump(after))
            return bool(new)
        if after.leaves_quantity > 0:
            reason = {
                VenueOrderStatus.EXPIRED: EXPIRED,
                VenueOrderStatus.CANCELED: "canceled by client" if end is not None else "canceled at the venue",
            }.get(found.status, f"{found.status} at the venue")
            canceled = _resting_canceled(after, reason)
            commit.emit(end.derive(canceled, STAGE) if end is not None
                        else self._later(after, canceled, f"{found.venue_order_id}:end"))
        commit.write("HDEL", key, resting.order_id)
        venue = self.venues.get(found.venue)
        if isinstance(venue, PaperVenue):
            venue.forget(resting.order_id)
        return True

    @staticmethod
    def _later(resting: RestingOrder, payload: Any, name: str) -> Event[Any]:
        """An event routing reports of a resting order on its own (a later fill, the venue's
        end of it): caused by the ``order.created`` it was routed for, its id derived from what
        it reports. On the stream path whichever path created the order: the stream stages
        apply it (a workflow run is over by the time an order rests)."""
        return Event.new(
            payload, portfolio_id=resting.portfolio_id, correlation_id=resting.correlation_id or resting.order_id,
            causation_id=resting.origin_id or None, event_id=derive_event_id(name, STAGE), route=Route.STREAM,
        )


def _resting_canceled(resting: RestingOrder, reason: str) -> OrderCanceled:
    return OrderCanceled(
        order_id=resting.order_id,
        client_order_id=resting.client_order_id,
        reason=reason,
        filled_quantity=resting.filled_quantity,
        canceled_quantity=resting.leaves_quantity,
    )


def _canceled(order: OrderCreated, filled: Decimal, canceled: Decimal, reason: str) -> OrderCanceled:
    return OrderCanceled(
        order_id=order.order_id,
        client_order_id=order.client_order_id,
        reason=reason,
        filled_quantity=filled,
        canceled_quantity=canceled,
    )


def _failed(order: OrderCreated, code: str, reason: str, venue: str | None) -> OrderFailed:
    return OrderFailed(
        order_id=order.order_id, client_order_id=order.client_order_id, reason_code=code, reason=reason, venue=venue
    )
