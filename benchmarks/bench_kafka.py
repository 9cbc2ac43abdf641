"""Kafka → Kafka throughput: convoflow's live pipeline against the Python client's own ceiling.

    python benchmarks/bench_kafka.py [--events 500000] [--brokers HOST:PORT] [--repeat 3] [--only loop convoflow]

Loads the seeded sample (cached under benchmarks/data/) into a fresh 3-partition topic once,
then measures, each case in a fresh Python process reading the whole topic:
- client loop: a plain confluent-kafka consume → JSON parse → re-encode → produce loop, the
  client's own ceiling for a Python consumer-producer;
- bytewax: Bytewax's own `KafkaSource` → parse and re-encode → `KafkaSink` on one worker, the
  engine's ceiling for any Kafka → Kafka flow (no shards, windows or outputs but one);
- bytewax-windows: the same, and each session's 30 s tumbling windows collected by Bytewax's own
  `collect_window` (EventClock, TumblingWindower, as the replay benchmark's bare case) and
  written to a second topic: the engine's ceiling for a flow that windows sessions, as convoflow's does;
- convoflow: `cli.py run --kafka-brokers ... --stop-at-end` with patterns off, the same
  flow as the replay benchmark's pipeline case (rules topic, LLM stage off), writing every output
  to its topic; on 1 process, and on 2 (the topic's partitions spread over both).

Events/s are input events over the output span: from the first output message to the last, by
the timestamps Kafka holds for them (set when each was produced), read back from the first and
last message of every output partition. That times the same work for every case: a convoflow
run's process time also includes its start-up (imports, broker checks, topic creation, starting
Bytewax), which the loop has none of; it is shown beside, with each case's CPU seconds (all its
threads and processes, so the other programs of a busy machine do not count). With `--repeat N`
the cases run N times, interleaved, and each round's ratio is shown: compare within a round.
Uses KAFKA_BOOTSTRAP_SERVERS or --brokers, else starts the project's broker
(scripts/kafka-local.sh; stop it with `scripts/kafka-local.sh stop`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import statistics
import sys
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_replay import cpu_seconds, ensure_sample, session_and_time, session_windows  # noqa: E402  (after the path is set)

TARGET_RATIO = 0.8
PARTITIONS = 3
CASES = ("loop", "bytewax", "bytewax-windows", "convoflow", "convoflow2")
LABELS = {"loop": "(a) confluent-kafka loop", "bytewax": "bare Bytewax Kafka → Kafka",
          "bytewax-windows": "bare Bytewax + windows",
          "convoflow": "(b) convoflow Kafka → Kafka", "convoflow2": "(b) same, 2 processes"}
CEILINGS = ("bytewax", "bytewax-windows")


@dataclass(frozen=True)
class CaseRun:
    """What one case reports: its process time, CPU seconds and the topics it wrote."""

    seconds: float
    cpu: float
    outputs: list[str]


@dataclass(frozen=True)
class Measured:
    """One case's run with its output span (first to last output message, by Kafka timestamps)."""

    run: CaseRun
    span: float
    messages: int


def client_loop(brokers: str, topic: str, events: int) -> CaseRun:
    """Consume every message, parse and re-encode it, produce it to another topic, flush."""
    import orjson
    from confluent_kafka import Consumer, Producer, TopicPartition

    out = f"{topic}.loop-{uuid.uuid4().hex[:6]}"
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "bench", "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5})
    seen = 0
    start = time.perf_counter()
    while seen < events:
        for msg in consumer.consume(1000, 1.0):
            if msg.error() is not None:
                continue
            seen += 1
            try:
                value = orjson.dumps(orjson.loads(msg.value()))
            except orjson.JSONDecodeError:
                value = msg.value()
            while True:
                try:
                    producer.produce(out, value, key=msg.key())
                    break
                except BufferError:
                    producer.poll(0.05)
        producer.poll(0)
    producer.flush()
    seconds = time.perf_counter() - start
    consumer.close()
    return CaseRun(seconds, cpu_seconds(), [out])


def bare_bytewax(brokers: str, topic: str, *, windows: bool = False) -> CaseRun:
    """Bytewax's Kafka connectors with only the loop's work between them: parse, re-encode, produce;
    with `windows`, also each session's tumbling windows by Bytewax's own operator, to a second topic."""
    from datetime import datetime

    import bytewax.operators as op
    import orjson
    from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage, KafkaSource, KafkaSourceMessage
    from bytewax.dataflow import Dataflow
    from bytewax.testing import run_main

    from connectors.kafka.clients import ensure_topics

    out = f"{topic}.bytewax-{uuid.uuid4().hex[:6]}"
    window_topic = f"{out}.windows"

    def reencode(msg: KafkaSourceMessage[bytes, bytes]) -> KafkaSinkMessage[bytes | None, bytes]:
        try:
            value = orjson.dumps(orjson.loads(msg.value))
        except orjson.JSONDecodeError:
            value = msg.value
        return KafkaSinkMessage(msg.key, value)

    Keyed = tuple[str, tuple[datetime, bytes]]

    def keyed(msg: KafkaSourceMessage[bytes, bytes]) -> Keyed | None:
        read = session_and_time(msg.value)
        return None if read is None else (read[0], (read[1], msg.value))

    def window_message(item: tuple[str, tuple[int, list[Keyed]]]) -> KafkaSinkMessage[bytes, bytes]:
        session, (_, events) = item
        value = orjson.dumps({"session_id": session, "messages": [orjson.loads(e[1][1]) for e in events]})
        return KafkaSinkMessage(session.encode(), value)

    ensure_topics(brokers, None, {out: PARTITIONS, window_topic: PARTITIONS})
    flow = Dataflow("bare-kafka")
    messages = op.input("in", flow, KafkaSource([brokers], [topic], tail=False))
    op.output("out", op.map("reencode", messages, reencode), KafkaSink([brokers], out))
    outputs = [out]
    if windows:
        by_session = op.key_on("key", op.filter_map("parse", messages, keyed), lambda e: e[0])
        collected = session_windows("windows", by_session)
        op.output("windows_out", op.map("window_message", collected.down, window_message),
                  KafkaSink([brokers], window_topic))
        outputs.append(window_topic)
    start = time.perf_counter()
    run_main(flow)
    return CaseRun(time.perf_counter() - start, cpu_seconds(), outputs)


def pipeline(brokers: str, topic: str, processes: int = 1) -> CaseRun:
    """convoflow's CLI run on the topic to its end, outputs to fresh topics."""
    from cli import main

    base = f"{topic}.cf-{uuid.uuid4().hex[:6]}"
    outputs = {kind: f"{base}.{kind}" for kind in ("messages", "windows", "alerts", "late", "dead", "moderated")}
    args = ["run", "--kafka-brokers", brokers, "--input-topic", topic, "--stop-at-end", "--no-patterns", "--quiet",
            "--processes", str(processes), "--llm", "off",
            "--output-topic", outputs["messages"], "--windows-topic", outputs["windows"], "--alerts-topic",
            outputs["alerts"], "--late-topic", outputs["late"], "--dead-letter-topic", outputs["dead"],
            "--moderated-topic", outputs["moderated"], "--rules-topic", f"{base}.rules", "--create-topics"]
    start = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - start
    if code != 0:
        sys.exit(f"convoflow run failed with exit code {code}")
    return CaseRun(seconds, cpu_seconds(), list(outputs.values()))


def output_span(brokers: str, topics: list[str]) -> tuple[float, int]:
    """Seconds from the first to the last message on `topics`, and how many there are.

    Each partition's first and last message stand for its earliest and latest: a producer
    appends in the order it produces.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "bench-span", "enable.auto.commit": False})
    stamps: list[int] = []
    count = 0
    try:
        metadata = consumer.list_topics(timeout=10)
        for topic in topics:
            for partition in metadata.topics[topic].partitions:
                low, high = consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)
                count += high - low
                stamps += [_timestamp_at(consumer, TopicPartition(topic, partition, o)) for o in {low, high - 1}
                           if high > low]
    finally:
        consumer.close()
    return (max(stamps) - min(stamps)) / 1000 if stamps else 0.0, count


def _timestamp_at(consumer: Any, where: Any) -> int:
    """The Kafka timestamp (ms) of the message at `where` (a TopicPartition with its offset)."""
    consumer.assign([where])
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        msg = consumer.poll(1.0)
        if msg is not None and msg.error() is None and (msg.topic(), msg.partition(), msg.offset()) == (
                where.topic, where.partition, where.offset):
            return int(msg.timestamp()[1])
    sys.exit(f"could not read {where} back")


def load_topic(brokers: str, path: Path) -> tuple[str, int]:
    from connectors.kafka.clients import ensure_topics, produce_file

    topic = f"bench-{path.stem}-{uuid.uuid4().hex[:6]}"
    ensure_topics(brokers, None, {topic: PARTITIONS})
    return topic, produce_file(path, brokers, topic, speed_factor=0)


def broker_address(given: str | None) -> str:
    if given:
        return given
    env = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "").strip()
    if env:
        return env
    result = subprocess.run([str(ROOT / "scripts" / "kafka-local.sh"), "start"], capture_output=True, text=True,
                            check=True, cwd=ROOT)
    return result.stdout.strip().splitlines()[-1]


def run_case(case: str, brokers: str, topic: str, events: int) -> Measured:
    result = subprocess.run(
        [sys.executable, __file__, "--case", case, "--brokers", brokers, "--topic", topic, "--events", str(events)],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    if result.returncode != 0:
        sys.exit(f"benchmark case {case} failed:\n{result.stderr[-3000:]}")
    run = CaseRun(**json.loads(result.stdout.strip().splitlines()[-1]))
    span, messages = output_span(brokers, run.outputs)
    return Measured(run, span, messages)


def report(rounds: list[dict[str, Measured]], events: int) -> None:
    print(f"{'round':<6}{'case':<32}{'process s':>10}{'span s':>8}{'events/s':>10}{'CPU s':>7}{'outputs':>9}")
    for number, results in enumerate(rounds, start=1):
        for case, m in results.items():
            print(f"{number:<6}{LABELS[case]:<32}{m.run.seconds:>10.2f}{m.span:>8.2f}{events / m.span:>10,.0f}"
                  f"{m.run.cpu:>7.1f}{m.messages:>9,}")
    if not all("loop" in r for r in rounds):
        return
    print("events/s over the output span (first output message to last); process s includes start-up")
    for case in (c for c in CASES[1:] if c in rounds[0]):
        ratios = [r["loop"].span / r[case].span for r in rounds]
        shown = ", ".join(f"{x:.2f}" for x in ratios)
        if case in CEILINGS:
            print(f"{LABELS[case]} / (a), by round: {shown} (the engine's ceiling, no target)")
            continue
        met = "met" if statistics.median(ratios) >= TARGET_RATIO else "MISSED"  # issue 19: medians of rounds
        print(f"{LABELS[case]} / (a), by round: {shown} (target >= {TARGET_RATIO}: {met})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--brokers")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "data")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all cases, interleaved")
    parser.add_argument("--only", nargs="+", choices=CASES, default=list(CASES),
                        help="run only these cases (ratios need the loop too)")
    parser.add_argument("--case", choices=CASES, help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        cases = {"loop": lambda: client_loop(args.brokers, args.topic, args.events),
                 "bytewax": lambda: bare_bytewax(args.brokers, args.topic),
                 "bytewax-windows": lambda: bare_bytewax(args.brokers, args.topic, windows=True),
                 "convoflow": lambda: pipeline(args.brokers, args.topic),
                 "convoflow2": lambda: pipeline(args.brokers, args.topic, processes=2)}
        print(json.dumps(asdict(cases[args.case]())))
        return

    brokers = broker_address(args.brokers)
    path, _ = ensure_sample(args.events, args.data_dir)
    started = time.perf_counter()
    topic, loaded = load_topic(brokers, path)
    print(f"loaded {loaded:,} events into {topic} ({PARTITIONS} partitions) at {brokers} "
          f"in {time.perf_counter() - started:.1f} s")
    rounds = [{case: run_case(case, brokers, topic, loaded) for case in CASES if case in args.only}
              for _ in range(args.repeat)]
    report(rounds, loaded)


if __name__ == "__main__":
    main()
