"""Prometheus metrics: scraped over HTTP and parsed with prometheus_client's parser, checked against
what the run wrote; and a running job (a local cluster of two processes) serving one port per process."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import Counter
from datetime import datetime
from pathlib import Path

import orjson
import pytest
from prometheus_client.parser import text_string_to_metric_families

from connectors.view.metrics import RunCollector, serving_metrics
from connectors.view.progress import reason_kind, tally_of
from connectors.run.runner import ReplayRun, run_job
from dataflows.clock import ReplayClock
from dataflows.flow import WATERMARK_GAUGE_STEP, FlowConfig
from samples.generate import SampleSpec, write_sample
from connectors.files.patterns_file import load_patterns
from tests.conftest import read_jsonl
from tests.progress import wait_until

ROOT = Path(__file__).resolve().parents[3]
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def scrape(port: int) -> Samples:
    """Every sample the endpoint serves: (name, sorted labels) -> value."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics") as response:
        text = response.read().decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted({"process": "0", **labels}.items())))]


def lines(path: Path) -> int:
    return len(path.read_bytes().splitlines())


def test_figures_are_the_run_outputs(tmp_path: Path) -> None:
    sample = tmp_path / "events.jsonl"
    write_sample(sample, SampleSpec(sessions=60, chat_users=20, seed=3))
    rules = tmp_path / "rules.jsonl"
    rules.write_bytes((ROOT / "samples" / "rules.jsonl").read_bytes())
    out, state = tmp_path / "out", tmp_path / "state"
    out.mkdir()
    state.mkdir()
    job = ReplayRun(sample, out, FlowConfig(patterns=load_patterns(ROOT / "samples" / "patterns.yaml"), rules=True,
                                            time_origin=0.0), ReplayClock(0.0, time.time(), 0.0),
                    state_dir=state, rules_path=rules)
    run_job(job)
    collector = RunCollector(state, 0, range(1))
    with serving_metrics([collector], "127.0.0.1", 0) as ports:
        samples = scrape(ports[0])

    outputs = {kind: lines(out / f"{kind}.jsonl") for kind in
               ("messages", "windows", "alerts", "late", "dead_letter", "moderated")}
    for kind, count in outputs.items():
        assert value(samples, "convoflow_records_written_total", output=kind) == count
    input_lines = lines(sample)
    rule_dead = sum(1 for d in read_jsonl(out / "dead_letter.jsonl") if d["step"] == "rules")
    assert value(samples, "convoflow_events_read_total") == input_lines + rule_dead
    assert value(samples, "convoflow_windows_emitted_total") == outputs["windows"]
    assert value(samples, "convoflow_late_events_total") == outputs["late"]
    reasons = Counter((d["step"], reason_kind(d["reason"])) for d in read_jsonl(out / "dead_letter.jsonl"))
    assert reasons and {(dict(k)["step"], dict(k)["reason"]): v for (name, k), v in samples.items()
                        if name == "convoflow_dead_letters_total"} == reasons
    patterns = Counter(a["pattern"] for a in read_jsonl(out / "alerts.jsonl"))
    assert patterns and {dict(k)["pattern"]: v for (name, k), v in samples.items()
                         if name == "convoflow_alerts_total"} == patterns
    actions = Counter(m["moderation"]["action"] for m in read_jsonl(out / "messages.jsonl"))
    assert value(samples, "convoflow_messages_judged_total", action="mask") == actions["mask"] > 0
    assert value(samples, "convoflow_messages_judged_total", action="flag") == actions["flag"] > 0
    assert value(samples, "convoflow_messages_judged_total", action="block") == outputs["moderated"] > 0
    assert value(samples, "convoflow_open_windows") == 0
    assert value(samples, "convoflow_rules_version") > 0
    latest = max(datetime.fromisoformat(m["timestamp"]).timestamp()
                 for kind in ("messages", "moderated") for m in read_jsonl(out / f"{kind}.jsonl") if m["timestamp"])
    mark = latest - FlowConfig().window.out_of_orderness  # the last clock less the bound
    assert mark - WATERMARK_GAUGE_STEP < value(samples, "convoflow_watermark_seconds") <= mark


@pytest.mark.lake
def test_lake_commits_and_rows_are_the_tables(tmp_path: Path) -> None:
    from connectors.lake.tables import ensure_tables, open_catalog
    from connectors.lake.admin import list_tables
    from connectors.run.runner import LakeConfig

    sample = tmp_path / "events.jsonl"
    write_sample(sample, SampleSpec(sessions=30, chat_users=10, seed=4))
    out, state, lake = tmp_path / "out", tmp_path / "state", tmp_path / "lake"
    for folder in (out, state, lake):
        folder.mkdir()
    catalog = open_catalog("convoflow", lake)
    ensure_tables(catalog)
    job = ReplayRun(sample, out, FlowConfig(time_origin=0.0), ReplayClock(0.0, time.time(), 0.0), state_dir=state,
                    lake=LakeConfig(lake, commit_rows=100))
    run_job(job)
    with serving_metrics([RunCollector(state, 0, range(1))], "127.0.0.1", 0) as ports:
        samples = scrape(ports[0])
    tables = {t.name: t for t in list_tables(catalog) if t.rows}
    assert len(tables) >= 4
    for name, table in tables.items():
        assert value(samples, "convoflow_lake_rows_total", table=name) == table.rows
        assert value(samples, "convoflow_lake_commits_total", table=name) == table.snapshots > 0


def test_llm_answers_and_latency_histogram(tmp_path: Path) -> None:
    windows = [{"assistant": {"status": "ok", "latency_ms": 40}}, {"assistant": {"status": "ok", "latency_ms": 300}},
               {"assistant": {"status": "error", "latency_ms": 2000}}, {"assistant": {"status": "skipped", "latency_ms": None}}]
    messages = [{"translation": {"status": "ok", "latency_ms": 120}}]
    totals: Counter[str] = Counter()
    for kind, records in (("windows", windows), ("messages", messages)):
        totals.update(tally_of(kind, records))  # type: ignore[arg-type]
    (tmp_path / "tally-0.json").write_bytes(orjson.dumps(dict(totals)))
    with serving_metrics([RunCollector(tmp_path, 0, range(1))], "127.0.0.1", 0) as ports:
        samples = scrape(ports[0])
    assert value(samples, "convoflow_llm_answers_total", stage="assistant", status="ok") == 2
    assert value(samples, "convoflow_llm_answers_total", stage="assistant", status="error") == 1
    assert value(samples, "convoflow_llm_answers_total", stage="assistant", status="skipped") == 1
    assert value(samples, "convoflow_llm_assistant_latency_seconds_bucket", le="0.05") == 1
    assert value(samples, "convoflow_llm_assistant_latency_seconds_bucket", le="0.5") == 2
    assert value(samples, "convoflow_llm_assistant_latency_seconds_bucket", le="+Inf") == 3
    assert value(samples, "convoflow_llm_assistant_latency_seconds_count") == 3
    assert value(samples, "convoflow_llm_assistant_latency_seconds_sum") == pytest.approx(2.34)
    assert value(samples, "convoflow_llm_translation_latency_seconds_bucket", le="0.1") == 0
    assert value(samples, "convoflow_llm_translation_latency_seconds_bucket", le="0.25") == 1


def _two_free_ports() -> int:
    """A port N with N + 1 free too."""
    while True:
        with socket.socket() as first:
            first.bind(("127.0.0.1", 0))
            port = first.getsockname()[1]
            with socket.socket() as second:
                try:
                    second.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
                return port


@pytest.mark.slow
def test_each_process_of_a_running_cluster_serves_its_own_port(tmp_path: Path) -> None:
    sample = tmp_path / "events.jsonl"
    write_sample(sample, SampleSpec(sessions=400, seed=9))  # about an hour of events, replayed in real time
    port = _two_free_ports()
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "run", "--input", str(sample), "--out-dir", str(tmp_path / "out"),
         "--speed-factor", "1", "--processes", "2", "--metrics-port", str(port), "--quiet"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    scraped: dict[int, Samples] = {}

    def both_read_events() -> bool:
        for process in (0, 1):
            try:
                samples = scrape(port + process)
            except OSError:
                return False
            scraped[process] = samples
        return all(
            scraped[p].get(("convoflow_events_read_total", (("process", str(p)),)), 0) > 0 for p in (0, 1))

    try:
        assert wait_until(both_read_events, proc), proc.communicate()[1]
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate()
    assert "stopped by SIGINT" in err
    assert ("convoflow_open_windows", (("process", "0"),)) in scraped[0]
    assert not any(name == "convoflow_open_windows" for name, _ in scraped[1])  # the flow's gauges: once
    assert ("convoflow_watermark_lag_seconds", (("process", "0"),)) in scraped[0]
