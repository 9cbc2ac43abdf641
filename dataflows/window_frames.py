"""Event-time tumbling windows over frames of events: `WindowBook`'s semantics, a batch at a time.

A shard hands `FrameWindows.add` the events it released, in order, each with the clock before
it. The watermark before each event is the running maximum of `clock - out_of_orderness`; an
event whose window ends at or before it is late. Every other event joins its window's open rows,
and `advance` emits the windows the watermark has passed as records, messages in time order
(then file order), the earliest `max_messages` listed and the rest counted in `overflow`.

A session that could open more than `max_open_windows` windows, or hold more than twice
`max_messages` events in one, in a batch is handed for good to a `WindowBook` (`escaped`), which
closes windows early event by event exactly as before: the limits exist so that no input can
grow a shard's state without bound, and their meaning is sequential. The book is moved to each
event's watermark before it takes the event, so both share one watermark.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import cast

import numpy as np
import polars as pl

from dataflows.event_frame import EVENT_SCHEMA, event_records, iso_expr
from dataflows.events import LATE_REASON, Event, iso
from dataflows.records import Record, Records
from dataflows.small_frames import only, rows_where, with_series
from dataflows.windows import WindowBook, WindowConfig

OPEN_SCHEMA = pl.Schema([*EVENT_SCHEMA.items(), ("start", pl.Float64)])
"""An open window's events: the event columns and the window's start."""
GATHER_FRAMES = 32
"""Frames of arrived rows folded into the open rows at once: one copy per that many batches, so
neither each batch nor each closing pays for all of them."""
_CHRONOLOGICAL = ["time", "source", "offset"]
_MESSAGE_FIELDS = ["event_id", "sender", "kind", "text", "timestamp", "time_source"]
"""The fields of a message inside a window record (`Event.as_window_message`)."""


@dataclass
class FrameWindows:
    """The open windows of one shard's sessions, and their shared watermark."""

    config: WindowConfig
    watermark: float = -math.inf
    open: pl.DataFrame = field(default_factory=lambda: pl.DataFrame(schema=OPEN_SCHEMA))
    """The open windows' rows (`OPEN_SCHEMA`), but for those in `arrived`."""
    arrived: list[pl.DataFrame] = field(default_factory=list)
    """Rows that joined open windows since `open` was last gathered (`GATHER_FRAMES`)."""
    escaped: WindowBook | None = None
    """The sessions that met a limit, window by window (see the module docstring)."""
    escaped_sessions: set[str] = field(default_factory=set)
    emitted: list[Record] = field(default_factory=list)
    """Windows the book emitted while it took events, for the next `advance` or `flush`."""
    next_end: float = math.inf
    """The earliest end of an open window: until the watermark reaches it, nothing closes."""
    held: dict[tuple[str, float], int] = field(default_factory=dict)
    """How many of the open rows each open window (session, start) holds, kept as rows come and go,
    so the limits are checked against a batch's new rows only."""
    windows_of: dict[str, int] = field(default_factory=dict)
    """How many windows each session has open (in `open`)."""

    def add(self, events: pl.DataFrame) -> list[Record]:
        """Window `events` (event columns, `clock` and maybe `windowed`, in release order); return the late records.

        Every event moves the watermark; only those with `windowed` set (all, without the column)
        join windows (the others are a shard's share of another shard's session, or blocked by the rules).
        """
        if events.is_empty():
            return []
        clock = events["clock"].to_numpy().astype(np.float64)
        marks = np.where(np.isnan(clock), -np.inf, clock - self.config.out_of_orderness)
        watermarks = np.maximum.accumulate(np.maximum(marks, self.watermark))
        times = events["time"].to_numpy()
        starts = np.floor((times - self.config.align_to) / self.config.size) * self.config.size + self.config.align_to
        framed = with_series(events, pl.Series("start", starts), pl.Series("watermark", watermarks))
        windowed = framed if "windowed" not in events.columns else rows_where(framed, events["windowed"].to_numpy())
        counts = _window_counts(windowed)
        self._escape(counts)
        late: list[Record] = []
        if self.escaped_sessions:
            escaping = windowed["session_id"].is_in(list(self.escaped_sessions))
            late += self._add_escaped(framed, escaping.any())
            if escaping.any():
                windowed = rows_where(windowed, ~escaping.to_numpy())
                counts = _window_counts(windowed)
        self.watermark = max(self.watermark, float(watermarks[-1]))
        is_late = windowed["start"].to_numpy() + self.config.size <= windowed["watermark"].to_numpy()
        if is_late.any():
            late += self._late_records(rows_where(windowed, is_late))
            windowed = rows_where(windowed, ~is_late)
            counts = _window_counts(windowed)
        if not windowed.is_empty():
            kept = only(windowed, OPEN_SCHEMA.names())
            self.arrived.append(kept)
            if len(self.arrived) >= GATHER_FRAMES:
                self._gather()
            for session, start, rows in counts:
                if (session, start) not in self.held:
                    self.windows_of[session] = self.windows_of.get(session, 0) + 1
                self.held[(session, start)] = self.held.get((session, start), 0) + rows
            self.next_end = min(self.next_end, cast(float, kept["start"].min()) + self.config.size)
        return late

    def advance(self, now: float | None) -> list[Records]:
        """Move the watermark to `now - out_of_orderness` and emit every window it passed, as
        batches of records (a frame, and dicts for the windows the book closed)."""
        early, self.emitted = self.emitted + self._escaped_advance(None), []
        if now is None:
            return [early]
        self.watermark = max(self.watermark, now - self.config.out_of_orderness)
        if self.watermark < self.next_end:
            return [early + self._escaped_advance(self.watermark)]
        self._gather()
        closing = (self.open["start"] + self.config.size) <= self.watermark
        emitted = self.open.filter(closing)
        self.open = self.open.filter(~closing)
        self._forget(emitted.select("session_id", "start").unique().iter_rows())
        self._opened()
        return [early + self._escaped_advance(self.watermark), self._records(emitted)]

    def flush(self) -> list[Records]:
        """Emit every open window (end of a finite input)."""
        self._gather()
        emitted, self.open = self.open, self.open.clear()
        self.held.clear()
        self.windows_of.clear()
        self._opened()
        escaped = [w.as_record() for w in self.escaped.flush()] if self.escaped is not None else []
        early, self.emitted = self.emitted, []
        return [early + escaped, self._records(emitted)]

    @property
    def open_windows(self) -> int:
        return len(self.held) + (len(self.escaped.open) if self.escaped is not None else 0)

    def open_rows(self) -> pl.DataFrame:
        """Every open window's rows (`OPEN_SCHEMA`)."""
        self._gather()
        return self.open

    def _gather(self) -> None:
        """Fold the rows that arrived since into `open`."""
        if self.arrived:
            arrived, self.arrived = pl.concat(self.arrived, rechunk=True), []
            self.open = pl.concat([self.open, arrived]) if not self.open.is_empty() else arrived

    def _opened(self) -> None:
        """Note the open rows' earliest window end, once they have changed (`open` gathered)."""
        if self.open.is_empty():
            self.next_end = math.inf
            return
        self.next_end = cast(float, self.open["start"].min()) + self.config.size

    def _forget(self, windows: Iterable[tuple[str, float]]) -> None:
        """Drop windows (session, start) that left `open` from the counts."""
        for session, start in windows:
            del self.held[(session, start)]
            left = self.windows_of[session] - 1
            if left:
                self.windows_of[session] = left
            else:
                del self.windows_of[session]

    def _escape(self, counts: list[tuple[str, float, int]]) -> None:
        """Hand to the `WindowBook` the sessions that could meet a limit in this batch: counted
        with every new row (`counts` per window), late or not (so, if anything, too soon)."""
        if not counts:
            return
        most_rows, most_windows = 2 * self.config.max_messages, self.config.max_open_windows
        sessions: set[str] = set()
        opening: dict[str, int] = {}
        for session, start, rows in counts:
            held = self.held.get((session, start))
            if held is None:
                opening[session] = opening.get(session, 0) + 1
            if (held or 0) + rows > most_rows:
                sessions.add(session)
        sessions.update(s for s, new in opening.items() if self.windows_of.get(s, 0) + new > most_windows)
        sessions -= self.escaped_sessions
        if not sessions:
            return
        if self.escaped is None:
            self.escaped = WindowBook(self.config, watermark=self.watermark)
        self._gather()
        moving = self.open["session_id"].is_in(list(sessions))
        for row in self.open.filter(moving).select(OPEN_SCHEMA.names()).iter_rows():
            self.escaped.adopt(Event._make(row[:-1]), row[-1])
        self.open = self.open.filter(~moving)
        self._forget([key for key in self.held if key[0] in sessions])
        self._opened()
        self.escaped_sessions |= sessions

    def _add_escaped(self, framed: pl.DataFrame, any_escaped: bool) -> list[Record]:
        """The escaped sessions' events, one by one, each at its own watermark."""
        assert self.escaped is not None
        if not any_escaped:
            return []
        late = []
        escaping = pl.col("session_id").is_in(list(self.escaped_sessions))
        if "windowed" in framed.columns:
            escaping &= pl.col("windowed")
        for row in framed.filter(escaping).select([*EVENT_SCHEMA.names(), "watermark"]).iter_rows():
            self.emitted += [window.as_record() for window in self.escaped.advance_mark(row[-1])]
            found = self.escaped.add(Event._make(row[:-1]))
            if found is not None:
                late.append(found.as_record())
        return late

    def _escaped_advance(self, mark: float | None) -> list[Record]:
        if self.escaped is None:
            return []
        return [w.as_record() for w in self.escaped.advance_mark(mark)]

    def _late_records(self, late: pl.DataFrame) -> list[Record]:
        if late.is_empty():
            return []
        size = self.config.size
        return [
            {"session_id": event["session_id"], "window_start": iso(start), "window_end": iso(start + size),
             "watermark": iso(mark) if math.isfinite(mark) else None, "reason": LATE_REASON, "event": event}
            for event, start, mark in zip(
                event_records(late), late["start"].to_list(), late["watermark"].to_list(), strict=True
            )
        ]

    def _records(self, emitted: pl.DataFrame) -> pl.DataFrame:
        """The window records of `emitted` open rows (whole windows), a row each (`Event.as_record`'s
        fields; `counts` a map column, see `dataflows.flow.Records`)."""
        if emitted.is_empty():
            return _NO_WINDOWS
        ordered = emitted.sort(["session_id", "start", *_CHRONOLOGICAL])
        counts = (
            ordered.group_by("session_id", "start", "sender", maintain_order=True).len()
            .group_by("session_id", "start", maintain_order=True)
            .agg(pl.struct(pl.col("sender").alias("key"), pl.col("len").alias("value")).alias("counts"))
        )
        size, most = self.config.size, self.config.max_messages
        windows = ordered.group_by("session_id", "start", maintain_order=True).agg(
            pl.struct(_MESSAGE_FIELDS).head(most).alias("messages"),
            pl.col("timestamp").first().alias("first_event_time"),
            pl.col("timestamp").last().alias("last_event_time"),
            (pl.len() - pl.len().clip(upper_bound=most)).alias("overflow"),
        )
        return windows.join(counts, on=["session_id", "start"], how="left", maintain_order="left").select(
            "session_id",
            iso_expr(pl.col("start")).alias("window_start"),
            iso_expr(pl.col("start") + size).alias("window_end"),
            "messages",
            "counts",
            "first_event_time",
            "last_event_time",
            (pl.col("overflow") > 0).alias("truncated"),
            pl.col("overflow").cast(pl.Int64),
            pl.lit(None, pl.String).alias("closed_early"),
        )


_NO_WINDOWS = pl.DataFrame(schema={"session_id": pl.String})


def _window_counts(rows: pl.DataFrame) -> list[tuple[str, float, int]]:
    """How many of `rows` each window (session, start) gets."""
    if len(rows) <= _COUNT_IN_PYTHON:
        counted = Counter(zip(rows["session_id"].to_list(), rows["start"].to_list(), strict=True))
        return [(session, start, n) for (session, start), n in counted.items()]
    return cast(list[tuple[str, float, int]], rows.group_by("session_id", "start").len().rows())


_COUNT_IN_PYTHON = 256
"""Up to this many rows, windows are counted in Python: cheaper than a Polars group_by."""
