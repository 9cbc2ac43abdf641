"""Replay timed events through a `PatternBook`: the harness of the column-wise matchers' differential tests."""

from __future__ import annotations

import pickle
from collections.abc import Sequence

from dataflows.events import Event
from dataflows.patterns.definitions import PatternDef
from dataflows.patterns.engine import PatternBook


def replay_alerts(patterns: Sequence[PatternDef], events: list[tuple[float, Event]], advance_every: int,
                  pickle_at: int | None) -> list[dict[str, object]]:
    """The alert records of `events` (each with the clock it arrives at), 5 s out of order allowed,
    advancing the watermark every `advance_every` events and snapshotting the book after event
    `pickle_at` (restored from the pickle)."""
    book = PatternBook(tuple(patterns), 5.0)
    alerts = []
    for i, (clock, event) in enumerate(events):
        book.add(event, clock)
        if i % advance_every == 0:
            alerts += book.advance(clock)
        if i == pickle_at:
            book = pickle.loads(pickle.dumps(book))
    alerts += book.flush()
    return [a.as_record() for a in alerts]
