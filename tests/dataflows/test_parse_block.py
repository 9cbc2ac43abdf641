"""Column-wise parsing of a block gives, line for line, what `parse_line` gives: the same events and the
same dead letters with the same reasons, whatever the block holds."""

from datetime import datetime, timedelta, timezone

import orjson
import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st
from polars.testing import assert_frame_equal

from dataflows.event_frame import EVENT_SCHEMA, events_frame
from dataflows.events import DeadLetter, Event, LineRef, iso
from dataflows.parse import parse_line
from dataflows.event_frame import iso_expr
from dataflows.parse_block import COLUMNS_FROM, parse_block

T0 = 1_709_542_800.0


def line_by_line(lines: list[bytes], *, offset: int = 0, first: int = 1, max_bytes: int = 1 << 20) -> tuple[list, list]:
    """What the replay source made of each line before blocks were parsed column-wise."""
    events, dead = [], []
    for number, raw in enumerate(lines, start=first):
        ref = LineRef("in.jsonl", number, offset)
        offset += len(raw) + 1
        body = raw.rstrip(b"\r")
        if len(raw) > max_bytes:
            result: Event | DeadLetter = DeadLetter(ref, raw[:2000].decode("utf-8", "replace"),
                                                    f"line is {len(raw):,} bytes, over the limit of {max_bytes:,}")
        elif not body.strip():
            result = DeadLetter(ref, "", "empty line")
        else:
            result = parse_line(body, ref, max_bytes)
        (events if isinstance(result, Event) else dead).append(result)
    return events, dead


def block(lines: list[bytes]) -> bytes:
    return b"".join(line + b"\n" for line in lines)


def check_same(lines: list[bytes], *, offset: int = 0, first: int = 1, max_bytes: int = 1 << 20) -> None:
    """Read column-wise (`columns_from=0`) and as a block of its size is read by default (a small one
    line by line), the block gives what its lines give one by one."""
    events, dead = line_by_line(lines, offset=offset, first=first, max_bytes=max_bytes)
    for columns_from in (0, COLUMNS_FROM):
        parsed = parse_block(block(lines), source="in.jsonl", offset=offset, line=first, max_bytes=max_bytes,
                             columns_from=columns_from)
        assert [Event._make(row) for row in parsed.events.iter_rows()] == events
        assert parsed.dead == dead
        assert parsed.events.schema == EVENT_SCHEMA


def conversation(**fields: object) -> dict:
    return {"session_id": "s-1", "sender": "customer", "message": "hello", "timestamp": T0, **fields}


def chat(**fields: object) -> dict:
    return {"username": "ana", "text": "hi", "type": "USER_MESSAGE", "preferredLanguage": "fr", "timestamp": T0, **fields}


def test_both_shapes_and_bad_lines_in_one_block() -> None:
    lines = [
        orjson.dumps(conversation()),
        orjson.dumps(chat(room="r-1")),
        b"not json",
        orjson.dumps(conversation(session_id=42)),
        b"",
        orjson.dumps(chat(type="USER_JOINED", text=None, timestamp=None)),
        orjson.dumps(conversation(timestamp="2024-03-04T09:00:00.25+02:00")),
    ]
    check_same(lines, offset=100, first=7)
    parsed = parse_block(block(lines), source="in.jsonl", offset=100, line=7, columns_from=0)
    assert parsed.events["line"].to_list() == [7, 8, 12, 13]
    assert [d.reason for d in parsed.dead][1] == "field 'session_id': Input should be a valid string"


def test_an_accepted_event_is_a_row_of_the_event_schema() -> None:
    parsed = parse_block(block([orjson.dumps(chat(room="r-9", timestamp="2024-03-04T09:00:01Z"))]),
                         source="in.jsonl", offset=0, line=1, columns_from=0)
    expected = events_frame([Event(
        event_id="in.jsonl:1", session_id="r-9", sender="ana", kind="USER_MESSAGE", text="hi", time=T0 + 1,
        time_source="event", shape="chat", source="in.jsonl", line=1, offset=0, language="fr", username="ana",
        timestamp="2024-03-04T09:00:01+00:00",
    )])
    assert_frame_equal(parsed.events, expected)


def test_a_block_as_long_as_columns_from_gives_what_its_lines_give_one_by_one() -> None:
    lines = [orjson.dumps(conversation(message=f"m {i}")) if i % 97 else b"not json" for i in range(COLUMNS_FROM)]
    check_same(lines)
    parsed = parse_block(block(lines), source="in.jsonl", offset=0, line=1)
    assert len(parsed.events) == COLUMNS_FROM - 11 and len(parsed.dead) == 11


def test_no_lines_no_events() -> None:
    parsed = parse_block(b"", source="in.jsonl", offset=0, line=1)
    assert parsed.events.is_empty() and parsed.dead == []


texts = st.one_of(st.text(max_size=12), st.sampled_from(["", " ", "NaN", '"sender"', "\\u0041", "é😀", "\t"]))
stamps = st.one_of(
    st.none(),
    st.floats(-1e13, 8e12, allow_nan=False),
    st.integers(-10, 8_000_000_000_000),
    st.booleans(),
    st.datetimes(datetime(1969, 12, 30), datetime(2201, 1, 2)).map(lambda d: d.isoformat()),
    st.datetimes(datetime(1970, 1, 2), datetime(2199, 1, 1), timezones=st.just(timezone(timedelta(hours=-3, minutes=-30))))
    .map(lambda d: d.isoformat(sep=" ")),
    st.datetimes(datetime(1970, 1, 2), datetime(2199, 1, 1)).map(lambda d: d.strftime("%Y-%m-%dT%H:%M:%SZ")),
    st.sampled_from(["2024-02-30T10:00:00", "2024-03-04T24:00:00", "2024-03-04T10:00:60", "1709542800", " 2024-03-04T10:00:00",
                     "2024-03-04", "2024-03-04T10:00:00+24:00", "2024-03-04T10:00:00.1234567", "garbage", ""]),
    st.just([1]),
    st.just({"t": 1}),
)
values = st.one_of(texts, st.none(), st.integers(-3, 3), st.booleans(), st.just([]), st.just({"a": [1]}))
records = st.one_of(
    st.builds(conversation, session_id=st.one_of(texts, values), sender=st.sampled_from(["customer", "rm", "bot", None, 1]),
              message=st.one_of(texts, values), timestamp=stamps),
    st.builds(chat, username=st.one_of(texts, values), text=st.one_of(texts, values),
              type=st.sampled_from(["USER_MESSAGE", "MESSAGE", "USER_JOINED", "", None, 3]),
              preferredLanguage=st.one_of(st.none(), st.sampled_from(["fr", "en"]), values), timestamp=stamps,
              room=st.one_of(st.none(), texts, values), session_id=st.one_of(st.none(), texts)),
    st.dictionaries(st.sampled_from(["session_id", "sender", "message", "username", "type", "text", "room", "timestamp", "x"]),
                    values, max_size=5),
)
odd_lines = st.sampled_from([
    b"", b"  ", b"\r", b"{", b"[]", b"3", b"null", b'"x"', b"\xff\xfe{}", b'{"a": NaN}', b"{} {}", b'{"session_id": "s"}{"a": 1}',
    b'{"session_id": "s", "session_id": "t", "sender": "rm", "message": "m"}', b'{"sender": "rm", "message": "m", "session_id": "s",}',
    b'{"sen\\u0064er": "rm", "message": "m", "session_id": "s"}', b'{"username": "u", "type": "JOIN", "message": null}',
    b'{"session_id": "s", "sender": "rm", "message": "\\ud800"}', b"[" * 70 + b"]" * 70,
    b'{"session_id": "s", "sender": "rm", "message": "m", "deep": ' + b"[" * 66 + b"]" * 66 + b"}",
    b'{"session_id": "s", "sender": "rm", "message": "m"}\r\r', b'{"session_id": "s", "sender": "rm", "message": "a\tb"}',
])
lines = st.one_of(records.map(orjson.dumps), odd_lines,
                  st.binary(max_size=40).map(lambda b: b.replace(b"\n", b"")))


@settings(max_examples=300, deadline=None)
@given(st.lists(lines, max_size=30), st.integers(0, 10_000), st.integers(1, 500), st.integers(16, 400))
def test_any_block_parses_as_line_by_line(body: list[bytes], offset: int, first: int, max_bytes: int) -> None:
    check_same(body, offset=offset, first=first, max_bytes=max_bytes)


@settings(max_examples=50, deadline=None)
@given(st.lists(records.map(orjson.dumps), min_size=1, max_size=200))
def test_blocks_of_good_and_bad_records_parse_as_line_by_line(body: list[bytes]) -> None:
    check_same(body)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.floats(0, 7_258_118_400, allow_nan=False), max_size=50))
def test_times_are_formatted_as_iso_formats_them(seconds: list[float]) -> None:
    formatted = pl.select(iso_expr(pl.Series(seconds, dtype=pl.Float64))).to_series().to_list()
    assert formatted == [iso(s) for s in seconds]
