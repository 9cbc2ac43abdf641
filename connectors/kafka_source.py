"""Kafka as the flow's live input: Bytewax's `KafkaSource`, with parsing and partition clocks.

Bytewax's source reads each topic-partition as one input partition and keeps the offset in its
recovery snapshots. This wraps each of its partitions to do what the replay source does for a
file: parse every message into an `Event` or a `DeadLetter` (naming topic, partition and
offset), stamp it with the partition's clock, and send a `LiveMark` after every batch (see
`dataflows.live`). When a partition is idle, a mark goes out every `tick` seconds so that the
wall clock can close windows.
"""

from __future__ import annotations

import time
from dataclasses import replace
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from bytewax.connectors.kafka import KafkaError, KafkaSource, KafkaSourceMessage
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END

from dataflows.events import DeadLetter, Event, LineRef
from dataflows.live import IDLE_AFTER_S, LiveStamper
from dataflows.parse import parse_line
from dataflows.sequencing import LiveMark, Stamped

Item = Stamped | DeadLetter | LiveMark
WallClock = Callable[[], float]


class LiveResume(NamedTuple):
    """A partition's snapshot: Bytewax's Kafka offset and the latest event time read."""

    offset: int | None
    latest: float | None


def kafka_ref(topic: str, partition: int, offset: int) -> LineRef:
    """Where a Kafka message came from, as a `LineRef`: `topic/partition`, and the offset as the line."""
    return LineRef(f"{topic}/{partition}", offset, offset)


class LiveKafkaSource(FixedPartitionedSource[Item, LiveResume]):
    """Reads `topic` live (or to its current end with `tail=False`) as parsed, clocked events.

    `parts` are the topic's partitions as Bytewax names them (`"<index>-<topic>"`), listed once
    at start-up so every worker numbers them the same (`LiveMark.partition` is the position).
    """

    def __init__(
        self,
        brokers: Sequence[str],
        topic: str,
        parts: Sequence[str],
        *,
        from_beginning: bool = True,
        tail: bool = True,
        config: dict[str, Any] | None = None,
        batch_size: int = 1000,
        tick: float = 0.25,
        idle_after: float = IDLE_AFTER_S,
        wall: WallClock = time.time,
    ) -> None:
        self.kafka = KafkaSource(
            list(brokers),
            [topic],
            tail=tail,
            starting_offset=OFFSET_BEGINNING if from_beginning else OFFSET_END,
            add_config=dict(config or {}),
            batch_size=batch_size,
            raise_on_errors=False,
        )
        self.parts = list(parts)
        self.tick = tick
        self.idle_after = idle_after
        self.wall = wall

    def list_parts(self) -> list[str]:
        return self.parts

    def build_part(self, step_id: str, for_part: str, resume_state: LiveResume | None) -> LivePartition:
        inner = self.kafka.build_part(step_id, for_part, resume_state.offset if resume_state else None)
        stamper = LiveStamper(self.parts.index(for_part), started=self.wall(), idle_after=self.idle_after)
        if resume_state is not None:
            stamper.resume(resume_state.latest, self.wall())
        return LivePartition(inner, stamper, self.tick, self.wall)


class LivePartition(StatefulSourcePartition[Item, LiveResume]):
    """One topic-partition: Bytewax's reader, then parse and stamp; a mark after each batch."""

    def __init__(
        self,
        inner: StatefulSourcePartition[Any, int | None],
        stamper: LiveStamper,
        tick: float,
        wall: WallClock,
    ) -> None:
        self.inner = inner
        self.stamper = stamper
        self.tick = tick
        self.wall = wall
        self.marked_at = float("-inf")
        self.done = False

    def next_batch(self) -> list[Item]:
        if self.done:
            raise StopIteration
        try:
            messages = self.inner.next_batch()
        except StopIteration:
            self.done = True
            return [self.stamper.mark(self.wall(), done=True)]
        now = self.wall()
        items: list[Item] = [self.stamper.stamp(_parse(m), now) for m in messages]
        if items or now - self.marked_at >= self.tick:
            items.append(self.stamper.mark(now))
            self.marked_at = now
        return items

    def next_awake(self) -> None:
        return None

    def snapshot(self) -> LiveResume:
        return LiveResume(self.inner.snapshot(), self.stamper.latest)

    def close(self) -> None:
        self.inner.close()


Message = KafkaSourceMessage[bytes | None, bytes | None]


def _parse(message: Message | KafkaError[bytes | None, bytes | None]) -> Event | DeadLetter:
    """Parse one message; a Kafka error or an empty message is a dead letter like a bad line."""
    if isinstance(message, KafkaError):
        where = _where(message.msg)
        return DeadLetter(where[0], _text(message.msg.value), f"Kafka error: {message.err}", "read", where[1])
    ref, origin = _where(message)
    if message.value is None:
        return DeadLetter(ref, "", "empty message (no value)", "parse", origin)
    parsed = parse_line(message.value, ref)
    if isinstance(parsed, DeadLetter):
        return replace(parsed, origin=origin)
    return parsed


def _where(message: Message) -> tuple[LineRef, tuple[tuple[str, Any], ...]]:
    topic, partition, offset = message.topic or "", message.partition or 0, message.offset or 0
    return kafka_ref(topic, partition, offset), (("topic", topic), ("partition", partition), ("offset", offset))


def _text(value: bytes | None) -> str:
    return "" if value is None else value.decode("utf-8", "replace")
