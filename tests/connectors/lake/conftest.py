"""Fixtures and helpers of the lake tests: a catalog, events and records of every kind, a sink partition."""

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from connectors.lake.sink import IcebergPartition, IcebergSink, IcebergState, SnapshotExpiry
from connectors.lake.tables import TABLES, open_catalog
from dataflows.events import DeadLetter, Event, LateEvent, LineRef, WindowRecord, iso
from dataflows.patterns.alerts import Alert
from dataflows.rules import Moderation
from tests.conftest import FakeClock

T0 = 1704103200.0  # 2024-01-01T10:00:00Z


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return open_catalog(lake_dir=tmp_path / "lake")


@pytest.fixture
def make_event() -> Callable[..., Event]:
    def make(n: int = 1, session: str = "s-1", text: str = "hi", **overrides: Any) -> Event:
        event = Event(f"chat.jsonl:{n}", session, "customer", "message", text, None, "event", "conversation",
                      "chat.jsonl", n, 10 * n, **overrides)
        return event.timed(T0 + 60 * n)

    return make


@pytest.fixture
def records(make_event: Callable[..., Event]) -> dict[str, list[dict[str, Any]]]:
    """A few records of each kind, as the flow's `as_record()` makes them."""
    e1, e2, e3 = make_event(1), make_event(2, language="es", username="alice"), make_event(3, session="s-2")
    return {
        "messages": [e.as_record() for e in (e3, e1)] + [judged(e2, Moderation("flag", e2.text, (("bw", 2),), ("w",)))],
        # The profiles stage gives every window a (maybe empty) `user_context` list; PyIceberg 0.12
        # reads a null top-level list back as [], so a window without one would not round-trip.
        "windows": [{**WindowRecord("s-1", T0, T0 + 300, (e1, e2), {"message": 2}).as_record(),
                     "user_context": [{"user": "s-1/customer", "total_messages": 3, "first_seen": iso(T0),
                                       "last_active": iso(T0 + 60)}]},
                    {**WindowRecord("s-2", T0, T0 + 300, (e3,), {}).as_record(), "user_context": []}],
        "late": [LateEvent(e1, T0, T0 + 300, T0 + 400).as_record()],
        "dead_letter": [DeadLetter(LineRef("chat.jsonl", 4, 40), "{oops", "invalid JSON").as_record(),
                        DeadLetter(LineRef("chat/1", 7, 7), "{", "not JSON", "parse",
                                   (("topic", "chat"), ("partition", 1), ("offset", 7))).as_record()],
        "moderated": [judged(e3, Moderation("block", e3.text, (("perm-eve", 1),), ("muted",), (("translation", False),),
                                            "muted"))],
        "alerts": [Alert("angry", "s-1", "high", T0 + 150, (e1, e2), "two messages").as_record()],
    }


def judged(event: Event, moderation: Moderation) -> dict[str, Any]:
    return {**event.as_record(), "moderation": moderation.as_record()}


def messages(first: int, count: int, make_event: Callable[..., Event]) -> list[dict[str, Any]]:
    return [make_event(n).as_record() for n in range(first, first + count)]


def table_of(catalog: Catalog, kind: str) -> Table:
    return catalog.load_table(("convoflow", TABLES[kind].name))


def event_ids(catalog: Catalog) -> Counter[str]:
    return Counter(table_of(catalog, "messages").scan(selected_fields=("event_id",)).to_arrow()["event_id"].to_pylist())


def snapshot_count(catalog: Catalog, kind: str = "messages") -> int:
    return len(table_of(catalog, kind).metadata.snapshots)


def part(catalog: Catalog, resume: IcebergState | None = None, *, kind: str = "messages", writer: str = "convoflow",
         commit_rows: int = 1000, clock: Callable[[], float] | None = None,
         expiry: SnapshotExpiry | None = SnapshotExpiry()) -> IcebergPartition:
    sink = IcebergSink(catalog, writer_id=writer, commit_rows=commit_rows, clock=clock or FakeClock(), expiry=expiry)
    return sink.build_part("write", kind, resume)
