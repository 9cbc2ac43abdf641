"""The Kafka source's broker-free parts: message refs, parsing, stamping and marks per partition."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from bytewax.connectors.kafka import KafkaError, KafkaSourceMessage
from bytewax.inputs import StatefulSourcePartition
from confluent_kafka import KafkaError as ConfluentKafkaError

from connectors.kafka_source import LivePartition, LiveResume, kafka_ref
from dataflows.events import DeadLetter, Event, LineRef, iso
from dataflows.live import LiveStamper
from dataflows.sequencing import LiveMark, Stamped

T0 = 1_704_103_200.0
"""2024-01-01T10:00:00+00:00"""
W0 = 1_800_000_000.0
TOPIC = "chat"
PARTITION = 1
TICK = 0.25

Message = KafkaSourceMessage[bytes | None, bytes | None]


def message(offset: int, value: bytes | None) -> Message:
    return KafkaSourceMessage(None, value, topic=TOPIC, partition=PARTITION, offset=offset)


def line(t: float, text: str = "hi") -> bytes:
    return orjson.dumps({"session_id": "s-1", "sender": "customer", "message": text, "timestamp": iso(T0 + t)})


@dataclass
class FakeInner(StatefulSourcePartition[Any, int | None]):
    """Bytewax's Kafka partition: hands out `batches`, then ends; its snapshot is the next offset."""

    batches: list[list[Any]]
    offset: int | None = None
    closed: bool = False

    def next_batch(self) -> list[Any]:
        if not self.batches:
            raise StopIteration
        batch = self.batches.pop(0)
        for m in batch:
            offset = (m.msg if isinstance(m, KafkaError) else m).offset
            assert offset is not None
            self.offset = offset + 1
        return batch

    def snapshot(self) -> int | None:
        return self.offset

    def close(self) -> None:
        self.closed = True


@dataclass
class Wall:
    now: float = W0
    readings: list[float] = field(default_factory=list)

    def __call__(self) -> float:
        self.readings.append(self.now)
        return self.now


def partition(*batches: list[Any], wall: Wall | None = None) -> tuple[LivePartition, FakeInner]:
    inner = FakeInner(list(batches))
    return LivePartition(inner, LiveStamper(PARTITION, started=W0), TICK, wall or Wall()), inner


def test_kafka_ref_names_topic_partition_and_offset() -> None:
    ref = kafka_ref("chat", 2, 17)
    assert ref == LineRef("chat/2", 17, 17)
    assert ref.event_id == "chat/2:17"


def test_good_message_becomes_a_stamped_event_then_a_mark() -> None:
    part, _ = partition([message(5, line(10, "hello"))])
    stamped, mark = part.next_batch()
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
    dead, mark = part.next_batch()
    assert isinstance(dead, DeadLetter)
    record = dead.as_record()
    assert (record["topic"], record["partition"], record["offset"]) == (TOPIC, PARTITION, 9)
    assert (record["source"], record["line"], record["step"]) == ("chat/1", 9, "parse")
    assert reason in record["reason"]
    assert mark == LiveMark(PARTITION, None, False), "a batch of dead letters is still followed by a mark"


def test_kafka_error_becomes_a_dead_letter_of_the_read_step() -> None:
    err = KafkaError(ConfluentKafkaError(ConfluentKafkaError._MSG_TIMED_OUT), message(4, b"partial"))
    part, _ = partition([err])
    dead, _ = part.next_batch()
    assert isinstance(dead, DeadLetter)
    record = dead.as_record()
    assert (record["topic"], record["partition"], record["offset"], record["step"]) == (TOPIC, PARTITION, 4, "read")
    assert record["reason"].startswith("Kafka error:")
    assert record["raw"] == "partial"


def test_a_mark_follows_every_non_empty_batch() -> None:
    part, _ = partition([message(0, line(1))], [message(1, line(3)), message(2, line(2))])
    first, second = part.next_batch(), part.next_batch()
    assert [type(i) for i in first] == [Stamped, LiveMark]
    assert [type(i) for i in second] == [Stamped, Stamped, LiveMark]
    assert second[-1] == LiveMark(PARTITION, T0 + 3, False)
    assert [s.clock_before for s in second[:2] if isinstance(s, Stamped)] == [T0 + 1, T0 + 3]


def test_empty_batches_give_a_mark_once_tick_seconds_have_passed() -> None:
    wall = Wall()
    part, _ = partition([message(0, line(1))], [], [], [], [], wall=wall)
    assert part.next_batch()[-1] == LiveMark(PARTITION, T0 + 1, False)
    wall.now = W0 + TICK - 0.01
    assert part.next_batch() == []
    wall.now = W0 + TICK
    assert part.next_batch() == [LiveMark(PARTITION, T0 + 1 + TICK, False)]
    wall.now = W0 + TICK + 0.1
    assert part.next_batch() == []
    wall.now = W0 + 2 * TICK
    assert part.next_batch() == [LiveMark(PARTITION, T0 + 1 + 2 * TICK, False)]


def test_first_empty_batch_reports_the_partition_at_once() -> None:
    part, _ = partition([])
    assert part.next_batch() == [LiveMark(PARTITION, None, False)]


def test_end_of_partition_gives_one_final_idle_mark_then_stops() -> None:
    wall = Wall()
    part, _ = partition([message(0, line(1))], wall=wall)
    part.next_batch()
    wall.now = W0 + 2
    assert part.next_batch() == [LiveMark(PARTITION, T0 + 3, True)]
    with pytest.raises(StopIteration):
        part.next_batch()
    with pytest.raises(StopIteration):
        part.next_batch()


def test_snapshot_is_the_kafka_offset_and_the_latest_event_time() -> None:
    part, inner = partition([message(0, line(5)), message(1, line(2)), message(2, None)])
    assert part.snapshot() == LiveResume(None, None)
    part.next_batch()
    assert part.snapshot() == LiveResume(3, T0 + 5)
    part.close()
    assert inner.closed
