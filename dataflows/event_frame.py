"""The one declared schema of events on the hot path: a Polars frame with a column per `Event` field.

A source emits a batch of accepted events as one such frame (a micro-batch), stamped with the
replay block each event was read in and the clock before it (`STAMP_COLUMNS`, see
`dataflows.sequencing.Stamped`); the router cuts it by shard and adds the `scope` each shard
gives its rows. Dead letters and markers stay objects: they are few.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import polars as pl

from dataflows.events import Event
from dataflows.sequencing import Scope, Stamped

EVENT_SCHEMA = pl.Schema({
    "event_id": pl.String,
    "session_id": pl.String,
    "sender": pl.String,
    "kind": pl.String,
    "text": pl.String,
    "time": pl.Float64,
    "time_source": pl.String,
    "shape": pl.String,
    "source": pl.String,
    "line": pl.Int64,
    "offset": pl.Int64,
    "language": pl.String,
    "username": pl.String,
    "timestamp": pl.String,
})
"""An `Event` per row, in `Event`'s field order (so a row is `Event._make(row)`)."""
assert tuple(EVENT_SCHEMA) == Event._fields, "the frame's columns are Event's fields"

STAMP_COLUMNS = pl.Schema({"block": pl.Int64, "clock_before": pl.Float64})
STAMPED_SCHEMA = pl.Schema([*EVENT_SCHEMA.items(), *STAMP_COLUMNS.items()])
"""Events as a replay source emits them: each with its block and the latest event time before it there."""
ROUTED_SCHEMA = pl.Schema([*STAMPED_SCHEMA.items(), ("scope", pl.String)])
"""Events as a shard receives them: each with its `Scope` in that shard."""

_EVENT_WIDTH = len(EVENT_SCHEMA)


def events_frame(events: Iterable[Event]) -> pl.DataFrame:
    """A frame of `EVENT_SCHEMA` holding `events` (for events parsed one by one, and tests)."""
    return pl.DataFrame(list(events), schema=EVENT_SCHEMA, orient="row")


def stamped_rows(frame: pl.DataFrame) -> Iterator[Stamped]:
    """The rows of a stamped (`STAMPED_SCHEMA`, scope `all`) or routed frame (`ROUTED_SCHEMA`,
    maybe with more columns after) as `Stamped` events, in the frame's order."""
    width = _EVENT_WIDTH
    if "scope" not in frame.columns:
        frame = frame.with_columns(pl.lit("all").alias("scope"))
    if frame.columns[: len(ROUTED_SCHEMA)] != ROUTED_SCHEMA.names():
        frame = frame.select(ROUTED_SCHEMA.names())
    for row in frame.iter_rows():
        scope: Scope = row[width + 2]
        yield Stamped(Event._make(row[:width]), row[width], row[width + 1], scope)
