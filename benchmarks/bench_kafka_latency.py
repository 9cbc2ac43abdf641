"""Message latency of a live Kafka run: from an event being produced to its input topic to its
message being produced to the output topic.

    python benchmarks/bench_kafka_latency.py [--rate 2000] [--seconds 10] [--sessions 500] [--brokers HOST:PORT]

Starts `cli.py run --kafka-brokers ...` (the four patterns on, LLM off, one process) on a fresh
3-partition input topic, then produces conversation events to it at `rate` events per second (one
batch every 10 ms), each stamped with the wall time it is sent. Events sent before the run's first
output message are warm-up (the run starting) and not measured. When every measured event's message
is on the output topic the run is stopped (SIGTERM: it drains and exits). Both topics are then read
back: Kafka keeps each message's producer timestamp (ms), so latency = the output message's
timestamp - its input event's, matched by event id (`topic/partition:offset`). Prints p50, p99 and
max. Target (issue 19): p99 <= 100 ms without the LLM stage. Uses KAFKA_BOOTSTRAP_SERVERS or
--brokers, else starts the project's broker (stop it with `scripts/kafka-local.sh stop`).
"""

from __future__ import annotations

import argparse
import signal
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_kafka import broker_address  # noqa: E402  (after the path is set)

TARGET_P99_MS = 100.0
PARTITIONS = 3
TICK_S = 0.01
WAIT_S = 120.0
"""How long at most to wait for the run's first output or its last message (a broken run, not a slow one)."""


def event(i: int, sessions: int) -> tuple[bytes, bytes]:
    """The `i`th event, keyed by its session: sessions taking turns, customer and rm alternating, timed now."""
    from dataflows.events import iso

    session = f"s-{i % sessions:04d}"
    return session.encode(), orjson.dumps({"session_id": session, "sender": ("customer", "rm")[(i // sessions) % 2],
                                           "message": f"message {i}?", "timestamp": iso(time.time())})


def message_count(consumer: Any, topic: str) -> int:
    """Messages on `topic` (all partitions), by its watermarks; 0 while the topic is not there or
    its partitions have no leader yet (the run creates it)."""
    from confluent_kafka import KafkaException, TopicPartition

    try:
        metadata = consumer.list_topics(topic, timeout=10).topics.get(topic)
        if metadata is None or not metadata.partitions:
            return 0
        return sum(high - low for low, high in (consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
                                                for p in metadata.partitions))
    except KafkaException:
        return 0


def wait_for(what: str, done: Any, run: subprocess.Popen[bytes]) -> None:
    """Poll `done()` until true; stop if the run ends first or nothing comes within WAIT_S."""
    deadline = time.monotonic() + WAIT_S
    while not done():
        if run.poll() is not None:
            sys.exit(f"the convoflow run ended (exit code {run.returncode}) before {what}")
        if time.monotonic() > deadline:
            run.kill()
            sys.exit(f"no {what} within {WAIT_S:g} s")
        time.sleep(0.05)


def read_all(brokers: str, topic: str) -> list[Any]:
    """Every message of `topic`, from the beginning to the current end of each partition."""
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer({"bootstrap.servers": brokers, "group.id": "bench-latency", "enable.auto.commit": False})
    try:
        parts = consumer.list_topics(topic, timeout=10).topics[topic].partitions
        ends = {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1] for p in parts}
        consumer.assign([TopicPartition(topic, p, 0) for p in parts])
        left = {p for p, end in ends.items() if end > 0}
        found: list[Any] = []
        while left:
            for msg in consumer.consume(10_000, 1.0):
                if msg.error() is None:
                    found.append(msg)
                    if msg.offset() >= ends[msg.partition()] - 1:
                        left.discard(msg.partition())
        return found
    finally:
        consumer.close()


def latencies(brokers: str, topic: str, output: str, measured_from: dict[int, int]) -> list[float]:
    """Per measured event, ms from its input message's timestamp to its output message's."""
    sent = {f"{topic}/{m.partition()}:{m.offset()}": m.timestamp()[1] for m in read_all(brokers, topic)
            if m.offset() >= measured_from.get(m.partition(), 0)}
    found = []
    for msg in read_all(brokers, output):
        at = sent.get(orjson.loads(msg.value())["payload"]["id"])
        if at is not None:
            found.append(float(msg.timestamp()[1] - at))
    return sorted(found)


def main() -> None:
    from confluent_kafka import Consumer, Producer, TopicPartition

    from connectors.kafka.clients import ensure_topics
    from connectors.run.settings import RunSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of measured input")
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--brokers")
    parser.add_argument("--rules-grace", type=float, default=RunSettings.model_fields["rules_grace"].default,
                        help="the run's --rules-grace: how long a message waits for rules stamped before it")
    args = parser.parse_args()

    brokers = broker_address(args.brokers)
    topic = f"bench-latency-{uuid.uuid4().hex[:6]}"
    outputs = {kind: f"{topic}.{kind}" for kind in ("messages", "windows", "alerts", "late", "dead", "moderated")}
    ensure_topics(brokers, None, {topic: PARTITIONS})
    run = subprocess.Popen(
        [sys.executable, "cli.py", "run", "--kafka-brokers", brokers, "--input-topic", topic, "--quiet", "--llm", "off",
         "--output-topic", outputs["messages"], "--windows-topic", outputs["windows"], "--alerts-topic",
         outputs["alerts"], "--late-topic", outputs["late"], "--dead-letter-topic", outputs["dead"],
         "--moderated-topic", outputs["moderated"], "--rules-topic", f"{topic}.rules", "--create-topics",
         "--rules-grace", str(args.rules_grace)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    producer = Producer({"bootstrap.servers": brokers, "linger.ms": 0})
    watcher = Consumer({"bootstrap.servers": brokers, "group.id": "bench-latency-watch"})
    per_tick = max(1, round(args.rate * TICK_S))
    sent = 0

    def send_tick() -> None:
        nonlocal sent
        for _ in range(per_tick):
            key, value = event(sent, args.sessions)
            producer.produce(topic, value, key)
            sent += 1
        producer.poll(0)

    try:
        started = time.monotonic()

        def warmed() -> bool:
            send_tick()
            return message_count(watcher, outputs["messages"]) > 0

        wait_for("first output message", warmed, run)
        producer.flush()
        warmup = sent
        measured_from = {p: watcher.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                         for p in range(PARTITIONS)}
        ticks = round(args.seconds / TICK_S)
        begin = time.monotonic()
        for tick in range(ticks):
            time.sleep(max(0.0, begin + tick * TICK_S - time.monotonic()))  # pace the load by the wall clock
            send_tick()
        producer.flush()
        wait_for("every measured message", lambda: message_count(watcher, outputs["messages"]) >= sent, run)
    finally:
        watcher.close()
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
        _, stderr = run.communicate()
    if run.returncode not in (0, 130, 143):
        sys.exit(f"the convoflow run failed with exit code {run.returncode}:\n{stderr.decode()[-3000:]}")
    found = latencies(brokers, topic, outputs["messages"], measured_from)
    measured = sent - warmup
    if len(found) != measured:
        sys.exit(f"matched {len(found):,} output messages of {measured:,} measured events")
    p50 = statistics.quantiles(found, n=100)[49]
    p99 = statistics.quantiles(found, n=100)[98]
    print(f"Kafka live, {args.rate:,.0f} events/s for {args.seconds:g} s ({warmup:,} warm-up events over "
          f"{begin - started:.1f} s not measured), 1 process, four patterns, rules grace {args.rules_grace:g} s, LLM off")
    print(f"message latency (produced -> produced): p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {found[-1]:.1f} ms "
          f"over {measured:,} messages")
    print(f"p99 latency: {p99:.1f} ms (target <= {TARGET_P99_MS:g}: {'met' if p99 <= TARGET_P99_MS else 'MISSED'})")


if __name__ == "__main__":
    main()
