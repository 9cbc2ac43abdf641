"""The command line against a real Kafka broker: live runs, output topics, dead letters, bad brokers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import Producer

from cli import main
from tests.conftest import read_jsonl
from samples.generate import SampleSpec, write_sample
from tests.kafka_broker import consume_all

ROOT = Path(__file__).parent.parent
KINDS = ("messages", "windows", "alerts", "late", "dead_letter")
OUT_OF_ORDERNESS = "30"
T_LOST = 1_709_542_800.0



def topic_flags(base: str) -> list[str]:
    """Output topic flags naming fresh topics after `base`, created by the run itself."""
    return ["--output-topic", f"{base}.messages", "--windows-topic", f"{base}.windows",
            "--alerts-topic", f"{base}.alerts", "--late-topic", f"{base}.late",
            "--dead-letter-topic", f"{base}.dead_letter", "--moderated-topic", f"{base}.moderated",
            "--rules-topic", f"{base}.rules", "--create-topics"]


@dataclass
class LiveRun:
    """A `cli.py run` on a topic in its own process; `stderr` is filled once it has been stopped."""

    process: subprocess.Popen[bytes]
    stderr: bytes = b""


@contextmanager
def live_run(brokers: str, topic: str, *flags: str) -> Iterator[LiveRun]:
    """Run the CLI live on `topic` (output topics after it) until the block ends, then stop it."""
    run = LiveRun(subprocess.Popen(
        [sys.executable, str(ROOT / "cli.py"), "run", "--kafka-brokers", brokers, "--input-topic", topic,
         *topic_flags(topic), *flags, "--no-patterns", "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    ))
    try:
        yield run
    finally:
        run.process.terminate()
        _, run.stderr = run.process.communicate(timeout=20)


def window_key(w: dict[str, Any]) -> tuple[Any, ...]:
    return (w["session_id"], w["window_start"], w["window_end"],
            tuple((m["sender"], m["text"], m["timestamp"]) for m in w["messages"]))


def epoch(iso: str) -> int:
    return int(datetime.fromisoformat(iso).timestamp())


@pytest.fixture(scope="module")
def timed_sample(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sample with bad lines and disorder but every event timed and none late: both runs must agree."""
    path = tmp_path_factory.mktemp("kafka") / "timed.jsonl"
    write_sample(path, SampleSpec(sessions=30, chat_users=8, seed=3, late_fraction=0.0, no_timestamp_fraction=0.0))
    return path


@pytest.mark.kafka
def test_a_kafka_run_gives_what_the_file_replay_gives(
    timed_sample: Path, tmp_path: Path, kafka_bootstrap: str, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(partitions=3)
    assert main(["produce", str(timed_sample), "--kafka-brokers", kafka_bootstrap, "--topic", topic,
                 "--speed-factor", "0"]) == 0
    replayed = tmp_path / "replayed"
    assert main(["run", "--input", str(timed_sample), "--out-dir", str(replayed), "--speed-factor", "0",
                 "--max-out-of-orderness", OUT_OF_ORDERNESS, "--quiet"]) == 0
    expected = {kind: read_jsonl(replayed / f"{kind}.jsonl") for kind in KINDS}
    assert expected["late"] == [] and expected["dead_letter"] and expected["alerts"]

    assert main(["run", "--kafka-brokers", kafka_bootstrap, "--input-topic", topic, *topic_flags(topic),
                 "--workers", "2", "--stop-at-end", "--max-out-of-orderness", OUT_OF_ORDERNESS, "--quiet"]) == 0
    got = {kind: consume_all(kafka_bootstrap, f"{topic}.{kind}", 3, len(expected[kind]), timeout_s=20)
           for kind in KINDS}
    assert {kind: len(got[kind]) for kind in KINDS} == {kind: len(expected[kind]) for kind in KINDS}

    envelopes = [(m.key(), m.partition(), orjson.loads(m.value())) for m in got["messages"]]
    assert {e["type"] for _, _, e in envelopes} == {"chat_message"}
    assert all(key == e["payload"]["session_id"].encode() for key, _, e in envelopes)
    assert all(e["payload"]["id"].startswith(f"{topic}/") and e["payload"]["translated"] is None for _, _, e in envelopes)
    partitions_of: dict[bytes, set[int]] = {}
    for key, partition, _ in envelopes:
        partitions_of.setdefault(key, set()).add(partition)
    assert all(len(p) == 1 for p in partitions_of.values()), "a session's messages stay on one partition"
    assert sorted((e["payload"]["session_id"], e["payload"]["text"], e["timestamp"]) for _, _, e in envelopes) == sorted(
        (r["session_id"], r["text"], epoch(r["timestamp"])) for r in expected["messages"])

    windows = [orjson.loads(m.value()) for m in got["windows"]]
    assert all(m.key() == w["session_id"].encode() for m, w in zip(got["windows"], windows, strict=True))
    assert sorted(map(window_key, windows)) == sorted(map(window_key, expected["windows"]))
    alerts = [orjson.loads(m.value()) for m in got["alerts"]]
    assert sorted((a["pattern"], a["key"], a["summary"]) for a in alerts) == sorted(
        (a["pattern"], a["key"], a["summary"]) for a in expected["alerts"])
    dead = [orjson.loads(m.value()) for m in got["dead_letter"]]
    assert sorted((d["reason"], d["raw"]) for d in dead) == sorted((d["reason"], d["raw"]) for d in expected["dead_letter"])
    assert all(d["topic"] == topic and d["source"] == f"{topic}/{d['partition']}" for d in dead)


@pytest.mark.kafka
def test_bad_bytes_on_the_input_topic_are_dead_letters_naming_topic_partition_offset(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(partitions=1)
    good = orjson.dumps({"session_id": "s-1", "sender": "customer", "message": "hi", "timestamp": 1_709_542_800})
    values = [good, b"\xff\xfe not utf-8", b"{not json", b'["a", "list"]', good.replace(b"hi", b"again")]
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for value in values:
        producer.produce(topic, value)
    assert producer.flush(10) == 0
    out = tmp_path / "out"
    assert main(["run", "--kafka-brokers", kafka_bootstrap, "--input-topic", topic, *topic_flags(topic),
                 "--out-dir", str(out), "--stop-at-end", "--quiet"]) == 0

    dead = sorted((orjson.loads(m.value()) for m in consume_all(kafka_bootstrap, f"{topic}.dead_letter", 1, 3)),
                  key=lambda d: d["offset"])
    assert [(d["topic"], d["partition"], d["offset"]) for d in dead] == [(topic, 0, 1), (topic, 0, 2), (topic, 0, 3)]
    assert "not valid UTF-8" in dead[0]["reason"]
    assert "not JSON" in dead[1]["reason"]
    assert "expected a JSON object, got an array" in dead[2]["reason"]
    assert read_jsonl(out / "dead_letter.jsonl") == dead, "the JSONL output holds the same dead letters"
    assert [m["text"] for m in read_jsonl(out / "messages.jsonl")] == ["hi", "again"]


@pytest.mark.kafka
def test_a_live_window_closes_on_the_system_clock_when_traffic_stops(
    kafka_bootstrap: str, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(partitions=2)
    with live_run(kafka_bootstrap, topic, "--window-size", "2", "--max-out-of-orderness", "1") as run:
        producer = Producer({"bootstrap.servers": kafka_bootstrap})
        # 2 s windows start at multiples of 2 s (epoch-aligned): 3 events 0.1 s apart fit in one
        # only if they do not straddle a start, so they go out at the beginning of the next window.
        now = (time.time() // 2 + 1) * 2 + 0.05
        time.sleep(now - time.time())
        for i, sender in enumerate(["customer", "rm", "customer"]):
            line = {"session_id": "live-1", "sender": sender, "message": f"m{i}", "timestamp": now + i * 0.1}
            producer.produce(topic, orjson.dumps(line), key=b"live-1")
        assert producer.flush(10) == 0
        [window] = consume_all(kafka_bootstrap, f"{topic}.windows", 2, 1, timeout_s=40)
        record = orjson.loads(window.value())
        assert [m["text"] for m in record["messages"]] == ["m0", "m1", "m2"]
        assert run.process.poll() is None, "the run waits for more input: only the wall clock closed the window"
    assert b"Traceback" not in run.stderr, run.stderr.decode(errors="replace")


@pytest.mark.kafka
def test_a_rule_sent_to_the_rules_topic_changes_later_messages_without_a_restart(
    kafka_bootstrap: str, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})

    def say(text: str) -> None:
        line = {"session_id": "s-live", "sender": "customer", "message": text, "timestamp": time.time()}
        producer.produce(topic, orjson.dumps(line), key=b"s-live")
        assert producer.flush(10) == 0

    with live_run(kafka_bootstrap, topic, "--rules-grace", "0.5") as run:
        say("darn, before the rule")
        [before] = consume_all(kafka_bootstrap, f"{topic}.messages", 1, 1, timeout_s=40)
        rule = {"id": "bw-live", "kind": "blocked_words", "version": 1, "timestamp": time.time(), "scope": "global",
                "body": {"words": ["darn"], "action": "mask"}}
        producer.produce(f"{topic}.rules", orjson.dumps(rule))
        assert producer.flush(10) == 0
        # The run takes the rule when its rules reader gets to it: speak after it until a message is masked.
        for probe in range(1, 100):
            say(f"darn, after the rule {probe}")
            messages = consume_all(kafka_bootstrap, f"{topic}.messages", 1, probe + 1, timeout_s=40)
            if orjson.loads(messages[-1].value())["payload"]["moderation"]["action"] == "mask":
                break
        assert run.process.poll() is None, "the same run took the rule"
    assert b"Traceback" not in run.stderr, run.stderr.decode(errors="replace")
    payloads = [orjson.loads(m.value())["payload"] for m in messages]
    assert (payloads[0]["text"], payloads[0]["moderation"]["action"]) == ("darn, before the rule", "allow")
    assert (payloads[-1]["text"], payloads[-1]["moderation"]["action"]) == (f"***, after the rule {probe}", "mask")
    assert all(p["moderation"]["action"] == "allow" for p in payloads[:-1]), "allowed until the rule was taken"
    assert payloads[-1]["moderation"]["rules"] == [{"id": "bw-live", "version": 1}]
    assert orjson.loads(before.value())["payload"] == payloads[0]


@pytest.mark.kafka
def test_a_broker_lost_mid_run_is_waited_for_and_nothing_accepted_is_lost(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], kafka_broker_pid: int
) -> None:
    topic = kafka_topic(partitions=2)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})

    def send(first: int, count: int) -> None:
        for i in range(first, first + count):
            line = {"session_id": f"s-{i % 5}", "sender": "customer", "message": f"m{i}", "timestamp": T_LOST + i}
            producer.produce(topic, orjson.dumps(line), key=f"s-{i % 5}".encode())
        assert producer.flush(10) == 0

    with live_run(kafka_bootstrap, topic) as run:
        send(0, 40)
        assert len(consume_all(kafka_bootstrap, f"{topic}.messages", 2, 40, timeout_s=40)) == 40
        send(40, 40)
        os.kill(kafka_broker_pid, signal.SIGSTOP)  # the broker stops answering, mid-flight
        try:
            time.sleep(8)
            assert run.process.poll() is None, "the run waits for the broker instead of failing"
        finally:
            os.kill(kafka_broker_pid, signal.SIGCONT)
        send(80, 40)
        # librdkafka's reconnect backoff after the pause is the broker's business, not a measure of
        # this run: the bound only ends a failing test.
        texts = [orjson.loads(m.value())["payload"]["text"]
                 for m in consume_all(kafka_bootstrap, f"{topic}.messages", 2, 120, timeout_s=300)]
        assert run.process.poll() is None
    missing = {f"m{i}" for i in range(120)} - set(texts)
    assert not missing, f"at least once: every accepted message is delivered; missing {sorted(missing)}; {run.stderr!r}"


@pytest.mark.kafka
def test_from_latest_skips_what_the_topic_held_before_the_run(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    topic = kafka_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(topic, orjson.dumps({"session_id": "s", "sender": "rm", "message": "old", "timestamp": T_LOST}))
    assert producer.flush(10) == 0
    base = ["run", "--kafka-brokers", kafka_bootstrap, "--input-topic", topic, *topic_flags(topic), "--stop-at-end",
            "--quiet"]
    assert main([*base, "--from-latest"]) == 0
    assert capsys.readouterr().out.startswith("0 events")
    assert main(base) == 0
    assert capsys.readouterr().out.startswith("1 event in"), "--from-beginning is the default"


def test_an_unreachable_broker_is_one_clear_error_within_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    started = time.monotonic()
    assert main(["run", "--kafka-brokers", "127.0.0.1:1", "--quiet"]) == 2
    assert time.monotonic() - started < 15
    err = capsys.readouterr().err
    assert err.startswith("error: Kafka brokers 127.0.0.1:1 did not answer") and err.count("\n") == 1


@pytest.mark.kafka
def test_missing_topics_are_named_unless_created(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], capsys: pytest.CaptureFixture[str]
) -> None:
    topic = kafka_topic(partitions=1)
    assert main(["run", "--kafka-brokers", kafka_bootstrap, "--input-topic", topic,
                 "--output-topic", f"{topic}.nowhere", "--stop-at-end", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"{topic}.nowhere" in err and "--create-topics" in err


def test_a_run_needs_exactly_one_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "--quiet"]) == 2
    assert main(["run", "--input", str(tmp_path / "x.jsonl"), "--kafka-brokers", "127.0.0.1:1", "--quiet"]) == 2
    assert capsys.readouterr().err.count("give either --input FILE") == 2
