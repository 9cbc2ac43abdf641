"""What a live view reads while a run goes on: counts of every output and shard gauges.

Both work across processes through files, so the view needs no channel into the workers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

ALERTS = "alerts"
MESSAGES = "messages"
WINDOWS = "windows"
GAUGES_FILE = "gauges.json"
READ_KINDS = ("messages", "moderated", "dead_letter")
"""The outputs every line read ends in exactly one of: their counts sum to the lines read."""
SUMMED = ("open_windows", "buffered")
SAME_IN_EVERY_SHARD = ("rules_version", "rules_stale")
"""Gauges every shard reports alike (each holds every rule): the view shows the latest, not a sum."""
SLOWEST = ("watermark",)
"""Gauges of which the flow as a whole is at the least of its shards'."""
DEAD_LETTER = "dead_letter"
LLM_LATENCY_BUCKETS_MS = (50, 100, 250, 500, 1000, 2500, 5000, 10000, 30000)
FIGURES_PREFIX = "figures-"

import orjson
import polars as pl
from bytewax.outputs import DynamicSink, FixedPartitionedSink, StatefulSinkPartition, StatelessSinkPartition

from connectors.view.glimpses import Glimpse, glimpses_of, kept
from dataflows.records import as_records

if TYPE_CHECKING:
    from dataflows.records import Records


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
        self.latest: dict[str, dict[str, Any]] = {}  # shard -> its latest value of every gauge
        self.written_at = 0.0

    def write_batch(self, values: list[dict[str, Any]]) -> None:
        for value in values:
            self.latest.setdefault(value["shard"], {}).update(value)
        if time.monotonic() - self.written_at >= self.min_interval:
            self._write()

    def _write(self) -> None:
        gauges = self.latest.values()
        totals = {key: sum(g.get(key, 0) for g in gauges) for key in SUMMED}
        totals |= {key: max((g.get(key, 0) for g in gauges), default=0) for key in SAME_IN_EVERY_SHARD}
        for key in SLOWEST:
            reported = [g[key] for g in gauges if key in g]
            if reported:
                totals[key] = min(reported)
        _write_json(self.path, totals)
        self.written_at = time.monotonic()

    def snapshot(self) -> None:
        return None

    def close(self) -> None:
        self._write()


def read_gauges(path: Path) -> dict[str, int]:
    """The latest gauge totals, or zeros before the first write (`SLOWEST` ones absent until reported)."""
    try:
        return {key: 0 for key in (*SUMMED, *SAME_IN_EVERY_SHARD)} | orjson.loads(path.read_bytes())
    except (FileNotFoundError, orjson.JSONDecodeError):
        return {key: 0 for key in (*SUMMED, *SAME_IN_EVERY_SHARD)}


def tally_of(kind: str, records: Records) -> dict[str, int]:
    """What a batch adds to the run's counts: records of `kind`, alerts by pattern (`alerts:<id>`),
    judged messages by action (`mask`, `flag`; blocked ones are the `moderated` records), dead letters
    by step and kind of reason (`dead_letter:<step>:<reason>`) and the LLM stage's answers
    (`llm:<stage>:<status>`, with latency buckets `llm_ms:<stage>:<bound>` and sums `llm_ms:<stage>:sum`).

    The encoder of the `TallySink` output, so only these small dicts cross workers.
    """
    counts = {str(kind): len(records)}
    if kind == DEAD_LETTER:
        for record in as_records(records):
            key = f"{DEAD_LETTER}:{record.get('step')}:{reason_kind(str(record.get('reason', '')))}"
            counts[key] = counts.get(key, 0) + 1
        return counts
    llm_field = {WINDOWS: "assistant", MESSAGES: "translation"}.get(kind)
    if llm_field is not None and isinstance(records, pl.DataFrame) and llm_field in records.columns:
        for status, count in records[llm_field].struct.field("status").value_counts().iter_rows():
            counts[f"llm:{llm_field}:{status}"] = count
    elif llm_field is not None and not isinstance(records, pl.DataFrame) and records and llm_field in records[0]:
        _tally_llm(counts, llm_field, [r[llm_field] for r in records])
    if isinstance(records, pl.DataFrame):
        if kind == MESSAGES and "moderation" in records.columns:
            for text, count in records["moderation"].value_counts().iter_rows():
                action = orjson.loads(text)["action"]
                if action != "allow":
                    counts[action] = counts.get(action, 0) + count
        return counts
    if kind == ALERTS:
        for record in records:
            key = f"{ALERTS}:{record.get('pattern')}"
            counts[key] = counts.get(key, 0) + 1
    elif kind == MESSAGES and records and "moderation" in records[0]:
        for record in records:
            action = record["moderation"]["action"]
            if action != "allow":
                counts[action] = counts.get(action, 0) + 1
    return counts


def _tally_llm(counts: dict[str, int], stage: str, answers: list[dict[str, Any]]) -> None:
    for answer in answers:
        status = answer.get("status")
        key = f"llm:{stage}:{status}"
        counts[key] = counts.get(key, 0) + 1
        latency = answer.get("latency_ms")
        if status == "skipped" or latency is None:
            continue
        for bound in LLM_LATENCY_BUCKETS_MS:
            if latency <= bound:
                bucket = f"llm_ms:{stage}:{bound}"
                counts[bucket] = counts.get(bucket, 0) + 1
        counts[f"llm_ms:{stage}:count"] = counts.get(f"llm_ms:{stage}:count", 0) + 1
        counts[f"llm_ms:{stage}:sum"] = counts.get(f"llm_ms:{stage}:sum", 0) + int(latency)


_REASON_KINDS = (
    ("field '", None), ("timestamp", "timestamp"), ("line is", "too long"), ("expected a JSON object", "not an object"),
    ("empty", "empty"), ("Kafka error", "kafka error"), ("not valid UTF-8", "not utf-8"),
)


def reason_kind(reason: str) -> str:
    """A dead letter's reason, less what is particular to its line (a small set, fit for a metric label):
    `field <name>`, `timestamp`, `too long`, `invalid json`, ..., else the reason up to its first colon."""
    for start, kind in _REASON_KINDS:
        if reason.startswith(start):
            return kind if kind is not None else "field " + reason[len(start):].split("'", 1)[0]
    if "JSON" in reason:
        return "invalid json"
    return reason.split(":", 1)[0][:40]


Tallied = tuple[dict[str, int], list[Glimpse]]
"""What the tally output's encoder makes of a batch: its counts, and glimpses for the live view's panes."""


def tallied(kind: str, records: Records, *, glimpses: bool = False) -> Tallied:
    """The tally output's encoder: `tally_of` the batch, and (for a live view) `glimpses_of` it."""
    return tally_of(kind, records), glimpses_of(kind, records) if glimpses else []


class TallySink(DynamicSink[tuple[str, Tallied]]):
    """Sums every output batch's counts and keeps the latest glimpses; each worker writes its totals
    to `<folder>/tally-<worker>.json` and its glimpses to `<folder>/glimpse-<worker>.json`."""

    def __init__(self, folder: Path, min_interval: float = 0.2) -> None:
        self.folder = folder
        self.min_interval = min_interval

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _TallyPartition:
        return _TallyPartition(self.folder, worker_index, self.min_interval)


class _TallyPartition(StatelessSinkPartition[tuple[str, Tallied]]):
    def __init__(self, folder: Path, worker: int, min_interval: float) -> None:
        self.path = folder / f"tally-{worker}.json"
        self.glimpse_path = folder / f"glimpse-{worker}.json"
        self.min_interval = min_interval
        self.totals: dict[str, int] = {}
        self.panes: dict[str, list[Glimpse]] = {}
        self.changed_panes = False
        self.written_at = 0.0

    def write_batch(self, items: list[tuple[str, Tallied]]) -> None:
        for kind, (counts, glimpses) in items:
            for key, count in counts.items():
                self.totals[key] = self.totals.get(key, 0) + count
            if glimpses:
                self.panes[str(kind)] = kept(self.panes.get(str(kind), []), glimpses)
                self.changed_panes = True
        if time.monotonic() - self.written_at >= self.min_interval:
            self._write()

    def _write(self) -> None:
        _write_json(self.path, self.totals)
        if self.changed_panes:
            _write_json(self.glimpse_path, self.panes)
            self.changed_panes = False
        self.written_at = time.monotonic()

    def close(self) -> None:
        self._write()


def events_read(counts: Mapping[str, int]) -> int:
    """The lines read, from a run's counts (`read_tallies`)."""
    return sum(counts.get(kind, 0) for kind in READ_KINDS)


def read_tallies(folder: Path, workers: range | None = None) -> dict[str, int]:
    """The run's counts so far: the sum of every worker's tally file (of `workers`' only, if given)."""
    totals: dict[str, int] = {}
    paths = folder.glob("tally-*.json") if workers is None else (folder / f"tally-{w}.json" for w in workers)
    for path in paths:
        try:
            counts = orjson.loads(path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue
        for key, count in counts.items():
            totals[key] = totals.get(key, 0) + count
    return totals


@dataclass(frozen=True)
class FigureFile:
    """Figures one part of a running flow keeps for the metrics endpoint (a lake partition's
    commits, a Kafka partition's lag, a worker's LLM cache hits): `figures-<name>.json` in `folder`,
    replaced whole at each `write`."""

    folder: Path
    name: str

    def write(self, figures: Mapping[str, Any]) -> None:
        _write_json(self.folder / f"{FIGURES_PREFIX}{self.name}.json", dict(figures))


def read_figures(folder: Path, kind: str) -> list[dict[str, Any]]:
    """The figures of every part of `kind` (the first word of their names: `lake`, `kafka`, `llm`)."""
    found = []
    for path in sorted(folder.glob(f"{FIGURES_PREFIX}{kind}-*.json")):
        try:
            found.append(orjson.loads(path.read_bytes()))
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue
    return found


def _write_json(path: Path, value: dict[str, Any]) -> None:
    """Replace `path` atomically, so a reader never sees half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(value))
    os.replace(tmp, path)
