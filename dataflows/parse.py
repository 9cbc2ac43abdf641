"""Turn one raw input line into an `Event`, or a `DeadLetter` saying exactly what is wrong.

Two shapes are accepted:
- conversation: `{"session_id", "sender": "customer"|"rm", "message", "timestamp"}`
- chat: `{"username", "text", "type", "preferredLanguage", "timestamp"}`; its session is
  `room` or `session_id` when present, otherwise the username.
A missing (or null) timestamp is not an error: the event is marked `time_source="system"`
and the run's clock gives it a time later. A timestamp that is present but unreadable is.

Limits: a line over `max_bytes` (default `MAX_LINE_BYTES`) is rejected unread, and JSON nested
deeper than `MAX_JSON_DEPTH` is rejected before any field is looked at (error messages show
offending values, and showing a value recurses once per level: a deep one would overflow).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dataflows.events import DeadLetter, Event, LineRef, Shape, iso
from dataflows.timestamps import TimestampError, parse_timestamp

MESSAGE_TYPES = frozenset({"USER_MESSAGE", "MESSAGE"})
RAW_EXCERPT_CHARS = 2000
REASON_CHARS = 1000
"""Longest reason kept: one quoting a huge value is cut (ending in `…`)."""
MAX_LINE_BYTES = 1 << 20
"""The default longest input line (or Kafka message), in bytes."""
MAX_JSON_DEPTH = 64
"""The deepest nesting of arrays and objects accepted (a real event or rule nests a few levels)."""
TOO_DEEP = f"JSON nested more than {MAX_JSON_DEPTH} levels deep"


class _Rejected(ValueError):
    """A record that validates field by field but is still not acceptable."""


class _ConversationIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    session_id: str = Field(min_length=1)
    sender: Literal["customer", "rm"]
    message: str
    timestamp: Any = None


class _ChatIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    username: str = Field(min_length=1)
    type: str = Field(min_length=1)
    text: str | None = None
    preferredLanguage: str | None = None  # noqa: N815 - the wire name
    room: str | None = Field(default=None, min_length=1)
    session_id: str | None = Field(default=None, min_length=1)
    timestamp: Any = None


def read_json(
    raw: bytes, ref: LineRef, step: str = "parse", *, max_bytes: int | None = None
) -> tuple[str, Any] | DeadLetter:
    """A line's text and JSON value, or a `DeadLetter` of `step` saying it is too long (over
    `max_bytes`, if given), not UTF-8, not JSON or nested deeper than `MAX_JSON_DEPTH`."""
    if max_bytes is not None and len(raw) > max_bytes:
        return oversized(raw, len(raw), max_bytes, ref, step)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        reason = f"not valid UTF-8 ({exc.reason} at byte {exc.start})"
        return dead_letter(raw.decode("utf-8", "replace"), ref, reason, step)
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        reason = TOO_DEEP if "depth limit" in str(exc) else f"not JSON: {exc}"
        return dead_letter(text, ref, reason, step)
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _deeper_than(value, MAX_JSON_DEPTH):
        return dead_letter(text, ref, TOO_DEEP, step)
    return text, value


def _deeper_than(value: object, limit: int) -> bool:
    """Whether arrays and objects in `value` nest more than `limit` levels (without recursing)."""
    stack: list[tuple[object, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Iterable[object] = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


def oversized(head: bytes, size: int, limit: int, ref: LineRef, step: str = "parse") -> DeadLetter:
    """The dead letter of a line of `size` bytes over `limit`, unparsed; `head` is (at least) its start."""
    excerpt = head[:RAW_EXCERPT_CHARS].decode("utf-8", "replace")
    return dead_letter(excerpt, ref, f"line is {size:,} bytes, over the limit of {limit:,}", step)


def dead_letter(text: str, ref: LineRef, reason: str, step: str = "parse") -> DeadLetter:
    """A rejected line with its reason (at most `REASON_CHARS`), keeping at most `RAW_EXCERPT_CHARS` of its text."""
    if len(reason) > REASON_CHARS:
        reason = reason[: REASON_CHARS - 1] + "…"
    return DeadLetter(ref=ref, raw=text[:RAW_EXCERPT_CHARS], reason=reason, step=step)


def json_type(value: object) -> str:
    """How a JSON value's type reads in an error message (`an array`, `a string`, ...)."""
    names = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "a boolean"}
    return names.get(type(value), "null" if value is None else type(value).__name__)


def parse_line(raw: bytes, ref: LineRef, max_bytes: int = MAX_LINE_BYTES) -> Event | DeadLetter:
    """Parse one JSONL line (without its newline) of either input shape; one over `max_bytes` is not parsed."""
    read = read_json(raw, ref, max_bytes=max_bytes)
    if isinstance(read, DeadLetter):
        return read
    text, obj = read
    if not isinstance(obj, dict):
        return dead_letter(text, ref, f"expected a JSON object, got {json_type(obj)}")
    try:
        if "sender" in obj or "message" in obj:
            return _conversation(_ConversationIn.model_validate(obj), ref)
        if "username" in obj:
            return _chat(_ChatIn.model_validate(obj), ref)
    except ValidationError as exc:
        return dead_letter(text, ref, _describe(exc))
    except (TimestampError, _Rejected) as exc:
        return dead_letter(text, ref, str(exc))
    return dead_letter(
        text,
        ref,
        "neither a conversation event (session_id, sender, message) nor a chat event (username, type, text)",
    )


def _conversation(rec: _ConversationIn, ref: LineRef) -> Event:
    return _event(ref, rec.timestamp, session_id=rec.session_id, sender=rec.sender, kind="message",
                  text=rec.message, shape="conversation")


def _chat(rec: _ChatIn, ref: LineRef) -> Event:
    if rec.type in MESSAGE_TYPES and rec.text is None:
        msg = f"chat event of type {rec.type} has no 'text'"
        raise _Rejected(msg)
    return _event(ref, rec.timestamp, session_id=rec.room or rec.session_id or rec.username, sender=rec.username,
                  kind=rec.type, text=rec.text or "", shape="chat", language=rec.preferredLanguage,
                  username=rec.username)


def _event(
    ref: LineRef,
    timestamp: object,
    *,
    session_id: str,
    sender: str,
    kind: str,
    text: str,
    shape: Shape,
    language: str | None = None,
    username: str | None = None,
) -> Event:
    """The normalised event; an absent timestamp leaves it for the run's clock to fill."""
    time = None if timestamp is None else parse_timestamp(timestamp)
    return Event(
        event_id=ref.event_id,
        session_id=session_id,
        sender=sender,
        kind=kind,
        text=text,
        time=time,
        time_source="system" if time is None else "event",
        shape=shape,
        source=ref.source,
        line=ref.line,
        offset=ref.offset,
        language=language,
        username=username,
        timestamp=None if time is None else iso(time),
    )


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors(include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "record"
        parts.append(f"field '{where}': {err['msg']}")
    return "; ".join(parts)
