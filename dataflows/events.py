"""The typed records that flow through convoflow, and their JSON form.

Every input shape is normalised into one `Event`; everything the flow writes is one of the
record types below, turned into a JSON-ready dict by `as_record()`. Times are epoch seconds
(UTC floats) inside the flow and ISO-8601 strings with an explicit offset outside it.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Literal, NamedTuple

Shape = Literal["conversation", "chat"]
TimeSource = Literal["event", "system"]


def iso(epoch_seconds: float) -> str:
    """Format epoch seconds as an ISO-8601 UTC timestamp (`2024-01-01T10:00:03+00:00`).

    Exactly what `datetime.fromtimestamp(t, timezone.utc).isoformat()` gives (microseconds rounded
    half to even), in a fraction of its time: every event is formatted once, and events of one
    second share its formatted date and time.
    """
    fraction, whole = math.modf(epoch_seconds)
    second, micro = int(whole), round(fraction * 1_000_000)
    if micro >= 1_000_000:
        second, micro = second + 1, micro - 1_000_000
    elif micro < 0:
        second, micro = second - 1, micro + 1_000_000
    if micro:
        return f"{_second(second)}.{micro:06d}+00:00"
    return f"{_second(second)}+00:00"


@functools.lru_cache(maxsize=4096)
def _second(second: int) -> str:
    return datetime.fromtimestamp(second, timezone.utc).replace(tzinfo=None).isoformat()


class LineRef(NamedTuple):
    """Where a record came from: the input's name, its 1-based line number and byte offset."""

    source: str
    line: int
    offset: int

    @property
    def event_id(self) -> str:
        return f"{self.source}:{self.line}"


class Event(NamedTuple):
    """One accepted conversation or chat event, in either input shape.

    A flat NamedTuple rather than a dataclass: one is built per input line and most cross
    worker boundaries, where `tuple(event)` pickles in ~1.5 µs and a frozen dataclass in ~30.
    `time` is None only between parsing and sequencing, for an event that carried no
    timestamp: the clock that drives the run fills it in (`timed`) and `time_source` says so.
    `timestamp` is `time` as ISO-8601, formatted once.
    """

    event_id: str
    session_id: str
    sender: str
    kind: str
    text: str
    time: float | None
    time_source: TimeSource
    shape: Shape
    source: str
    line: int
    offset: int
    language: str | None = None
    username: str | None = None
    timestamp: str | None = None

    @property
    def ref(self) -> LineRef:
        return LineRef(self.source, self.line, self.offset)

    def timed(self, time: float) -> Event:
        """This event with `time` given by the run's clock (for events that had none)."""
        return self._replace(time=time, timestamp=iso(time))

    def as_record(self) -> dict[str, Any]:
        return {
            "event_id": self.event_id,
            "session_id": self.session_id,
            "sender": self.sender,
            "kind": self.kind,
            "text": self.text,
            "timestamp": self.timestamp,
            "time_source": self.time_source,
            "shape": self.shape,
            "language": self.language,
            "username": self.username,
            "source": self.source,
            "line": self.line,
        }

    def as_window_message(self) -> dict[str, Any]:
        """The compact form of this event inside a window record."""
        return {
            "event_id": self.event_id,
            "sender": self.sender,
            "kind": self.kind,
            "text": self.text,
            "timestamp": self.timestamp,
            "time_source": self.time_source,
        }


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An input line that could not be accepted, with the reason and where it came from."""

    ref: LineRef
    raw: str
    reason: str
    step: str = "parse"
    origin: tuple[tuple[str, Any], ...] = ()
    """Fields that say where it came from beyond `ref`, e.g. a Kafka topic, partition and offset."""

    def as_record(self) -> dict[str, Any]:
        return {
            "source": self.ref.source,
            "line": self.ref.line,
            "offset": self.ref.offset,
            **dict(self.origin),
            "step": self.step,
            "reason": self.reason,
            "raw": self.raw,
        }


@dataclass(frozen=True, slots=True)
class WindowRecord:
    """One closed event-time window of one session: its messages in time order.

    `messages` holds at most `WindowConfig.max_messages` events, the earliest; `overflow` counts
    the window's later events left out of it (they are still in the messages output). `counts`
    and the first and last event times cover every event of the window, listed or not: `last`,
    when set, is the latest of them (an unlisted one). `closed_early` says why the window was
    emitted before the watermark reached its end, if it was.
    """

    session_id: str
    start: float
    end: float
    messages: tuple[Event, ...]
    counts: dict[str, int] = field(hash=False)
    overflow: int = 0
    last: Event | None = None
    closed_early: str | None = None

    def as_record(self) -> dict[str, Any]:
        return {
            "session_id": self.session_id,
            "window_start": iso(self.start),
            "window_end": iso(self.end),
            "messages": [m.as_window_message() for m in self.messages],
            "counts": self.counts,
            "first_event_time": self.messages[0].timestamp,
            "last_event_time": (self.last or self.messages[-1]).timestamp,
            "truncated": self.overflow > 0,
            "overflow": self.overflow,
            "closed_early": self.closed_early,
        }


LATE_REASON = "window already emitted"


@dataclass(frozen=True, slots=True)
class LateEvent:
    """An event whose window had already been emitted when it arrived, and why that window was.

    `watermark` is -inf when none has been set yet (a window closed early can precede it): null in JSON.
    """

    event: Event
    window_start: float
    window_end: float
    watermark: float
    reason: str = LATE_REASON

    def as_record(self) -> dict[str, Any]:
        return {
            "session_id": self.event.session_id,
            "window_start": iso(self.window_start),
            "window_end": iso(self.window_end),
            "watermark": iso(self.watermark) if math.isfinite(self.watermark) else None,
            "reason": self.reason,
            "event": self.event.as_record(),
        }
