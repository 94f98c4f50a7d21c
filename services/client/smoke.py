"""``python -m services.client.smoke``: place one market order through the gateway and check
that it fills; exit 0 when it does, 1 when it does not, 2 on bad arguments.

The chart's ``helm test`` runs it in the fleet's image against the gateway Service. It makes
sure its portfolio exists (``PUT``, with enough quote balance), places a market buy with a
fresh client order id and waits for the terminal status (``?wait=``). The gateway address and
an API key allowed to write the portfolio come from ``ZVT_GATEWAY_URL`` and ``ZVT_API_KEY``
(or ``--url`` and ``--api-key``).
"""

from __future__ import annotations

import argparse
import sys
from decimal import Decimal, InvalidOperation

import httpx

from services.client.client import Client
from services.client.models import ApiError, OrderRequest

__all__ = ["main"]


def _quantity(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        raise argparse.ArgumentTypeError(f"not a decimal number: {text!r}") from None
    if not value.is_finite() or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive decimal number: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.client.smoke",
        description="Place one market order through the gateway and check that it fills.",
    )
    parser.add_argument("--url", default=None, help="gateway base URL (default: $ZVT_GATEWAY_URL)")
    parser.add_argument("--api-key", default=None, help="API key (default: $ZVT_API_KEY)")
    parser.add_argument("--portfolio", default="smoke", help="portfolio to trade in (created if missing)")
    parser.add_argument("--symbol", default="BTC/USDT", help="symbol to buy")
    parser.add_argument("--quantity", type=_quantity, default=Decimal("0.001"), help="quantity to buy")
    parser.add_argument("--balance", type=_quantity, default=Decimal(1_000_000),
                        help="quote balance the portfolio is given")
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for the fill")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.timeout <= 0:
        print("smoke: --timeout must be positive", file=sys.stderr)
        return 2
    quote = args.symbol.partition("/")[2]
    if not quote:
        print(f"smoke: --symbol must be BASE/QUOTE, got {args.symbol!r}", file=sys.stderr)
        return 2
    with Client(args.url, args.api_key, timeout=args.timeout + 10) as client:
        try:
            client.put_portfolio(args.portfolio, base_currency=quote, balances={quote: args.balance})
            result = client.place_order(
                OrderRequest(portfolio_id=args.portfolio, symbol=args.symbol, side="buy", quantity=args.quantity),
                wait=args.timeout,
            )
        except ApiError as exc:
            print(f"smoke: the gateway answered {exc.status}: {exc}", file=sys.stderr)
            return 1
        except httpx.HTTPError as exc:
            print(f"smoke: could not reach the gateway: {exc}", file=sys.stderr)
            return 1
    if result.status != "filled":
        print(f"smoke: order {result.order_id} ended {result.status}, not filled", file=sys.stderr)
        return 1
    if result.filled_quantity != args.quantity:
        print(f"smoke: order {result.order_id} filled {result.filled_quantity}, not {args.quantity}", file=sys.stderr)
        return 1
    print(f"smoke: order {result.order_id} filled {result.filled_quantity} {args.symbol} at {result.avg_fill_price}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
