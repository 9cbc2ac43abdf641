"""The command line: happy paths through real runs, and every bad input as one line + exit 2."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cli import main
from tests.conftest import read_jsonl
from tests.progress import LineCounter, wait_until
from connectors.run.runner import ReplayRun, run_job
from dataflows.clock import ReplayClock
from dataflows.flow import FlowConfig
from samples.generate import SampleSpec, write_sample

ROOT = Path(__file__).parent.parent
T0 = 1_704_103_200.0



@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("samples") / "conversations.jsonl"
    write_sample(path, SampleSpec(sessions=120, chat_users=30, seed=11))
    return path


def test_run_writes_every_output_file(sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["run", "--input", str(sample), "--out-dir", str(out), "--speed-factor", "0", "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "alerts.jsonl", "dead_letter.jsonl", "late.jsonl", "messages.jsonl", "moderated.jsonl", "windows.jsonl"]
    assert {a["pattern"] for a in read_jsonl(out / "alerts.jsonl")} >= {"abandonment", "conversation_completion"}
    accepted, dead = read_jsonl(out / "messages.jsonl"), read_jsonl(out / "dead_letter.jsonl")
    assert len(accepted) + len(dead) == len(sample.read_bytes().splitlines())
    windowed = sum(len(w["messages"]) for w in read_jsonl(out / "windows.jsonl"))
    assert windowed + len(read_jsonl(out / "late.jsonl")) == len(accepted)
    assert "accepted" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["--input", "{missing}"], "does not exist"),
        (["--input", "{dir}"], "is not a regular file"),
        (["--input", "{sample}", "--window-size", "0"], "window size must be a positive"),
        (["--input", "{sample}", "--max-out-of-orderness", "-1"], "out-of-orderness must be >= 0"),
        (["--input", "{sample}", "--speed-factor", "-1"], "--speed-factor"),
        (["--input", "{sample}", "--speed-factor", "fast"], "--speed-factor"),
        (["--input", "{sample}", "--workers", "0"], "--workers"),
        (["--input", "{sample}", "--colour"], "No such option"),
        (["--input", "{sample}", "--out-dir", "{busy}"], "is not empty"),
        (["--input", "{sample}", "--patterns", "{bad_patterns}"], "pattern 'p1'"),
        (["--input", "{sample}", "--patterns", "{missing}"], "nope.jsonl"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    args: list[str], fragment: str, sample: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "windows.jsonl").write_text("{}\n")
    bad_patterns = tmp_path / "bad.yaml"
    bad_patterns.write_text("patterns:\n  - {id: p1, key: user, steps: [{name: a, where: {kind: X}, times: 0}], within_seconds: 5}\n")
    values = {"missing": tmp_path / "nope.jsonl", "dir": tmp_path, "sample": sample, "busy": busy,
              "bad_patterns": bad_patterns}
    argv = ["run", "--out-dir", str(tmp_path / "out"), "--quiet"] + [a.format(**values) for a in args]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert fragment in err
    assert err.count("\n") == 1 and err.startswith("error: ")


def test_overwrite_replaces_earlier_outputs(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["run", "--input", str(sample), "--out-dir", str(out), "--speed-factor", "0", "--quiet"]
    assert main(args) == 0
    first = (out / "windows.jsonl").read_bytes()
    assert main([*args, "--overwrite"]) == 0
    assert sorted(first.splitlines()) == sorted((out / "windows.jsonl").read_bytes().splitlines())


def test_samples_command_is_reproducible(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    assert main(["samples", "--out", str(a), "--sessions", "5"]) == 0
    assert main(["samples", "--out", str(b), "--sessions", "5"]) == 0
    assert a.read_bytes() == b.read_bytes() and a.stat().st_size > 0


def test_cli_script_runs_as_a_program(sample: Path, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "cli.py"), "run", "--input", str(sample), "--out-dir", str(tmp_path / "o"),
         "--speed-factor", "0"],
        capture_output=True, text=True, timeout=120, check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "windows" in result.stdout


@pytest.mark.slow
def test_processes_and_workers_give_the_same_results(sample: Path, tmp_path: Path) -> None:
    results = {}
    for processes, workers in [(1, 1), (1, 2), (2, 1)]:
        out = tmp_path / f"{processes}x{workers}"
        argv = ["run", "--input", str(sample), "--out-dir", str(out), "--speed-factor", "0", "--quiet",
                "--processes", str(processes), "--workers", str(workers), "--block-kib", "16"]
        assert main(argv) == 0
        results[(processes, workers)] = {p.name: sorted(p.read_bytes().splitlines()) for p in out.iterdir()}
    assert len(results[(1, 1)]["windows.jsonl"]) > 500
    assert results[(1, 2)] == results[(1, 1)]
    assert results[(2, 1)] == results[(1, 1)]


@pytest.mark.slow
def test_quiet_paced_replay_closes_windows_on_time_without_spinning(tmp_path: Path) -> None:
    """Two events 44 s apart at speed 10: a 4.4 s pause, during which the first window
    (end 10:00:30 + 5 s tolerance, due 3.5 s in) must close, and the worker must sleep."""
    path = tmp_path / "in.jsonl"
    path.write_text(
        '{"session_id": "a", "sender": "customer", "message": "hi", "timestamp": %f}\n'
        '{"session_id": "b", "sender": "customer", "message": "later", "timestamp": %f}\n' % (T0 + 1, T0 + 45)
    )
    out = tmp_path / "out"
    out.mkdir()
    start = time.time()
    job = ReplayRun(path, out, FlowConfig(time_origin=T0 + 1), ReplayClock(T0 + 1, start, 10.0))
    flow = threading.Thread(target=run_job, args=(job,))
    flow.start()
    messages, windows = LineCounter(out / "messages.jsonl"), LineCounter(out / "windows.jsonl")
    assert wait_until(lambda: messages() >= 1, flow), "the first event was written before the pause"
    cpu_before, pause_began = time.process_time(), time.monotonic()
    assert wait_until(lambda: windows() >= 1, flow), "the quiet input's window must close by the replay clock"
    cpu, paused = time.process_time() - cpu_before, time.monotonic() - pause_began
    written_by_then = messages()
    flow.join()
    assert time.time() - start >= 4.3, "the second event waited for its due time"
    assert written_by_then == 1, "the window closed during the pause, before the second event was due"
    # A spinning worker burns a core for the whole pause; a sleeping one wakes a few times a second.
    assert cpu < paused / 4, f"the worker spun: {cpu:.2f} s CPU over a {paused:.1f} s pause"


@pytest.mark.kafka
def test_produce_replays_a_file_into_a_topic(sample: Path, kafka_bootstrap: str, kafka_topic: Callable[..., str],
                                              capsys: pytest.CaptureFixture[str]) -> None:
    from confluent_kafka import Consumer

    topic = kafka_topic(partitions=3)
    assert main(["produce", str(sample), "--kafka-brokers", kafka_bootstrap, "--topic", topic, "--speed-factor", "0"]) == 0
    lines = len(sample.read_bytes().splitlines())
    assert f"produced {lines:,} messages" in capsys.readouterr().out
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"g-{topic}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    seen, deadline = 0, time.monotonic() + 30
    while seen < lines and time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None and msg.error() is None:
            seen += 1
    consumer.close()
    assert seen == lines


def test_produce_to_an_unreachable_broker_is_a_quick_one_line_error(
    sample: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    started = time.monotonic()
    assert main(["produce", str(sample), "--kafka-brokers", "127.0.0.1:1", "--topic", "t"]) == 2
    assert time.monotonic() - started < 10
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "127.0.0.1:1" in err and err.count("\n") == 1


@pytest.mark.lake
def test_lake_tables_hold_what_the_files_hold(sample: Path, tmp_path: Path) -> None:
    from connectors.lake.tables import TABLES, open_catalog

    out = tmp_path / "out"
    args = ["run", "--input", str(sample), "--out-dir", str(out), "--speed-factor", "0", "--quiet", "--lake"]
    assert main(args) == 0
    catalog = open_catalog(lake_dir=out / "lake")
    for kind, spec in TABLES.items():
        rows = catalog.load_table(("convoflow", spec.name)).scan().to_arrow().num_rows
        assert rows == len(read_jsonl(out / f"{kind}.jsonl")), kind
    assert main([*args, "--overwrite"]) == 0, "overwrite starts a fresh lake, not a second copy"
    catalog = open_catalog(lake_dir=out / "lake")
    messages = catalog.load_table(("convoflow", TABLES["messages"].name)).scan().to_arrow().num_rows
    assert messages == len(read_jsonl(out / "messages.jsonl"))
