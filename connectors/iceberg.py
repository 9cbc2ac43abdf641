"""Iceberg outputs: each output kind is one Iceberg table, written by one sink partition.

Kinds map to tables in one namespace: `messages` → `chat_messages`, `windows` →
`conversation_windows`, `late` → `late_events`, `dead_letter` → `dead_letter`, `alerts` →
`alerts`. Schemas are declared here (nested records stay nested: lists of structs, a map, a
struct); times are `timestamptz`; tables with an event time are partitioned by its day and
declare a sort order (session, time) that each batch is sorted by before it is written. Every
table has a `record_hash` column: a 64-bit BLAKE2b of the record's canonical JSON.

A sink partition buffers rows and appends them (one Iceberg snapshot) once it holds
`commit_rows` rows, once its oldest row has waited `commit_interval` seconds, and at `close()`;
never empty. The interval is checked when a batch arrives and when Bytewax takes the partition's
snapshot; Bytewax has no timer for sinks, so the rows of a stream gone idle wait for its next
batch or for `close()`.

Exactly-once. Each append's snapshot summary names the partition (`convoflow.partition` =
`<writer_id>/<kind>`) and its `convoflow.batch-seq`, which grows by one per commit and across
runs. The partition's Bytewax snapshot is `(next_seq, buffered rows, hashes still to skip)`.
Bytewax re-delivers everything after the snapshot it resumes from, so on resume the partition
walks the table's ancestry for its own commits with seq >= the resumed `next_seq`: exactly the
commits made after that snapshot. The hashes of the rows they added become a multiset; each
incoming row (resumed buffer first, then replayed batches) whose hash is in it is dropped and
counted off. Commits continue at the highest committed seq + 1.

- Crash before an append lands (while buffering, writing files, or a failed commit): no row of
  the batch is visible (files written without a commit are orphans no reader sees); the
  resumed buffer plus the replay rebuild it.
- Crash after the append landed, before Bytewax stored a later snapshot: the batch is visible,
  its rows come again and are dropped by hash; rows that followed them are written.
- Crash after that snapshot was stored: nothing to skip.

Guarantee: each record delivered to a partition is in its table exactly once, provided a resumed
run re-delivers the same records (same content; order, batching and interleaving of workers may
differ), which a deterministic flow such as the replay flow does. Identical records are counted,
not collapsed: a record delivered twice on purpose is written twice. A record that the resumed
run does not deliver again stays committed, and its hash stays in the skip set (bounded by the
rows committed after one snapshot). Markers must outlive recovery: expire only snapshots older
than the oldest Bytewax snapshot a run may resume from. `writer_id` must be unique per flow
writing a table. A run started without resume state continues the seq but skips nothing: running
a replay again without recovery appends its rows again.

Concurrent writers: PyIceberg (0.12, `Transaction.commit_transaction`) retries a commit that
lost a race (`commit.retry.num-retries`, default 4, backoff from 100 ms) after refreshing the
table, rebuilding the append on the new state, and stops if the earlier attempt's snapshot
landed after all. Other errors leave the outcome unknown: the partition then reloads the table
and looks for its own marker before raising.
"""

from __future__ import annotations

import hashlib
import itertools
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
from bytewax.outputs import StatefulSinkPartition
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC, PartitionField, PartitionSpec
from pyiceberg.schema import Schema
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot, ancestors_of
from pyiceberg.table.sorting import NullOrder, SortDirection, SortField, SortOrder
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import (
    BooleanType, IcebergType, IntegerType, ListType, LongType, MapType, NestedField, StringType, StructType, TimestamptzType,
)

from connectors.by_kind import KindPartitionedSink
from dataflows.errors import ConvoflowError

Record = dict[str, Any]
Row = dict[str, Any]
PARTITION_KEY = "convoflow.partition"
SEQ_KEY = "convoflow.batch-seq"
ROWS_KEY = "convoflow.batch-rows"
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
    ))


def messages_schema() -> Schema:
    i = itertools.count(1).__next__
    return Schema(*_event_fields(i), _moderation(i), _hash(i))


def windows_schema() -> Schema:
    i = itertools.count(1).__next__
    message = StructType(_str(i, "event_id"), _str(i, "sender"), _str(i, "kind"), _str(i, "text"),
                         _ts(i, "timestamp"), _str(i, "time_source"))
    return Schema(
        _str(i, "session_id", True), _ts(i, "window_start", True), _ts(i, "window_end", True),
        NestedField(i(), "messages", ListType(i(), message, element_required=True)),
        NestedField(i(), "counts", MapType(i(), StringType(), i(), IntegerType(), value_required=False)),
        _ts(i, "first_event_time"), _ts(i, "last_event_time"), _hash(i),
    )


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


TABLES: dict[str, TableSpec] = {spec.kind: spec for spec in (
    TableSpec("messages", "chat_messages", messages_schema(), "timestamp", ("session_id", "timestamp")),
    TableSpec("windows", "conversation_windows", windows_schema(), "window_start", ("session_id", "window_start")),
    TableSpec("late", "late_events", late_events_schema(), "event.timestamp", ("session_id", "event.timestamp")),
    TableSpec("alerts", "alerts", alerts_schema(), "detected_at", ("session_id", "detected_at")),
    TableSpec("dead_letter", "dead_letter", dead_letter_schema(), None, ("source", "line")),
    TableSpec("moderated", "moderated_messages", messages_schema(), "timestamp", ("session_id", "timestamp")),
)}


# --- rows --------------------------------------------------------------------------------------

def record_hash(record: Record) -> int:
    """A 64-bit fingerprint of a record's content, the same in every process and run."""
    digest = hashlib.blake2b(orjson.dumps(record, option=orjson.OPT_SORT_KEYS), digest_size=8).digest()
    return int.from_bytes(digest, "big", signed=True)


def to_timestamp(value: Any) -> datetime:
    """An aware UTC datetime from an ISO-8601 string with offset, epoch seconds or an aware datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    elif isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    if not isinstance(value, datetime) or value.tzinfo is None:
        msg = f"expected an ISO-8601 time with an offset, epoch seconds or an aware datetime, got {value!r}"
        raise ConvoflowError(msg)
    return value


def _converter(kind: IcebergType, where: str) -> Callable[[Any], Any] | None:
    """A function turning a JSON value into the Python value PyArrow takes for `kind`; None: as is."""
    if isinstance(kind, TimestamptzType):
        return to_timestamp
    if isinstance(kind, StructType):
        return _struct_converter(kind.fields, where)
    if isinstance(kind, ListType):
        item = _converter(kind.element_type, where)
        return None if item is None else (lambda values: [None if v is None else item(v) for v in values])
    if isinstance(kind, MapType):
        value = _converter(kind.value_type, where) or (lambda v: v)
        return lambda mapping: [(k, None if v is None else value(v)) for k, v in mapping.items()]
    return None


def _struct_converter(fields: Sequence[NestedField], where: str) -> Callable[[Record], Row]:
    plan = [(f.name, f.required, _converter(f.field_type, f"{where}.{f.name}")) for f in fields]
    names = {f.name for f in fields}

    def convert(record: Record) -> Row:
        if not names.issuperset(record):
            msg = f"{where}: fields {sorted(set(record) - names)} are not in the table's schema"
            raise ConvoflowError(msg)
        row: Row = {}
        for name, required, conv in plan:
            value = record.get(name)
            if value is None:
                if required:
                    msg = f"{where}.{name} is required but missing in {record!r}"
                    raise ConvoflowError(msg)
                row[name] = None
            else:
                row[name] = value if conv is None else conv(value)
        return row

    return convert


def row_converter(spec: TableSpec) -> Callable[[Record], Row]:
    """Turns a record of `spec.kind` into a row of its table, `record_hash` included."""
    fields = [f for f in spec.schema.fields if f.name != "record_hash"]
    convert = _struct_converter(fields, spec.name)
    return lambda record: {**convert(record), "record_hash": record_hash(record)}


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

    A table made by an earlier version gains the columns added since (Iceberg schema evolution;
    its old rows read back with nulls there).
    """
    catalog.create_namespace_if_not_exists(namespace)
    tables = {}
    for kind in kinds if kinds is not None else TABLES:
        spec = TABLES[kind]
        identifier = (namespace, spec.name)
        if catalog.table_exists(identifier):
            table = catalog.load_table(identifier)
            if {f.name for f in spec.schema.fields} - {f.name for f in table.schema().fields}:
                with table.update_schema() as update:
                    update.union_by_name(spec.schema)
            tables[kind] = table
        else:
            tables[kind] = catalog.create_table_if_not_exists(
                identifier, spec.schema, partition_spec=spec.partition_spec(), sort_order=spec.sort_order(),
                properties=TABLE_PROPERTIES)
    return tables


def own_commits(table: Table, partition: str) -> Iterator[tuple[int, Snapshot]]:
    """`(seq, snapshot)` of `partition`'s commits in the table's history, newest first."""
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        if snapshot.summary is not None and snapshot.summary.get(PARTITION_KEY) == partition:
            yield int(str(snapshot.summary[SEQ_KEY])), snapshot


def committed_batches(table: Table, partition: str, from_seq: int = 0) -> list[tuple[int, Snapshot]]:
    """`partition`'s commits with seq >= `from_seq`, newest first (its seqs only grow along history)."""
    return list(itertools.takewhile(lambda commit: commit[0] >= from_seq, own_commits(table, partition)))


def added_hashes(table: Table, snapshot: Snapshot) -> list[int]:
    """The `record_hash` of every row that `snapshot` appended."""
    scan = table.incremental_append_scan(from_snapshot_id_exclusive=snapshot.parent_snapshot_id,
                                         to_snapshot_id_inclusive=snapshot.snapshot_id, selected_fields=("record_hash",))
    return scan.to_arrow().column("record_hash").to_pylist()


# --- sink --------------------------------------------------------------------------------------

@dataclass
class IcebergState:
    """A partition's Bytewax snapshot: the next batch's seq, rows not yet committed, hashes to skip."""

    next_seq: int
    rows: list[Row] = field(default_factory=list)
    skip: dict[int, int] = field(default_factory=dict)


class IcebergSink(KindPartitionedSink[list[Record], IcebergState]):
    """Routes `(kind, records)` to the kind's table; one partition per kind (see the module doc)."""

    output = "Iceberg"

    def __init__(self, catalog: Catalog, *, namespace: str = "convoflow", kinds: Sequence[str] | None = None,
                 writer_id: str = "convoflow", commit_rows: int = 50_000, commit_interval: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.catalog, self.namespace, self.writer_id = catalog, namespace, writer_id
        super().__init__(kinds if kinds is not None else list(TABLES))
        unknown = set(self.kinds) - set(TABLES)
        if unknown:
            msg = f"no Iceberg table for output kinds {sorted(unknown)}; known kinds: {sorted(TABLES)}"
            raise ConvoflowError(msg)
        self.commit_rows, self.commit_interval, self.clock = commit_rows, commit_interval, clock

    def build_part(self, step_id: str, for_part: str, resume_state: IcebergState | None) -> IcebergPartition:
        table = ensure_tables(self.catalog, self.namespace, [for_part])[for_part]
        return IcebergPartition(table, TABLES[for_part], f"{self.writer_id}/{for_part}", resume_state,
                                commit_rows=self.commit_rows, commit_interval=self.commit_interval, clock=self.clock)


class IcebergPartition(StatefulSinkPartition[list[Record], IcebergState]):
    """Buffers one kind's rows and appends them to its table in batches, skipping what is committed."""

    def __init__(self, table: Table, spec: TableSpec, name: str, resume: IcebergState | None, *,
                 commit_rows: int, commit_interval: float, clock: Callable[[], float]) -> None:
        self.table, self.spec, self.name = table, spec, name
        self.commit_rows, self.commit_interval, self.clock = commit_rows, commit_interval, clock
        self.to_row = row_converter(spec)
        self.arrow_schema = table.schema().as_arrow()
        self.rows: list[Row] = []
        self.oldest: float | None = None
        self.skip: Counter[int] = Counter(resume.skip if resume is not None else {})
        if resume is None:
            latest = next(own_commits(table, name), None)
            self.next_seq = 0 if latest is None else latest[0] + 1
        else:
            self.next_seq = resume.next_seq
            for seq, snapshot in committed_batches(table, name, resume.next_seq):
                self.next_seq = max(self.next_seq, seq + 1)
                self.skip.update(added_hashes(table, snapshot))
            self._add(resume.rows)

    def write_batch(self, values: list[list[Record]]) -> None:
        self._add(self.to_row(record) for records in values for record in records)
        if len(self.rows) >= self.commit_rows or self._due():
            self.commit()

    def snapshot(self) -> IcebergState:
        if self._due():
            self.commit()
        return IcebergState(self.next_seq, list(self.rows), dict(self.skip))

    def close(self) -> None:
        self.commit()

    def commit(self) -> None:
        """Append the buffered rows, sorted, as one snapshot carrying this partition's marker."""
        if not self.rows:
            return
        rows = sorted(self.rows, key=self.spec.sort_key)
        marker = {PARTITION_KEY: self.name, SEQ_KEY: str(self.next_seq), ROWS_KEY: str(len(rows))}
        try:
            self.table.append(pa.Table.from_pylist(rows, schema=self.arrow_schema), snapshot_properties=marker)
        except (CommitFailedException, ValidationException):
            raise
        except Exception:
            self.table.refresh()
            if not committed_batches(self.table, self.name, self.next_seq):
                raise
        self.next_seq += 1
        self.rows, self.oldest = [], None

    def _add(self, rows: Iterable[Row]) -> None:
        for row in rows:
            digest = row["record_hash"]
            if self.skip[digest] > 0:
                self.skip[digest] -= 1
                if not self.skip[digest]:
                    del self.skip[digest]
            else:
                self.rows.append(row)
        if self.rows and self.oldest is None:
            self.oldest = self.clock()

    def _due(self) -> bool:
        return self.oldest is not None and self.clock() - self.oldest >= self.commit_interval
