"""Kafka as the flow's live input: each topic-partition read, parsed and clocked in one step.

As with Bytewax's `KafkaSource`, every topic-partition is one input partition with its own
consumer, assigned to it without a consumer group, and the next offset to read lives in Bytewax's
recovery snapshots (so a resumed run reads on from there, at least once). A poll's messages are
parsed as one block (`parse_block`, each message a line numbered by its offset; a value that is not
one plain line is parsed on its own) into one frame of events, stamped with the partition's clock
column-wise (`LiveStamper.stamp_frame`), and `DeadLetter`s naming topic, partition and offset;
a `LiveMark` follows every batch (see `dataflows.live`). When a partition
is idle, a mark goes out every `tick` seconds so that the wall clock can close windows.

The partition reads with `confluent_kafka.Consumer` itself rather than through Bytewax's
`KafkaSource` partition, which lacks what this input needs on its hot path:

- a way to hand on librdkafka's messages as they are: it wraps each one in a frozen
  `KafkaSourceMessage` dataclass (calling `headers()`, `latency()` and `timestamp()` for it), which
  the parser drops at once. Reading through it (parsing and stamping aside) took 14% of a Kafka
  run's CPU samples (py-spy, 200k events), reading here 3%: value and offset go straight to the
  parser, and topic and partition are known once per partition, not read per message;
- a way to leave librdkafka's statistics off: it always sets `statistics.interval.ms=1000` and
  parses their JSON every second per partition for a Prometheus gauge that convoflow does not serve;
- consumer defaults for reading a backlog (`CONSUMER_DEFAULTS`), under the run's own settings.

Everything else it does is kept: one consumer per partition assigned at the resume offset (or
`--from-beginning`/`--from-latest`) with a dummy group and no commits, `consume` of at most a
batch with a 1 ms wait, `enable.partition.eof` to stop at the end with `tail=False` (messages after
the end in the same batch are left unread), and a Kafka error delivered as data (a dead letter of
the `read` step), not an exception. Reading live (`tail=True`), the end of the partition is news
too: it tells the partition's clock that the backlog is read and the wall clock may move it on.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NamedTuple, Protocol, cast

import numpy as np
import polars as pl
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, Consumer, KafkaError, TopicPartition

from connectors.view.progress import FigureFile
from dataflows.event_frame import EVENT_SCHEMA, events_frame
from dataflows.events import DeadLetter, Event, LineRef
from dataflows.live import IDLE_AFTER_S, LiveStamper
from dataflows.parse import MAX_LINE_BYTES, parse_line
from dataflows.parse_block import parse_block
from dataflows.sequencing import LiveMark

LAG_EVERY_S = 1.0
"""How often a partition reports its consumer lag to the metrics endpoint."""

Item = pl.DataFrame | DeadLetter | LiveMark
"""A stamped frame of events (`STAMPED_SCHEMA`), a dead letter, or the partition's mark."""
WallClock = Callable[[], float]

CONSUMER_DEFAULTS: Mapping[str, str] = MappingProxyType({
    "group.id": "convoflow-live",
    "enable.auto.commit": "false",
    "enable.auto.offset.store": "false",
    "max.partition.fetch.bytes": str(4 << 20),
})
"""librdkafka settings of every input consumer, before the run's own (`--kafka-config`).

No group is joined (partitions are assigned), so the group id only satisfies librdkafka and
nothing is committed; larger fetches read a backlog in fewer round trips.
"""


class LiveResume(NamedTuple):
    """A partition's snapshot: the next offset to read (None: none read yet) and its clock then."""

    offset: int | None
    clock: float | None


def kafka_ref(topic: str, partition: int, offset: int) -> LineRef:
    """Where a Kafka message came from, as a `LineRef`: `topic/partition`, and the offset as the line."""
    return LineRef(f"{topic}/{partition}", offset, offset)


class MessageLike(Protocol):
    """The part of `confluent_kafka.Message` a partition reads."""

    def error(self) -> KafkaError | None: ...

    def value(self) -> bytes | None: ...

    def offset(self) -> int | None: ...


class ConsumerLike(Protocol):
    """The part of `confluent_kafka.Consumer` a partition uses."""

    def assign(self, partitions: list[TopicPartition]) -> None: ...

    def consume(self, num_messages: int = ..., timeout: float = ...) -> list[Any]: ...

    def close(self) -> None: ...

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = ..., cached: bool = ...) -> tuple[int, int]: ...


ConsumerFactory = Callable[[dict[str, Any]], ConsumerLike]


@dataclass(frozen=True)
class ReadSettings:
    """How a partition reads: at most `batch_size` messages per batch, waiting at most `wait_s`
    for the first (short, so an idle partition never holds the worker up)."""

    batch_size: int = 1000
    wait_s: float = 0.001


class LiveKafkaSource(FixedPartitionedSource[Item, LiveResume]):
    """Reads `topic` live (or to its current end with `tail=False`) as parsed, clocked events.

    `parts` are the topic's partitions as Bytewax's `KafkaSource` names them (`"<index>-<topic>"`),
    listed once at start-up so every worker numbers them the same (`LiveMark.partition` is the
    position). `config` holds librdkafka settings; they override `CONSUMER_DEFAULTS`.
    """

    def __init__(
        self,
        brokers: Sequence[str],
        topic: str,
        parts: Sequence[str],
        *,
        from_beginning: bool = True,
        tail: bool = True,
        config: Mapping[str, Any] | None = None,
        batch_size: int = 1000,
        tick: float = 0.25,
        idle_after: float = IDLE_AFTER_S,
        wall: WallClock = time.time,
        consumer_factory: ConsumerFactory = Consumer,
        figures_dir: Path | None = None,
    ) -> None:
        self.brokers = ",".join(brokers)
        self.figures_dir = figures_dir
        self.topic = topic
        self.parts = list(parts)
        self.starting_offset = OFFSET_BEGINNING if from_beginning else OFFSET_END
        self.tail = tail
        self.config = dict(config or {})
        self.read = ReadSettings(batch_size=batch_size)
        self.tick = tick
        self.idle_after = idle_after
        self.wall = wall
        self.consumer_factory = consumer_factory

    def list_parts(self) -> list[str]:
        return self.parts

    def build_part(self, step_id: str, for_part: str, resume_state: LiveResume | None) -> LivePartition:
        index, _, topic = for_part.partition("-")
        if topic != self.topic:
            msg = f"input partition {for_part!r} is not a partition of topic {self.topic!r}"
            raise ValueError(msg)
        offset = resume_state.offset if resume_state else None
        consumer = self.consumer_factory(self.consumer_config())
        consumer.assign([TopicPartition(topic, int(index), self.starting_offset if offset is None else offset)])
        stamper = LiveStamper(self.parts.index(for_part), started=self.wall(), idle_after=self.idle_after)
        if resume_state is not None:
            stamper.resume(resume_state.clock)
        figures = None if self.figures_dir is None else FigureFile(self.figures_dir, f"kafka-{topic}-{index}")
        return LivePartition(consumer, KafkaPosition(topic, int(index), offset), stamper, self.tick, self.wall,
                             self.read, tail=self.tail, figures=figures)

    def consumer_config(self) -> dict[str, Any]:
        """Each partition's consumer settings: the defaults, the run's own, then what the source needs."""
        return {**CONSUMER_DEFAULTS, **self.config, "bootstrap.servers": self.brokers, "enable.partition.eof": True}


@dataclass
class KafkaPosition:
    """Which topic-partition a partition reads, and the next offset to read (None: none read yet)."""

    topic: str
    partition: int
    offset: int | None = None

    def ref(self, offset: int) -> LineRef:
        return kafka_ref(self.topic, self.partition, offset)

    def origin(self, offset: int) -> tuple[tuple[str, Any], ...]:
        """A dead letter's fields beyond its `LineRef`."""
        return (("topic", self.topic), ("partition", self.partition), ("offset", offset))


class LivePartition(StatefulSourcePartition[Item, LiveResume]):
    """One topic-partition: read a batch, parse and stamp each message, then a mark.

    Its snapshot is the offset after the last message it has handed on, so a resumed run reads
    every message whose results an epoch did not commit again (at least once).
    """

    def __init__(
        self,
        consumer: ConsumerLike,
        position: KafkaPosition,
        stamper: LiveStamper,
        tick: float,
        wall: WallClock,
        read: ReadSettings = ReadSettings(),
        *,
        tail: bool = False,
        figures: FigureFile | None = None,
    ) -> None:
        self.consumer = consumer
        self.figures = figures
        self.lag_at = float("-inf")
        self.position = position
        self.source = position.ref(0).source
        self.stamper = stamper
        self.tick = tick
        self.wall = wall
        self.read = read
        self.tail = tail
        self.marked_at = float("-inf")
        self.at_end = False
        self.done = False

    def next_batch(self) -> list[Item]:
        if self.done:
            raise StopIteration
        if self.at_end:
            self.done = True
            return [self.stamper.mark(self.wall(), done=True)]
        messages = self.consumer.consume(self.read.batch_size, self.read.wait_s)
        now = self.wall()
        items = self._items(messages, now)
        if self.figures is not None and now - self.lag_at >= LAG_EVERY_S:
            self._report_lag(now)
        if items or now - self.marked_at >= self.tick:
            items.append(self.stamper.mark(now))
            self.marked_at = now
        return items

    def _report_lag(self, now: float) -> None:
        """Write how many messages of the partition are still to read (from the high watermark the
        client last fetched: no broker call)."""
        assert self.figures is not None
        self.lag_at = now
        position = self.position
        low, high = self.consumer.get_watermark_offsets(TopicPartition(position.topic, position.partition), cached=True)
        if high < 0:
            return
        lag = high - (position.offset if position.offset is not None else max(low, 0))
        self.figures.write({"topic": position.topic, "partition": position.partition, "lag": max(lag, 0),
                            "offset": position.offset})

    def _items(self, messages: list[MessageLike], now: float) -> list[Item]:
        """Parse and stamp `messages`; at the partition's end stop there, or, live, tell the clock."""
        position = self.position
        items: list[Item] = []
        run: list[tuple[int, bytes | None]] = []
        for message in messages:
            error = message.error()
            offset = message.offset()
            if error is None and offset is not None:
                run.append((offset, message.value()))
            elif error is not None and error.code() == KafkaError._PARTITION_EOF:
                items += self._parsed(run, now)
                run = []
                if self.tail:
                    self.stamper.caught_up(now)
                    continue
                self.at_end = True
                break
            else:
                items.append(self._error(message, error, offset))
            if offset is not None:
                position.offset = offset + 1
        items += self._parsed(run, now)
        return items

    def _parsed(self, run: list[tuple[int, bytes | None]], now: float) -> list[Item]:
        """Messages read one after another as one stamped frame of events, then their dead letters.

        Values that are single plain lines are parsed as a block, column-wise (`parse_block`); any
        other (empty, spanning lines, oversized) one by one, as before.
        """
        if not run:
            return []
        block: list[int] = []
        events: list[Event] = []
        dead: list[DeadLetter] = []
        for index, (offset, value) in enumerate(run):
            if value and len(value) <= MAX_LINE_BYTES and b"\n" not in value and b"\r" not in value:
                block.append(index)
                continue
            parsed = self._parse(value, LineRef(self.source, offset, offset))
            if isinstance(parsed, Event):
                events.append(parsed)
            else:
                dead.append(parsed)
        frames = [events_frame(events)] if events else []
        if block:
            offsets = np.array([run[i][0] for i in block], dtype=np.int64)
            parsed_block = parse_block(b"\n".join([cast(bytes, run[i][1]) for i in block]) + b"\n",
                                       source=self.source, offset=0, line=0, positions=offsets)
            frames.append(parsed_block.events)
            dead += [replace(letter, origin=self.position.origin(letter.ref.offset)) for letter in parsed_block.dead]
        if not frames:
            frame = pl.DataFrame(schema=EVENT_SCHEMA)
        else:
            frame = frames[0] if len(frames) == 1 else pl.concat(frames).sort("offset")
        stamped = self.stamper.stamp_frame(frame, now, dead=bool(dead))
        dead.sort(key=lambda letter: letter.ref.offset)
        out: list[Item] = [stamped] if not stamped.is_empty() else []
        out.extend(dead)
        return out

    def _parse(self, value: bytes | None, ref: LineRef) -> Event | DeadLetter:
        """One message's event; an empty or unreadable one is a dead letter like a bad line."""
        if value is None:
            return DeadLetter(ref, "", "empty message (no value)", "parse", self.position.origin(ref.offset))
        parsed = parse_line(value, ref)
        if isinstance(parsed, DeadLetter):
            return replace(parsed, origin=self.position.origin(ref.offset))
        return parsed

    def _error(self, message: MessageLike, error: KafkaError | None, offset: int | None) -> DeadLetter:
        """A Kafka error as a dead letter of the `read` step, at its offset (else the partition's position)."""
        at = offset if offset is not None else (self.position.offset or 0)
        value = message.value()
        raw = "" if value is None else value.decode("utf-8", "replace")
        return DeadLetter(self.position.ref(at), raw, f"Kafka error: {error}", "read", self.position.origin(at))

    def next_awake(self) -> None:
        return None

    def snapshot(self) -> LiveResume:
        return LiveResume(self.position.offset, self.stamper.base)

    def close(self) -> None:
        self.consumer.close()
