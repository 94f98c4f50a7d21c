"""``python -m services.demo [--orders N] [--portfolios K] [--concurrency C]``: place orders
through the running stack's HTTP API and report what became of them.

1. Finds the gateway and an admin API key: ``--url``/``--api-key``, else ``ZVT_GATEWAY_URL``/
   ``ZVT_API_KEY``, else the env file ``make up`` writes (``.zvt/local.env``).
2. Creates K portfolios (``PUT``, with balances and a per-order notional limit) and one more
   that it halts (``PUT …/trading-state``), all named after the run, so each run starts flat.
3. Places one market buy per symbol; its fills and the marks price the limit orders.
4. Places the rest, C at a time, with a progress bar: market orders and marketable limits
   (which fill), limits away from the market (which rest; it cancels each), and orders risk
   rejects (over the notional limit, an unknown symbol, the halted portfolio). Each waits
   for its terminal status with ``?wait=``.
5. Prints orders by status, reject reasons, positions per portfolio, latency percentiles of
   submit to terminal status, and where the gateway and the key are.

Exit status 0 when every order ended as planned; 1 when anything unexpected happened (an
order that did not reach its terminal status, or reached another one, any 5xx, any call that
failed); 2 when the gateway cannot be reached.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import dataclasses
import math
import os
import sys
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from decimal import Decimal
from pathlib import Path
from typing import Any, TypeVar

import httpx
from tqdm import tqdm

from devstack.envfile import read_env
from services.client import ApiError, AsyncClient, OrderResult
from services.demo.plan import (
    MAX_NOTIONAL,
    MIN_ORDERS,
    PRICE_GUESS,
    SYMBOLS,
    Kind,
    Plan,
    Planned,
    balances_for,
    build_plan,
    portfolio_ids,
    seed_orders,
)

__all__ = ["Outcome", "Target", "main", "percentile", "resolve_target"]

T = TypeVar("T")

DEFAULT_ENV_FILE = Path(".zvt/local.env")
DEFAULT_URL = "http://127.0.0.1:8080"
RESTING = frozenset({"routed", "partially_filled"})
"""Statuses of a limit order that rests at a venue."""
MAX_RETRIES_429 = 20


class Unexpected(Exception):
    """Something the run did not plan for; the message says what."""


@dataclasses.dataclass(frozen=True)
class Target:
    url: str
    api_key: str
    key_source: str
    sink_url: str | None = None


def resolve_target(url: str | None, api_key: str | None, env_file: Path, environ: Mapping[str, str]) -> Target:
    """Arguments first, then the environment, then the env file."""
    values = read_env(env_file)
    found_url = url or environ.get("ZVT_GATEWAY_URL") or values.get("ZVT_GATEWAY_URL") or DEFAULT_URL
    if api_key:
        key, source = api_key, "--api-key"
    elif environ.get("ZVT_API_KEY"):
        key, source = environ["ZVT_API_KEY"], "$ZVT_API_KEY"
    elif values.get("ZVT_API_KEY"):
        key, source = values["ZVT_API_KEY"], f"ZVT_API_KEY in {env_file}"
    else:
        key, source = "", "none"
    sink = environ.get("ZVT_WEBHOOK_SINK_URL") or values.get("ZVT_WEBHOOK_SINK_URL") or None
    return Target(found_url.rstrip("/"), key, source, sink)


@dataclasses.dataclass
class Outcome:
    planned: Planned
    result: OrderResult | None = None
    latency_s: float | None = None
    """Submit to terminal status (orders that were not meant to rest)."""
    cancel_latency_s: float | None = None
    """Cancel request to ``canceled`` (resting orders)."""
    problem: str | None = None
    retries: int = 0

    @property
    def status(self) -> str:
        return self.result.status if self.result is not None else "(no answer)"


class Run:
    """One run of the job against one gateway."""

    def __init__(self, api: AsyncClient, args: argparse.Namespace) -> None:
        self.api = api
        self.args = args
        self.server_errors = 0
        self.throttled = 0
        self.problems: list[str] = []

    # -- calls ------------------------------------------------------------------------------

    async def call(self, what: str, make: Callable[[], Awaitable[T]]) -> T:
        """``make()``, retrying 429 answers after their ``Retry-After``; counts 5xx."""
        for _ in range(MAX_RETRIES_429):
            try:
                return await make()
            except ApiError as exc:
                if exc.status == 429:
                    self.throttled += 1
                    await asyncio.sleep(exc.retry_after or 0.5)
                    continue
                if exc.status >= 500:
                    self.server_errors += 1
                raise Unexpected(f"{what}: {exc}") from None
            except httpx.HTTPError as exc:
                raise Unexpected(f"{what}: {type(exc).__name__}: {exc}") from None
        raise Unexpected(f"{what}: still throttled (429) after {MAX_RETRIES_429} tries")

    async def poll(self, order_id: str, done: Callable[[OrderResult], bool], timeout: float) -> OrderResult:
        deadline = time.monotonic() + timeout
        pause = 0.01
        while True:
            result = await self.call(f"GET order {order_id}", lambda: self.api.get_order(order_id))
            if done(result) or time.monotonic() >= deadline:
                return result
            await asyncio.sleep(pause)
            pause = min(pause * 2, 0.25)

    # -- orders -----------------------------------------------------------------------------

    async def place(self, planned: Planned) -> Outcome:
        outcome = Outcome(planned)
        try:
            if planned.kind is Kind.RESTING:
                await self._rest_then_cancel(outcome)
            else:
                await self._place_and_wait(outcome)
        except Unexpected as exc:
            outcome.problem = str(exc)
            return outcome
        result = outcome.result
        assert result is not None
        kind = planned.kind
        if not result.is_terminal:
            outcome.problem = f"never reached a terminal status (still {result.status})"
        elif result.status != kind.expected_status:
            why = f": {result.reject_code} {result.reject_reason}" if result.reject_code else ""
            outcome.problem = f"{result.status}{why}, expected {kind.expected_status}"
        elif kind.expected_code is not None and result.reject_code != kind.expected_code:
            outcome.problem = f"rejected with {result.reject_code}, expected {kind.expected_code}"
        return outcome

    async def _place_and_wait(self, outcome: Outcome) -> None:
        request = outcome.planned.request
        started = time.perf_counter()
        result = await self.call(
            f"POST order {request.client_order_id}", lambda: self.api.place_order(request, wait=self.args.wait)
        )
        if not result.is_terminal:
            result = await self.poll(result.order_id, lambda r: r.is_terminal, self.args.timeout)
        if result.is_terminal:
            outcome.latency_s = time.perf_counter() - started
        outcome.result = result

    async def _rest_then_cancel(self, outcome: Outcome) -> None:
        request = outcome.planned.request
        placed = await self.call(f"POST order {request.client_order_id}", lambda: self.api.place_order(request))
        result = await self.poll(placed.order_id, lambda r: r.status in RESTING or r.is_terminal, self.args.timeout)
        outcome.result = result
        if result.status not in RESTING:
            raise Unexpected(f"expected it to rest at the venue, got {result.status}"
                             + (f" ({result.reject_code}: {result.reject_reason})" if result.reject_code else ""))
        started = time.perf_counter()
        await self.call(f"DELETE order {placed.order_id}", lambda: self.api.cancel_order(placed.order_id))
        result = await self.poll(placed.order_id, lambda r: r.is_terminal, self.args.timeout)
        outcome.result = result
        if result.is_terminal:
            outcome.cancel_latency_s = time.perf_counter() - started

    async def place_all(self, orders: Sequence[Planned], bar: tqdm[Any]) -> list[Outcome]:
        gate = asyncio.Semaphore(self.args.concurrency)
        statuses: collections.Counter[str] = collections.Counter()

        async def one(planned: Planned) -> Outcome:
            async with gate:
                outcome = await self.place(planned)
            statuses[outcome.status] += 1
            bar.update(1)
            bar.set_postfix_str(" ".join(f"{s} {n}" for s, n in sorted(statuses.items())), refresh=False)
            return outcome

        return list(await asyncio.gather(*(one(p) for p in orders)))


# -- the job ------------------------------------------------------------------------------------


async def wait_ready(url: str, timeout: float) -> str | None:
    """None once ``/readyz`` answers 200, else why not."""
    deadline = time.monotonic() + timeout
    why = "no answer"
    async with httpx.AsyncClient(base_url=url, timeout=5) as http:
        while True:
            try:
                response = await http.get("/readyz")
                if response.status_code == 200:
                    return None
                why = f"/readyz answered {response.status_code}: {response.text[:200]}"
            except httpx.HTTPError as exc:
                why = f"{type(exc).__name__}: {exc}"
            if time.monotonic() >= deadline:
                return why
            await asyncio.sleep(0.25)


async def setup_portfolios(run: Run, plan: Plan, orders: Sequence[Planned]) -> None:
    limits = {"max_notional_per_order": MAX_NOTIONAL}
    for portfolio in plan.active:
        balances = balances_for(portfolio, orders, PRICE_GUESS)
        await run.call(f"PUT portfolio {portfolio}", lambda: run.api.put_portfolio(
            portfolio, balances=balances, limits=limits))
    await run.call(f"PUT portfolio {plan.halted}", lambda: run.api.put_portfolio(
        plan.halted, balances={"USDT": Decimal(100000)}, limits=limits))
    await run.call(f"PUT trading-state {plan.halted}", lambda: run.api.set_trading_state(plan.halted, "HALTED"))


async def reference_prices(run: Run, seeds: Sequence[Outcome], portfolio: str) -> dict[str, Decimal]:
    """The marks from the positions the seed orders opened; a seed's fill price where there is none."""
    positions = await run.call(f"GET positions {portfolio}", lambda: run.api.positions(portfolio))
    marks = {p["symbol"]: p["mark"] for p in positions if p.get("mark") is not None}
    for outcome in seeds:
        r = outcome.result
        symbol = outcome.planned.request.symbol
        if symbol not in marks and r is not None and r.avg_fill_price is not None:
            marks[symbol] = r.avg_fill_price
    for symbol in SYMBOLS:
        if symbol not in marks:
            run.problems.append(f"no reference price for {symbol}: limits priced off {PRICE_GUESS[symbol]}")
            marks[symbol] = PRICE_GUESS[symbol]
    return marks


async def job(args: argparse.Namespace, target: Target, out: Callable[[str], None]) -> int:
    why = await wait_ready(target.url, args.ready_timeout)
    if why is not None:
        out(f"demo: the gateway at {target.url} is not ready ({why}); start the stack with `make up`")
        return 2
    if not target.api_key:
        out("demo: no API key: pass --api-key, set ZVT_API_KEY, or run `make up` (it writes .zvt/local.env)")
        return 2
    run_id = args.run_id or time.strftime("%m%d-%H%M%S")
    active, halted = portfolio_ids(run_id, args.portfolios)
    seeds = seed_orders(run_id, active[0])
    guess = build_plan(run_id, args.orders, args.portfolios, PRICE_GUESS, seed=args.seed)
    async with AsyncClient(target.url, target.api_key, timeout=args.wait + 10) as api:
        run = Run(api, args)
        started = time.perf_counter()
        try:
            await setup_portfolios(run, guess, [*seeds, *guess.orders])
        except Unexpected as exc:
            out(f"demo: could not set up the portfolios: {exc}")
            return 1
        out(f"demo: run {run_id} against {target.url}: {args.portfolios} portfolio(s) "
            f"{', '.join(active)} and {halted} (HALTED); {args.orders} orders, {args.concurrency} at a time")
        seeded = [await run.place(p) for p in seeds]
        try:
            marks = await reference_prices(run, seeded, active[0])
        except Unexpected as exc:
            run.problems.append(str(exc))
            marks = dict(PRICE_GUESS)
        out("reference prices: " + ", ".join(f"{s} {marks[s]}" for s in SYMBOLS))
        plan = build_plan(run_id, args.orders, args.portfolios, marks, seed=args.seed)
        no_bar = True if args.no_progress else None  # None: a bar only on a terminal
        with tqdm(total=args.orders, initial=len(seeded), unit="order", desc="orders", disable=no_bar,
                  file=sys.stderr, dynamic_ncols=True) as bar:
            outcomes = [*seeded, *await run.place_all(plan.orders, bar)]
        elapsed = time.perf_counter() - started
        positions: dict[str, Any] = {}
        for portfolio in plan.active:
            try:
                positions[portfolio] = await run.call(f"GET positions {portfolio}", lambda: api.positions(portfolio))
            except Unexpected as exc:
                run.problems.append(str(exc))
        webhooks = await webhook_stats(target.sink_url, f"demo-{run_id}-", outcomes, args.webhook_timeout)
    report(out, args, target, run, outcomes, positions, elapsed, webhooks)
    failed = [o for o in outcomes if o.problem] or run.problems or run.server_errors
    return 1 if failed else 0


async def webhook_stats(
    sink_url: str | None, prefix: str, outcomes: Sequence[Outcome], timeout: float
) -> tuple[str, dict[str, Any], int] | None:
    """What the local webhook receiver got for this run's portfolios, once it has at least
    what the run should have caused (or ``timeout`` ran out); None without a receiver."""
    if not sink_url:
        return None
    expected = 0
    for o in outcomes:
        if o.result is not None and o.result.status in ("rejected", "canceled", "failed", "expired"):
            expected += 1
        if o.result is not None:
            expected += len(o.result.fills)
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = {}
    async with httpx.AsyncClient(base_url=sink_url, timeout=5) as http:
        while True:
            try:
                response = await http.get("/stats", params={"portfolio_prefix": prefix})
                stats = dict(response.json())
            except (httpx.HTTPError, ValueError) as exc:
                return sink_url, {"error": f"{type(exc).__name__}: {exc}"}, expected
            if int(stats.get("events", 0)) >= expected or time.monotonic() >= deadline:
                return sink_url, stats, expected
            await asyncio.sleep(0.2)


# -- the report ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of ``values`` (not empty), ``q`` in (0, 100]."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:.1f} ms"


def _latency_line(name: str, values: Sequence[float]) -> str:
    if not values:
        return f"  {name}: none"
    parts = "  ".join(f"p{q} {_ms(percentile(values, q))}" for q in (50, 90, 99))
    return f"  {name} (n={len(values)}): {parts}  max {_ms(max(values))}"


def _num(value: Any, places: int | None = None) -> str:
    if value is None:
        return "-"
    number = Decimal(str(value))
    if places is not None:
        number = number.quantize(Decimal(1).scaleb(-places))
    text = format(number.normalize() if places is None else number, "f")
    return text


def _table(rows: Iterable[Sequence[str]], right: frozenset[int] = frozenset()) -> list[str]:
    rows = [list(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return ["    " + "  ".join(c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
            .rstrip() for r in rows]


def report(
    out: Callable[[str], None], args: argparse.Namespace, target: Target, run: Run, outcomes: Sequence[Outcome],
    positions: Mapping[str, Any], elapsed: float, webhooks: tuple[str, dict[str, Any], int] | None,
) -> None:
    out("")
    out(f"orders: {len(outcomes)} in {elapsed:.1f} s ({len(outcomes) / elapsed:.0f}/s)"
        + (f"; {run.throttled} answered 429 and were retried" if run.throttled else ""))
    statuses = collections.Counter(o.status for o in outcomes)
    out("  by status: " + ", ".join(f"{status} {n}" for status, n in statuses.most_common()))
    by_kind: dict[Kind, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for o in outcomes:
        by_kind[o.planned.kind][o.status] += 1
    rows: list[tuple[str, ...]] = [("kind", "orders", "expected", "got")]
    for kind in Kind:
        if kind in by_kind:
            ended = ", ".join(f"{s} {n}" for s, n in by_kind[kind].most_common())
            rows.append((kind.label, str(sum(by_kind[kind].values())), kind.expected_status, ended))
    out("  by kind:")
    for line in _table(rows, right=frozenset({1})):
        out(line)

    rejected = [o.result for o in outcomes if o.result is not None and o.result.status == "rejected"]
    out("reject reasons:" if rejected else "reject reasons: none")
    reasons: dict[str, list[OrderResult]] = collections.defaultdict(list)
    for r in rejected:
        reasons[r.reject_code or "?"].append(r)
    for code, results in sorted(reasons.items(), key=lambda kv: -len(kv[1])):
        out(f"    {code:<22} {len(results):4d}  e.g. {results[0].reject_reason}")

    out("positions:")
    rows = [("portfolio", "symbol", "quantity", "avg price", "mark", "realized PnL", "unrealized PnL")]
    for portfolio, held in positions.items():
        if not held:
            rows.append((portfolio, "(none)", "", "", "", "", ""))
        for p in held:
            rows.append((
                portfolio, str(p["symbol"]), _num(p["quantity"]), _num(p["average_price"], 2), _num(p.get("mark")),
                _num(p["realized_pnl"], 4), _num(p.get("unrealized_pnl"), 4),
            ))
    for line in _table(rows, right=frozenset({2, 3, 4, 5, 6})):
        out(line)

    out("latency:")
    out(_latency_line("submit -> terminal status", [o.latency_s for o in outcomes if o.latency_s is not None]))
    out(_latency_line("cancel -> canceled", [o.cancel_latency_s for o in outcomes if o.cancel_latency_s is not None]))

    if webhooks is not None:
        url, stats, expected = webhooks
        if "error" in stats:
            out(f"webhooks: the receiver at {url} did not answer ({stats['error']})")
        else:
            types = ", ".join(f"{t} {n}" for t, n in stats.get("by_type", {}).items())
            got = int(stats.get("events", 0))
            note = "" if got >= expected else f" (of {expected} expected so far; the rest may still be on the way)"
            out(f"webhooks: {got} notifications for this run received at {url}{note}" + (f": {types}" if types else ""))

    out(f"gateway: {target.url}  (API key: {target.key_source})")

    problems = [f"{o.planned.request.client_order_id} ({o.planned.kind.label}): {o.problem}" for o in outcomes if o.problem]
    problems += run.problems
    if run.server_errors:
        problems.append(f"{run.server_errors} answer(s) with a 5xx status")
    if problems:
        out(f"demo: FAILED, {len(problems)} unexpected:")
        for line in problems[:20]:
            out(f"  - {line}")
        if len(problems) > 20:
            out(f"  … and {len(problems) - 20} more")
    else:
        out("demo: ok, every order ended as planned")


# -- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m services.demo",
        description="Place a mix of orders through the running stack's HTTP API (market and limit orders that "
        "fill, limits that rest and are canceled, orders risk rejects) and report what became of them. "
        "Exit status 0: every order ended as planned; 1: something did not; 2: no gateway.",
        epilog="Needs the local stack: `make up` starts it and runs this job.",
    )
    parser.add_argument("--orders", type=int, default=200, help=f"orders to place in all (default 200, at least {MIN_ORDERS})")
    parser.add_argument("--portfolios", type=int, default=5, help="portfolios to create (default 5), plus a halted one")
    parser.add_argument("--concurrency", type=int, default=16, help="orders in flight at once (default 16)")
    parser.add_argument("--url", help="the gateway (default: $ZVT_GATEWAY_URL, then the env file, then "
                        f"{DEFAULT_URL})")
    parser.add_argument("--api-key", help="an admin API key (default: $ZVT_API_KEY, then the env file)")
    parser.add_argument("--env-file", type=Path, default=DEFAULT_ENV_FILE,
                        help=f"where `make up` keeps the gateway URL and key (default {DEFAULT_ENV_FILE})")
    parser.add_argument("--wait", type=float, default=10.0, help="?wait= of each order, seconds (default 10, at most 30)")
    parser.add_argument("--timeout", type=float, default=30.0,
                        help="how long an order may take to reach its terminal status after that (default 30)")
    parser.add_argument("--ready-timeout", type=float, default=30.0, help="how long to wait for the gateway's /readyz")
    parser.add_argument("--webhook-timeout", type=float, default=5.0,
                        help="how long to wait for the notifications to reach the local webhook receiver")
    parser.add_argument("--run-id", help="names the run's portfolios and client order ids (default: month-day-time)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the order mix")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    if args.orders < MIN_ORDERS:
        parser.error(f"--orders must be at least {MIN_ORDERS}")
    if args.portfolios < 1 or args.concurrency < 1:
        parser.error("--portfolios and --concurrency must be at least 1")
    if not 0 < args.wait <= 30:
        parser.error("--wait must be above 0 and at most 30")
    if args.run_id is not None and not args.run_id.replace("-", "").isalnum():
        parser.error("--run-id takes letters, digits and '-'")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    target = resolve_target(args.url, args.api_key, args.env_file, os.environ)

    def out(line: str) -> None:
        tqdm.write(line, file=sys.stdout)

    try:
        return asyncio.run(job(args, target, out))
    except KeyboardInterrupt:
        out("demo: interrupted")
        return 130
