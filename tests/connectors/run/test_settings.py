"""Run settings from a TOML file, CONVOFLOW_* variables and the command line, and how they are shown."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from connectors.run.settings import (
    DEFAULT_PATTERNS,
    REDACTED,
    LogFormat,
    RunSettings,
    SettingsError,
    as_toml,
    flag_of,
    load_settings,
    redacted,
)


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    for name in list(os.environ):
        if name.startswith("CONVOFLOW_") or name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
            monkeypatch.delenv(name)


def toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "convoflow.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_variables_or_options() -> None:
    loaded = load_settings(None, {})
    s = loaded.settings
    assert (s.window_size, s.max_out_of_orderness, s.speed_factor, s.workers) == (30.0, 5.0, 1.0, 1)
    assert s.patterns == DEFAULT_PATTERNS and s.log_format is LogFormat.text and s.kafka_config == []
    assert loaded.sources == {}


def test_options_over_variables_over_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = toml(tmp_path, "window-size = 60\nworkers = 3\nspeed_factor = 4.0\nquiet = true\n")
    monkeypatch.setenv("CONVOFLOW_WORKERS", "2")
    monkeypatch.setenv("CONVOFLOW_SPEED_FACTOR", "8")
    loaded = load_settings(config, {"speed_factor": 0.0})
    s = loaded.settings
    assert (s.window_size, s.workers, s.speed_factor, s.quiet) == (60.0, 2, 0.0, True)
    assert loaded.sources == {"window_size": str(config), "quiet": str(config), "workers": "environment",
                              "speed_factor": "command line"}


def test_relative_paths_in_a_file_are_from_its_folder(tmp_path: Path) -> None:
    config = toml(tmp_path, 'input = "data/events.jsonl"\nout_dir = "/abs/out"\nrules_topic = "relative/not/a/path"\n')
    s = load_settings(config, {}).settings
    assert s.input == tmp_path / "data" / "events.jsonl"
    assert s.out_dir == Path("/abs/out") and s.rules_topic == "relative/not/a/path"


def test_lists_and_choices_from_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CONVOFLOW_KAFKA_CONFIG", '["acks=all", "linger.ms=5"]')
    monkeypatch.setenv("CONVOFLOW_LOG_FORMAT", "json")
    s = load_settings(None, {}).settings
    assert s.kafka_config == ["acks=all", "linger.ms=5"] and s.log_format is LogFormat.json


def test_openai_variables_feed_the_llm_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-openai")
    monkeypatch.setenv("OPENAI_BASE_URL", "http://127.0.0.1:8000/v1")
    s = load_settings(None, {}).settings
    assert s.llm_api_key is not None and s.llm_api_key.get_secret_value() == "sk-openai"
    assert s.llm_base_url == "http://127.0.0.1:8000/v1"
    monkeypatch.setenv("CONVOFLOW_LLM_API_KEY", "sk-convoflow")
    key = load_settings(None, {}).settings.llm_api_key
    assert key is not None and key.get_secret_value() == "sk-convoflow"


@pytest.mark.parametrize(
    ("text", "variables", "given", "expected"),
    [
        ("colour = 'red'\n", {}, {}, "convoflow.toml: unknown key 'colour'"),
        ("window_size = 'big'\n", {}, {}, "convoflow.toml: window_size: Input should be a valid number"),
        ("workers = 0\n", {}, {}, "convoflow.toml: workers: Input should be greater than or equal to 1"),
        ("log-format = 'xml'\n", {}, {}, "convoflow.toml: log_format: Input should be 'text' or 'json'"),
        ("", {"CONVOFLOW_WORKERS": "two"}, {}, "CONVOFLOW_WORKERS: Input should be a valid integer"),
        ("", {}, {"speed_factor": -1.0}, "--speed-factor: Input should be greater than or equal to 0"),
    ],
)
def test_a_bad_setting_names_where_it_came_from(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                                                variables: dict[str, str], given: dict[str, object],
                                                expected: str) -> None:
    for name, value in variables.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as raised:
        load_settings(toml(tmp_path, text), given)
    message = str(raised.value)
    assert expected in message and "\n" not in message


def test_a_missing_or_broken_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="no such file"):
        load_settings(tmp_path / "absent.toml", {})
    with pytest.raises(SettingsError, match="convoflow.toml: not a TOML file"):
        load_settings(toml(tmp_path, "window_size = = 3\n"), {})


def test_secrets_are_redacted_and_the_rest_shown_as_toml(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-very-secret")
    config = toml(tmp_path, 'llm_base_url = "https://user:pw@llm.example/v1"\n'
                            'kafka_config = ["sasl.password=hunter2", "ssl.key.password=k2", "acks=all"]\n')
    loaded = load_settings(config, {"window_size": 45.0})
    shown = as_toml(redacted(loaded.settings), loaded.sources)
    for secret in ("sk-very-secret", "hunter2", "k2", "user:pw"):
        assert secret not in shown
    back = tomllib.loads(shown)
    assert back["llm_api_key"] == REDACTED and back["llm_base_url"] == f"https://{REDACTED}@llm.example/v1"
    assert back["kafka_config"] == [f"sasl.password={REDACTED}", f"ssl.key.password={REDACTED}", "acks=all"]
    assert back["window_size"] == 45.0 and back["patterns"] == str(DEFAULT_PATTERNS)
    assert "window_size = 45.0  # command line" in shown and "# input = (not set)" in shown
    unset = {name for name, value in loaded.settings.model_dump().items() if value is None}
    assert set(back) == set(RunSettings.model_fields) - unset


def test_flags_follow_the_command_line() -> None:
    assert flag_of("speed_factor") == "--speed-factor"
    assert flag_of("input") == "--input"
    assert flag_of("from_beginning") == "--from-beginning"
