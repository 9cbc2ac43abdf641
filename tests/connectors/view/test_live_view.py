"""The live view on rich's recording console: counters, the replay's progress, and panes showing the
latest windows, alerts, moderated messages and dead letters of a real run."""

from __future__ import annotations

import io
import time
from pathlib import Path

import polars as pl
from rich.console import Console

from connectors.view.glimpses import KEPT, glimpses_of, latest_glimpses, short
from connectors.view.live import LiveView, RunStats
from connectors.files.patterns_file import load_patterns
from connectors.run.runner import ReplayRun, run_job
from dataflows.clock import ReplayClock
from dataflows.flow import FlowConfig
from samples.generate import SampleSpec, write_sample
from tests.conftest import read_jsonl

ROOT = Path(__file__).resolve().parents[3]


def run_with_view(tmp_path: Path) -> tuple[str, Path, RunStats]:
    """A replay with rules and patterns under a recording live view; the last screen's text and the outputs."""
    sample = tmp_path / "events.jsonl"
    write_sample(sample, SampleSpec(sessions=50, chat_users=20, seed=21))
    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    state.mkdir()
    job = ReplayRun(sample, out, FlowConfig(patterns=load_patterns(ROOT / "samples" / "patterns.yaml"), rules=True,
                                            time_origin=0.0), ReplayClock(0.0, time.time(), 0.0), state_dir=state,
                    rules_path=ROOT / "samples" / "rules.jsonl", glimpses=True)
    console = Console(file=io.StringIO(), record=True, force_terminal=True, width=240, height=200)
    stats = RunStats(state, str(out))
    with LiveView(stats, console, enabled=True) as view:
        run_job(job, poll=view.poll)
    final = Console(file=io.StringIO(), record=True, width=240)
    final.print(view.render("convoflow: done"))
    return final.export_text(), out, stats


def test_the_view_shows_what_the_run_wrote_last(tmp_path: Path) -> None:
    text, out, stats = run_with_view(tmp_path)
    last_window = read_jsonl(out / "windows.jsonl")[-1]
    span = f"{last_window['window_start'][11:19]}-{last_window['window_end'][11:19]}"
    assert f"{last_window['session_id']} {span}" in " ".join(text.split())
    last_alert = read_jsonl(out / "alerts.jsonl")[-1]
    assert short(last_alert["summary"], 60)[:-1] in " ".join(text.split())
    last_blocked = read_jsonl(out / "moderated.jsonl")[-1]
    assert short(last_blocked["moderation"]["reasons"][0], 40)[:-1] in text
    last_dead = read_jsonl(out / "dead_letter.jsonl")[-1]
    assert f"{last_dead['source']}:{last_dead['line']}" in text
    for title in ("windows closed", "alerts", "moderated", "dead letters", "events read", "rule-set version"):
        assert title in text
    size = (tmp_path / "events.jsonl").stat().st_size
    assert stats.replay == (size, size) and "replay" in text and "100%" not in text  # bytes, not a percentage
    assert stats.events_read == sum(len(read_jsonl(out / f"{k}.jsonl")) for k in ("messages", "moderated", "dead_letter"))


def test_panes_keep_the_latest_few(tmp_path: Path) -> None:
    text, out, _ = run_with_view(tmp_path)
    panes = latest_glimpses(tmp_path / "state")
    assert all(len(glimpses) <= KEPT for glimpses in panes.values())
    assert len(panes["windows"]) == KEPT and len(read_jsonl(out / "windows.jsonl")) > KEPT
    times = [g["at"] for g in panes["windows"]]
    assert times == sorted(times)


def test_a_frame_and_its_records_give_the_same_glimpses() -> None:
    records = [{"pattern": "spam_burst", "key": f"u{i}", "severity": "warning", "summary": "x " * 100} for i in range(9)]
    frame = pl.DataFrame(records)
    assert glimpses_of("alerts", frame, seen=1.0) == glimpses_of("alerts", records, seen=1.0)
    assert [g["key"] for g in glimpses_of("alerts", records, seen=1.0)] == ["u5", "u6", "u7", "u8"]
    assert glimpses_of("messages", records) == [] and glimpses_of("alerts", []) == []
    assert len(glimpses_of("alerts", records, seen=1.0)[0]["summary"]) <= 140


def test_short_flattens_and_cuts() -> None:
    assert short("a\n  b\tc") == "a b c"
    assert short("x" * 100, 10) == "x" * 9 + "…"
    assert short(None) == ""
