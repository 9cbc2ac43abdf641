"""Match counting patterns (one open-ended step, no absence: a spam burst) column-wise.

A counting pattern alerts when `min` events that fit its step fall within its bound (`within`) of
each other; with `once_per_burst` the key is then muted until its events stop coming within the
bound of one another. Per key that is a small state machine over the times of fitting events:

- counting from a fresh start `f`, it completes at the first `i >= f + min - 1` with
  `t[i] - t[i - min + 1] <= within` (the `min` events before `i` within the bound), taking those
  events;
- muted after a completion at `i`, it counts afresh from the first `k > i` with
  `t[k] > t[k - 1] + within` (the gap that ends the mute).

So each key's completions and mute ends are the first true positions of two columns after a
pointer: the matcher finds them for every key of a frame at once with `searchsorted`, in as many
rounds as a key has completions in the frame. Between frames a key keeps what the next frame needs:
the events of its current run (fewer than `min`, within the bound of its last one) and, while
muted, the time its mute lasts until. The per-event matcher (`engine._Matcher`) gives the same
alerts; this one exists because a burst pattern visits every message of every user.
"""

from __future__ import annotations

import math

import numpy as np
import polars as pl

from dataflows.events import Event
from dataflows.patterns.alerts import Alert, alert_of
from dataflows.patterns.columns import PredicateColumn, Released
from dataflows.patterns.definitions import PatternDef, ResolvedRole, Summarizer
from dataflows.patterns.keyed import KeyedRows, events_by_key, recent

_COUNTING, _MUTED = 0, 1


def is_burst(pattern: PatternDef) -> bool:
    """Whether `pattern` is a counting pattern this matcher takes: one open-ended step, no absence,
    no test of a key's first event (which would need every event of the key, not only those that fit)."""
    steps = pattern.steps
    return (len(steps) == 1 and steps[0].max_count is None and pattern.absence is None
            and not pattern.uses_first_of_key)


class BurstMatcher:
    """One counting pattern within one `PatternBook`, and its keys' runs and mutes."""

    def __init__(self, pattern: PatternDef) -> None:
        assert is_burst(pattern), f"{pattern.id} is not a counting pattern"
        self.pattern = pattern
        self.retired = False
        self.by_user = pattern.key == "user"
        self.step = PredicateColumn(pattern.steps[0].where, self.by_user, {pattern.steps[0].name: 0})
        self.min = pattern.steps[0].min_count
        self.within = pattern.within_seconds
        self.bound = math.inf if self.within is None else self.within
        self.once = pattern.emit == "once_per_burst"
        self.summarize = Summarizer(pattern)
        self.run: dict[str, list[Event]] = {}
        """Per key, the events of its current run."""
        self.muted: dict[str, float] = {}
        """Muted keys and the time each mute lasts until (an event at or before it extends it)."""

    def __setstate__(self, state: dict[str, object]) -> None:
        # Snapshots from before `PredicateColumn` kept the compiled step and a cache of its tests.
        for stale in ("predicate", "refs", "_tests"):
            state.pop(stale, None)
        if isinstance(state["run"], pl.DataFrame):  # before runs were kept per key
            state["run"] = events_by_key(state["run"])
        self.__dict__.update(state)
        if "step" not in state:
            self.step = PredicateColumn(self.pattern.steps[0].where, self.by_user, {self.pattern.steps[0].name: 0})

    def route(self, kind: str, shape: str, role: ResolvedRole) -> None:
        """No event is visited one by one (see `PatternBook._routes_of`): `match` takes whole frames."""
        return None

    @property
    def open_keys(self) -> int:
        """Keys with a run or a mute."""
        return len(self.muted) + len(self.run)

    def held_keys(self) -> set[str]:
        """The keys `open_keys` counts."""
        return {*self.muted, *self.run}

    def clear(self) -> None:
        self.run = {}
        self.muted = {}

    def sweep(self, lower: float) -> None:
        """Forget run events and mutes no event at `lower` or later can meet."""
        if self.within is not None:
            self.run = recent(self.run, lower, self.within)
        self.muted = {key: until for key, until in self.muted.items() if until >= lower}

    def match(self, released: Released) -> list[tuple[int, Alert]]:
        """Match the released rows that fit the step: the alerts, each with the row it completed at,
        in row order."""
        chosen = np.flatnonzero(self.step.fits(released))
        if not len(chosen):
            return []
        runs = KeyedRows(released, chosen, self.by_user, self.run)
        times, pos, starts, ends, group, keys = runs.times, runs.pos, runs.starts, runs.ends, runs.group, runs.keys
        firsts = starts + np.add.reduceat((pos < 0).astype(np.int64), starts)
        until = np.array([self.muted.get(key, -math.inf) for key in keys], dtype=np.float64)

        rows = np.arange(runs.n)
        back = rows - (self.min - 1)
        completes = (pos >= 0) & (back >= starts[group]) & (times - times[np.maximum(back, 0)] <= self.bound)
        previous = np.full_like(times, math.inf)
        previous[1:] = times[:-1] + (self.within or 0.0)
        previous[firsts] = until  # a key's first new event ends a mute carried in by passing its time
        breaks = times > previous
        pointer, mode, completed = self._rounds(
            np.flatnonzero(completes), np.flatnonzero(breaks), starts, firsts, ends, until, times)

        counting = mode == _COUNTING
        tail = np.flatnonzero(counting[group] & (rows >= pointer[group]) & (times[ends][group] - times <= self.bound))
        runs.carry(self.run, tail.tolist())
        for g, key in enumerate(keys):
            if counting[g]:
                self.muted.pop(key, None)
            else:
                self.muted[key] = float(times[ends[g]]) + (self.within or 0.0)
        return self._alerts(runs, completed)

    def _rounds(self, completes: np.ndarray, breaks: np.ndarray, starts: np.ndarray, firsts: np.ndarray,
                ends: np.ndarray, until: np.ndarray, times: np.ndarray
                ) -> tuple[np.ndarray, np.ndarray, list[int]]:
        """Run every key's state machine over its rows: each key's final pointer (where its current
        run starts) and mode, and the rows where matches completed."""
        muted = times[firsts] <= until
        mode = np.where(muted, _MUTED, _COUNTING)
        pointer = np.where(muted, firsts, starts)
        active = np.arange(len(starts))
        completed: list[int] = []
        while len(active):
            waiting = active[mode[active] == _MUTED]
            counting = active[mode[active] == _COUNTING]
            found_break = _first_at_or_after(breaks, pointer[waiting], ends[waiting])
            resumed = waiting[found_break >= 0]
            pointer[resumed] = found_break[found_break >= 0]
            mode[resumed] = _COUNTING
            found = _first_at_or_after(completes, pointer[counting] + self.min - 1, ends[counting])
            done = counting[found >= 0]
            at = found[found >= 0]
            completed.extend(at.tolist())
            pointer[done] = at + 1
            if self.once:
                mode[done] = _MUTED
            active = np.concatenate([resumed, done])
        return pointer, mode, completed

    def _alerts(self, runs: KeyedRows, completed: list[int]) -> list[tuple[int, Alert]]:
        if not completed:
            return []
        taken = np.concatenate([np.arange(i - self.min + 1, i + 1) for i in completed])
        events = runs.events(taken.tolist())
        alerts = []
        for n, i in enumerate(completed):
            match = tuple(events[n * self.min:(n + 1) * self.min])
            alerts.append((int(runs.pos[i]), alert_of(self.pattern, self.summarize, runs.keys[runs.group[i]],
                                                      float(runs.times[i]), match)))
        alerts.sort(key=lambda found: found[0])
        return alerts


def _first_at_or_after(marks: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per pair, the first of the sorted positions `marks` in `[lo, hi]`, or -1."""
    at = np.searchsorted(marks, lo, side="left")
    found = marks[np.minimum(at, len(marks) - 1)] if len(marks) else np.full(len(lo), -1)
    return np.where((at < len(marks)) & (found <= hi), found, -1)
