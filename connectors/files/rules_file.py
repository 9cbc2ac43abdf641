"""A rules file as the flow's rules stream, replayed on the same clock as the input.

One partition reads the (small) file at start, then sends each rule when the replay clock reaches
its arrival time (the latest `timestamp` of the rules up to it in the file; a rule without one
arrives with the rule before it, so a file without timestamps is sent at once). After every
batch it sends a `RulesMark` with the replay clock, and infinity once the file is sent: the
promise the flow holds messages on (see `dataflows.rules_gate`). Invalid rules go to the dead
letters with the reason.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import orjson
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from connectors.run.log import log_rules
from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from dataflows.events import DeadLetter, LineRef
from dataflows.patterns.definitions import KeyKind, PatternDef
from dataflows.rules import Rule, parse_rule
from dataflows.rules_gate import RulesMark, arrived
from dataflows.timestamps import TimestampError, parse_timestamp

Item = Rule | RulesMark | DeadLetter
MAX_RULES_BYTES = 64 << 20


def read_rules(path: Path) -> list[tuple[Rule | DeadLetter, float]]:
    """Every line of a rules file, parsed, with its arrival time (-inf before any timestamp).

    Raises:
        ConvoflowError: when the file cannot be read or is too large to be a rules file.
    """
    try:
        if path.stat().st_size > MAX_RULES_BYTES:
            msg = f"--rules {path} is larger than {MAX_RULES_BYTES >> 20} MiB; is it an events file?"
            raise ConvoflowError(msg)
        data = path.read_bytes()
    except OSError as exc:
        msg = f"cannot read --rules {path}: {exc.strerror or exc}"
        raise ConvoflowError(msg) from None
    parsed: list[tuple[Rule | DeadLetter, float]] = []
    arrival = -math.inf
    offset = 0
    for number, line in enumerate(data.splitlines(keepends=True), start=1):
        body = line.rstrip(b"\r\n")
        if body.strip():
            ref = LineRef(path.name, number, offset)
            arrival = max(arrival, _timestamp(body))
            rule = parse_rule(body, ref)
            parsed.append((rule if isinstance(rule, DeadLetter) else arrived(rule, _finite(arrival)), arrival))
        offset += len(line)
    return parsed


def _timestamp(body: bytes) -> float:
    try:
        value = orjson.loads(body).get("timestamp")
        return -math.inf if value is None else parse_timestamp(value)
    except (orjson.JSONDecodeError, AttributeError, TimestampError):
        return -math.inf


def _finite(arrival: float) -> float | None:
    return None if math.isinf(arrival) else arrival


class RulesFileSource(FixedPartitionedSource[Item, int]):
    """Sends the rules of `path` on the replay `clock`; its snapshot is the next line's index."""

    def __init__(self, path: Path, clock: ReplayClock, *, tick: float = 0.25,
                 wall: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.tick = tick
        self.wall = wall

    def list_parts(self) -> list[str]:
        return ["rules"]

    def pattern_keys(self) -> frozenset[KeyKind]:
        """The keys of the patterns the file's valid rules define (chat events go to their users'
        shards only for "user")."""
        return frozenset(rule.body.key for rule, _ in read_rules(self.path)
                         if isinstance(rule, Rule) and isinstance(rule.body, PatternDef))

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> RulesPartition:
        return RulesPartition(read_rules(self.path), self.clock, self.tick, self.wall, resume_state or 0)


class RulesPartition(StatefulSourcePartition[Item, int]):
    def __init__(self, rules: list[tuple[Rule | DeadLetter, float]], clock: ReplayClock, tick: float,
                 wall: Callable[[], float], next_index: int) -> None:
        self.rules = rules
        self.clock = clock
        self.tick = tick
        self.wall = wall
        self.next = next_index
        self.finished = False

    def next_batch(self) -> list[Item]:
        if self.finished:
            raise StopIteration
        now = self.wall()
        batch: list[Item] = []
        while self.next < len(self.rules) and self.clock.wall_time_for(self.rules[self.next][1]) <= now:
            batch.append(self.rules[self.next][0])
            self.next += 1
        log_rules(batch, source="rules file")
        if self.next == len(self.rules):
            batch.append(RulesMark(math.inf))
            self.finished = True
        else:
            replay_now = self.clock.event_time_at(now)
            batch.append(RulesMark(-math.inf if replay_now is None else replay_now))
        return batch

    def next_awake(self) -> datetime | None:
        if self.finished or self.next >= len(self.rules) or not self.clock.paced:
            return None
        due = min(self.clock.wall_time_for(self.rules[self.next][1]), self.wall() + self.tick)
        return None if math.isinf(due) else datetime.fromtimestamp(due, timezone.utc)

    def snapshot(self) -> int:
        return self.next
