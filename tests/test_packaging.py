"""The project installs the way the Dockerfile installs it (a wheel into a clean virtual
environment), and every service's entry point starts there and answers ``--help``."""

from __future__ import annotations

import re
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVICES = sorted(p.parent.name for p in (ROOT / "services").glob("*/__main__.py"))
TOOLS = {"demo", "replay", "ops"}  # commands, not long-running services


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh virtual environment with only the project's wheel (and its dependencies)."""
    work = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(work), str(ROOT)],
        check=True, capture_output=True, timeout=300,
    )
    wheel = next(work.glob("zvt_fleet-*.whl"))
    env_dir = work / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", str(wheel)],
        check=True, capture_output=True, timeout=600,
    )
    return python


def test_services_when_discovered_include_the_recorder() -> None:
    assert "recorder" in SERVICES


@pytest.mark.parametrize("service", SERVICES)
def test_entry_point_when_installed_from_the_wheel_answers_help(installed: Path, service: str) -> None:
    proc = subprocess.run(
        [str(installed), "-m", f"services.{service}", "--help"], cwd="/", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith(f"usage: python -m services.{service}")
    if service not in TOOLS:  # a service lists every setting it reads
        assert "ZVT_REDIS_URL" in proc.stdout


def test_smoke_command_when_installed_answers_help_and_refuses_bad_arguments(installed: Path) -> None:
    """``helm test`` runs ``python -m services.client.smoke`` in the image."""
    proc = subprocess.run([str(installed), "-m", "services.client.smoke", "--help"], cwd="/",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage: python -m services.client.smoke")
    proc = subprocess.run([str(installed), "-m", "services.client.smoke", "--quantity", "-1"], cwd="/",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "must be a positive decimal number: '-1'" in proc.stderr


def test_wheel_when_installed_carries_the_packages_and_not_the_tests(installed: Path) -> None:
    code = "import services.core.bus, services.trading, services.recorder.store, importlib.util as u; " \
           "print(u.find_spec('tests'))"
    proc = subprocess.run([str(installed), "-c", code], cwd="/", capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "None"


def test_dockerfile_when_read_is_multi_stage_non_root_with_an_init_and_pinned_base() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert len(re.findall(r"^FROM ", text, re.M)) == 2
    assert re.search(r"^ARG PYTHON_IMAGE=python:3\.11\.\d+-slim-bookworm$", text, re.M)
    assert ":latest" not in text
    user = re.findall(r"^USER (\S+)$", text, re.M)
    assert user == ["10001:10001"]
    assert 'ENTRYPOINT ["/usr/bin/tini", "--", "python", "-m"]' in text
    assert re.search(r"pip install --no-index --find-links /wheels zvt-fleet", text)
