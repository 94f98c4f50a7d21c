"""``python -m devstack start|stop|status [--only single|cluster|postgres]``."""

from __future__ import annotations

import argparse
import logging
import sys

from devstack import stack


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack",
        description="Manage the local Redis, Redis Cluster and PostgreSQL on 127.0.0.1 (data in .zvt/).",
    )
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument(
        "--only",
        action="append",
        choices=stack.COMPONENTS,
        help="act on this component only (repeatable; default: all)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="devstack: %(message)s", stream=sys.stderr)

    try:
        if args.command == "start":
            stack.ensure(args.only)
        elif args.command == "stop":
            stack.stop(args.only)
        for component in stack.status(args.only):
            print(component.line())
    except stack.DevstackError as exc:
        print(f"devstack: error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
