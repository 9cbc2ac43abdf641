"""The Kafka source: message refs, parsing, stamping and marks per partition, offsets and resume.

Broker-free except the last tests (marked `kafka`), which read a real topic and resume from a snapshot.
"""

from __future__ import annotations

from pathlib import Path

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Producer, TopicPartition
from confluent_kafka import KafkaError as ConfluentKafkaError

from connectors.kafka.source import (
    CONSUMER_DEFAULTS,
    KafkaPosition,
    LiveKafkaSource,
    LivePartition,
    LiveResume,
    ReadSettings,
    kafka_ref,
)
from dataflows.events import DeadLetter, Event, LineRef, iso
from dataflows.live import LiveStamper
from dataflows.sequencing import LiveMark, Stamped
from tests.connectors.files.replay_batches import expanded

T0 = 1_704_103_200.0
"""2024-01-01T10:00:00+00:00"""
W0 = 1_800_000_000.0
TOPIC = "chat"
PARTITION = 1
TICK = 0.25


@dataclass(frozen=True)
class FakeMessage:
    """What `confluent_kafka.Consumer.consume` hands out: a message, or an error event."""

    offset_: int | None
    value_: bytes | None = None
    error_: ConfluentKafkaError | None = None

    def error(self) -> ConfluentKafkaError | None:
        return self.error_

    def value(self) -> bytes | None:
        return self.value_

    def offset(self) -> int | None:
        return self.offset_


def batch(part: LivePartition) -> list:
    """The partition's next batch, its event frame as the `Stamped` events it holds."""
    return expanded(part.next_batch())


def message(offset: int, value: bytes | None) -> FakeMessage:
    return FakeMessage(offset, value)


def kafka_error(code: int, offset: int | None = None, value: bytes | None = None) -> FakeMessage:
    return FakeMessage(offset, value, ConfluentKafkaError(code))


def end_of_partition() -> FakeMessage:
    return kafka_error(ConfluentKafkaError._PARTITION_EOF, offset=None)


def line(t: float, text: str = "hi") -> bytes:
    return orjson.dumps({"session_id": "s-1", "sender": "customer", "message": text, "timestamp": iso(T0 + t)})


@dataclass
class FakeConsumer:
    """A consumer that hands out `batches` (one per `consume`), then empty batches."""

    batches: list[list[FakeMessage]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    assigned: list[TopicPartition] = field(default_factory=list)
    asked: list[tuple[int, float]] = field(default_factory=list)
    closed: bool = False

    def assign(self, partitions: list[TopicPartition]) -> None:
        self.assigned = partitions

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        self.asked.append((num_messages, timeout))
        return self.batches.pop(0) if self.batches else []

    def close(self) -> None:
        self.closed = True


@dataclass
class Wall:
    now: float = W0
    readings: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        self.readings.append(self.now)
        return self.now


def partition(*batches: list[FakeMessage], wall: Wall | None = None, read: ReadSettings = ReadSettings(),
              tail: bool = False) -> tuple[LivePartition, FakeConsumer]:
    consumer = FakeConsumer(list(batches))
    part = LivePartition(consumer, KafkaPosition(TOPIC, PARTITION), LiveStamper(PARTITION, started=W0), TICK,
                         wall or Wall(), read, tail=tail)
    return part, consumer


def test_kafka_ref_names_topic_partition_and_offset() -> None:
    ref = kafka_ref("chat", 2, 17)
    assert ref == LineRef("chat/2", 17, 17)
    assert ref.event_id == "chat/2:17"


def test_good_message_becomes_a_stamped_event_then_a_mark() -> None:
    part, _ = partition([message(5, line(10, "hello"))])
    stamped, mark = batch(part)
    assert isinstance(stamped, Stamped)
    event = stamped.event
    assert isinstance(event, Event)
    assert (event.event_id, event.source, event.line, event.offset) == ("chat/1:5", "chat/1", 5, 5)
    assert (event.text, event.time, event.time_source) == ("hello", T0 + 10, "event")
    assert (stamped.block, stamped.clock_before) == (PARTITION, None)
    assert mark == LiveMark(PARTITION, T0 + 10, False)


@pytest.mark.parametrize(("value", "reason"), [
    (b"\xff\xfe{}", "not valid UTF-8"),
    (b"{not json", "not JSON"),
    (None, "empty message (no value)"),
])
def test_unreadable_message_becomes_a_dead_letter_naming_where_it_came_from(value: bytes | None, reason: str) -> None:
    part, _ = partition([message(9, value)])
    dead, mark = batch(part)
    assert isinstance(dead, DeadLetter)
    record = dead.as_record()
    assert (record["topic"], record["partition"], record["offset"]) == (TOPIC, PARTITION, 9)
    assert (record["source"], record["line"], record["step"]) == ("chat/1", 9, "parse")
    assert reason in record["reason"]
    assert mark == LiveMark(PARTITION, None, False), "a batch of dead letters is still followed by a mark"


def test_kafka_error_becomes_a_dead_letter_of_the_read_step() -> None:
    part, _ = partition([kafka_error(ConfluentKafkaError._MSG_TIMED_OUT, offset=4, value=b"partial")])
    dead, _ = batch(part)
    assert isinstance(dead, DeadLetter)
    record = dead.as_record()
    assert (record["topic"], record["partition"], record["offset"], record["step"]) == (TOPIC, PARTITION, 4, "read")
    assert record["reason"].startswith("Kafka error:")
    assert record["raw"] == "partial"
    assert part.snapshot().offset == 5, "a message that came as an error is not read again"


def test_kafka_error_of_no_message_is_a_dead_letter_at_the_partitions_position_and_moves_no_offset() -> None:
    part, _ = partition([message(6, line(1))], [kafka_error(ConfluentKafkaError._TRANSPORT)])
    batch(part)
    dead, _ = batch(part)
    assert isinstance(dead, DeadLetter)
    record = dead.as_record()
    assert (record["topic"], record["partition"], record["offset"], record["step"]) == (TOPIC, PARTITION, 7, "read")
    assert part.snapshot().offset == 7


def test_a_mark_follows_every_non_empty_batch() -> None:
    part, _ = partition([message(0, line(1))], [message(1, line(3)), message(2, line(2))])
    first, second = batch(part), batch(part)
    assert [type(i) for i in first] == [Stamped, LiveMark]
    assert [type(i) for i in second] == [Stamped, Stamped, LiveMark]
    assert second[-1] == LiveMark(PARTITION, T0 + 3, False)
    assert [s.clock_before for s in second[:2] if isinstance(s, Stamped)] == [T0 + 1, T0 + 3]


def test_empty_batches_give_a_mark_once_tick_seconds_have_passed() -> None:
    wall = Wall()
    part, _ = partition([message(0, line(1)), end_of_partition()], [], [], [], [], wall=wall, tail=True)
    assert batch(part)[-1] == LiveMark(PARTITION, T0 + 1, False)
    wall.now = W0 + TICK - 0.01
    assert batch(part) == []
    wall.now = W0 + TICK
    assert batch(part) == [LiveMark(PARTITION, T0 + 1 + TICK, False)]
    wall.now = W0 + TICK + 0.1
    assert batch(part) == []
    wall.now = W0 + 2 * TICK
    assert batch(part) == [LiveMark(PARTITION, T0 + 1 + 2 * TICK, False)]


def test_first_empty_batch_reports_the_partition_at_once() -> None:
    part, _ = partition([])
    assert batch(part) == [LiveMark(PARTITION, None, False)]


def test_end_of_partition_gives_one_final_idle_mark_then_stops() -> None:
    wall = Wall()
    part, _ = partition([message(0, line(1)), end_of_partition()], wall=wall)
    batch(part)
    wall.now = W0 + 2
    assert batch(part) == [LiveMark(PARTITION, T0 + 1, True)]
    with pytest.raises(StopIteration):
        batch(part)
    with pytest.raises(StopIteration):
        batch(part)


def test_the_batch_that_reaches_the_end_keeps_its_messages_and_nothing_after_the_end() -> None:
    part, consumer = partition([message(0, line(1)), message(1, line(2)), end_of_partition(), message(2, line(3))])
    items = batch(part)
    assert [i.event.offset for i in items if isinstance(i, Stamped)] == [0, 1]
    assert isinstance(items[-1], LiveMark) and not items[-1].idle
    assert part.snapshot().offset == 2, "a message after the end is not counted as read"
    assert batch(part) == [LiveMark(PARTITION, T0 + 2, True)]
    assert len(consumer.asked) == 1, "no read after the end"


def test_an_end_reached_in_an_empty_batch_is_reported_on_the_next_read() -> None:
    part, _ = partition([message(0, line(1))], [end_of_partition()])
    batch(part)
    assert batch(part) == []
    assert batch(part) == [LiveMark(PARTITION, T0 + 1, True)]
    with pytest.raises(StopIteration):
        batch(part)


def test_snapshot_is_the_next_offset_and_the_latest_event_time() -> None:
    part, consumer = partition([message(0, line(5)), message(1, line(2)), message(2, None)])
    assert part.snapshot() == LiveResume(None, None)
    batch(part)
    assert part.snapshot() == LiveResume(3, T0 + 5)
    part.close()
    assert consumer.closed


def test_each_read_asks_for_at_most_a_batch_and_waits_briefly() -> None:
    part, consumer = partition([], read=ReadSettings(batch_size=250, wait_s=0.002))
    batch(part)
    assert consumer.asked == [(250, 0.002)]


def source(consumers: list[FakeConsumer], **options: Any) -> LiveKafkaSource:
    def factory(config: dict[str, Any]) -> FakeConsumer:
        consumer = FakeConsumer(config=config)
        consumers.append(consumer)
        return consumer

    parts = [f"{i}-{TOPIC}" for i in range(3)]
    return LiveKafkaSource(["b1:9092", "b2:9092"], TOPIC, parts, consumer_factory=factory, wall=Wall(), **options)


@pytest.mark.parametrize(("from_beginning", "start"), [(True, OFFSET_BEGINNING), (False, OFFSET_END)])
def test_a_new_partition_is_assigned_where_the_run_starts(from_beginning: bool, start: int) -> None:
    consumers: list[FakeConsumer] = []
    part = source(consumers, from_beginning=from_beginning).build_part("read", f"2-{TOPIC}", None)
    [assigned] = consumers[0].assigned
    assert (assigned.topic, assigned.partition, assigned.offset) == (TOPIC, 2, start)
    assert part.snapshot() == LiveResume(None, None)
    assert part.stamper.partition == 2


def test_a_resumed_partition_reads_on_from_its_snapshot_with_its_clock() -> None:
    consumers: list[FakeConsumer] = []
    part = source(consumers).build_part("read", f"1-{TOPIC}", LiveResume(42, T0 + 7))
    [assigned] = consumers[0].assigned
    assert (assigned.topic, assigned.partition, assigned.offset) == (TOPIC, 1, 42)
    assert part.snapshot() == LiveResume(42, T0 + 7), "a snapshot before any read gives the same resume state"
    assert part.stamper.clock(W0) == T0 + 7


def test_consumer_settings_take_the_runs_own_over_the_defaults() -> None:
    consumers: list[FakeConsumer] = []
    config = {"max.partition.fetch.bytes": "1048576", "security.protocol": "SSL"}
    source(consumers, config=config, tail=False).build_part("read", f"0-{TOPIC}", None)
    got = consumers[0].config
    assert {k: got[k] for k in CONSUMER_DEFAULTS if k != "max.partition.fetch.bytes"} == {
        k: v for k, v in CONSUMER_DEFAULTS.items() if k != "max.partition.fetch.bytes"}
    assert (got["max.partition.fetch.bytes"], got["security.protocol"]) == ("1048576", "SSL")
    assert (got["bootstrap.servers"], got["enable.partition.eof"]) == ("b1:9092,b2:9092", True)


def test_a_tailing_partition_reads_on_past_the_end_and_its_clock_follows_the_wall_only_there() -> None:
    wall = Wall()
    part, _ = partition([message(0, line(1))], [message(1, line(2))], [end_of_partition()], [],
                        [end_of_partition(), message(2, line(3))], [], wall=wall, tail=True)
    batch(part)
    wall.now = W0 + 60
    assert batch(part)[-1] == LiveMark(PARTITION, T0 + 2, False), "a backlog read slowly keeps its clock"
    assert batch(part) == [], "the end reached, no tick since the last mark"
    wall.now = W0 + 61
    assert batch(part) == [LiveMark(PARTITION, T0 + 3, False)], "read to the end: the wall moves it on"
    wall.now = W0 + 70
    items = batch(part)
    assert [i.event.offset for i in items if isinstance(i, Stamped)] == [2], "messages after the end are read"
    assert items[-1] == LiveMark(PARTITION, T0 + 12, False)
    wall.now = W0 + 75
    assert batch(part) == [LiveMark(PARTITION, T0 + 12, False)], "reading again stopped the wall's clock"
    assert part.snapshot() == LiveResume(3, T0 + 12)


def test_a_tailing_partition_found_empty_is_idle_at_once() -> None:
    part, _ = partition([end_of_partition()], tail=True)
    assert batch(part) == [LiveMark(PARTITION, None, True)]


def test_a_partition_of_another_topic_is_refused() -> None:
    with pytest.raises(ValueError, match="not a partition of topic"):
        source([]).build_part("read", "0-other", None)


def read_to_end(part: LivePartition) -> list[Any]:
    items: list[Any] = []
    while True:
        try:
            items += batch(part)
        except StopIteration:
            return items


@pytest.mark.kafka
def test_a_real_partition_reads_to_its_end_and_resumes_from_its_snapshot(
    kafka_bootstrap: str, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(5):
        producer.produce(topic, line(i, f"m{i}") if i != 2 else b"{not json")
    assert producer.flush(10) == 0

    def build(resume: LiveResume | None) -> LivePartition:
        live = LiveKafkaSource([kafka_bootstrap], topic, [f"0-{topic}"], tail=False, batch_size=2)
        return live.build_part("read", f"0-{topic}", resume)

    first = build(None)
    items = read_to_end(first)
    snapshot = first.snapshot()
    first.close()
    assert [i.event.text for i in items if isinstance(i, Stamped)] == ["m0", "m1", "m3", "m4"]
    [dead] = [i.as_record() for i in items if isinstance(i, DeadLetter)]
    assert (dead["topic"], dead["partition"], dead["offset"]) == (topic, 0, 2)
    assert items[-1] == LiveMark(0, items[-1].clock, True)
    assert snapshot == LiveResume(5, T0 + 4)

    resumed = build(LiveResume(3, T0 + 2))
    again = read_to_end(resumed)
    resumed.close()
    assert [i.event.offset for i in again if isinstance(i, Stamped)] == [3, 4]
    assert resumed.snapshot() == LiveResume(5, T0 + 4)


@pytest.mark.kafka
def test_a_real_partition_keeps_its_consumer_lag_for_the_metrics(
    kafka_bootstrap: str, kafka_topic: Callable[..., str], tmp_path: Path
) -> None:
    from connectors.view.progress import read_figures

    topic = kafka_topic(partitions=1)
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for i in range(50):
        producer.produce(topic, line(i, f"m{i}"))
    assert producer.flush(10) == 0
    ticks = iter(range(10**6))
    live = LiveKafkaSource([kafka_bootstrap], topic, [f"0-{topic}"], tail=False, batch_size=10,
                           wall=lambda: T0 + next(ticks), figures_dir=tmp_path)  # a second per read: each reports
    part = live.build_part("read", f"0-{topic}", None)
    reports = []
    try:
        while not reports or reports[-1]["offset"] is None or reports[-1]["offset"] < 50:
            part.next_batch()
            reports += [f for f in read_figures(tmp_path, "kafka") if not reports or f != reports[-1]]
    finally:
        part.close()
    # Before the consumer holds a position (a slow broker's first polls) the lag counts from the low watermark.
    unknown = [r for r in reports if r["offset"] is None]
    assert all(r["lag"] == 50 for r in unknown)
    reports = [r for r in reports if r["offset"] is not None]
    assert all(r["topic"] == topic and r["partition"] == 0 and r["lag"] + r["offset"] == 50 for r in reports)
    assert reports[-1]["lag"] == 0 and any(r["lag"] > 0 for r in reports)
