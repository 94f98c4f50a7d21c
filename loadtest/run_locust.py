"""Run the locust suite headless: a master and N worker processes, reports in .zvt/loadtest/.

    python loadtest/run_locust.py [--host URL] [--users 50] [--spawn-rate 10] [--run-time 30s]
                                  [--processes 2] [--wait SECONDS] [--think MIN,MAX] [--api-key KEY]
                                  [--out DIR] [--start-fleet]

``--host`` defaults to ``ZVT_GATEWAY_URL`` (environment, then ``.zvt/local.env``), the admin
key to ``ZVT_API_KEY`` likewise. ``--processes N`` starts a locust master and N workers
(``--processes 0``: one standalone process, no master). The master binds a free loopback port,
so runs do not collide. ``--wait S`` sets ``LOCUST_WAIT`` (market orders with ``?wait=S``,
recorded as ``POST /v1/orders?wait (order-to-fill)``).

Writes ``<out>/stats*.csv``, ``<out>/report.html`` and ``<out>/locust.log`` (``<out>``
defaults to ``.zvt/loadtest/<UTC timestamp>/``, which git ignores), prints a summary of the
aggregated stats and exits non-zero if locust failed, any request failed, or no request was
made. The last line is a one-line summary.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from devstack.envfile import read_env

ROOT = Path(__file__).resolve().parent.parent
LOCUSTFILE = ROOT / "loadtest" / "locustfile.py"
REPORTS = ROOT / ".zvt" / "loadtest"


def cpu_seconds(pids: dict[str, int]) -> dict[str, float]:
    """user + system CPU seconds of each process (psutil), skipping those gone."""
    import psutil

    out: dict[str, float] = {}
    for label, pid in pids.items():
        try:
            t = psutil.Process(pid).cpu_times()
        except psutil.Error:
            continue
        out[label] = t.user + t.system
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_seconds(text: str) -> float:
    """Locust's run time syntax (``30s``, ``2m``, ``1h30m``, ``45``) in seconds."""
    total, number = 0.0, ""
    for ch in text.strip():
        if ch.isdigit() or ch == ".":
            number += ch
        elif ch in "hms" and number:
            total += float(number) * {"h": 3600, "m": 60, "s": 1}[ch]
            number = ""
        else:
            raise argparse.ArgumentTypeError(f"bad run time {text!r}")
    return total + (float(number) if number else 0.0)


def summarize(prefix: Path) -> dict[str, Any]:
    """Rows of ``<prefix>_stats.csv`` and the failures file, as numbers."""
    rows: dict[str, dict[str, Any]] = {}
    with open(f"{prefix}_stats.csv", newline="") as f:
        for row in csv.DictReader(f):
            key = row["Name"]  # the locustfile's names start with the method
            rows[key] = {
                "requests": int(row["Request Count"]),
                "failures": int(row["Failure Count"]),
                "rps": float(row["Requests/s"]),
                "p50_ms": _num(row.get("50%")),
                "p99_ms": _num(row.get("99%")),
                "max_ms": _num(row.get("Max Response Time")),
            }
    failures: list[dict[str, str]] = []
    with open(f"{prefix}_failures.csv", newline="") as f:
        failures = list(csv.DictReader(f))
    return {"rows": rows, "failures": failures}


def _num(value: str | None) -> float | None:
    try:
        return float(value) if value not in (None, "", "N/A") else None
    except ValueError:
        return None


def main(argv: list[str] | None = None) -> int:
    local = read_env(ROOT / ".zvt" / "local.env")
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--host", default=os.environ.get("ZVT_GATEWAY_URL") or local.get("ZVT_GATEWAY_URL"),
                    help="gateway base URL (default: ZVT_GATEWAY_URL from the environment or .zvt/local.env)")
    ap.add_argument("--api-key", default=None, help="admin key (default: ZVT_API_KEY from the environment or .zvt/local.env)")
    ap.add_argument("--users", type=int, default=50)
    ap.add_argument("--spawn-rate", type=float, default=10.0)
    ap.add_argument("--run-time", default="30s", help="locust syntax: 30s, 2m, ...")
    ap.add_argument("--processes", type=int, default=2, help="worker processes under one master; 0 = one standalone process")
    ap.add_argument("--wait", type=float, default=None, help="LOCUST_WAIT: market orders with ?wait=<seconds>")
    ap.add_argument("--portfolios", type=int, default=None, help="LOCUST_PORTFOLIOS")
    ap.add_argument("--think", default=None, metavar="MIN,MAX", help="LOCUST_THINK: seconds between a user's requests")
    ap.add_argument("--out", default=None, help="report folder (default .zvt/loadtest/<UTC timestamp>/)")
    ap.add_argument("--locustfile", default=str(LOCUSTFILE))
    ap.add_argument("--start-fleet", action="store_true",
                    help="start a throwaway fleet (gateway, four stages, recorder; loadtest/localfleet.py) on a fresh "
                         "namespace of devstack's single Redis, run against it, stop it and delete its keys")
    args = ap.parse_args(argv)
    if args.start_fleet:
        sys.path.insert(0, str(ROOT))
        from loadtest.localfleet import http_fleet

        with http_fleet() as fleet:
            print(f"fleet: gateway {fleet.url}, namespace {fleet.namespace}, logs {fleet.log_dir}", flush=True)
            args.host, args.api_key = fleet.url, fleet.admin_key
            pids = {p.label: p.popen.pid for procs in fleet.fleet.procs.values() for p in procs}
            before, t0 = cpu_seconds(pids), time.monotonic()
            rc = run(args, local)
            after, elapsed = cpu_seconds(pids), time.monotonic() - t0
            print("fleet CPU over the run (s, % of a core; includes start-up of locust, not of the fleet): "
                  + ", ".join(f"{k} {after[k] - before[k]:.1f} ({100 * (after[k] - before[k]) / elapsed:.0f}%)"
                              for k in pids if k in before and k in after))
            return rc
    if not args.host:
        ap.error("no --host and no ZVT_GATEWAY_URL in the environment or .zvt/local.env")
    return run(args, local)


def run(args: argparse.Namespace, local: dict[str, str]) -> int:
    seconds = run_seconds(args.run_time)

    out = Path(args.out) if args.out else REPORTS / dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%SZ")
    out.mkdir(parents=True, exist_ok=True)
    prefix = out / "stats"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    api_key = args.api_key or os.environ.get("ZVT_API_KEY") or local.get("ZVT_API_KEY")
    if api_key:
        env["ZVT_API_KEY"] = api_key
    if args.wait is not None:
        env["LOCUST_WAIT"] = f"{args.wait:g}"
    if args.portfolios is not None:
        env["LOCUST_PORTFOLIOS"] = str(args.portfolios)
    if args.think is not None:
        env["LOCUST_THINK"] = args.think

    locust = [sys.executable, "-m", "locust", "-f", args.locustfile]
    common = ["--headless", "--host", args.host, "--only-summary", "--loglevel", "WARNING"]
    run_opts = ["--users", str(args.users), "--spawn-rate", f"{args.spawn_rate:g}", "--run-time", args.run_time,
                "--csv", str(prefix), "--html", str(out / "report.html"), "--stop-timeout", "5"]
    children0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    log = (out / "locust.log").open("wb")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        if args.processes <= 0:
            master = subprocess.Popen([*locust, *common, *run_opts], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
            procs.append(master)
        else:
            port = free_port()
            master = subprocess.Popen(
                [*locust, *common, *run_opts, "--master", "--master-bind-host", "127.0.0.1", "--master-bind-port", str(port),
                 "--expect-workers", str(args.processes), "--expect-workers-max-wait", "60"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
            )
            procs.append(master)
            for _ in range(args.processes):
                procs.append(subprocess.Popen(
                    [*locust, "--worker", "--master-host", "127.0.0.1", "--master-port", str(port),
                     "--loglevel", "WARNING"],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                ))
        started = time.monotonic()
        try:
            rc = master.wait(timeout=seconds + 120)
        except subprocess.TimeoutExpired:
            master.send_signal(signal.SIGINT)
            rc = master.wait(timeout=30)
            print(f"locust did not finish within {seconds + 120:.0f} s; interrupted", file=sys.stderr)
            rc = rc or 1
        for worker in procs[1:]:
            try:
                worker.wait(timeout=15)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        elapsed = time.monotonic() - started
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log.close()

    children1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    locust_cpu = (children1.ru_utime + children1.ru_stime) - (children0.ru_utime + children0.ru_stime)
    try:
        summary = summarize(prefix)
    except OSError as exc:
        print((out / "locust.log").read_text(errors="replace")[-4000:], file=sys.stderr)
        print(f"run_locust: no stats ({exc}); locust exited {rc}", file=sys.stderr)
        return rc or 1
    rows = summary["rows"]
    agg = rows.get("Aggregated", {"requests": 0, "failures": 0, "rps": 0.0, "p50_ms": None, "p99_ms": None, "max_ms": None})
    print(f"{'request':<58}{'count':>8}{'fail':>6}{'req/s':>9}{'p50 ms':>9}{'p99 ms':>9}")
    for name, r in sorted(rows.items(), key=lambda kv: (kv[0] == "Aggregated", kv[0])):
        print(f"{name[:57]:<58}{r['requests']:>8}{r['failures']:>6}{r['rps']:>9.1f}"
              f"{_f(r['p50_ms']):>9}{_f(r['p99_ms']):>9}")
    for failure in summary["failures"][:20]:
        print(f"FAILURE {failure.get('Method')} {failure.get('Name')}: {failure.get('Error')} x{failure.get('Occurrences')}")
    if rc != 0 and not summary["failures"]:
        print((out / "locust.log").read_text(errors="replace")[-4000:], file=sys.stderr)
    ok = rc == 0 and agg["failures"] == 0 and agg["requests"] > 0
    print(f"locust's own processes: {locust_cpu:.1f} s CPU ({100 * locust_cpu / max(elapsed, 1e-9):.0f}% of a core "
          f"over {elapsed:.0f} s, start-up included)")
    print(f"reports: {out}")
    print(f"run_locust: {'ok' if ok else 'FAILED'}: {agg['requests']} requests, {agg['failures']} failures, "
          f"{agg['rps']:.1f} req/s, p50 {_f(agg['p50_ms'])} ms, p99 {_f(agg['p99_ms'])} ms "
          f"({args.users} users, {args.processes} worker process(es), {elapsed:.0f} s, locust exit {rc})")
    return 0 if ok else (rc or 1)


def _f(value: float | None) -> str:
    return "n/a" if value is None else f"{value:g}"


if __name__ == "__main__":
    sys.exit(main())
