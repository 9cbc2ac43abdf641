"""Iceberg outputs: each output kind is one Iceberg table, written by one sink partition.

Kinds map to tables in one namespace: `messages` → `chat_messages`, `windows` →
`conversation_windows`, `late` → `late_events`, `dead_letter` → `dead_letter`, `alerts` →
`alerts`, `moderated` → `moderated_messages`. Schemas are declared here (nested records stay
nested: lists of structs, a map, a struct); times are `timestamptz`; tables with an event time
are partitioned by its day and declare a sort order (session, time) that each batch is sorted by
before it is written. Every table has a `record_hash` column: a 64-bit BLAKE2b of the record's
canonical JSON, without the fields stages fill from outside the flow (`ENRICHMENT_FIELDS`).

A sink partition turns each incoming batch of dicts into Arrow columns at once, and frames
(`Records`) once it has gathered `CONVERT_ROWS` rows of one schema, or before a commit or a
snapshot (`connectors.lake_rows`; records are checked against the table's schema there: an
unknown field or a missing required one is an error naming the table and field), buffers them
and appends them (one Iceberg snapshot) once it holds
`commit_rows` rows, once its oldest row has waited `commit_interval` seconds, and at `close()`;
never empty. The interval is checked when a batch arrives and when Bytewax takes the partition's
snapshot; Bytewax has no timer for sinks, so the rows of a stream gone idle wait for its next
batch or for `close()`. Appends run on the partition's own thread, one at a time, while the next
batches are converted; Bytewax's `snapshot()` and `close()` wait for the append in flight and
raise its error, so no Bytewax snapshot counts a commit that has not landed.

Exactly-once. Each append's snapshot summary names the partition (`convoflow.partition` =
`<writer_id>/<kind>`) and its `convoflow.batch-seq`, which grows by one per commit and across
runs. The partition's Bytewax snapshot is `(next_seq, buffered rows, hashes still to skip)`.
Bytewax re-delivers everything after the snapshot it resumes from, so on resume the partition
finds its own commits with seq >= the resumed `next_seq`: exactly the commits made after that
snapshot. The hashes of the rows they added become a multiset; each incoming row (resumed buffer
first, then replayed batches) whose hash is in it is dropped and counted off. Commits continue at
the highest committed seq + 1.

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
rows committed after one snapshot). `writer_id` must be unique per flow writing a table. A run
started without resume state continues the seq but skips nothing: running a replay again without
recovery appends its rows again.

Snapshot expiry. Append latency grows with the number of snapshots, so each partition expires
the oldest part of its table's history on a schedule (`SnapshotExpiry`: every N of its commits
or T seconds, keeping the newest `keep` snapshots and those younger than `min_age`). Expiring a
snapshot removes it from the history: its marker would be lost, and the retained snapshots'
ancestry stops there. So
`expire_snapshots` (also behind `lake expire`) moves the markers of the commits it expires, as
`(seq, data sequence number)`, into the table's *ledger*, table properties named
`convoflow.ledger.<partition>#<first>-<last>`, in the same metadata commit. The bookkeeping reads
markers from the retained history and the ledger; the rows of an expired commit are the data
files that still carry its data sequence number (Iceberg keeps it on every manifest entry, merged
manifests included), so a resume after expiry skips exactly what was committed. Each expiry adds
its own ledger key and merges the keys it saw, so concurrent expiries lose nothing whatever the
catalog. The ledger keeps a partition's newest `LEDGER_LIMIT` commits; a resume that needs older
ones, or whose markers another tool expired (Spark's or PyIceberg's own expiry know nothing of
the ledger), finds a gap in the seqs and stops with an error rather than write rows twice.
Rewriting data files (`lake compact`, deletes) gives the rows new sequence numbers: resuming
from a Bytewax snapshot older than the rewrite may then write again rows whose commit was
already expired.

Concurrent writers: PyIceberg (0.12, `Transaction.commit_transaction`) retries a commit that
lost a race (`commit.retry.num-retries`, default 4, backoff from 100 ms) after refreshing the
table, rebuilding the append on the new state, and stops if the earlier attempt's snapshot
landed after all. An append whose starting snapshot another writer expired meanwhile fails
without landing; the partition then starts it again on the reloaded table (`COMMIT_ATTEMPTS`).
Other errors leave the outcome unknown: the partition then reloads the table and looks for its
own marker before raising. A failed expiry is logged and tried again later.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from bytewax.outputs import StatefulSinkPartition
from pyiceberg.catalog import Catalog, load_catalog
from pyiceberg.catalog.sql import SqlCatalog
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.manifest import DataFile, ManifestContent, ManifestEntryStatus
from pyiceberg.partitioning import UNPARTITIONED_PARTITION_SPEC, PartitionField, PartitionSpec
from pyiceberg.schema import Schema, index_by_name
from pyiceberg.table import FileScanTask, Table
from pyiceberg.table.snapshots import Snapshot, ancestors_of
from pyiceberg.table.sorting import NullOrder, SortDirection, SortField, SortOrder
from pyiceberg.table.update.snapshot import ExpireSnapshots
from pyiceberg.transforms import DayTransform, IdentityTransform
from pyiceberg.types import (
    BooleanType, DoubleType, IntegerType, ListType, LongType, MapType, NestedField, StringType, StructType,
    TimestamptzType,
)
from pyiceberg.utils.datetime import datetime_to_millis

from connectors.progress import FigureFile
from connectors.run_log import log_event
from connectors.by_kind import KindPartitionedSink
from dataflows.errors import ConvoflowError
from connectors.lake_rows import ArrowRows
from dataflows.records import Records

Row = dict[str, Any]
PARTITION_KEY = "convoflow.partition"
SEQ_KEY = "convoflow.batch-seq"
ROWS_KEY = "convoflow.batch-rows"
LEDGER_PREFIX = "convoflow.ledger."
LEDGER_LIMIT = 2000
"""How many of a partition's expired commits the ledger remembers (its newest)."""
TABLE_PROPERTIES = {"commit.manifest-merge.enabled": "true"}
CONVERT_ROWS = 20_000
"""Rows of frames a partition gathers before it converts them in one go (and checks them)."""
COMMIT_ATTEMPTS = 3
"""Appends a partition tries (each with PyIceberg's own retries) before it gives up."""

log = logging.getLogger(__name__)


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
    """A message's `translated` text and its `translation` outcome (`connectors.llm_stage`)."""
    return [_str(i, "translated"), NestedField(i(), "translation", StructType(
        _str(i, "status"), _str(i, "model"), NestedField(i(), "latency_ms", DoubleType()), _str(i, "source"),
        _str(i, "target"), _str(i, "reason"), _str(i, "error"),
    ))]


def _assistant(i: Callable[[], int]) -> NestedField:
    """A window's suggested reply and summary (`connectors.llm_stage`)."""
    return NestedField(i(), "assistant", StructType(
        _str(i, "suggested_reply"), _str(i, "summary"), _str(i, "model"), NestedField(i(), "latency_ms", DoubleType()),
        _str(i, "status"), _str(i, "reason"), _str(i, "error"), _str(i, "raw"),
    ))


def _user_context(i: Callable[[], int]) -> NestedField:
    """The sender's history from the lake, attached by `connectors.profiles.ProfilesStage`."""
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
    """The history of a window's senders from the lake (`connectors.profiles`), for the assistant."""
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


# --- exactly-once bookkeeping ------------------------------------------------------------------

@dataclass(frozen=True)
class Commit:
    """One of a partition's commits: its seq, the table's data sequence number it got, its snapshot.

    `snapshot` is None once the snapshot is expired and the commit is known from the ledger.
    """

    seq: int
    sequence_number: int
    snapshot: Snapshot | None


def own_commits(table: Table, partition: str) -> Iterator[tuple[int, Commit]]:
    """`(seq, commit)` of `partition`'s commits in the table's history and ledger, newest first."""
    commits: dict[int, Commit] = {}
    for snapshot in ancestors_of(table.current_snapshot(), table.metadata):
        if snapshot.summary is not None and snapshot.summary.get(PARTITION_KEY) == partition:
            seq = int(str(snapshot.summary[SEQ_KEY]))
            commits.setdefault(seq, Commit(seq, snapshot.sequence_number or 0, snapshot))
    for seq, sequence_number in ledger(table).get(partition, {}).items():
        commits.setdefault(seq, Commit(seq, sequence_number, None))
    for seq in sorted(commits, reverse=True):
        yield seq, commits[seq]


def next_commit_seq(table: Table, partition: str) -> int:
    """The seq `partition`'s next commit to `table` gets: one past its newest, 0 before its first."""
    return next((seq + 1 for seq, _ in own_commits(table, partition)), 0)


def next_seqs(tables: Mapping[str, Table], writer_id: str = "convoflow") -> dict[str, int]:
    """Each kind's `next_commit_seq` for the sink `writer_id` in `tables` (by kind): a job's `job_start`."""
    return {kind: next_commit_seq(table, f"{writer_id}/{kind}") for kind, table in tables.items()}


def committed_batches(table: Table, partition: str, from_seq: int = 0) -> list[tuple[int, Commit]]:
    """`partition`'s commits with seq >= `from_seq`, newest first (its seqs only grow along history)."""
    return list(itertools.takewhile(lambda commit: commit[0] >= from_seq, own_commits(table, partition)))


def added_hashes(table: Table, commits: Iterable[Commit]) -> list[int]:
    """The `record_hash` of every row that `commits` appended.

    A retained commit's rows are the files its snapshot added; an expired one's, the live files
    that carry its data sequence number.
    """
    files: dict[str, DataFile] = {}
    expired = set()
    for commit in commits:
        if commit.snapshot is None:
            expired.add(commit.sequence_number)
            continue
        snapshot_id = commit.snapshot.snapshot_id
        for manifest in commit.snapshot.manifests(table.io):
            if manifest.content == ManifestContent.DATA and manifest.added_snapshot_id == snapshot_id:
                for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                    if entry.status == ManifestEntryStatus.ADDED and entry.snapshot_id == snapshot_id:
                        files[entry.data_file.file_path] = entry.data_file
    current = table.current_snapshot()
    if expired and current is not None:
        oldest = min(expired)
        for manifest in current.manifests(table.io):
            if manifest.content == ManifestContent.DATA and manifest.sequence_number >= oldest:
                for entry in manifest.fetch_manifest_entry(table.io, discard_deleted=True):
                    if entry.sequence_number in expired:
                        files[entry.data_file.file_path] = entry.data_file
    if not files:
        return []
    scan = ArrowScan(table.metadata, table.io, table.schema().select("record_hash"), AlwaysTrue())
    return scan.to_table([FileScanTask(data_file) for data_file in files.values()]).column("record_hash").to_pylist()


def ledger(table: Table) -> dict[str, dict[int, int]]:
    """The markers of expired commits: partition → {seq: data sequence number}."""
    entries: dict[str, dict[int, int]] = {}
    for key, value in table.properties.items():
        partition = _ledger_partition(key)
        if partition is not None:
            entries.setdefault(partition, {}).update(_ledger_entries(value))
    return entries


def _ledger_partition(key: str) -> str | None:
    """The partition a ledger property belongs to; None for other properties."""
    if not key.startswith(LEDGER_PREFIX):
        return None
    return key[len(LEDGER_PREFIX):].rpartition("#")[0]


def _ledger_entries(value: str) -> list[tuple[int, int]]:
    return [(int(seq), int(number)) for seq, _, number in (entry.partition(":") for entry in value.split(",") if entry)]


def _ledger_updates(properties: dict[str, str], moved: dict[str, dict[int, int]]) -> tuple[dict[str, str], list[str]]:
    """The ledger properties to set and to remove so that each partition's entries include `moved`."""
    updates: dict[str, str] = {}
    removals: list[str] = []
    for partition, entries in moved.items():
        keys = [key for key in properties if _ledger_partition(key) == partition]
        merged = {seq: number for key in keys for seq, number in _ledger_entries(properties[key])}
        merged.update(entries)
        kept = sorted(merged.items())[-LEDGER_LIMIT:]
        name = f"{LEDGER_PREFIX}{partition}#{kept[0][0]}-{kept[-1][0]}"
        updates[name] = ",".join(f"{seq}:{number}" for seq, number in kept)
        removals.extend(key for key in keys if key != name)
    return updates, removals


@dataclass(frozen=True)
class ExpiryReport:
    """What an expiry did: snapshots expired and kept, commit markers moved to the ledger."""

    expired: int
    kept: int
    markers: int


def expire_snapshots(table: Table, *, keep: int = 1, older_than: datetime | None = None) -> ExpiryReport:
    """Expire the oldest part of `table`'s history, keeping the sink's bookkeeping (see the module doc).

    Expires the current snapshot's ancestors from the first one that is beyond the newest `keep`
    (at least 1) and, when given, older than `older_than`, back to the beginning, so what stays
    is an unbroken history; and snapshots outside that history older than the same bound. Branch
    and tag heads stay. Metadata only, through PyIceberg's `ExpireSnapshots`, in one commit with
    the ledger update: data files stay (every one still in use is).
    """
    metadata = table.metadata
    history = list(ancestors_of(table.current_snapshot(), metadata))
    bound_ms = None if older_than is None else datetime_to_millis(older_than)
    cut = next((i for i, snapshot in enumerate(history)
                if i >= max(keep, 1) and (bound_ms is None or snapshot.timestamp_ms < bound_ms)), len(history))
    expired_history = history[cut:]
    if bound_ms is None and expired_history:
        bound_ms = expired_history[0].timestamp_ms
    in_history = {snapshot.snapshot_id for snapshot in history}
    protected = {ref.snapshot_id for ref in metadata.refs.values()}
    outside = [s for s in metadata.snapshots
               if s.snapshot_id not in in_history and bound_ms is not None and s.timestamp_ms < bound_ms]
    ids = [s.snapshot_id for s in (*expired_history, *outside) if s.snapshot_id not in protected]
    if not ids:
        return ExpiryReport(0, len(metadata.snapshots), 0)
    moved: dict[str, dict[int, int]] = {}
    for snapshot in expired_history:
        summary = snapshot.summary
        if summary is not None and summary.get(PARTITION_KEY) is not None:
            seq = int(str(summary[SEQ_KEY]))
            moved.setdefault(str(summary[PARTITION_KEY]), {})[seq] = snapshot.sequence_number or 0
    updates, removals = _ledger_updates(dict(metadata.properties), moved)
    transaction = table.transaction()
    if removals:
        transaction.remove_properties(*removals)
    if updates:
        transaction.set_properties(updates)
    ExpireSnapshots(transaction).by_ids(ids).commit()
    transaction.commit_transaction()
    return ExpiryReport(len(ids), len(metadata.snapshots) - len(ids), sum(map(len, moved.values())))


# --- sink --------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SnapshotExpiry:
    """When a sink partition expires its table's old snapshots, and which it keeps.

    After `every_commits` of its own commits, or after its first commit once `every_seconds`
    have passed since its last expiry, it expires the table's snapshots but the newest `keep`
    and those less than `min_age` seconds older than the current one (`expire_snapshots`).
    `min_age` spares the snapshots other writers' appends in flight started from (an append
    whose starting snapshot is gone fails and starts again); `keep` and `min_age` also bound how
    far back time travel reaches.
    """

    every_commits: int = 10
    every_seconds: float = 600.0
    keep: int = 50
    min_age: float = 60.0

    def __post_init__(self) -> None:
        if self.every_commits < 1 or self.every_seconds < 0 or self.keep < 1 or self.min_age < 0:
            msg = f"snapshot expiry needs every_commits >= 1, every_seconds >= 0, keep >= 1, min_age >= 0, got {self}"
            raise ConvoflowError(msg)

    def older_than(self, current: Snapshot) -> datetime | None:
        """The bound for `expire_snapshots` given the current snapshot (None: no age bound)."""
        if not self.min_age:
            return None
        return datetime.fromtimestamp(current.timestamp_ms / 1000 - self.min_age, timezone.utc)


@dataclass
class IcebergState:
    """A partition's Bytewax snapshot: the next batch's seq, rows not yet committed, hashes to skip.

    `rows` is an Arrow table in the table's schema (`record_hash` included), None when empty.
    """

    next_seq: int
    rows: pa.Table | None = None
    skip: dict[int, int] = field(default_factory=dict)


class IcebergSink(KindPartitionedSink[Records, IcebergState]):
    """Routes `(kind, records)` to the kind's table; one partition per kind (see the module doc).

    `expiry=None` never expires snapshots (then expire them with `expire_snapshots`, which keeps
    the bookkeeping, not with another tool's expiry).

    `job_start` (kind → the partition's next seq when the job's first run began: `next_seqs`)
    covers a partition that has no Bytewax snapshot of its own in a resumed run: the run was
    killed before its first snapshot, or the kind's first record came after the last one. Such a
    partition resumes as if from a snapshot taken at the start, so it skips the commits the job
    made before, instead of writing them again.
    """

    output = "Iceberg"

    def __init__(self, catalog: Catalog, *, namespace: str = "convoflow", kinds: Sequence[str] | None = None,
                 writer_id: str = "convoflow", commit_rows: int = 50_000, commit_interval: float = 30.0,
                 expiry: SnapshotExpiry | None = SnapshotExpiry(), job_start: Mapping[str, int] | None = None,
                 clock: Callable[[], float] = time.monotonic, figures_dir: Path | None = None) -> None:
        self.catalog, self.namespace, self.writer_id, self.job_start = catalog, namespace, writer_id, job_start
        self.figures_dir = figures_dir
        super().__init__(kinds if kinds is not None else list(TABLES))
        unknown = set(self.kinds) - set(TABLES)
        if unknown:
            msg = f"no Iceberg table for output kinds {sorted(unknown)}; known kinds: {sorted(TABLES)}"
            raise ConvoflowError(msg)
        if commit_rows < 1 or commit_interval < 0:
            msg = f"commit rows must be >= 1 and the commit interval >= 0 s, got {commit_rows} and {commit_interval}"
            raise ConvoflowError(msg)
        self.commit_rows, self.commit_interval, self.expiry, self.clock = commit_rows, commit_interval, expiry, clock

    def build_part(self, step_id: str, for_part: str, resume_state: IcebergState | None) -> IcebergPartition:
        if resume_state is None and self.job_start is not None and for_part in self.job_start:
            resume_state = IcebergState(self.job_start[for_part], None, {})
        table = ensure_tables(self.catalog, self.namespace, [for_part])[for_part]
        figures = None if self.figures_dir is None else FigureFile(self.figures_dir, f"lake-{for_part}")
        return IcebergPartition(table, TABLES[for_part], f"{self.writer_id}/{for_part}", resume_state,
                                commit_rows=self.commit_rows, commit_interval=self.commit_interval,
                                expiry=self.expiry, clock=self.clock, figures=figures)


def _same_but_nulls(a: pl.Schema, b: pl.Schema) -> bool:
    """Whether frames of these schemas concatenate (`vertical_relaxed`) into the same records: the
    same columns of the same types, except columns all null in one of them (type `Null`)."""
    return a.names() == b.names() and all(x == y or pl.Null in (x, y) for x, y in zip(a.dtypes(), b.dtypes()))


class IcebergPartition(StatefulSinkPartition[Records, IcebergState]):
    """Buffers one kind's rows and appends them to its table in batches, skipping what is committed."""

    def __init__(self, table: Table, spec: TableSpec, name: str, resume: IcebergState | None, *,
                 commit_rows: int, commit_interval: float, clock: Callable[[], float],
                 expiry: SnapshotExpiry | None = None, figures: FigureFile | None = None) -> None:
        self.table, self.spec, self.name = table, spec, name
        self.figures = figures
        self.committed = (0, 0)
        """This run's commits and their rows, for the metrics endpoint (`figures`)."""
        self.commit_rows, self.commit_interval, self.expiry, self.clock = commit_rows, commit_interval, expiry, clock
        self.to_rows = ArrowRows(spec.name, table.schema())
        self.pending: list[pa.Table] = []
        self.pending_rows = 0
        self.gathered: list[pl.DataFrame] = []
        self.gathered_rows = 0
        self.oldest: float | None = None
        self.commits_since_expiry, self.last_expiry = 0, clock()
        self._appender = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"iceberg-{name}")
        self._in_flight: Future[None] | None = None
        self.skip: Counter[int] = Counter(resume.skip if resume is not None else {})
        if resume is None:
            self.next_seq = next_commit_seq(table, name)
        else:
            commits = committed_batches(table, name, resume.next_seq)
            self._check_known(resume.next_seq, commits)
            self.next_seq = commits[0][0] + 1 if commits else resume.next_seq
            self.skip.update(added_hashes(table, (commit for _, commit in commits)))
            if resume.rows is not None:
                self._add(self.to_rows.conform(resume.rows))

    def write_batch(self, values: list[Records]) -> None:
        for records in values:
            if isinstance(records, pl.DataFrame):
                self._gather(records)
            elif records:
                self._add(self.to_rows(records))
        if self.pending_rows + self.gathered_rows >= self.commit_rows or self._due():
            self.commit()

    def snapshot(self) -> IcebergState:
        if self._due():
            self.commit()
        self._convert()
        self.wait()
        rows = pa.concat_tables(self.pending) if self.pending else None
        return IcebergState(self.next_seq, rows, dict(self.skip))

    def close(self) -> None:
        self.commit()
        self.wait()
        self._appender.shutdown()

    def commit(self) -> None:
        """Start appending the buffered rows, sorted, as one snapshot carrying this partition's marker.

        The append runs on the partition's appender thread while batches keep arriving (Parquet
        writing and Arrow work release the GIL); one at a time, in seq order. `snapshot()` and
        `close()` wait for it, so no Bytewax snapshot claims a commit that has not landed.
        """
        self._convert()
        if not self.pending_rows:
            return
        rows = pa.concat_tables(self.pending).combine_chunks()
        rows = rows.take(self.spec.sort_indices(rows))
        self.wait()
        self._in_flight = self._appender.submit(self._append, rows, self.next_seq)
        self.next_seq += 1
        self.pending, self.pending_rows, self.oldest = [], 0, None

    def wait(self) -> None:
        """Block until the append in flight, if any, has landed; raise its error if it failed."""
        if self._in_flight is not None:
            self._in_flight.result()

    def _append(self, rows: pa.Table, seq: int) -> None:
        marker = {PARTITION_KEY: self.name, SEQ_KEY: str(seq), ROWS_KEY: str(rows.num_rows)}
        for attempt in itertools.count(1):
            try:
                self.table.append(rows, snapshot_properties=marker)
                self._landed(seq, rows.num_rows)
                break
            except (CommitFailedException, ValidationException):
                # Did not land. Besides losing races more often than PyIceberg retries, the append
                # fails when another writer expired the snapshot it started from: start again.
                if attempt == COMMIT_ATTEMPTS:
                    raise
                self.table.refresh()
            except Exception:
                self.table.refresh()
                if not committed_batches(self.table, self.name, seq):
                    raise
                self._landed(seq, rows.num_rows)
                break
        self._expire_if_due()

    def _landed(self, seq: int, rows: int) -> None:
        """A commit landed: log it and count it."""
        log_event("lake commit", __name__, table=self.spec.name, partition=self.name, seq=seq, rows=rows)
        self.committed = (self.committed[0] + 1, self.committed[1] + rows)
        if self.figures is not None:
            self.figures.write({"table": self.spec.name, "commits": self.committed[0], "rows": self.committed[1]})

    def _gather(self, frame: pl.DataFrame) -> None:
        """Keep a frame to convert with the next ones of its schema: Polars costs per call, not per row."""
        if not len(frame):
            return
        if self.gathered and not _same_but_nulls(self.gathered[0].schema, frame.schema):
            self._convert()
        self.gathered.append(frame)
        self.gathered_rows += len(frame)
        if self.oldest is None:
            self.oldest = self.clock()
        if self.gathered_rows >= CONVERT_ROWS:
            self._convert()

    def _convert(self) -> None:
        if self.gathered:
            frames, self.gathered, self.gathered_rows = self.gathered, [], 0
            self._add(self.to_rows(pl.concat(frames, how="vertical_relaxed")))

    def _add(self, rows: pa.Table) -> None:
        if self.skip:
            rows = self._unskipped(rows)
        if rows.num_rows:
            self.pending.append(rows)
            self.pending_rows += rows.num_rows
            if self.oldest is None:
                self.oldest = self.clock()

    def _unskipped(self, rows: pa.Table) -> pa.Table:
        """`rows` without those whose hash is still to skip, counting them off."""
        skip, keep = self.skip, []
        for digest in rows.column("record_hash").to_pylist():
            if skip.get(digest, 0) > 0:
                skip[digest] -= 1
                if not skip[digest]:
                    del skip[digest]
                keep.append(False)
            else:
                keep.append(True)
        return rows if all(keep) else rows.filter(pa.array(keep))

    def _due(self) -> bool:
        return self.oldest is not None and self.clock() - self.oldest >= self.commit_interval

    def _expire_if_due(self) -> None:
        if self.expiry is None:
            return
        self.commits_since_expiry += 1
        now = self.clock()
        if self.commits_since_expiry < self.expiry.every_commits and now - self.last_expiry < self.expiry.every_seconds:
            return
        self.commits_since_expiry, self.last_expiry = 0, now
        current = self.table.current_snapshot()
        if current is None or len(self.table.metadata.snapshots) <= self.expiry.keep:
            return
        try:
            expire_snapshots(self.table, keep=self.expiry.keep, older_than=self.expiry.older_than(current))
        except Exception as error:  # maintenance: the rows are committed; try again after the next commits
            log.warning("%s: snapshot expiry of %s failed, tried again later: %s", self.name, self.spec.name, error)
            self.table.refresh()

    def _check_known(self, from_seq: int, commits: list[tuple[int, Commit]]) -> None:
        """Refuse to resume when markers of commits made after the resumed snapshot are gone."""
        seqs = [seq for seq, _ in commits]
        unbroken = seqs == list(range(from_seq + len(seqs) - 1, from_seq - 1, -1))
        if unbroken and (seqs or from_seq == 0 or next(own_commits(self.table, self.name), None) is not None):
            return
        known = f"seqs {seqs[-1]}..{seqs[0]}" if seqs else "none"
        msg = (f"{self.spec.name}: resuming {self.name} from its batch {from_seq} needs the markers of every commit "
               f"since, but the table's history and ledger hold {known} of them (expired by another tool, or beyond "
               f"the ledger's {LEDGER_LIMIT} commits, or the table was recreated); resuming would write rows twice")
        raise ConvoflowError(msg)
