"""The load tooling works: the locust suite runs headless against a real fleet (gateway, the
four stages, recorder) without a failed request, and every benchmark under loadtest/
produces its figures. Short runs; the numbers themselves are recorded in docs/benchmarks.md,
not asserted."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

from loadtest.localfleet import http_fleet

ROOT = Path(__file__).resolve().parents[2]


def test_locust_when_run_headless_against_the_fleet_makes_requests_without_failures(
    redis_single_url: str, postgres_dsn: str, tmp_path: Path
) -> None:
    out = tmp_path / "report"
    with http_fleet(redis_url=redis_single_url, postgres_dsn=postgres_dsn, log_dir=tmp_path / "logs") as fleet:
        env = {**os.environ, "ZVT_API_KEY": fleet.admin_key, "LOCUST_PORTFOLIO_PREFIX": f"{fleet.namespace}-"}
        env.pop("LOCUST_WAIT", None)
        proc = subprocess.run(
            [sys.executable, "loadtest/run_locust.py", "--host", fleet.url, "--processes", "1", "--users", "2",
             "--spawn-rate", "2", "--run-time", "10s", "--portfolios", "2", "--out", str(out)],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=80,
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with (out / "stats_stats.csv").open(newline="") as f:
        rows = {row["Name"]: row for row in csv.DictReader(f)}
    total = rows["Aggregated"]
    assert int(total["Failure Count"]) == 0
    assert int(total["Request Count"]) >= 20, proc.stdout
    orders = sum(int(r["Request Count"]) for name, r in rows.items() if name.startswith("POST /v1/orders"))
    assert orders >= 10, proc.stdout
    assert (out / "report.html").stat().st_size > 0
    assert "run_locust: ok" in proc.stdout


def test_bench_pipeline_when_run_briefly_reports_latency_throughput_and_cpu(tmp_path: Path) -> None:
    result = tmp_path / "pipeline.json"
    proc = subprocess.run(
        [sys.executable, "loadtest/bench_pipeline.py", "--seconds", "3", "--warmup", "1", "--rate", "100",
         "--shards", "4", "--portfolios", "8", "--json", str(result)],
        cwd=ROOT, capture_output=True, text=True, timeout=80,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert {"orders_per_s", "p50_ms", "p99_ms", "fleet_cpu_us_per_order", "cpu_by_process"} <= set(data)
    assert data["orders"] > 0 and data["orders_per_s"] > 0
    assert 0 < data["p50_ms"] <= data["p99_ms"]
    assert data["fleet_cpu_us_per_order"] > 0
    assert {"risk-0", "order-0", "routing-0", "portfolio-0"} <= set(data["cpu_by_process"])
    assert any(label.startswith("redis:") for label in data["cpu_by_process"])
    assert data["orders_missing_position"] == 0 and data["rejected"] == 0 and data["failed"] == 0
    assert "keys deleted" in proc.stdout


def test_bench_workflows_when_run_briefly_reports_both_paths_and_the_breakdown(
    tmp_path: Path, hatchet_env: dict[str, str]
) -> None:
    result = tmp_path / "workflows.json"
    proc = subprocess.run(
        [sys.executable, "loadtest/bench_workflows.py", "--seconds", "3", "--concurrency", "2", "--portfolios", "4",
         "--json", str(result)],
        cwd=ROOT, capture_output=True, text=True, timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert {"p50_ms", "p99_ms", "runs_per_s", "fastpath_p50_ms", "fastpath_p99_ms"} <= set(data)
    assert data["runs"] > 0 and data["errors"] == 0 and data["fastpath_errors"] == 0
    assert 0 < data["p50_ms"] <= data["p99_ms"] and 0 < data["fastpath_p50_ms"] <= data["fastpath_p99_ms"]
    assert all(v is not None and v > 0 for v in data["task_body_p50_ms"].values())


def test_soak_when_run_briefly_samples_memory_and_reports_both_slopes(tmp_path: Path) -> None:
    result = tmp_path / "soak.json"
    proc = subprocess.run(
        [sys.executable, "loadtest/soak.py", "--minutes", "0.35", "--rate", "50", "--retention-s", "4",
         "--settle-s", "4", "--sample-s", "1", "--open-probe", "0", "--json", str(result)],
        cwd=ROOT, capture_output=True, text=True, timeout=90,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    data = json.loads(result.read_text())
    assert {"orders", "rate", "retention_s", "memory_slope_bytes_per_order_before_retention",
            "memory_slope_bytes_per_order_after_retention", "samples"} <= set(data)
    assert data["orders"] > 0 and data["rate"] == 50 and data["retention_s"] == 4
    assert data["memory_slope_bytes_per_order_before_retention"] is not None
    assert data["memory_slope_bytes_per_order_after_retention"] is not None
    assert len(data["samples"]) >= 15 and all(s["used_memory"] > 0 and s["keys"] > 0 for s in data["samples"])
    assert "events of namespace" in proc.stdout


def _run(args: list[str], timeout: float) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


def test_bench_pipeline_when_run_with_two_replicas_splits_every_stage_s_shards_between_them(tmp_path: Path) -> None:
    result = tmp_path / "pipeline.json"
    _run(["loadtest/bench_pipeline.py", "--seconds", "3", "--warmup", "2", "--rate", "100", "--shards", "4",
          "--portfolios", "8", "--replicas", "2", "--json", str(result)], 120)
    data = json.loads(result.read_text())
    assert data["orders"] > 0 and data["orders_missing_position"] == 0 and data["failed"] == 0
    assert {"risk-0", "risk-1", "portfolio-0", "portfolio-1"} <= set(data["cpu_by_process"])
    for group, owners in data["shards_by_member"].items():
        assert "(none)" not in owners and sorted(owners.values()) == [2, 2], (group, owners)


def test_bench_bus_when_run_briefly_reports_throughput_latency_and_cpu_per_event(tmp_path: Path) -> None:
    result = tmp_path / "bus.json"
    _run(["loadtest/bench_bus.py", "--seconds", "2", "--warmup", "0.5", "--shards", "4", "--rate", "500",
          "--backlog", "5000", "--skip", "ceiling", "--json", str(result)], 120)
    data = json.loads(result.read_text())
    assert data["events_per_s"] > 0
    assert 0 < data["p50_ms"] <= data["p99_ms"]
    assert data["client_cpu_us_per_event"] > 0 and data["redis_cpu_us_per_event"] > 0


def test_bench_venues_when_run_briefly_times_both_submit_paths(tmp_path: Path) -> None:
    result = tmp_path / "venues.json"
    _run(["loadtest/bench_venues.py", "--orders", "50", "--concurrency", "4", "--json", str(result)], 120)
    paths = {r["path"]: r for r in json.loads(result.read_text())}
    assert set(paths) == {"paper", "ccxt"}
    for r in paths.values():
        assert r["orders"] == 50 and r["orders_per_s"] > 0 and 0 < r["p50_ms"] <= r["p99_ms"]


def test_bench_wait_when_run_briefly_times_submissions_with_and_without_the_replica_wait(
    redis_cluster_url: str, tmp_path: Path
) -> None:
    result = tmp_path / "wait.json"
    _run(["loadtest/bench_wait.py", "--orders", "100", "--concurrency", "1,8", "--json", str(result)], 200)
    rows = json.loads(result.read_text())["results"]
    assert {(r["wait"], r["concurrency"]) for r in rows} == {("off", 1), ("on", 1), ("off", 8), ("on", 8)}
    assert all(r["failed"] == 0 and r["orders"] == 100 and 0 < r["p50_ms"] <= r["p99_ms"] for r in rows)


def test_bench_failover_when_run_briefly_recovers_every_shard_and_handles_each_order_once(tmp_path: Path) -> None:
    result = tmp_path / "failover.json"
    _run(["loadtest/bench_failover.py", "--kills", "1", "--terms", "1", "--shards", "4", "--rate", "100",
          "--idle-seconds", "1", "--json", str(result)], 200)
    data = json.loads(result.read_text())
    assert data["failover"]["each_once"] is True
    assert [r["signal"] for r in data["failover"]["rounds"]] == ["SIGKILL", "SIGTERM"]
    assert all(r["recovery_s"] > 0 for r in data["failover"]["rounds"])
    assert data["idle"]["commands_sent_per_s_per_member"] > 0


def test_bench_http_when_run_briefly_reports_requests_and_gateway_cpu_per_order(
    redis_single_url: str, postgres_dsn: str, tmp_path: Path
) -> None:
    result = tmp_path / "http.json"
    _run(["loadtest/bench_http.py", "--seconds", "3", "--warmup", "1", "--connections", "4", "--shards", "4",
          "--portfolios", "2", "--json", str(result)], 180)
    data = json.loads(result.read_text())
    assert data["accepted"] > 0 and set(data["statuses"]) == {"202"} and data["socket_errors"] == 0
    assert data["requests_per_s"] > 0 and 0 < data["p50_ms"] <= data["p99_ms"]
    assert data["gateway_cpu_us_per_order"] > 0
