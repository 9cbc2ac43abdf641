"""The conversation-window dataflow: replayed events → file order → session windows → outputs.

Built by `build_flow(source, outputs, config)`; the CLI passes real connectors, tests pass
`bytewax.testing` ones. The source emits `Stamped` events, `DeadLetter`s and markers: a replay
partition's `Progress` (see `dataflows.sequencing`) or, with `FlowConfig.live`, a live (Kafka)
partition's `LiveMark` (see `dataflows.live`). Each output receives `(kind, payload)` pairs,
`kind` being one of `OutputKind` and `payload` what the output's encoder made of a batch of
JSON-ready dicts.

Sessions are hashed onto a fixed number of shards (not onto workers), so the assignment of a
session, and so every result, is the same whatever the number of workers and processes. Chat users
are hashed onto the same shards, for the patterns keyed by user (see `_router`).
"""

from __future__ import annotations

import math
import pickle
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol, cast

import bytewax.operators as op
import polars as pl
from bytewax.dataflow import Dataflow
from bytewax.inputs import Source
from bytewax.operators import StatefulBatchLogic
from bytewax.outputs import Sink

from dataflows.event_frame import RECORD_FIELDS, timed
from dataflows.events import DeadLetter, Event
from dataflows.patterns.definitions import KeyKind, PatternDef, key_of
from dataflows.patterns.alerts import Alert
from dataflows.patterns.engine import PatternBook, patterns_keyed_by
from dataflows.judging import judged, pattern_roles
from dataflows.live import LiveMerger
from dataflows.records import Record, Records, as_records
from dataflows.rules import Rule
from dataflows.rules_gate import RuleGate, RulesBatch, RulesItem, RulesMark
from dataflows.sequencing import (
    LiveMark, Marker, Progress, ReplayLayout, Scope, Sequencer, Stamped, Wire, from_wire, later, stamped_frame, to_wire,
)
from dataflows.small_frames import only, rows_where, with_series
from dataflows.window_frames import FrameWindows
from dataflows.windows import WindowConfig

SourceItem = pl.DataFrame | Stamped | DeadLetter | Marker
"""What a flow's source emits (see the module docstring): events as a frame (`STAMPED_SCHEMA`)
or one by one, dead letters and markers."""
RulesSourceItem = RulesItem | DeadLetter
"""What a rules source emits: rules, its clock (`RulesMark`) and rejected rules."""
Encoder = Callable[[str, Records], Any]
"""Turns a batch of records of one kind (`kind`, `records`) into the payload a sink writes."""


def as_list(kind: str, records: Records) -> list[Record]:
    """The default encoder: a batch as a list of dicts (tests, and sinks that want rows)."""
    return as_records(records)


def as_given(kind: str, records: Records) -> Records:
    """An encoder for sinks that take frames as they come (the lake makes Arrow columns of them)."""
    return records


class OutputKind(StrEnum):
    """The flow's outputs; each is one file (`<kind>.jsonl`), topic or table downstream."""

    MESSAGES = "messages"
    WINDOWS = "windows"
    LATE = "late"
    DEAD_LETTER = "dead_letter"
    ALERTS = "alerts"
    MODERATED = "moderated"


GAUGE = "gauge"
WATERMARK_GAUGE_STEP = 1.0
"""A shard reports its watermark (event time) when it has moved on by this many seconds."""


@dataclass(frozen=True)
class FlowConfig:
    """Everything the flow's logic needs.

    `layout.partitions` is the number of source partitions (replay partitions, or Kafka
    partitions when `live`); `time_origin` times untimed replayed events seen before any timed one.
    """

    window: WindowConfig = WindowConfig()
    layout: ReplayLayout = ReplayLayout()
    time_origin: float = 0.0
    shards: int = 8
    patterns: tuple[PatternDef, ...] = ()
    live: bool = False
    rules: bool = False
    """Whether a rules stream is joined: messages are then judged by it and wait for its clock."""
    snapshots: bool = True
    """Whether shards snapshot their state (for recovery). Bytewax asks for a snapshot every epoch
    even without recovery, and pickling a shard's buffered events takes milliseconds: a paced run
    stalls on it. Without, a snapshot is empty."""
    rule_pattern_keys: frozenset[KeyKind] = frozenset({"session", "user"})
    """The keys of the patterns the rules stream may define: any, unless its content is known
    (a rules file: `RulesFileSource.pattern_keys`). Without user-keyed ones, chat events are not
    sent to their users' shards."""

    def __post_init__(self) -> None:
        if self.shards < 1:
            msg = f"shards must be >= 1, got {self.shards}"
            raise ValueError(msg)


def shard_of(value: str, shards: int) -> str:
    """The shard key of a session (or user): stable across processes (unlike `hash`)."""
    return shard_of_index(zlib.crc32(value.encode()) % shards)


def shard_of_index(index: int) -> str:
    return f"shard-{index:03d}"


def shards_of(values: pl.Series, shards: int) -> pl.Series:
    """`shard_of` of every value, computed once per distinct value."""
    distinct = values.unique()
    keys = [shard_of(value, shards) for value in distinct.to_list()]
    return values.replace_strict(distinct, pl.Series(keys, dtype=pl.String), return_dtype=pl.String)


def routed_frame(events: pl.DataFrame, shards: int, by_user: bool) -> pl.DataFrame:
    """`events` (`STAMPED_SCHEMA`) with the `scope` and `shard` of each row (`ROUTED_SCHEMA`, then
    `shard`), as `chat_shards` gives them: a chat event whose user hashes to another shard than its
    room, when user-keyed patterns may run, is there twice."""
    home = shards_of(events["session_id"], shards)
    routed = events.with_columns(pl.lit("all").alias("scope"), home.alias("shard"))
    if not by_user or events.is_empty():
        return routed
    users = events.select(pl.coalesce("username", pl.concat_str("session_id", pl.lit("/"), "sender"))).to_series()
    away = shards_of(users, shards)
    split = (events["shape"] == "chat") & (away != home) & (users != events["session_id"])
    if not split.any():
        return routed
    parted = routed.filter(split)
    return pl.concat([
        routed.filter(~split),
        parted.with_columns(pl.lit("session").alias("scope")),
        parted.with_columns(away.filter(split).alias("shard"), pl.lit("user").alias("scope")),
    ])


def chat_shards(event: Event, shards: int) -> tuple[tuple[str, Scope], ...]:
    """Where a chat event goes when user-keyed patterns may run: its room's shard for everything,
    or, when its user hashes to another shard, its room's for the session's part and its user's
    for the user's patterns."""
    home = shard_of(event.session_id, shards)
    user = key_of(event, "user")
    away = home if user == event.session_id else shard_of(user, shards)
    return ((home, "all"),) if away == home else ((home, "session"), (away, "user"))


@dataclass
class ShardState:
    """What one shard keeps: its reorder buffer, open windows and pattern state."""

    sequencer: Sequencer | LiveMerger
    windows: FrameWindows
    patterns: PatternBook | None
    gate: RuleGate | None = None


ShardBatch = list[Wire | pl.DataFrame] | RulesBatch
"""What a shard receives: its share of a source batch (event frames of `ROUTED_SCHEMA` and marker
wires), or its rules."""


class ShardLogic(StatefulBatchLogic[ShardBatch, tuple[str, Any], bytes]):
    """Releases a shard's events (in file order, or a live input's arrival order), times untimed
    ones, judges them by the rules stream, windows them and matches patterns.

    For the events of its sessions (scope `all` or `session`) a shard emits `messages` for every
    event the rules let through (with `moderation` when there is a rules stream), `moderated` for
    those they block, `late` for events whose window was already emitted, `windows` as the
    watermark passes them and `alerts` of session-keyed patterns; events of its users (scope `all`
    or `user`) meet the user-keyed patterns. It emits `gauge`s (open windows, rule-set version,
    watermark) when they change. Never discarded: the sequencer must keep hearing every partition's markers. Its
    snapshot is the pickled state (one `pickle.dumps` is far cheaper than a `deepcopy`), or nothing
    when the run keeps no snapshots (`FlowConfig.snapshots`)."""

    def __init__(self, config: FlowConfig, resume: bytes | None) -> None:
        self.config = config
        if resume is not None:
            self.state = pickle.loads(resume)
        else:
            patterns = tuple(p for p in config.patterns if p.enabled)
            self.state = ShardState(
                LiveMerger(config.layout.partitions) if config.live else Sequencer(config.layout),
                FrameWindows(config.window),
                PatternBook(patterns, config.window.out_of_orderness)
                if patterns or (config.rules and config.rule_pattern_keys) else None,
                RuleGate() if config.rules else None,
            )
        self.reported_open = -1
        self.reported_rules = (-1, -1)
        self.reported_watermark = -math.inf

    def on_batch(self, values: list[ShardBatch]) -> tuple[list[tuple[str, Any]], bool]:
        seq, gate = self.state.sequencer, self.state.gate
        for wires in values:
            if isinstance(wires, RulesBatch):
                assert gate is not None, "rules reach shards only of a flow with a rules stream"
                gate.take(wires)
            else:
                seq.push(w if isinstance(w, pl.DataFrame) else from_wire(w) for w in wires)
        out = _Outputs()
        clock = self._process(self._released(final=False), out, final=False)
        floor = later(clock, seq.clock_floor())
        self._advance(floor if gate is None else gate.cap(floor), out)
        return self._batches(out), StatefulBatchLogic.RETAIN

    def on_eof(self) -> tuple[list[tuple[str, Any]], bool]:
        out = _Outputs()
        self._process(self._released(final=True), out, final=True)
        out.windows += self.state.windows.flush()
        if self.state.patterns is not None:
            gate = self.state.gate
            out.alerts.extend(self.state.patterns.flush(gate.book if gate is not None else None))
        return self._batches(out), StatefulBatchLogic.RETAIN

    def snapshot(self) -> bytes:
        return pickle.dumps(self.state, protocol=pickle.HIGHEST_PROTOCOL) if self.config.snapshots else b""

    def _released(self, *, final: bool) -> pl.DataFrame:
        """The events the sequencer lets go, in order, timed (`RELEASED_SCHEMA`)."""
        seq = self.state.sequencer
        return timed(seq.release_all() if final else seq.release(), self.config.time_origin)

    def _process(self, released: pl.DataFrame, out: _Outputs, *, final: bool) -> float | None:
        """Judge, window and match the released events; return the clock after the last one."""
        gate = self.state.gate
        if gate is None:
            return self._columns(released, out)
        return self._judged(gate.release_all(released) if final else gate.admit(released), out)

    def _columns(self, released: pl.DataFrame, out: _Outputs) -> float | None:
        """Without a rules stream: window every event of the shard's sessions, column-wise."""
        if released.is_empty():
            return None
        if self.state.patterns is not None:
            self.state.patterns.add_frame(released)
        own = (released["scope"] != "user").to_numpy()
        if own.all():
            out.late.extend(self.state.windows.add(released))
        else:
            out.late.extend(self.state.windows.add(with_series(released, pl.Series("windowed", own))))
        out.frames.append(only(rows_where(released, own), RECORD_FIELDS))
        return self.state.sequencer.clock_after(released)

    def _judged(self, admitted: pl.DataFrame | None, out: _Outputs) -> float | None:
        """With a rules stream: judge the admitted events, then window those it lets through.

        An event of scope `user` (its session is another shard's) is judged (its role and masked
        text reach the patterns) and matched only: its session's shard outputs it. A blocked event
        still moves the watermark, as every released event does.
        """
        if admitted is None or admitted.is_empty():
            return None
        gate = self.state.gate
        assert gate is not None
        frame = judged(gate.book, admitted)
        own, blocked = pl.col("scope") != "user", pl.col("action") == "block"
        out.moderated.append(frame.filter(blocked & own).select(*RECORD_FIELDS, "moderation"))
        out.frames.append(frame.filter(~blocked & own).select(*RECORD_FIELDS, "moderation"))
        if self.state.patterns is not None:
            self.state.patterns.add_frame(
                frame.filter(~blocked).with_columns(pattern_roles(pl.col("role")).alias("role")), gate.book
            )
        out.late.extend(self.state.windows.add(frame.with_columns((~blocked & own).alias("windowed"))))
        return self.state.sequencer.clock_after(admitted)

    def _advance(self, clock: float | None, out: _Outputs) -> None:
        out.windows += self.state.windows.advance(clock)
        if self.state.patterns is not None:
            out.alerts.extend(self.state.patterns.advance(clock, self.state.gate.book if self.state.gate else None))
        if self.state.gate is not None and clock is not None:
            window = self.config.window
            self.state.gate.prune(clock - window.out_of_orderness - window.size)

    def _switched_on(self, alerts: list[Alert]) -> list[Alert]:
        """Drop alerts of patterns that a `pattern:ID` feature flag turns off for their session."""
        gate = self.state.gate
        if gate is None or not alerts:
            return alerts
        kept = []
        for alert in alerts:
            last = alert.events[-1]
            flags = gate.book.flags_at(last.time or 0.0, room=last.session_id)
            if flags.get(f"pattern:{alert.pattern}", True):
                kept.append(alert)
        return kept

    def _batches(self, out: _Outputs) -> list[tuple[str, Any]]:
        batches: list[tuple[str, Any]] = []
        batches += [(OutputKind.MESSAGES, frame) for frame in out.frames if len(frame)]
        batches += [(OutputKind.WINDOWS, windows) for windows in out.windows if len(windows)]
        batches += [(OutputKind.MODERATED, frame) for frame in out.moderated if len(frame)]
        for kind, records in (
            (OutputKind.LATE, out.late),
            (OutputKind.ALERTS, [a.as_record() for a in self._switched_on(out.alerts)]),
        ):
            if records:
                batches.append((kind, records))
        count = self.state.windows.open_windows
        if count != self.reported_open:
            self.reported_open = count
            batches.append((GAUGE, {"open_windows": count, "buffered": self.state.sequencer.buffered}))
        watermark = self.state.windows.watermark
        if watermark - self.reported_watermark >= WATERMARK_GAUGE_STEP:
            self.reported_watermark = watermark
            batches.append((GAUGE, {"watermark": watermark}))
        gate = self.state.gate
        if gate is not None and (gate.book.version(), gate.book.stale) != self.reported_rules:
            self.reported_rules = (gate.book.version(), gate.book.stale)
            batches.append((GAUGE, {"rules_version": self.reported_rules[0], "rules_stale": self.reported_rules[1]}))
        return batches


@dataclass
class _Outputs:
    """What one call of a shard produced, by kind, before encoding."""

    frames: list[pl.DataFrame] = field(default_factory=list)
    """Messages as frames of their record fields (`RECORD_FIELDS`, then `moderation` when judged)."""
    windows: list[Records] = field(default_factory=list)
    """Batches of window records: frames, and dicts for windows closed event by event."""
    late: list[Record] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    moderated: list[pl.DataFrame] = field(default_factory=list)
    """Blocked messages, as frames like `frames`."""


def _by_user(config: FlowConfig) -> bool:
    """Whether chat events also go to their users' shards: some user-keyed pattern is given, or may
    arrive on the rules stream."""
    return (config.rules and "user" in config.rule_pattern_keys) or bool(patterns_keyed_by(config.patterns, "user"))


def _router(config: FlowConfig) -> Callable[[list[SourceItem | RulesSourceItem]], list[tuple[str, Any]]]:
    """Group a batch from the source by shard, one item per shard, in the source's order.

    Events go on as frames (`ROUTED_SCHEMA`, one per shard; single events are gathered into one).
    Each event goes to its session's shard. A conversation's user (`session/sender`) lives in one
    session, so its user-keyed patterns run there too; a chat user can be in many rooms, so when
    user-keyed patterns may run, a chat event whose user hashes to another shard than its session
    goes to both, scoped (`chat_shards`, `routed_frame`) so that each does its part. Markers go to every shard,
    after the events that preceded them; the batch's rules items go to every shard as one
    `RulesBatch` ahead of its events (a shard applies rules before it releases events: their order
    between does not count). Dead letters leave as one batch. Grouping cuts the items Bytewax moves per event, its main
    per-event cost.
    """
    shards = config.shards
    by_user = _by_user(config)
    every_shard = [shard_of_index(i) for i in range(shards)]

    def route(items: list[SourceItem | RulesSourceItem]) -> list[tuple[str, Any]]:
        groups: dict[str, list[Wire | pl.DataFrame]] = {}
        dead: list[Record] = []
        rules = RulesBatch()
        singles: list[Stamped] = []

        def add_frame(frame: pl.DataFrame) -> None:
            for (shard,), part in routed_frame(frame, shards, by_user).partition_by("shard", as_dict=True).items():
                groups.setdefault(str(shard), []).append(part)

        def add_singles() -> None:
            if singles:
                add_frame(stamped_frame(singles, scoped=False))
                singles.clear()

        for item in items:
            if isinstance(item, pl.DataFrame):
                add_frame(item)
            elif isinstance(item, Stamped):
                singles.append(item)
            elif isinstance(item, DeadLetter):
                dead.append(item.as_record())
            elif isinstance(item, RulesMark | Rule):
                rules.append(item)
            else:
                add_singles()
                wire = to_wire(item)
                for key in every_shard:
                    groups.setdefault(key, []).append(wire)
        add_singles()
        routed: list[tuple[str, Any]] = [(key, rules) for key in every_shard] if rules else []
        routed += groups.items()
        if dead:
            routed.append((OutputKind.DEAD_LETTER, dead))
        return routed

    return route


ENRICHMENT_FIELDS = frozenset({"user_context", "assistant", "translated", "translation", "language"})
"""The top-level fields a `Stage` may set or change. Their values come from outside the flow (the
lake's history, an LLM's answer), so a run resumed after a crash may give a replayed record other
values: they are not part of the record's identity (the lake's `record_hash` leaves them out)."""


class Stage(Protocol):
    """A step that enriches records on their way to the outputs, a batch at a time (e.g. LLM calls).

    Called on each worker with batches of `(kind, records)` (`Records`: dicts or a frame); returns
    them in the same order, records possibly enriched (only `ENRICHMENT_FIELDS`, added as the last
    fields), none dropped. Built in `connectors/` (it
    may do I/O); it must be picklable, so it opens its clients on first use in the worker.
    """

    name: str

    def __call__(self, batches: list[tuple[str, Records]]) -> list[tuple[str, Records]]: ...

    def close(self) -> None:
        """Release what the stage opened in this process (called once the flow has ended)."""


@dataclass(frozen=True)
class FlowOutput:
    """One destination of the flow's records: a sink and how it wants each batch of one kind.

    `encode` runs on the worker that made the batch, so encoded payloads (JSON bytes, say), not
    dicts, cross to the sink's worker. The sink receives `(kind, payload)`.
    """

    name: str
    sink: Sink[Any]
    encode: Encoder = as_list


def build_flow(
    source: Source[pl.DataFrame | DeadLetter | Progress] | Source[Stamped | DeadLetter | Progress]
    | Source[pl.DataFrame | DeadLetter | LiveMark] | Source[Stamped | DeadLetter | LiveMark],
    outputs: Sequence[FlowOutput],
    config: FlowConfig,
    *,
    gauges: Sink[tuple[str, Record]] | None = None,
    rules: Source[RulesSourceItem] | None = None,
    stages: Sequence[Stage] = (),
    flow_id: str = "convoflow",
) -> Dataflow:
    """Wire the pipeline: read → split dead letters → shard → sequence, judge, window, match → outputs.

    Every output receives `(kind, encode(records))`, one batch of records of one kind at a time
    (`kind` one of `OutputKind`, records JSON-ready dicts). `rules`, when given, is the rules
    stream joined to every message (see `dataflows.rules_gate`). `stages` run in order on every
    batch of records before the outputs (the LLM stage: `connectors.llm.stage`). `gauges`, when given, receives
    `(shard, {"shard", ...gauge values})` for live views.
    """
    flow = Dataflow(flow_id)
    items = op.input("read", flow, cast(Source[SourceItem | RulesSourceItem], source))
    if rules is not None:
        if not config.rules:
            msg = "a rules source needs FlowConfig(rules=True)"
            raise ValueError(msg)
        items = op.merge("with_rules", items, op.input("read_rules", flow, rules))
    routed = op.flat_map_batch("route_to_shards", items, _router(config))
    split = op.branch("split_dead_letters", routed, lambda kv: kv[0] == OutputKind.DEAD_LETTER)
    keyed = op.stateful_batch("sequence_and_window", split.falses, lambda r: ShardLogic(config, r))
    by_kind = op.branch("split_gauges", keyed, lambda kv: kv[1][0] == GAUGE)
    records = op.merge("records", split.trues, op.map("drop_shard_key", by_kind.falses, lambda kv: kv[1]))
    for stage in stages:
        records = op.flat_map_batch(f"stage_{stage.name}", records, stage)
    for output in outputs:
        encoded = op.map(f"encode_for_{output.name}", records, _encoding(output.encode))
        op.output(f"write_{output.name}", encoded, output.sink)
    if gauges is not None:
        op.output("gauges", op.map("gauge_by_shard", by_kind.trues, lambda kv: (kv[0], {"shard": kv[0], **kv[1][1]})), gauges)
    return flow


def _encoding(encode: Encoder) -> Callable[[tuple[str, Records]], tuple[str, Any]]:
    def apply(kind_records: tuple[str, Records]) -> tuple[str, Any]:
        return (kind_records[0], encode(*kind_records))

    return apply
