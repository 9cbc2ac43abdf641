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

The set of patterns can change while the flow runs: pattern rules from the rules stream add,
redefine or switch off patterns from an event time on (`PatternRules`). Events are matched by the
patterns in effect at their own time, and an absence fires only if its pattern is in effect at its
deadline; a pattern whose definition is unchanged keeps its state across a change, a redefined one
starts afresh. Roles that the rules give chat users (`rm` is an agent) reach the predicates too.

Events come and wait as frames; what can be decided for a whole frame is decided column-wise
(lateness, roles, keys, the order of release). Counting patterns (one open-ended step, no absence:
a spam burst) and two-step ones (a question, its answer, maybe a silence: conversation completion)
are matched wholly column-wise (`bursts.BurstMatcher`, `pairs.PairMatcher`; the latter hand their
waiting matches' deadlines to the book's heap); for the others, per event the
work is kept to what the event can change. An event's kind, shape, resolved role and scope (its
class) decide every static test of every predicate, so each class gets a route, built once: per
pattern, the `ResidualTest` left of each step and of the absence. Per pattern, a frame's events of
classes it has no route for, and those of keys that hold no state and have no event there that could
start it, are never visited one by one (the latter only mark their keys as seen, all at once). A
visited event costs a state lookup per pattern, and tests only against the steps its key's partial
matches wait on. Partial matches are plain tuples that keep each step's sender (the only thing later
steps test).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeAlias

import numpy as np
import polars as pl

from dataflows.event_frame import EVENT_SCHEMA, events_frame, frame_events
from dataflows.events import Event
from dataflows.sequencing import Scope
from dataflows.small_frames import rows_where
from dataflows.patterns.alerts import Alert, alert_of
from dataflows.patterns.bursts import BurstMatcher, is_burst
from dataflows.patterns.columns import KEY_COLUMN, Released
from dataflows.patterns.pairs import Deadline, PairMatcher, is_pair
from dataflows.patterns.definitions import (
    CompiledPredicate,
    PatternDef,
    ResidualTest,
    ResolvedRole,
    Summarizer,
    key_of,
    meets_scope,
)

SWEEP_EVERY_SECONDS = 300.0

Test: TypeAlias = "bool | ResidualTest"
"""A predicate for one class of event: decided (True, False), or the tests left to run per event."""
_Partial: TypeAlias = "tuple[int, int, float, float, tuple[Event, ...], tuple[str, ...]]"
"""A match in progress: (step, events its step took so far, first time, last time, events, senders).

`senders[i]` is the sender of the last event taken by step `i`.
"""
_Waiting: TypeAlias = "tuple[float, _Partial]"
"""A completed match waiting for its absence to hold until a deadline: (deadline, match)."""

BUFFER_SCHEMA = pl.Schema([*EVENT_SCHEMA.items(), ("role", pl.String), ("scope", pl.String), ("user_key", pl.String),
                           ("class", pl.String)])
"""Events waiting for the watermark: each with its sender's resolved role, its scope, its user
(`key_of(event, "user")`) and its class (kind, shape, role and scope: what decides its routes)."""
_RELEASE_ORDER = ["time", "offset", "event_id", "session_id", "sender", "kind", "text"]
"""Event-time order, ties broken by file order, then (for events of different inputs) by content."""


def _buffer_columns(role: pl.Expr) -> tuple[pl.Expr | str, ...]:
    resolved = (
        pl.when(pl.col("shape") == "conversation")
        .then(pl.when(pl.col("sender") == "rm").then(pl.lit("agent")).otherwise(pl.lit("customer")))
        .otherwise(pl.coalesce(role, pl.lit("user")))
    )
    return (
        *EVENT_SCHEMA.names(), resolved.alias("role"), "scope",
        pl.coalesce("username", pl.concat_str("session_id", pl.lit("/"), "sender")).alias("user_key"),
        pl.concat_str("kind", "shape", resolved, "scope", separator="\x00").alias("class"),
    )


_BUFFER_COLUMNS = {True: _buffer_columns(pl.col("role")), False: _buffer_columns(pl.lit(None, pl.String))}
"""The buffer's columns of timed events (`BUFFER_SCHEMA`), by whether they carry a `role` column."""
SMALL_FRAME = 64
"""Frames of at most this many rows are turned into buffer rows in Python (`_few_buffer_rows`): on
a few rows a Polars query costs more in planning than Python costs over the rows."""


def _few_buffer_rows(events: pl.DataFrame) -> pl.DataFrame:
    """What `_BUFFER_COLUMNS` make of `events`, computed in Python (for a few rows)."""
    lists = {name: events[name].to_list() for name in ("shape", "sender", "username", "session_id", "kind", "scope")}
    given = events["role"].to_list() if "role" in events.columns else [None] * len(events)
    roles = [("agent" if sender == "rm" else "customer") if shape == "conversation"
             else ("user" if role is None else role)
             for shape, sender, role in zip(lists["shape"], lists["sender"], given, strict=True)]
    users = [f"{session}/{sender}" if name is None else name
             for name, session, sender in zip(lists["username"], lists["session_id"], lists["sender"], strict=True)]
    classes = ["\x00".join(parts) for parts in zip(lists["kind"], lists["shape"], roles, lists["scope"], strict=True)]
    return pl.DataFrame([
        *(events[name] for name in EVENT_SCHEMA.names()), pl.Series("role", roles, pl.String), events["scope"],
        pl.Series("user_key", users, pl.String), pl.Series("class", classes, pl.String)])


def _in_order(before: dict[str, Any], after: dict[str, Any]) -> bool:
    """Whether row `before` comes no later than row `after` in release order (unknown with nulls: False)."""
    a, b = [before[name] for name in _RELEASE_ORDER], [after[name] for name in _RELEASE_ORDER]
    if None in a or None in b:
        return False
    return bool(a <= b)


class PatternRules(Protocol):
    """Pattern definitions that change with event time (the rules stream's `RuleBook`)."""

    def patterns_span(self, time: float) -> tuple[tuple[PatternDef, ...], float, float]:
        """The definitions in effect at `time` (enabled or not, by id) and the span `[lo, hi)` they hold for."""
        ...

    def version(self) -> int:
        """A number that changes whenever the rules do (and so may the spans)."""
        ...


class _KeyState:
    """One key's state for one pattern: its partial matches, matches waiting on an absence, mute."""

    __slots__ = ("last_seen", "partials", "waiting", "muted_until")

    def __init__(self, last_seen: float, partials: list[_Partial] | None = None) -> None:
        self.last_seen = last_seen
        self.partials: list[_Partial] = [] if partials is None else partials
        self.waiting: list[_Waiting] = []
        self.muted_until = -math.inf


_Route: TypeAlias = "tuple[_Matcher, bool, tuple[Test, ...], Test, bool, bool]"
"""How events of one class (kind, shape, role) meet one pattern:
(matcher, keyed by user, step tests, absence test, can start, touches).

`can start`: the first step may match, so a key with no state may get one. `touches`: some step
or the absence may match; otherwise the event only ages the key's state. A plain tuple, as the
hot loop unpacks one per event and pattern (a NamedTuple unpacks at half the speed).
"""


class _Matcher:
    """One pattern, compiled for the hot path, and its per-key state within one book.

    Step bounds are tuples indexed by step; an open-ended count or gap is infinite, so one
    comparison replaces a None test and a comparison.

    A single open-ended step (`times_or_more`, e.g. a spam burst) is `counting`: every event that
    fits it extends every partial match and starts one more, so a key's partial matches are the
    suffixes of one run of events, and the earliest still within the time bound is the one that
    completes first. Such a matcher keeps only that run (`_count`), not one tuple per suffix.
    """

    __slots__ = ("pattern", "retired", "by_user", "predicates", "absence", "refs", "mins", "maxs", "gaps", "last",
                 "within", "bounds", "once", "counting", "silence", "horizon", "summarize", "states", "seen")

    def __init__(self, pattern: PatternDef) -> None:
        steps = pattern.steps
        self.pattern = pattern
        self.retired = False
        """Set when the pattern leaves the book: its waiting absences no longer fire."""
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
        self.counting = self.last == 0 and self.maxs[0] == math.inf
        self.silence = pattern.absence.seconds if pattern.absence else None
        self.horizon = pattern.max_horizon_seconds
        self.summarize = Summarizer(pattern)
        self.states: dict[str, _KeyState] = {}
        self.seen: dict[str, float] | None = {} if pattern.uses_first_of_key else None

    def route(self, kind: str, shape: str, role: ResolvedRole) -> _Route | None:
        """This pattern's tests for events of `kind` and `shape` from `role`; None if such events
        cannot matter to it.

        An event no step or absence can take only ages its key's state: expires partial matches
        that could never complete anyway, and drops a key left with nothing pending. That changes
        no alert unless the pattern asks for a key's first event (a dropped key's next event is
        one) or mutes keys: a sweep drops a key quiet for a horizon, and an event the watermark
        had already passed when it arrived (within the bound, so still matched) may fall in the
        dropped key's mute. Otherwise the pattern need not see the event at all.

        A conversation's user is keyed `session/sender`, and all its events are messages from the
        role its sender names: one class. If that class cannot start the pattern, no event of the
        key ever does, so the key never holds state, and the pattern need not see its events.
        """
        steps = tuple(p.residual(kind, role, self.refs) for p in self.predicates)
        if self.by_user and shape == "conversation" and steps[0] is False:
            return None
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

    def expire(self, partials: list[_Partial], time: float) -> list[_Partial]:
        """The partial matches that can still complete at `time`."""
        if self.counting:
            return self._trim(partials, time)
        return [p for p in partials if self.alive(p, time)]

    def _trim(self, partials: list[_Partial], time: float) -> list[_Partial]:
        """A counting matcher's run, less the events `time` has put out of the pattern's bound.

        Takes the earliest of several partial matches (a snapshot of a book that kept every
        suffix): it holds the events of all the others.
        """
        if not partials:
            return partials
        run = partials[0]
        within = self.within
        if within is None or time - run[2] <= within:
            return partials[:1]
        events = run[4]
        gone = 0
        for event in events:
            assert event.time is not None, "matched events are timed"
            if time - event.time <= within:
                break
            gone += 1
        kept = events[gone:]
        if not kept:
            return []
        assert kept[0].time is not None, "matched events are timed"
        return [(0, len(kept), kept[0].time, run[3], kept, run[5])]

    def _count(self, state: _KeyState, event: Event, time: float, starts: bool) -> _Partial | None:
        """`feed`'s matching for a counting matcher: extend the key's run by `event` if it fits;
        return the run if that completes it."""
        run = self._trim(state.partials, time)
        if starts and self.once and time <= state.muted_until:
            state.muted_until = time + (self.within or 0.0)
        elif starts:
            if run:
                count, first_time, events = run[0][1], run[0][2], run[0][4]
                taken = (0, count + 1, first_time, time, events + (event,), (event.sender,))
            else:
                taken = (0, 1, time, time, (event,), (event.sender,))
            if taken[1] >= self.mins[0]:
                state.partials = []
                return taken
            run = [taken]
        state.partials = run
        return None

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
        if self.counting:
            completed = self._count(state, event, time, starts)
        else:
            completed = self._extend(state, event, time, tests, starts)
        if completed is not None:
            self.complete(book, key, state, completed, alerts)
        if not state.partials and not state.waiting and state.muted_until < time:
            self.drop(key, time)

    def _extend(self, state: _KeyState, event: Event, time: float, tests: Sequence[Test],
                starts: bool) -> _Partial | None:
        """`feed`'s matching: move the key's partial matches on by `event`; return the first completed."""
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
        return completed

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
            state.partials = self.expire(state.partials, time)
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
        heapq.heappush(book.deadlines, (deadline, book._sequence, self, key))

    def sweep(self, lower: float) -> None:
        """Expire partial matches, forget keys with nothing pending and quiet for a horizon, as of `lower`:
        the earliest time an event still to be matched can have.

        What it drops, the next event would find expired or quiet anyway, so when sweeps run changes no alert.
        """
        if not self.states and not self.seen:
            return
        horizon = self.horizon
        if self.seen:
            for key in [key for key, last_seen in self.seen.items() if lower - last_seen > horizon]:
                del self.seen[key]
        quiet: list[str] = []
        for key, state in self.states.items():
            if state.partials:
                state.partials = self.expire(state.partials, lower)
                if state.partials:
                    continue
            if not state.waiting and state.muted_until < lower and lower - state.last_seen > horizon:
                quiet.append(key)
        for key in quiet:
            del self.states[key]

    def due(self, key: str, deadline: float) -> list[Alert]:
        """The alerts of the key's matches whose absence held until `deadline`; they stop waiting."""
        state = self.states.get(key)
        if state is None:
            return []
        fired = [self.alert(key, deadline, w[1][4]) for w in state.waiting if w[0] == deadline]
        state.waiting = [w for w in state.waiting if w[0] != deadline]
        return fired

    def alert(self, key: str, detected_at: float, events: tuple[Event, ...]) -> Alert:
        """The alert of a match of `events` under `key`."""
        return alert_of(self.pattern, self.summarize, key, detected_at, events)

    @property
    def open_keys(self) -> int:
        """Keys with state, and keys remembered as seen."""
        return len(self.states) + len(self.seen or ())

    def held_keys(self) -> set[str]:
        """The keys `open_keys` counts."""
        return {*self.states, *(self.seen or ())}

    def clear(self) -> None:
        self.states.clear()
        if self.seen is not None:
            self.seen.clear()


_Any: TypeAlias = "_Matcher | BurstMatcher | PairMatcher"
_Found: TypeAlias = "tuple[int, int, Alert | Deadline]"
"""What a column-wise matcher found in a frame: (row, pattern's index, an alert or a deadline to wait for)."""


def matcher_for(pattern: PatternDef) -> _Any:
    """The matcher of `pattern`: column-wise for a counting (`bursts`) or a two-step pattern (`pairs`),
    else per event."""
    if is_burst(pattern):
        return BurstMatcher(pattern)
    return PairMatcher(pattern) if is_pair(pattern) else _Matcher(pattern)


@dataclass
class PatternBook:
    """The patterns of some key kinds over one shard's events.

    `patterns` are the patterns given at start-up (the `--patterns` file); `PatternRules`, when
    passed to `add`, `advance` and `flush`, override them by id from an event time on. Of either,
    the book runs the enabled patterns: session-keyed ones on events of scope `all` or `session`,
    user-keyed ones on those of scope `all` or `user` (see `add`).
    """

    patterns: tuple[PatternDef, ...]
    out_of_orderness: float
    watermark: float = -math.inf
    arrival_mark: float = -math.inf
    buffer: list[pl.DataFrame] = field(default_factory=list)
    """Events not yet matched (`BUFFER_SCHEMA`): frames that, one after another, are in release order (`_buffer`)."""
    deadlines: list[tuple[float, int, _Matcher | PairMatcher, str]] = field(default_factory=list)
    """Heap of waiting absences: (deadline, sequence, pattern's matcher, key)."""
    released: tuple[float, int] = (-math.inf, -1)
    skipped_late: int = 0
    swept_at: float = -math.inf
    _sequence: int = 0
    _matchers: tuple[_Any, ...] = field(init=False, repr=False)
    _routes: dict[tuple[str, str, str, str], tuple[_Route | None, ...]] = field(init=False, repr=False)
    _span: tuple[float, float] = field(init=False, repr=False)
    """The event times over which the rules' definitions were last looked up: `[lo, hi)`."""
    _rules_version: int = field(init=False, repr=False)
    """The rules' version when `_span` was found: a rule that came since may split it."""

    def __post_init__(self) -> None:
        self._matchers = ()
        self._routes = {}
        self._span = (math.inf, -math.inf)
        self._rules_version = -1
        self.set_patterns(self.patterns)

    def __getstate__(self) -> dict[str, Any]:
        # Routes are a cache of residual tests: rebuilt on demand, not worth a snapshot's bytes. The
        # buffer's frames go as one (a pickled frame's cost is mostly per frame).
        state = {name: value for name, value in self.__dict__.items() if name != "_routes"}
        if len(self.buffer) > 1:
            state["buffer"] = [pl.concat(self.buffer)]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._routes = {}
        self._span = (math.inf, -math.inf)

    def set_patterns(self, patterns: Iterable[PatternDef]) -> None:
        """Match `patterns` (those enabled) from now on.

        A pattern whose definition is unchanged keeps its matcher and so its partial matches,
        waiting absences and mutes; a new or redefined one starts with no state; one that leaves
        is retired, and its waiting absences never fire.
        """
        wanted = [p for p in patterns if p.enabled]
        if wanted == [m.pattern for m in self._matchers]:
            return
        current = {m.pattern.id: m for m in self._matchers}
        matchers = []
        for pattern in wanted:
            matcher = current.pop(pattern.id, None)
            if matcher is None or matcher.pattern != pattern:
                if matcher is not None:
                    matcher.retired = True
                matcher = matcher_for(pattern)
            matchers.append(matcher)
        for matcher in current.values():
            matcher.retired = True
        self._matchers = tuple(matchers)
        self._routes = {}
        self._span = (math.inf, -math.inf)

    def add(self, event: Event, clock: float | None, role: ResolvedRole | None = None,
            rules: PatternRules | None = None, scope: Scope = "all") -> None:
        """`add_frame` for one event (tests, and callers with a single event)."""
        frame = events_frame([event]).with_columns(
            pl.lit(clock, pl.Float64).alias("clock"), pl.lit(scope, pl.String).alias("scope"),
            pl.lit(role, pl.String).alias("role"),
        )
        self.add_frame(frame, rules)

    def add_frame(self, events: pl.DataFrame, rules: PatternRules | None = None) -> None:
        """Take timed events in arrival order (event columns, `clock`, `scope`, maybe `role`): each
        arrived at its `clock` and is matched once the watermark passes it.

        One is late, and skipped, when it is behind the watermark it arrived at: judged by the clock
        at arrival (a function of the input), the same however events are batched into `advance`.
        `role`, where set, is the role the rules give a chat event's sender (a conversation's sender
        field is its role). `scope` says which of the patterns it meets: those keyed by its session
        (`session`), by its user (`user`) or both (`all`). Events that no pattern could be in effect
        for are not kept.
        """
        if events.is_empty():
            return
        times = events["time"].to_numpy()
        assert not np.isnan(times).any(), "events are timed before pattern matching"
        clock = events["clock"].to_numpy().astype(np.float64)
        marks = np.where(np.isnan(clock), -np.inf, clock - self.out_of_orderness)
        arrival = np.maximum.accumulate(np.maximum(marks, self.arrival_mark))
        self.arrival_mark = float(arrival[-1])
        at, offset = self.released
        offsets = events["offset"].to_numpy()
        late = (times < arrival) | (times < at) | ((times == at) & (offsets < offset))
        self.skipped_late += int(late.sum())
        keep = ~late
        if not self.patterns and not self._matchers:
            keep &= self._in_effect(times, rules)
        if not keep.any():
            return
        kept = rows_where(events, keep)
        rows = (_few_buffer_rows(kept) if len(kept) <= SMALL_FRAME
                else kept.select(*_BUFFER_COLUMNS["role" in kept.columns]))
        kept_times = times[keep]
        self._buffer(rows if bool(np.all(kept_times[1:] > kept_times[:-1])) else rows.sort(_RELEASE_ORDER))

    def _buffer(self, rows: pl.DataFrame) -> None:
        """Add rows (sorted) to the buffer: frames that, one after another, are in release order. Rows
        that go after the buffer's last one are a frame of their own (no copy of what waits); rows
        that go before it (events arriving out of time order) make the buffer one frame sorted again."""
        if not self.buffer:
            self.buffer = [rows]
            return
        last = self.buffer[-1]
        if _in_order(last.row(len(last) - 1, named=True), rows.row(0, named=True)):
            self.buffer.append(rows)
        else:
            self.buffer = [pl.concat([*self.buffer, rows]).sort(_RELEASE_ORDER)]

    def advance(self, now: float | None, rules: PatternRules | None = None) -> list[Alert]:
        """Move the watermark to `now - out_of_orderness`; match what it passed, fire due absences."""
        if now is None or now - self.out_of_orderness <= self.watermark:
            return []
        self.watermark = mark = now - self.out_of_orderness
        alerts: list[Alert] = []
        passed: list[pl.DataFrame] = []
        while self.buffer:
            waiting = self.buffer[0]
            cut = int(np.searchsorted(waiting["time"].to_numpy(), mark, side="right"))
            if cut:
                passed.append(waiting.slice(0, cut))
            if cut < len(waiting):
                self.buffer[0] = waiting.slice(cut)
                break
            self.buffer.pop(0)
        if passed:
            self._release(passed[0] if len(passed) == 1 else pl.concat(passed), alerts, rules)
        self._fire(mark, alerts, rules, inclusive=False)
        if mark - self.swept_at >= SWEEP_EVERY_SECONDS:
            self._sweep()
        return alerts

    def flush(self, rules: PatternRules | None = None) -> list[Alert]:
        """End of input: match every buffered event, then fire every waiting absence."""
        alerts: list[Alert] = []
        if self.buffer:
            ready = pl.concat(self.buffer)
            self.buffer = []
            self._release(ready, alerts, rules)
        self._fire(math.inf, alerts, rules, inclusive=True)
        for matcher in self._matchers:
            matcher.clear()
        return alerts

    @property
    def buffered(self) -> int:
        """Events waiting for the watermark."""
        return sum(len(frame) for frame in self.buffer)

    @property
    def open_keys(self) -> int:
        """Keys with state, and keys remembered as seen, over all patterns."""
        return sum(m.open_keys for m in self._matchers)

    def _in_effect(self, times: np.ndarray, rules: PatternRules | None) -> np.ndarray:
        """Whether some pattern of the rules is in effect at each of `times` (a span at a time)."""
        found = np.zeros(len(times), dtype=bool)
        if rules is None:
            return found
        order = np.argsort(times, kind="stable")
        ordered = times[order]
        at = 0
        while at < len(ordered):
            defs, _, hi = rules.patterns_span(float(ordered[at]))
            stop = max(at + 1, int(np.searchsorted(ordered, hi, side="left")))
            found[order[at:stop]] = bool(defs)
            at = stop
        return found

    def _release(self, ready: pl.DataFrame, alerts: list[Alert], rules: PatternRules | None) -> None:
        """Match events (sorted, `BUFFER_SCHEMA`) in time order, a stretch of constant definitions
        at a time; each absence fires before the first event after its deadline."""
        self._check_rules(rules)
        if rules is None:
            self._match(ready, alerts, rules)
        else:
            times = ready["time"].to_numpy()
            at = 0
            while at < len(times):
                first = float(times[at])
                if self.deadlines and self.deadlines[0][0] < first:
                    self._fire(first, alerts, rules, inclusive=False)
                if not self._span[0] <= first < self._span[1]:
                    self._follow(rules, first)
                stop = max(at + 1, int(np.searchsorted(times, self._span[1], side="left")))
                self._match(ready.slice(at, stop - at), alerts, rules)
                at = stop
        last = ready.row(len(ready) - 1, named=True)
        self.released = (last["time"], last["offset"])

    def _match(self, ready: pl.DataFrame, alerts: list[Alert], rules: PatternRules | None) -> None:
        """Match events of one stretch of constant definitions: counting patterns column-wise
        (`bursts`), the others visiting per pattern only the events that can start or move on a match.

        A key holds a pattern's state only from an event that can start it; so an event of a key
        with no state, none of whose events here can start the pattern, changes nothing but (for
        patterns that ask for a key's first event) when the key was last seen: that is noted for
        all such events at once. Alerts come in the order the events complete them (for one event,
        in the order of the patterns), each absence firing before the first event after its deadline.
        """
        if not self._matchers:
            return
        released = Released.of(ready)
        class_of = released.class_of
        found = self._column_wise(released)
        routes, visits = self._visits(ready, released.classes, class_of)
        chosen = np.flatnonzero(visits)
        rows = frame_events(ready.select(EVENT_SCHEMA.names())[chosen]) if len(chosen) else []
        pending = found.pop() if found else None
        """What a column-wise matcher found next (`found` is reversed)."""
        plans: dict[tuple[int, int], tuple[_Route, ...]] = {}
        deadlines = self.deadlines
        for event, cls, visit, at in zip(rows, class_of[chosen].tolist(), visits[chosen].tolist(), chosen.tolist(),
                                       strict=True):
            while pending is not None and pending[0] < at:
                self._settle(pending, alerts, rules)
                pending = found.pop() if found else None
            plan = plans.get((cls, visit))
            if plan is None:
                plan = plans[(cls, visit)] = tuple(
                    r for i, r in enumerate(routes[cls]) if r is not None and visit >> i & 1
                )
            time: float = event.time  # type: ignore[assignment]  # released events are timed
            if deadlines and deadlines[0][0] < time:
                self._fire(time, alerts, rules, inclusive=False)
            before = len(alerts)
            session, user = event.session_id, None
            for matcher, by_user, tests, absence, can_start, touches in plan:
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
                        starts = test is True or (
                            test is not False and test(event, (), time - state.last_seen > matcher.horizon))
                        matcher.feed(self, key, state, event, time, tests, absence, starts, alerts)
                    else:
                        matcher.touch(key, state, time)
                    continue
                seen = matcher.seen
                if can_start:
                    first = seen is None or time - seen.get(key, -math.inf) > matcher.horizon
                    test = tests[0]
                    if test is True or (test is not False and test(event, (), first)):
                        if seen is not None:
                            seen.pop(key, None)
                        matcher.start(self, key, event, time, alerts)
                        continue
                if seen is not None:
                    seen[key] = time
            if pending is not None and pending[0] == at:
                pending = self._merge_row(alerts, before, pending, found)
        while pending is not None:
            self._settle(pending, alerts, rules)
            pending = found.pop() if found else None

    def _settle(self, found: _Found, alerts: list[Alert], rules: PatternRules | None) -> None:
        """Take in what a column-wise matcher found at a row no per-event pattern visits: an alert (after
        the absences due before it), or a match now waiting for its deadline."""
        item = found[2]
        if isinstance(item, Alert):
            self._fire(item.detected_at, alerts, rules, inclusive=False)
            alerts.append(item)
        else:
            self._wait(found[1], item)

    def _wait(self, index: int, item: Deadline) -> None:
        matcher = self._matchers[index]
        assert isinstance(matcher, PairMatcher), "only pair matchers hand over deadlines"
        self._sequence += 1
        heapq.heappush(self.deadlines, (item.deadline, self._sequence, matcher, item.key))

    def _merge_row(self, alerts: list[Alert], before: int, pending: _Found | None,
                   found: list[_Found]) -> _Found | None:
        """Put the column-wise matchers' alerts of one event among those the other patterns gave it
        (`alerts[before:]`), in the order of the patterns, and their deadlines on the heap (after the
        other patterns'); return the next pending find."""
        assert pending is not None
        index = {m.pattern.id: i for i, m in enumerate(self._matchers)}
        merged: list[tuple[int, Alert]] = [(index[a.pattern], a) for a in alerts[before:]]
        at = pending[0]
        while pending is not None and pending[0] == at:
            item = pending[2]
            if isinstance(item, Alert):
                merged.append((pending[1], item))
            else:
                self._wait(pending[1], item)
            pending = found.pop() if found else None
        merged.sort(key=lambda f: f[0])
        alerts[before:] = [a for _, a in merged]
        return pending

    def _column_wise(self, released: Released) -> list[_Found]:
        """What the column-wise matchers find in `released`: (row, pattern's index, alert or deadline), last first."""
        found: list[_Found] = []
        for index, matcher in enumerate(self._matchers):
            if isinstance(matcher, (BurstMatcher, PairMatcher)):
                found.extend((at, index, item) for at, item in matcher.match(released))
        found.sort(key=lambda f: (f[0], f[1]), reverse=True)
        return found

    def _visits(self, ready: pl.DataFrame, classes: list[str], class_of: np.ndarray
                ) -> tuple[list[tuple[_Route | None, ...]], np.ndarray]:
        """The routes of each class in `ready` and per row a bit per pattern that must visit it (see
        `_match`); marks the keys of the others as seen."""
        matchers = self._matchers
        routes = [self._routes_of(*name.split("\x00")) for name in classes]
        visits = np.zeros(len(ready), dtype=np.int64)
        membership: dict[str, pl.Expr] = {}
        routed_of: dict[int, np.ndarray] = {}
        for index, matcher in enumerate(matchers):
            routed = np.array([r[index] is not None for r in routes])[class_of]
            if not routed.any():
                continue
            assert isinstance(matcher, _Matcher), "counting patterns have no per-event routes"
            starts = np.array([(route := r[index]) is not None and route[4] for r in routes])[class_of]
            if (starts == routed).all():
                visits |= routed.astype(np.int64) << index
                continue
            column = KEY_COLUMN[matcher.by_user]
            active = set(matcher.states)
            active.update(ready[column].filter(pl.Series(starts)).to_list())
            membership[str(index)] = pl.col(column).is_in(pl.Series(list(active), dtype=pl.String).implode())
            routed_of[index] = routed
        if not membership:
            return routes, visits
        found = ready.select(**membership)
        for index, routed in routed_of.items():
            visited = routed & found[str(index)].to_numpy()
            visits |= visited.astype(np.int64) << index
            seen, passed = matchers[index].seen, routed & ~visited  # type: ignore[union-attr]
            if seen is not None and passed.any():
                column = KEY_COLUMN[matchers[index].by_user]
                last = ready.filter(pl.Series(passed)).group_by(column).agg(pl.col("time").max())
                seen.update(last.iter_rows())
        return routes, visits

    def _check_rules(self, rules: PatternRules | None) -> None:
        """Forget the span of the definitions in effect if rules came since it was looked up."""
        if rules is not None and rules.version() != self._rules_version:
            self._rules_version = rules.version()
            self._span = (math.inf, -math.inf)

    def _follow(self, rules: PatternRules, time: float) -> None:
        """Run the patterns in effect at `time`: the start-up ones, overridden by id by the rules'."""
        from_rules, lo, hi = rules.patterns_span(time)
        by_id = {p.id: p for p in self.patterns}
        by_id.update((p.id, p) for p in from_rules)
        self.set_patterns(by_id.values())
        self._span = (lo, hi)

    def _routes_of(self, kind: str, shape: str, role: str, scope: str) -> tuple[_Route | None, ...]:
        """Each pattern's route for events of `kind`, `shape`, `role` and `scope` (None: it need
        not see them); built once per class of event."""
        found = self._routes.get((kind, shape, role, scope))
        if found is None:
            found = self._routes[(kind, shape, role, scope)] = tuple(
                m.route(kind, shape, role) if meets_scope(scope, m.by_user) else None  # type: ignore[arg-type]
                for m in self._matchers
            )
        return found

    def _fire(self, until: float, alerts: list[Alert], rules: PatternRules | None, *, inclusive: bool) -> None:
        """Fire waiting absences whose deadline is before `until` (at or before, if inclusive) and
        whose pattern is in effect at their deadline."""
        deadlines = self.deadlines
        self._check_rules(rules)
        while deadlines and (deadlines[0][0] <= until if inclusive else deadlines[0][0] < until):
            deadline, _, matcher, key = heapq.heappop(deadlines)
            if rules is not None and not self._span[0] <= deadline < self._span[1]:
                self._follow(rules, deadline)
            if not matcher.retired:
                alerts.extend(matcher.due(key, deadline))

    def _sweep(self) -> None:
        """Expire partial matches and drop keys left with nothing, quiet for a horizon, as of the earliest
        time an event can still be matched at: none can be behind the last released one, nor behind the
        watermark of its own arrival (see `add`)."""
        self.swept_at = self.watermark
        lower = max(self.arrival_mark, self.released[0])
        for matcher in self._matchers:
            matcher.sweep(lower)


def patterns_keyed_by(patterns: Iterable[PatternDef], key: str) -> tuple[PatternDef, ...]:
    """The enabled patterns keyed by `key` ("user" or "session")."""
    return tuple(p for p in patterns if p.enabled and p.key == key)
