"""Event-time tumbling windows per session, closed by a watermark with bounded out-of-orderness.

Semantics, as in Flink: the watermark is the run's clock minus the out-of-orderness bound; a
window `[start, end)` is emitted once the watermark reaches `end`, and an event is late only
when its own window has already been emitted. Such an event goes to the late output with the
window it missed. The watermark never goes back, so an emitted window can never be reopened
and emitted again (Bytewax's own tumbling windower forgets a key's clock once the key has no
open window, and a late event then reopens and re-emits it). A session with no open window
holds no state at all.
"""

from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field

from dataflows.events import Event, LateEvent, WindowRecord


@dataclass(frozen=True)
class WindowConfig:
    """Tumbling windows of `size` seconds aligned to `align_to` (epoch seconds)."""

    size: float = 30.0
    out_of_orderness: float = 5.0
    align_to: float = 0.0

    def __post_init__(self) -> None:
        if not (self.size > 0 and math.isfinite(self.size)):
            msg = f"window size must be a positive number of seconds, got {self.size}"
            raise ValueError(msg)
        if not (self.out_of_orderness >= 0 and math.isfinite(self.out_of_orderness)):
            msg = f"out-of-orderness must be >= 0 seconds, got {self.out_of_orderness}"
            raise ValueError(msg)

    def start_of(self, time: float) -> float:
        return self.align_to + math.floor((time - self.align_to) / self.size) * self.size


@dataclass
class WindowBook:
    """Open windows of many sessions sharing one watermark (one shard of the flow)."""

    config: WindowConfig
    watermark: float = -math.inf
    open: dict[tuple[str, float], list[Event]] = field(default_factory=dict)
    ends: list[tuple[float, str, float]] = field(default_factory=list)

    def add(self, event: Event) -> LateEvent | None:
        """Put a timed event in its window, or return it as late if that window was emitted."""
        assert event.time is not None, "events are timed before windowing"
        start = self.config.start_of(event.time)
        end = start + self.config.size
        if end <= self.watermark:
            return LateEvent(event, start, end, self.watermark)
        key = (event.session_id, start)
        messages = self.open.get(key)
        if messages is None:
            self.open[key] = [event]
            heapq.heappush(self.ends, (end, event.session_id, start))
        else:
            messages.append(event)
        return None

    def advance(self, now: float | None) -> list[WindowRecord]:
        """Move the watermark to `now - out_of_orderness` and emit every window it passed."""
        if now is None:
            return []
        mark = now - self.config.out_of_orderness
        if mark <= self.watermark:
            return []
        self.watermark = mark
        closed = []
        while self.ends and self.ends[0][0] <= mark:
            _, session, start = heapq.heappop(self.ends)
            closed.append(self._emit(session, start))
        return closed

    def flush(self) -> list[WindowRecord]:
        """Emit every open window (end of a finite input)."""
        closed = [self._emit(session, start) for _, session, start in sorted(self.ends)]
        self.ends.clear()
        return closed

    def _emit(self, session: str, start: float) -> WindowRecord:
        messages = sorted(self.open.pop((session, start)), key=_chronological)
        counts: dict[str, int] = {}
        for m in messages:
            counts[m.sender] = counts.get(m.sender, 0) + 1
        return WindowRecord(session, start, start + self.config.size, tuple(messages), counts)


def _chronological(event: Event) -> tuple[float, str, int]:
    return (event.time or 0.0, event.source, event.offset)
