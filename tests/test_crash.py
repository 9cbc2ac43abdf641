"""Crash recovery through the CLI: runs killed with SIGKILL at random points, then restarted with the
same command until one finishes, write what one uninterrupted run writes: every message, window,
alert, late event and dead letter exactly once, in the JSONL files and in the lake."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from cli import main
from connectors.lake.tables import open_catalog
from samples.generate import SampleSpec, write_sample
from tests.conftest import jsonl_counts, read_jsonl
from tests.progress import Condition, every, grown_by, has_file, snapshots_after, wait_until

ROOT = Path(__file__).parent.parent
pytestmark = [pytest.mark.crash, pytest.mark.slow]


@pytest.fixture(scope="module")
def sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("crash") / "conversations.jsonl"
    write_sample(path, SampleSpec(sessions=400, chat_users=100, seed=5))
    return path


def run_args(sample: Path, out: Path, *extra: str) -> list[str]:
    return ["run", "--input", str(sample), "--out-dir", str(out), "--speed-factor", "0", "--quiet", "--lake", *extra]


def lake_rows(out: Path) -> dict[str, Counter[int]]:
    """Each table's record hashes with their counts (a duplicate counts 2)."""
    catalog = open_catalog("convoflow", (out / "lake").resolve())
    return {name: Counter(catalog.load_table(("convoflow", name)).scan(selected_fields=("record_hash",))
                          .to_arrow().column("record_hash").to_pylist())
            for _, name in catalog.list_tables("convoflow")}


Trigger = Callable[[], Condition]
"""Made when a run starts: the progress at which to kill it."""


def start_cli(args: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT,
                            env={**os.environ, "RUST_BACKTRACE": "0"}, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def run_to_end(proc: subprocess.Popen[bytes]) -> None:
    _, err = proc.communicate()
    assert proc.returncode == 0, err.decode()[-2000:]


def crash_until_done(args: list[str], kill_at: list[Trigger]) -> int:
    """Run the CLI with `args` once per trigger, SIGKILLing each run when its trigger's progress is
    seen, then once more to its end; return how many runs were killed (a run that ends before its
    trigger is not)."""
    kills = 0
    for trigger in kill_at:
        proc = start_cli(args)
        if wait_until(trigger(), proc):
            proc.send_signal(signal.SIGKILL)
            proc.communicate()
            kills += 1
        else:
            run_to_end(proc)
    run_to_end(start_cli(args))
    return kills


def test_runs_killed_at_random_points_resume_to_the_outputs_of_one_uninterrupted_run(sample: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert main(run_args(sample, straight)) == 0
    crashed, recovery = tmp_path / "crashed", tmp_path / "recovery"
    # Frequent lake commits: killed runs leave rows in the lake, which a resumed run must neither
    # write again nor count as user history (profiles) of the records it replays. Paced at 500x,
    # the sample's hour of event time takes ~7 s of wall time however fast the machine is; each
    # kill comes within ~1 s of a run's progress.
    args = run_args(sample, crashed, "--recovery-dir", str(recovery), "--snapshot-interval", "0.2",
                    "--lake-commit-interval", "0.5", "--speed-factor", "500")
    rnd = random.Random(3)
    kill_at: list[Trigger] = [
        lambda k=rnd.randint(1, 5): snapshots_after(recovery, k),
        lambda n=rnd.randint(50, 1500): grown_by(crashed / "messages.jsonl", n),
        lambda k=rnd.randint(1, 5): snapshots_after(recovery, k),
    ]
    kills = crash_until_done(args, kill_at)
    assert kills == len(kill_at), "the test must kill runs mid-way to test anything"
    expected = jsonl_counts(straight)
    assert sum(map(len, expected.values())) > 5_000
    assert jsonl_counts(crashed) == expected
    got, want = lake_rows(crashed), lake_rows(straight)
    assert {name: max(rows.values(), default=1) for name, rows in got.items()} == {name: 1 for name in want}, "duplicates"
    assert got == want
    done = subprocess.run([sys.executable, str(ROOT / "cli.py"), *args], cwd=ROOT, capture_output=True, text=True,
                          check=True)
    assert "nothing to do: this job finished" in done.stdout
    assert jsonl_counts(crashed) == expected


def test_runs_killed_before_their_first_snapshot_start_over_without_duplicates(sample: Path, tmp_path: Path) -> None:
    """No snapshot yet: the outputs the killed run wrote (JSONL lines, lake commits) are replaced, not added to."""
    straight = tmp_path / "straight"
    assert main(run_args(sample, straight)) == 0
    crashed = tmp_path / "crashed"
    args = run_args(sample, crashed, "--recovery-dir", str(tmp_path / "recovery"), "--snapshot-interval", "600",
                    "--lake-commit-interval", "0.2", "--speed-factor", "500")
    rnd = random.Random(4)

    def wrote_lines_and_lake_rows(lines: int) -> Trigger:
        return lambda: every(grown_by(crashed / "messages.jsonl", lines), has_file(crashed / "lake", "*.parquet"))

    kill_at = [wrote_lines_and_lake_rows(rnd.randint(200, 4000)) for _ in range(2)]
    kills = crash_until_done(args, kill_at)
    assert kills == len(kill_at), "the test must kill runs mid-way to test anything"
    assert lake_rows(crashed)["chat_messages"].total() > 0
    assert jsonl_counts(crashed) == jsonl_counts(straight)
    assert lake_rows(crashed) == lake_rows(straight)


def stop_with_sigterm(args: list[str], out: Path, lines: int) -> subprocess.CompletedProcess[str]:
    """Run the CLI with `args`, send it SIGTERM once `out/messages.jsonl` holds `lines` lines, and wait for it to stop."""
    proc = start_cli(args)
    assert wait_until(grown_by(out / "messages.jsonl", lines), proc), "the run ended before it was stopped"
    proc.send_signal(signal.SIGTERM)
    out_bytes, err_bytes = proc.communicate()
    return subprocess.CompletedProcess(proc.args, proc.returncode, out_bytes.decode(), err_bytes.decode())


def test_sigterm_without_recovery_drains_the_flow_so_every_output_is_whole(sample: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    stopped = stop_with_sigterm(run_args(sample, out, "--speed-factor", "300"), out, lines=500)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "stopped by SIGTERM" in stopped.stderr and "events in" in stopped.stdout
    records = {p.name: read_jsonl(p) for p in out.glob("*.jsonl")}
    messages = len(records["messages.jsonl"])
    assert 0 < messages < len(sample.read_bytes().splitlines()), "stopped part-way"
    windowed = sum(len(w["messages"]) for w in records["windows.jsonl"])
    assert windowed + len(records["late.jsonl"]) == messages, "every open window was emitted"
    assert lake_rows(out)["chat_messages"].total() == messages


def test_sigterm_with_recovery_leaves_the_rest_to_the_next_run(sample: Path, tmp_path: Path) -> None:
    straight = tmp_path / "straight"
    assert main(run_args(sample, straight, "--no-lake")) == 0
    args = run_args(sample, tmp_path / "out", "--no-lake", "--recovery-dir", str(tmp_path / "recovery"),
                    "--snapshot-interval", "0.2")
    stopped = stop_with_sigterm([*args, "--speed-factor", "300"], tmp_path / "out", lines=500)
    assert stopped.returncode == 143, stopped.stderr[-2000:]
    assert "rerun the same command to resume" in stopped.stderr
    assert main([*args, "--speed-factor", "300"]) == 0
    assert jsonl_counts(tmp_path / "out") == jsonl_counts(straight)


def test_a_recovery_folder_of_another_job_is_refused(sample: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    recovery = tmp_path / "recovery"
    assert main(run_args(sample, tmp_path / "a", "--recovery-dir", str(recovery), "--no-lake")) == 0
    assert main(run_args(sample, tmp_path / "b", "--recovery-dir", str(recovery), "--no-lake")) == 2
    err = capsys.readouterr().err
    assert "holds a run of another job" in err and "out_dir" in err


def test_a_rerun_with_other_window_limits_is_another_job(sample: Path, tmp_path: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    args = run_args(sample, tmp_path / "out", "--recovery-dir", str(tmp_path / "recovery"), "--no-lake")
    assert main(args) == 0
    assert main([*args, "--max-window-messages", "5"]) == 2
    assert "max_window_messages" in capsys.readouterr().err
    assert main([*args, "--max-line-bytes", "200"]) == 2, "longer lines would be dead letters now"
    assert "max_line_bytes" in capsys.readouterr().err


def content(records: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    """Messages by what they say, not by id (a file line and a topic offset name the same event differently)."""
    return Counter((r["session_id"], r["sender"], r["text"], r["timestamp"]) for r in records)


def windows_by_content(records: list[dict[str, Any]]) -> Counter[tuple[Any, ...]]:
    return Counter((w["session_id"], w["window_start"], tuple((m["sender"], m["text"], m["timestamp"]) for m in w["messages"]))
                   for w in records)


@pytest.mark.kafka
def test_kafka_runs_killed_at_random_points_resume_with_every_message_once(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: Callable[..., str]
) -> None:
    timed = tmp_path / "timed.jsonl"
    write_sample(timed, SampleSpec(sessions=1000, chat_users=200, seed=9, late_fraction=0.0, no_timestamp_fraction=0.0))
    topic = kafka_topic(partitions=3)
    assert main(["produce", str(timed), "--kafka-brokers", kafka_bootstrap, "--topic", topic, "--speed-factor", "0"]) == 0
    replayed = tmp_path / "replayed"
    assert main(["run", "--input", str(timed), "--out-dir", str(replayed), "--speed-factor", "0", "--quiet",
                 "--max-out-of-orderness", "30"]) == 0
    out = tmp_path / "kafka"
    args = ["run", "--kafka-brokers", kafka_bootstrap, "--input-topic", topic, "--create-topics",
            *(flag for kind in ("output", "windows", "alerts", "late", "dead-letter", "moderated", "rules")
              for flag in (f"--{kind}-topic", f"{topic}.{kind}")),
            "--stop-at-end", "--max-out-of-orderness", "30", "--out-dir", str(out), "--quiet",
            "--recovery-dir", str(tmp_path / "recovery"), "--snapshot-interval", "0.2"]
    # Killed once it has written its first records, within its first tenth of the input.
    rnd = random.Random(5)
    kill_at: list[Trigger] = [lambda n=rnd.randint(1, 2000): grown_by(out / "messages.jsonl", n)]
    kills = crash_until_done(args, kill_at)
    assert kills == len(kill_at), "the test must kill a run mid-way to test anything"
    assert content(read_jsonl(out / "messages.jsonl")) == content(read_jsonl(replayed / "messages.jsonl"))
    assert windows_by_content(read_jsonl(out / "windows.jsonl")) == windows_by_content(read_jsonl(replayed / "windows.jsonl"))
    assert len(read_jsonl(out / "dead_letter.jsonl")) == len(read_jsonl(replayed / "dead_letter.jsonl"))
