"""Event-time tumbling windows per session, closed by a watermark with bounded out-of-orderness.

Semantics, as in Flink: the watermark is the run's clock minus the out-of-orderness bound; a
window `[start, end)` is emitted once the watermark reaches `end`, and an event is late only
when its own window has already been emitted. Such an event goes to the late output with the
window it missed. The watermark never goes back, so an emitted window can never be reopened
and emitted again (Bytewax's own tumbling windower forgets a key's clock once the key has no
open window, and a late event then reopens and re-emits it). A session with no open window
(and no window closed early ahead of the watermark) holds no state at all.

Limits, so that no input can grow a shard's state without bound, and nothing is dropped silently:
- A window lists at most `WindowConfig.max_messages` events: the earliest in time order (then
  file order). The record's `overflow` counts the rest (`truncated` is then true); they are
  still accepted messages, and `counts` and the last event time include them. An open window
  holds at most twice the limit.
- A session has at most `WindowConfig.max_open_windows` open windows. Opening one more closes
  the session's oldest at once, emitted with `closed_early: "too many open windows"`; from then
  on the session's windows up to that one count as emitted, so an event for one of them is late
  (with that reason) and no window is emitted twice.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from dataflows.events import Event, LateEvent, WindowRecord, iso

TOO_MANY_OPEN = "too many open windows"


@dataclass(frozen=True)
class WindowConfig:
    """Tumbling windows of `size` seconds aligned to `align_to` (epoch seconds), and their limits."""

    size: float = 30.0
    out_of_orderness: float = 5.0
    align_to: float = 0.0
    max_messages: int = 10_000
    """Events a window record lists (the earliest); the rest are counted in its `overflow`."""
    max_open_windows: int = 1_000
    """Open windows per session; one more closes the session's oldest early."""

    def __post_init__(self) -> None:
        if not (self.size > 0 and math.isfinite(self.size)):
            msg = f"window size must be a positive number of seconds, got {self.size}"
            raise ValueError(msg)
        if not (self.out_of_orderness >= 0 and math.isfinite(self.out_of_orderness)):
            msg = f"out-of-orderness must be >= 0 seconds, got {self.out_of_orderness}"
            raise ValueError(msg)
        _check_count("messages per window", self.max_messages)
        _check_count("open windows per session", self.max_open_windows)

    def start_of(self, time: float) -> float:
        return self.align_to + math.floor((time - self.align_to) / self.size) * self.size


def _check_count(what: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        msg = f"the maximum of {what} must be a whole number >= 1, got {value!r}"
        raise ValueError(msg)


@dataclass
class Dropped:
    """The events an open window has left out of its listed messages so far."""

    count: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    last: Event | None = None
    """The latest of them, in time order."""

    def take(self, events: list[Event]) -> None:
        """Count `events` (sorted in time order) as dropped."""
        self.count += len(events)
        for event in events:
            self.counts[event.sender] = self.counts.get(event.sender, 0) + 1
        if events and (self.last is None or _chronological(events[-1]) > _chronological(self.last)):
            self.last = events[-1]


@dataclass
class WindowBook:
    """Open windows of many sessions sharing one watermark (one shard of the flow)."""

    config: WindowConfig
    watermark: float = -math.inf
    open: dict[tuple[str, float], list[Event]] = field(default_factory=dict)
    ends: list[tuple[float, str, float]] = field(default_factory=list)
    """A heap of the open windows' ends; entries of windows closed early are skipped when popped."""
    starts: dict[str, list[float]] = field(default_factory=dict)
    """A heap of each session's open window starts."""
    dropped: dict[tuple[str, float], Dropped] = field(default_factory=dict)
    closed_to: dict[str, float] = field(default_factory=dict)
    """For a session that had windows closed early: the end up to which its windows count as emitted."""
    closed_ends: list[tuple[float, str]] = field(default_factory=list)
    """A heap of `closed_to`'s values, to forget them once the watermark passes them."""
    early: list[WindowRecord] = field(default_factory=list)
    """Windows closed early, emitted by the next `advance` or `flush`."""

    def add(self, event: Event) -> LateEvent | None:
        """Put a timed event in its window, or return it as late if that window was emitted."""
        assert event.time is not None, "events are timed before windowing"
        start = self.config.start_of(event.time)
        end = start + self.config.size
        if end <= self.watermark:
            return LateEvent(event, start, end, self.watermark)
        session = event.session_id
        if self.closed_to and end <= self.closed_to.get(session, -math.inf):
            return LateEvent(event, start, end, self.watermark, self._closed_reason(session))
        key = (session, start)
        messages = self.open.get(key)
        if messages is None:
            self.open[key] = [event]
            heapq.heappush(self.ends, (end, session, start))
            self._opened(session, start)
        else:
            messages.append(event)
            if len(messages) > 2 * self.config.max_messages:
                self._trim(key, messages)
        return None

    def adopt(self, event: Event, start: float) -> None:
        """Take an event of an open window kept elsewhere until now (`FrameWindows` hands over
        a session): no lateness test, and no limit, since that window held it already."""
        key = (event.session_id, start)
        messages = self.open.get(key)
        if messages is None:
            self.open[key] = [event]
            heapq.heappush(self.ends, (start + self.config.size, event.session_id, start))
            heapq.heappush(self.starts.setdefault(event.session_id, []), start)
        else:
            messages.append(event)

    def advance(self, now: float | None) -> list[WindowRecord]:
        """Emit the windows closed early since the last call; then move the watermark to
        `now - out_of_orderness` and emit every window it passed."""
        return self.advance_mark(None if now is None else now - self.config.out_of_orderness)

    def advance_mark(self, mark: float | None) -> list[WindowRecord]:
        """Emit the windows closed early since the last call; then move the watermark to `mark`
        and emit every window it passed."""
        closed, self.early = self.early, []
        if mark is None:
            return closed
        if mark <= self.watermark:
            return closed
        self.watermark = mark
        while self.ends and self.ends[0][0] <= mark:
            _, session, start = heapq.heappop(self.ends)
            if (session, start) in self.open:
                self._forget_oldest(session)
                closed.append(self._emit(session, start))
        while self.closed_ends and self.closed_ends[0][0] <= mark:
            end, session = heapq.heappop(self.closed_ends)
            if self.closed_to.get(session) == end:
                del self.closed_to[session]
        return closed

    def flush(self) -> list[WindowRecord]:
        """Emit every open window (end of a finite input), after those closed early."""
        closed, self.early = self.early, []
        for _, session, start in sorted(self.ends):
            if (session, start) in self.open:
                closed.append(self._emit(session, start))
        self.ends.clear()
        self.starts.clear()
        return closed

    def _opened(self, session: str, start: float) -> None:
        """Count a session's new window; close its oldest early when that makes too many."""
        starts = self.starts.setdefault(session, [])
        heapq.heappush(starts, start)
        if len(starts) > self.config.max_open_windows:
            oldest = heapq.heappop(starts)
            end = oldest + self.config.size
            self.closed_to[session] = max(end, self.closed_to.get(session, -math.inf))
            heapq.heappush(self.closed_ends, (end, session))
            self.early.append(self._emit(session, oldest, TOO_MANY_OPEN))

    def _forget_oldest(self, session: str) -> None:
        """Drop a session's oldest open window start (the one the watermark just passed)."""
        starts = self.starts[session]
        heapq.heappop(starts)
        if not starts:
            del self.starts[session]

    def _closed_reason(self, session: str) -> str:
        up_to = iso(self.closed_to[session])
        return f"window already emitted: the session's windows up to {up_to} were closed early ({TOO_MANY_OPEN})"

    def _trim(self, key: tuple[str, float], messages: list[Event]) -> None:
        """Keep the window's `max_messages` earliest events; count the others as dropped."""
        messages.sort(key=_chronological)
        keep = self.config.max_messages
        self.dropped.setdefault(key, Dropped()).take(messages[keep:])
        del messages[keep:]

    def _emit(self, session: str, start: float, closed_early: str | None = None) -> WindowRecord:
        key = (session, start)
        messages = self.open.pop(key)
        if len(messages) > self.config.max_messages:
            self._trim(key, messages)
        else:
            messages.sort(key=_chronological)
        dropped = self.dropped.pop(key, None)
        counts: dict[str, int] = {}
        for m in messages:
            counts[m.sender] = counts.get(m.sender, 0) + 1
        end = start + self.config.size
        if dropped is None:
            return WindowRecord(session, start, end, tuple(messages), counts, closed_early=closed_early)
        for sender, n in dropped.counts.items():
            counts[sender] = counts.get(sender, 0) + n
        return WindowRecord(session, start, end, tuple(messages), counts, dropped.count, dropped.last, closed_early)


def _chronological(event: Event) -> tuple[float, str, int]:
    return (event.time or 0.0, event.source, event.offset)
