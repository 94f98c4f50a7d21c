"""The local Hatchet engine: built from Hatchet's Go module, run on the devstack PostgreSQL.

``ensure_hatchet()`` builds the pinned engine once (``scripts/build-hatchet.sh``, into the
git-ignored ``.cache/tools/``), creates its own database ``hatchet`` in the devstack
PostgreSQL, runs its migrations, generates its keys and seeds the default tenant (``hatchet-admin
quickstart``), starts ``hatchet-engine`` with PostgreSQL as its message queue (no RabbitMQ),
gRPC and metrics on 127.0.0.1 only, and writes a tenant API token for workers and clients to
``.zvt/hatchet/token`` (mode 0600). Idempotent, like the rest of devstack.

The engine is all the fleet needs: workers and the gateway talk gRPC to it. Hatchet's REST API
server is not started (it binds every interface, and nothing here needs it).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

from devstack import stack
from devstack.stack import HOST, ROOT, STATE_DIR, ComponentStatus, DevstackError

__all__ = [
    "GRPC_PORT",
    "HATCHET_VERSION",
    "METRICS_PORT",
    "TENANT_ID",
    "client_env",
    "fleet_env",
    "ensure_hatchet",
    "hatchet_status",
    "stop_hatchet",
    "token",
]

HATCHET_VERSION = "v0.105.0"
GRPC_PORT = 17077
METRICS_PORT = 17090
DATABASE = "hatchet"
TENANT_ID = "707d0855-80ab-4e1f-a156-f1c4546cbf52"  # the engine's seeded default tenant
_BUILD = ROOT / "scripts" / "build-hatchet.sh"


def _dir() -> Path:
    return STATE_DIR / "hatchet"


def _pidfile() -> Path:
    return _dir() / "engine.pid"


def _logfile() -> Path:
    return _dir() / "engine.log"


def _token_file() -> Path:
    return _dir() / "token"


def _database_url() -> str:
    return (
        f"postgresql://{stack.POSTGRES_USER}:{stack.POSTGRES_PASSWORD}@{HOST}:{stack.POSTGRES_PORT}/{DATABASE}"
        "?sslmode=disable"
    )


def _engine_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SERVER_", "DATABASE_", "HATCHET_"))}
    env.update({
        "DATABASE_URL": _database_url(),
        "DATABASE_MAX_CONNS": "20",
        "PGTZ": "UTC",
        "TZ": "UTC",
        "SERVER_MSGQUEUE_KIND": "postgres",
        "SERVER_GRPC_INSECURE": "t",
        "SERVER_GRPC_BIND_ADDRESS": HOST,
        "SERVER_GRPC_PORT": str(GRPC_PORT),
        "SERVER_GRPC_BROADCAST_ADDRESS": f"{HOST}:{GRPC_PORT}",
        # the REST API is not run; the URL only goes into tokens
        "SERVER_URL": f"http://{HOST}:18888",
        "SERVER_AUTH_COOKIE_DOMAIN": HOST,
        "SERVER_AUTH_COOKIE_INSECURE": "t",
        "SERVER_AUTH_SET_EMAIL_VERIFIED": "t",
        "SERVER_HEALTHCHECK": "false",  # its health server would bind every interface
        "SERVER_PROMETHEUS_ENABLED": "t",
        "SERVER_PROMETHEUS_ADDRESS": f"{HOST}:{METRICS_PORT}",
        "SERVER_LOGGER_LEVEL": "warn",
        "SERVER_LOGGER_FORMAT": "console",
        "DATABASE_LOGGER_LEVEL": "error",
        "SERVER_ANALYTICS_POSTHOG_ENABLED": "false",
        # A run triggered on an engine that holds a connection to a worker with a free slot is
        # assigned in the trigger's own call ("optimistic scheduling", on by default), instead
        # of waiting for the queue's next poll (~20 ms against 100+ ms here). Each such trigger
        # holds one of these slots while it runs; with the default 5, more than five orders in
        # flight fall back to the polled path. No workflow has a concurrency key: those always
        # take the polled concurrency path (SCHEDULER_CONCURRENCY_POLLING_*).
        "SERVER_OPTIMISTIC_SCHEDULING_ENABLED": "t",
        "SERVER_OPTIMISTIC_SCHEDULING_SLOTS": "32",
    })
    return env


def binaries() -> Path:
    """Build the pinned engine unless the cache has it; the folder with its binaries."""
    env = dict(os.environ, HATCHET_VERSION=HATCHET_VERSION)
    proc = subprocess.run(["bash", str(_BUILD)], capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode != 0:
        raise DevstackError(f"building Hatchet {HATCHET_VERSION} failed:\n{proc.stderr[-4000:]}")
    return Path(proc.stdout.strip().splitlines()[-1])


def _tool(bin_dir: Path, name: str, *args: str, timeout: float = 120.0) -> str:
    proc = subprocess.run(
        [str(bin_dir / name), *args], capture_output=True, text=True, env=_engine_env(), timeout=timeout,
        cwd=_dir(), stdin=subprocess.DEVNULL,
    )
    if proc.returncode != 0:
        raise DevstackError(f"{name} {' '.join(args)} failed (exit {proc.returncode}):\n{(proc.stdout + proc.stderr)[-3000:]}")
    return proc.stdout


def _pid() -> int | None:
    pid = stack._read_pidfile(_pidfile())
    if pid is not None and stack._pid_alive(pid, r"hatchet-engine"):
        return pid
    return None


def _grpc_open() -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, GRPC_PORT)) == 0


def _metrics_ok() -> bool:
    try:
        with urllib.request.urlopen(f"http://{HOST}:{METRICS_PORT}/metrics", timeout=2) as reply:
            return bool(reply.status == 200)
    except OSError:
        return False


def ensure_hatchet() -> dict[str, str]:
    """Start the local Hatchet engine unless it runs; returns the workers' client settings."""
    bin_dir = binaries()
    stack.ensure_postgres()
    with stack._locked():
        _dir().mkdir(parents=True, exist_ok=True)
        if _pid() is None:
            if _grpc_open():
                raise stack.PortInUse(f"{HOST}:{GRPC_PORT} is taken by a process devstack did not start")
            if stack._psql(f"SELECT 1 FROM pg_database WHERE datname = '{DATABASE}'") != "1":
                stack._psql(f'CREATE DATABASE "{DATABASE}" OWNER "{stack.POSTGRES_USER}"')
            # The engine's statements are prepared once per connection, but most of them read
            # partitioned tables with array parameters, for which PostgreSQL keeps choosing a
            # custom plan, planned again on every call: measured here, planning took 40% of
            # the database's time per run (10.5 s against 16.8 s executing, pg_stat_statements
            # over a workflow benchmark). A generic plan prunes partitions when it runs instead;
            # planning fell to 3.4 s and the database's CPU per run by a sixth
            # (docs/workflows.md). Only for this database; the engine's new connections take it.
            stack._psql(f'ALTER DATABASE "{DATABASE}" SET plan_cache_mode = force_generic_plan')
            _tool(bin_dir, "hatchet-migrate", timeout=300)
            config = _dir() / "config"
            if not (config / "server.yaml").exists():
                # keys (encryption, JWT, cookies) into config/, and the default tenant seeded
                _tool(bin_dir, "hatchet-admin", "quickstart", "--skip", "certs",
                      "--generated-config-dir", str(config), "--overwrite=false")
            with open(_logfile(), "ab") as log:
                proc = subprocess.Popen(
                    [str(bin_dir / "hatchet-engine"), "--config", str(config)],
                    stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=_engine_env(),
                    cwd=_dir(), start_new_session=True,
                )
            _pidfile().write_text(f"{proc.pid}\n")
            deadline = time.monotonic() + 90
            while not (_grpc_open() and _metrics_ok()):
                if proc.poll() is not None:
                    raise DevstackError(f"hatchet-engine exited ({proc.returncode}):\n{stack._tail(_logfile())}")
                if time.monotonic() > deadline:
                    raise DevstackError(f"hatchet-engine did not open {HOST}:{GRPC_PORT} in 90 s:\n{stack._tail(_logfile())}")
                time.sleep(0.2)
        if not _token_file().exists():
            out = _tool(bin_dir, "hatchet-admin", "token", "create", "--config", str(_dir() / "config"),
                        "--tenant-id", TENANT_ID, "--name", "zvt-devstack", "--expiresIn", "87600h")
            lines = [line.strip() for line in out.splitlines() if line.strip()]
            if not lines:
                raise DevstackError("hatchet-admin token create printed no token")
            fd = os.open(_token_file(), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(lines[-1] + "\n")
    return client_env()


def token() -> str:
    try:
        return _token_file().read_text().strip()
    except FileNotFoundError as exc:
        raise DevstackError("no Hatchet token yet: start the engine first (python -m devstack start)") from exc


def client_env() -> dict[str, str]:
    """The Hatchet SDK's settings for a worker or client of the local engine."""
    return {
        "HATCHET_CLIENT_TOKEN": token(),
        "HATCHET_CLIENT_HOST_PORT": f"{HOST}:{GRPC_PORT}",
        "HATCHET_CLIENT_TLS_STRATEGY": "none",
        "HATCHET_CLIENT_SERVER_URL": f"http://{HOST}:18888",
    }


def fleet_env() -> dict[str, str]:
    """The ``ZVT_HATCHET_*`` settings of the local fleet (empty before the engine's first start)."""
    if not _token_file().exists():
        return {}
    return {"ZVT_HATCHET_TOKEN": token(), "ZVT_HATCHET_HOST_PORT": f"{HOST}:{GRPC_PORT}", "ZVT_HATCHET_TLS_STRATEGY": "none"}


def stop_hatchet() -> None:
    with stack._locked():
        pid = _pid()
        if pid is None:
            return
        os.kill(pid, signal.SIGTERM)
        if not stack._wait_dead(pid, 30):
            os.kill(pid, signal.SIGKILL)
            stack._wait_dead(pid, 5)
        _pidfile().unlink(missing_ok=True)


def hatchet_status() -> ComponentStatus:
    address = f"grpc://{HOST}:{GRPC_PORT}"
    pid = _pid()
    if pid is None:
        return ComponentStatus("hatchet", "stopped", address, stack._foreign_ports([GRPC_PORT]))
    state = "running" if _grpc_open() and _metrics_ok() else "degraded"
    return ComponentStatus("hatchet", state, address, f"pid {pid}, {HATCHET_VERSION}, metrics :{METRICS_PORT}", (pid,))
