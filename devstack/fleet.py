"""Run the fleet's services as local processes: ``python -m devstack fleet start|stop|status``.

``Fleet`` starts ``python -m services.<name>`` for each service with one environment, logs
each process to ``<log_dir>/<name>[-<i>].log`` and waits until each says it started (its JSON
``service started`` line, which also names its probe port). Tests use it directly to kill
(-9), restart and scale services; the CLI keeps pid files under ``.zvt/fleet`` so
``make down`` can stop what ``make up`` started.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from devstack.stack import ROOT, STATE_DIR, DevstackError, _pid_alive, _read_pidfile, _tail, _wait_dead

__all__ = [
    "PIPELINE", "SERVICES", "STAGING_VENUES", "Fleet", "Proc", "logged", "start_venue", "start_venues_detached",
    "status_detached", "stop_detached", "stop_venues_detached", "venues_setting",
]

PIPELINE = ("risk", "order", "routing", "portfolio")
"""The stages an order passes through, in order."""
SERVICES = (*PIPELINE, "recorder", "notifications", "gateway", "workflows")
"""Every service of the local fleet."""

FLEET_DIR = STATE_DIR / "fleet"


@dataclass
class Proc:
    name: str
    index: int
    popen: subprocess.Popen[bytes]
    log: Path
    http_port: int | None = None
    started: float = field(default_factory=time.monotonic)

    @property
    def label(self) -> str:
        return f"{self.name}-{self.index}"

    @property
    def alive(self) -> bool:
        return self.popen.poll() is None


class Fleet:
    def __init__(
        self,
        env: Mapping[str, str],
        *,
        log_dir: Path,
        python: str = sys.executable,
        start_timeout: float = 30.0,
    ) -> None:
        self.env = {**os.environ, **env}
        self.log_dir = log_dir
        self.python = python
        self.start_timeout = start_timeout
        self.procs: dict[str, list[Proc]] = {}
        log_dir.mkdir(parents=True, exist_ok=True)

    def start(self, names: Iterable[str] = SERVICES, *, replicas: int = 1, wait: bool = True,
              env: Mapping[str, str] | None = None) -> list[Proc]:
        started = []
        for name in names:
            for _ in range(replicas):
                started.append(self._spawn(name, env or {}))
        if wait:
            for proc in started:
                self.wait_started(proc)
        return started

    def _spawn(self, name: str, env: Mapping[str, str]) -> Proc:
        procs = self.procs.setdefault(name, [])
        index = len(procs)
        log = self.log_dir / f"{name}-{index}.log"
        out = log.open("ab")
        full_env = {"ZVT_HTTP_PORT": "0", "ZVT_SERVICE": name, **self.env, **env}
        popen = subprocess.Popen(
            [self.python, "-m", f"services.{name}"],
            cwd=ROOT,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        out.close()
        proc = Proc(name, index, popen, log)
        procs.append(proc)
        return proc

    def wait_started(self, proc: Proc) -> None:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if not proc.alive:
                raise DevstackError(f"{proc.label} exited with {proc.popen.returncode}:\n{_tail(proc.log, 30)}")
            port = _started_port(proc.log)
            if port is not None:
                proc.http_port = port
                return
            time.sleep(0.05)
        raise DevstackError(f"{proc.label} did not start within {self.start_timeout}s:\n{_tail(proc.log, 30)}")

    def live(self, name: str) -> list[Proc]:
        return [p for p in self.procs.get(name, []) if p.alive]

    def kill(self, name: str, sig: int = signal.SIGKILL) -> list[Proc]:
        """Send ``sig`` to every live process of ``name``; wait for them to exit."""
        victims = self.live(name)
        for proc in victims:
            proc.popen.send_signal(sig)
        for proc in victims:
            try:
                proc.popen.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                proc.popen.wait()
        return victims

    def freeze(self, name: str) -> list[Proc]:
        """SIGSTOP every live process of ``name``: a consumer stalled past its deadlines."""
        return self._signal(name, signal.SIGSTOP)

    def thaw(self, name: str) -> list[Proc]:
        """SIGCONT what ``freeze`` stopped."""
        return self._signal(name, signal.SIGCONT)

    def _signal(self, name: str, sig: int) -> list[Proc]:
        procs = self.live(name)
        for proc in procs:
            proc.popen.send_signal(sig)
        return procs

    def restart(self, name: str, sig: int = signal.SIGKILL) -> list[Proc]:
        count = max(1, len(self.kill(name, sig)))
        return self.start([name], replicas=count)

    def stop(self, timeout: float = 30.0) -> dict[str, int | None]:
        """SIGTERM everything, wait, SIGKILL what is left; returns exit codes by label."""
        everything = [p for procs in self.procs.values() for p in procs if p.alive]
        for proc in everything:
            proc.popen.send_signal(signal.SIGCONT)  # a frozen process would never see the TERM
            proc.popen.send_signal(signal.SIGTERM)
        codes: dict[str, int | None] = {}
        deadline = time.monotonic() + timeout
        for proc in everything:
            try:
                codes[proc.label] = proc.popen.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.popen.kill()
                codes[proc.label] = proc.popen.wait()
        return codes

    def pids(self) -> list[int]:
        return [p.popen.pid for procs in self.procs.values() for p in procs if p.alive]


def logged(proc: Proc, message: str, key: str, timeout: float = 30.0) -> object:
    """The ``key`` field of the last JSON log line ``message`` of ``proc`` (waits for it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in reversed(proc.log.read_text(errors="replace").splitlines()):
            if f'"{message}"' in line:
                try:
                    return json.loads(line)[key]
                except (ValueError, KeyError):
                    break
        time.sleep(0.05)
    raise DevstackError(f"{proc.label} did not log {message!r}:\n{_tail(proc.log, 30)}")


def _started_port(log: Path) -> int | None:
    try:
        text = log.read_text(errors="replace")
    except FileNotFoundError:
        return None
    for line in reversed(text.splitlines()):
        if '"service started"' in line:
            try:
                return int(json.loads(line).get("http_port"))
            except (ValueError, TypeError):
                return None
    return None


# ---------------------------------------------------------------------------------------------
# Detached fleet for `make up` / `make down`


def stop_detached(names: Iterable[str] = SERVICES, timeout: float = 30.0) -> list[str]:
    lines = []
    for name in names:
        if _stop_pidfile(FLEET_DIR / f"{name}.pid", f"services.{name}", timeout):
            lines.append(f"{name:14} stopped")
    return lines


def _stop_pidfile(pidfile: Path, marker: str, timeout: float) -> bool:
    """SIGTERM (then SIGKILL) the process a pid file names, if it is still ours; True if one ran."""
    pid = _read_pidfile(pidfile)
    ran = pid is not None and _pid_alive(pid, marker)
    if pid is not None and ran:
        os.kill(pid, signal.SIGTERM)
        if not _wait_dead(pid, timeout):
            os.kill(pid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)
    return ran


def status_detached(names: Iterable[str] = SERVICES) -> list[str]:
    lines = []
    for name in names:
        pid = _read_pidfile(FLEET_DIR / f"{name}.pid")
        alive = pid is not None and _pid_alive(pid, f"services.{name}")
        lines.append(f"{name:14} {'running (pid %d)' % pid if alive and pid else 'stopped'}")
    return lines


# ---------------------------------------------------------------------------------------------
# Simulated venue servers (the staging profile, venue tests)

STAGING_VENUES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("sima", ("--price-scale", "1.0000", "--maker-fee", "0.0008", "--taker-fee", "0.0010", "--seed", "1")),
    ("simb", ("--price-scale", "0.9997", "--maker-fee", "0.0010", "--taker-fee", "0.0015", "--seed", "2")),
    ("simc", ("--price-scale", "1.0002", "--maker-fee", "0.0002", "--taker-fee", "0.0005", "--seed", "3")),
)
"""Three venues with different prices and fees: sima is the reference, simb quotes lower with
dearer fees, simc higher with cheaper fees (which wins depends on side and fee)."""
VENUE_MARKER = "services.venues.sim"


def start_venue(name: str, port: int, log_dir: Path, args: Iterable[str] = (), *, python: str = sys.executable,
                host: str = "127.0.0.1", timeout: float = 30.0) -> subprocess.Popen[bytes]:
    """Start ``python -m services.venues.sim --name NAME --port PORT ...`` and wait until it
    listens (its ``ready`` line). The caller stops it (SIGTERM)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    log = log_dir / f"venue-{name}.log"
    with log.open("ab") as out:
        popen = subprocess.Popen(
            [python, "-m", VENUE_MARKER, "--name", name, "--host", host, "--port", str(port), *args],
            cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if popen.poll() is not None:
            raise DevstackError(f"venue {name} exited with {popen.returncode}:\n{_tail(log, 30)}")
        if f"ready {name} " in log.read_text(errors="replace"):
            return popen
        time.sleep(0.05)
    popen.kill()
    raise DevstackError(f"venue {name} did not listen on {host}:{port} within {timeout}s:\n{_tail(log, 30)}")


def venues_setting(venues: Iterable[tuple[str, int]], host: str = "127.0.0.1") -> str:
    """``ZVT_ROUTING_VENUES`` for simulated venue servers, traded through ccxt's binance client."""
    return ",".join(f"{name}=binance@http://{host}:{port}" for name, port in venues)


def start_venues_detached(base_port: int, log_dir: Path) -> tuple[str, list[str]]:
    """The staging venues as detached processes with pid files (``venue-<name>.pid``);
    returns (``ZVT_ROUTING_VENUES``, report lines)."""
    FLEET_DIR.mkdir(parents=True, exist_ok=True)
    lines, placed = [], []
    for i, (name, args) in enumerate(STAGING_VENUES):
        port = base_port + i
        placed.append((name, port))
        pidfile = FLEET_DIR / f"venue-{name}.pid"
        pid = _read_pidfile(pidfile)
        if pid is not None and _pid_alive(pid, VENUE_MARKER):
            lines.append(f"venue {name:8} already running (pid {pid})")
            continue
        popen = start_venue(name, port, log_dir, args)
        pidfile.write_text(str(popen.pid))
        lines.append(f"venue {name:8} started (pid {popen.pid}, http://127.0.0.1:{port}, Binance spot API)")
    return venues_setting(placed), lines


def stop_venues_detached(timeout: float = 10.0) -> list[str]:
    lines = []
    for pidfile in sorted(FLEET_DIR.glob("venue-*.pid")):
        if _stop_pidfile(pidfile, VENUE_MARKER, timeout):
            lines.append(f"{pidfile.stem:14} stopped")
    return lines
