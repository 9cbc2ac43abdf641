"""Match two-step patterns (a question, then its answer, then maybe a silence) column-wise.

A pair pattern has two steps of one event each and maybe an absence: `conversation_completion` (a
customer asks, someone else answers within 10 min, the customer then says nothing for 30 s). Per key
the per-event matcher (`engine._Matcher`) keeps the open questions in order; an answer completes
with the first one still alive (within the step's gap and the pattern's bound) whose sender the
answer's sender test accepts, and clears them all. So, per key, in release order:

- an answer at row `i` can complete only if the latest accepted question before it is alive
  (`best[i]`, found for every row at once by a running maximum per key, or per key and sender);
- it does complete if that question also came after the key's last completion: a loop over these
  candidate answers only, per key in row order, keeps the completions (the sequential part);
- the question it takes is the first alive, accepted one since the last completion;
- a completion's silence is broken by the first later row of the key that fits the absence (and
  its sender test) at or before the deadline: found for all completions at once by a search over
  the absence's rows ordered by key (and sender).

Between frames a key keeps its open questions (as events) and its matches waiting for silence; the
book's heap of deadlines fires those (`due`). The per-event matcher gives the same alerts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from dataflows.events import Event
from dataflows.patterns.alerts import Alert, alert_of
from dataflows.patterns.columns import PredicateColumn, Released, is_flat, sender_test
from dataflows.patterns.definitions import PatternDef, ResolvedRole, Summarizer
from dataflows.patterns.keyed import KeyedRows, events_by_key, recent


@dataclass(frozen=True, slots=True)
class Deadline:
    """A completed match now waiting for silence until `deadline` (the book pushes it on its heap)."""

    deadline: float
    key: str


@dataclass(frozen=True, slots=True)
class _Waiting:
    deadline: float
    events: tuple[Event, Event]

    @property
    def senders(self) -> tuple[str, str]:
        return self.events[0].sender, self.events[1].sender


def is_pair(pattern: PatternDef) -> bool:
    """Whether this matcher takes `pattern`: two steps of one event each, every match alerted, no
    test of a key's first event, and at most one sender test (top level) per predicate."""
    steps = pattern.steps
    if len(steps) != 2 or any(s.min_count != 1 or s.max_count != 1 for s in steps):
        return False
    predicates = [s.where for s in steps] + ([pattern.absence.not_followed_by] if pattern.absence else [])
    return pattern.emit == "every_match" and all(is_flat(p) for p in predicates)


class PairMatcher:
    """One pair pattern within one `PatternBook`: its keys' open questions and waiting matches."""

    def __init__(self, pattern: PatternDef) -> None:
        assert is_pair(pattern), f"{pattern.id} is not a pair pattern"
        self.pattern = pattern
        self.retired = False
        self.by_user = pattern.key == "user"
        refs = {step.name: i for i, step in enumerate(pattern.steps)}
        first, then = pattern.steps
        self.first = PredicateColumn(first.where, self.by_user, refs)
        self.then = PredicateColumn(then.where, self.by_user, refs)
        self.then_sender = sender_test(then.where, refs)
        absence = pattern.absence
        self.absence = None if absence is None else PredicateColumn(absence.not_followed_by, self.by_user, refs)
        self.absence_sender = None if absence is None else sender_test(absence.not_followed_by, refs)
        self.silence = None if absence is None else absence.seconds
        gap = math.inf if then.within_seconds is None else then.within_seconds
        self.alive_for = min(gap, math.inf if pattern.within_seconds is None else pattern.within_seconds)
        """How long a question stays open: an answer at most this long after it can take it."""
        self.summarize = Summarizer(pattern)
        self.open: dict[str, list[Event]] = {}
        """Per key, the questions its first step took since its last completion, in release order."""
        self.waiting: dict[str, list[_Waiting]] = {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Snapshots taken before the open questions were kept per key hold them as one frame.
        if isinstance(state["open"], pl.DataFrame):
            state["open"] = events_by_key(state["open"])
        self.__dict__.update(state)

    def route(self, kind: str, shape: str, role: ResolvedRole) -> None:
        """No event is visited one by one (see `PatternBook._routes_of`): `match` takes whole frames."""
        return None

    @property
    def open_keys(self) -> int:
        """Keys with an open question or a waiting match."""
        return len(self.held_keys())

    def held_keys(self) -> set[str]:
        """The keys `open_keys` counts."""
        return {*self.waiting, *self.open}

    def clear(self) -> None:
        self.open = {}
        self.waiting = {}

    def sweep(self, lower: float) -> None:
        """Forget open questions no event at `lower` or later can answer (waiting matches leave by `due`)."""
        if self.alive_for < math.inf:
            self.open = recent(self.open, lower, self.alive_for)

    def due(self, key: str, deadline: float) -> list[Alert]:
        """The alerts of the key's matches whose silence held until `deadline`; they stop waiting."""
        waiting = self.waiting.get(key)
        if not waiting:
            return []
        fired = [w for w in waiting if w.deadline == deadline]
        kept = [w for w in waiting if w.deadline != deadline]
        if kept:
            self.waiting[key] = kept
        else:
            del self.waiting[key]
        return [alert_of(self.pattern, self.summarize, key, deadline, w.events) for w in fired]

    def match(self, released: Released) -> list[tuple[int, Alert | Deadline]]:
        """Match the released rows: per completed match, the row it completed at and its alert, or (with
        an absence) its deadline, in row order."""
        asks = self.first.fits(released)
        answers = self.then.fits(released)
        breaks = self.absence.fits(released) if self.absence is not None else np.zeros(len(asks), dtype=bool)
        chosen = np.flatnonzero(asks | answers | breaks)
        if not len(chosen):
            return []
        frame = _Frame(released, chosen, self.by_user, self.open, (asks, answers, breaks))
        completed, taken, after = self._complete(frame)
        self._keep_open(frame, after)
        if self.silence is None:
            return self._alerts(frame, completed, taken)
        return self._await(frame, completed, taken)

    def _complete(self, f: _Frame) -> tuple[list[int], list[int], np.ndarray]:
        """The rows of completing answers, the questions they take, and per key the row after its last."""
        asks, answers, times, senders = f.ask, f.answer, f.times, f.senders
        best = _last_before(asks, f.group) if self.then_sender is None else (
            _last_before(asks, f.group * f.n_senders + senders) if self.then_sender[0] == "same"
            else _last_other_before(asks, f.group, senders))
        alive = (best >= 0) & (times - times[np.maximum(best, 0)] <= self.alive_for)
        candidates = np.flatnonzero(answers & alive)
        after = f.starts.copy()
        completed: list[int] = []
        taken: list[int] = []
        questions = np.flatnonzero(asks).tolist()
        time_of, sender_of = times.tolist(), senders.tolist()
        relation = None if self.then_sender is None else self.then_sender[0]
        alive_for = self.alive_for
        at = 0
        for row, last, group in zip(candidates.tolist(), best[candidates].tolist(), f.group[candidates].tolist(),
                                    strict=True):
            since = int(after[group])
            if last < since:
                continue
            while questions[at] < since:
                at += 1
            pick = at
            while True:
                ask = questions[pick]
                accepted = (relation is None or (sender_of[ask] == sender_of[row]) == (relation == "same"))
                if accepted and time_of[row] - time_of[ask] <= alive_for:
                    break
                pick += 1
            completed.append(row)
            taken.append(ask)
            after[group] = row + 1
        return completed, taken, after

    def _keep_open(self, f: _Frame, after: np.ndarray) -> None:
        """Keep each key's questions since its last completion that a later event could still answer."""
        last = f.times[f.ends]
        still = f.ask & (np.arange(f.n) >= after[f.group]) & (last[f.group] - f.times <= self.alive_for)
        f.carry(self.open, np.flatnonzero(still).tolist())

    def _alerts(self, f: _Frame, completed: list[int], taken: list[int]) -> list[tuple[int, Alert | Deadline]]:
        if not completed:
            return []
        found: list[tuple[int, Alert | Deadline]] = [
            (pos, alert_of(self.pattern, self.summarize, f.keys[group], time, match))
            for pos, group, time, match in zip(
                f.pos[completed].tolist(), f.group[completed].tolist(), f.times[completed].tolist(),
                f.matches(taken, completed), strict=True)]
        found.sort(key=lambda item: item[0])
        return found

    def _await(self, f: _Frame, completed: list[int], taken: list[int]) -> list[tuple[int, Alert | Deadline]]:
        """Break the silences the frame's rows break (of matches carried in, and completed here); the
        matches left wait for their deadline."""
        assert self.silence is not None
        names = f.keys
        carried = [(g, key, w) for g, key in enumerate(names) for w in self.waiting.get(key, ())]
        codes = f.sender_codes
        n_new = len(completed)
        groups = np.array([*f.group[completed].tolist(), *(g for g, _, _ in carried)], dtype=np.int64)
        since = np.array([*(row + 1 for row in completed), *(f.starts[g] for g, _, _ in carried)], dtype=np.int64)
        ask_sender = [*f.senders[taken].tolist(), *(codes.get(w.senders[0], -1) for _, _, w in carried)]
        answer_sender = [*f.senders[completed].tolist(), *(codes.get(w.senders[1], -1) for _, _, w in carried)]
        deadlines = np.array([*(f.times[completed] + self.silence).tolist(), *(w.deadline for _, _, w in carried)],
                             dtype=np.float64)
        broken = self._broken(f, groups, since, np.array([ask_sender, answer_sender], dtype=np.int64).reshape(2, -1),
                              deadlines)
        for key in names:
            self.waiting.pop(key, None)
        for (_, key, w), gone in zip(carried, broken[n_new:].tolist(), strict=True):
            if not gone:
                self.waiting.setdefault(key, []).append(w)
        found: list[tuple[int, Alert | Deadline]] = []
        kept = np.flatnonzero(~broken[:n_new])
        if not len(kept):
            return found
        quiet = np.array(completed, dtype=np.int64)[kept]
        matches = f.matches(np.array(taken, dtype=np.int64)[kept].tolist(), quiet.tolist())
        for group, pos, match, deadline in zip(f.group[quiet].tolist(), f.pos[quiet].tolist(), matches,
                                               deadlines[kept].tolist(), strict=True):
            key = names[group]
            self.waiting.setdefault(key, []).append(_Waiting(deadline, match))
            found.append((pos, Deadline(deadline, key)))
        found.sort(key=lambda item: item[0])
        return found

    def _broken(self, f: _Frame, groups: np.ndarray, since: np.ndarray, senders: np.ndarray,
                deadlines: np.ndarray) -> np.ndarray:
        """Per waiting match (its key's group, the first row that can break it, its steps' sender
        codes), whether a row of the key that fits the absence comes at or before its deadline."""
        if not len(groups):
            return np.zeros(0, dtype=bool)
        breaks = f.brk
        test = self.absence_sender
        if test is None:
            first = _first_from(breaks, f.group, groups, since)
        elif test[0] == "same":
            first = _first_from(breaks, f.group * f.n_senders + f.senders, groups * f.n_senders + senders[test[1]],
                                since, absent=senders[test[1]] < 0)
        else:
            first = _first_other_from(breaks, f.group, f.senders, groups, since, senders[test[1]])
        return (first >= 0) & (f.times[np.maximum(first, 0)] <= deadlines)


class _Frame(KeyedRows):
    """The rows a pair matcher looks at: each key's open questions carried in, then the released rows
    that fit one of its predicates (`ask`, `answer`, `brk`: which)."""

    def __init__(self, released: Released, chosen: np.ndarray, by_user: bool, open_questions: dict[str, list[Event]],
                 flags: tuple[np.ndarray, np.ndarray, np.ndarray]) -> None:
        super().__init__(released, chosen, by_user, open_questions)
        asks, answers, breaks = flags
        n = self.n_carried
        self.ask = self.column(np.ones(n, dtype=bool), asks[chosen])
        self.answer = self.column(np.zeros(n, dtype=bool), answers[chosen])
        self.brk = self.column(np.zeros(n, dtype=bool), breaks[chosen])

    def matches(self, questions: list[int], answers: list[int]) -> list[tuple[Event, Event]]:
        """The (question, answer) events of these pairs of rows."""
        events = self.events([*questions, *answers])
        return list(zip(events[:len(questions)], events[len(questions):], strict=True))


def _last_before(flags: np.ndarray, gid: np.ndarray) -> np.ndarray:
    """Per row, the last earlier row with a flag and the same `gid`, or -1."""
    n = len(flags)
    order = np.lexsort((np.arange(n), gid))
    g = gid[order]
    stride = n + 1
    running = np.maximum.accumulate(np.where(flags[order], g * stride + order + 1, g * stride))
    before = np.empty(n, dtype=np.int64)
    before[0] = -1
    before[1:] = running[:-1]
    valid = (before >= 0) & (before // stride == g) & (before % stride > 0)
    found = np.empty(n, dtype=np.int64)
    found[order] = np.where(valid, before % stride - 1, -1)
    return found


def _last_other_before(flags: np.ndarray, group: np.ndarray, senders: np.ndarray) -> np.ndarray:
    """Per row, the last earlier flagged row of its key (`group`, contiguous) from another sender, or -1.

    The last flagged row before it, if from another sender; else the last before that one's run of
    flagged rows from one sender."""
    n = len(flags)
    last = _last_before(flags, group)
    flagged = np.flatnonzero(flags)
    change = _run_starts(flagged, group, senders)
    run_start = np.maximum.accumulate(np.where(change, np.arange(len(flagged)), 0))
    previous = run_start - 1
    before_run = np.full(n, -1, dtype=np.int64)
    ok = previous >= 0
    ok[ok] = group[flagged[previous[ok]]] == group[flagged[ok]]
    before_run[flagged[ok]] = flagged[previous[ok]]
    clipped = np.maximum(last, 0)
    other = np.where(senders[clipped] != senders, last, before_run[clipped])
    return np.where(last >= 0, other, -1)


def _run_starts(flagged: np.ndarray, group: np.ndarray, senders: np.ndarray) -> np.ndarray:
    """Per flagged row (in row order), whether it starts a run of flagged rows of one key and one sender."""
    change = np.ones(len(flagged), dtype=bool)
    change[1:] = (senders[flagged[1:]] != senders[flagged[:-1]]) | (group[flagged[1:]] != group[flagged[:-1]])
    return change


def _first_from(flags: np.ndarray, gid: np.ndarray, query: np.ndarray, since: np.ndarray,
                absent: np.ndarray | None = None) -> np.ndarray:
    """Per query, the first flagged row at or after `since` with `gid` equal to the query's, or -1
    (always -1 where `absent`)."""
    stride = len(flags) + 1
    flagged = np.flatnonzero(flags)
    codes = gid[flagged] * stride + flagged
    order = np.argsort(codes, kind="stable")
    codes, flagged = codes[order], flagged[order]
    at = np.searchsorted(codes, query * stride + since, side="left")
    found = flagged[np.minimum(at, len(flagged) - 1)] if len(flagged) else np.full(len(query), -1)
    hit = (at < len(flagged)) & (gid[np.maximum(found, 0)] == query)
    if absent is not None:
        hit &= ~absent
    return np.where(hit, found, -1)


def _first_other_from(flags: np.ndarray, group: np.ndarray, senders: np.ndarray, query: np.ndarray,
                      since: np.ndarray, sender: np.ndarray) -> np.ndarray:
    """Per query, the first flagged row of its key (`group`, contiguous) at or after `since` whose
    sender is not the query's `sender`, or -1: the first flagged row there, or the first after its
    run of flagged rows from one sender."""
    first = _first_from(flags, group, query, since)
    flagged = np.flatnonzero(flags)
    if not len(flagged):
        return first
    change = _run_starts(flagged, group, senders)
    index = np.arange(len(flagged))
    next_start = np.minimum.accumulate(np.where(change, index, len(flagged))[::-1])[::-1]
    following = np.append(next_start[1:], len(flagged))
    after_run = np.full(len(flags), -1, dtype=np.int64)
    ok = following < len(flagged)
    ok[ok] = group[flagged[following[ok]]] == group[flagged[ok]]
    after_run[flagged[ok]] = flagged[following[ok]]
    clipped = np.maximum(first, 0)
    other = np.where(senders[clipped] != sender, first, after_run[clipped])
    return np.where(first >= 0, other, -1)
