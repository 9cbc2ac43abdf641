"""An alert: one match of one pattern for one key, and its output record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from dataflows.events import Event, iso
from dataflows.patterns.definitions import PatternDef, Summarizer, iso_of

TEXT_EXCERPT_CHARS = 80


@dataclass(frozen=True, slots=True)
class Alert:
    """One match of one pattern for one key."""

    pattern: str
    key: str
    severity: str
    detected_at: float
    events: tuple[Event, ...]
    summary: str

    def as_record(self) -> dict[str, Any]:
        last = self.events[-1]
        return {
            "pattern": self.pattern,
            "key": self.key,
            "severity": self.severity,
            "detected_at": iso_of(last) if last.time == self.detected_at else iso(self.detected_at),
            "session_id": last.session_id,
            "summary": self.summary,
            "events": [
                {"event_id": e.event_id, "timestamp": e.timestamp, "sender": e.sender, "kind": e.kind,
                 "text": e.text[:TEXT_EXCERPT_CHARS]}
                for e in self.events
            ],
        }


def alert_of(pattern: PatternDef, summarize: Summarizer, key: str, detected_at: float,
             events: tuple[Event, ...]) -> Alert:
    """The alert of a match of `events` of `pattern` under `key`."""
    return Alert(pattern.id, key, pattern.severity, detected_at, events, summarize(key, events))
