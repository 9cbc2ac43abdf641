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

Per event the work is kept to what the event can change. An event's kind, shape and whether its
sender is `rm` (its role) decide every static test of every predicate, so each such class of
event gets a route, built once: per pattern, the `ResidualTest` left of each step and of the absence.
An event then costs a state lookup per pattern, and tests only against the steps its key's
partial matches wait on; one that can start nothing, for a key with no state, costs nothing more.
Partial matches are plain tuples that keep each step's sender (the only thing later steps test).
"""

from __future__ import annotations

import heapq
import math
from bisect import bisect_right
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, TypeAlias

from dataflows.events import Event, iso
from dataflows.patterns.definitions import (
    CompiledPredicate,
    PatternDef,
    ResidualTest,
    ResolvedRole,
    Summarizer,
    iso_of,
    key_of,
    role_of,
)

TEXT_EXCERPT_CHARS = 80
SWEEP_EVERY_SECONDS = 300.0

Test: TypeAlias = "bool | ResidualTest"
"""A predicate for one class of event: decided (True, False), or the tests left to run per event."""
_Partial: TypeAlias = "tuple[int, int, float, float, tuple[Event, ...], tuple[str, ...]]"
"""A match in progress: (step, events its step took so far, first time, last time, events, senders).

`senders[i]` is the sender of the last event taken by step `i`.
"""
_Waiting: TypeAlias = "tuple[float, _Partial]"
"""A completed match waiting for its absence to hold until a deadline: (deadline, match)."""

_event_time = itemgetter(0)


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
        last = self.events[-1]
        return {
            "pattern": self.pattern,
            "key": self.key,
            "severity": self.severity,
            "detected_at": iso_of(last) if last.time == self.detected_at else iso(self.detected_at),
            "session_id": last.session_id,
            "summary": self.summary,
            "events": [
                {"event_id": e.event_id, "timestamp": e.timestamp, "sender": e.sender, "kind": e.kind,
                 "text": e.text[:TEXT_EXCERPT_CHARS]}
                for e in self.events
            ],
        }


class _KeyState:
    """One key's state for one pattern: its partial matches, matches waiting on an absence, mute."""

    __slots__ = ("last_seen", "partials", "waiting", "muted_until")

    def __init__(self, last_seen: float, partials: list[_Partial] | None = None) -> None:
        self.last_seen = last_seen
        self.partials: list[_Partial] = [] if partials is None else partials
        self.waiting: list[_Waiting] = []
        self.muted_until = -math.inf


_Route: TypeAlias = "tuple[_Matcher, bool, tuple[Test, ...], Test, bool, bool]"
"""How events of one class (kind, shape, sender is `rm`) meet one pattern:
(matcher, keyed by user, step tests, absence test, can start, touches).

`can start`: the first step may match, so a key with no state may get one. `touches`: some step
or the absence may match; otherwise the event only ages the key's state. A plain tuple, as the
hot loop unpacks one per event and pattern (a NamedTuple unpacks at half the speed).
"""


class _Matcher:
    """One pattern, compiled for the hot path, and its per-key state within one book.

    Step bounds are tuples indexed by step; an open-ended count or gap is infinite, so one
    comparison replaces a None test and a comparison.
    """

    __slots__ = ("pattern", "index", "by_user", "predicates", "absence", "refs", "mins", "maxs", "gaps", "last",
                 "within", "bounds", "once", "silence", "horizon", "summarize", "states", "seen")

    def __init__(self, pattern: PatternDef, index: int) -> None:
        steps = pattern.steps
        self.pattern = pattern
        self.index = index
        self.by_user = pattern.key == "user"
        self.predicates: tuple[CompiledPredicate, ...] = tuple(step.where.compile() for step in steps)
        self.absence = pattern.absence.not_followed_by.compile() if pattern.absence else None
        self.refs = {step.name: i for i, step in enumerate(steps)}
        self.mins = tuple(step.min_count for step in steps)
        self.maxs = tuple(math.inf if step.max_count is None else step.max_count for step in steps)
        self.gaps = tuple(math.inf if step.within_seconds is None else step.within_seconds for step in steps[1:])
        self.last = len(steps) - 1
        self.within = pattern.within_seconds
        self.bounds = (self.mins, self.maxs, self.gaps, self.last, self.within)
        self.once = pattern.emit == "once_per_burst"
        self.silence = pattern.absence.seconds if pattern.absence else None
        self.horizon = pattern.max_horizon_seconds
        self.summarize = Summarizer(pattern)
        self.states: dict[str, _KeyState] = {}
        self.seen: dict[str, float] | None = {} if pattern.uses_first_of_key else None

    def route(self, kind: str, role: ResolvedRole) -> _Route | None:
        """This pattern's tests for events of `kind` from `role`; None if such events cannot matter to it.

        An event no step or absence can take only ages its key's state: expires partial matches
        that could never complete anyway, and drops a key left with nothing pending. That changes
        no alert unless the pattern asks for a key's first event (a dropped key's next event is
        one) or mutes keys: a sweep drops a key quiet for a horizon, and an event the watermark
        had already passed when it arrived (within the bound, so still matched) may fall in the
        dropped key's mute. Otherwise the pattern need not see the event at all.
        """
        steps = tuple(p.residual(kind, role, self.refs) for p in self.predicates)
        absence = False if self.absence is None else self.absence.residual(kind, role, self.refs)
        touches = absence is not False or any(t is not False for t in steps)
        if not touches and self.seen is None and not self.once:
            return None
        return (self, self.by_user, steps, absence, steps[0] is not False, touches)

    def alive(self, partial: _Partial, time: float) -> bool:
        """Whether a partial match can still complete at `time`: within the pattern's bound, not stalled.

        Stalled: its step is full and the next step's gap has passed.
        """
        step, count, first_time, last_time = partial[0], partial[1], partial[2], partial[3]
        if self.within is not None and time - first_time > self.within:
            return False
        return not (step < self.last and count >= self.maxs[step] and time - last_time > self.gaps[step])

    def feed(self, book: PatternBook, key: str, state: _KeyState, event: Event, time: float, tests: Sequence[Test],
             absence: Test, starts: bool, alerts: list[Alert]) -> None:
        """Feed `event` to the key's waiting absences and partial matches; maybe start, complete, drop.

        `starts`: the event fits the first step (tested by the caller, which knows whether it is
        the key's first). A partial match takes the event into its next step if it can, else into
        its current one; the first match completed wins and clears the others.
        """
        state.last_seen = time
        if absence is not False and state.waiting:
            state.waiting = [
                w for w in state.waiting if time > w[0] or not (absence is True or absence(event, w[1][5], False))
            ]
        survivors: list[_Partial] = []
        completed: _Partial | None = None
        if state.partials:
            mins, maxs, gaps, last, within = self.bounds
            sender = event.sender
            for partial in state.partials:
                step, count, first_time, last_time, events, senders = partial
                if within is not None and time - first_time > within:
                    continue
                taken: _Partial | None = None
                if count >= mins[step] and step < last and time - last_time <= gaps[step]:
                    test = tests[step + 1]
                    if test is True or (test is not False and test(event, senders, False)):
                        taken = (step + 1, 1, first_time, time, events + (event,), senders + (sender,))
                if taken is None and count < maxs[step]:
                    test = tests[step]
                    if test is True or (test is not False and test(event, senders, False)):
                        taken = (step, count + 1, first_time, time, events + (event,), senders[:-1] + (sender,))
                if taken is None:
                    if not (step < last and count >= maxs[step] and time - last_time > gaps[step]):
                        survivors.append(partial)
                elif taken[0] == last and taken[1] >= mins[last]:
                    if completed is None:
                        completed = taken
                else:
                    survivors.append(taken)
        if starts:
            if self.once and time <= state.muted_until:
                state.muted_until = time + (self.within or 0.0)
            elif not self.last and self.mins[0] <= 1:
                if completed is None:
                    completed = (0, 1, time, time, (event,), (event.sender,))
            else:
                survivors.append((0, 1, time, time, (event,), (event.sender,)))
        state.partials = survivors
        if completed is not None:
            self.complete(book, key, state, completed, alerts)
        if not state.partials and not state.waiting and state.muted_until < time:
            self.drop(key, time)

    def start(self, book: PatternBook, key: str, event: Event, time: float, alerts: list[Alert]) -> None:
        """`feed` for a key with no state and an event that fits the first step: a new partial match."""
        started = (0, 1, time, time, (event,), (event.sender,))
        if self.last or self.mins[0] > 1:
            self.states[key] = _KeyState(time, [started])
            return
        state = self.states[key] = _KeyState(time)
        self.complete(book, key, state, started, alerts)
        if not state.waiting and state.muted_until < time:
            self.drop(key, time)

    def touch(self, key: str, state: _KeyState, time: float) -> None:
        """An event of the key that no step or absence can take: it only ages the key's state."""
        state.last_seen = time
        if state.partials:
            state.partials = [p for p in state.partials if self.alive(p, time)]
        if not state.partials and not state.waiting and state.muted_until < time:
            self.drop(key, time)

    def drop(self, key: str, time: float) -> None:
        """Forget a key with nothing pending, remembering (if needed) that it was seen at `time`."""
        del self.states[key]
        if self.seen is not None:
            self.seen[key] = time

    def complete(self, book: PatternBook, key: str, state: _KeyState, match: _Partial, alerts: list[Alert]) -> None:
        """A match completed: alert now, or wait for the absence (a deadline in the book's heap)."""
        state.partials = []
        last_time = match[3]
        if self.once:
            state.muted_until = last_time + (self.within or 0.0)
        if self.silence is None:
            alerts.append(self.alert(key, last_time, match[4]))
            return
        deadline = last_time + self.silence
        state.waiting.append((deadline, match))
        book._sequence += 1
        heapq.heappush(book.deadlines, (deadline, book._sequence, self.index, key))

    def sweep(self, mark: float) -> None:
        """Expire partial matches `mark` has outrun; forget keys with nothing pending, quiet for a horizon."""
        horizon = self.horizon
        if self.seen:
            for key in [key for key, last_seen in self.seen.items() if mark - last_seen > horizon]:
                del self.seen[key]
        quiet: list[str] = []
        alive = self.alive
        for key, state in self.states.items():
            if state.partials:
                state.partials = [p for p in state.partials if alive(p, mark)]
                if state.partials:
                    continue
            if not state.waiting and state.muted_until < mark and mark - state.last_seen > horizon:
                quiet.append(key)
        for key in quiet:
            del self.states[key]

    def alert(self, key: str, detected_at: float, events: tuple[Event, ...]) -> Alert:
        """The alert of a match of `events` under `key`."""
        p = self.pattern
        return Alert(p.id, key, p.severity, detected_at, events, self.summarize(key, events))


@dataclass
class PatternBook:
    """The patterns of one key kind over one shard's events."""

    patterns: tuple[PatternDef, ...]
    out_of_orderness: float
    user_shapes: frozenset[str] = frozenset({"conversation", "chat"})
    watermark: float = -math.inf
    arrival_mark: float = -math.inf
    buffer: list[tuple[float, int, Event]] = field(default_factory=list)
    """Events not yet matched, as (time, offset, event); sorted by each `advance`."""
    deadlines: list[tuple[float, int, int, str]] = field(default_factory=list)
    """Heap of waiting absences: (deadline, sequence, pattern index, key)."""
    released: tuple[float, int] = (-math.inf, -1)
    skipped_late: int = 0
    swept_at: float = -math.inf
    _sequence: int = 0
    _matchers: tuple[_Matcher, ...] = field(init=False, repr=False)
    _routes: dict[tuple[str, str, bool], tuple[_Route, ...]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._matchers = tuple(_Matcher(p, i) for i, p in enumerate(self.patterns))
        self._routes = {}

    def __getstate__(self) -> dict[str, Any]:
        # Routes are a cache of residual tests: rebuilt on demand, not worth a snapshot's bytes.
        return {name: value for name, value in self.__dict__.items() if name != "_routes"}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._routes = {}

    def add(self, event: Event, clock: float | None) -> None:
        """Take a timed event that arrived at `clock`; it is matched once the watermark passes it.

        It is late, and skipped, when it is behind the watermark it arrived at: judged by the clock
        at arrival (a function of the input), the same however events are batched into `advance`.
        """
        time = event.time
        assert time is not None, "events are timed before pattern matching"
        if clock is not None and clock - self.out_of_orderness > self.arrival_mark:
            self.arrival_mark = clock - self.out_of_orderness
        released = self.released
        if time < self.arrival_mark or (time <= released[0] and (time, event.offset) < released):
            self.skipped_late += 1
            return
        self.buffer.append((time, event.offset, event))

    def advance(self, now: float | None) -> list[Alert]:
        """Move the watermark to `now - out_of_orderness`; match what it passed, fire due absences."""
        if now is None or now - self.out_of_orderness <= self.watermark:
            return []
        self.watermark = mark = now - self.out_of_orderness
        alerts: list[Alert] = []
        buffer = self.buffer
        if buffer:
            # Mostly in order already: a sort of the new tail, then one cut, beats a heap per event.
            buffer.sort()
            cut = bisect_right(buffer, mark, key=_event_time)
            if cut:
                ready = buffer[:cut]
                del buffer[:cut]
                self._release(ready, alerts)
        self._fire(mark, alerts, inclusive=False)
        if mark - self.swept_at >= SWEEP_EVERY_SECONDS:
            self._sweep()
        return alerts

    def flush(self) -> list[Alert]:
        """End of input: match every buffered event, then fire every waiting absence."""
        alerts: list[Alert] = []
        ready = sorted(self.buffer)
        self.buffer.clear()
        self._release(ready, alerts)
        self._fire(math.inf, alerts, inclusive=True)
        for matcher in self._matchers:
            matcher.states.clear()
            if matcher.seen is not None:
                matcher.seen.clear()
        return alerts

    @property
    def open_keys(self) -> int:
        """Keys with state, and keys remembered as seen, over all patterns."""
        return sum(len(m.states) + len(m.seen or ()) for m in self._matchers)

    def _release(self, ready: list[tuple[float, int, Event]], alerts: list[Alert]) -> None:
        """Match events in time order, firing each absence whose deadline comes before the next event."""
        deadlines, routes = self.deadlines, self._routes
        for time, _, event in ready:
            if deadlines and deadlines[0][0] < time:
                self._fire(time, alerts, inclusive=False)
            route = routes.get((event.kind, event.shape, event.sender == "rm"))
            if route is None:
                route = self._route(event)
            session, user = event.session_id, None
            for matcher, by_user, tests, absence, can_start, touches in route:
                if not by_user:
                    key = session
                elif user is None:
                    key = user = key_of(event, "user")
                else:
                    key = user
                state = matcher.states.get(key)
                if state is not None:
                    if touches:
                        test = tests[0]
                        starts = test is True or (test is not False and test(event, (), False))
                        matcher.feed(self, key, state, event, time, tests, absence, starts, alerts)
                    else:
                        matcher.touch(key, state, time)
                    continue
                seen = matcher.seen
                if can_start:
                    first = seen is None or key not in seen
                    test = tests[0]
                    if test is True or (test is not False and test(event, (), first)):
                        if seen is not None:
                            seen.pop(key, None)
                        matcher.start(self, key, event, time, alerts)
                        continue
                if seen is not None:
                    seen[key] = time
        if ready:
            self.released = ready[-1][:2]

    def _route(self, event: Event) -> tuple[_Route, ...]:
        """Build (once per class of event) the routes of `event`'s kind, shape and role to the patterns.

        With no rules-stream lookup, `role_of` depends only on the shape and whether the sender is `rm`.
        """
        kind, role, user_scope = event.kind, role_of(event), event.shape in self.user_shapes
        route = tuple(
            r for m in self._matchers
            if m.pattern.enabled and (user_scope or not m.by_user) and (r := m.route(kind, role)) is not None
        )
        self._routes[(kind, event.shape, event.sender == "rm")] = route
        return route

    def _fire(self, until: float, alerts: list[Alert], *, inclusive: bool) -> None:
        """Fire waiting absences whose deadline is before `until` (at or before, if inclusive)."""
        deadlines = self.deadlines
        while deadlines and (deadlines[0][0] <= until if inclusive else deadlines[0][0] < until):
            deadline, _, index, key = heapq.heappop(deadlines)
            matcher = self._matchers[index]
            state = matcher.states.get(key)
            if state is None:
                continue
            keep: list[_Waiting] = []
            for waiting in state.waiting:
                if waiting[0] != deadline:
                    keep.append(waiting)
                else:
                    alerts.append(matcher.alert(key, deadline, waiting[1][4]))
            state.waiting = keep

    def _sweep(self) -> None:
        """Expire partial matches the watermark has outrun; drop keys left with nothing, quiet for a horizon."""
        self.swept_at = self.watermark
        for matcher in self._matchers:
            if matcher.states or matcher.seen:
                matcher.sweep(self.watermark)


def patterns_keyed_by(patterns: Iterable[PatternDef], key: str) -> tuple[PatternDef, ...]:
    """The enabled patterns keyed by `key` ("user" or "session")."""
    return tuple(p for p in patterns if p.enabled and p.key == key)
