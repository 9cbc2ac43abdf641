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

Per event the work is kept to what the event can change. An event's kind, shape and resolved role
decide every static test of every predicate, so each such class of event gets a route, built once:
per pattern, the `ResidualTest` left of each step and of the absence.
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
from typing import Any, Protocol, TypeAlias

from dataflows.events import Event, iso
from dataflows.sequencing import Scope
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

_Buffered: TypeAlias = "tuple[float, int, Event, ResolvedRole, Scope]"
"""An event waiting for the watermark: (time, offset, event, its sender's resolved role, its scope)."""

_event_time = itemgetter(0)


class PatternRules(Protocol):
    """Pattern definitions that change with event time (the rules stream's `RuleBook`)."""

    def patterns_span(self, time: float) -> tuple[tuple[PatternDef, ...], float, float]:
        """The definitions in effect at `time` (enabled or not, by id) and the span `[lo, hi)` they hold for."""
        ...

    def version(self) -> int:
        """A number that changes whenever the rules do (and so may the spans)."""
        ...


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

    def alert(self, key: str, detected_at: float, events: tuple[Event, ...]) -> Alert:
        """The alert of a match of `events` under `key`."""
        p = self.pattern
        return Alert(p.id, key, p.severity, detected_at, events, self.summarize(key, events))


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
    buffer: list[_Buffered] = field(default_factory=list)
    """Events not yet matched; sorted by each `advance`."""
    deadlines: list[tuple[float, int, _Matcher, str]] = field(default_factory=list)
    """Heap of waiting absences: (deadline, sequence, pattern's matcher, key)."""
    released: tuple[float, int] = (-math.inf, -1)
    skipped_late: int = 0
    swept_at: float = -math.inf
    _sequence: int = 0
    _matchers: tuple[_Matcher, ...] = field(init=False, repr=False)
    _routes: dict[tuple[str, str, ResolvedRole, Scope], tuple[_Route, ...]] = field(init=False, repr=False)
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
        # Routes are a cache of residual tests: rebuilt on demand, not worth a snapshot's bytes.
        return {name: value for name, value in self.__dict__.items() if name != "_routes"}

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
                matcher = _Matcher(pattern)
            matchers.append(matcher)
        for matcher in current.values():
            matcher.retired = True
        self._matchers = tuple(matchers)
        self._routes = {}
        self._span = (math.inf, -math.inf)

    def add(self, event: Event, clock: float | None, role: ResolvedRole | None = None,
            rules: PatternRules | None = None, scope: Scope = "all") -> None:
        """Take a timed event that arrived at `clock`; it is matched once the watermark passes it.

        It is late, and skipped, when it is behind the watermark it arrived at: judged by the clock
        at arrival (a function of the input), the same however events are batched into `advance`.
        `role` is the role the rules give a chat event's sender (a conversation's sender field is
        its role). `scope` says which of the patterns it meets: those keyed by its session
        (`session`), by its user (`user`) or both (`all`). An event that no pattern could be in
        effect for is not kept.
        """
        time = event.time
        assert time is not None, "events are timed before pattern matching"
        if clock is not None and clock - self.out_of_orderness > self.arrival_mark:
            self.arrival_mark = clock - self.out_of_orderness
        released = self.released
        if time < self.arrival_mark or (time <= released[0] and (time, event.offset) < released):
            self.skipped_late += 1
            return
        if not self.patterns and not self._matchers and (rules is None or not rules.patterns_span(time)[0]):
            return
        resolved = role if role is not None and event.shape == "chat" else role_of(event)
        self.buffer.append((time, event.offset, event, resolved, scope))

    def advance(self, now: float | None, rules: PatternRules | None = None) -> list[Alert]:
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
                self._release(ready, alerts, rules)
        self._fire(mark, alerts, rules, inclusive=False)
        if mark - self.swept_at >= SWEEP_EVERY_SECONDS:
            self._sweep()
        return alerts

    def flush(self, rules: PatternRules | None = None) -> list[Alert]:
        """End of input: match every buffered event, then fire every waiting absence."""
        alerts: list[Alert] = []
        ready = sorted(self.buffer)
        self.buffer.clear()
        self._release(ready, alerts, rules)
        self._fire(math.inf, alerts, rules, inclusive=True)
        for matcher in self._matchers:
            matcher.states.clear()
            if matcher.seen is not None:
                matcher.seen.clear()
        return alerts

    @property
    def open_keys(self) -> int:
        """Keys with state, and keys remembered as seen, over all patterns."""
        return sum(len(m.states) + len(m.seen or ()) for m in self._matchers)

    def _release(self, ready: list[_Buffered], alerts: list[Alert], rules: PatternRules | None) -> None:
        """Match events in time order, firing each absence whose deadline comes before the next event."""
        deadlines = self.deadlines
        self._check_rules(rules)
        lo, hi = self._span
        for time, _, event, role, scope in ready:
            if deadlines and deadlines[0][0] < time:
                self._fire(time, alerts, rules, inclusive=False)
            if rules is not None and not lo <= time < hi:
                self._follow(rules, time)
                lo, hi = self._span
            route = self._routes.get((event.kind, event.shape, role, scope))
            if route is None:
                route = self._route(event, role, scope)
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
        if ready:
            self.released = ready[-1][:2]

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

    def _route(self, event: Event, role: ResolvedRole, scope: Scope) -> tuple[_Route, ...]:
        """Build (once per class of event) the routes of `event`'s kind, shape, role and scope to the patterns."""
        kind = event.kind
        route = tuple(
            r for m in self._matchers
            if scope != ("session" if m.by_user else "user") and (r := m.route(kind, event.shape, role)) is not None
        )
        self._routes[(kind, event.shape, role, scope)] = route
        return route

    def _fire(self, until: float, alerts: list[Alert], rules: PatternRules | None, *, inclusive: bool) -> None:
        """Fire waiting absences whose deadline is before `until` (at or before, if inclusive) and
        whose pattern is in effect at their deadline."""
        deadlines = self.deadlines
        self._check_rules(rules)
        while deadlines and (deadlines[0][0] <= until if inclusive else deadlines[0][0] < until):
            deadline, _, matcher, key = heapq.heappop(deadlines)
            if rules is not None and not self._span[0] <= deadline < self._span[1]:
                self._follow(rules, deadline)
            if matcher.retired:
                continue
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
        """Expire partial matches and drop keys left with nothing, quiet for a horizon, as of the earliest
        time an event can still be matched at: none can be behind the last released one, nor behind the
        watermark of its own arrival (see `add`)."""
        self.swept_at = self.watermark
        lower = max(self.arrival_mark, self.released[0])
        for matcher in self._matchers:
            if matcher.states or matcher.seen:
                matcher.sweep(lower)


def patterns_keyed_by(patterns: Iterable[PatternDef], key: str) -> tuple[PatternDef, ...]:
    """The enabled patterns keyed by `key` ("user" or "session")."""
    return tuple(p for p in patterns if p.enabled and p.key == key)
