"""Replay a JSONL file as a stream: paced by its own timestamps, read by several partitions.

The file is cut into `layout.block_bytes` blocks dealt round-robin to `layout.partitions`
partitions (a line belongs to the block holding its first byte), so every worker parses a
share of the file. All partitions pace themselves against one `ReplayClock`, and each batch
ends with a `Progress` marker that lets the flow's sequencer restore file order
(see `dataflows.sequencing`). A partition that waits for its next line's time sleeps through
`next_awake`: nothing spins.

A line longer than `max_line_bytes` becomes a dead letter without being parsed; reading it holds
at most the limit plus one 1 MiB chunk in memory, whatever its length.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from dataflows.events import DeadLetter, Event, LineRef
from dataflows.parse import MAX_LINE_BYTES, RAW_EXCERPT_CHARS, oversized, parse_line
from dataflows.sequencing import DONE, BlockStamper, Progress, ReplayLayout, Stamped

Item = Stamped | DeadLetter | Progress
Parser = Callable[[bytes, LineRef], Event | DeadLetter]
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


class ReplaySource(FixedPartitionedSource[Item, PartitionState]):
    """A JSONL file replayed against `clock`, split over `layout.partitions` partitions."""

    def __init__(
        self,
        path: Path,
        *,
        layout: ReplayLayout,
        clock: ReplayClock,
        parse: Parser | None = None,
        batch_size: int = 1000,
        tick_seconds: float = 0.25,
        max_line_bytes: int = MAX_LINE_BYTES,
        wall: Callable[[], float] = time.time,
    ) -> None:
        """`parse` reads one line (default `parse_line` with `max_line_bytes`); longer lines never reach it."""
        if max_line_bytes < 1:
            msg = f"max_line_bytes must be >= 1, got {max_line_bytes}"
            raise ValueError(msg)
        self.path = path
        self.layout = layout
        self.clock = clock
        self.parse: Parser = parse or functools.partial(parse_line, max_bytes=max_line_bytes)
        self.batch_size = batch_size
        self.tick_seconds = tick_seconds
        self.max_line_bytes = max_line_bytes
        self.wall = wall

    def list_parts(self) -> list[str]:
        return [f"{self.path.name}#{p}" for p in range(self.layout.partitions)]

    def build_part(self, step_id: str, for_part: str, resume_state: PartitionState | None) -> ReplayPartition:
        partition = int(for_part.rsplit("#", 1)[1])
        return ReplayPartition(self, partition, resume_state)


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
        self.stamper = BlockStamper(self.block)
        self.stamper.latest = resume.latest
        # A resumed replay goes on from where it was, not from the file's first event time.
        self.clock = source.clock if resume.latest is None else replace(source.clock, event_origin=resume.latest)
        self.counted = (0, 0) if resume.line == 0 else (resume.offset, resume.line - 1)
        self.finished: list[tuple[int, float | None]] = []
        self.peeked: tuple[Event | DeadLetter, int] | None = None
        self.waiting_since: float | None = None
        self.done = False
        self.buffer = b""
        self.buffer_start = 0
        self.line_end = 0  # the end of the last line skipped past its block's end (see `_align`)
        if self.line:
            self._load_block()

    def next_batch(self) -> list[Item]:
        if self.done:
            raise StopIteration
        now = self.src.wall()
        batch: list[Item] = []
        self.waiting_since = None
        while len(batch) < self.src.batch_size:
            peeked = self._peek()
            if peeked is None:
                self.done = True
                break
            item, end = peeked
            if isinstance(item, Event) and item.time is not None and self.clock.wall_time_for(item.time) > now:
                self.waiting_since = now
                break
            batch.append(self.stamper.stamp(item))
            self.offset = end
            self.line += 1
            self.peeked = None
        batch.append(self._progress(now))
        return batch

    def next_awake(self) -> datetime | None:
        if self.waiting_since is None or self.peeked is None:
            return None
        item = self.peeked[0]
        assert isinstance(item, Event) and item.time is not None
        due = min(self.clock.wall_time_for(item.time), self.waiting_since + self.src.tick_seconds)
        return datetime.fromtimestamp(due, timezone.utc)

    def snapshot(self) -> PartitionState:
        return PartitionState(self.block, self.offset, self.line, self.stamper.latest)

    def close(self) -> None:
        self.file.close()

    def _progress(self, now: float) -> Progress:
        finished, self.finished = tuple(self.finished), []
        if self.done:
            return Progress(self.partition, DONE, finished)
        clock = self.clock.event_time_at(now) if self.waiting_since is not None else None
        return Progress(self.partition, self.offset, finished, clock)

    def _peek(self) -> tuple[Event | DeadLetter, int] | None:
        """The next line of this partition, parsed, with the offset after it (None at the end)."""
        layout = self.src.layout
        while self.peeked is None:
            block_end = layout.block_start(self.block + 1)
            if self.offset >= block_end or self.offset >= self.size:
                if self.line:
                    self.counted = (self.offset, self.line - 1)
                self.finished.append(self.stamper.finish())
                self.block += layout.partitions
                self.offset = layout.block_start(self.block)
                self.line = 0
                self.stamper = BlockStamper(self.block)
                if self.offset >= self.size:
                    return None
                continue
            if self.line == 0:
                self._align()
                self._load_block()
                continue
            self.peeked = self._read_line()
        return self.peeked

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
        """Read the complete lines of the current block from `offset` on in one call."""
        self.file.seek(self.offset)
        data = self.file.read(max(0, self.src.layout.block_start(self.block + 1) - self.offset))
        self.buffer = data[: data.rfind(b"\n") + 1]
        self.buffer_start = self.offset

    def _read_line(self) -> tuple[Event | DeadLetter, int]:
        ref = LineRef(self.src.path.name, self.line, self.offset)
        at = self.offset - self.buffer_start
        if at < len(self.buffer):
            newline = self.buffer.index(b"\n", at)
            end = self.offset + newline - at + 1
            limit = self.src.max_line_bytes
            if newline - at > limit:
                return oversized(self.buffer[at : min(newline, at + RAW_EXCERPT_CHARS)], newline - at, limit, ref), end
            return self._parse(self.buffer[at:newline], ref), end
        return self._read_line_past_block(ref)

    def _parse(self, body: bytes, ref: LineRef) -> Event | DeadLetter:
        body = body.rstrip(b"\r")
        if not body.strip():
            return DeadLetter(ref, "", "empty line")
        return self.src.parse(body, ref)

    def _read_line_past_block(self, ref: LineRef) -> tuple[Event | DeadLetter, int]:
        """A line that starts in this block and ends after it (or at a file without final newline)."""
        limit = self.src.max_line_bytes
        self.file.seek(self.offset)
        raw = self.file.readline(limit + 1)
        if len(raw) > limit and not raw.endswith(b"\n"):
            skipped, newline = _skip_line(self.file)
            self.line_end = self.file.tell()
            return oversized(raw, len(raw) + skipped - newline, limit, ref), self.line_end
        return self._parse(raw.rstrip(b"\n"), ref), self.offset + len(raw)
