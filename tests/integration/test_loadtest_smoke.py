"""The load tooling works: the locust suite runs headless against a real fleet (gateway, the
four stages, recorder) without a failed request, and the pipeline benchmark produces its
figures. Short runs; the numbers themselves are recorded in docs/benchmarks.md, not asserted."""

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
