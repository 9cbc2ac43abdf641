"""Fuzzing the event parser: whatever a line holds, it becomes an `Event` with the fields it gave,
or a `DeadLetter` whose reason names the problem; no exception escapes."""

from datetime import datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.events import DeadLetter, Event, LineRef, iso
from dataflows.parse import MAX_JSON_DEPTH, parse_line
from tests.conftest import check_dead_letter

REF = LineRef("in.jsonl", 3, 40)
FAST = settings(max_examples=50, deadline=None)

EDGE_TEXTS = ["\u200f", "\u202e", "e\u0301", "\u0301", "\x00", "a\x00b", "\ufeff", "\U0010ffff", "😀", "ﬁ", "İ", "\u3000", "\\ud800"]
"""RTL and LTR marks, combining characters, NUL, BOM, the last code point, an emoji, a ligature, and
text that only looks like a lone surrogate escape."""
texts = st.one_of(st.sampled_from(EDGE_TEXTS), st.text(max_size=20), st.lists(st.sampled_from(EDGE_TEXTS), max_size=4).map("".join))
names = texts.filter(bool)

MIN_TIME = datetime(1970, 1, 1, tzinfo=timezone.utc)
MAX_TIME = datetime(2199, 12, 31, tzinfo=timezone.utc)
MAX_EPOCH = 7_258_118_400


@st.composite
def timestamps(draw: st.DrawFn) -> tuple[Any, float | None]:
    """A readable timestamp in any accepted form, and the epoch seconds it stands for (None: absent)."""
    form = draw(st.sampled_from(["none", "seconds", "float", "millis", "iso", "naive", "offset", "numeric-string"]))
    if form == "none":
        return None, None
    if form == "seconds":
        seconds = draw(st.integers(0, MAX_EPOCH))
        return seconds, float(seconds)
    if form == "float":
        seconds_f = draw(st.floats(0, MAX_EPOCH, allow_nan=False))
        return seconds_f, seconds_f
    if form == "millis":
        millis = draw(st.integers(10**11, MAX_EPOCH * 1000))
        return millis, millis / 1000.0
    if form == "numeric-string":
        seconds = draw(st.integers(10**9, MAX_EPOCH))  # 8 digits would read as an ISO basic date (YYYYMMDD)
        return f" {seconds} ", float(seconds)
    moment = draw(st.datetimes(MIN_TIME.replace(tzinfo=None) + timedelta(days=1), MAX_TIME.replace(tzinfo=None)))
    if form == "naive":
        return moment.isoformat(), moment.replace(tzinfo=timezone.utc).timestamp()
    zone = timezone.utc if form == "iso" else timezone(timedelta(minutes=draw(st.integers(-23 * 60, 23 * 60))))
    aware = moment.replace(tzinfo=zone)
    return aware.isoformat(), aware.timestamp()


def encode(obj: dict[str, Any]) -> bytes:
    return orjson.dumps({k: v for k, v in obj.items() if v is not ...})


def check_dead(result: Event | DeadLetter, *fragments: str) -> DeadLetter:
    return check_dead_letter(result, REF, "parse", *fragments)


def check_event(result: Event | DeadLetter, time: float | None) -> Event:
    assert isinstance(result, Event), f"rejected: {result}"
    assert result.time == (None if time is None else pytest.approx(time, abs=1e-6))
    assert result.time_source == ("system" if time is None else "event")
    assert result.timestamp == (None if result.time is None else iso(result.time))
    orjson.dumps(result.as_record())
    return result


conversations = st.fixed_dictionaries({
    "session_id": names, "sender": st.sampled_from(["customer", "rm"]), "message": texts, "timestamp": timestamps(),
})
chats = st.fixed_dictionaries({
    "username": names, "type": st.sampled_from(["USER_MESSAGE", "MESSAGE", "USER_JOINED", "USER_LEFT"]),
    "text": texts, "preferredLanguage": st.one_of(st.just(...), st.none(), texts),
    "room": st.one_of(st.just(...), names), "session_id": st.one_of(st.just(...), names), "timestamp": timestamps(),
})


@FAST
@given(conversations)
def test_valid_conversation_events_parse_to_their_fields(fields: dict[str, Any]) -> None:
    timestamp, time = fields.pop("timestamp")
    event = check_event(parse_line(encode({**fields, "timestamp": timestamp}), REF), time)
    assert (event.session_id, event.sender, event.text, event.kind, event.shape) == (
        fields["session_id"], fields["sender"], fields["message"], "message", "conversation")
    assert (event.source, event.line, event.offset, event.event_id) == ("in.jsonl", 3, 40, "in.jsonl:3")


@FAST
@given(chats)
def test_valid_chat_events_parse_to_their_fields(fields: dict[str, Any]) -> None:
    timestamp, time = fields.pop("timestamp")
    event = check_event(parse_line(encode({**fields, "timestamp": timestamp}), REF), time)
    session = next(fields[k] for k in ("room", "session_id", "username") if fields[k] is not ...)
    language = None if fields["preferredLanguage"] is ... else fields["preferredLanguage"]
    assert (event.session_id, event.sender, event.username, event.kind, event.text, event.language, event.shape) == (
        session, fields["username"], fields["username"], fields["type"], fields["text"], language, "chat")


@FAST
@given(st.one_of(conversations, chats), st.data())
def test_truncated_json_is_not_json(fields: dict[str, Any], data: st.DataObject) -> None:
    fields["timestamp"] = fields["timestamp"][0]
    line = encode(fields)
    cut = data.draw(st.integers(0, len(line) - 1))
    result = parse_line(line[:cut], REF)
    check_dead(result, "not JSON", "not valid UTF-8")


@FAST
@given(conversations, st.sampled_from([b"\xff", b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b"\xc0\xaf", b"\x80"]))
def test_invalid_utf8_anywhere_is_named(fields: dict[str, Any], bad: bytes) -> None:
    fields["timestamp"] = fields["timestamp"][0]
    line = encode(fields)
    at = line.index(b'"message":"') + len(b'"message":"')
    result = check_dead(parse_line(line[:at] + bad + line[at:], REF), "not valid UTF-8")
    assert f"at byte {at}" in result.reason


@FAST
@given(st.sampled_from(['"\\ud800"', '"\\udfff"', '"x\\ud83d"', '"\\ude00\\ud83d"']),
       st.sampled_from(["session_id", "message", "timestamp"]))
def test_lone_surrogate_escapes_are_not_json(escape: str, field: str) -> None:
    fields = {"session_id": '"s"', "sender": '"rm"', "message": '"hi"', field: escape}
    line = "{" + ",".join(f'"{k}":{v}' for k, v in fields.items()) + "}"
    check_dead(parse_line(line.encode(), REF), "surrogate")


@FAST
@given(st.one_of(conversations, chats), st.integers(1, 4000), st.data())
def test_lines_over_the_limit_are_rejected_unread(fields: dict[str, Any], limit: int, data: st.DataObject) -> None:
    fields["timestamp"] = fields["timestamp"][0]
    line = encode(fields)
    padded = data.draw(st.sampled_from([line, line + b" " * limit, b"x" * (limit + 1), b"{" * (limit + 1)]))
    result = parse_line(padded, REF, max_bytes=limit)
    if len(padded) <= limit:
        assert not isinstance(result, DeadLetter) or "over the limit" not in result.reason
    else:
        check_dead(result, f"line is {len(padded):,} bytes, over the limit of {limit:,}")


@FAST
@given(st.integers(MAX_JSON_DEPTH + 1, 3000), st.sampled_from(["[", '{"a":']),
       st.sampled_from(["session_id", "message", "timestamp", "extra", None]))
def test_deep_nesting_is_rejected(depth: int, opener: str, field: str | None) -> None:
    closer = "]" if opener == "[" else "}"
    nested = opener * depth + "1" + closer * depth
    if field is None:
        line = nested
    else:
        line = '{"session_id":"s","sender":"rm","message":"x","' + field + '":' + nested + "}"
    check_dead(parse_line(line.encode(), REF), f"nested more than {MAX_JSON_DEPTH} levels")


INT64 = st.integers(-(2**63), 2**64 - 1)
"""The integers JSON (as orjson writes it) can carry."""
WRONG = st.one_of(INT64, st.floats(allow_nan=False, allow_infinity=False), st.booleans(), st.lists(INT64, max_size=2),
                  st.dictionaries(st.text(max_size=3), INT64, max_size=2))
"""Values of every JSON type but string and null."""


@FAST
@given(st.sampled_from(["session_id", "sender", "message"]), st.one_of(WRONG, st.none()))
def test_wrong_types_in_conversations_name_the_field(field: str, value: Any) -> None:
    line = encode({"session_id": "s", "sender": "rm", "message": "hi", field: value})
    check_dead(parse_line(line, REF), f"field '{field}'")


@FAST
@given(st.sampled_from(["username", "type", "text", "preferredLanguage", "room", "session_id"]), WRONG)
def test_wrong_types_in_chats_name_the_field(field: str, value: Any) -> None:
    line = encode({"username": "ana", "type": "USER_MESSAGE", "text": "hi", field: value})
    check_dead(parse_line(line, REF), f"field '{field}'")


BAD_TIMESTAMPS = [
    1e300, -1e300, -1, -1e11, -0.5, 7_258_118_401, 99_999_999_999, 2**63, 2**64 - 1, -(2**63), 1.7976931348623157e308,
    True, [], {}, [1704067200], "nan", "NaN", "inf", "-inf", "Infinity", "1e309", "", " ", "yesterday",
    "0000-01-01", "0000-01-01T00:00:00", "10000-01-01", "+10000-01-01T00:00:00", "9999-12-31T23:59:59-23:59",
    "0001-01-01T00:00:00+23:59", "1969-12-31T23:59:59Z", "2200-01-01T00:00:01Z", "2024-13-01", "2024-01-01T25:00:00",
    "2024-01-01T10:00:00+25:00", "1704067200\x00", "\u202e1704067200", "-1704067200", "2024-01-01T10:00:00\u200f",
]


@pytest.mark.parametrize("timestamp", BAD_TIMESTAMPS, ids=repr)
def test_unreadable_and_extreme_timestamps_name_the_timestamp(timestamp: Any) -> None:
    line = encode({"session_id": "s", "sender": "rm", "message": "hi", "timestamp": timestamp})
    check_dead(parse_line(line, REF), "timestamp")


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e400", "-1e400", "0x10", "01"])
def test_non_json_numbers_are_not_json(literal: str) -> None:
    line = '{"session_id":"s","sender":"rm","message":"hi","timestamp":' + literal + "}"
    check_dead(parse_line(line.encode(), REF), "not JSON")


@FAST
@given(st.binary(max_size=400))
def test_random_bytes_never_raise(raw: bytes) -> None:
    result = parse_line(raw, REF)
    if isinstance(result, DeadLetter):
        check_dead(result, "")
    else:
        orjson.dumps(result.as_record())


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), INT64, st.floats(allow_nan=False, allow_infinity=False), texts),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(texts, inner, max_size=3)),
    max_leaves=12,
)
KNOWN_FIELDS = ["session_id", "sender", "message", "timestamp", "username", "text", "type", "room", "preferredLanguage"]


@FAST
@given(st.one_of(JSON, st.dictionaries(st.sampled_from(KNOWN_FIELDS), JSON)))
def test_any_json_gives_an_event_or_a_reasoned_dead_letter(value: Any) -> None:
    result = parse_line(orjson.dumps(value), REF)
    if isinstance(result, DeadLetter):
        check_dead(result, "")
    else:
        orjson.dumps(result.as_record())
