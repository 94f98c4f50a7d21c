"""Local infrastructure for development and tests: Redis (single and Cluster), PostgreSQL, and
(through ``devstack.hatchet``) the Hatchet engine.

Everything listens on 127.0.0.1 and keeps its data, pid files and logs under ``.zvt/`` in the
repository root. Every ``ensure_*`` is idempotent: it starts what is missing, leaves what runs
alone, and returns the address to connect to. Standard library only; Redis is inspected with
``redis-cli`` and PostgreSQL with its own client tools, so this works before the virtualenv does.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import re
import shutil
import signal as _signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypedDict

__all__ = [
    "CLUSTER_PORTS",
    "CLUSTER_URL",
    "COMPONENTS",
    "ClusterNode",
    "ClusterNotReady",
    "ComponentStatus",
    "DevstackError",
    "HOST",
    "POSTGRES_DSN",
    "POSTGRES_PORT",
    "PASSWORD_ENV",
    "PortInUse",
    "SINGLE_PORT",
    "SINGLE_URL",
    "STATE_DIR",
    "ThrowawayPostgres",
    "cluster_nodes",
    "cluster_startup_nodes",
    "ensure",
    "ensure_cluster",
    "ensure_postgres",
    "ensure_single",
    "exclusive",
    "kill_node",
    "node_dir",
    "ping",
    "redis_cli",
    "redis_password",
    "redis_url",
    "start_node",
    "start_redis_server",
    "status",
    "stop",
    "stop_all",
    "stop_redis_server",
    "wait_cluster_ok",
]

log = logging.getLogger("devstack")

ROOT = Path(__file__).resolve().parent.parent
STATE_DIR = ROOT / ".zvt"
HOST = "127.0.0.1"

SINGLE_PORT = 6390
SINGLE_URL = f"redis://{HOST}:{SINGLE_PORT}/0"

CLUSTER_PORTS: tuple[int, ...] = tuple(range(7101, 7107))
CLUSTER_URL = f"redis://{HOST}:{CLUSTER_PORTS[0]}/0"
CLUSTER_SLOTS = 16384
CLUSTER_MASTERS = 3
CLUSTER_NODE_TIMEOUT_MS = 2000

# Below the kernel's ephemeral range (32768-60999): a port in it can be taken at random by
# an outgoing connection of the test run itself, and then PostgreSQL cannot bind it.
POSTGRES_PORT = 15432
POSTGRES_USER = "zvt"
POSTGRES_PASSWORD = "zvt"
POSTGRES_DB = "zvt"
POSTGRES_DSN = f"postgresql://{POSTGRES_USER}:{POSTGRES_PASSWORD}@{HOST}:{POSTGRES_PORT}/{POSTGRES_DB}"
PG_BIN = Path("/usr/lib/postgresql/15/bin")
PG_SYSTEM_USER = "postgres"

COMPONENTS = ("single", "cluster", "postgres", "hatchet")  # hatchet: devstack.hatchet, on postgres

PASSWORD_ENV = "ZVT_DEVSTACK_REDIS_PASSWORD"
"""When set, the single Redis and every cluster node run with this password (``requirepass``,
and ``masterauth`` for the replicas), and devstack's own ``redis-cli`` calls use it."""

_INSTALL_HINT = "run `make deps`"


class DevstackError(RuntimeError):
    """Local infrastructure could not be started, stopped or inspected."""


class ClusterNotReady(DevstackError, TimeoutError):
    """The Redis Cluster did not reach a healthy state in time."""


class PortInUse(DevstackError):
    """Something this tool did not start already listens on a port it needs."""


class ClusterNode(TypedDict):
    """One line of CLUSTER NODES, as seen by one node, plus the local pid of that node."""

    id: str
    port: int
    pid: int | None  # None when no process runs for this port here
    role: str  # master | replica | unknown
    master_id: str | None
    master_port: int | None  # for replicas
    slots: list[tuple[int, int]]  # inclusive ranges
    failed: bool  # flagged fail or fail? (suspected)
    myself: bool  # the node that answered
    flags: list[str]
    link: str  # cluster-bus link: connected | disconnected


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    state: str  # running | stopped | degraded
    address: str
    detail: str = ""
    pids: tuple[int, ...] = ()

    def line(self) -> str:
        return f"{self.name:<14} {self.state:<9} {self.address:<46} {self.detail}".rstrip()


# --------------------------------------------------------------------------- locking

_thread_lock = threading.RLock()
_lock_depth = 0
_lock_fd: int | None = None


@contextlib.contextmanager
def _locked() -> Iterator[None]:
    """Serialize start/stop across processes (parallel test runs, `make up` beside `make test`)."""
    global _lock_depth, _lock_fd
    with _thread_lock:
        if _lock_depth == 0:
            STATE_DIR.mkdir(parents=True, exist_ok=True)
            fd = os.open(STATE_DIR / "devstack.lock", os.O_RDWR | os.O_CREAT, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            _lock_fd = fd
        _lock_depth += 1
        try:
            yield
        finally:
            _lock_depth -= 1
            if _lock_depth == 0 and _lock_fd is not None:
                os.close(_lock_fd)  # closing releases the flock
                _lock_fd = None


def exclusive() -> contextlib.AbstractContextManager[None]:
    """Hold devstack's cross-process lock; other processes' start, stop and ensure calls wait.

    Re-entrant within a process. A chaos test holds it from killing a node until the cluster
    is whole again, so a test session starting beside it does not restart the node early.
    """
    return _locked()


# --------------------------------------------------------------------------- processes


def _require_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise DevstackError(f"{name} not found on PATH; {_INSTALL_HINT}")
    return path


def _proc_state(pid: int) -> str | None:
    """The kernel's one-letter process state, or None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[0]


def _pid_alive(pid: int, cmdline_pattern: str | None = None) -> bool:
    """True when ``pid`` runs (zombies count as dead) and, if given, its cmdline matches.

    Daemonized servers are re-parented to PID 1, which may never reap them, so a killed
    server can linger as a zombie.
    """
    if pid <= 0:
        return False
    if not Path("/proc").is_dir():  # not Linux: no way to check cmdline or zombies
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    state = _proc_state(pid)
    if state is None or state in ("Z", "X"):
        return False
    if cmdline_pattern is None:
        return True
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return False
    return re.search(cmdline_pattern, cmdline) is not None


def _read_pidfile(path: Path) -> int | None:
    try:
        text = path.read_text().strip().splitlines()
    except (FileNotFoundError, OSError):
        return None
    if not text:
        return None
    try:
        return int(text[0])
    except ValueError:
        return None


def _wait_dead(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not _pid_alive(pid):
            return True
        time.sleep(0.05)
    return not _pid_alive(pid)


def _tail(path: Path, lines: int = 15) -> str:
    try:
        content = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no log at {path})"
    return "\n".join(content[-lines:])


def _run(
    args: Sequence[str], *, timeout: float, cwd: Path | None = None, new_session: bool = False,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    try:
        return subprocess.run(
            list(args),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=cwd,
            start_new_session=new_session,
            stdin=subprocess.DEVNULL,
            env=env,
        )
    except subprocess.TimeoutExpired as exc:
        raise DevstackError(f"timed out after {timeout}s: {' '.join(args)}") from exc


def _port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(1.0)
        return sock.connect_ex((HOST, port)) == 0


def _foreign_ports(ports: Sequence[int]) -> str:
    """A note for `status` when a port we need is held by something we did not start."""
    taken = [p for p in ports if _port_open(p)]
    return f"port {', '.join(map(str, taken))} taken by another process" if taken else ""


# --------------------------------------------------------------------------- redis basics


def redis_password() -> str | None:
    """The password devstack's Redis servers run with (``ZVT_DEVSTACK_REDIS_PASSWORD``), if any."""
    return os.environ.get(PASSWORD_ENV) or None


def redis_url(port: int, password: str | None = None) -> str:
    """``redis://[:password@]127.0.0.1:port/0``; ``password`` defaults to devstack's."""
    from urllib.parse import quote

    secret = password if password is not None else redis_password()
    auth = f":{quote(secret, safe='')}@" if secret else ""
    return f"redis://{auth}{HOST}:{port}/0"


def _cli_env(password: str | None) -> dict[str, str] | None:
    """redis-cli's environment: the password in REDISCLI_AUTH (never on a command line)."""
    secret = password if password is not None else redis_password()
    env = {k: v for k, v in os.environ.items() if k != "REDISCLI_AUTH"}
    if secret:
        env["REDISCLI_AUTH"] = secret
    return env


def redis_cli(port: int, *args: str, timeout: float = 5.0, password: str | None = None) -> str:
    """Run one command through ``redis-cli`` against 127.0.0.1:port and return its raw output.

    ``password``: the server's; None: devstack's (``ZVT_DEVSTACK_REDIS_PASSWORD``), "": none.
    Raises DevstackError when the server cannot be reached or answers with an error.
    """
    cli = _require_binary("redis-cli")
    proc = _run([cli, "-e", "--no-auth-warning", "-h", HOST, "-p", str(port), *args], timeout=timeout,
                env=_cli_env(password))
    if proc.returncode != 0:
        message = (proc.stderr.strip() or proc.stdout.strip() or f"exit {proc.returncode}")
        raise DevstackError(f"redis-cli -p {port} {' '.join(args)}: {message}")
    return proc.stdout


def ping(port: int, timeout: float = 2.0, password: str | None = None) -> bool:
    """True when a Redis on 127.0.0.1:port answers PONG (not while it is still loading)."""
    try:
        return redis_cli(port, "PING", timeout=timeout, password=password).strip() == "PONG"
    except DevstackError:
        return False


def _password_mismatch(port: int, password: str) -> str | None:
    """Why a running Redis does not take ``password`` ("" for none): it runs without one, or
    with another; None when it takes it (or does not answer yet: the caller waits for that)."""
    open_to_all = ping(port, password="")
    if password:
        if open_to_all:  # redis-cli's AUTH on a server without a password fails, PING works
            return "runs without a password"
        if ping(port, password=password):
            return None
        try:
            redis_cli(port, "PING", password=password)
        except DevstackError as exc:
            if "WRONGPASS" in str(exc) or "AUTH" in str(exc):
                return "runs with another password"
        return None
    if open_to_all:
        return None
    try:
        redis_cli(port, "PING", password="")
    except DevstackError as exc:
        if "NOAUTH" in str(exc):
            return "runs with a password"
    return None


def _redis_pattern(port: int) -> str:
    return rf"redis-server\S*\s+\S*:{port}(?!\d)"


def _redis_pid(port: int, directory: Path) -> int | None:
    pid = _read_pidfile(directory / "redis.pid")
    if pid is not None and _pid_alive(pid, _redis_pattern(port)):
        return pid
    return None


def _starting_redis(port: int, directory: Path) -> bool:
    """Whether a redis-server for this port and folder exists, pidfile written or not."""
    if not Path("/proc").is_dir():
        return True  # cannot tell; keep waiting for the pidfile
    marker = str(directory / "redis.pid")
    pattern = _redis_pattern(port)
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if (marker in cmdline or re.search(pattern, cmdline)) and _pid_alive(int(entry.name)):
            return True
    return False


def _wait_ping(port: int, pid: int, timeout: float, logfile: Path, password: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if ping(port, timeout=1.0, password=password):
            return
        if not _pid_alive(pid):
            break
        time.sleep(0.05)
    raise DevstackError(
        f"redis-server on port {port} did not become ready (pid {pid}); last log lines of {logfile}:\n"
        + _tail(logfile)
    )


def start_redis_server(
    port: int,
    dir: str | os.PathLike[str],
    extra_args: Sequence[str] = (),
    *,
    timeout: float = 30.0,
) -> int:
    """Start a daemonized redis-server on 127.0.0.1:port with its files in ``dir``; return its pid.

    Defaults: pidfile ``redis.pid`` and logfile ``redis.log`` in ``dir``, no RDB snapshots,
    AOF on. ``extra_args`` (``"--name", "value"`` pairs) come last, so they override those;
    with ``--requirepass`` its readiness is checked with that password.
    If a redis-server started from the same ``dir`` already runs, returns its pid unchanged
    (DevstackError if it does not take the password asked for: stop it first to change that).
    """
    binary = _require_binary("redis-server")
    _require_binary("redis-cli")  # readiness is checked with it
    directory = Path(dir).resolve()
    directory.mkdir(parents=True, exist_ok=True)
    logfile = directory / "redis.log"

    password = _arg_value(extra_args, "--requirepass") or ""
    existing = _redis_pid(port, directory)
    if existing is not None:
        if _proc_state(existing) == "T":  # left frozen by a chaos test (SIGSTOP)
            os.kill(existing, _signal.SIGCONT)
        mismatch = _password_mismatch(port, password)
        if mismatch is not None:
            raise DevstackError(
                f"redis-server on port {port} (pid {existing}) {mismatch}; stop it (`python -m devstack stop`) "
                f"and start it again to change that ({PASSWORD_ENV})"
            )
        _wait_ping(port, existing, timeout, logfile, password)
        return existing
    if _port_open(port):
        raise PortInUse(f"127.0.0.1:{port} is taken by a process that was not started from {directory}")

    args = [
        binary,
        "--port", str(port),
        "--bind", HOST,
        "--dir", str(directory),
        "--daemonize", "yes",
        "--pidfile", str(directory / "redis.pid"),
        "--logfile", str(logfile),
        "--save", "",
        "--appendonly", "yes",
        *extra_args,
    ]
    proc = _run(args, timeout=timeout, new_session=True)
    if proc.returncode != 0:
        raise DevstackError(
            f"redis-server on port {port} failed to start (exit {proc.returncode}): "
            f"{(proc.stderr or proc.stdout).strip()}\n{_tail(logfile)}"
        )
    # The daemon writes its pidfile only once initialized; until then it is found by its argv,
    # so a server that dies early (bad config, port taken) fails fast instead of timing out.
    deadline = time.monotonic() + timeout
    pid: int | None = None
    while time.monotonic() < deadline:
        pid = _redis_pid(port, directory)
        if pid is not None or not _starting_redis(port, directory):
            break
        time.sleep(0.05)
    if pid is None:
        raise DevstackError(f"redis-server on port {port} exited during startup; last log lines of {logfile}:\n{_tail(logfile)}")
    _wait_ping(port, pid, max(1.0, deadline - time.monotonic()), logfile, password)
    return pid


def _arg_value(args: Sequence[str], name: str) -> str | None:
    """The value after the last ``name`` in ``args`` (the last one wins, as in redis-server)."""
    value = None
    for i, arg in enumerate(args[:-1]):
        if arg == name:
            value = args[i + 1]
    return value


def _password_args() -> list[str]:
    """redis-server arguments for devstack's password: clients and replicas both need it."""
    password = redis_password()
    return ["--requirepass", password, "--masterauth", password] if password else []


def stop_redis_server(port: int, dir: str | os.PathLike[str], *, timeout: float = 15.0) -> bool:
    """Stop the redis-server started from ``dir`` on ``port`` (SIGTERM, then SIGKILL). False if none ran."""
    directory = Path(dir).resolve()
    pid = _redis_pid(port, directory)
    if pid is None:
        return False
    _terminate(pid, timeout)
    return True


def _terminate(pid: int, timeout: float) -> None:
    with contextlib.suppress(ProcessLookupError):
        if _proc_state(pid) == "T":
            os.kill(pid, _signal.SIGCONT)
        os.kill(pid, _signal.SIGTERM)
    if not _wait_dead(pid, timeout):
        log.warning("pid %s ignored SIGTERM for %.0fs; sending SIGKILL", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, _signal.SIGKILL)
        _wait_dead(pid, 5.0)


# --------------------------------------------------------------------------- single redis


def _single_dir() -> Path:
    return STATE_DIR / "redis-single"


def ensure_single() -> str:
    """Start the single Redis on 127.0.0.1:6390 unless it runs; return its URL (with the
    password of ``ZVT_DEVSTACK_REDIS_PASSWORD`` when set)."""
    with _locked():
        start_redis_server(SINGLE_PORT, _single_dir(), ["--enable-debug-command", "local", *_password_args()])
    return redis_url(SINGLE_PORT)


def _stop_single() -> None:
    with _locked():
        stop_redis_server(SINGLE_PORT, _single_dir())


def _single_status() -> ComponentStatus:
    pid = _redis_pid(SINGLE_PORT, _single_dir())
    if pid is None:
        return ComponentStatus("redis-single", "stopped", SINGLE_URL, _foreign_ports([SINGLE_PORT]))
    if not ping(SINGLE_PORT):
        return ComponentStatus("redis-single", "degraded", SINGLE_URL, f"pid {pid}, not answering PING", (pid,))
    return ComponentStatus("redis-single", "running", SINGLE_URL, f"pid {pid}", (pid,))


# --------------------------------------------------------------------------- redis cluster


def node_dir(port: int) -> Path:
    """The data folder of the cluster node on ``port``."""
    return STATE_DIR / "redis-cluster" / str(port)


def _node_args(port: int) -> list[str]:
    return [
        "--cluster-enabled", "yes",
        "--cluster-config-file", str(node_dir(port).resolve() / "nodes.conf"),
        "--cluster-node-timeout", str(CLUSTER_NODE_TIMEOUT_MS),
        # 0: a replica may always fail over, however long it was cut off from its master.
        "--cluster-replica-validity-factor", "0",
        "--appendonly", "yes",
        "--enable-debug-command", "local",
        *_password_args(),
    ]


def cluster_startup_nodes() -> list[tuple[str, int]]:
    return [(HOST, port) for port in CLUSTER_PORTS]


def _node_pid(port: int) -> int | None:
    return _redis_pid(port, node_dir(port))


def start_node(port: int) -> int:
    """Start (or resume) the cluster node on ``port`` from its saved state; return its pid."""
    if port not in CLUSTER_PORTS:
        raise DevstackError(f"{port} is not a cluster port ({CLUSTER_PORTS[0]}..{CLUSTER_PORTS[-1]})")
    _require_binary("redis-cli")
    with _locked():
        return start_redis_server(port, node_dir(port), _node_args(port))


def kill_node(port: int, signal: int = _signal.SIGKILL) -> int:
    """Send ``signal`` (default SIGKILL) to the cluster node on ``port``; return its pid.

    For SIGKILL, SIGTERM and SIGINT waits until the process is gone.
    """
    pid = _node_pid(port)
    if pid is None:
        raise DevstackError(f"no cluster node runs on port {port}")
    os.kill(pid, signal)
    if signal in (_signal.SIGKILL, _signal.SIGTERM, _signal.SIGINT) and not _wait_dead(pid, 15.0):
        raise DevstackError(f"cluster node {port} (pid {pid}) still runs after signal {signal}")
    return pid


def _parse_info(text: str) -> dict[str, str]:
    result: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        key, value = line.split(":", 1)
        result[key] = value
    return result


def _parse_slots(tokens: Sequence[str]) -> list[tuple[int, int]]:
    slots: list[tuple[int, int]] = []
    for token in tokens:
        if token.startswith("["):  # a slot being migrated or imported
            continue
        start, _, end = token.partition("-")
        slots.append((int(start), int(end or start)))
    return slots


def _parse_cluster_nodes(text: str) -> list[ClusterNode]:
    nodes: list[ClusterNode] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 8:
            continue
        node_id, address, flags_text, master_id = parts[0], parts[1], parts[2], parts[3]
        flags = flags_text.split(",")
        if "noaddr" in flags or "handshake" in flags:
            continue
        nodes.append(
            ClusterNode(
                id=node_id,
                port=int(address.split("@", 1)[0].rsplit(":", 1)[1]),
                pid=None,
                role="master" if "master" in flags else "replica" if "slave" in flags else "unknown",
                master_id=None if master_id == "-" else master_id,
                master_port=None,
                slots=_parse_slots(parts[8:]),
                failed="fail" in flags or "fail?" in flags,
                myself="myself" in flags,
                flags=[f for f in flags if f != "myself"],
                link=parts[7],
            )
        )
    port_by_id = {node["id"]: node["port"] for node in nodes}
    for node in nodes:
        if node["master_id"] is not None:
            node["master_port"] = port_by_id.get(node["master_id"])
    return nodes


def cluster_nodes(via_port: int | None = None) -> list[ClusterNode]:
    """The cluster's nodes as one running node sees them (CLUSTER NODES), sorted by port.

    Each dict: ``port``, ``pid`` (None when the process is not running), ``role``
    (``master`` | ``replica``), ``master_port`` (replicas; else None), ``id``, ``master_id``,
    ``slots`` (list of inclusive ranges), ``failed`` (flagged fail or fail?), ``flags``, ``link``.
    """
    ports = [via_port] if via_port is not None else [p for p in CLUSTER_PORTS if _node_pid(p) is not None]
    last_error: Exception | None = None
    for port in ports:
        try:
            text = redis_cli(port, "CLUSTER", "NODES")
        except DevstackError as exc:
            last_error = exc
            continue
        nodes = _parse_cluster_nodes(text)
        for node in nodes:
            node["pid"] = _node_pid(node["port"])
        return sorted(nodes, key=lambda n: n["port"])
    raise DevstackError(f"no cluster node answers CLUSTER NODES ({last_error or 'none running'})")


def _cluster_problems(full_topology: bool) -> list[str]:
    """What keeps the cluster from being healthy right now; empty when it is."""
    running = [p for p in CLUSTER_PORTS if ping(p, timeout=1.0)]
    if not running:
        return ["no cluster node is running"]
    problems: list[str] = []
    views: dict[int, frozenset[tuple[int, tuple[tuple[int, int], ...]]]] = {}
    nodes_by_port: dict[int, list[ClusterNode]] = {}
    for port in running:
        try:
            info = _parse_info(redis_cli(port, "CLUSTER", "INFO", timeout=2.0))
            nodes = _parse_cluster_nodes(redis_cli(port, "CLUSTER", "NODES", timeout=2.0))
        except DevstackError as exc:
            problems.append(str(exc))
            continue
        if info.get("cluster_state") != "ok":
            problems.append(f"{port}: cluster_state:{info.get('cluster_state')}")
        if info.get("cluster_slots_ok") != str(CLUSTER_SLOTS):
            problems.append(f"{port}: cluster_slots_ok:{info.get('cluster_slots_ok')}")
        nodes_by_port[port] = nodes
        views[port] = frozenset(
            (n["port"], tuple(n["slots"]))
            for n in nodes
            if n["role"] == "master" and n["slots"] and not n["failed"]
        )
    if len(set(views.values())) > 1:
        problems.append("nodes disagree on which master serves which slots")
    first_view = next(iter(views.values()), frozenset())
    for owner, _ in sorted(first_view):
        if owner not in running:
            problems.append(f"slots are served by {owner}, which does not answer")
    if full_topology and not problems:
        problems.extend(_topology_problems(running, nodes_by_port[running[0]]))
    return problems


def _topology_problems(running: list[int], nodes: list[ClusterNode]) -> list[str]:
    problems: list[str] = []
    missing = [p for p in CLUSTER_PORTS if p not in running]
    if missing:
        problems.append(f"nodes not running: {missing}")
    masters = [n for n in nodes if n["role"] == "master" and n["slots"] and not n["failed"]]
    if len(masters) != CLUSTER_MASTERS:
        problems.append(f"{len(masters)} masters serve slots, want {CLUSTER_MASTERS}")
    for master in masters:
        replicas = [n for n in nodes if n["master_id"] == master["id"] and not n["failed"]]
        synced = []
        for replica in replicas:
            try:
                info = _parse_info(redis_cli(replica["port"], "INFO", "replication", timeout=2.0))
            except DevstackError:
                continue
            if info.get("master_link_status") == "up":
                synced.append(replica)
        if not synced:
            problems.append(f"master {master['port']} has no replica in sync")
    return problems


def wait_cluster_ok(timeout: float = 30.0, *, full_topology: bool = False) -> None:
    """Wait until every running node reports state ok with all 16384 slots served by live masters.

    With ``full_topology``, also wait for all six nodes, three masters and an in-sync replica
    for each. Raises ClusterNotReady (a TimeoutError) naming what is still wrong.
    """
    deadline = time.monotonic() + timeout
    problems = _cluster_problems(full_topology)
    while problems and time.monotonic() < deadline:
        time.sleep(0.2)
        problems = _cluster_problems(full_topology)
    if problems:
        raise ClusterNotReady(f"redis cluster not ok after {timeout:.0f}s: " + "; ".join(problems))


def _cluster_is_fresh() -> bool:
    for port in CLUSTER_PORTS:
        info = _parse_info(redis_cli(port, "CLUSTER", "INFO"))
        if info.get("cluster_known_nodes") != "1" or info.get("cluster_slots_assigned") != "0":
            return False
    return True


def _start_all_nodes() -> None:
    for port in CLUSTER_PORTS:
        start_node(port)


def _create_cluster() -> None:
    cli = _require_binary("redis-cli")
    log.info("creating redis cluster on ports %s..%s", CLUSTER_PORTS[0], CLUSTER_PORTS[-1])
    args = [cli, "--cluster", "create", *(f"{HOST}:{p}" for p in CLUSTER_PORTS), "--cluster-replicas", "1", "--cluster-yes"]
    proc = _run(args, timeout=120, env=_cli_env(None))
    if proc.returncode != 0 or "[OK] All 16384 slots covered" not in proc.stdout:
        raise DevstackError(f"redis-cli --cluster create failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def _wipe_cluster() -> None:
    for port in CLUSTER_PORTS:
        pid = _node_pid(port)
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, _signal.SIGKILL)
            _wait_dead(pid, 10.0)
        shutil.rmtree(node_dir(port), ignore_errors=True)


def ensure_cluster() -> list[tuple[str, int]]:
    """Start the 6-node Redis Cluster (3 masters, 3 replicas) unless healthy; return its startup nodes.

    Nodes with saved state re-form the cluster from their nodes.conf; a saved state that does
    not come back healthy is wiped and the cluster created anew.
    """
    _require_binary("redis-server")
    _require_binary("redis-cli")
    with _locked():
        try:
            saved = [(node_dir(p) / "nodes.conf").exists() for p in CLUSTER_PORTS]
            if any(saved) and not all(saved):
                raise DevstackError("only some nodes have a saved nodes.conf")
            _start_all_nodes()
            if _cluster_is_fresh():
                _create_cluster()
            wait_cluster_ok(timeout=30.0, full_topology=True)
        except PortInUse:
            raise
        except DevstackError as exc:
            log.warning("redis cluster state is broken (%s); wiping and creating it anew", exc)
            _wipe_cluster()
            _start_all_nodes()
            _create_cluster()
            wait_cluster_ok(timeout=60.0, full_topology=True)
    return cluster_startup_nodes()


def _stop_cluster() -> None:
    with _locked():
        running = {p: pid for p in CLUSTER_PORTS if (pid := _node_pid(p)) is not None}
        if not running:
            return
        try:
            roles = {n["port"]: n["role"] for n in cluster_nodes()}
        except DevstackError:
            roles = {}
        # Replicas first: a master whose replicas are gone cannot be failed over mid-shutdown,
        # so the saved nodes.conf keeps the topology the cluster had.
        for wave in ("replica", "master"):
            pids = [pid for port, pid in running.items() if (roles.get(port, "master") == wave)]
            for pid in pids:
                with contextlib.suppress(ProcessLookupError):
                    if _proc_state(pid) == "T":
                        os.kill(pid, _signal.SIGCONT)
                    os.kill(pid, _signal.SIGTERM)
            for pid in pids:
                if not _wait_dead(pid, 15.0):
                    _terminate(pid, 0.0)


def _cluster_status() -> ComponentStatus:
    name, address = "redis-cluster", f"{CLUSTER_URL} (cluster)"
    pids = {p: pid for p in CLUSTER_PORTS if (pid := _node_pid(p)) is not None}
    running = list(pids)
    if not running:
        return ComponentStatus(name, "stopped", address, _foreign_ports(CLUSTER_PORTS))
    problems = _cluster_problems(full_topology=False)
    masters = 0
    with contextlib.suppress(DevstackError):
        masters = sum(1 for n in cluster_nodes() if n["role"] == "master" and n["slots"] and not n["failed"])
    detail = f"{len(running)}/{len(CLUSTER_PORTS)} nodes, {masters} masters"
    if problems or len(running) < len(CLUSTER_PORTS):
        return ComponentStatus(name, "degraded", address, detail + ("; " + problems[0] if problems else ""), tuple(pids.values()))
    return ComponentStatus(name, "running", address, detail + ", state ok", tuple(pids.values()))


# --------------------------------------------------------------------------- postgres


def _pg_dir() -> Path:
    return STATE_DIR / "postgres"


def _pg_data() -> Path:
    return _pg_dir() / "data"


def _pg_socket_dir() -> Path:
    return _pg_dir() / "run"


def _pg_tool(name: str) -> str:
    path = PG_BIN / name
    if not os.access(path, os.X_OK):
        raise DevstackError(f"{path} not found (PostgreSQL 15 server binaries); {_INSTALL_HINT}")
    return str(path)


def _as_pg_user(args: Sequence[str]) -> list[str]:
    """PostgreSQL refuses to run as root, so root runs it as the `postgres` system user."""
    if os.geteuid() != 0:
        return list(args)
    runuser = shutil.which("runuser")
    if runuser is None:
        raise DevstackError("running as root needs `runuser` (util-linux) to start PostgreSQL")
    return [runuser, "-u", PG_SYSTEM_USER, "--", *args]


def _pg_owner() -> tuple[int, int]:
    import pwd  # stdlib, Unix only

    try:
        entry = pwd.getpwnam(PG_SYSTEM_USER)
    except KeyError as exc:
        raise DevstackError(f"system user `{PG_SYSTEM_USER}` does not exist; {_INSTALL_HINT}") from exc
    return entry.pw_uid, entry.pw_gid


def _prepare_pg_dirs() -> None:
    pg_dir = _pg_dir()
    pg_dir.mkdir(parents=True, exist_ok=True)
    _pg_socket_dir().mkdir(exist_ok=True)
    if os.geteuid() != 0:
        return
    uid, gid = _pg_owner()
    # The postgres user must be able to traverse every folder down to its data (o+x only).
    for folder in [pg_dir, *pg_dir.parents]:
        mode = folder.stat().st_mode
        if not mode & 0o001 and folder.stat().st_uid != uid:
            log.info("granting traverse permission (o+x) on %s so `%s` can reach its data", folder, PG_SYSTEM_USER)
            os.chmod(folder, mode | 0o001)
    for path in [pg_dir, _pg_socket_dir(), *pg_dir.glob("*.log")]:
        if path.stat().st_uid != uid:
            os.chown(path, uid, gid)
    data = _pg_data()
    if data.exists() and data.stat().st_uid != uid:
        for dirpath, dirnames, filenames in os.walk(data):
            os.chown(dirpath, uid, gid)
            for name in filenames:
                os.chown(os.path.join(dirpath, name), uid, gid, follow_symlinks=False)


def _pg_pid() -> int | None:
    pid = _read_pidfile(_pg_data() / "postmaster.pid")
    if pid is not None and _pid_alive(pid, r"postgres"):
        return pid
    return None


def _psql(sql: str, *, database: str = "postgres", timeout: float = 30.0) -> str:
    args = [
        _pg_tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
        "-h", str(_pg_socket_dir().resolve()), "-p", str(POSTGRES_PORT), "-U", POSTGRES_USER, "-d", database,
        "-c", sql,
    ]
    proc = _run(args, timeout=timeout)
    if proc.returncode != 0:
        raise DevstackError(f"psql failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip()


def _pg_config() -> str:
    return "\n".join(
        [
            "",
            "# --- zvt devstack ---",
            f"listen_addresses = '{HOST}'",
            f"port = {POSTGRES_PORT}",
            f"unix_socket_directories = '{_pg_socket_dir().resolve()}'",
            "timezone = 'UTC'",
            "log_timezone = 'UTC'",
            "max_connections = 200",
            "",
        ]
    )


def _initdb() -> None:
    data = _pg_data()
    if data.exists():  # a half-made cluster from an interrupted initdb
        shutil.rmtree(data)
    log.info("initializing postgres data in %s", data)
    pwfile = _pg_dir() / ".pwfile"
    pwfile.write_text(POSTGRES_PASSWORD + "\n")
    if os.geteuid() == 0:
        os.chown(pwfile, *_pg_owner())
    os.chmod(pwfile, 0o600)
    try:
        proc = _run(
            _as_pg_user(
                [
                    _pg_tool("initdb"), "-D", str(data.resolve()),
                    "--username", POSTGRES_USER, f"--pwfile={pwfile.resolve()}",
                    "--auth", "trust", "--encoding", "UTF8", "--locale", "C.UTF-8",
                ]
            ),
            timeout=180,
            cwd=_pg_dir(),
        )
    finally:
        pwfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        raise DevstackError(f"initdb failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    with open(data / "postgresql.conf", "a") as conf:
        conf.write(_pg_config())


def ensure_postgres() -> str:
    """Start the local PostgreSQL 15 on 127.0.0.1:15432 unless it runs; return its DSN."""
    pg_ctl = _pg_tool("pg_ctl")
    _pg_tool("initdb")
    with _locked():
        _prepare_pg_dirs()
        if not (_pg_data() / "PG_VERSION").exists():
            _initdb()
        if _pg_pid() is None:
            logfile = _pg_dir() / "postgres.log"
            proc = _run(
                _as_pg_user([
                    pg_ctl, "-D", str(_pg_data().resolve()), "-l", str(logfile.resolve()),
                    # the port on the command line wins over a data folder made with another
                    "-o", f"-p {POSTGRES_PORT}", "-w", "-t", "60", "start",
                ]),
                timeout=90,
                cwd=_pg_dir(),
                new_session=True,
            )
            if proc.returncode != 0:
                raise DevstackError(
                    f"postgres failed to start (exit {proc.returncode}): {proc.stdout.strip()} {proc.stderr.strip()}\n"
                    + _tail(logfile)
                )
        if _psql(f"SELECT 1 FROM pg_database WHERE datname = '{POSTGRES_DB}'") != "1":
            _psql(f'CREATE DATABASE "{POSTGRES_DB}" OWNER "{POSTGRES_USER}"')
    return POSTGRES_DSN


def _stop_postgres() -> None:
    with _locked():
        if _pg_pid() is None:
            return
        pg_ctl = _pg_tool("pg_ctl")
        proc = _run(
            _as_pg_user([pg_ctl, "-D", str(_pg_data().resolve()), "-m", "fast", "-w", "-t", "60", "stop"]),
            timeout=90,
            cwd=_pg_dir(),
        )
        if proc.returncode != 0 and _pg_pid() is not None:
            raise DevstackError(f"postgres failed to stop: {proc.stdout.strip()} {proc.stderr.strip()}")


def _postgres_status() -> ComponentStatus:
    name = "postgres"
    pid = _pg_pid()
    if pid is None:
        return ComponentStatus(name, "stopped", POSTGRES_DSN, _foreign_ports([POSTGRES_PORT]))
    try:
        _psql("SELECT 1", database=POSTGRES_DB, timeout=5.0)
    except DevstackError as exc:
        return ComponentStatus(name, "degraded", POSTGRES_DSN, f"pid {pid}; {exc}", (pid,))
    return ComponentStatus(name, "running", POSTGRES_DSN, f"pid {pid}", (pid,))


class ThrowawayPostgres:
    """A private PostgreSQL 15 for one test, never the shared one: its own data folder (under
    the system temp folder) and port on 127.0.0.1, to stop (``-m immediate``: a crash),
    freeze (SIGSTOP on the server and its backends: a hung server), thaw and start again
    while the shared instance, Hatchet and other tests carry on. ``remove`` stops it and
    deletes its folder.

        pg = ThrowawayPostgres.create()
        try:
            dsn = pg.dsn
            pg.stop()
            pg.start()
        finally:
            pg.remove()
    """

    PORTS = range(15500, 15900)  # below the ephemeral range, like POSTGRES_PORT

    def __init__(self, directory: Path, port: int) -> None:
        self.directory = directory
        self.port = port
        self.data = directory / "data"
        self.logfile = directory / "postgres.log"
        self._frozen: list[int] = []

    @property
    def dsn(self) -> str:
        return f"postgresql://{POSTGRES_USER}:{POSTGRES_PASSWORD}@{HOST}:{self.port}/{POSTGRES_DB}"

    @classmethod
    def create(cls, port: int | None = None) -> ThrowawayPostgres:
        """initdb into a new temp folder, start it on ``port`` (default: a free one of
        ``PORTS``) and create the ``zvt`` database."""
        import tempfile

        _pg_tool("pg_ctl")  # fail early and clearly without the binaries
        directory = Path(tempfile.mkdtemp(prefix="zvt-pg-"))
        if os.geteuid() == 0:
            os.chown(directory, *_pg_owner())
        # a port free now may be taken by a test session starting beside this one: try a few
        candidates = [port] if port is not None else [p for p in cls.PORTS if not _port_open(p)][:5]
        if not candidates:
            raise PortInUse(f"no free port in {cls.PORTS.start}-{cls.PORTS.stop - 1} for a throwaway PostgreSQL")
        pg = cls(directory, candidates[0])
        try:
            pg._initdb()
            for i, chosen in enumerate(candidates):
                pg._set_port(chosen)
                try:
                    pg.start()
                    break
                except DevstackError:
                    if i == len(candidates) - 1 or not _port_open(chosen):
                        raise
            pg._psql(f'CREATE DATABASE "{POSTGRES_DB}" OWNER "{POSTGRES_USER}"')
        except BaseException:
            pg.remove()
            raise
        return pg

    def _set_port(self, port: int) -> None:
        self.port = port
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write(f"port = {port}\n")  # the last setting wins

    def _initdb(self) -> None:
        proc = _run(
            _as_pg_user([
                _pg_tool("initdb"), "-D", str(self.data), "--username", POSTGRES_USER, "--auth", "trust",
                "--encoding", "UTF8", "--locale", "C.UTF-8", "--no-sync",
            ]),
            timeout=120,
            cwd=self.directory,
        )
        if proc.returncode != 0:
            raise DevstackError(f"initdb failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
        with open(self.data / "postgresql.conf", "a") as conf:
            conf.write("\n".join([
                "", "# --- zvt throwaway instance ---", f"listen_addresses = '{HOST}'", f"port = {self.port}",
                f"unix_socket_directories = '{self.directory}'", "timezone = 'UTC'", "log_timezone = 'UTC'",
                "fsync = off", "max_connections = 100", "",
            ]))

    def pid(self) -> int | None:
        """The postmaster's pid while it runs."""
        pid = _read_pidfile(self.data / "postmaster.pid")
        return pid if pid is not None and _pid_alive(pid, r"postgres") else None

    def start(self) -> None:
        if self.pid() is not None:
            return
        proc = _run(
            _as_pg_user([
                _pg_tool("pg_ctl"), "-D", str(self.data), "-l", str(self.logfile), "-o", f"-p {self.port}",
                "-w", "-t", "60", "start",
            ]),
            timeout=90,
            cwd=self.directory,
            new_session=True,
        )
        if proc.returncode != 0:
            raise DevstackError(
                f"throwaway postgres failed to start (exit {proc.returncode}): {proc.stdout.strip()} "
                f"{proc.stderr.strip()}\n" + _tail(self.logfile)
            )

    def stop(self, mode: str = "immediate") -> None:
        """``pg_ctl stop -m <mode>``: ``immediate`` drops every connection at once, like a crash."""
        self.thaw()
        if self.pid() is None:
            return
        proc = _run(
            _as_pg_user([_pg_tool("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "-t", "60", "stop"]),
            timeout=90,
            cwd=self.directory,
        )
        if proc.returncode != 0 and self.pid() is not None:
            raise DevstackError(f"throwaway postgres failed to stop: {proc.stdout.strip()} {proc.stderr.strip()}")

    def freeze(self) -> list[int]:
        """SIGSTOP the server and every backend: connections stay open, nothing answers."""
        pid = self.pid()
        if pid is None:
            raise DevstackError("throwaway postgres is not running")
        pids = [pid, *_children(pid)]
        for p in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, _signal.SIGSTOP)
        self._frozen = pids
        return pids

    def thaw(self) -> None:
        """SIGCONT what ``freeze`` stopped."""
        for p in self._frozen:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p, _signal.SIGCONT)
        self._frozen = []

    def remove(self) -> None:
        try:
            self.stop()
        finally:
            shutil.rmtree(self.directory, ignore_errors=True)

    def _psql(self, sql: str) -> str:
        proc = _run(
            [_pg_tool("psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-h", HOST, "-p", str(self.port),
             "-U", POSTGRES_USER, "-d", "postgres", "-c", sql],
            timeout=30,
        )
        if proc.returncode != 0:
            raise DevstackError(f"psql failed: {proc.stderr.strip() or proc.stdout.strip()}")
        return proc.stdout.strip()


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (Linux /proc)."""
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


# --------------------------------------------------------------------------- all together


def _selected(only: Sequence[str] | None) -> list[str]:
    if not only:
        return list(COMPONENTS)
    unknown = [c for c in only if c not in COMPONENTS]
    if unknown:
        raise DevstackError(f"unknown component(s) {unknown}; choose from {list(COMPONENTS)}")
    return [c for c in COMPONENTS if c in only]


def ensure(only: Sequence[str] | None = None) -> dict[str, object]:
    """Start the selected components (all by default); return their addresses by name."""
    from devstack import hatchet  # it builds on this module

    starters = {
        "single": ensure_single, "cluster": ensure_cluster, "postgres": ensure_postgres,
        "hatchet": hatchet.ensure_hatchet,
    }
    return {name: starters[name]() for name in _selected(only)}


def stop(only: Sequence[str] | None = None) -> None:
    """Stop the selected components (all by default); stopping what is stopped is fine."""
    from devstack import hatchet

    stoppers = {
        "single": _stop_single, "cluster": _stop_cluster, "postgres": _stop_postgres,
        "hatchet": hatchet.stop_hatchet,
    }
    for name in reversed(_selected(only)):
        stoppers[name]()


def stop_all() -> None:
    stop()


def status(only: Sequence[str] | None = None) -> list[ComponentStatus]:
    from devstack import hatchet

    probes = {
        "single": _single_status, "cluster": _cluster_status, "postgres": _postgres_status,
        "hatchet": hatchet.hatchet_status,
    }
    return [probes[name]() for name in _selected(only)]
