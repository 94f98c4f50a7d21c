"""``python -m services.ops`` (or ``zvt-ops``): show and steer the fleet in a Kubernetes cluster.

    status                                   per service: replicas desired/ready/available, the
                                             autoscaler (min, max, paused), the PDB, and the
                                             consumer group's lag read from Redis (ZVT_REDIS_*)
    scale SERVICE N                          set the Deployment's replicas
    autoscaling pause|resume SERVICE         KEDA's paused annotation on its ScaledObject
    restart SERVICE                          a rollout restart (new pods, one budget at a time)
    chaos SERVICE --kill N --every S --for T evict random pods within the PDB; dry run unless
                                             --yes; only in a namespace labelled zvt.io/chaos=allowed
    events [--service S] [--for T]           the fleet's events, then a watch (until T seconds)

As kubectl: -n/--namespace, --context, --kubeconfig (else KUBECONFIG, else ~/.kube/config; in a
pod, its service account). Exit 0 on success, 1 when chaos leaves the service unrecovered, 2
on bad input, an unknown service, no cluster or no permission (one line on stderr).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from typing import Any

from services.ops.chaos import ChaosPlan, run_chaos
from services.ops.cluster import Fleet, OpsError, Service
from services.ops.lag import GroupLag, read_lag

__all__ = ["main"]


def _duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600}
    try:
        value = float(text[:-1]) * units[text[-1]] if text and text[-1] in units else float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration: {text!r} (30, 30s, 5m)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative duration: {text!r}")
    return value


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"negative: {text!r}")
    return value


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line and exit 2, as every other bad input
        raise OpsError(f"{self.prog}: {message}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m services.ops", description=(__doc__ or "").split("\n\n")[0],
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=(__doc__ or "").split("\n\n", 1)[-1])
    parser.add_argument("-n", "--namespace", help="the fleet's namespace (default: the context's)")
    parser.add_argument("--context", help="kubeconfig context (default: the current one)")
    parser.add_argument("--kubeconfig", help="kubeconfig file (default: KUBECONFIG, else ~/.kube/config)")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    status = commands.add_parser("status", help="replicas, autoscaler, PDB and lag of each service")
    status.add_argument("--json", action="store_true", help="one JSON object per service")
    status.add_argument("--no-lag", action="store_true", help="do not read consumer-group lag from Redis")
    scale = commands.add_parser("scale", help="set a service's replicas")
    scale.add_argument("service")
    scale.add_argument("replicas", type=_count)
    autoscaling = commands.add_parser("autoscaling", help="pause or resume a service's KEDA autoscaling")
    autoscaling.add_argument("action", choices=("pause", "resume"))
    autoscaling.add_argument("service")
    restart = commands.add_parser("restart", help="a rollout restart of a service")
    restart.add_argument("service")
    chaos = commands.add_parser("chaos", help="evict random pods of a service (dry run unless --yes)")
    chaos.add_argument("service")
    chaos.add_argument("--kill", type=_count, default=1, help="pods per round, at most (default 1)")
    chaos.add_argument("--every", type=_duration, default=30.0, help="between rounds (default 30s)")
    chaos.add_argument("--for", dest="for_s", type=_duration, default=0.0,
                       help="keep going this long (default: one round)")
    chaos.add_argument("--recover-timeout", type=_duration, default=120.0,
                       help="how long to wait for the Deployment to recover (default 120s)")
    chaos.add_argument("--seed", type=int, help="seed of the random choice (repeatable runs)")
    chaos.add_argument("--yes", action="store_true", help="really evict (without it: a dry run)")
    events = commands.add_parser("events", help="the fleet's events, then a watch")
    events.add_argument("--service", help="only this service's objects")
    events.add_argument("--for", dest="for_s", type=_duration, help="stop watching after this long (default: never)")
    return parser


# --- status ----------------------------------------------------------------------------------

def _row(s: Service, lag: dict[str, GroupLag] | str) -> dict[str, Any]:
    a, b = s.autoscaler, s.budget
    group_lag = lag.get(s.consumer_group) if isinstance(lag, dict) and s.consumer_group else None
    return {
        "service": s.name, "deployment": s.deployment, "desired": s.desired, "ready": s.ready,
        "available": s.available, "updated": s.updated,
        "autoscaler": None if a is None else {"kind": a.kind, "name": a.name, "min": a.min_replicas,
                                              "max": a.max_replicas, "paused": a.paused},
        "pdb": None if b is None else {"name": b.name, "max_unavailable": b.max_unavailable,
                                       "min_available": b.min_available, "disruptions_allowed": b.disruptions_allowed},
        "consumer_group": s.consumer_group,
        "lag": None if group_lag is None else group_lag.lag,
        "pending": None if group_lag is None else group_lag.pending,
    }


def _text_rows(rows: list[dict[str, Any]]) -> list[str]:
    def scaler(r: dict[str, Any]) -> str:
        a = r["autoscaler"]
        if a is None:
            return "-"
        kind = "keda" if a["kind"] == "ScaledObject" else "hpa"
        return f"{kind} {a['min'] if a['min'] is not None else '?'}-{a['max']}" + (" PAUSED" if a["paused"] else "")

    def budget(r: dict[str, Any]) -> str:
        b = r["pdb"]
        if b is None:
            return "-"
        rule = f"maxUnavailable={b['max_unavailable']}" if b["max_unavailable"] is not None \
            else f"minAvailable={b['min_available']}"
        return f"{rule} allowed={b['disruptions_allowed']}"

    def lag(r: dict[str, Any]) -> str:
        if r["consumer_group"] is None:
            return "-"
        if r["lag"] is None:
            return f"{r['consumer_group']}: ?"
        return f"{r['consumer_group']}: {r['lag']} (pending {r['pending']})"

    table = [("SERVICE", "DESIRED", "READY", "AVAILABLE", "AUTOSCALER", "PDB", "LAG")]
    table += [(r["service"], str(r["desired"]), str(r["ready"]), str(r["available"]), scaler(r), budget(r), lag(r))
              for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    return ["  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip() for line in table]


def _status(fleet: Fleet, args: argparse.Namespace) -> int:
    services = list(fleet.services().values())
    if not services:
        raise OpsError(f"no zvt-fleet Deployments in namespace {fleet.namespace}")
    lag: dict[str, GroupLag] | str = {}
    if not args.no_lag:
        lag = read_lag(s.consumer_group for s in services if s.consumer_group)
        if isinstance(lag, str):
            print(f"ops: consumer-group lag not read: {lag}", file=sys.stderr)
    rows = [_row(s, lag) for s in services]
    if args.json:
        for row in rows:
            print(json.dumps(row, sort_keys=True))
    else:
        print("\n".join(_text_rows(rows)))
    return 0


# --- the rest --------------------------------------------------------------------------------

def _scale(fleet: Fleet, args: argparse.Namespace) -> int:
    service = fleet.service(args.service)
    fleet.scale(service, args.replicas)
    print(f"{service.name}: replicas {service.desired} -> {args.replicas}")
    a = service.autoscaler
    if a is not None and not a.paused:
        hint = f"; `autoscaling pause {service.name}` first to keep it" if a.kind == "ScaledObject" else ""
        print(f"ops: note: {a.kind} {a.name} still scales {service.name} ({a.min_replicas}-{a.max_replicas}){hint}",
              file=sys.stderr)
    return 0


def _autoscaling(fleet: Fleet, args: argparse.Namespace) -> int:
    service = fleet.service(args.service)
    fleet.set_paused(service, args.action == "pause")
    state = "paused (KEDA keeps the current replicas)" if args.action == "pause" else "resumed"
    print(f"{service.name}: autoscaling {state}")
    return 0


def _restart(fleet: Fleet, args: argparse.Namespace) -> int:
    service = fleet.service(args.service)
    at = fleet.restart(service)
    print(f"{service.name}: restart requested at {at} (deployment {service.deployment})")
    return 0


def _chaos(fleet: Fleet, args: argparse.Namespace) -> int:
    plan = ChaosPlan(args.service, args.kill, args.every, args.for_s, args.recover_timeout, args.yes, args.seed)
    report = run_chaos(fleet, plan, lambda line: print(line, flush=True))
    return 1 if report.recovered is False else 0


def _events(fleet: Fleet, args: argparse.Namespace) -> int:
    services = fleet.services()
    chosen = [fleet.service(args.service)] if args.service else list(services.values())
    names = {s.deployment for s in chosen}
    extra = {n for s in chosen for n in (s.autoscaler.name if s.autoscaler else None,
                                         s.budget.name if s.budget else None) if n}

    def ours(name: str) -> bool:
        # the Deployment, its ReplicaSets (<deployment>-<hash>) and their pods (<rs>-<suffix>),
        # its autoscaler and its PDB
        return name in names or name in extra or any(name.startswith(f"{d}-") for d in names)

    for event in fleet.events(args.for_s):
        obj = event.involved_object
        if ours(obj.name or ""):
            when = event.last_timestamp or event.event_time or event.metadata.creation_timestamp
            stamp = when.astimezone(dt.UTC).strftime("%H:%M:%S") if when else "-"
            count = f" (x{event.count})" if event.count and event.count > 1 else ""
            print(f"{stamp}  {event.type or '-':<7} {event.reason or '-':<24} {obj.kind}/{obj.name}: "
                  f"{(event.message or '').strip()}{count}", flush=True)
    return 0


COMMANDS = {"status": _status, "scale": _scale, "autoscaling": _autoscaling, "restart": _restart,
            "chaos": _chaos, "events": _events}


def main(argv: list[str] | None = None) -> int:
    try:
        args = _parser().parse_args(sys.argv[1:] if argv is None else argv)
        fleet = Fleet.connect(args.namespace, args.context, args.kubeconfig)
        return COMMANDS[args.command](fleet, args)
    except OpsError as exc:
        print(f"ops: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
