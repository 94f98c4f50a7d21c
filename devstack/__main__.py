"""``python -m devstack start|stop|status [--only single|cluster|postgres] [--redis-password PW]``:
the local Redis, Redis Cluster and PostgreSQL. With a Redis password (``--redis-password`` or,
better, ``ZVT_DEVSTACK_REDIS_PASSWORD``, which keeps it off the command line) the single Redis
and every cluster node run with ``requirepass`` (and ``masterauth``), and ``fleet start`` gives
it to every service as ``ZVT_REDIS_PASSWORD``. A server already running with another password
(or none) is refused with a clear error: ``stop`` it first.

``python -m devstack k8s [--keep] -- CMD ARGS...``: a Kubernetes control plane (etcd, API server,
controller manager, scheduler, kwok's fake nodes) in a private network namespace for as long as
CMD runs there, with ``KUBECONFIG`` set and helm and kubectl on ``PATH``; CMD's exit status is
passed on (``devstack.k8s``).

``python -m devstack fleet start|stop|status``: every service of the fleet as detached local
processes against them (what ``make up`` / ``make down`` / ``make status`` run). ``fleet start``
writes the fleet's whole environment to ``.zvt/fleet.env`` and, for the tools that talk to the
stack (the demo, the client, locust), ``ZVT_GATEWAY_URL`` and ``ZVT_API_KEY`` to
``.zvt/local.env`` (both mode 0600). The dev admin API key is made up once and kept in
``local.env``; later starts reuse it. Services already running are left alone.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import socket
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from urllib.parse import urlsplit

from devstack import fleet, hatchet, stack
from devstack.envfile import read_env, write_env

WEBHOOKS = "demo.webhooks"
"""The local webhook receiver the notifications service posts to (``services.demo.webhooks``)."""
FLEET_NAMES: tuple[str, ...] = (WEBHOOKS, *fleet.SERVICES)
"""What ``fleet start`` runs, in start order (``fleet stop`` goes the other way)."""
REDIS_URLS = {"cluster": stack.CLUSTER_URL, "single": stack.SINGLE_URL}
"""Where the fleet's Redis is (the password, if any, goes separately: ``ZVT_REDIS_PASSWORD``)."""
CLIENT_ONLY = frozenset({"ZVT_GATEWAY_URL", "ZVT_API_KEY", "ZVT_WEBHOOK_SINK_URL", "ZVT_SERVICE", "ZVT_HTTP_PORT"})
"""``ZVT_*`` variables that are not fleet settings: never copied from the caller into fleet.env."""
FLEET_ENV = "fleet.env"
LOCAL_ENV = "local.env"


def main(argv: list[str] | None = None) -> int:
    args_list = sys.argv[1:] if argv is None else argv
    logging.basicConfig(level=logging.INFO, format="devstack: %(message)s", stream=sys.stderr)
    if args_list[:1] == ["fleet"]:
        return fleet_main(args_list[1:])
    if args_list[:1] == ["k8s"]:
        return k8s_main(args_list[1:])
    parser = argparse.ArgumentParser(
        prog="python -m devstack",
        description="Manage the local Redis, Redis Cluster and PostgreSQL on 127.0.0.1 (data in .zvt/). "
        "`python -m devstack fleet --help`: the services.",
    )
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument(
        "--only",
        action="append",
        choices=stack.COMPONENTS,
        help="act on this component only (repeatable; default: all)",
    )
    parser.add_argument(
        "--redis-password", metavar="PASSWORD",
        help=f"run (and reach) the Redis servers with this password; prefer the {stack.PASSWORD_ENV} variable, "
        "which stays off the process list",
    )
    args = parser.parse_args(args_list)
    if args.redis_password:
        os.environ[stack.PASSWORD_ENV] = args.redis_password

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


# ---------------------------------------------------------------------------------------------
# python -m devstack k8s


def k8s_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack k8s",
        description="Start a Kubernetes control plane (kwok nodes, no containers) in a private network namespace, "
        "run CMD there with KUBECONFIG set and helm and kubectl on PATH, then tear it down; exits with CMD's status.",
    )
    parser.add_argument("--keep", action="store_true", help="keep the control plane's state and logs (kept anyway "
                        "when CMD fails)")
    parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ARGS", help="what to run there")
    args = parser.parse_args(argv)
    cmd = args.cmd[1:] if args.cmd[:1] == ["--"] else args.cmd
    if not cmd:
        parser.error("name a command: python -m devstack k8s -- CMD ARGS...")
    from devstack import k8s

    try:
        return k8s.run(cmd, keep=args.keep)
    except stack.DevstackError as exc:
        print(f"devstack: error: {exc}", file=sys.stderr)
        return 1


# ---------------------------------------------------------------------------------------------
# python -m devstack fleet


def fleet_main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m devstack fleet",
        description="Run every service of the fleet as detached local processes (pid files and logs under .zvt/).",
    )
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument("--only", action="append", choices=FLEET_NAMES, metavar="SERVICE",
                        help=f"act on this service only (repeatable; default: all of {', '.join(FLEET_NAMES)})")
    parser.add_argument("--state-dir", type=Path, default=stack.STATE_DIR,
                        help="where the env files, pid files (fleet/) and logs (logs/) go (default: .zvt)")
    start = parser.add_argument_group("start")
    start.add_argument("--redis", choices=tuple(REDIS_URLS), default="cluster",
                       help=f"the Redis Cluster ({stack.CLUSTER_URL}, default) or the single Redis ({stack.SINGLE_URL})")
    start.add_argument("--namespace", default="zvt", help="ZVT_BUS_NAMESPACE (default zvt)")
    start.add_argument("--gateway-port", type=int, default=8080, help="port of the public API (default 8080)")
    start.add_argument("--webhook-port", type=int, default=8081,
                       help="port of the local webhook receiver the notifications service posts to (default 8081)")
    start.add_argument("--profile", choices=("paper", "staging"), default="paper",
                       help="paper: routing trades on the in-process paper venue (default); staging: three simulated "
                            "venue servers (Binance spot API) and routing trading on them through ccxt")
    start.add_argument("--venue-port", type=int, default=9101,
                       help="staging: the first simulated venue's port; the others follow (default 9101)")
    args = parser.parse_args(argv)

    state_dir = args.state_dir.resolve()
    use_state_dir(state_dir)
    names = [n for n in FLEET_NAMES if not args.only or n in args.only]
    try:
        if args.command == "start":
            for line in start_fleet(args, state_dir, names, os.environ):
                print(line)
        elif args.command == "stop":
            lines = fleet.stop_detached(list(reversed(names)))
            if not args.only:
                lines += fleet.stop_venues_detached()
            for line in lines or ["fleet: nothing was running"]:
                print(line)
        else:
            for line in fleet_status(state_dir, names):
                print(line)
    except stack.DevstackError as exc:
        print(f"devstack: error: {exc}", file=sys.stderr)
        return 1
    return 0


def use_state_dir(state_dir: Path) -> None:
    """Point ``devstack.fleet``'s detached helpers at ``state_dir`` (pid files, logs): they read
    these module globals on every call."""
    setattr(fleet, "STATE_DIR", state_dir)  # noqa: B010 - imported there, not exported
    fleet.FLEET_DIR = state_dir / "fleet"


def start_fleet(args: argparse.Namespace, state_dir: Path, names: Sequence[str], environ: Mapping[str, str]) -> list[str]:
    fleet_file, local_file = state_dir / FLEET_ENV, state_dir / LOCAL_ENV
    previous = read_env(fleet_file)
    env, local = fleet_environment(args, state_dir, environ, previous, read_env(local_file))
    lines = [f"fleet: settings in {_show(fleet_file)} ({describe(env)})"]
    running = [line.split()[0] for line in fleet.status_detached(names) if " running " in f"{line} "]
    changed = sorted(k for k in set(env) | set(previous) if env.get(k) != previous.get(k))
    if previous and changed and running:
        lines.append(
            f"fleet: warning: {', '.join(changed)} changed, but {', '.join(running)} already run with the old "
            "settings; `make down` (or `python -m devstack fleet stop`) and start again to apply them"
        )
    write_env(fleet_file, env, "The environment of every service of the local fleet; rewritten by "
              "`python -m devstack fleet start` (make up). Override a setting by exporting it before `make up`.")
    write_env(local_file, local, "How tools reach the local stack (the demo, the client, locust): "
              "set -a; . .zvt/local.env; set +a")
    check_reachable(env)
    check_ports_free(env, [n for n in names if n not in running])
    if getattr(args, "profile", "paper") == "staging":
        venues, venue_lines = fleet.start_venues_detached(args.venue_port, state_dir / "logs")
        lines += venue_lines
        env["ZVT_ROUTING_VENUES"] = venues
        write_env(fleet_file, env, "The environment of every service of the local fleet; rewritten by "
                  "`python -m devstack fleet start` (make up). Override a setting by exporting it before `make up`.")
    lines += start_detached(env, names, state_dir)
    if "gateway" in names:
        lines.append(f"gateway: {local['ZVT_GATEWAY_URL']}  (admin API key: ZVT_API_KEY in {_show(local_file)})")
    return lines


def fleet_environment(
    args: argparse.Namespace, state_dir: Path, environ: Mapping[str, str], previous: Mapping[str, str],
    local: Mapping[str, str],
) -> tuple[dict[str, str], dict[str, str]]:
    """(what every service gets, what ``local.env`` says): the defaults for the local stack,
    then ``ZVT_*`` of the caller's environment, then the command line's choices."""
    key = environ.get("ZVT_GATEWAY_ADMIN_API_KEY") or local.get("ZVT_API_KEY") or f"zvt-dev-{secrets.token_urlsafe(24)}"
    secret = (environ.get("ZVT_NOTIFICATIONS_WEBHOOK_SECRET") or previous.get("ZVT_NOTIFICATIONS_WEBHOOK_SECRET")
              or secrets.token_urlsafe(24))
    env = {
        "ZVT_REDIS_CLUSTER": "false",
        # 8 shards are plenty on one machine (2 cores): fewer read loops per process.
        "ZVT_BUS_SHARDS": "8",
        "ZVT_LOG_LEVEL": "INFO",
        "ZVT_RECORDER_POSTGRES_DSN": stack.POSTGRES_DSN,
        "ZVT_GATEWAY_POSTGRES_DSN": stack.POSTGRES_DSN,
        "ZVT_GATEWAY_HOST": stack.HOST,
        **hatchet.fleet_env(),  # the engine's address and token, when it runs
        "ZVT_DEMO_WEBHOOKS_HOST": stack.HOST,
        "ZVT_DEMO_WEBHOOKS_FILE": str(state_dir / "logs" / "webhooks.jsonl"),
        **{k: v for k, v in environ.items() if k.startswith("ZVT_") and k not in CLIENT_ONLY},
        "ZVT_REDIS_URL": REDIS_URLS[args.redis],
        "ZVT_REDIS_CLUSTER": "true" if args.redis == "cluster" else "false",
        "ZVT_BUS_NAMESPACE": args.namespace,
        "ZVT_GATEWAY_PORT": str(args.gateway_port),
        "ZVT_GATEWAY_ADMIN_API_KEY": key,
        "ZVT_DEMO_WEBHOOKS_PORT": str(args.webhook_port),
        "ZVT_NOTIFICATIONS_WEBHOOK_SECRET": secret,
    }
    password = environ.get(stack.PASSWORD_ENV)
    if password:  # the servers run with it (python -m devstack start)
        env["ZVT_REDIS_PASSWORD"] = password
    env.pop(stack.PASSWORD_ENV, None)  # devstack's own, not a service setting
    env.setdefault("ZVT_NOTIFICATIONS_WEBHOOK_URLS", f"http://{env['ZVT_DEMO_WEBHOOKS_HOST']}:{args.webhook_port}/webhooks")
    host = env["ZVT_GATEWAY_HOST"]
    host = stack.HOST if host in ("0.0.0.0", "::", "") else host
    local_env = {
        "ZVT_GATEWAY_URL": f"http://{host}:{env['ZVT_GATEWAY_PORT']}",
        "ZVT_API_KEY": key,
        "ZVT_WEBHOOK_SINK_URL": f"http://{env['ZVT_DEMO_WEBHOOKS_HOST']}:{args.webhook_port}",
    }
    return dict(sorted(env.items())), local_env


def describe(env: Mapping[str, str]) -> str:
    kind = "Redis Cluster" if env.get("ZVT_REDIS_CLUSTER") == "true" else "single Redis"
    return f"{kind} {env.get('ZVT_REDIS_URL')}, namespace {env.get('ZVT_BUS_NAMESPACE')}"


def check_reachable(env: Mapping[str, str]) -> None:
    """A clear error, before any service starts, when Redis or PostgreSQL does not listen."""
    for name, url in (("Redis", env["ZVT_REDIS_URL"]), ("PostgreSQL", env["ZVT_RECORDER_POSTGRES_DSN"])):
        parts = urlsplit(url)
        address = (parts.hostname or stack.HOST, parts.port or (6379 if name == "Redis" else 5432))
        try:
            socket.create_connection(address, timeout=2).close()
        except OSError as exc:
            raise stack.DevstackError(
                f"{name} at {address[0]}:{address[1]} does not answer ({exc}); start it with `python -m devstack start`"
            ) from None


def check_ports_free(env: Mapping[str, str], starting: Sequence[str]) -> None:
    """A clear error, before any service starts, when a fixed port it needs is taken."""
    ports = {"gateway": ("ZVT_GATEWAY_HOST", "ZVT_GATEWAY_PORT"), WEBHOOKS: ("ZVT_DEMO_WEBHOOKS_HOST", "ZVT_DEMO_WEBHOOKS_PORT")}
    for name in starting:
        if name not in ports:
            continue
        host, port = env[ports[name][0]], int(env[ports[name][1]])
        if port == 0:
            continue
        try:
            socket.create_connection((stack.HOST if host in ("0.0.0.0", "::") else host, port), timeout=1).close()
        except OSError:
            continue  # nothing answers there: free
        raise stack.DevstackError(
            f"{name} needs {host}:{port}, where something else already listens; stop it or pick another port "
            f"(make up {'GATEWAY_PORT' if name == 'gateway' else 'WEBHOOK_PORT'}=...)"
        )


def start_detached(env: Mapping[str, str], names: Sequence[str], state_dir: Path) -> list[str]:
    """Start each service whose pid file names no live process, and leave it running.

    ``devstack.fleet.start_detached`` with one difference: each pid file is written as soon as
    its process is spawned, before waiting for any to start, so when one fails to start the
    others are still known to ``fleet stop`` / ``fleet status`` (and a second start does not
    run them twice).
    """
    pid_dir, log_dir = state_dir / "fleet", state_dir / "logs"
    pid_dir.mkdir(parents=True, exist_ok=True)
    lines, todo = [], []
    for name in names:
        pid = stack._read_pidfile(pid_dir / f"{name}.pid")
        if pid is not None and stack._pid_alive(pid, f"services.{name}"):
            lines.append(f"{name:14} already running (pid {pid})")
        else:
            todo.append(name)
            (log_dir / f"{name}-0.log").unlink(missing_ok=True)
    runner = fleet.Fleet(env, log_dir=log_dir)
    procs = runner.start(todo, wait=False)
    for proc in procs:
        (pid_dir / f"{proc.name}.pid").write_text(str(proc.popen.pid))
    for proc in procs:
        runner.wait_started(proc)
        lines.append(f"{proc.name:14} started (pid {proc.popen.pid}, probes :{proc.http_port}, log {_show(proc.log)})")
    return lines


def fleet_status(state_dir: Path, names: Sequence[str]) -> list[str]:
    lines = fleet.status_detached(names)
    local = read_env(state_dir / LOCAL_ENV)
    url = local.get("ZVT_GATEWAY_URL")
    gateway_up = any(line.split()[:2] == ["gateway", "running"] for line in lines)
    if url and gateway_up:
        lines.append(f"gateway: {url} {_health(url)}  (admin API key: ZVT_API_KEY in {_show(state_dir / LOCAL_ENV)})")
    return lines


def _health(url: str) -> str:
    try:
        with urllib.request.urlopen(f"{url}/readyz", timeout=2) as response:  # noqa: S310 - our own loopback URL
            return "ready" if response.status == 200 else f"not ready ({response.status})"
    except urllib.error.HTTPError as exc:
        return f"not ready ({exc.code})"
    except OSError as exc:
        return f"not answering ({exc})"


# ---------------------------------------------------------------------------------------------
# env files


def _show(path: Path) -> str:
    try:
        return str(path.relative_to(Path.cwd()))
    except ValueError:
        return str(path)


if __name__ == "__main__":
    sys.exit(main())
