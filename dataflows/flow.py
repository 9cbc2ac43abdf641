"""The conversation-window dataflow: replayed events → file order → session windows → outputs.

Built by `build_flow(source, sink, config)`; the CLI passes real connectors, tests pass
`bytewax.testing` ones. The source emits what a replay partition emits (`Stamped` events,
`DeadLetter`s and `Progress` markers, see `dataflows.sequencing`); the sink receives
`(kind, record)` pairs, `kind` being one of `OutputKind`, `record` a JSON-ready dict.

Sessions are hashed onto a fixed number of shards (not onto workers), so the assignment of a
session, and so every result, is the same whatever the number of workers and processes.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink

from dataflows.events import DeadLetter, WindowRecord
from dataflows.sequencing import Progress, ReplayLayout, Sequencer, Stamped, Wire, from_wire, to_wire
from dataflows.windows import WindowBook, WindowConfig

Record = dict[str, Any]
Encoder = Callable[[Record], Any]


def as_is(record: Record) -> Record:
    """The default encoder: records stay dicts (tests, and sinks that want rows)."""
    return record


class OutputKind(StrEnum):
    """The flow's outputs; each is one file (`<kind>.jsonl`), topic or table downstream."""

    MESSAGES = "messages"
    WINDOWS = "windows"
    LATE = "late"
    DEAD_LETTER = "dead_letter"


GAUGE = "gauge"


@dataclass(frozen=True)
class FlowConfig:
    """Everything the flow's logic needs; `time_origin` times untimed events seen before any timed one."""

    window: WindowConfig = WindowConfig()
    layout: ReplayLayout = ReplayLayout()
    time_origin: float = 0.0
    shards: int = 64

    def __post_init__(self) -> None:
        if self.shards < 1:
            msg = f"shards must be >= 1, got {self.shards}"
            raise ValueError(msg)


def shard_of(session_id: str, shards: int) -> str:
    """The shard key of a session: stable across processes (unlike `hash`)."""
    return shard_of_index(zlib.crc32(session_id.encode()) % shards)


@dataclass
class ShardState:
    """What one shard keeps: its reorder buffer and its open windows."""

    sequencer: Sequencer
    book: WindowBook


class ShardLogic(StatefulBatchLogic[Wire, tuple[str, Record], ShardState]):
    """Releases a shard's events in file order, times untimed ones, windows them.

    Emits `messages` for every event, `late` for events whose window was already emitted,
    `windows` as the watermark passes them, and a `gauge` of open windows when it changes.
    Never discarded: its sequencer must keep hearing every partition's markers.
    """

    def __init__(self, config: FlowConfig, resume: ShardState | None, encode: Encoder) -> None:
        self.config = config
        self.encode = encode
        self.state = resume or ShardState(Sequencer(config.layout), WindowBook(config.window))
        self.reported_open = -1

    def on_batch(self, values: list[Wire]) -> tuple[list[tuple[str, Record]], bool]:
        seq = self.state.sequencer
        seq.push(map(from_wire, values))
        out: list[tuple[str, Record]] = []
        self._window(seq.release(), out)
        self._emit_windows(self.state.book.advance(seq.clock_floor()), out)
        self._gauge(out)
        return out, StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[tuple[str, Record]], bool]:
        seq = self.state.sequencer
        out: list[tuple[str, Record]] = []
        self._window(seq.release_all(), out)
        self._emit_windows(self.state.book.flush(), out)
        self._gauge(out)
        return out, StatefulBatchLogic.RETAIN

    def snapshot(self) -> ShardState:
        return copy.deepcopy(self.state)

    def _window(self, released: Iterable[tuple[Stamped, float | None]], out: list[tuple[str, Record]]) -> None:
        book = self.state.book
        for stamped, clock in released:
            event = stamped.event
            self._emit_windows(book.advance(clock), out)
            if event.time is None:
                event = event.timed(self.config.time_origin if clock is None else clock)
            late = book.add(event)
            out.append((OutputKind.MESSAGES, self.encode(event.as_record())))
            if late is not None:
                out.append((OutputKind.LATE, self.encode(late.as_record())))

    def _emit_windows(self, windows: Iterable[WindowRecord], out: list[tuple[str, Any]]) -> None:
        out.extend((OutputKind.WINDOWS, self.encode(w.as_record())) for w in windows)

    def _gauge(self, out: list[tuple[str, Record]]) -> None:
        count = len(self.state.book.open)
        if count != self.reported_open:
            self.reported_open = count
            out.append((GAUGE, {"open_windows": count, "buffered": self.state.sequencer.buffered}))


def _router(shards: int) -> Callable[[Stamped | Progress], list[tuple[str, Wire]]]:
    every_shard = [shard_of_index(i) for i in range(shards)]

    def route(item: Stamped | Progress) -> list[tuple[str, Wire]]:
        if isinstance(item, Stamped):
            return [(shard_of(item.event.session_id, shards), to_wire(item))]
        wire = to_wire(item)
        return [(key, wire) for key in every_shard]

    return route


def shard_of_index(index: int) -> str:
    return f"shard-{index:03d}"


def build_flow(
    source: Source[Stamped | DeadLetter | Progress],
    sink: Sink[tuple[str, Record]],
    config: FlowConfig,
    *,
    encode: Encoder = as_is,
    gauges: Sink[tuple[str, Record]] | None = None,
    flow_id: str = "convoflow",
) -> Dataflow:
    """Wire the replay pipeline: read → split dead letters → shard → sequence + window → sink.

    `encode` turns each record into what the sink writes; it runs on the worker that made the
    record, so encoded bytes, not dicts, cross to the sink's worker.
    `gauges`, when given, receives `(shard, {"shard", "open_windows", "buffered"})` for live views.
    """
    flow = Dataflow(flow_id)
    items = op.input("read", flow, source)
    parsed = op.branch("split_dead_letters", items, lambda item: isinstance(item, DeadLetter))
    dead = op.map("dead_letter_records", parsed.trues, lambda d: (OutputKind.DEAD_LETTER, encode(d.as_record())))
    routed = op.flat_map("route_to_shards", parsed.falses, _router(config.shards))
    keyed = op.stateful_batch("sequence_and_window", routed, lambda resume: ShardLogic(config, resume, encode))
    by_kind = op.branch("split_gauges", keyed, lambda kv: kv[1][0] == GAUGE)
    records = op.map("drop_shard_key", by_kind.falses, lambda kv: kv[1])
    op.output("write", op.merge("outputs", dead, records), sink)
    if gauges is not None:
        op.output("gauges", op.map("gauge_by_shard", by_kind.trues, lambda kv: (kv[0], {"shard": kv[0], **kv[1][1]})), gauges)
    return flow
