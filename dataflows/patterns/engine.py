"""Match declarative patterns over one shard's events, in event-time order, with absences.

A `PatternBook` holds the patterns of one key kind for the keys of one shard. Events come in
(in file order, timed by the replay clock) and wait in a buffer until the watermark
(`clock - out_of_orderness`) passes them; they are then matched in event-time order, so any
arrival order within the bound gives the same alerts. An event behind the watermark cannot be
placed in that order: it is skipped by the matchers and counted (it is still a message and in
its window or the late output).

Matching uses relaxed contiguity (Flink CEP's `followedBy`): events that fit no step are passed
over. A completed match alerts at once, or, with an absence, waits until the watermark passes
its deadline with nothing matching the absence predicate; at end of input a waiting absence
fires (the silence is final). State is bounded: partial matches expire with their pattern's
time bounds, and a key's state is dropped once it has nothing pending and has been quiet for
the pattern's horizon (so "first event of a key" means first within that horizon).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from dataflows.events import Event, iso
from dataflows.patterns.definitions import CompiledPredicate, PatternDef, key_of

TEXT_EXCERPT_CHARS = 80
SWEEP_EVERY_SECONDS = 300.0


@dataclass(frozen=True, slots=True)
class Alert:
    """One match of one pattern for one key."""

    pattern: str
    key: str
    severity: str
    detected_at: float
    events: tuple[Event, ...]
    summary: str

    def as_record(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "key": self.key,
            "severity": self.severity,
            "detected_at": iso(self.detected_at),
            "session_id": self.events[-1].session_id,
            "summary": self.summary,
            "events": [
                {"event_id": e.event_id, "timestamp": e.timestamp, "sender": e.sender, "kind": e.kind,
                 "text": e.text[:TEXT_EXCERPT_CHARS]}
                for e in self.events
            ],
        }


@dataclass(frozen=True, slots=True)
class _Partial:
    """A match in progress: at step `step`, which has taken `count` events so far."""

    step: int
    count: int
    events: tuple[Event, ...]
    bound: dict[str, Event]

    @property
    def first_time(self) -> float:
        return self.events[0].time or 0.0

    @property
    def last_time(self) -> float:
        return self.events[-1].time or 0.0

    def take(self, event: Event, step: int, name: str) -> _Partial:
        count = self.count + 1 if step == self.step else 1
        return _Partial(step, count, (*self.events, event), {**self.bound, name: event})


@dataclass
class _Waiting:
    """A completed match waiting for its absence to hold until `deadline`."""

    deadline: float
    match: _Partial
    cancelled: bool = False


@dataclass
class _KeyState:
    last_seen: float
    partials: list[_Partial] = field(default_factory=list)
    waiting: list[_Waiting] = field(default_factory=list)
    muted_until: float = -math.inf


@dataclass
class PatternBook:
    """The patterns of one key kind over one shard's events."""

    patterns: tuple[PatternDef, ...]
    out_of_orderness: float
    user_shapes: frozenset[str] = frozenset({"conversation", "chat"})
    watermark: float = -math.inf
    arrival_mark: float = -math.inf
    buffer: list[tuple[float, int, Event]] = field(default_factory=list)
    keys: dict[tuple[int, str], _KeyState] = field(default_factory=dict)
    seen: dict[tuple[int, str], float] = field(default_factory=dict)
    deadlines: list[tuple[float, int, int, str]] = field(default_factory=list)
    released: tuple[float, int] = (-math.inf, -1)
    skipped_late: int = 0
    swept_at: float = -math.inf
    _sequence: int = 0
    _remember_keys: tuple[bool, ...] = ()
    _steps: tuple[tuple[CompiledPredicate, ...], ...] = ()
    _bounds: tuple[tuple[_StepBounds, ...], ...] = ()
    _absences: tuple[CompiledPredicate | None, ...] = ()

    def __post_init__(self) -> None:
        self._remember_keys = tuple(p.uses_first_of_key for p in self.patterns)
        self._steps = tuple(tuple(step.where.compile() for step in p.steps) for p in self.patterns)
        self._bounds = tuple(
            tuple(_StepBounds(s.name, s.min_count, s.max_count, s.within_seconds) for s in p.steps)
            for p in self.patterns
        )
        self._absences = tuple(p.absence.not_followed_by.compile() if p.absence else None for p in self.patterns)

    def add(self, event: Event, clock: float | None) -> None:
        """Take a timed event that arrived at `clock`; it is matched once the watermark passes it.

        It is late, and skipped, when it is behind the watermark it arrived at: judged by the clock
        at arrival (a function of the input), the same however events are batched into `advance`.
        """
        assert event.time is not None, "events are timed before pattern matching"
        if clock is not None and clock - self.out_of_orderness > self.arrival_mark:
            self.arrival_mark = clock - self.out_of_orderness
        if event.time < self.arrival_mark or (event.time, event.offset) < self.released:
            self.skipped_late += 1
            return
        heapq.heappush(self.buffer, (event.time, event.offset, event))

    def advance(self, now: float | None) -> list[Alert]:
        """Move the watermark to `now - out_of_orderness`; match what it passed, fire due absences."""
        if now is None or now - self.out_of_orderness <= self.watermark:
            return []
        self.watermark = now - self.out_of_orderness
        alerts: list[Alert] = []
        while self.buffer and self.buffer[0][0] <= self.watermark:
            self._release(heapq.heappop(self.buffer), alerts)
        self._fire(self.watermark, alerts, inclusive=False)
        if self.watermark - self.swept_at >= SWEEP_EVERY_SECONDS:
            self._sweep()
        return alerts

    def flush(self) -> list[Alert]:
        """End of input: match every buffered event, then fire every waiting absence."""
        alerts: list[Alert] = []
        while self.buffer:
            self._release(heapq.heappop(self.buffer), alerts)
        self._fire(math.inf, alerts, inclusive=True)
        self.keys.clear()
        self.seen.clear()
        return alerts

    @property
    def open_keys(self) -> int:
        return len(self.keys) + len(self.seen)

    def _release(self, entry: tuple[float, int, Event], alerts: list[Alert]) -> None:
        time, offset, event = entry
        if self.deadlines and self.deadlines[0][0] < time:
            self._fire(time, alerts, inclusive=False)
        self.released = (time, offset)
        user_scope = event.shape in self.user_shapes
        user_key = None
        for index, pattern in enumerate(self.patterns):
            if not pattern.enabled:
                continue
            if pattern.key == "session":
                key = event.session_id
            elif not user_scope:
                continue
            else:
                key = user_key = user_key or key_of(event, "user")
            slot = (index, key)
            state = self.keys.get(slot)
            first = state is None and slot not in self.seen
            starts = self._steps[index][0](event, None, first)
            if state is None:
                if not starts:
                    if self._remember_keys[index]:
                        self.seen[slot] = time
                    continue
                self.seen.pop(slot, None)
                state = _KeyState(last_seen=time)
            self._match(index, pattern, key, state, first, starts, event, alerts)

    def _match(self, index: int, pattern: PatternDef, key: str, state: _KeyState, first: bool, starts: bool,
               event: Event, alerts: list[Alert]) -> None:
        """Feed `event` to the key's partial matches and waiting absences.

        `first`: the key is new; `starts`: the event fits the first step (already tested by the caller).
        """
        time = event.time or 0.0
        steps = self._steps[index]
        self.keys[(index, key)] = state
        state.last_seen = time
        absence = self._absences[index]
        if absence is not None and state.waiting:
            for waiting in state.waiting:
                if time <= waiting.deadline and absence(event, waiting.match.bound):
                    waiting.cancelled = True
            state.waiting = [w for w in state.waiting if not w.cancelled]

        bounds = self._bounds[index]
        within = pattern.within_seconds
        survivors: list[_Partial] = []
        completed: list[_Partial] = []
        for partial in state.partials:
            if within is not None and time - partial.first_time > within:
                continue
            taken = _take(bounds, steps, partial, event, first)
            if taken is None:
                if not _stalled(bounds, partial, time):
                    survivors.append(partial)
            elif _complete(bounds, taken):
                completed.append(taken)
            else:
                survivors.append(taken)
        if starts:
            if pattern.emit == "once_per_burst" and time <= state.muted_until:
                state.muted_until = time + (within or 0.0)
            else:
                started = _Partial(0, 0, (), {}).take(event, 0, bounds[0].name)
                (completed if _complete(bounds, started) else survivors).append(started)
        state.partials = survivors
        if completed:
            self._completed(index, pattern, key, state, completed[0], alerts)
        if not state.partials and not state.waiting and state.muted_until < time:
            del self.keys[(index, key)]
            if self._remember_keys[index]:
                self.seen[(index, key)] = time

    def _completed(self, index: int, pattern: PatternDef, key: str, state: _KeyState, match: _Partial,
                   alerts: list[Alert]) -> None:
        state.partials = []
        if pattern.emit == "once_per_burst":
            state.muted_until = match.last_time + (pattern.within_seconds or 0.0)
        if pattern.absence is None:
            alerts.append(_alert(pattern, key, match.last_time, match))
            return
        deadline = match.last_time + pattern.absence.seconds
        state.waiting.append(_Waiting(deadline, match))
        self._sequence += 1
        heapq.heappush(self.deadlines, (deadline, self._sequence, index, key))

    def _fire(self, until: float, alerts: list[Alert], *, inclusive: bool) -> None:
        """Fire waiting absences whose deadline is before `until` (at or before, if inclusive)."""
        while self.deadlines and (self.deadlines[0][0] <= until if inclusive else self.deadlines[0][0] < until):
            deadline, _, index, key = heapq.heappop(self.deadlines)
            state = self.keys.get((index, key))
            if state is None:
                continue
            keep: list[_Waiting] = []
            for waiting in state.waiting:
                if waiting.deadline != deadline:
                    keep.append(waiting)
                elif not waiting.cancelled:
                    alerts.append(_alert(self.patterns[index], key, deadline, waiting.match))
            state.waiting = keep

    def _sweep(self) -> None:
        """Expire partial matches the watermark has outrun; drop keys left with nothing, quiet for a horizon."""
        self.swept_at = mark = self.watermark
        for slot, last_seen in list(self.seen.items()):
            if mark - last_seen > self.patterns[slot[0]].max_horizon_seconds:
                del self.seen[slot]
        for (index, key), state in list(self.keys.items()):
            pattern = self.patterns[index]
            within = pattern.within_seconds
            bounds = self._bounds[index]
            state.partials = [
                p for p in state.partials
                if not (within is not None and mark - p.first_time > within) and not _stalled(bounds, p, mark)
            ]
            idle = not state.partials and not state.waiting and state.muted_until < mark
            if idle and mark - state.last_seen > pattern.max_horizon_seconds:
                del self.keys[(index, key)]


class _StepBounds(NamedTuple):
    """A step's name and counts and its gap bound, read once from the definition (hot path)."""

    name: str
    min_count: int
    max_count: int | None
    within: float | None


def _take(
    bounds: tuple[_StepBounds, ...], steps: tuple[CompiledPredicate, ...], partial: _Partial, event: Event,
    first: bool,
) -> _Partial | None:
    """The partial extended by `event` (into the next step, else the current one), or None."""
    time = event.time or 0.0
    step = bounds[partial.step]
    if partial.count >= step.min_count and partial.step + 1 < len(bounds):
        nxt = bounds[partial.step + 1]
        in_time = nxt.within is None or time - partial.last_time <= nxt.within
        if in_time and steps[partial.step + 1](event, partial.bound, first):
            return partial.take(event, partial.step + 1, nxt.name)
    room = step.max_count is None or partial.count < step.max_count
    if room and steps[partial.step](event, partial.bound, first):
        return partial.take(event, partial.step, step.name)
    return None


def _complete(bounds: tuple[_StepBounds, ...], partial: _Partial) -> bool:
    return partial.step == len(bounds) - 1 and partial.count >= bounds[-1].min_count


def _stalled(bounds: tuple[_StepBounds, ...], partial: _Partial, time: float) -> bool:
    """Whether the partial can never advance: its step is full and the next step's gap has passed."""
    step = bounds[partial.step]
    if partial.step + 1 >= len(bounds) or step.max_count is None or partial.count < step.max_count:
        return False
    gap = bounds[partial.step + 1].within
    return gap is not None and time - partial.last_time > gap


def _alert(pattern: PatternDef, key: str, detected_at: float, match: _Partial) -> Alert:
    return Alert(pattern.id, key, pattern.severity, detected_at, match.events, pattern.summarize(key, match.events))


def patterns_keyed_by(patterns: Iterable[PatternDef], key: str) -> tuple[PatternDef, ...]:
    """The enabled patterns keyed by `key` ("user" or "session")."""
    return tuple(p for p in patterns if p.enabled and p.key == key)

