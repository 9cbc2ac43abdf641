"""The lake's tables: one Iceberg table per output kind, their schemas, the catalog.

Kinds map to tables in one namespace: `messages` → `chat_messages`, `windows` →
`conversation_windows`, `late` → `late_events`, `dead_letter` → `dead_letter`, `alerts` →
`alerts`, `moderated` → `moderated_messages`. Schemas are declared here (nested records stay
nested: lists of structs, a map, a struct); times are `timestamptz`; tables with an event time
are partitioned by its day and declare a sort order (session, time) that each batch is sorted by
before it is written. Every table has a `record_hash` column: a 64-bit BLAKE2b of the record's
canonical JSON, without the fields stages fill from outside the flow (`ENRICHMENT_FIELDS`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC, PartitionField, PartitionSpec
from pyiceberg.schema import Schema, index_by_name
from pyiceberg.table import Table
from pyiceberg.table.sorting import NullOrder, SortDirection, SortField, SortOrder
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import (
    BooleanType, DoubleType, IntegerType, ListType, LongType, MapType, NestedField, StringType, StructType,
    TimestamptzType,
)


Row = dict[str, Any]
TABLE_PROPERTIES = {"commit.manifest-merge.enabled": "true"}


# --- schemas -----------------------------------------------------------------------------------

def _str(i: Callable[[], int], name: str, required: bool = False) -> NestedField:
    return NestedField(i(), name, StringType(), required=required)


def _ts(i: Callable[[], int], name: str, required: bool = False) -> NestedField:
    return NestedField(i(), name, TimestamptzType(), required=required)


def _event_fields(i: Callable[[], int]) -> list[NestedField]:
    """The columns of `Event.as_record()`."""
    return [
        _str(i, "event_id", True), _str(i, "session_id", True), _str(i, "sender"), _str(i, "kind"), _str(i, "text"),
        _ts(i, "timestamp"), _str(i, "time_source"), _str(i, "shape"), _str(i, "language"), _str(i, "username"),
        _str(i, "source"), NestedField(i(), "line", LongType()),
    ]


def _hash(i: Callable[[], int]) -> NestedField:
    return NestedField(i(), "record_hash", LongType(), required=True)


def _moderation(i: Callable[[], int]) -> NestedField:
    """The `moderation` of a judged message (`dataflows.rules.Moderation.as_record()`)."""
    rule = StructType(_str(i, "id"), NestedField(i(), "version", LongType()))
    return NestedField(i(), "moderation", StructType(
        _str(i, "action"),
        NestedField(i(), "rules", ListType(i(), rule, element_required=True)),
        NestedField(i(), "reasons", ListType(i(), StringType(), element_required=True)),
        NestedField(i(), "flags", MapType(i(), StringType(), i(), BooleanType(), value_required=False)),
        _str(i, "role"),
        NestedField(i(), "models", MapType(i(), StringType(), i(), StringType(), value_required=False)),
    ))


def _translation(i: Callable[[], int]) -> list[NestedField]:
    """A message's `translated` text and its `translation` outcome (`connectors.llm.stage`)."""
    return [_str(i, "translated"), NestedField(i(), "translation", StructType(
        _str(i, "status"), _str(i, "model"), NestedField(i(), "latency_ms", DoubleType()), _str(i, "source"),
        _str(i, "target"), _str(i, "reason"), _str(i, "error"),
    ))]


def _assistant(i: Callable[[], int]) -> NestedField:
    """A window's suggested reply and summary (`connectors.llm.stage`)."""
    return NestedField(i(), "assistant", StructType(
        _str(i, "suggested_reply"), _str(i, "summary"), _str(i, "model"), NestedField(i(), "latency_ms", DoubleType()),
        _str(i, "status"), _str(i, "reason"), _str(i, "error"), _str(i, "raw"),
    ))


def _user_context(i: Callable[[], int]) -> NestedField:
    """The sender's history from the lake, attached by `connectors.lake.profiles.ProfilesStage`."""
    return NestedField(i(), "user_context", StructType(
        NestedField(i(), "total_messages", LongType()), _ts(i, "first_seen"), _ts(i, "last_active"),
    ))


def messages_schema() -> Schema:
    i = itertools.count(1).__next__
    return Schema(*_event_fields(i), _moderation(i), *_translation(i), _user_context(i), _hash(i))


def windows_schema() -> Schema:
    i = itertools.count(1).__next__
    message = StructType(_str(i, "event_id"), _str(i, "sender"), _str(i, "kind"), _str(i, "text"),
                         _ts(i, "timestamp"), _str(i, "time_source"))
    return Schema(
        _str(i, "session_id", True), _ts(i, "window_start", True), _ts(i, "window_end", True),
        NestedField(i(), "messages", ListType(i(), message, element_required=True)),
        NestedField(i(), "counts", MapType(i(), StringType(), i(), IntegerType(), value_required=False)),
        _ts(i, "first_event_time"), _ts(i, "last_event_time"), NestedField(i(), "truncated", BooleanType()),
        NestedField(i(), "overflow", LongType()), _str(i, "closed_early"), _assistant(i), _participants(i), _hash(i),
    )


def _participants(i: Callable[[], int]) -> NestedField:
    """The history of a window's senders from the lake (`connectors.lake.profiles`), for the assistant."""
    user = StructType(_str(i, "user"), NestedField(i(), "total_messages", LongType()), _ts(i, "first_seen"),
                      _ts(i, "last_active"))
    return NestedField(i(), "user_context", ListType(i(), user, element_required=True))


def late_events_schema() -> Schema:
    i = itertools.count(1).__next__
    return Schema(
        _str(i, "session_id", True), _ts(i, "window_start"), _ts(i, "window_end"), _ts(i, "watermark"),
        _str(i, "reason"), NestedField(i(), "event", StructType(*_event_fields(i)), required=True), _hash(i),
    )


def alerts_schema() -> Schema:
    i = itertools.count(1).__next__
    event = StructType(_str(i, "event_id"), _ts(i, "timestamp"), _str(i, "sender"), _str(i, "kind"), _str(i, "text"))
    return Schema(
        _str(i, "pattern", True), _str(i, "key"), _str(i, "severity"), _ts(i, "detected_at", True),
        _str(i, "session_id"), _str(i, "summary"),
        NestedField(i(), "events", ListType(i(), event, element_required=True)), _hash(i),
    )


def dead_letter_schema() -> Schema:
    i = itertools.count(1).__next__
    return Schema(
        _str(i, "source", True), NestedField(i(), "line", LongType(), required=True),
        NestedField(i(), "offset", LongType()), _str(i, "step"), _str(i, "reason"), _str(i, "raw"), _hash(i),
        _str(i, "topic"), NestedField(i(), "partition", IntegerType()),
    )


@dataclass(frozen=True)
class TableSpec:
    """One output kind's table: its schema, the column whose day partitions it, its sort order."""

    kind: str
    name: str
    schema: Schema
    day_of: str | None
    sort_by: tuple[str, ...]

    def partition_spec(self) -> PartitionSpec:
        if self.day_of is None:
            return UNPARTITIONED_PARTITION_SPEC
        source = self.schema.find_field(self.day_of)
        return PartitionSpec(PartitionField(source.field_id, 1000, DayTransform(), f"{self.day_of.replace('.', '_')}_day"))

    def sort_order(self) -> SortOrder:
        return SortOrder(*(SortField(self.schema.find_field(path).field_id, IdentityTransform(),
                                     SortDirection.ASC, NullOrder.NULLS_FIRST) for path in self.sort_by))

    def sort_key(self, row: Row) -> tuple[tuple[Any, ...], ...]:
        """The declared sort order as a Python key (nulls first)."""
        key = []
        for path in self.sort_by:
            value: Any = row
            for part in path.split("."):
                value = None if value is None else value.get(part)
            key.append((0,) if value is None else (1, value))
        return tuple(key)

    def sort_indices(self, rows: pa.Table) -> pa.Array:
        """The positions of `rows` in the declared sort order (nulls first; ties keep their order)."""
        keys = {}
        for n, path in enumerate(self.sort_by):
            head, *rest = path.split(".")
            column: Any = rows.column(head)
            for part in rest:
                column = pc.struct_field(column, part)
            keys[f"k{n}"] = column
        return pc.sort_indices(pa.table(keys), sort_keys=[(key, "ascending", "at_start") for key in keys])


TABLES: dict[str, TableSpec] = {spec.kind: spec for spec in (
    TableSpec("messages", "chat_messages", messages_schema(), "timestamp", ("session_id", "timestamp")),
    TableSpec("windows", "conversation_windows", windows_schema(), "window_start", ("session_id", "window_start")),
    TableSpec("late", "late_events", late_events_schema(), "event.timestamp", ("session_id", "event.timestamp")),
    TableSpec("alerts", "alerts", alerts_schema(), "detected_at", ("session_id", "detected_at")),
    TableSpec("dead_letter", "dead_letter", dead_letter_schema(), None, ("source", "line")),
    TableSpec("moderated", "moderated_messages", messages_schema(), "timestamp", ("session_id", "timestamp")),
)}


# --- catalog and tables ------------------------------------------------------------------------

def open_catalog(name: str = "convoflow", lake_dir: Path | None = None) -> Catalog:
    """The catalog: an embedded SQLite one in `lake_dir` (created on first use), else PyIceberg's config.

    Without `lake_dir`, `load_catalog(name)` reads `.pyiceberg.yaml` and `PYICEBERG_CATALOG__<NAME>__*`.
    """
    if lake_dir is None:
        return load_catalog(name)
    lake_dir = lake_dir.resolve()
    lake_dir.mkdir(parents=True, exist_ok=True)
    return SqlCatalog(name, uri=f"sqlite:///{lake_dir / 'catalog.db'}", warehouse=lake_dir.as_uri())


def ensure_tables(catalog: Catalog, namespace: str = "convoflow", kinds: Sequence[str] | None = None) -> dict[str, Table]:
    """Create the namespace and the tables of `kinds` (default: all) that are missing; return them by kind.

    A table made by an earlier version gains the columns added since, nested ones included
    (Iceberg schema evolution by name; its old rows read back with nulls there). Columns the
    table has beyond the declared schema (added with `lake evolve`) stay.
    """
    catalog.create_namespace_if_not_exists(namespace)
    tables = {}
    for kind in kinds if kinds is not None else TABLES:
        spec = TABLES[kind]
        identifier = (namespace, spec.name)
        if catalog.table_exists(identifier):
            table = catalog.load_table(identifier)
            if set(index_by_name(spec.schema)) - set(index_by_name(table.schema())):
                with table.update_schema() as update:
                    update.union_by_name(spec.schema)
            tables[kind] = table
        else:
            tables[kind] = catalog.create_table_if_not_exists(
                identifier, spec.schema, partition_spec=spec.partition_spec(), sort_order=spec.sort_order(),
                properties=TABLE_PROPERTIES)
    return tables
