"""The join of the message stream with the rules stream: Bytewax's stand-in for broadcast state.

Bytewax has no broadcast operator: keys are routed to workers by hash. So the flow replicates
every rule, and every `RulesMark`, to every shard key that messages are spread over (as it does
with replay markers), and each shard keeps the whole rule set in a `RuleBook` next to its
windows: every worker that judges messages holds the full current rules.

Deterministic, temporal judgement. A message at event time t is judged by the rules in effect at
t (`effective_from` <= t). Rules and messages come from different inputs with no order between
them, so a shard holds messages (in order) until the rules stream promises it has sent every rule
that can take effect at or before t: a `RulesMark(until)` says every rule still to come takes
effect after `until`. A rule never takes effect before its own arrival in event time (the
`timestamp` it carries, see `arrived`), so that promise is the rules stream's clock:
- a replayed rules file: the replay clock, and infinity once the file is read (with no pacing,
  at once); a message waits at most one replay tick (0.25 s) for it;
- a live rules topic: the system clock minus a grace, so a silent rules topic holds messages
  for at most the grace and never for ever.
The same input therefore gives the same decisions with any number of workers and at any speed.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import NamedTuple

import numpy as np
import polars as pl

from dataflows.rules import Rule, RuleBook


PRUNE_EVERY_S = 60.0


class RulesMark(NamedTuple):
    """Every rule the rules stream will still send takes effect after event time `until` (inf: none)."""

    until: float


def arrived(rule: Rule, arrival: float | None) -> Rule:
    """`rule` taking effect no earlier than its arrival time (the event time it was sent at).

    A rule that claims an `effective_from` before its own arrival would change decisions already
    made, or not, depending on timing; from its arrival on it does apply.
    """
    if arrival is None or (rule.effective_from is not None and rule.effective_from >= arrival):
        return rule
    return replace(rule, effective_from=arrival)


@dataclass
class RuleGate:
    """One shard's rule set, and the messages waiting for the rules stream to pass their time.

    Messages come and wait as frames of released events (event columns and the `clock` before
    each, in release order).
    """

    book: RuleBook = field(default_factory=RuleBook)
    until: float = -math.inf
    held: pl.DataFrame | None = None
    pruned_at: float = -math.inf

    def add(self, rule: Rule) -> None:
        self.book.add(rule)

    def mark(self, mark: RulesMark) -> None:
        self.until = max(self.until, mark.until)

    def take(self, items: Iterable[RulesItem]) -> None:
        """Apply rules items in the stream's order: rules to the book, marks to the clock."""
        for item in items:
            if isinstance(item, RulesMark):
                self.mark(item)
            else:
                self.add(item)

    def admit(self, released: pl.DataFrame | None) -> pl.DataFrame | None:
        """The held and then the `released` events, in order, up to the first whose time the rules
        stream has not passed (head of line); that one and those behind it wait."""
        parts = [frame for frame in (self.held, released) if frame is not None and not frame.is_empty()]
        if not parts:
            self.held = None
            return None
        waiting = parts[0] if len(parts) == 1 else pl.concat(parts)
        if self.until == math.inf:
            self.held = None
            return waiting
        times = waiting["time"].to_numpy()
        behind = np.flatnonzero(times > self.until)  # NaN (untimed) compares False: always due
        cut = int(behind[0]) if len(behind) else len(waiting)
        self.held = waiting.slice(cut) if cut < len(waiting) else None
        return waiting.slice(0, cut) if cut else None

    def release_all(self, released: pl.DataFrame | None) -> pl.DataFrame | None:
        """At end of input: every held event and `released`, judged by the rules there are."""
        self.until = math.inf
        return self.admit(released)

    def cap(self, clock: float | None) -> float | None:
        """The clock windows may advance to: not past the first held event's, which is still to come."""
        if self.held is None:
            return clock
        before = self.held["clock"][0]
        if clock is None or before is None:
            return None
        return min(clock, float(before))

    def prune(self, horizon: float | None, every: float = PRUNE_EVERY_S) -> None:
        """Forget rule versions no message at `horizon` or later can be judged by, every `every` s of it.

        The shard passes its watermark minus a window: a message older than that (late, in all but
        rare cases) may be judged by a newer version than was in effect at its time. Pruning
        follows the shard's clock, so replays still decide alike.
        """
        if horizon is not None and horizon >= self.pruned_at + every:
            self.pruned_at = horizon
            if self.book.superseded():  # pruning also drops the book's caches: not for nothing
                self.book.prune(horizon)


RulesItem = Rule | RulesMark


class RulesBatch(list[RulesItem]):
    """The rules items of one source batch, in the stream's order, bound for every shard.

    They travel as a value of their own beside the shard's event wires, so a shard tells them
    apart by the batch, not by looking at every event.
    """
