import json
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataflows.events import DeadLetter, Event, LineRef
from dataflows.parse import MAX_JSON_DEPTH, RAW_EXCERPT_CHARS, REASON_CHARS, dead_letter, parse_line

REF = LineRef("in.jsonl", 7, 123)


def parse(obj: dict[str, Any] | str | bytes) -> Event | DeadLetter:
    raw = obj if isinstance(obj, bytes) else obj.encode() if isinstance(obj, str) else orjson.dumps(obj)
    return parse_line(raw, REF)


def test_conversation_event(conversation: Callable[..., dict]) -> None:
    event = parse(conversation(sender="rm", message="How can I help?"))
    assert isinstance(event, Event)
    assert (event.session_id, event.sender, event.text, event.shape) == ("s-1", "rm", "How can I help?", "conversation")
    assert event.time_source == "event"
    assert event.event_id == "in.jsonl:7"


def test_chat_event_session_is_room_then_session_id_then_username(chat: Callable[..., dict]) -> None:
    assert parse(chat(room="room-9")).session_id == "room-9"
    assert parse(chat(session_id="s-42")).session_id == "s-42"
    plain = parse(chat())
    assert isinstance(plain, Event)
    assert (plain.session_id, plain.sender, plain.language, plain.kind) == ("alice", "alice", "es", "USER_MESSAGE")


def test_chat_join_needs_no_text(chat: Callable[..., dict]) -> None:
    joined = parse(chat(type="USER_JOINED", text=...))
    assert isinstance(joined, Event)
    assert joined.text == ""


def test_missing_timestamp_is_marked_system_not_dead(conversation: Callable[..., dict]) -> None:
    event = parse(conversation(timestamp=...))
    assert isinstance(event, Event)
    assert (event.time, event.time_source) == (None, "system")
    assert parse(conversation(timestamp=None)).time_source == "system"


@pytest.mark.parametrize(
    ("line", "reason"),
    [
        ('{"session_id": "s-1", "sender": "rm"', "not JSON"),
        ("[1, 2]", "expected a JSON object, got an array"),
        ('"text"', "expected a JSON object, got a string"),
        ('{"session_id": "s-1", "sender": "rm", "timestamp": 1}', "field 'message': Field required"),
        ('{"session_id": "s-1", "sender": "bot", "message": "x"}', "field 'sender'"),
        ('{"session_id": 42, "sender": "rm", "message": "x"}', "field 'session_id'"),
        ('{"session_id": "s-1", "sender": "rm", "message": "x", "timestamp": "yesterday"}', "timestamp 'yesterday'"),
        ('{"username": "bob", "type": "USER_MESSAGE"}', "has no 'text'"),
        ('{"username": "", "type": "USER_JOINED"}', "field 'username'"),
        ('{"foo": 1}', "neither a conversation event"),
    ],
)
def test_bad_lines_become_dead_letters_with_reason(line: str, reason: str) -> None:
    dead = parse(line)
    assert isinstance(dead, DeadLetter)
    assert reason in dead.reason
    assert dead.raw == line
    assert dead.ref == REF


def test_invalid_utf8_is_a_dead_letter() -> None:
    dead = parse(b'{"session_id": "\xff\xfe"}')
    assert isinstance(dead, DeadLetter)
    assert "not valid UTF-8" in dead.reason


@given(st.binary(max_size=300))
def test_any_bytes_give_an_event_or_a_reasoned_dead_letter(raw: bytes) -> None:
    result = parse_line(raw, REF)
    assert isinstance(result, (Event, DeadLetter))
    if isinstance(result, DeadLetter):
        assert result.reason


@given(
    st.dictionaries(
        st.sampled_from(["session_id", "sender", "message", "timestamp", "username", "text", "type", "room"]),
        st.one_of(st.none(), st.text(max_size=12), st.integers(), st.floats(), st.booleans(), st.lists(st.integers(), max_size=2)),
    )
)
def test_any_object_of_known_fields_never_raises(obj: dict[str, Any]) -> None:
    result = parse_line(json.dumps(obj).encode(), REF)
    assert isinstance(result, (Event, DeadLetter))


@pytest.mark.parametrize("field", ["timestamp", "session_id", "extra"])
def test_nesting_1000_deep_is_a_dead_letter_not_a_recursion_error(field: str) -> None:
    """Was a crash: the timestamp error repr'd a 1,000-deep list and raised RecursionError."""
    line = '{"session_id": "s", "sender": "rm", "message": "x", "' + field + '": ' + "[" * 1000 + "]" * 1000 + "}"
    dead = parse(line)
    assert isinstance(dead, DeadLetter)
    assert dead.reason == f"JSON nested more than {MAX_JSON_DEPTH} levels deep"


def test_nesting_beyond_orjsons_own_limit_says_so_too() -> None:
    dead = parse("[" * 100_000 + "]" * 100_000)
    assert isinstance(dead, DeadLetter)
    assert dead.reason == f"JSON nested more than {MAX_JSON_DEPTH} levels deep"
    assert len(dead.raw) == RAW_EXCERPT_CHARS


def test_nesting_up_to_the_limit_is_read(conversation: Callable[..., dict]) -> None:
    deep: Any = "x"
    for _ in range(MAX_JSON_DEPTH - 1):
        deep = [deep]
    assert isinstance(parse(conversation(extra=deep)), Event)


def test_line_over_the_limit_is_a_dead_letter_unparsed(conversation: Callable[..., dict]) -> None:
    line = orjson.dumps(conversation(message="x" * (2 << 20)))
    dead = parse_line(line, REF)
    assert isinstance(dead, DeadLetter)
    assert dead.reason == f"line is {len(line):,} bytes, over the limit of 1,048,576"
    assert dead.raw == line[:RAW_EXCERPT_CHARS].decode()
    assert isinstance(parse_line(line, REF, max_bytes=len(line)), Event)
    small = parse_line(b"[1]", REF, max_bytes=2)
    assert isinstance(small, DeadLetter) and small.reason == "line is 3 bytes, over the limit of 2"


def test_a_reason_quoting_a_huge_value_is_cut(conversation: Callable[..., dict]) -> None:
    dead = parse(conversation(timestamp="9" * 50_000 + "x"))
    assert isinstance(dead, DeadLetter)
    assert len(dead.reason) <= 200 and dead.reason.startswith("timestamp '999") and "neither ISO-8601" in dead.reason
    long_reason = dead_letter("{}", REF, "x" * 50_000)
    assert len(long_reason.reason) == REASON_CHARS and long_reason.reason.endswith("…")
