"""The pattern engine on the shipped patterns: matches, near misses, absences, order, bounded state."""

from __future__ import annotations

import pickle
import random
from pathlib import Path
from unittest import mock

import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.event_frame import events_frame
from dataflows.events import Event, iso
from connectors.files.patterns_file import load_patterns
from dataflows.patterns.definitions import PatternDef, ResolvedRole, pattern_from_dict
from dataflows.patterns.alerts import Alert
from dataflows.patterns import engine
from dataflows.patterns.engine import PatternBook
from dataflows.rules import Rule, RuleBook, rule_from_dict

PATTERNS = {p.id: p for p in load_patterns(Path(__file__).parent.parent.parent / "samples" / "patterns.yaml")}
T0 = 1_704_103_200.0


class Feed:
    """Builds events with increasing offsets and feeds them to a book for one pattern."""

    def __init__(self, *patterns: str | PatternDef, ooo: float = 5.0, rules: RuleBook | None = None) -> None:
        self.book = PatternBook(tuple(PATTERNS[p] if isinstance(p, str) else p for p in patterns), ooo)
        self.rules = rules
        self.offset = 0
        self.alerts: list[Alert] = []

    def chat(self, t: float, user: str, kind: str = "USER_MESSAGE", text: str = "hi", room: str | None = "room-1",
             role: ResolvedRole | None = None) -> Event:
        return self._add(t, room or user, user, kind, text, "chat", user, role)

    def convo(self, t: float, session: str, sender: str, text: str) -> Event:
        return self._add(t, session, sender, "message", text, "conversation", None, None)

    def _add(self, t: float, session: str, sender: str, kind: str, text: str, shape: str, username: str | None,
             role: ResolvedRole | None) -> Event:
        self.offset += 1
        event = Event(f"in:{self.offset}", session, sender, kind, text, T0 + t, "event", shape, "in", self.offset,
                      self.offset, None, username, iso(T0 + t))
        self.book.add(event, None, role, self.rules)
        return event

    def at(self, t: float) -> list[Alert]:
        """Advance the clock to T0 + t and collect what fired."""
        fired = self.book.advance(T0 + t, self.rules)
        self.alerts.extend(fired)
        return fired

    def end(self) -> list[Alert]:
        fired = self.book.flush(self.rules)
        self.alerts.extend(fired)
        return fired


def ids(alerts: list[Alert]) -> list[tuple[str, str]]:
    return [(a.pattern, a.key) for a in alerts]


# spam_burst

def test_spam_burst_alerts_once_per_burst() -> None:
    feed = Feed("spam_burst")
    for i in range(9):
        feed.chat(i, "eve", text=f"buy {i}")
    feed.at(100)
    (alert,) = feed.alerts
    assert (alert.pattern, alert.key, len(alert.events)) == ("spam_burst", "eve", 5)
    assert alert.detected_at == T0 + 4
    assert "eve sent 5 messages" in alert.summary


def test_spam_burst_near_misses() -> None:
    feed = Feed("spam_burst")
    for i in range(4):
        feed.chat(i, "ann")  # one message too few
    for i in range(5):
        feed.chat(100 + i * 2.6, "bob")  # five messages spread over 10.4 s: one second too late
    for i in range(5):
        feed.chat(200 + i, "cat" if i != 2 else "dan")  # another user's message in between
    feed.end()
    assert feed.alerts == []


def test_spam_burst_again_after_a_quiet_gap() -> None:
    feed = Feed("spam_burst")
    for start in (0, 30):
        for i in range(5):
            feed.chat(start + i, "eve")
    feed.end()
    assert [a.detected_at - T0 for a in feed.alerts] == [4, 34]


def test_spam_burst_counts_only_the_messages_within_its_bound() -> None:
    """A message that falls out of the 10 s bound leaves the burst; the ones after it still count."""
    feed = Feed("spam_burst")
    for t in (0, 8, 9, 10, 11):
        feed.chat(t, "eve", text=f"m{t}")
    feed.at(30)
    assert feed.alerts == []  # 0..11 spans 11 s; 8..11 is four messages
    feed.chat(31, "eve", text="m12")  # not one burst with 8..11: 23 s later
    feed.end()
    assert feed.alerts == []
    late = Feed("spam_burst")
    for t in (0, 8, 9, 10, 11, 12):
        late.chat(t, "eve", text=f"m{t}")
    late.end()
    (alert,) = late.alerts
    assert [e.text for e in alert.events] == ["m8", "m9", "m10", "m11", "m12"]


def test_a_repeated_step_without_a_mute_matches_again_after_each_match() -> None:
    chatty = pattern_from_dict({"id": "chatty", "key": "user", "within_seconds": 5,
                                "steps": [{"name": "said", "where": {"message": True}, "times_or_more": 3}]})
    feed = Feed(chatty)
    for t in range(7):
        feed.chat(t, "eve", text=f"m{t}")
    feed.end()
    assert [[e.text for e in a.events] for a in feed.alerts] == [["m0", "m1", "m2"], ["m3", "m4", "m5"]]


def test_a_snapshot_holding_every_partial_match_of_a_burst_resumes_it() -> None:
    """Books of earlier versions matched bursts per event, keeping one partial match per message of a
    burst: such a snapshot still resumes, the earliest partial match holding them all."""
    with mock.patch.object(engine, "matcher_for", engine._Matcher):
        feed = Feed("spam_burst")
    events = [feed.chat(t, "eve", text=f"m{t}") for t in (0, 1, 2)]
    feed.at(10)
    (state,) = feed.book._matchers[0].states.values()
    state.partials = [(0, 3 - i, T0 + i, T0 + 2, tuple(events[i:]), ("eve",)) for i in range(3)]
    feed.book = pickle.loads(pickle.dumps(feed.book))
    for t in (3, 4):
        feed.chat(t, "eve", text=f"m{t}")
    feed.end()
    (alert,) = feed.alerts
    assert [e.text for e in alert.events] == ["m0", "m1", "m2", "m3", "m4"]


def test_conversation_senders_that_cannot_start_a_user_pattern_leave_no_state() -> None:
    """A conversation user's key is `session/sender`: an RM never bursts as a customer, and a
    conversation message never joins, so neither needs state (not even as a key seen)."""
    feed = Feed("spam_burst", "abandonment")
    for t in range(10):
        feed.convo(t, "s-1", "rm", f"answer {t}")
        feed.convo(t + 0.5, "s-1", "customer", "ok")
    feed.at(20)
    assert ids(feed.alerts) == [("spam_burst", "s-1/customer")]
    held = {(m.pattern.id, key) for m in feed.book._matchers for key in m.held_keys()}
    assert held == {("spam_burst", "s-1/customer")}  # the burst's mute


# engagement

def test_engagement_join_question_answer_thanks() -> None:
    feed = Feed("engagement")
    feed.chat(0, "ana", kind="USER_JOINED", text="")
    feed.chat(3, "ana", text="How do I reset my PIN?")
    feed.chat(9, "rm-joe", text="Use the app settings.")
    feed.chat(12, "ana", text="gracias!")
    feed.end()
    (alert,) = feed.alerts
    assert [e.text for e in alert.events] == ["", "How do I reset my PIN?", "Use the app settings.", "gracias!"]


@pytest.mark.parametrize("broken", ["no_answer", "wrong_order", "self_answer"])
def test_engagement_near_misses(broken: str) -> None:
    feed = Feed("engagement")
    feed.chat(0, "ana", kind="USER_JOINED", text="")
    if broken == "wrong_order":
        feed.chat(1, "ana", text="thanks")
    feed.chat(3, "ana", text="How do I reset my PIN?")
    if broken == "self_answer":
        feed.chat(5, "ana", text="Found it in settings.")
    elif broken != "no_answer":
        feed.chat(9, "rm-joe", text="Use the app settings.")
    if broken != "wrong_order":
        feed.chat(12, "ana", text="thank you")
    feed.end()
    assert feed.alerts == []


# abandonment

def test_abandonment_fires_by_timer_when_nothing_arrives() -> None:
    feed = Feed("abandonment")
    feed.chat(0, "zoe", kind="USER_JOINED", text="")
    assert feed.at(124.9) == [], "the deadline (120 s) must be passed by the watermark (clock - 5 s)"
    (alert,) = feed.at(125.1)
    assert (alert.key, alert.detected_at) == ("zoe", T0 + 120)


def test_abandonment_fires_at_end_of_input() -> None:
    feed = Feed("abandonment")
    feed.chat(0, "zoe", kind="USER_JOINED", text="")
    assert ids(feed.end()) == [("abandonment", "zoe")]


def test_abandonment_does_not_fire_when_the_message_is_in_time() -> None:
    feed = Feed("abandonment")
    feed.chat(0, "zoe", kind="USER_JOINED", text="")
    feed.chat(120, "zoe", text="hello?")
    feed.chat(0.5, "max", kind="USER_JOINED", text="")
    feed.chat(121, "max", text="too late")
    feed.end()
    assert ids(feed.alerts) == [("abandonment", "max")]


# conversation completion

def test_completion_asks_anything_else_after_30s_of_silence() -> None:
    feed = Feed("conversation_completion")
    feed.convo(0, "s-1", "customer", "Why was my card blocked?")
    feed.convo(10, "s-1", "rm", "A suspicious payment; it is unblocked now.")
    assert feed.at(44) == []
    (alert,) = feed.at(46)
    assert (alert.key, alert.detected_at) == ("s-1", T0 + 40)
    assert alert.summary.startswith("ask: anything else?")


def test_completion_is_cancelled_by_a_customer_follow_up() -> None:
    feed = Feed("conversation_completion")
    feed.convo(0, "s-1", "customer", "Why was my card blocked?")
    feed.convo(10, "s-1", "rm", "A suspicious payment.")
    feed.convo(35, "s-1", "customer", "ok, which one")
    feed.end()
    assert feed.alerts == []


# order, state

def _random_chat_day(rnd: random.Random, n: int) -> list[tuple[float, str, str, str]]:
    users = ["ana", "bob", "cat", "dan"]
    events, t = [], 0.0
    for _ in range(n):
        t += rnd.choice([0.3, 0.7, 1.1, 2.9, 6.0, 40.0])
        user = rnd.choice(users)
        kind = rnd.choice(["USER_MESSAGE"] * 6 + ["USER_JOINED"])
        text = rnd.choice(["hi", "how do I pay?", "thanks", "sure", "Use the app."])
        events.append((round(t, 3), user, kind, "" if kind == "USER_JOINED" else text))
    return events


def _alerts_for(events: list[tuple[float, str, str, str]]) -> list[tuple[str, str, float, tuple[str, ...]]]:
    feed = Feed(*PATTERNS)
    for t, user, kind, text in events:
        feed.chat(t, user, kind=kind, text=text)
        feed.at(max(e[0] for e in events[: events.index((t, user, kind, text)) + 1]))
    feed.end()
    return sorted((a.pattern, a.key, a.detected_at, tuple(e.text for e in a.events)) for a in feed.alerts)


@settings(max_examples=25, deadline=None)
@given(st.randoms(use_true_random=False))
def test_arrival_order_within_the_bound_does_not_change_alerts(rnd: random.Random) -> None:
    events = _random_chat_day(rnd, 60)
    shuffled = sorted(events, key=lambda e: e[0] + rnd.uniform(0, 4.9))
    assert _alerts_for(shuffled) == _alerts_for(events)


def test_state_does_not_grow_with_finished_sessions() -> None:
    feed = Feed(*PATTERNS)
    sizes = []
    for s in range(400):
        t = s * 300.0
        feed.convo(t, f"s-{s}", "customer", "Why is my transfer late?")
        feed.convo(t + 5, f"s-{s}", "rm", "It was held for review.")
        feed.convo(t + 9, f"s-{s}", "customer", "thanks")
        feed.at(t + 20)
        sizes.append(feed.book.open_keys + feed.book.buffered + len(feed.book.deadlines))
    assert max(sizes[200:]) <= max(sizes[:50]) + 2


def test_pattern_arriving_as_a_dict_works_like_the_file() -> None:
    spam: PatternDef = pattern_from_dict(PATTERNS["spam_burst"].model_dump(mode="json"))
    book = PatternBook((spam,), 5.0)
    for i in range(5):
        book.add(Event(f"e{i}", "r", "eve", "USER_MESSAGE", "x", T0 + i, "event", "chat", "in", i, i, None, "eve",
                       iso(T0 + i)), None)
    assert [a.pattern for a in book.flush()] == ["spam_burst"]


def test_first_of_key_is_remembered_from_events_no_step_can_take() -> None:
    """A message cannot start `abandonment`, yet it makes its sender's later events not the first."""
    feed = Feed("abandonment")
    feed.chat(0, "ann", text="hi all")
    feed.chat(5, "ann", kind="USER_TYPING", text="")
    feed.chat(6, "bob", kind="USER_TYPING", text="")
    feed.end()
    assert ids(feed.alerts) == [("abandonment", "bob")]


def test_first_of_key_does_not_depend_on_when_the_book_sweeps() -> None:
    """A key's first event is its first within the pattern's horizon (120 s for `abandonment`),
    whether or not a sweep has forgotten the key yet: the flow advances books once per source batch,
    so when sweeps run depends on batching, and with it on the number of workers."""
    def alerts(advances: tuple[float, ...]) -> list[tuple[str, str]]:
        feed = Feed("abandonment")
        feed.chat(-150, "bob", text="morning")
        feed.at(-150)
        feed.chat(0, "ann", text="hi all")
        for t in advances:
            feed.at(t)
        feed.chat(200, "ann", kind="USER_TYPING", text="")
        feed.end()
        return ids(feed.alerts)

    assert alerts(()) == alerts((160.0,)) == [("abandonment", "ann")]


def test_a_book_pickled_mid_stream_resumes_with_the_same_alerts() -> None:
    """Shard state is pickled for every snapshot: a restored book must carry on as the original."""
    events = _random_chat_day(random.Random(7), 120)
    straight, resumed = Feed(*PATTERNS), Feed(*PATTERNS)
    for i, (t, user, kind, text) in enumerate(events):
        if i == len(events) // 2:
            resumed.book = pickle.loads(pickle.dumps(resumed.book))
        for feed in (straight, resumed):
            feed.chat(t, user, kind=kind, text=text)
            feed.at(t)
    assert [a.as_record() for a in resumed.end()] == [a.as_record() for a in straight.end()]
    assert [a.as_record() for a in resumed.alerts] == [a.as_record() for a in straight.alerts]
    assert straight.alerts, "the day should match something"


def test_a_mute_holds_for_an_event_that_arrives_after_the_watermark_passed_it() -> None:
    """Events a pattern cannot take still keep its muted key from being swept as quiet.

    The watermark may run ahead of the clock events arrive at (it follows every partition); an
    event behind it but within the bound of its own arrival is still matched, in the key's mute.
    """
    burst = pattern_from_dict({"id": "talk", "key": "session", "emit": "once_per_burst", "within_seconds": 60,
                               "steps": [{"name": "said", "where": {"kind": "message"}}]})
    book = PatternBook((burst,), 1.0)

    def event(t: float, kind: str, line: int) -> Event:
        return Event(f"in:{line}", "s-1", "customer", kind, "hi", T0 + t, "event", "conversation", "in", line, line,
                     None, None, iso(T0 + t))

    book.add(event(0, "message", 1), T0)
    book.add(event(18.3, "USER_MESSAGE", 2), T0 + 18.3)
    alerts = book.advance(T0 + 68)
    book.add(event(47.5, "message", 3), T0 + 48)
    alerts += book.flush()
    assert [(a.pattern, a.detected_at - T0) for a in alerts] == [("talk", 0.0)]


# patterns that change while the flow runs

BURST_OF_3 = {"id": "burst", "key": "user", "within_seconds": 10,
              "steps": [{"name": "said", "where": {"message": True}, "times": 3}]}


def pattern_rule(body: dict[str, object], t: float, version: int = 1, rule_id: str = "pat-1",
                 **fields: object) -> Rule:
    """A global `pattern` rule defining `body`, effective from T0 + t."""
    return rule_from_dict({"id": rule_id, "kind": "pattern", "version": version, "scope": "global",
                           "effective_from": T0 + t, "body": body, **fields})


def test_a_pattern_rule_matches_only_events_from_its_effective_time() -> None:
    feed = Feed(rules=RuleBook([pattern_rule(BURST_OF_3, 100)]))
    for t in (97, 98, 99, 100, 101):
        feed.chat(t, "eve")
    feed.at(200)
    for t in (300, 301, 302):
        feed.chat(t, "ann")
    feed.end()
    assert [(a.key, [e.time - T0 for e in a.events]) for a in feed.alerts] == [
        ("ann", [300, 301, 302])], "eve's messages before 100 cannot count towards a burst from 100 on"


def test_an_unchanged_pattern_keeps_its_partial_matches_when_another_arrives() -> None:
    burst = pattern_from_dict(BURST_OF_3)
    feed = Feed(burst, rules=RuleBook([pattern_rule({**BURST_OF_3, "id": "other"}, 100)]))
    for t in (98, 99, 100):
        feed.chat(t, "eve")
    feed.end()
    assert [(a.pattern, [e.time - T0 for e in a.events]) for a in feed.alerts] == [("burst", [98, 99, 100])]


def test_a_redefined_pattern_starts_afresh_and_alerts_by_its_new_definition() -> None:
    burst = pattern_from_dict(BURST_OF_3)
    feed = Feed(burst, rules=RuleBook([pattern_rule({**BURST_OF_3, "severity": "critical"}, 100)]))
    for t in (98, 99, 100, 101, 102):
        feed.chat(t, "eve")
    feed.end()
    assert [(a.severity, [e.time - T0 for e in a.events]) for a in feed.alerts] == [("critical", [100, 101, 102])]


def test_a_pattern_switched_off_by_a_rule_does_not_fire_its_waiting_absence() -> None:
    disabled = {**PATTERNS["abandonment"].model_dump(mode="json"), "enabled": False}
    off_at_60 = Feed("abandonment", rules=RuleBook([pattern_rule(disabled, 60)]))
    off_at_130 = Feed("abandonment", rules=RuleBook([pattern_rule(disabled, 130)]))
    for feed in (off_at_60, off_at_130):
        feed.chat(0, "zoe", kind="USER_JOINED", text="")
        feed.chat(100, "max", kind="USER_JOINED", text="")
        feed.end()
    assert off_at_60.alerts == []
    assert [(a.key, a.detected_at - T0) for a in off_at_130.alerts] == [("zoe", 120)]


def test_a_tombstone_brings_back_the_start_up_definition() -> None:
    disabled = {**PATTERNS["abandonment"].model_dump(mode="json"), "enabled": False}
    rules = RuleBook([pattern_rule(disabled, 0), rule_from_dict(
        {"id": "pat-1", "kind": "pattern", "version": 2, "deleted": True, "effective_from": T0 + 300})])
    feed = Feed("abandonment", rules=rules)
    feed.chat(10, "zoe", kind="USER_JOINED", text="")
    feed.chat(310, "max", kind="USER_JOINED", text="")
    feed.end()
    assert [(a.key, a.detected_at - T0) for a in feed.alerts] == [("max", 430)]


def test_a_role_from_the_rules_makes_a_chat_user_an_agent() -> None:
    answered = pattern_from_dict({"id": "answered", "key": "session", "within_seconds": 60, "steps": [
        {"name": "asked", "where": {"message": True, "role": "user"}},
        {"name": "answer", "where": {"message": True, "role": "rm"}}]})
    feeds = Feed(answered), Feed(answered)
    for feed, joe in zip(feeds, ("agent", None), strict=True):
        feed.chat(0, "ana", text="anyone?")
        feed.chat(1, "bob", text="me, a user")
        feed.chat(2, "joe", text="I am the RM", role=joe)
        feed.end()
    (alert,) = feeds[0].alerts
    assert [e.sender for e in alert.events] == ["ana", "joe"]
    assert feeds[1].alerts == []


def test_a_book_with_no_patterns_keeps_no_events_until_a_rule_defines_one() -> None:
    feed = Feed(rules=RuleBook([pattern_rule(BURST_OF_3, 100)]))
    feed.chat(50, "eve")
    assert feed.book.buffered == 0
    feed.chat(150, "eve")
    assert feed.book.buffered == 1


@pytest.mark.parametrize("with_roles", [False, True])
def test_few_rows_are_made_buffer_rows_in_python_as_polars_makes_them(with_roles: bool) -> None:
    """Small frames skip the Polars query for the buffer's derived columns (role, user key, class):
    both ways give the same frame, for conversations, chat with and without a rules role, and users."""
    events = [
        Event("a", "s-1", "rm", "message", "hi", T0, "event", "conversation", "in", 1, 1, None, None, iso(T0)),
        Event("b", "s-1", "customer", "message", "yo", T0, "event", "conversation", "in", 2, 2, None, None, iso(T0)),
        Event("c", "room", "ann", "USER_MESSAGE", "x", T0, "event", "chat", "in", 3, 3, "en", "ann", iso(T0)),
        Event("d", "room", "bob", "USER_JOINED", "", T0, "event", "chat", "in", 4, 4, None, None, iso(T0)),
    ]
    frame = events_frame(events).with_columns(pl.Series("scope", ["all", "session", "user", "all"]))
    if with_roles:
        frame = frame.with_columns(pl.Series("role", [None, None, "agent", None], dtype=pl.String))
    polars_way = frame.select(*engine._BUFFER_COLUMNS[with_roles])
    python_way = engine._few_buffer_rows(frame)
    assert python_way.schema == engine.BUFFER_SCHEMA
    assert python_way.equals(polars_way)
    assert python_way["role"].to_list() == ["agent", "customer", "agent" if with_roles else "user", "user"]
    assert python_way["user_key"].to_list() == ["s-1/rm", "s-1/customer", "ann", "room/bob"]
