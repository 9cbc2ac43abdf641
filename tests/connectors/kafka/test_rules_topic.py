"""The Kafka rules partition without a broker: backlog first, then the system clock minus the grace."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError

from connectors.kafka.rules_topic import KafkaRulesPartition
from dataflows.events import DeadLetter
from dataflows.rules import Rule
from dataflows.rules_gate import RulesMark

TOPIC = "rules"
W0 = 1_800_000_000.0


@dataclass
class Message:
    value_: bytes | None
    offset_: int
    partition_: int = 0
    error_: Any = None

    def value(self) -> bytes | None:
        return self.value_

    def offset(self) -> int:
        return self.offset_

    def partition(self) -> int:
        return self.partition_

    def error(self) -> Any:
        return self.error_


@dataclass
class FakeConsumer:
    polls: list[list[Message]] = field(default_factory=list)
    closed: bool = False

    def consume(self, count: int, timeout: float) -> list[Message]:
        return self.polls.pop(0) if self.polls else []

    def close(self) -> None:
        self.closed = True


@dataclass
class Wall:
    now: float = W0

    def __call__(self) -> float:
        return self.now


def rule(offset: int, version: int = 1, **fields: Any) -> Message:
    body = {"id": "bw", "kind": "blocked_words", "version": version, "scope": "global",
            "body": {"words": ["darn"], "action": "mask"}, **fields}
    return Message(orjson.dumps(body), offset)


def partition(polls: list[list[Message]], ends: dict[int, int], *, tail: bool = True,
              wall: Wall | None = None) -> KafkaRulesPartition:
    return KafkaRulesPartition(FakeConsumer(polls), TOPIC, ends, {}, 1.0, wall or Wall(), tail=tail)


def test_nothing_is_promised_until_the_backlog_is_read_then_the_wall_clock_minus_the_grace() -> None:
    wall = Wall()
    part = partition([[rule(0)], [], [rule(1, 2)]], {0: 2}, wall=wall)
    first = part.next_batch()
    assert isinstance(first[0], Rule) and first[-1] == RulesMark(-math.inf)
    assert first[0].effective_from is None, "a backlog rule without a timestamp is in effect from the beginning"
    assert part.next_batch() == [RulesMark(-math.inf)], "offset 1 of 2 is still to come"
    wall.now += 5
    last = part.next_batch()
    assert last[-1] == RulesMark(W0 + 5 - 1.0)
    assert part.snapshot() == {0: 2}


def test_a_rule_after_the_backlog_takes_effect_no_earlier_than_what_was_promised() -> None:
    wall = Wall()
    part = partition([[], [rule(0, timestamp=W0 - 100)], [rule(1, 2, timestamp=W0 + 30)]], {0: 0}, wall=wall)
    assert part.next_batch() == [RulesMark(W0 - 1.0)], "an empty topic has no backlog"
    wall.now += 10
    late, mark = part.next_batch()
    assert isinstance(late, Rule) and late.effective_from == W0 - 1.0, "clamped to the promise it came after"
    assert mark == RulesMark(W0 + 9.0)
    future, _ = part.next_batch()
    assert isinstance(future, Rule) and future.effective_from == W0 + 30, "a rule for later keeps its time"


def test_bad_rules_and_kafka_errors_are_dead_letters_naming_the_offset() -> None:
    part = partition([[Message(b"{nope", 0), Message(None, 1, error_=KafkaError(KafkaError._MSG_TIMED_OUT))]], {0: 2})
    bad, error, mark = part.next_batch()
    assert isinstance(bad, DeadLetter) and bad.ref.source == "rules/0" and bad.ref.offset == 0
    assert "not JSON" in bad.reason and bad.step == "rules"
    assert isinstance(error, DeadLetter) and error.ref.offset == 1 and "Kafka error" in error.reason
    assert isinstance(mark, RulesMark) and mark.until > -math.inf


def test_a_finite_run_ends_the_rules_stream_after_the_backlog() -> None:
    part = partition([[rule(0)]], {0: 1}, tail=False)
    batch = part.next_batch()
    assert isinstance(batch[0], Rule) and batch[-1] == RulesMark(math.inf)
    with pytest.raises(StopIteration):
        part.next_batch()


def test_an_idle_partition_asks_to_be_polled_again_later_not_at_once() -> None:
    wall = Wall()
    part = partition([[rule(0)]], {0: 1}, wall=wall)
    part.next_batch()
    assert part.next_awake() is None, "it just read something: poll again at once"
    part.next_batch()
    awake = part.next_awake()
    assert awake is not None and awake.timestamp() == pytest.approx(W0 + 0.1)
    part.close()
    assert part.consumer.closed
