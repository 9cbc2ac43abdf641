"""The command line's lake side: a run writes tables, `lake ...` reads and maintains them, history enriches a rerun."""

from __future__ import annotations

from pathlib import Path

import orjson
import pytest

from cli import main

SAMPLE = Path(__file__).parent.parent / "samples" / "conversations.jsonl"


@pytest.mark.lake
def test_lake_commands_read_and_maintain_what_a_run_wrote(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out, lake = tmp_path / "out", tmp_path / "out" / "lake"
    assert main(["run", "--input", str(SAMPLE), "--out-dir", str(out), "--speed-factor", "0", "--quiet", "--lake"]) == 0
    messages = out.joinpath("messages.jsonl").read_bytes().count(b"\n")
    capsys.readouterr()

    assert main(["lake", "tables", "--lake-dir", str(lake)]) == 0
    tables = {line.split()[0]: int(line.split()[1].replace(",", "")) for line in capsys.readouterr().out.splitlines()}
    assert tables["chat_messages"] == messages and set(tables) >= {"conversation_windows", "alerts", "moderated_messages"}

    assert main(["lake", "show", "messages", "--lake-dir", str(lake), "--limit", "2", "--where", "session_id = 's-0011'"]) == 0
    rows = [orjson.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(rows) == 2 and {r["session_id"] for r in rows} == {"s-0011"}

    assert main(["lake", "evolve", "messages", "sentiment_score", "double", "--lake-dir", str(lake)]) == 0
    capsys.readouterr()
    assert main(["lake", "show", "messages", "--lake-dir", str(lake), "--limit", "1"]) == 0
    assert orjson.loads(capsys.readouterr().out)["sentiment_score"] is None, "old rows read the new column as null"

    assert main(["lake", "snapshots", "windows", "--lake-dir", str(lake)]) == 0
    [before] = capsys.readouterr().out.splitlines()
    assert before.startswith("* ") and "convoflow.partition=convoflow/windows" in before
    assert main(["lake", "compact", "windows", "--lake-dir", str(lake)]) == 0
    assert "incremental readers" in capsys.readouterr().out, "compact says what it costs"
    assert main(["lake", "expire", "windows", "--older-than", "0s", "--lake-dir", str(lake)]) == 0
    assert capsys.readouterr().out.startswith("expired 2 snapshots, kept 1")

    rerun = tmp_path / "rerun"
    assert main(["run", "--input", str(SAMPLE), "--out-dir", str(rerun), "--speed-factor", "0", "--quiet",
                 "--lake-dir", str(lake)]) == 0
    first = orjson.loads(rerun.joinpath("messages.jsonl").read_bytes().splitlines()[0])
    assert first["user_context"]["total_messages"] >= 1, "the rerun sees the first run's history"


def test_lake_commands_name_a_missing_lake(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["lake", "tables", "--lake-dir", str(tmp_path / "nowhere")]) == 2
    assert "no lake in" in capsys.readouterr().err
