"""The rules file as the flow's rules stream: reading it, and sending it on a fake wall clock."""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from connectors.files import rules_file as rules_source
from connectors.files.rules_file import RulesFileSource, RulesPartition, read_rules
from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from dataflows.events import DeadLetter, LineRef
from dataflows.rules import Rule, rule_from_dict
from dataflows.rules_gate import RulesMark
from dataflows.timestamps import parse_timestamp

WALL0 = 1000.0


def at(clock: str) -> float:
    """Epoch seconds of `clock` (HH:MM or HH:MM:SS) on 2024-03-01, UTC."""
    return parse_timestamp(f"2024-03-01T{clock}Z")


def iso(clock: str) -> str:
    return f"2024-03-01T{clock}Z"


class FakeWall:
    def __init__(self, now: float = WALL0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def rule_line(rule_id: str = "bw-1", **overrides: Any) -> dict[str, Any]:
    """A valid rule as a line of the file (a global blocked_words mask); `...` removes a field."""
    data = {"id": rule_id, "kind": "blocked_words", "version": 1, "scope": "global",
            "body": {"words": ["darn"], "action": "mask"}, **overrides}
    return {k: v for k, v in data.items() if v is not ...}


def as_rule(line: dict[str, Any], **changes: Any) -> Rule:
    return rule_from_dict({**line, **changes})


@pytest.fixture
def rules_file(tmp_path: Path) -> Callable[..., Path]:
    """Writes lines (dicts as JSON, strings as they are) to `rules.jsonl`."""

    def write(*lines: dict[str, Any] | str, name: str = "rules.jsonl") -> Path:
        path = tmp_path / name
        path.write_bytes(b"".join((line.encode() if isinstance(line, str) else orjson.dumps(line)) + b"\n"
                                  for line in lines))
        return path

    return write


def partition(path: Path, *, speed: float, wall: FakeWall, tick: float = 0.25,
              resume: int | None = None) -> RulesPartition:
    source = RulesFileSource(path, ReplayClock(at("10:00"), WALL0, speed), tick=tick, wall=wall)
    (part,) = source.list_parts()
    return source.build_part("read_rules", part, resume)


def drain(part: RulesPartition) -> list[Rule | RulesMark | DeadLetter]:
    items: list[Rule | RulesMark | DeadLetter] = []
    while True:
        try:
            items.extend(part.next_batch())
        except StopIteration:
            return items


def awake(part: RulesPartition) -> float:
    """The wall time the partition asks to be polled at next."""
    when = part.next_awake()
    assert when is not None
    return when.timestamp()


def ids(items: list[Any]) -> list[str]:
    return [i.id if isinstance(i, Rule) else type(i).__name__ for i in items]


# --- read_rules --------------------------------------------------------------------------------------------


def test_arrival_is_the_running_max_of_timestamps_and_rules_take_effect_no_earlier(
    rules_file: Callable[..., Path],
) -> None:
    untimed = rule_line("r-untimed")
    early_claim = rule_line("r-early", timestamp=iso("10:00"), effective_from=iso("09:00"))
    older_stamp = rule_line("r-older", timestamp=iso("09:30"), effective_from=iso("11:00"))
    after = rule_line("r-after")
    own_time = rule_line("r-own", timestamp=iso("10:30"))
    parsed = read_rules(rules_file(untimed, early_claim, older_stamp, after, own_time))
    assert parsed == [
        (as_rule(untimed), -math.inf),
        (as_rule(early_claim, effective_from=iso("10:00")), at("10:00")),
        (as_rule(older_stamp), at("10:00")),
        (as_rule(after, effective_from=iso("10:00")), at("10:00")),
        (as_rule(own_time), at("10:30")),
    ]


def test_blank_lines_are_skipped_and_bad_lines_are_dead_letters_naming_file_and_line(
    rules_file: Callable[..., Path],
) -> None:
    first = orjson.dumps(rule_line("r-1", timestamp=iso("10:00"))).decode()
    unknown_kind = orjson.dumps(rule_line("r-bad", kind="nope", timestamp=iso("10:45"))).decode()
    path = rules_file(first, "", "   ", "not json", unknown_kind, "[1, 2]", rule_line("r-2"))
    parsed = read_rules(path)
    assert ids([item for item, _ in parsed]) == ["r-1", "DeadLetter", "DeadLetter", "DeadLetter", "r-2"]
    dead = [item for item, _ in parsed if isinstance(item, DeadLetter)]
    offset_of_4 = len(first) + 1 + 1 + 4
    assert [d.ref for d in dead] == [LineRef("rules.jsonl", 4, offset_of_4),
                                    LineRef("rules.jsonl", 5, offset_of_4 + 9),
                                    LineRef("rules.jsonl", 6, offset_of_4 + 9 + len(unknown_kind) + 1)]
    assert {d.step for d in dead} == {"rules"}
    assert dead[0].raw == "not json" and dead[0].reason.startswith("not JSON")
    assert "unknown kind 'nope'" in dead[1].reason
    assert "rule 'r-bad' v1" in dead[1].reason
    assert "JSON object" in dead[2].reason
    assert [arrival for _, arrival in parsed] == [at("10:00")] * 2 + [at("10:45")] * 3, (
        "a rejected line's timestamp still moves the arrival time")
    assert parsed[-1][0] == as_rule(rule_line("r-2"), effective_from=iso("10:45"))


def test_crlf_lines_and_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "rules.jsonl"
    path.write_bytes(orjson.dumps(rule_line("r-1")) + b"\r\n\r\n" + orjson.dumps(rule_line("r-2", timestamp=iso("10:00"))))
    parsed = read_rules(path)
    assert (ids([item for item, _ in parsed]), [arrival for _, arrival in parsed]) == (["r-1", "r-2"], [-math.inf, at("10:00")])


def test_an_unreadable_timestamp_does_not_move_the_arrival(rules_file: Callable[..., Path]) -> None:
    parsed = read_rules(rules_file(rule_line("r-1", timestamp=iso("10:00")), rule_line("r-2", timestamp=True),
                                   rule_line("r-3", timestamp="soon")))
    assert [arrival for _, arrival in parsed] == [at("10:00")] * 3
    assert [type(item) for item, _ in parsed] == [Rule, DeadLetter, DeadLetter]


def test_an_empty_file_has_no_rules(rules_file: Callable[..., Path]) -> None:
    assert read_rules(rules_file()) == []


def test_a_file_over_the_size_limit_is_refused(rules_file: Callable[..., Path], monkeypatch: pytest.MonkeyPatch) -> None:
    path = rules_file(rule_line())
    monkeypatch.setattr(rules_source, "MAX_RULES_BYTES", path.stat().st_size - 1)
    with pytest.raises(ConvoflowError, match=r"rules\.jsonl is larger than"):
        read_rules(path)
    monkeypatch.setattr(rules_source, "MAX_RULES_BYTES", path.stat().st_size)
    assert len(read_rules(path)) == 1


def test_a_missing_file_is_a_convoflow_error(tmp_path: Path) -> None:
    with pytest.raises(ConvoflowError, match=r"cannot read --rules .*missing\.jsonl"):
        read_rules(tmp_path / "missing.jsonl")


# --- RulesPartition ----------------------------------------------------------------------------------------


@pytest.fixture
def timed_rules(rules_file: Callable[..., Path]) -> Path:
    """An untimed rule, one at 10:00, a bad line at 10:00:05, rules at 10:00:10 and 10:00:20."""
    return rules_file(rule_line("r-0"), rule_line("r-1", timestamp=iso("10:00:00")),
                      '{"timestamp": "2024-03-01T10:00:05Z"}',
                      rule_line("r-2", timestamp=iso("10:00:10")), rule_line("r-3", timestamp=iso("10:00:20")))


def test_unpaced_sends_every_rule_then_the_end_mark_at_once(timed_rules: Path) -> None:
    wall = FakeWall()
    part = partition(timed_rules, speed=0, wall=wall)
    batch = part.next_batch()
    assert ids(batch) == ["r-0", "r-1", "DeadLetter", "r-2", "r-3", "RulesMark"]
    assert batch[-1] == RulesMark(math.inf)
    assert part.next_awake() is None
    assert part.snapshot() == 5
    with pytest.raises(StopIteration):
        part.next_batch()


def test_an_empty_rules_file_sends_only_the_end_mark(rules_file: Callable[..., Path]) -> None:
    assert drain(partition(rules_file(), speed=2, wall=FakeWall())) == [RulesMark(math.inf)]


def test_paced_sends_rules_as_they_come_due_with_the_replay_clock(timed_rules: Path) -> None:
    wall = FakeWall()
    part = partition(timed_rules, speed=2, wall=wall, tick=0.25)
    first = part.next_batch()
    assert ids(first) == ["r-0", "r-1", "RulesMark"]
    assert first[-1] == RulesMark(at("10:00"))
    assert awake(part) == pytest.approx(WALL0 + 0.25), "ticks while the next rule is far"
    wall.now = WALL0 + 2.4
    waiting = part.next_batch()
    assert ids(waiting) == ["RulesMark"]
    assert isinstance(waiting[0], RulesMark)
    assert waiting[0].until == pytest.approx(at("10:00") + 4.8)
    assert awake(part) == pytest.approx(WALL0 + 2.5), "the bad line is due at 10:00:05"
    wall.now = WALL0 + 5.0
    assert ids(part.next_batch()) == ["DeadLetter", "r-2", "RulesMark"]
    assert part.snapshot() == 4
    assert awake(part) == pytest.approx(WALL0 + 5.25)
    wall.now = WALL0 + 9.9
    assert awake(part) == pytest.approx(WALL0 + 10.0), "wakes when the next rule is due"
    wall.now = WALL0 + 10.0
    assert part.next_batch() == [as_rule(rule_line("r-3", timestamp=iso("10:00:20"))), RulesMark(math.inf)]
    assert part.next_awake() is None
    with pytest.raises(StopIteration):
        part.next_batch()


def test_marks_promise_that_every_rule_still_to_come_takes_effect_later(timed_rules: Path) -> None:
    wall = FakeWall(WALL0 - 3.0)
    part = partition(timed_rules, speed=2, wall=wall)
    items: list[Rule | RulesMark | DeadLetter] = []
    while True:
        try:
            items += part.next_batch()
        except StopIteration:
            break
        wall.now += 0.7
    marks = [(i, m.until) for i, m in enumerate(items) if isinstance(m, RulesMark)]
    for i, until in marks:
        later = [r for r in items[i:] if isinstance(r, Rule)]
        assert all(r.effective_from is not None and r.effective_from > until for r in later), until
    assert [until for _, until in marks] == sorted(until for _, until in marks)
    assert marks[0][1] == pytest.approx(at("10:00") - 6.0)
    assert marks[-1][1] == math.inf
    assert [r.id for r in items if isinstance(r, Rule)] == ["r-0", "r-1", "r-2", "r-3"]


def test_resuming_from_the_snapshot_continues_without_repeating(timed_rules: Path) -> None:
    wall = FakeWall(WALL0 + 5.0)
    part = partition(timed_rules, speed=2, wall=wall)
    before = part.next_batch()
    state = part.snapshot()
    assert state == 4
    wall.now = WALL0 + 10.0
    resumed = partition(timed_rules, speed=2, wall=wall, resume=state)
    after = drain(resumed)
    assert ids(before) + ids(after) == ["r-0", "r-1", "DeadLetter", "r-2", "RulesMark", "r-3", "RulesMark"]
    assert after[-1] == RulesMark(math.inf)
    assert drain(part) == after, "the original partition would have sent the same"


def test_resuming_after_the_end_sends_only_the_end_mark(timed_rules: Path) -> None:
    part = partition(timed_rules, speed=0, wall=FakeWall())
    drain(part)
    assert drain(partition(timed_rules, speed=0, wall=FakeWall(), resume=part.snapshot())) == [RulesMark(math.inf)]


def test_pattern_keys_are_those_of_the_files_valid_pattern_rules(rules_file: Callable[..., Path]) -> None:
    def pattern(rule_id: str, key: str) -> dict[str, Any]:
        return rule_line(rule_id, kind="pattern", body={"id": rule_id, "key": key, "within_seconds": 10,
                                                         "steps": [{"name": "one", "where": {"message": True}}]})

    clock = ReplayClock(0.0, 0.0, 0.0)
    assert RulesFileSource(rules_file(rule_line()), clock).pattern_keys() == frozenset()
    session_only = rules_file(rule_line(), pattern("p-1", "session"), {**pattern("p-2", "user"), "kind": "nope"})
    assert RulesFileSource(session_only, clock).pattern_keys() == frozenset({"session"})
    both = rules_file(pattern("p-1", "session"), pattern("p-2", "user"), name="both.jsonl")
    assert RulesFileSource(both, clock).pattern_keys() == frozenset({"session", "user"})
