"""The chart's alert rules with the real promtool: they load (``promtool check rules``) and
fire when they should and only then (``promtool test rules`` with alerts_test.yaml)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.k8s.conftest import render

HERE = Path(__file__).resolve().parent
ALERTS = {
    "ZvtConsumerLagGrowing", "ZvtDeadLetters", "ZvtConsumerErrorRate", "ZvtGatewayErrorRate",
    "ZvtOrderLatencySLOBurnFast", "ZvtOrderLatencySLOBurnSlow", "ZvtRecorderFallingBehind",
    "ZvtConsumerGroupStalled", "ZvtDeadLetterStreamFilling",
}


@pytest.fixture(scope="module")
def rules_dir(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    proc = render(helm, "default")
    assert proc.returncode == 0, proc.stderr
    (rule,) = [o for o in yaml.safe_load_all(proc.stdout) if o and o["kind"] == "PrometheusRule"]
    work = tmp_path_factory.mktemp("rules")
    (work / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}, sort_keys=False))
    shutil.copy(HERE / "alerts_test.yaml", work / "alerts_test.yaml")
    return work


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("promtool")
    assert exe, "promtool not found: `make deps` installs Debian's prometheus package"
    return subprocess.run([exe, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_rules_when_checked_by_promtool_load(rules_dir: Path) -> None:
    proc = promtool("check", "rules", "rules.yaml", cwd=rules_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS: 13 rules found" in proc.stdout, proc.stdout


def test_rules_when_rendered_have_every_alert_with_a_runbook_section(rules_dir: Path) -> None:
    groups = yaml.safe_load((rules_dir / "rules.yaml").read_text())["groups"]
    alerts = {r["alert"] for g in groups for r in g["rules"] if "alert" in r}
    assert alerts == ALERTS
    runbooks = (HERE.parents[1] / "docs" / "operations.md").read_text()
    for alert in {a.removesuffix("Fast").removesuffix("Slow") for a in alerts}:
        assert f"### {alert}" in runbooks, f"docs/operations.md has no runbook for {alert}"


def test_alerts_when_unit_tested_by_promtool_fire_as_specified(rules_dir: Path) -> None:
    proc = promtool("test", "rules", "alerts_test.yaml", cwd=rules_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_alert_unit_tests_when_an_alert_is_broken_fail(rules_dir: Path, tmp_path: Path) -> None:
    """The unit tests can fail: a rule file whose recorder alert never fires breaks them."""
    broken = (rules_dir / "rules.yaml").read_text().replace("> 50000", "> 5000000")
    assert broken != (rules_dir / "rules.yaml").read_text()
    (tmp_path / "rules.yaml").write_text(broken)
    shutil.copy(rules_dir / "alerts_test.yaml", tmp_path)
    proc = promtool("test", "rules", "alerts_test.yaml", cwd=tmp_path)
    assert proc.returncode != 0
    assert "ZvtRecorderFallingBehind" in proc.stdout + proc.stderr
