"""Two-step patterns matched column-wise (`pairs`) give the alerts the per-event matcher gives."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any
from unittest import mock

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.files.patterns_file import load_patterns
from dataflows.event_frame import events_frame
from dataflows.events import Event, iso
from dataflows.patterns import engine
from dataflows.patterns.definitions import PatternDef, pattern_from_dict
from dataflows.patterns.engine import PatternBook
from tests.dataflows.pattern_replay import replay_alerts
from dataflows.patterns.pairs import PairMatcher, is_pair

SHIPPED = load_patterns(Path(__file__).parent.parent.parent / "samples" / "patterns.yaml")
T0 = 1_704_103_200.0


def pair(pattern_id: str, first: dict[str, Any], then: dict[str, Any], *, gap: float | None = None,
         within: float | None = None, absence: dict[str, Any] | None = None, key: str = "session") -> PatternDef:
    answer: dict[str, Any] = {"name": "then", "where": then}
    if gap is not None:
        answer["within_seconds"] = gap
    definition: dict[str, Any] = {"id": pattern_id, "key": key, "steps": [{"name": "first", "where": first}, answer]}
    if within is not None:
        definition["within_seconds"] = within
    if absence is not None:
        definition["absence"] = absence
    return pattern_from_dict(definition)


PATTERNS = (
    *SHIPPED,
    pair("echo", {"message": True}, {"message": True, "same_sender_as": "first"}, gap=5.0),
    pair("reply", {"message": True, "text_regex": "\\?"}, {"message": True}, within=8.0, key="user"),
    pair("handover", {"message": True, "question": True}, {"message": True, "other_sender_than": "first"},
         gap=30.0, absence={"not_followed_by": {"message": True, "other_sender_than": "then"}, "seconds": 6}),
    pair("left_after_answer", {"kind": "USER_JOINED"}, {"message": True, "other_sender_than": "first"}, gap=40.0,
         absence={"not_followed_by": {"same_sender_as": "then"}, "seconds": 12}),
    pair("quiet_room", {"message": True, "thanks": True}, {"message": True, "thanks": False}, gap=20.0,
         absence={"not_followed_by": {"message": True}, "seconds": 4}),
)


def _day(rnd: random.Random, n: int) -> list[tuple[float, Event]]:
    """Chat and conversation events with questions, answers, silences, ties, and clocks up to 4 s behind."""
    events, t = [], 0.0
    for line in range(n):
        t += rnd.choice([0.0, 0.4, 0.9, 1.5, 2.0, 3.9, 4.0, 6.0, 10.0, 12.0, 31.0, 45.0])
        when = round(t + rnd.uniform(-4, 0), 2)
        if rnd.random() < 0.5:
            session, sender = rnd.choice(["s-1", "s-2"]), rnd.choice(["customer", "customer", "rm"])
            text = rnd.choice(["hi", "why?", "how do I pay", "OK", "thanks", "sure thing"])
            event = Event(f"in:{line}", session, sender, "message", text, T0 + when, "event", "conversation", "in",
                          line, line, None, None, iso(T0 + when))
        else:
            user = rnd.choice(["ana", "bob", "cat"])
            kind = rnd.choice(["USER_MESSAGE"] * 6 + ["USER_JOINED", "USER_LEFT"])
            text = "" if kind != "USER_MESSAGE" else rnd.choice(["hi", "where is it?", "it is here", "thanks"])
            event = Event(f"in:{line}", rnd.choice(["room-1", "room-2"]), user, kind, text, T0 + when, "event", "chat",
                          "in", line, line, None, user, iso(T0 + when))
        events.append((T0 + t, event))
    return events


def _alerts(events: list[tuple[float, Event]], advance_every: int, pickle_at: int | None) -> list[dict[str, object]]:
    return replay_alerts(PATTERNS, events, advance_every, pickle_at)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32), st.integers(1, 9), st.integers(0, 150))
def test_column_wise_pairs_alert_as_the_per_event_matcher(seed: int, advance_every: int, pickle_at: int) -> None:
    """Same alerts, in the same order, however events are batched into advances and with a
    snapshot taken and restored mid-stream."""
    events = _day(random.Random(seed), 150)
    with mock.patch.object(engine, "matcher_for", engine._Matcher):
        expected = _alerts(events, 1, None)
    assert _alerts(events, advance_every, pickle_at) == expected


def test_the_days_exercise_every_pair_pattern() -> None:
    """The differential test's inputs do complete the pair patterns (else it would prove nothing)."""
    fired = {record["pattern"] for seed in range(3) for record in _alerts(_day(random.Random(seed), 150), 3, None)}
    assert {"conversation_completion", "echo", "reply", "handover", "left_after_answer", "quiet_room"} <= fired


def test_only_flat_two_step_patterns_go_column_wise() -> None:
    book = PatternBook(PATTERNS, 5.0)
    column_wise = {m.pattern.id for m in book._matchers if isinstance(m, PairMatcher)}
    assert column_wise == {"conversation_completion", "echo", "reply", "handover", "left_after_answer", "quiet_room"}
    nested = pair("nested", {"message": True}, {"any_of": [{"same_sender_as": "first"}, {"kind": "USER_LEFT"}]}, gap=5.0)
    assert not is_pair(nested)
    twice = pattern_from_dict({"id": "twice", "key": "user", "within_seconds": 9, "steps": [
        {"name": "a", "where": {"message": True}, "times": 2}, {"name": "b", "where": {"message": True}}]})
    assert not is_pair(twice)


def test_a_snapshot_holding_open_questions_as_a_frame_resumes() -> None:
    """A pair matcher pickled when it kept its open questions as one frame (with a `key` column)
    restores them per key, and an answer then completes with the question carried in."""
    completion = next(p for p in SHIPPED if p.id == "conversation_completion")
    question = Event("in:0", "s-1", "customer", "message", "why?", T0, "event", "conversation", "in", 0, 0, None, None,
                     iso(T0))
    old = PairMatcher(completion).__dict__.copy()
    old["open"] = events_frame([question]).with_columns(key=pl.lit("s-1"))
    restored = PairMatcher.__new__(PairMatcher)
    restored.__setstate__(old)
    assert restored.open == {"s-1": [question]}
    book = PatternBook((completion,), 0.0)
    book._matchers = (restored,)
    answer = question._replace(event_id="in:1", sender="rm", text="sure", time=T0 + 5, line=1, offset=1,
                               timestamp=iso(T0 + 5))
    book.add(answer, T0 + 5)
    fired = book.advance(T0 + 5) + book.flush()
    assert [(a.key, [e["event_id"] for e in a.as_record()["events"]]) for a in fired] == [("s-1", ["in:0", "in:1"])]
