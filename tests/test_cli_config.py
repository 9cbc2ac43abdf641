"""`run --config`, CONVOFLOW_* variables, `config show`, `--log-format` and the installed `convoflow` command."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import orjson
import pytest

from cli import main
from samples.generate import SampleSpec, write_sample
from tests.conftest import read_jsonl


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("CONVOFLOW_") or name in ("OPENAI_API_KEY", "OPENAI_BASE_URL"):
            monkeypatch.delenv(name)


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "conversations.jsonl"
    write_sample(path, SampleSpec(sessions=40, chat_users=10, seed=5))
    return path


def window_lengths(out: Path) -> set[float]:
    def seconds(text: str) -> float:
        return datetime.fromisoformat(text).timestamp()

    return {seconds(w["window_end"]) - seconds(w["window_start"]) for w in read_jsonl(out / "windows.jsonl")}


def test_a_config_file_and_variables_drive_a_run(sample: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "convoflow.toml").write_text(
        f'input = "{sample}"\nout-dir = "out"\nwindow_size = 60\nspeed_factor = 5.0\nno_patterns = true\n')
    monkeypatch.setenv("CONVOFLOW_SPEED_FACTOR", "0")
    monkeypatch.setenv("CONVOFLOW_QUIET", "true")
    assert main(["run", "--config", str(tmp_path / "convoflow.toml")]) == 0
    out = tmp_path / "out"  # relative to the file's folder
    assert window_lengths(out) == {60.0}
    assert read_jsonl(out / "alerts.jsonl") == []
    assert main(["run", "--config", str(tmp_path / "convoflow.toml"), "--window-size", "20", "--overwrite"]) == 0
    assert window_lengths(out) == {20.0}
    assert "accepted" in capsys.readouterr().out


def test_a_bad_config_is_one_line_and_exit_2(sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(f'input = "{sample}"\nwindow_size = 30\nwindow-sise = 60\n')
    assert main(["run", "--config", str(config), "--out-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {config}: unknown key 'window_sise'") and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def test_json_logs_say_start_rules_and_stop_without_secrets(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    sample = tmp_path / "events.jsonl"
    sample.write_text('{"session_id": "s-1", "sender": "customer", "message": "hi", "timestamp": 1704103200}\n')
    rules = tmp_path / "rules.jsonl"
    rules.write_text('{"id": "bw-1", "kind": "blocked_words", "version": 1, "scope": "global", '
                     '"body": {"words": ["scam"], "action": "block"}}\n')
    monkeypatch.setenv("OPENAI_API_KEY", "sk-never-logged")
    args = ["run", "--input", str(sample), "--rules", str(rules), "--out-dir", str(tmp_path / "out"),
            "--speed-factor", "0", "--log-format", "json", "--llm", "off"]
    assert main(args) == 0
    err = capsys.readouterr().err
    assert "sk-never-logged" not in err
    lines = [orjson.loads(line) for line in err.splitlines()]
    assert [line["message"] for line in lines] == ["start", "rule", "stop"]
    start, rule, stop = lines
    assert start["input"] == str(sample) and start["processes"] == 1 and start["level"] == "info"
    assert (rule["id"], rule["version"], rule["kind"]) == ("bw-1", 1, "blocked_words")
    assert stop["reason"] == "end of input" and "1 accepted" in stop["summary"]


def test_quiet_runs_log_nothing(sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--input", str(sample), "--out-dir", str(tmp_path / "out"), "--speed-factor", "0",
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_config_show_prints_the_effective_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import tomllib

    config = tmp_path / "c.toml"
    config.write_text('window_size = 45\nkafka_config = ["sasl.password=hunter2"]\n')
    monkeypatch.setenv("CONVOFLOW_WORKERS", "4")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-hidden")
    assert main(["config", "show", "--config", str(config)]) == 0
    shown = capsys.readouterr().out
    assert "hunter2" not in shown and "sk-hidden" not in shown
    values = tomllib.loads(shown)
    assert (values["window_size"], values["workers"], values["max_out_of_orderness"]) == (45.0, 4, 5.0)
    assert "workers = 4  # environment" in shown and f"window_size = 45.0  # {config}" in shown


def test_the_installed_command() -> None:
    script = Path(sys.executable).parent / "convoflow"
    assert script.exists(), "make installs the project (pip install -e .), which makes the convoflow command"
    result = subprocess.run([str(script), "run", "--help"], capture_output=True, text=True, check=False,
                            env={**os.environ, "COLUMNS": "200"})
    assert result.returncode == 0, result.stderr
    assert "--window-size" in result.stdout and "--config" in result.stdout
