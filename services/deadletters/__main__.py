"""``python -m services.deadletters list | show | requeue | purge``: handle dead letters.

Reads the same settings as the services (``ZVT_REDIS_URL``, ``ZVT_REDIS_CLUSTER``,
``ZVT_BUS_NAMESPACE``, ``ZVT_BUS_SHARDS``). A dead letter is named ``<shard>/<entry id>``, as
``list`` prints it.

    list     [filters] [--json] [--limit N]    one line per dead letter (JSON lines with --json)
    show     ID                                the whole entry: its error and the original event
    requeue  ID... | filters | --all           back onto its stream, for its group only, once
    purge    ID... | filters | --all           delete them

Filters: --stream (event type or stream key), --group, --reason (substring), --older-than and
--newer-than (an age: 90s, 15m, 2h, 7d), --shard. Exit 0 on success, 1 when ``show`` finds
nothing or a dead letter could not be requeued, 2 on bad usage or settings.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import sys
import time
from typing import Any

from redis.exceptions import RedisError

from services.core.bus import Bus, DeadLetter
from services.core.codec import DecodeError, decode_any
from services.core.redisconn import open_redis
from services.core.settings import BusSettings, CoreSettings, SettingsError, load
from services.deadletters import Filters, Outcome, find, parse_age, purge, requeue, select

__all__ = ["main", "run"]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m services.deadletters", description=(__doc__ or "").split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(__doc__ or "").split("\n\n", 1)[-1],
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def filters(p: argparse.ArgumentParser) -> None:
        p.add_argument("--stream", help="event type (order.requested) or stream key")
        p.add_argument("--group", help="consumer group that dead-lettered it")
        p.add_argument("--reason", help="substring of the reason (handler_error, malformed, ...)")
        p.add_argument("--older-than", type=_age, metavar="AGE", help="dead-lettered at least AGE ago (15m, 2h)")
        p.add_argument("--newer-than", type=_age, metavar="AGE", help="dead-lettered at most AGE ago")
        p.add_argument("--shard", type=int, help="only this shard")

    listing = commands.add_parser("list", help="list dead letters")
    filters(listing)
    listing.add_argument("--json", action="store_true", help="one JSON object per line")
    listing.add_argument("--limit", type=int, default=1000, help="at most this many (default 1000)")
    show = commands.add_parser("show", help="show one dead letter with its error and event")
    show.add_argument("id", help="<shard>/<entry id>, as list prints it")
    for name, what in (("requeue", "put back on its stream for its group"), ("purge", "delete")):
        p = commands.add_parser(name, help=f"{what}: the IDs given, or what the filters select")
        p.add_argument("ids", nargs="*", metavar="ID")
        filters(p)
        p.add_argument("--all", action="store_true", help="every dead letter (needed without IDs or filters)")
    return parser


def _age(text: str) -> float:
    try:
        return parse_age(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _filters(args: argparse.Namespace) -> Filters:
    return Filters(stream=args.stream, group=args.group, reason=args.reason, older_than_s=args.older_than,
                   newer_than_s=args.newer_than, shard=args.shard)


def _summary(letter: DeadLetter, now: float) -> dict[str, Any]:
    return {
        "id": letter.ref, "dead_lettered_at": _iso(letter.dead_lettered_at),
        "age_s": round(max(0.0, now - letter.dead_lettered_at / 1000), 3), "group": letter.group,
        "stream": letter.stream, "event_type": letter.stream.rsplit(":", 1)[-1], "entry_id": letter.entry_id,
        "reason": letter.reason, "deliveries": letter.deliveries, "consumer": letter.consumer,
        "event_id": letter.event_id, "error": letter.error,
    }


def _iso(ms: int) -> str:
    return dt.datetime.fromtimestamp(ms / 1000, dt.UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _line(s: dict[str, Any]) -> str:
    error = s["error"].replace("\n", " ")
    error = error if len(error) <= 100 else error[:97] + "..."
    return (f"{s['id']}  {s['dead_lettered_at']}  group={s['group']}  type={s['event_type']}  "
            f"reason={s['reason']}  deliveries={s['deliveries']}  event={s['event_id'] or '-'}  {error}")


def _show(letter: DeadLetter) -> str:
    s = _summary(letter, time.time())
    lines = [f"{k + ':':<18}{v}" for k, v in s.items() if k != "error"]
    lines += ["error:", *("  " + line for line in (letter.error or "-").splitlines())]
    if not letter.data:
        lines.append("event:            (none: its data was lost)")
    else:
        try:
            decode_any(letter.data)  # a valid event of a known type and version
            lines += ["event:", json.dumps(json.loads(letter.data), indent=2, sort_keys=True)]
        except (DecodeError, ValueError):
            lines += ["event (raw, not a valid event):", repr(letter.data[:4000])]
    return "\n".join(lines)


async def _chosen(bus: Bus, args: argparse.Namespace) -> list[DeadLetter] | str:
    filters = _filters(args)
    if args.ids:
        if not filters.empty or args.all:
            return "give IDs or filters, not both"
        letters = []
        for ref in args.ids:
            letter = await find(bus, ref)
            if letter is not None:
                letters.append(letter)
            else:
                print(f"{ref}: no such dead letter (already requeued or purged)")
        return letters
    if filters.empty and not args.all:
        return f"{args.command} without IDs or filters needs --all"
    return [letter async for letter in select(bus, filters)]


def _report(verb: str, out: Outcome) -> int:
    for ref in out.gone:
        print(f"{ref}: no such dead letter (already requeued or purged)")
    for ref, why in out.kept:
        print(f"{ref}: not {verb}: {why}", file=sys.stderr)
    print(f"{verb} {len(out.done)}" + (f", {len(out.kept)} kept" if out.kept else ""))
    return 1 if out.kept else 0


async def run(argv: list[str]) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        core = load(CoreSettings, service="deadletters")
        settings = load(BusSettings)
    except SettingsError as exc:
        print(f"deadletters: {exc.line}", file=sys.stderr)
        return 2
    redis = await open_redis(core)
    try:
        bus = Bus(redis, settings)
        if args.command == "list":
            now = time.time()
            async for letter in select(bus, _filters(args), limit=args.limit):
                s = _summary(letter, now)
                print(json.dumps(s, sort_keys=True) if args.json else _line(s))
            return 0
        if args.command == "show":
            found = await find(bus, args.id)
            if found is None:
                print(f"{args.id}: no dead letter with this id", file=sys.stderr)
                return 1
            print(_show(found))
            return 0
        chosen = await _chosen(bus, args)
        if isinstance(chosen, str):
            print(f"deadletters: {chosen}", file=sys.stderr)
            return 2
        if args.command == "requeue":
            return _report("requeued", await requeue(bus, chosen))
        return _report("purged", await purge(bus, chosen))
    except ValueError as exc:
        print(f"deadletters: {exc}", file=sys.stderr)
        return 2
    except RedisError as exc:
        print(f"deadletters: Redis: {exc}", file=sys.stderr)
        return 1
    finally:
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    return asyncio.run(run(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    raise SystemExit(main())
