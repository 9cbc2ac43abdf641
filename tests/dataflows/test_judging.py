"""Judging a frame: the verdict columns are `RuleBook.judge` of each row, the moderation its record as JSON."""

from __future__ import annotations

import orjson
import polars as pl

from dataflows.event_frame import events_frame
from dataflows.events import Event, iso
from dataflows.judging import judged
from dataflows.rules import RuleBook
from tests.dataflows.test_rules import at, flag, permission, words


def chat(n: int, user: str, room: str, text: str, clock: str) -> Event:
    time = at(clock)
    return Event(f"in:{n}", room, user, "USER_MESSAGE", text, time, "event", "chat", "in", n, n, "en", user, iso(time))


def test_each_row_gets_the_books_verdict_on_it() -> None:
    book = RuleBook([
        words("bw-1", "darn"), words("bw-2", "heck", action="block", effective_from=iso(at("11:00"))),
        flag("ff-1", "translation", False, scope={"room": "r2"}), permission("perm-1", "mo", "muted"),
    ])
    events = [chat(1, "ann", "r1", "oh darn", "10:00"), chat(2, "ann", "r1", "heck", "10:30"),
              chat(3, "ann", "r2", "heck", "11:30"), chat(4, "mo", "r1", "hello", "12:00")]
    frame = judged(book, events_frame(events))
    expected = [book.judge(e.text, time=e.time or 0.0, user=e.sender, room=e.session_id) for e in events]
    assert frame["text"].to_list() == [v.text for v in expected]
    assert frame["text"][0] != "oh darn" and frame["text"][1:].to_list() == ["heck", "heck", "hello"]
    assert frame["action"].to_list() == [v.action for v in expected] == ["mask", "allow", "block", "block"]
    assert frame["role"].to_list() == [None, None, None, "muted"]
    assert [orjson.loads(m) for m in frame["moderation"].to_list()] == [v.as_record() for v in expected]


def test_before_any_rule_every_message_is_allowed_as_it_is() -> None:
    frame = judged(RuleBook(), events_frame([chat(1, "ann", "r1", "oh darn", "10:00")]))
    assert frame.select("text", "action", "role").rows() == [("oh darn", "allow", None)]
    assert orjson.loads(frame["moderation"][0]) == {"action": "allow", "rules": [], "reasons": [], "flags": {},
                                                    "role": None, "models": {}}
    assert frame.schema["moderation"] == pl.Binary
