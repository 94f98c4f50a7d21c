"""Settings: bounds, the one-line error, and the generated configuration table."""

from __future__ import annotations

from pathlib import Path

import pytest

from services.core.settings import BusSettings, CoreSettings, SettingsError, load, markdown

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"


def test_load_when_value_out_of_bounds_names_the_variable_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_BUS_BATCH_SIZE", "0")
    with pytest.raises(SettingsError) as info:
        load(BusSettings)
    assert info.value.code == 2
    assert "\n" not in info.value.line
    assert info.value.line.startswith("invalid setting ZVT_BUS_BATCH_SIZE:")
    assert "'0'" in info.value.line


def test_load_when_value_has_wrong_type_names_the_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_HTTP_PORT", "eighty")
    with pytest.raises(SettingsError, match="ZVT_HTTP_PORT"):
        load(CoreSettings)


def test_load_when_redis_url_is_not_redis_rejects_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_REDIS_URL", "http://localhost:6379")
    with pytest.raises(SettingsError, match="ZVT_REDIS_URL"):
        load(CoreSettings)


def test_load_when_groups_given_as_csv_splits_them(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZVT_BUS_MUST_PERSIST_GROUPS", "recorder, audit")
    assert load(BusSettings).must_persist_groups == ["recorder", "audit"]


def test_configuration_doc_when_generated_matches_the_committed_file() -> None:
    assert DOC.read_text() == markdown(), "regenerate: python -m services.core.settings > docs/configuration.md"
