"""What a live view reads while a run goes on: line counts of the outputs and shard gauges.

Both work across processes through files, so the view needs no channel into the workers.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import orjson
from bytewax.outputs import FixedPartitionedSink, StatefulSinkPartition


class GaugeSink(FixedPartitionedSink[dict[str, Any], None]):
    """Keeps the latest gauge of every shard and writes their sums to a JSON file."""

    def __init__(self, path: Path, min_interval: float = 0.2) -> None:
        self.path = path
        self.min_interval = min_interval

    def list_parts(self) -> list[str]:
        return ["gauges"]

    def build_part(self, step_id: str, for_part: str, resume_state: None) -> _GaugePartition:
        return _GaugePartition(self.path, self.min_interval)


class _GaugePartition(StatefulSinkPartition[dict[str, Any], None]):
    def __init__(self, path: Path, min_interval: float) -> None:
        self.path = path
        self.min_interval = min_interval
        self.latest: dict[str, dict[str, Any]] = {}
        self.written_at = 0.0

    def write_batch(self, values: list[dict[str, Any]]) -> None:
        for value in values:
            self.latest[value["shard"]] = value
        if time.monotonic() - self.written_at >= self.min_interval:
            self._write()

    def _write(self) -> None:
        totals = {
            "open_windows": sum(g["open_windows"] for g in self.latest.values()),
            "buffered": sum(g["buffered"] for g in self.latest.values()),
        }
        tmp = self.path.with_suffix(".tmp")
        tmp.write_bytes(orjson.dumps(totals))
        os.replace(tmp, self.path)
        self.written_at = time.monotonic()

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._write()


def read_gauges(path: Path) -> dict[str, int]:
    """The latest gauge totals, or zeros before the first write."""
    try:
        return orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {"open_windows": 0, "buffered": 0}


class FileTail:
    """The complete lines appended to a growing file since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0

    def new_lines(self) -> bytes:
        """Whole lines written since last time (a partly written last line waits for the next call)."""
        try:
            with self.path.open("rb") as f:
                f.seek(self.offset)
                chunk = f.read()
        except FileNotFoundError:
            return b""
        complete = chunk.rfind(b"\n") + 1
        self.offset += complete
        return chunk[:complete]


class LineCounter:
    """Counts the lines of a growing file, reading only what was appended since last time."""

    def __init__(self, path: Path) -> None:
        self.tail = FileTail(path)
        self.lines = 0

    def count(self) -> int:
        self.lines += self.tail.new_lines().count(b"\n")
        return self.lines


class FieldTally:
    """Counts the values of one field in the lines appended to a JSONL file (e.g. alerts by pattern)."""

    def __init__(self, path: Path, field: str) -> None:
        self.tail = FileTail(path)
        self.field = field
        self.counts: dict[str, int] = {}

    def tally(self) -> dict[str, int]:
        for line in self.tail.new_lines().splitlines():
            value = str(orjson.loads(line).get(self.field))
            self.counts[value] = self.counts.get(value, 0) + 1
        return self.counts
