"""Put events read by parallel replay partitions back into file order, with the replay clock.

Why: Bytewax gives no order between items that reach a stateful step from different workers,
so a window step fed by several readers would judge lateness by thread scheduling. Instead the
file is cut into fixed-size byte blocks dealt round-robin to partitions (`ReplayLayout`). Each
partition stamps every event with the latest event time seen earlier in its block, and after
each batch sends a `Progress` marker (the offset it has reached, the blocks it finished with
their latest event time, and in a paced replay the current replay time). Markers are
replicated to every shard and travel behind the events on the same worker-to-worker channel,
which is FIFO, so a shard knows every line below `min(next_offset)` has arrived.

The `Sequencer` keeps a shard's events as frames, releases them in file order up to that
frontier (one frame per call) and gives each the replay clock as a single reader would have had
it: the latest event time of all earlier lines of the file. Results therefore do not depend on how many partitions, workers or
processes read the file, nor on the speed factor.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, NamedTuple, cast

import numpy as np
import polars as pl

from dataflows.event_frame import EVENT_SCHEMA, ROUTED_SCHEMA, events_frame
from dataflows.events import DeadLetter, Event, LineRef
from dataflows.parse import parse_line
from dataflows.small_frames import only, rows_where, with_series

DONE = sys.maxsize


@dataclass(frozen=True)
class ReplayLayout:
    """How a replayed file is split: `block_bytes` blocks dealt round-robin to `partitions`."""

    partitions: int = 1
    block_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if self.partitions < 1 or self.block_bytes < 1:
            msg = f"a replay layout needs >= 1 partition and block byte, got {self}"
            raise ValueError(msg)

    def block_of(self, offset: int) -> int:
        return offset // self.block_bytes

    def block_start(self, block: int) -> int:
        return block * self.block_bytes


Scope = Literal["all", "session", "user"]
"""What a shard does with an event it receives (see `dataflows.flow`): everything (`all`), or, for
a chat event whose user hashes to another shard than its session, only its session's part
(windows, messages, session-keyed patterns: `session`) or only its user's patterns (`user`)."""


class Stamped(NamedTuple):
    """An accepted event, with the latest event time earlier in its block (None: none yet)."""

    event: Event
    block: int
    clock_before: float | None
    scope: Scope = "all"


class Progress(NamedTuple):
    """A replay partition's promise about what it will still send.

    Every line it emits later starts at or after `next_offset` (`DONE` when finished) and, in a
    paced replay, is due after replay time `clock`. `finished` lists the blocks completed since
    its last marker with the latest event time in each.
    """

    partition: int
    next_offset: int
    finished: tuple[tuple[int, float | None], ...] = ()
    clock: float | None = None


class LiveMark(NamedTuple):
    """A live (Kafka) partition's clock: the latest event time it has read, advanced by the wall
    time since (the system-clock fallback), or None while it has read nothing. `idle` excludes a
    partition that has had no data for a while, or has ended, from the flow's clock.
    """

    partition: int
    clock: float | None
    idle: bool = False


Marker = Progress | LiveMark
Wire = tuple[Any, ...]
_PROGRESS = "progress"
_LIVE_MARK = "mark"


def to_wire(item: Marker) -> Wire:
    """A marker as a plain tuple of builtins: what crosses workers cheaply (events travel as frames)."""
    if isinstance(item, LiveMark):
        return (_LIVE_MARK, *item)
    return (_PROGRESS, *item)


def from_wire(wire: Wire) -> Marker:
    if wire[0] == _PROGRESS:
        return Progress(*wire[1:])
    return LiveMark(*wire[1:])


class BlockStamper:
    """Tracks the latest event time within the block being read and stamps events with it."""

    def __init__(self, block: int) -> None:
        self.block = block
        self.latest: float | None = None

    def stamp(self, item: Event | DeadLetter) -> Stamped | DeadLetter:
        if isinstance(item, DeadLetter):
            return item
        stamped = Stamped(item, self.block, self.latest)
        if item.time is not None and (self.latest is None or item.time > self.latest):
            self.latest = item.time
        return stamped

    def finish(self) -> tuple[int, float | None]:
        return (self.block, self.latest)


def later(a: float | None, b: float | None) -> float | None:
    """The later of two clock readings, either of which may be unknown (None)."""
    if a is None:
        return b
    if b is None:
        return a
    return a if a >= b else b


RELEASED_SCHEMA = pl.Schema([*ROUTED_SCHEMA.items(), ("clock", pl.Float64)])
"""Events a shard releases: routed, each with `clock`, the replay clock before it (null: none yet)."""


@dataclass
class Sequencer:
    """Releases one shard's events in file order as the partitions' frontier passes them."""

    layout: ReplayLayout
    frontier: list[int] = field(default_factory=list)
    ticks: list[float | None] = field(default_factory=list)
    pending: list[pl.DataFrame] = field(default_factory=list)
    unfolded: dict[int, float | None] = field(default_factory=dict)
    folded_blocks: int = 0
    folded_latest: float | None = None

    def __post_init__(self) -> None:
        if not self.frontier:
            self.frontier = [self.layout.block_start(p) for p in range(self.layout.partitions)]
            self.ticks = [None] * self.layout.partitions

    def push(self, items: Iterable[pl.DataFrame | Progress]) -> None:
        """Take frames of routed events (`ROUTED_SCHEMA`, maybe more columns after) and markers."""
        for item in items:
            if isinstance(item, pl.DataFrame):
                if not item.is_empty():
                    self.pending.append(only(item, _ROUTED_NAMES))
            else:
                self.frontier[item.partition] = item.next_offset
                self.ticks[item.partition] = item.clock
                for block, latest in item.finished:
                    self.unfolded[block] = latest

    def release(self) -> pl.DataFrame:
        """The events below the frontier, in file order, each with the clock before it (`RELEASED_SCHEMA`)."""
        if not self.pending:
            return _NOTHING_RELEASED
        events = self.pending[0] if len(self.pending) == 1 else pl.concat(self.pending)
        horizon = min(self.frontier)
        offsets = events["offset"].to_numpy()
        due = offsets < horizon
        if not due.any():
            self.pending = [events]
            return _NOTHING_RELEASED
        released, rest = rows_where(events, due), rows_where(events, ~due)
        if not np.all(np.diff(released["offset"].to_numpy()) > 0):
            released = released.sort("offset")
        self.pending = [] if rest.is_empty() else [rest]
        block_of = released["block"].to_numpy()
        blocks = np.unique(block_of)
        folds = np.array([np.nan if fold is None else fold for fold in map(self._fold_until, blocks.tolist())])
        before = released["clock_before"].to_numpy().astype(np.float64)  # null: NaN, which fmax passes over
        clock = np.fmax(folds[np.searchsorted(blocks, block_of)], before)
        return with_series(released, pl.Series("clock", clock, dtype=pl.Float64, nan_to_null=True))

    def release_all(self) -> pl.DataFrame:
        """At end of input: every partition is done, whatever markers were seen."""
        self.frontier = [DONE] * self.layout.partitions
        return self.release()

    def clock_after(self, released: pl.DataFrame) -> float | None:
        """The replay clock once `released` (`RELEASED_SCHEMA`) have been read: their times count too."""
        return later(cast(float | None, released["clock"].max()), cast(float | None, released["time"].max()))

    def clock_floor(self) -> float | None:
        """The replay time that every line not yet released is known to be at or after."""
        horizon = min(self.frontier)
        complete = min(horizon // self.layout.block_bytes, self._first_missing_block())
        floor = self._fold_until(complete)
        live = [t for t, f in zip(self.ticks, self.frontier, strict=True) if f != DONE]
        if live and all(t is not None for t in live):
            floor = later(floor, min(t for t in live if t is not None))
        return floor

    @property
    def buffered(self) -> int:
        return sum(frame.height for frame in self.pending)

    def _first_missing_block(self) -> int:
        block = self.folded_blocks
        while block in self.unfolded:
            block += 1
        return block

    def _fold_until(self, block: int) -> float | None:
        """Fold the latest event times of all blocks before `block` (all must be finished)."""
        while self.folded_blocks < block:
            try:
                latest = self.unfolded.pop(self.folded_blocks)
            except KeyError:
                msg = (
                    f"replay block {self.folded_blocks} was not reported finished before an "
                    f"event of block {block} was released; partition markers are out of order"
                )
                raise RuntimeError(msg) from None
            self.folded_latest = later(self.folded_latest, latest)
            self.folded_blocks += 1
        return self.folded_latest


def replay_items(lines: Iterable[str | bytes], source: str = "input.jsonl") -> list[Stamped | DeadLetter | Progress]:
    """What a one-partition, unpaced replay of `lines` emits: for tests and in-memory inputs."""
    out: list[Stamped | DeadLetter | Progress] = []
    stamper = BlockStamper(0)
    offset = 0
    for number, line in enumerate(lines, start=1):
        raw = line.encode() if isinstance(line, str) else line
        out.append(stamper.stamp(parse_line(raw, LineRef(source, number, offset))))
        offset += len(raw) + 1
    out.append(Progress(partition=0, next_offset=DONE, finished=(stamper.finish(),)))
    return out


_NOTHING_RELEASED = pl.DataFrame(schema=RELEASED_SCHEMA)
_ROUTED_NAMES = ROUTED_SCHEMA.names()
_EVENT_WIDTH = len(EVENT_SCHEMA)


def stamped_rows(frame: pl.DataFrame) -> Iterator[Stamped]:
    """The rows of a stamped (`STAMPED_SCHEMA`, scope `all`) or routed frame (`ROUTED_SCHEMA`,
    maybe with more columns after) as `Stamped` events, in the frame's order."""
    width = _EVENT_WIDTH
    if "scope" not in frame.columns:
        frame = frame.with_columns(pl.lit("all").alias("scope"))
    if frame.columns[: len(ROUTED_SCHEMA)] != ROUTED_SCHEMA.names():
        frame = frame.select(ROUTED_SCHEMA.names())
    for row in frame.iter_rows():
        scope: Scope = row[width + 2]
        yield Stamped(Event._make(row[:width]), row[width], row[width + 1], scope)


def stamped_frame(items: Iterable[Stamped], *, scoped: bool = True) -> pl.DataFrame:
    """`Stamped` events as one routed frame (`ROUTED_SCHEMA`), or without their scopes
    (`STAMPED_SCHEMA`) when not `scoped`."""
    items = list(items)
    columns = [
        pl.Series("block", [s.block for s in items], dtype=pl.Int64),
        pl.Series("clock_before", [s.clock_before for s in items], dtype=pl.Float64),
    ]
    if scoped:
        columns.append(pl.Series("scope", [s.scope for s in items], dtype=pl.String))
    return events_frame(s.event for s in items).with_columns(columns)
