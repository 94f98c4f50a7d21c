"""The gateway over real HTTP: CPU per accepted order and requests/s per gateway process.

    .venv/bin/python loadtest/bench_http.py --seconds 15 --connections 32

Starts a throwaway fleet (``loadtest/localfleet.py``: the gateway under uvicorn, the four
stages, the recorder; devstack's single Redis and PostgreSQL, a namespace of its own), sets up
``--portfolios`` portfolios and a trading key, then drives ``POST /v1/orders`` with ``wrk``
from another process: ``--connections`` keep-alive connections, each order a small market
order with a client order id of its own, buys and sells in turn over the portfolios.

Figures (window = wrk's run):

- requests/s and orders accepted/s (``202``; anything else is counted and reported);
- wrk's latency p50 / p99 / max (request sent → response read, per connection);
- **gateway CPU per accepted order**: user + system CPU (psutil) of the gateway process over
  the window ÷ orders accepted in it; the stages' and Redis's CPU are listed, not counted.

wrk and the fleet share this machine's CPUs: on two vCPUs the figure is what the gateway
spends per order, its requests/s what it got of the machine. ``--json`` writes the results.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import psutil

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from loadtest.bench_pipeline import git_state, machine  # noqa: E402
from loadtest.localfleet import http_fleet  # noqa: E402

TARGET_CPU_US = 120.0
BALANCES = {"USDT": "1000000000", "BTC": "100000", "ETH": "1000000", "SOL": "100000000"}
LIMITS = {"max_notional_per_order": "1000000", "max_position_per_symbol": "1000000000", "price_band": "0.05",
          "max_orders_per_window": 10_000_000, "window_seconds": 1}

# One request per call of ``request``: a market order of its own client order id, over the
# portfolios and sides in turn. ``done`` prints the status counts and wrk's latency as JSON.
WRK_LUA = r"""
local threads = {}
local n_threads = 0
function setup(thread)
  n_threads = n_threads + 1
  thread:set("tid", n_threads)
  table.insert(threads, thread)
end
local portfolios = {%(portfolios)s}
local key = "%(key)s"
local run = "run"
local counter = 0
statuses = {}  -- a global: done() reads it from each thread
function init(args)
  run = args[1]  -- each wrk run names its client order ids apart
  wrk.method = "POST"
  wrk.path = "/v1/orders"
  wrk.headers["Content-Type"] = "application/json"
  wrk.headers["Authorization"] = "Bearer " .. key
end
function request()
  counter = counter + 1
  local pid = portfolios[(counter %% #portfolios) + 1]
  local side = (counter %% 2 == 0) and "buy" or "sell"
  local body = string.format(
    '{"client_order_id":"%%s-%%d-%%d","portfolio_id":"%%s","symbol":"BTC/USDT","side":"%%s","type":"market","quantity":"0.001"}',
    run, tid, counter, pid, side)
  return wrk.format(nil, nil, nil, body)
end
function response(status, headers, body)
  statuses[status] = (statuses[status] or 0) + 1
end
function done(summary, latency, requests)
  local total = {}
  for _, t in ipairs(threads) do
    local s = t:get("statuses") or {}
    for code, n in pairs(s) do total[tostring(code)] = (total[tostring(code)] or 0) + n end
  end
  local parts = {}
  for code, n in pairs(total) do table.insert(parts, string.format('"%%s": %%d', code, n)) end
  io.write(string.format(
    'WRKJSON {"requests": %%d, "duration_us": %%d, "errors": %%d, "p50_us": %%d, "p90_us": %%d, "p99_us": %%d, "max_us": %%d, "statuses": {%%s}}\n',
    summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.status + summary.errors.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max, table.concat(parts, ", ")))
end
"""


def _call(url: str, method: str, key: str, body: dict[str, Any]) -> dict[str, Any]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(req, timeout=30) as resp:
        data: dict[str, Any] = json.loads(resp.read() or b"{}")
        return data


def run(args: argparse.Namespace) -> dict[str, Any]:
    wrk = shutil.which("wrk")
    if wrk is None:
        raise SystemExit("bench_http: wrk is not installed (make deps installs it)")
    work = Path(tempfile.mkdtemp(prefix="zvt-bench-http-"))
    # no per-key order limit: one key drives the whole run
    with http_fleet(log_dir=work / "logs", shards=args.shards, env={"ZVT_GATEWAY_KEY_ORDER_RATE": "0"}) as fleet:
        run_id = f"wrk{int(time.time())}"
        portfolios = [f"{fleet.namespace}-bh-{i}" for i in range(args.portfolios)]
        for pid in portfolios:
            _call(f"{fleet.url}/v1/portfolios/{pid}", "PUT", fleet.admin_key,
                  {"base_currency": "USDT", "balances": BALANCES, "limits": LIMITS})
        key = _call(f"{fleet.url}/v1/api-keys", "POST", fleet.admin_key,
                    {"name": run_id, "portfolios": portfolios, "scopes": ["trade", "read"]})["secret"]
        script = work / "orders.lua"
        script.write_text(WRK_LUA % {"portfolios": ", ".join(json.dumps(p) for p in portfolios), "key": key})
        procs = {p.label: p.popen.pid for ps in fleet.fleet.procs.values() for p in ps}
        meters = {label: psutil.Process(pid) for label, pid in procs.items()}

        def cpu() -> dict[str, float]:
            out = {}
            for label, proc in meters.items():
                t = proc.cpu_times()
                out[label] = t.user + t.system
            return out

        def command(seconds: int, run: str) -> list[str]:
            return [wrk, "-t", str(args.threads), "-c", str(args.connections), "-d", f"{seconds}s",
                    "--timeout", "10s", "-s", str(script), fleet.url, "--", run]

        if args.warmup > 0:
            subprocess.run(command(args.warmup, f"{run_id}w"), capture_output=True, timeout=120)
        c0, t0 = cpu(), time.perf_counter()
        proc = subprocess.run(command(args.seconds, run_id), capture_output=True, text=True, timeout=args.seconds + 120)
        elapsed = time.perf_counter() - t0
        c1 = cpu()
        if proc.returncode != 0:
            raise SystemExit(f"wrk failed ({proc.returncode}): {proc.stderr[-2000:]}")
        found = re.search(r"^WRKJSON (.*)$", proc.stdout, re.M)
        if found is None:
            raise SystemExit(f"wrk printed no summary:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
        w = json.loads(found.group(1))
    statuses = {str(k): int(v) for k, v in w["statuses"].items()}
    accepted = statuses.get("202", 0)
    seconds = w["duration_us"] / 1e6
    gateway = next(label for label in c0 if label.startswith("gateway"))
    gw_cpu = c1[gateway] - c0[gateway]
    return {
        "benchmark": "bench_http",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in sys.argv),
        "machine": machine(),
        "git": git_state(),
        "params": {"seconds": args.seconds, "connections": args.connections, "threads": args.threads,
                   "portfolios": args.portfolios, "shards": args.shards, "warmup": args.warmup},
        "requests": w["requests"],
        "requests_per_s": round(w["requests"] / seconds, 1),
        "accepted": accepted,
        "accepted_per_s": round(accepted / seconds, 1),
        "statuses": statuses,
        "socket_errors": w["errors"],
        "p50_ms": w["p50_us"] / 1000, "p90_ms": w["p90_us"] / 1000, "p99_ms": w["p99_us"] / 1000,
        "max_ms": w["max_us"] / 1000,
        "gateway_cpu_us_per_order": round(gw_cpu / accepted * 1e6, 1) if accepted else None,
        "gateway_core_share": round(gw_cpu / elapsed, 3),
        "cpu_by_process": {label: {"cpu_s": round(c1[label] - c0[label], 3),
                                   "core_share": round((c1[label] - c0[label]) / elapsed, 3)} for label in c0},
    }


def report(r: dict[str, Any]) -> None:
    p, m, g = r["params"], r["machine"], r["git"]
    print("=" * 86)
    print(f"bench_http: POST /v1/orders through uvicorn, wrk -t{p['threads']} -c{p['connections']} for {p['seconds']} s")
    print(f"  machine: {m['nproc']} CPUs ({m['cpu_model']}), load at start {', '.join(f'{x:.2f}' for x in m['loadavg_at_start'])}; "
          f"commit {g['commit']}" + (f" + modified {', '.join(g['modified'])}" if g["modified"] else ""))
    print("-" * 86)
    print(f"requests     {r['requests_per_s']:>10,.0f}/s ({r['requests']:,}); accepted {r['accepted_per_s']:,.0f} orders/s; "
          f"statuses {r['statuses']}; socket errors {r['socket_errors']}")
    print(f"latency      p50 {r['p50_ms']:.2f} ms, p90 {r['p90_ms']:.2f} ms, p99 {r['p99_ms']:.2f} ms, max {r['max_ms']:.2f} ms")
    for label, c in sorted(r["cpu_by_process"].items()):
        print(f"  {label:<26}{c['cpu_s']:>9.2f} s{100 * c['core_share']:>8.0f}% of a core")
    cpu = r["gateway_cpu_us_per_order"]
    print("-" * 86)
    print(f"target       gateway CPU <= {TARGET_CPU_US:.0f} us per accepted order: "
          + (f"{cpu:,.1f} -> {'met' if cpu <= TARGET_CPU_US else 'MISSED'}" if cpu is not None else "nothing accepted"))
    print("=" * 86)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    ap.add_argument("--seconds", type=int, default=15, help="length of wrk's run (the window)")
    ap.add_argument("--warmup", type=int, default=2, help="seconds of wrk before the window (0: none)")
    ap.add_argument("--connections", type=int, default=32, help="wrk's keep-alive connections")
    ap.add_argument("--threads", type=int, default=1, help="wrk's threads")
    ap.add_argument("--portfolios", type=int, default=8)
    ap.add_argument("--shards", type=int, default=16)
    ap.add_argument("--json", default=None, help="write the results here (folders are created)")
    args = ap.parse_args(argv)
    result = run(args)
    report(result)
    if args.json:
        out = Path(args.json)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2))
        print(f"wrote {out}")
    print(f"bench_http: {result['requests_per_s']:,.0f} requests/s, {result['accepted_per_s']:,.0f} accepted/s, "
          f"gateway {result['gateway_cpu_us_per_order']} us/order, p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
