"""Counting patterns matched column-wise (`bursts`) give the alerts the per-event matcher gives."""

from __future__ import annotations

import random
from pathlib import Path
from unittest import mock

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.files.patterns_file import load_patterns
from dataflows.event_frame import events_frame
from dataflows.events import Event, iso
from dataflows.patterns import engine
from dataflows.patterns.bursts import BurstMatcher, is_burst
from dataflows.patterns.definitions import PatternDef, pattern_from_dict
from dataflows.patterns.engine import PatternBook
from tests.dataflows.pattern_replay import replay_alerts

SHIPPED = load_patterns(Path(__file__).parent.parent.parent / "samples" / "patterns.yaml")
T0 = 1_704_103_200.0


def counting(pattern_id: str, times: int, within: float, *, once: bool, where: dict[str, object]) -> PatternDef:
    return pattern_from_dict({
        "id": pattern_id, "key": "user", "within_seconds": within, "emit": "once_per_burst" if once else "every_match",
        "steps": [{"name": "said", "where": where, "times_or_more": times}]})


PATTERNS = (
    *SHIPPED,
    counting("chatty", 3, 4.0, once=False, where={"message": True}),
    counting("shouting", 2, 6.0, once=True, where={"message": True, "text_regex": "[A-Z]{3}"}),
)


def _day(rnd: random.Random, n: int) -> list[tuple[float, Event]]:
    """Chat and conversation events with bursts, quiet gaps, ties, and clocks up to 4 s behind."""
    events, t = [], 0.0
    for line in range(n):
        t += rnd.choice([0.0, 0.4, 0.9, 1.5, 2.0, 3.9, 4.0, 6.0, 10.0, 10.5, 45.0])
        when = round(t + rnd.uniform(-4, 0), 2)
        if rnd.random() < 0.25:
            session, sender = rnd.choice(["s-1", "s-2"]), rnd.choice(["customer", "rm"])
            event = Event(f"in:{line}", session, sender, "message", rnd.choice(["hi", "why?", "OK THEN", "thanks"]),
                          T0 + when, "event", "conversation", "in", line, line, None, None, iso(T0 + when))
        else:
            user = rnd.choice(["ana", "bob", "cat"])
            kind = rnd.choice(["USER_MESSAGE"] * 6 + ["USER_JOINED", "USER_LEFT"])
            text = "" if kind != "USER_MESSAGE" else rnd.choice(["hi", "BUY NOW", "how do I pay?", "thanks"])
            event = Event(f"in:{line}", "room-1", user, kind, text, T0 + when, "event", "chat", "in", line, line,
                          None, user, iso(T0 + when))
        events.append((T0 + t, event))
    return events


def _alerts(events: list[tuple[float, Event]], advance_every: int, pickle_at: int | None) -> list[dict[str, object]]:
    return replay_alerts(PATTERNS, events, advance_every, pickle_at)


@settings(max_examples=40, deadline=None)
@given(st.randoms(use_true_random=False), st.integers(1, 9), st.integers(0, 150))
def test_column_wise_bursts_alert_as_the_per_event_matcher(rnd: random.Random, advance_every: int,
                                                          pickle_at: int) -> None:
    """Same alerts, in the same order, however events are batched into advances and with a
    snapshot taken and restored mid-stream."""
    events = _day(rnd, 150)
    with mock.patch.object(engine, "matcher_for", engine._Matcher):
        expected = _alerts(events, 1, None)
    assert _alerts(events, advance_every, pickle_at) == expected


def test_the_days_exercise_every_counting_pattern() -> None:
    """The differential test's inputs do complete the counting patterns (else it would prove nothing)."""
    fired = {record["pattern"] for seed in range(5) for record in _alerts(_day(random.Random(seed), 150), 3, None)}
    assert {"spam_burst", "chatty", "shouting"} <= fired


def test_only_counting_patterns_without_absence_or_first_event_go_column_wise() -> None:
    book = PatternBook(PATTERNS, 5.0)
    column_wise = {m.pattern.id for m in book._matchers if isinstance(m, BurstMatcher)}
    assert column_wise == {"spam_burst", "chatty", "shouting"}
    with_absence = pattern_from_dict({
        "id": "burst_then_quiet", "key": "user", "within_seconds": 10,
        "steps": [{"name": "said", "where": {"message": True}, "times_or_more": 3}],
        "absence": {"not_followed_by": {"message": True}, "seconds": 30}})
    assert not is_burst(with_absence)


def test_a_mute_and_a_run_survive_between_frames_and_are_swept_when_stale() -> None:
    """Between frames a key keeps fewer than `min` run events and its mute; a sweep forgets what no
    later event can meet."""
    book = PatternBook((next(p for p in SHIPPED if p.id == "spam_burst"),), 0.0)
    (matcher,) = book._matchers
    assert isinstance(matcher, BurstMatcher)

    def say(t: float, user: str) -> list[str]:
        book.add(Event(f"e{t}{user}", "room", user, "USER_MESSAGE", "x", T0 + t, "event", "chat", "in", int(t * 10),
                       int(t * 10), None, user, iso(T0 + t)), T0 + t)
        return [a.key for a in book.advance(T0 + t)]

    assert [say(t, "eve") for t in (0, 1, 2, 3)] == [[], [], [], []]
    assert say(3.5, "bob") == [] and _run_keys(matcher) == ["bob"] + ["eve"] * 4
    assert say(4, "eve") == ["eve"]
    assert matcher.muted == {"eve": T0 + 14} and _run_keys(matcher) == ["bob"]
    assert [say(t, "eve") for t in (13, 14, 23)] == [[], [], []]  # within 10 s of each other: still muted
    assert matcher.muted == {"eve": T0 + 33}
    assert say(400, "ann") == []
    assert matcher.muted == {} and _run_keys(matcher) == ["ann"]
    assert book.open_keys == 1


def _run_keys(matcher: BurstMatcher) -> list[str]:
    """The key of each event the matcher holds in a run, sorted."""
    return sorted(key for key, events in matcher.run.items() for _ in events)


def test_a_snapshot_from_before_predicate_columns_resumes() -> None:
    """A burst matcher pickled when it kept its compiled step and test cache (not a `PredicateColumn`)
    rebuilds its step column on restore and matches as before."""
    spam = next(p for p in SHIPPED if p.id == "spam_burst")
    old = BurstMatcher(spam).__dict__.copy()
    del old["step"]
    old.update(predicate=spam.steps[0].where.compile(), refs={"message": 0}, _tests={})
    restored = BurstMatcher.__new__(BurstMatcher)
    restored.__setstate__(old)
    assert not {"predicate", "refs", "_tests"} & set(restored.__dict__)
    book = PatternBook((spam,), 0.0)
    book._matchers = (restored,)
    fired = []
    for t in range(5):
        book.add(Event(f"e{t}", "room", "eve", "USER_MESSAGE", "x", T0 + t, "event", "chat", "in", t, t, None, "eve",
                       iso(T0 + t)), T0 + t)
        fired += book.advance(T0 + t)
    assert [a.key for a in fired] == ["eve"]


def test_a_snapshot_holding_runs_as_a_frame_resumes() -> None:
    """A burst matcher pickled when it kept its runs as one frame (`key` and `pos` columns) restores
    them per key, and the run goes on from the events carried in."""
    spam = next(p for p in SHIPPED if p.id == "spam_burst")

    def said(t: int) -> Event:
        return Event(f"e{t}", "room", "eve", "USER_MESSAGE", "x", T0 + t, "event", "chat", "in", t, t, None, "eve",
                     iso(T0 + t))

    old = BurstMatcher(spam).__dict__.copy()
    old["run"] = events_frame([said(t) for t in range(4)]).with_columns(key=pl.lit("eve"), pos=pl.lit(-1, pl.Int64))
    restored = BurstMatcher.__new__(BurstMatcher)
    restored.__setstate__(old)
    assert _run_keys(restored) == ["eve"] * 4
    book = PatternBook((spam,), 0.0)
    book._matchers = (restored,)
    book.add(said(4), T0 + 4)
    fired = book.advance(T0 + 4)
    assert [[e["event_id"] for e in a.as_record()["events"]] for a in fired] == [[f"e{t}" for t in range(5)]]
