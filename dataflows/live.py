"""The clock of a live input (Kafka): per-partition watermarks with a system-clock fallback.

A replayed file has one order, so its clock is a function of file position (see
`dataflows.sequencing`). A live topic has none across partitions: each partition is read at its
own pace, and one may be far ahead of another while a backlog is read. So, as Flink does with
Kafka sources, every input partition keeps its own clock and the flow's clock is the minimum:

- `LiveStamper` (one per input partition, on the worker that reads it): the partition's clock is
  the latest event time it has read; once it has read everything there is (the consumer reports
  the partition's end), the clock moves on with the wall time since, so event time keeps moving
  when traffic stops and windows still close (the system-clock fallback). While a partition
  still has messages to read (a backlog, or a consumer still connecting after a restart) its
  clock does not move with the wall: wall time spent reading says nothing about event time, and
  counting it would make a slow reader's own events late. An event without a timestamp gets the
  partition's clock; before any other event, the wall clock, which then becomes the partition's
  clock. After each batch the partition sends a `LiveMark`; a partition found empty, or that has
  reported nothing for `idle_after` seconds since it started, is marked idle and no longer holds
  the others back.
- `LiveMerger` (one per shard): marks are replicated to every shard and travel behind the events
  on the same FIFO channel. Events are released in arrival order, each with the flow's clock at
  that point: the minimum over the partitions that are not idle, None while any of them has not
  reported yet. The clock never goes back.

An event is late only if it is behind the clock of every partition, so a partition read faster
than another never makes the other's events late; within one partition (a session's events stay
on one partition when keyed by session) lateness is bounded out-of-orderness as usual.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import polars as pl

from dataflows.event_frame import STAMPED_SCHEMA, iso_expr
from dataflows.events import DeadLetter, Event
from dataflows.sequencing import RELEASED_SCHEMA, LiveMark, Progress, Stamped, later

_EVENT_COLUMNS = RELEASED_SCHEMA.names()[:-1]
IDLE_AFTER_S = 30.0
"""How long a partition that has neither read a message nor reached its end may hold the clock."""


@dataclass
class LiveStamper:
    """One live partition's clock; `now` is always the caller's wall-clock reading (epoch s)."""

    partition: int
    started: float
    idle_after: float = IDLE_AFTER_S
    base: float | None = None
    """The clock when the partition last read a message: the newest event time read, or later."""
    caught_up_at: float | None = None
    """The wall time the partition reached its end (nothing left to read); None while it has more."""

    def clock(self, now: float) -> float | None:
        if self.base is None or self.caught_up_at is None:
            return self.base
        return self.base + max(0.0, now - self.caught_up_at)

    def stamp(self, item: Event | DeadLetter, now: float) -> Stamped | DeadLetter:
        """The event with the partition's clock before it; an untimed event is timed by that clock."""
        clock = self.clock(now)
        self.base, self.caught_up_at = clock, None
        if isinstance(item, DeadLetter):
            return item
        if item.time is None:
            if clock is None:  # only the system clock to go by: it becomes the partition's clock
                self.base = now
            return Stamped(item.timed(now if clock is None else clock), self.partition, clock)
        if clock is None or item.time > clock:
            self.base = item.time
        return Stamped(item, self.partition, clock)

    def stamp_frame(self, events: pl.DataFrame, now: float, *, dead: bool = False) -> pl.DataFrame:
        """`stamp` of a batch read at `now`, column-wise: `events` (event columns, in read order)
        with the partition as `block` and the clock before each (`STAMPED_SCHEMA`), untimed ones
        timed by it. `dead`: the batch also held dead letters (they stop the clock's drift too)."""
        clock = self.clock(now)
        if events.is_empty():
            if dead:
                self.base, self.caught_up_at = clock, None
            return pl.DataFrame(schema=STAMPED_SCHEMA)
        self.caught_up_at = None
        times = events["time"].to_numpy().astype(np.float64)
        untimed = np.isnan(times)
        if clock is None and untimed[0]:
            times[0] = now  # only the system clock to go by: it becomes the partition's clock
        before = np.fmax.accumulate(np.concatenate(([np.nan if clock is None else clock], times)))
        clocks = before[:-1]
        timed = np.where(untimed & ~np.isnan(clocks), clocks, times)
        self.base = None if np.isnan(before[-1]) else float(before[-1])
        given = pl.Series("time", timed)
        if untimed.any():
            events = events.with_columns(
                pl.when(pl.Series(untimed)).then(iso_expr(pl.lit(given))).otherwise(pl.col("timestamp")).alias("timestamp"))
        # Stacked as Series, not a query: a live poll is often a few dozen events, where a query costs ~1 ms.
        stamps = {"time": given, "block": pl.Series("block", np.full(len(events), self.partition, dtype=np.int64)),
                  "clock_before": pl.Series("clock_before", clocks).fill_nan(None)}
        return pl.DataFrame([stamps[name] if name in stamps else events.get_column(name)
                             for name in STAMPED_SCHEMA.names()])

    def caught_up(self, now: float) -> None:
        """The partition has nothing more to read for now: from here its clock follows the wall."""
        if self.caught_up_at is None:
            self.caught_up_at = now

    def mark(self, now: float, *, done: bool = False) -> LiveMark:
        silent = self.caught_up_at is not None or now - self.started >= self.idle_after
        return LiveMark(self.partition, self.clock(now), done or (self.base is None and silent))

    def resume(self, clock: float | None) -> None:
        """Continue from a snapshot's clock; it moves with the wall again once the partition catches up."""
        self.base, self.caught_up_at = clock, None


@dataclass
class LiveMerger:
    """Releases a shard's live events in arrival order, each with the flow's clock at that point.

    Has the `Sequencer`'s interface, so a shard works the same on replayed and live input: events
    come as frames (`ROUTED_SCHEMA`) between the partitions' marks.
    """

    partitions: int
    clocks: list[float | None] = field(default_factory=list)
    idle: list[bool] = field(default_factory=list)
    queue: list[pl.DataFrame | LiveMark] = field(default_factory=list)
    current: float | None = None

    def __post_init__(self) -> None:
        if not self.clocks:
            self.clocks = [None] * self.partitions
            self.idle = [False] * self.partitions

    def push(self, items: Iterable[pl.DataFrame | LiveMark | Progress]) -> None:
        for item in items:
            if isinstance(item, Progress):
                msg = "a replay Progress marker reached a live shard; the flow's source and config disagree"
                raise TypeError(msg)
            self.queue.append(item)

    def release(self) -> pl.DataFrame:
        """The queued events, in arrival order, each with the clock at that point (`RELEASED_SCHEMA`)."""
        queue, self.queue = self.queue, []
        parts: list[pl.DataFrame] = []
        for item in queue:
            if isinstance(item, LiveMark):
                self._update(item)
            elif not item.is_empty():
                parts.append(_with_clock(item, self.current))
        if not parts:
            return pl.DataFrame(schema=RELEASED_SCHEMA)
        return parts[0] if len(parts) == 1 else pl.concat(parts)

    def release_all(self) -> pl.DataFrame:
        return self.release()

    def clock_after(self, released: pl.DataFrame) -> float | None:
        """Unlike a replay's, the flow's clock does not move with events: only marks move it."""
        return cast(float | None, released["clock"].max())

    def clock_floor(self) -> float | None:
        return self.current

    @property
    def buffered(self) -> int:
        return sum(len(item) for item in self.queue if isinstance(item, pl.DataFrame))

    def _update(self, mark: LiveMark) -> None:
        self.clocks[mark.partition] = later(self.clocks[mark.partition], mark.clock)
        self.idle[mark.partition] = mark.idle
        active = [c for c, idle in zip(self.clocks, self.idle, strict=True) if not idle]
        if not active or any(c is None for c in active):
            return
        self.current = later(self.current, min(c for c in active if c is not None))


def _with_clock(events: pl.DataFrame, clock: float | None) -> pl.DataFrame:
    """`events` (`ROUTED_SCHEMA`) with the column `clock` (`RELEASED_SCHEMA`). Built as a Series and
    stacked on: a live shard gets a few events per partition and batch, where a query costs ~150 µs."""
    if events.columns != _EVENT_COLUMNS:
        events = events.select(_EVENT_COLUMNS)
    column = (pl.Series("clock", [None] * len(events), dtype=pl.Float64) if clock is None
              else pl.Series("clock", np.full(len(events), clock, dtype=np.float64)))
    return events.hstack([column])
