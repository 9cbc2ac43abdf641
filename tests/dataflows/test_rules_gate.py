"""The rules gate: `arrived`, `RuleGate` on its own, and the flow joined with a rules stream."""

import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, cast

import orjson
import polars as pl
import pytest
from bytewax.inputs import Source
from bytewax.testing import TestingSink, TestingSource, run_main

from dataflows.events import DeadLetter, Event, LineRef
from dataflows.flow import FlowConfig, build_flow
from dataflows.patterns.definitions import PatternDef, patterns_from_text
from dataflows.rules import Rule, parse_rule, rule_from_dict
from dataflows.rules_gate import RuleGate, RulesMark, arrived
from dataflows.sequencing import Progress, Stamped, replay_items, stamped_frame
from dataflows.timestamps import parse_timestamp
from tests.conftest import run_by_kind
from tests.conftest import jsonl

SAMPLES = Path(__file__).parent.parent.parent / "samples"
RulesInput = Sequence[Rule | RulesMark | DeadLetter]
EventSource = Source[Stamped | DeadLetter | Progress]


def at(clock: str) -> float:
    """Epoch seconds of `clock` (HH:MM or HH:MM:SS) on 2024-03-01, UTC."""
    return parse_timestamp(f"2024-03-01T{clock}Z")


def iso(clock: str) -> str:
    """`clock` on 2024-03-01 as the flow writes timestamps."""
    return f"2024-03-01T{clock if clock.count(':') == 2 else clock + ':00'}+00:00"


def rule(rule_id: str = "bw-1", **overrides: Any) -> Rule:
    """A valid rule (a global blocked_words mask of `darn` unless overridden); `...` removes a field."""
    data = {"id": rule_id, "kind": "blocked_words", "version": 1, "scope": "global",
            "body": {"words": ["darn"], "action": "mask"}, **overrides}
    return rule_from_dict({k: v for k, v in data.items() if v is not ...})


def words(rule_id: str, *terms: str, action: str = "mask", **overrides: Any) -> Rule:
    return rule(rule_id, body={"words": list(terms), "action": action}, **overrides)


def permission(rule_id: str, user: str, role: str, **overrides: Any) -> Rule:
    return rule(rule_id, kind="user_permission", body={"user": user, "role": role}, **overrides)


def feature(rule_id: str, name: str, enabled: bool, **overrides: Any) -> Rule:
    return rule(rule_id, kind="feature_flag", body={"flag": name, "enabled": enabled}, **overrides)


def pattern_rule(rule_id: str, body: dict[str, Any], **overrides: Any) -> Rule:
    return rule(rule_id, kind="pattern", body=body, **overrides)


ANSWERED = {"id": "answered", "key": "session", "within_seconds": 600, "summary": "{senders}", "steps": [
    {"name": "asked", "where": {"message": True, "role": "user"}},
    {"name": "answer", "where": {"message": True, "role": "rm"}}]}
"""A chat user's message, then an RM's: chat senders are RMs only by a `user_permission` rule."""


def event(time: float | None, line: int = 1, session: str = "s-1") -> Event:
    ref = LineRef("in.jsonl", line, line * 100)
    return Event(ref.event_id, session, "customer", "message", f"line {line}", time, "event", "conversation", *ref)


def stamped(time: float | None, line: int = 1, clock: float | None = None) -> tuple[Stamped, float | None]:
    """A released event as the sequencer hands it to the gate: with the clock before it."""
    return Stamped(event(time, line), 0, clock), clock


def released(*pairs: tuple[Stamped, float | None]) -> pl.DataFrame:
    """Released events as a frame, as the shard hands them to the gate (event columns, then `clock`)."""
    return stamped_frame(s for s, _ in pairs).with_columns(
        pl.Series("clock", [clock for _, clock in pairs], dtype=pl.Float64)
    )


def lines_of(frame: pl.DataFrame | None) -> list[int]:
    return [] if frame is None else frame["line"].to_list()


def streamed(lines: list[str]) -> list[Stamped | DeadLetter | Progress]:
    """`replay_items(lines)` with a progress marker after every line, as a replay partition sends
    them: the flow then releases (and windows) events as they come, not all at end of input."""
    items = replay_items(lines)
    out: list[Stamped | DeadLetter | Progress] = []
    for item, after in zip(items, items[1:], strict=False):
        out.append(item)
        if not isinstance(after, Progress):
            out.append(Progress(0, after.event.offset if isinstance(after, Stamped) else after.ref.offset))
    return [*out, items[-1]]


def idle(ticks: int = 300) -> list[RulesMark]:
    """Marks that promise nothing: they hold the rules back while the events flow."""
    return [RulesMark(-math.inf)] * ticks


def run(
    lines: list[str],
    rules: RulesInput | None = (),
    *,
    workers: int = 1,
    events_batch: int = 1,
    **config: Any,
) -> dict[str, list[dict[str, Any]]]:
    """Run the flow on replayed `lines` (progress after each) joined with `rules` (None: no rules stream)."""
    return run_by_kind(lambda output: build_flow(
        cast(EventSource, TestingSource(streamed(lines), batch_size=events_batch)),
        [output],
        FlowConfig(rules=rules is not None, **config),
        rules=None if rules is None else TestingSource(rules),
    ), workers)


def with_end(*items: Rule | RulesMark | DeadLetter) -> list[Rule | RulesMark | DeadLetter]:
    """A rules input that ends with the promise that no rule is still to come."""
    return [*items, RulesMark(math.inf)]


def by_text(out: dict[str, list[dict[str, Any]]], kind: str = "messages") -> dict[str, dict[str, Any]]:
    return {m["text"]: m for m in out[kind]}


def window_texts(out: dict[str, list[dict[str, Any]]]) -> list[str]:
    return sorted(m["text"] for w in out["windows"] for m in w["messages"])


def moderation(record: dict[str, Any]) -> tuple[str, list[tuple[str, int]]]:
    verdict = record["moderation"]
    return verdict["action"], [(r["id"], r["version"]) for r in verdict["rules"]]


@pytest.fixture
def message(conversation: Callable[..., dict[str, Any]]) -> Callable[..., dict[str, Any]]:
    """A conversation message at `clock` (HH:MM[:SS] on 2024-03-01) saying `text`."""

    def make(text: str, clock: str, **overrides: Any) -> dict[str, Any]:
        return conversation(message=text, timestamp=iso(clock), **overrides)

    return make


@pytest.fixture(scope="module")
def patterns() -> tuple[PatternDef, ...]:
    return patterns_from_text((SAMPLES / "patterns.yaml").read_text(), "yaml", "patterns.yaml")


# --- arrived ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("effective", [None, "09:00"])
def test_arrived_moves_an_earlier_or_missing_effective_from_to_the_arrival(effective: str | None) -> None:
    early = rule(effective_from=None if effective is None else iso(effective))
    assert arrived(early, at("10:00")) == rule(effective_from=iso("10:00"))


@pytest.mark.parametrize("effective", ["10:00", "11:00"])
def test_arrived_leaves_an_effective_from_at_or_after_the_arrival(effective: str) -> None:
    later = rule(effective_from=iso(effective))
    assert arrived(later, at("10:00")) is later


@pytest.mark.parametrize("effective", [None, "09:00"])
def test_arrived_without_an_arrival_time_leaves_the_rule(effective: str | None) -> None:
    untimed = rule(effective_from=None if effective is None else iso(effective))
    assert arrived(untimed, None) is untimed


# --- RuleGate ----------------------------------------------------------------------------------------------


def test_gate_admits_only_events_the_rules_stream_has_passed_and_holds_the_rest_in_order() -> None:
    gate = RuleGate()
    gate.mark(RulesMark(10.0))
    admitted = lines_of(gate.admit(released(stamped(5.0, 1), stamped(10.0, 2), stamped(20.0, 3), stamped(7.0, 4))))
    assert admitted == [1, 2]
    assert lines_of(gate.held) == [3, 4], "an event behind a held one waits too (head of line)"
    assert lines_of(gate.admit(released(stamped(8.0, 5)))) == [], "new events queue behind the held ones"
    gate.mark(RulesMark(15.0))
    assert lines_of(gate.admit(None)) == [], "line 3 (t=20) still waits, and everything behind it"
    gate.mark(RulesMark(20.0))
    assert lines_of(gate.admit(None)) == [3, 4, 5]
    assert gate.held is None


def test_gate_holds_everything_timed_before_any_mark_but_not_untimed_events() -> None:
    gate = RuleGate()
    assert lines_of(gate.admit(released(stamped(None, 1), stamped(-1e12, 2)))) == [1]
    assert lines_of(gate.held) == [2]


def test_marks_never_lower_the_gate() -> None:
    gate = RuleGate()
    gate.mark(RulesMark(30.0))
    gate.mark(RulesMark(10.0))
    gate.mark(RulesMark(-math.inf))
    assert gate.until == 30.0
    assert lines_of(gate.admit(released(stamped(25.0)))) == [1]


def test_cap_keeps_the_clock_at_the_first_held_events_clock() -> None:
    gate = RuleGate()
    assert gate.cap(50.0) == 50.0, "nothing held: the clock is free"
    assert gate.cap(None) is None
    gate.admit(released(stamped(20.0, 1, clock=12.0), stamped(30.0, 2, clock=20.0)))
    assert gate.cap(50.0) == 12.0
    assert gate.cap(5.0) == 5.0, "never raises the clock"
    assert gate.cap(None) is None


def test_cap_is_unknown_when_the_first_held_event_has_no_clock() -> None:
    gate = RuleGate()
    gate.admit(released(stamped(20.0, 1, clock=None), stamped(30.0, 2, clock=25.0)))
    assert gate.cap(50.0) is None


def test_release_all_lets_every_held_event_through_in_order() -> None:
    gate = RuleGate()
    gate.admit(released(stamped(20.0, 1), stamped(5.0, 2), stamped(30.0, 3)))
    assert lines_of(gate.release_all(None)) == [1, 2, 3]
    assert gate.held is None
    assert gate.until == math.inf


def test_gate_rules_go_to_its_book() -> None:
    gate = RuleGate()
    gate.add(rule())
    gate.add(rule())
    assert (gate.book.applied, gate.book.stale) == (1, 1)


# --- the flow with a rules stream --------------------------------------------------------------------------


def test_blocked_words_mask_messages_and_windows_and_say_which_rule(message: Callable[..., dict]) -> None:
    out = run(jsonl(message("oh darn it", "10:00:01"), message("fine", "10:00:02")),
              with_end(words("bw-1", "darn", version=3)))
    masked, fine = by_text(out)["oh *** it"], by_text(out)["fine"]
    assert moderation(masked) == ("mask", [("bw-1", 3)])
    assert masked["moderation"]["reasons"] == ["blocked word 'darn' (rule bw-1 v3)"]
    assert moderation(fine) == ("allow", [])
    assert window_texts(out) == ["fine", "oh *** it"]
    assert out["moderated"] == []


def test_blocked_message_goes_only_to_moderated_with_the_reason(message: Callable[..., dict]) -> None:
    out = run(jsonl(message("buy scam link now", "10:00:01"), message("hello", "10:00:02")),
              with_end(words("bw-scam", "scam link", action="block")))
    (blocked,) = out["moderated"]
    assert blocked["text"] == "buy scam link now"
    assert moderation(blocked) == ("block", [("bw-scam", 1)])
    assert blocked["moderation"]["reasons"] == ["blocked word 'scam link' (rule bw-scam v1)"]
    assert [m["text"] for m in out["messages"]] == ["hello"]
    assert window_texts(out) == ["hello"]


def test_flagged_message_passes_unchanged_and_marked(message: Callable[..., dict]) -> None:
    out = run(jsonl(message("a refund please", "10:00:01")), with_end(words("bw-flag", "refund", action="flag")))
    (flagged,) = out["messages"]
    assert flagged["text"] == "a refund please"
    assert moderation(flagged) == ("flag", [("bw-flag", 1)])
    assert window_texts(out) == ["a refund please"]
    assert out["moderated"] == []


def test_muted_user_has_every_message_moderated(chat: Callable[..., dict]) -> None:
    lines = jsonl(chat(username="eve", text="hello", room="r-1", timestamp=at("10:00:01")),
                  chat(username="bob", text="hello", room="r-1", timestamp=at("10:00:02")))
    out = run(lines, with_end(permission("perm-eve", "eve", "muted")))
    (muted,) = out["moderated"]
    assert muted["username"] == "eve"
    assert moderation(muted) == ("block", [("perm-eve", 1)])
    assert muted["moderation"]["role"] == "muted"
    assert [m["username"] for m in out["messages"]] == ["bob"]


def test_a_rule_does_not_touch_messages_before_its_effective_time(message: Callable[..., dict]) -> None:
    lines = jsonl(message("darn early", "09:59:59"), message("darn on time", "10:00"), message("darn later", "10:01"))
    out = run(lines, with_end(words("bw-1", "darn", effective_from=iso("10:00"))))
    assert {m["moderation"]["action"] for m in out["messages"] if m["text"] == "darn early"} == {"allow"}
    assert sorted(m["text"] for m in out["messages"]) == ["*** later", "*** on time", "darn early"]
    assert window_texts(out) == ["*** later", "*** on time", "darn early"]


def test_a_later_version_leaves_earlier_messages_judged_by_the_one_before(message: Callable[..., dict]) -> None:
    lines = jsonl(message("darn", "09:30"), message("heck", "09:31"), message("darn", "10:30"), message("heck", "10:31"))
    rules = with_end(words("bw-1", "darn", effective_from=iso("09:00")),
                     words("bw-1", "heck", action="block", version=2, effective_from=iso("10:00")))
    out = run(lines, rules)
    judged = sorted((m["timestamp"][11:16], m["text"], *moderation(m)) for m in out["messages"])
    assert judged == [("09:30", "***", "mask", [("bw-1", 1)]), ("09:31", "heck", "allow", []),
                      ("10:30", "darn", "allow", [])]
    assert [(m["timestamp"][11:16], moderation(m)) for m in out["moderated"]] == [("10:31", ("block", [("bw-1", 2)]))]


def test_a_stale_version_is_ignored(message: Callable[..., dict]) -> None:
    lines = jsonl(message("darn", "10:00"), message("heck", "10:01"))
    rules = with_end(words("bw-1", "darn", version=2), words("bw-1", "heck", action="block", version=1),
                     words("bw-1", "heck", action="block", version=2))
    out = run(lines, rules)
    assert sorted((m["text"], *moderation(m)) for m in out["messages"]) == [
        ("***", "mask", [("bw-1", 2)]), ("heck", "allow", [])]
    assert out["moderated"] == []


def test_the_rules_gauge_counts_every_stale_version(message: Callable[..., dict]) -> None:
    """The gauge is written to the progress file: its stale count must not stop at the last applied version."""
    rules = with_end(words("bw-1", "darn", version=2), words("bw-1", "heck", version=1),
                     words("bw-1", "heck", version=2))
    gauges: list[tuple[str, dict[str, Any]]] = []
    flow = build_flow(cast(EventSource, TestingSource(replay_items(jsonl(message("darn", "10:00"))))), [], FlowConfig(rules=True, shards=1),
                      rules=TestingSource(rules), gauges=TestingSink(gauges))
    run_main(flow)
    rule_gauges = [(g["rules_version"], g["rules_stale"]) for _, g in gauges if "rules_version" in g]
    assert rule_gauges[-1] == (1, 2)


def test_a_tombstone_removes_a_rule_from_its_effective_time(message: Callable[..., dict]) -> None:
    lines = jsonl(message("darn", "10:04:59"), message("darn", "10:05"), message("darn", "10:06"))
    rules = with_end(words("bw-1", "darn"), rule("bw-1", version=2, deleted=True, body=..., effective_from=iso("10:05")))
    out = run(lines, rules)
    assert sorted((m["timestamp"][11:19], m["text"]) for m in out["messages"]) == [
        ("10:04:59", "***"), ("10:05:00", "darn"), ("10:06:00", "darn")]


def test_a_room_rule_affects_only_that_session(message: Callable[..., dict]) -> None:
    lines = jsonl(message("darn", "10:00", session_id="s-1"), message("darn", "10:00:01", session_id="s-2"))
    out = run(lines, with_end(words("bw-room", "darn", action="block", scope={"room": "s-2"})))
    assert [(m["session_id"], m["text"], m["moderation"]["action"]) for m in out["messages"]] == [("s-1", "darn", "allow")]
    assert [(m["session_id"], moderation(m)) for m in out["moderated"]] == [("s-2", ("block", [("bw-room", 1)]))]


def test_an_invalid_rule_is_a_dead_letter_and_the_flow_goes_on(message: Callable[..., dict]) -> None:
    bad = parse_rule(b'{"id": "bw-bad", "kind": "blocked_words", "version": 1, "scope": "global"}',
                     LineRef("rules.jsonl", 2, 120))
    assert isinstance(bad, DeadLetter)
    out = run(jsonl(message("darn", "10:00")), with_end(words("bw-1", "darn"), bad, words("bw-2", "heck")))
    (dead,) = out["dead_letter"]
    assert (dead["source"], dead["line"], dead["offset"], dead["step"]) == ("rules.jsonl", 2, 120, "rules")
    assert "rule 'bw-bad' v1" in dead["reason"] and "body" in dead["reason"]
    assert [(m["text"], moderation(m)) for m in out["messages"]] == [("***", ("mask", [("bw-1", 1)]))]


def spam(chat: Callable[..., dict], user: str = "eve", room: str = "r-1", count: int = 6) -> list[dict[str, Any]]:
    return [chat(username=user, text=f"buy {i}", room=room, timestamp=at(f"10:00:{i:02d}")) for i in range(count)]


def spam_bursts(out: dict[str, list[dict[str, Any]]]) -> list[str]:
    return [a["key"] for a in out["alerts"] if a["pattern"] == "spam_burst"]


def test_a_disabled_pattern_flag_drops_its_alerts(chat: Callable[..., dict], patterns: tuple[PatternDef, ...]) -> None:
    lines = jsonl(*spam(chat))
    assert spam_bursts(run(lines, with_end(), patterns=patterns)) == ["eve"]
    out = run(lines, with_end(feature("ff-spam", "pattern:spam_burst", False)), patterns=patterns)
    assert spam_bursts(out) == []
    assert all(m["moderation"]["flags"] == {"pattern:spam_burst": False} for m in out["messages"])


def test_a_pattern_flag_only_counts_from_its_effective_time(chat: Callable[..., dict],
                                                            patterns: tuple[PatternDef, ...]) -> None:
    lines = jsonl(*spam(chat))
    off_later = feature("ff-spam", "pattern:spam_burst", False, effective_from=iso("10:05"))
    assert spam_bursts(run(lines, with_end(off_later), patterns=patterns)) == ["eve"]


def test_without_a_rules_stream_messages_carry_no_moderation(message: Callable[..., dict]) -> None:
    out = run(jsonl(message("darn", "10:00")), None)
    (only,) = out["messages"]
    assert "moderation" not in only
    with pytest.raises(ValueError, match="rules=True"):
        build_flow(TestingSource([]), [], FlowConfig(), rules=TestingSource([]))


def test_messages_wait_for_the_rules_stream_until_end_of_input(message: Callable[..., dict]) -> None:
    """A rules stream that never promises anything: messages are judged at end of input by every rule sent."""
    out = run(jsonl(message("darn", "10:00")), [words("bw-1", "darn")])
    assert [m["text"] for m in out["messages"]] == ["***"]


def test_messages_wait_for_rules_that_come_after_them(message: Callable[..., dict]) -> None:
    lines = jsonl(*(message(f"darn {i}", f"10:0{i}") for i in range(5)))
    out = run(lines, [*idle(), *with_end(words("bw-1", "darn", effective_from=iso("10:02")))])
    assert sorted(m["text"] for m in out["messages"]) == ["*** 2", "*** 3", "*** 4", "darn 0", "darn 1"]
    assert window_texts(out) == ["*** 2", "*** 3", "*** 4", "darn 0", "darn 1"]
    assert out["late"] == []


# --- determinism -------------------------------------------------------------------------------------------

MID = "10:02"


def mixed_input(message: Callable[..., dict], chat: Callable[..., dict]) -> list[str]:
    conversations = [
        message(text, f"10:0{minute}:{second:02d}", session_id=f"s-{session}", sender=sender)
        for minute in range(5)
        for second, (session, sender, text) in enumerate([
            (1, "customer", "oh darn it"), (2, "rm", "what the heck"), (3, "customer", "a refund please"),
            (1, "rm", "fine, a scam link"), (2, "customer", "darn darn"), (3, "rm", "hello"),
        ])
    ]
    chats = [chat(username=user, text=f"buy {i} heck", room=f"r-{i % 2}", timestamp=at(f"10:0{i // 10}:{(i * 7) % 60:02d}"))
             for i, user in enumerate(["eve", "zoe"] * 20)]
    bursts = [chat(username="max", text=f"now {i}", room=room, timestamp=at(clock) + i)
              for room, clock in [("r-0", "10:01"), ("r-1", "10:01:40"), ("r-1", "10:03"), ("r-0", "10:03:20")]
              for i in range(6)]
    timeline = sorted([*conversations, *chats, *bursts], key=lambda e: parse_timestamp(e["timestamp"]))
    straggler = message("darn, late", "10:00:50", session_id="s-1")
    return jsonl(*timeline[:40], straggler, *timeline[40:], "not json")


def early_rules() -> list[Rule | DeadLetter]:
    """Rules that take effect at or before `MID`."""
    return [
        words("bw-1", "darn"),
        words("bw-scam", "scam link", action="block", effective_from=iso("10:01")),
        words("bw-flag", "refund", action="flag", scope={"room": "s-3"}),
        permission("perm-zoe", "zoe", "muted", effective_from=iso("10:00:30")),
        parse_rule(b"not json", LineRef("rules.jsonl", 5, 400)),
    ]


def late_rules() -> list[Rule | DeadLetter]:
    """Rules that all take effect after `MID`."""
    return [
        words("bw-1", "heck", action="block", version=2, effective_from=iso("10:03")),
        words("bw-1", "darn", version=1, effective_from=iso("10:04")),
        rule("bw-scam", version=2, deleted=True, body=..., effective_from=iso("10:03:30")),
        feature("ff-spam", "pattern:spam_burst", False, scope={"room": "r-1"}, effective_from=iso("10:02:30")),
        permission("perm-zoe", "zoe", "customer", version=2, effective_from=iso("10:04:10")),
        pattern_rule("pat-answered", ANSWERED, effective_from=iso("10:02:40")),
        permission("perm-max", "max", "rm", effective_from=iso("10:02:50")),
    ]


def canonical(out: dict[str, list[dict[str, Any]]]) -> dict[str, list[bytes]]:
    return {kind: sorted(orjson.dumps(r, option=orjson.OPT_SORT_KEYS) for r in records) for kind, records in out.items()}


def rules_orders() -> dict[str, list[Rule | RulesMark | DeadLetter]]:
    early, late = early_rules(), late_rules()
    stepwise: list[Rule | RulesMark | DeadLetter] = [*early]
    for i, item in enumerate(late):
        still_to_come = min(r.effective_from for r in late[i:] if isinstance(r, Rule) and r.effective_from)
        stepwise += [RulesMark(still_to_come - 1), *idle(30), item]
    return {
        "all at once": with_end(*early, *late),
        "after every event": [*idle(), *with_end(*early, *late)],
        "held at the middle": [*early, RulesMark(at(MID)), *idle(), *late, RulesMark(math.inf)],
        "held at the start": [RulesMark(-math.inf), RulesMark(at("09:00")), *idle(60), *early, RulesMark(at(MID)),
                              RulesMark(at("10:02:10")), *idle(60), *late, RulesMark(math.inf)],
        "a mark before each late rule": [*stepwise, RulesMark(math.inf)],
    }


def test_the_same_input_gives_the_same_outputs_whenever_rules_arrive_and_with_any_shards(
    message: Callable[..., dict], chat: Callable[..., dict], patterns: tuple[PatternDef, ...]
) -> None:
    lines = mixed_input(message, chat)
    runs = {
        (name, shards, batch): canonical(run(lines, rules, shards=shards, events_batch=batch, patterns=patterns))
        for name, rules in rules_orders().items()
        for shards, batch in [(1, 1), (5, 7), (64, 3)]
    }
    expected = runs[("all at once", 1, 1)]
    assert {key for key, got in runs.items() if got != expected} == set()
    assert all(expected[k] for k in ("messages", "moderated", "windows", "dead_letter", "alerts"))
    actions = {orjson.loads(m)["moderation"]["action"] for m in expected["messages"] + expected["moderated"]}
    assert actions == {"allow", "mask", "flag", "block"}
    alerts = list(map(orjson.loads, expected["alerts"]))
    bursts = sorted(a["detected_at"][11:19] for a in alerts if a["pattern"] == "spam_burst")
    assert bursts == ["10:01:04", "10:01:44"], "the burst after the room's flag went off is dropped, max is an RM by 10:03:20"
    answered = [(a["key"], a["summary"], a["detected_at"][11:19]) for a in alerts if a["pattern"] == "answered"]
    assert answered == [("r-0", "eve, max", "10:03:20")], "a pattern rule and the RM role reach the matchers"


BURST = {"id": "burst", "key": "user", "within_seconds": 10, "steps": [
    {"name": "first", "where": {"message": True}}, {"name": "more", "where": {"message": True}, "times": 2}]}
"""A chat user's three messages within 10 s, in any rooms: matched in the user's shard."""


def test_a_user_keyed_pattern_rule_matches_chat_users_across_rooms(chat: Callable[..., dict]) -> None:
    lines = jsonl(*(chat(username="max", text=f"now {i}", room=f"r-{i}", timestamp=at("10:01") + i) for i in range(3)))
    rules = with_end(pattern_rule("pat-burst", BURST))
    for keys in (frozenset({"session", "user"}), frozenset({"user"})):
        alerts = run(lines, rules, shards=4, rule_pattern_keys=keys)["alerts"]
        assert [(a["pattern"], a["key"]) for a in alerts] == [("burst", "max")]


def test_rules_known_to_define_no_user_pattern_give_the_same_outputs_without_chat_events_sent_to_users_shards(
    message: Callable[..., dict], chat: Callable[..., dict]
) -> None:
    lines = mixed_input(message, chat)
    rules = rules_orders()["held at the middle"]
    assert canonical(run(lines, rules, shards=7, rule_pattern_keys=frozenset({"session"}))) == canonical(
        run(lines, rules, shards=7))


def test_rules_known_to_define_no_pattern_give_the_same_outputs_without_pattern_state(
    message: Callable[..., dict], chat: Callable[..., dict]
) -> None:
    lines = mixed_input(message, chat)
    rules = [r for r in rules_orders()["held at the middle"] if not (isinstance(r, Rule) and r.kind == "pattern")]
    without = run(lines, rules, shards=7, rule_pattern_keys=frozenset())
    assert canonical(without) == canonical(run(lines, rules, shards=7))
    assert {m["moderation"]["action"] for m in without["messages"]} > {"allow"}


@pytest.mark.parametrize("workers", [2, 3])
def test_the_same_outputs_with_several_workers(
    message: Callable[..., dict], chat: Callable[..., dict], patterns: tuple[PatternDef, ...], workers: int
) -> None:
    lines = mixed_input(message, chat)
    rules = rules_orders()["held at the middle"]
    assert canonical(run(lines, rules, workers=workers, shards=7, patterns=patterns)) == canonical(
        run(lines, rules, shards=7, patterns=patterns))


def test_pruning_follows_the_clock_in_steps_and_keeps_what_later_messages_need() -> None:
    gate = RuleGate()
    for version, start in ((1, 0.0), (2, 100.0), (3, 200.0)):
        gate.add(rule_from_dict({"id": "bw", "kind": "blocked_words", "version": version,
                                 "effective_from": start, "scope": "global",
                                 "body": {"words": [f"w{version}"], "action": "mask"}}))
    gate.prune(None)
    gate.prune(150.0)
    assert gate.book.held() == 2, "v1 cannot judge anything at 150 or later"
    assert gate.book.judge("w2", time=150.0, user="u", room="r").action == "mask"
    gate.prune(190.0)
    assert gate.book.held() == 2, "pruned again only a minute of clock later"
    gate.prune(210.0)
    assert gate.book.held() == 1 and gate.book.judge("w3", time=210.0, user="u", room="r").action == "mask"
