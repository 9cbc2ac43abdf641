"""Kafka → Kafka throughput: convoflow's live pipeline against the Python client's own ceiling.

    python benchmarks/bench_kafka.py [--events 500000] [--brokers HOST:PORT]

Loads the seeded sample (cached under benchmarks/data/) into a fresh 3-partition topic once,
then measures, each case in a fresh Python process reading the whole topic:
- client loop: a plain confluent-kafka consume → JSON parse → re-encode → produce loop, the
  client's own ceiling for a Python consumer-producer;
- convoflow: `cli.py run --kafka-brokers ... --stop-at-end` with patterns off, the same
  flow as the replay benchmark's pipeline case (rules topic, LLM stage off), writing every output
  to its topic; on 1 process, and on 2 (the topic's partitions spread over both).
Events/s are input events over wall time from the first poll to the last delivered message.
Uses KAFKA_BOOTSTRAP_SERVERS or --brokers, else starts the project's broker
(scripts/kafka-local.sh; stop it with `scripts/kafka-local.sh stop`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_RATIO = 0.5
PARTITIONS = 3


def client_loop_seconds(brokers: str, topic: str, events: int) -> dict[str, float]:
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
    return {"seconds": seconds, "events": seen}


def pipeline_seconds(brokers: str, topic: str, events: int, processes: int = 1) -> dict[str, float]:
    """convoflow's CLI run on the topic to its end, outputs to fresh topics."""
    from cli import main

    base = f"{topic}.cf-{uuid.uuid4().hex[:6]}"
    args = ["run", "--kafka-brokers", brokers, "--input-topic", topic, "--stop-at-end", "--no-patterns", "--quiet",
            "--processes", str(processes), "--llm", "off",
            "--output-topic", f"{base}.messages", "--windows-topic", f"{base}.windows", "--alerts-topic",
            f"{base}.alerts", "--late-topic", f"{base}.late", "--dead-letter-topic", f"{base}.dead",
            "--moderated-topic", f"{base}.moderated", "--rules-topic", f"{base}.rules", "--create-topics"]
    start = time.perf_counter()
    code = main(args)
    seconds = time.perf_counter() - start
    if code != 0:
        sys.exit(f"convoflow run failed with exit code {code}")
    return {"seconds": seconds, "events": events}


def load_topic(brokers: str, path: Path) -> tuple[str, int]:
    from connectors.kafka_io import ensure_topics, produce_file

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


def run_case(case: str, brokers: str, topic: str, events: int) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--case", case, "--brokers", brokers, "--topic", topic, "--events", str(events)],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    if result.returncode != 0:
        sys.exit(f"benchmark case {case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--brokers")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "data")
    parser.add_argument("--case", choices=["loop", "convoflow", "convoflow2"], help=argparse.SUPPRESS)
    parser.add_argument("--topic", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        cases = {"loop": client_loop_seconds, "convoflow": pipeline_seconds,
                 "convoflow2": lambda b, t, e: pipeline_seconds(b, t, e, processes=2)}
        print(json.dumps(cases[args.case](args.brokers, args.topic, args.events)))
        return

    from benchmarks.bench_replay import ensure_sample

    brokers = broker_address(args.brokers)
    path, _ = ensure_sample(args.events, args.data_dir)
    started = time.perf_counter()
    topic, loaded = load_topic(brokers, path)
    print(f"loaded {loaded:,} events into {topic} ({PARTITIONS} partitions) at {brokers} "
          f"in {time.perf_counter() - started:.1f} s")
    results = {case: run_case(case, brokers, topic, loaded) for case in ("loop", "convoflow", "convoflow2")}
    rate = {case: loaded / r["seconds"] for case, r in results.items()}
    labels = {"loop": "(a) confluent-kafka loop", "convoflow": "(b) convoflow Kafka → Kafka",
              "convoflow2": "(b) same, 2 processes"}
    print(f"{'case':<32}{'seconds':>9}{'events/s':>11}")
    for case, r in results.items():
        print(f"{labels[case]:<32}{r['seconds']:>9.2f}{rate[case]:>11,.0f}")
    for case in ("convoflow", "convoflow2"):
        ratio = rate[case] / rate["loop"]
        print(f"{labels[case]} / (a): {ratio:.2f} (target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'MISSED'})")


if __name__ == "__main__":
    main()
