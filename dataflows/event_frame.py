"""The one declared schema of events on the hot path: a Polars frame with a column per `Event` field.

A source emits a batch of accepted events as one such frame (a micro-batch), stamped with the
replay block each event was read in and the clock before it (`STAMP_COLUMNS`, see
`dataflows.sequencing.Stamped`); the router cuts it by shard and adds the `scope` each shard
gives its rows. Dead letters and markers stay objects: they are few.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import polars as pl

from dataflows.events import Event

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


def events_frame(events: Iterable[Event]) -> pl.DataFrame:
    """A frame of `EVENT_SCHEMA` holding `events` (for events parsed one by one, and tests)."""
    return pl.DataFrame(list(events), schema=EVENT_SCHEMA, orient="row")


def frame_events(frame: pl.DataFrame) -> list[Event]:
    """The `Event` of each row of a frame with `EVENT_SCHEMA`'s columns (and maybe others). Made column
    by column: Polars hands out whole columns as Python lists about twice as fast as rows (`rows()`)."""
    return list(map(Event._make, zip(*(frame[name].to_list() for name in EVENT_SCHEMA.names()))))


RECORD_FIELDS = ["event_id", "session_id", "sender", "kind", "text", "timestamp", "time_source", "shape", "language",
                 "username", "source", "line"]
"""An event's fields in its JSON record, in order (`Event.as_record`)."""
assert RECORD_FIELDS == list(Event("", "", "", "", "", None, "event", "chat", "", 0, 0).as_record())


def event_records(frame: pl.DataFrame) -> list[dict[str, Any]]:
    """Each row's `Event.as_record()`."""
    return frame.select(RECORD_FIELDS).to_dicts()


def timed(released: pl.DataFrame, origin: float) -> pl.DataFrame:
    """Give each event without a timestamp the clock's time (`origin` before any clock), as
    `Event.timed` does; `clock` is the clock before each event."""
    if not released["time"].has_nulls():
        return released
    untimed = pl.col("time").is_null()
    given = pl.coalesce("clock", pl.lit(origin, pl.Float64))
    return released.with_columns(
        pl.when(untimed).then(given).otherwise("time").alias("time"),
        pl.when(untimed).then(iso_expr(given)).otherwise("timestamp").alias("timestamp"),
    )


def iso_expr(seconds: pl.Expr) -> pl.Expr:
    """Epoch seconds as `dataflows.events.iso` formats them (`2024-01-01T10:00:03.250000+00:00`), column-wise."""
    whole = seconds.floor()
    micro = ((seconds - whole) * 1_000_000).round(0, mode="half_to_even").cast(pl.Int64)
    carry = micro >= 1_000_000
    second = whole.cast(pl.Int64) + carry.cast(pl.Int64)
    micro = pl.when(carry).then(micro - 1_000_000).otherwise(micro)
    date = pl.from_epoch(second, time_unit="s").dt.strftime("%Y-%m-%dT%H:%M:%S")
    fraction = pl.when(micro > 0).then(pl.lit(".") + micro.cast(pl.String).str.zfill(6)).otherwise(pl.lit(""))
    return pl.when(seconds.is_not_null()).then(date + fraction + pl.lit("+00:00"))
