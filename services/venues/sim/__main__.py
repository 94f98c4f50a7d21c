"""``python -m services.venues.sim --name X --port N ...``: one simulated venue server.

Speaks the Binance spot REST subset ccxt's ``binance`` client uses (``sim/binance.py``),
backed by a ``PaperVenue`` with its own prices, spread and fees, so several instances stand
for several venues. Prints ``ready <name> http://host:port`` once it listens; stops on
SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from decimal import Decimal, InvalidOperation

import uvloop

from services.venues.base import Market
from services.venues.paper import DEFAULT_MARKETS, DEFAULT_PRICES, PaperVenue
from services.venues.sim.binance import BinanceSim
from services.venues.sim.http import serve

__all__ = ["build_venue", "main", "parse_args"]


def _decimal(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal number: {text!r}") from None
    if not value.is_finite():
        raise argparse.ArgumentTypeError(f"not a finite number: {text!r}")
    return value


def _pairs(text: str) -> dict[str, Decimal]:
    """``BTC/USDT=60000,ETH/USDT=3000`` (or ``USDT=1000``)."""
    out: dict[str, Decimal] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        if not sep or not name:
            raise argparse.ArgumentTypeError(f"expected NAME=NUMBER, got {part!r}")
        out[name] = _decimal(value)
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m services.venues.sim", description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--name", required=True, help="the venue's name (what routing calls it)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--api-key", default="sim-key", help="the API key clients must send (X-MBX-APIKEY)")
    p.add_argument("--secret", default="sim-secret", help="the HMAC-SHA256 signing secret")
    p.add_argument("--prices", type=_pairs, default={}, help="starting mids, SYMBOL=PRICE,... (default: the paper prices)")
    p.add_argument("--price-scale", type=_decimal, default=Decimal(1),
                   help="multiply every starting mid by this (e.g. 1.0004 for a venue quoting a little higher)")
    p.add_argument("--spread", type=_decimal, default=Decimal("0.0005"),
                   help="distance between book levels as a fraction of the mid (the touch is half of it away)")
    p.add_argument("--maker-fee", type=_decimal, default=Decimal("0.0008"))
    p.add_argument("--taker-fee", type=_decimal, default=Decimal("0.001"))
    p.add_argument("--level-notional", type=_decimal, default=Decimal("50000"), help="quote depth of the first level")
    p.add_argument("--volatility", type=_decimal, default=Decimal(0), help="largest random-walk step, fraction of the mid")
    p.add_argument("--tick-s", type=float, default=1.0, help="seconds between random-walk steps (with --volatility)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--balances", type=_pairs, default={"USDT": Decimal("1000000000000")},
                   help="starting free balances, ASSET=AMOUNT,... (default: a bottomless USDT account; base assets "
                        "start at 10^12 too)")
    p.add_argument("--recv-window-ms", type=int, default=10_000)
    args = p.parse_args(argv)
    if not 0 < args.port < 65536:
        p.error("--port must be 1..65535")
    if args.price_scale <= 0 or args.spread <= 0 or args.level_notional <= 0 or args.volatility < 0:
        p.error("--price-scale, --spread and --level-notional must be positive, --volatility not negative")
    if not (-1 < args.maker_fee < 1 and 0 <= args.taker_fee < 1):
        p.error("fee rates out of range")
    return args


def build_venue(args: argparse.Namespace) -> PaperVenue:
    import dataclasses

    markets: list[Market] = [
        dataclasses.replace(m, maker_fee=args.maker_fee, taker_fee=args.taker_fee) for m in DEFAULT_MARKETS.values()
    ]
    prices = {s: (args.prices.get(s, DEFAULT_PRICES[s]) * args.price_scale) for s in DEFAULT_MARKETS}
    balances = {asset: Decimal("1000000000000") for m in markets for asset in (m.base, m.quote)}
    balances.update(args.balances)
    return PaperVenue(
        args.name, markets=markets, prices=prices, balances=balances, seed=args.seed,
        volatility=args.volatility, level_spacing=args.spread, level_notional=args.level_notional,
    )


async def _run(args: argparse.Namespace) -> None:
    venue = build_venue(args)
    app = BinanceSim(venue, api_key=args.api_key, secret=args.secret, recv_window_ms=args.recv_window_ms)
    server = await serve(app, args.host, args.port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"ready {args.name} http://{args.host}:{args.port}", flush=True)

    async def walk() -> None:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), args.tick_s)
            except TimeoutError:
                venue.tick()

    walker = asyncio.create_task(walk()) if args.volatility > 0 and args.tick_s > 0 else None
    await stop.wait()
    if walker is not None:
        await walker
    server.close()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    uvloop.run(_run(args))
    sys.exit(0)


if __name__ == "__main__":
    main()
