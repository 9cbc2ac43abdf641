"""Replay a JSONL file as a stream: paced by its own timestamps, read by several partitions.

The file is cut into `layout.block_bytes` blocks dealt round-robin to `layout.partitions`
partitions (a line belongs to the block holding its first byte), so every worker parses a
share of the file, a block at a time and column-wise (`dataflows.parse_block`). A batch is one
frame of the events it releases (`STAMPED_SCHEMA`), the dead letters among them, and a
`Progress` marker that lets the flow's sequencer restore file order (see
`dataflows.sequencing`). All partitions pace themselves against one `ReplayClock`; a partition
that waits for its next line's time sleeps through `next_awake`: nothing spins.

A line longer than `max_line_bytes` becomes a dead letter without being parsed; reading it holds
at most the limit plus one 1 MiB chunk in memory, whatever its length.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np
import polars as pl
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from connectors.view.progress import FigureFile
from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from dataflows.event_frame import STAMPED_SCHEMA, events_frame
from dataflows.events import DeadLetter, Event, LineRef
from dataflows.parse import MAX_LINE_BYTES, oversized, parse_line
from dataflows.parse_block import parse_block
from dataflows.sequencing import DONE, Progress, ReplayLayout

Item = pl.DataFrame | DeadLetter | Progress
"""A frame of events (`STAMPED_SCHEMA`), a dead letter, or the marker that ends each batch."""
Parser = Callable[[bytes, LineRef], Event | DeadLetter]
PACED_PIECE_BYTES = 64 << 10
"""How much of a block a paced replay parses at a time."""
_COUNT_CHUNK = 1 << 20
_SKIP_CHUNK = 1 << 16


@dataclass(frozen=True)
class PartitionState:
    """Where a partition stands: the block it reads and the next line's offset and number."""

    block: int
    offset: int
    line: int
    latest: float | None


def check_readable(path: Path) -> None:
    """Raise `ConvoflowError` naming the file unless it is a readable regular file."""
    if not path.exists():
        msg = f"input file {path} does not exist"
        raise ConvoflowError(msg)
    if not path.is_file():
        msg = f"input {path} is not a regular file"
        raise ConvoflowError(msg)
    try:
        with path.open("rb") as f:
            f.read(1)
    except OSError as exc:
        msg = f"input file {path} cannot be read: {exc.strerror}"
        raise ConvoflowError(msg) from exc


def first_event_time(
    path: Path, parse: Parser = parse_line, max_lines: int = 10_000, max_line_bytes: int = MAX_LINE_BYTES
) -> float | None:
    """The timestamp of the file's first timed event (the replay clock's origin), if any.

    Lines over `max_line_bytes` are skipped unread.
    """
    with path.open("rb") as f:
        for number in range(1, max_lines + 1):
            raw = f.readline(max_line_bytes + 1)
            if not raw:
                break
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                _skip_line(f)
                continue
            item = parse(raw.rstrip(b"\r\n"), LineRef(path.name, number, 0))
            if isinstance(item, Event) and item.time is not None:
                return item.time
    return None


def _skip_line(file: BinaryIO) -> tuple[int, bool]:
    """Read past the rest of the current line in bounded chunks: the bytes read and whether a newline ended them."""
    skipped = 0
    while chunk := file.readline(_SKIP_CHUNK):
        skipped += len(chunk)
        if chunk.endswith(b"\n"):
            return skipped, True
    return skipped, False


REPORT_EVERY_S = 1.0
"""How often a partition keeps how much it has read (when a live view asked for it)."""


class ReplaySource(FixedPartitionedSource[Item, PartitionState]):
    """A JSONL file replayed against `clock`, split over `layout.partitions` partitions.

    A batch holds at most `batch_size` lines.
    """

    def __init__(
        self,
        path: Path,
        *,
        layout: ReplayLayout,
        clock: ReplayClock,
        batch_size: int = 1000,
        tick_seconds: float = 0.25,
        max_line_bytes: int = MAX_LINE_BYTES,
        wall: Callable[[], float] = time.time,
        figures_dir: Path | None = None,
    ) -> None:
        if max_line_bytes < 1:
            msg = f"max_line_bytes must be >= 1, got {max_line_bytes}"
            raise ValueError(msg)
        self.path = path
        self.layout = layout
        self.clock = clock
        self.batch_size = batch_size
        self.tick_seconds = tick_seconds
        self.max_line_bytes = max_line_bytes
        self.wall = wall
        self.figures_dir = figures_dir
        """Where each partition keeps how much of the file it has read, for a live view's progress bar."""

    def list_parts(self) -> list[str]:
        return [f"{self.path.name}#{p}" for p in range(self.layout.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: PartitionState | None) -> ReplayPartition:
        partition = int(for_part.rsplit("#", 1)[1])
        return ReplayPartition(self, partition, resume_state)


@dataclass
class _Loaded:
    """The parsed complete lines of the block being read (or a piece of them), from where reading (re)started in it.

    `events` are stamped (`STAMPED_SCHEMA`); `starts` holds every line's offset (events and dead
    letters alike) and `end` the offset after the last complete line.
    """

    events: pl.DataFrame
    dead: list[DeadLetter]
    starts: np.ndarray
    end: int
    last_piece: bool = True
    """Whether these lines run to the block's last complete line (else more are to be parsed from `end`)."""
    offsets: np.ndarray = field(init=False)
    times: np.ndarray = field(init=False)
    next_event: int = 0
    next_dead: int = 0
    next_line: int = 0

    def __post_init__(self) -> None:
        self.offsets = self.events["offset"].to_numpy()
        self.times = self.events["time"].to_numpy()


class ReplayPartition(StatefulSourcePartition[Item, PartitionState]):
    """Reads blocks `partition, partition + P, ...` and releases lines when they are due."""

    def __init__(self, source: ReplaySource, partition: int, resume: PartitionState | None) -> None:
        self.src = source
        self.partition = partition
        self.file: BinaryIO = source.path.open("rb")
        self.size = source.path.stat().st_size
        layout = source.layout
        if resume is None:
            resume = PartitionState(partition, layout.block_start(partition), 0, None)
        self.block = resume.block
        self.offset = resume.offset
        self.line = resume.line
        self.latest = resume.latest
        # A resumed replay goes on from where it was, not from the file's first event time.
        self.clock = source.clock if resume.latest is None else replace(source.clock, event_origin=resume.latest)
        self.counted = (0, 0) if resume.line == 0 else (resume.offset, resume.line - 1)
        self.finished: list[tuple[int, float | None]] = []
        self.straddling: tuple[Event | DeadLetter, int] | None = None
        self.waiting_for: float | None = None
        self.waiting_since: float | None = None
        self.done = False
        self.loaded: _Loaded | None = None
        self.line_end = 0  # the end of the last line skipped past its block's end (see `_align`)
        self.figures = None if source.figures_dir is None else FigureFile(source.figures_dir, f"replay-{partition}")
        self.reported_at = -math.inf
        self.owned: tuple[range, int] | None = None
        """This partition's blocks and their bytes, once asked for (`_report`)."""
        if self.line:
            self._load_block()

    def next_batch(self) -> list[Item]:
        if self.done:
            raise StopIteration
        now = self.src.wall()
        frames: list[pl.DataFrame] = []
        dead: list[DeadLetter] = []
        room = self.src.batch_size
        self.waiting_for = self.waiting_since = None
        while room > 0 and self.waiting_for is None:
            if not self._advance():
                self.done = True
                break
            if self.loaded is not None and self.offset < self.loaded.end:
                room -= self._take_loaded(self.loaded, now, room, frames, dead)
            elif self.loaded is not None and not self.loaded.last_piece:
                self._load_block()
            else:
                room -= self._take_straddling(now, frames, dead)
        if self.waiting_for is not None:
            self.waiting_since = now
        batch: list[Item] = []
        if frames:
            batch.append(frames[0] if len(frames) == 1 else pl.concat(frames))
        batch.extend(dead)
        batch.append(self._progress(now))
        if self.figures is not None and (self.done or now - self.reported_at >= REPORT_EVERY_S):
            self._report(now)
        return batch

    def _report(self, now: float) -> None:
        """Keep how many of the file's bytes this partition has read, and how many it will."""
        assert self.figures is not None
        self.reported_at = now
        if self.owned is None:
            layout, size = self.src.layout, self.size
            own = range(self.partition, -(-size // layout.block_bytes), layout.partitions)
            self.owned = (own, sum(min(layout.block_start(b + 1), size) - layout.block_start(b) for b in own))
        own, total = self.owned
        if self.done:
            done = total
        else:
            start = self.src.layout.block_start(self.block)
            done = (self.block - self.partition) // self.src.layout.partitions * self.src.layout.block_bytes
            done += max(0, min(self.offset, self.size) - start)
        self.figures.write({"read": min(done, total), "total": total})

    def next_awake(self) -> datetime | None:
        if self.waiting_since is None or self.waiting_for is None:
            return None
        due = min(self.clock.wall_time_for(self.waiting_for), self.waiting_since + self.src.tick_seconds)
        return datetime.fromtimestamp(due, timezone.utc)

    def snapshot(self) -> PartitionState:
        return PartitionState(self.block, self.offset, self.line, self.latest)

    def close(self) -> None:
        self.file.close()

    def _progress(self, now: float) -> Progress:
        finished, self.finished = tuple(self.finished), []
        if self.done:
            return Progress(self.partition, DONE, finished)
        clock = self.clock.event_time_at(now) if self.waiting_since is not None else None
        return Progress(self.partition, self.offset, finished, clock)

    def _take_loaded(
        self, loaded: _Loaded, now: float, room: int, frames: list[pl.DataFrame], dead: list[DeadLetter]
    ) -> int:
        """Take up to `room` lines of the loaded block, stopping before the first event not yet due;
        return how many were taken."""
        last_line = min(loaded.next_line + room, len(loaded.starts))
        stop = int(loaded.starts[last_line]) if last_line < len(loaded.starts) else loaded.end
        offsets = loaded.offsets
        last_event = loaded.next_event + int(np.searchsorted(offsets[loaded.next_event:], stop))
        if self.clock.paced and last_event > loaded.next_event:
            times = loaded.times[loaded.next_event:last_event]
            due = self.clock.wall_origin + (times - self.clock.event_origin) / self.clock.speed
            waiting = np.flatnonzero(due > now)  # NaN (untimed) compares False: never waited for
            if len(waiting):
                last_event = loaded.next_event + int(waiting[0])
                self.waiting_for = float(times[waiting[0]])
                stop = int(offsets[last_event])
        first_event = loaded.next_event
        taken = loaded.events.slice(first_event, last_event - first_event)
        first_dead = loaded.next_dead
        while loaded.next_dead < len(loaded.dead) and loaded.dead[loaded.next_dead].ref.offset < stop:
            loaded.next_dead += 1
        dead.extend(loaded.dead[first_dead : loaded.next_dead])
        if not taken.is_empty():
            frames.append(taken)
            latest = float(np.nanmax(loaded.times[first_event:last_event], initial=-np.inf))
            if latest > -np.inf and (self.latest is None or latest > self.latest):
                self.latest = latest
        lines = int(np.searchsorted(loaded.starts, stop)) - loaded.next_line
        loaded.next_event, loaded.next_line = last_event, loaded.next_line + lines
        self.offset = stop
        self.line += lines
        return lines

    def _take_straddling(self, now: float, frames: list[pl.DataFrame], dead: list[DeadLetter]) -> int:
        """Take the line that starts in this block and ends after it, unless it is not yet due."""
        if self.straddling is None:
            self.straddling = self._read_line_past_block(LineRef(self.src.path.name, self.line, self.offset))
        item, end = self.straddling
        if isinstance(item, Event):
            if item.time is not None and self.clock.wall_time_for(item.time) > now:
                self.waiting_for = item.time
                return 0
            frames.append(self._stamped(events_frame([item]), self.latest))
            if item.time is not None and (self.latest is None or item.time > self.latest):
                self.latest = item.time
        else:
            dead.append(item)
        self.straddling = None
        self.offset = end
        self.line += 1
        return 1

    def _advance(self) -> bool:
        """Move on to the next block (and load it) when this one is read; False at the end of the file."""
        layout = self.src.layout
        while True:
            block_end = layout.block_start(self.block + 1)
            if self.offset >= block_end or self.offset >= self.size:
                if self.line:
                    self.counted = (self.offset, self.line - 1)
                self.finished.append((self.block, self.latest))
                self.block += layout.partitions
                self.offset = layout.block_start(self.block)
                self.line = 0
                self.latest = None
                self.loaded = None
                if self.offset >= self.size:
                    return False
                continue
            if self.line == 0:
                self._align()
                self._load_block()
                continue
            return True

    def _align(self) -> None:
        """Move from a block's first byte to its first line start, and number that line.

        A block inside a line already skipped to its end (`line_end`) jumps there unread, so a line
        spanning many blocks is read once per partition, and never held whole.
        """
        if 0 < self.offset < self.line_end:
            self.offset = self.line_end
        elif self.offset > 0:
            self.file.seek(self.offset - 1)
            if self.file.read(1) != b"\n":
                _skip_line(self.file)
                self.offset = self.line_end = self.file.tell()
        counted_offset, newlines = self.counted
        self.file.seek(counted_offset)
        while counted_offset < self.offset:
            chunk = self.file.read(min(_COUNT_CHUNK, self.offset - counted_offset))
            newlines += chunk.count(b"\n")
            counted_offset += len(chunk)
        self.counted = (counted_offset, newlines)
        self.line = newlines + 1

    def _load_block(self) -> None:
        """Read and parse the complete lines of the current block from `offset` on: all of them, or
        for a paced replay the next `PACED_PIECE_BYTES` of them (a piece's parse delays every event
        due meanwhile; an unpaced replay wants the fewest calls)."""
        self.file.seek(self.offset)
        remaining = max(0, min(self.src.layout.block_start(self.block + 1), self.size) - self.offset)
        data = self.file.read(min(remaining, PACED_PIECE_BYTES) if self.clock.paced else remaining)
        if len(data) < remaining and b"\n" not in data:  # a line longer than a piece: the rest of the block
            data += self.file.read(remaining - len(data))
        last_piece = len(data) >= remaining
        data = data[: data.rfind(b"\n") + 1]
        parsed = parse_block(data, source=self.src.path.name, offset=self.offset, line=self.line,
                             max_bytes=self.src.max_line_bytes)
        self.loaded = _Loaded(self._stamped(parsed.events, self.latest), parsed.dead, parsed.starts,
                              self.offset + len(data), last_piece)

    def _stamped(self, events: pl.DataFrame, latest: float | None) -> pl.DataFrame:
        """`events` with their block and the latest event time before each in it (`latest` before the first)."""
        before = pl.col("time").cum_max().forward_fill().shift(1)
        return events.with_columns(
            pl.lit(self.block, pl.Int64).alias("block"),
            (before if latest is None else pl.max_horizontal(before, pl.lit(latest))).alias("clock_before"),
        ).select(STAMPED_SCHEMA.names())

    def _read_line_past_block(self, ref: LineRef) -> tuple[Event | DeadLetter, int]:
        """A line that starts in this block and ends after it (or at a file without final newline)."""
        limit = self.src.max_line_bytes
        self.file.seek(self.offset)
        raw = self.file.readline(limit + 1)
        if len(raw) > limit and not raw.endswith(b"\n"):
            skipped, newline = _skip_line(self.file)
            self.line_end = self.file.tell()
            return oversized(raw, len(raw) + skipped - newline, limit, ref), self.line_end
        body = raw.rstrip(b"\n").rstrip(b"\r")
        if not body.strip():
            return DeadLetter(ref, "", "empty line"), self.offset + len(raw)
        return parse_line(body, ref, limit), self.offset + len(raw)
