"""A small inspector and maintenance kit for the flow's Iceberg tables, behind `cli.py lake ...`.

Plain functions over PyIceberg tables that return data for the CLI to print: what tables there
are, their snapshots (with convoflow's commit markers), rows as of a time or snapshot (time
travel), snapshot expiry that keeps the sinks' exactly-once bookkeeping, adding a column, and a
rewrite that stands in for compaction (PyIceberg 0.12 has none; see `compact` for its cost).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import NoSuchNamespaceError, NoSuchTableError, ValidationException
from pyiceberg.expressions import AlwaysTrue, BooleanExpression
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot, ancestors_of
from pyiceberg.table.sorting import NullOrder, SortDirection
from pyiceberg.types import NestedField, PrimitiveType
from pyiceberg.utils.datetime import datetime_to_millis
from pydantic import ValidationError

from connectors.lake.commits import ExpiryReport, expire_snapshots, ledger
from connectors.lake.tables import TABLES
from dataflows.errors import ConvoflowError

AsOf = datetime | int
"""A point in a table's history: a time (aware datetime) or a snapshot id."""
COMPACTION_KEY = "convoflow.compaction"


@dataclass(frozen=True)
class TableInfo:
    """One table as its current snapshot summarises it."""

    name: str
    rows: int
    snapshots: int
    data_files: int
    total_bytes: int


@dataclass(frozen=True)
class SnapshotInfo:
    """One snapshot: when, what operation, its summary (convoflow's markers included), whether it is current."""

    snapshot_id: int
    parent_id: int | None
    time: datetime
    operation: str
    summary: dict[str, str]
    current: bool


@dataclass(frozen=True)
class CompactReport:
    """What `compact` did, and `cost`: what that means for readers, writers and the sinks."""

    table: str
    rows: int
    files_before: int
    files_after: int
    snapshots: tuple[SnapshotInfo, ...]
    cost: str


# --- reading -----------------------------------------------------------------------------------

def load_table(catalog: Catalog, name: str, namespace: str = "convoflow") -> Table:
    """The table `name` (a table name such as `chat_messages`, or an output kind such as `messages`)."""
    table_name = TABLES[name].name if name in TABLES else name
    try:
        return catalog.load_table((namespace, table_name))
    except NoSuchTableError:
        known = ", ".join(info.name for info in list_tables(catalog, namespace)) or "none"
        msg = f"no table {table_name!r} in namespace {namespace!r} of catalog {catalog.name!r} (tables: {known})"
        raise ConvoflowError(msg) from None


def list_tables(catalog: Catalog, namespace: str = "convoflow") -> list[TableInfo]:
    """Every table of `namespace` with its row, snapshot and data-file counts and total file size."""
    try:
        identifiers = sorted(catalog.list_tables(namespace))
    except NoSuchNamespaceError:
        msg = f"no namespace {namespace!r} in catalog {catalog.name!r}: a run with --lake creates it"
        raise ConvoflowError(msg) from None
    infos = []
    for identifier in identifiers:
        table = catalog.load_table(identifier)
        current = table.current_snapshot()
        infos.append(TableInfo(identifier[-1], _total(current, "total-records"), len(table.metadata.snapshots),
                               _total(current, "total-data-files"), _total(current, "total-files-size")))
    return infos


def list_snapshots(table: Table) -> list[SnapshotInfo]:
    """The table's snapshots, oldest first (those still kept: expired ones are gone from its metadata)."""
    current = table.current_snapshot()
    return [_info(snapshot, current) for snapshot in sorted(table.snapshots(), key=lambda s: s.timestamp_ms)]


def expired_markers(table: Table) -> dict[str, dict[int, int]]:
    """The commit markers of expired snapshots that the sinks keep: partition → {seq: data sequence number}."""
    return ledger(table)


def parse_as_of(text: str) -> AsOf:
    """A snapshot id (digits) or an ISO-8601 time with an offset (`2024-03-04T10:00:00+00:00`, `...Z`)."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        msg = f"--as-of {text!r}: give a snapshot id or an ISO-8601 time with an offset, e.g. 2024-03-04T10:00:00Z"
        raise ConvoflowError(msg)
    return moment


def snapshot_at(table: Table, as_of: AsOf | None) -> Snapshot | None:
    """The snapshot to read for `as_of`: the current one (None), the given id, or the one current at that time.

    None when the table had no snapshot then (nothing was written yet). An unknown snapshot id, or
    a time before the oldest kept snapshot of a history whose start was expired, is an error.
    """
    if as_of is None:
        return table.current_snapshot()
    if isinstance(as_of, int):
        snapshot = table.snapshot_by_id(as_of)
        if snapshot is None:
            msg = f"{_name(table)} has no snapshot {as_of} (expired, or of another table): see `lake snapshots`"
            raise ConvoflowError(msg)
        return snapshot
    snapshot = table.snapshot_as_of_timestamp(datetime_to_millis(as_of))
    if snapshot is None:
        history = list(ancestors_of(table.current_snapshot(), table.metadata))
        if history and (history[-1].sequence_number or 0) > 1:
            msg = (f"{_name(table)}: its history before {_time(history[-1].timestamp_ms).isoformat()} is "
                   f"expired, so it cannot be read as of {as_of.isoformat()}")
            raise ConvoflowError(msg)
    return snapshot


def show(table: Table, as_of: AsOf | None = None, limit: int | None = 20,
         row_filter: str | BooleanExpression = AlwaysTrue()) -> list[dict[str, Any]]:
    """Up to `limit` rows of the table as it is, or was at `as_of` (time travel), as dicts."""
    if as_of is None:  # the current schema: a snapshot's own may predate columns added since
        return table.scan(row_filter=row_filter, limit=limit).to_arrow().to_pylist()
    snapshot = snapshot_at(table, as_of)
    if snapshot is None:
        return []
    return table.scan(row_filter=row_filter, snapshot_id=snapshot.snapshot_id, limit=limit).to_arrow().to_pylist()


# --- maintenance -------------------------------------------------------------------------------

def parse_older_than(text: str, now: datetime) -> datetime:
    """An ISO-8601 time with an offset, or an age before `now`: `90s`, `30m`, `12h`, `7d`."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", text)
    if match:
        unit = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days"}[match.group(2)]
        return now - timedelta(**{unit: float(match.group(1))})
    try:
        moment = parse_as_of(text)
    except ConvoflowError:
        moment = None
    if not isinstance(moment, datetime):
        msg = f"--older-than {text!r}: give an age (90s, 30m, 12h, 7d) or an ISO-8601 time with an offset"
        raise ConvoflowError(msg)
    return moment


def expire(table: Table, older_than: datetime, *, keep: int = 1) -> ExpiryReport:
    """Expire the snapshots older than `older_than` (never the newest `keep`), keeping the sinks' markers.

    PyIceberg's snapshot expiry, metadata only: time travel to before the oldest kept snapshot
    stops working; no data file is deleted (files only old snapshots used stay until another
    tool removes orphan files).
    """
    return expire_snapshots(table, older_than=older_than, keep=keep)


def evolve(table: Table, column: str, type_name: str, doc: str | None = None) -> NestedField:
    """Add the optional column `column` (`a.b` inside the struct `a`) of type `type_name` to the table.

    Iceberg schema evolution: metadata only; rows written before read back with null there.
    `type_name` is an Iceberg primitive: boolean, int, long, float, double, decimal(P,S), date,
    time, timestamp, timestamptz, string, uuid, fixed[N], binary.
    """
    try:
        field_type = PrimitiveType.model_validate(type_name.strip())
    except ValidationError:
        msg = (f"unknown column type {type_name!r}: use an Iceberg primitive type (boolean, int, long, float, double, "
               f"decimal(P,S), date, time, timestamp, timestamptz, string, uuid, fixed[N], binary)")
        raise ConvoflowError(msg) from None
    path = tuple(column.split("."))
    if _has(table, column):
        msg = f"{_name(table)} already has a column {column!r}"
        raise ConvoflowError(msg)
    try:
        with table.update_schema() as update:
            update.add_column(path, field_type, doc=doc)
    except ValueError as error:
        msg = f"cannot add column {column!r} to {_name(table)}: {error}"
        raise ConvoflowError(msg) from None
    return table.schema().find_field(column)


def compact(table: Table, where: str | BooleanExpression = AlwaysTrue()) -> CompactReport:
    """Rewrite the table's rows (those matching `where`, e.g. one day) into as few files as the writer makes.

    Not compaction: PyIceberg 0.12 has none, so this reads the rows and writes them back with
    `overwrite`, sorted by the table's sort order. Its cost, stated in the report: a delete (or
    overwrite) snapshot followed by an append snapshot, so incremental readers (streaming reads,
    `incremental_append_scan`) see every rewritten row as new; it fails, writing nothing, when
    another writer commits while it runs (run it while no flow writes the table); sinks resuming
    from a Bytewax snapshot older than the rewrite may write rows again; the old files stay on
    disk until snapshots are expired and orphan files removed by another tool.
    """
    before = table.current_snapshot()
    files_before = _total(before, "total-data-files")
    if before is None:
        return CompactReport(_name(table), 0, 0, 0, (), "nothing to rewrite: the table has no data")
    rows = table.scan(row_filter=where).to_arrow()  # `before`, in the current schema (a snapshot's may be older)
    if rows.num_rows == 0:
        return CompactReport(_name(table), 0, files_before, files_before, (), "nothing to rewrite: no row matches")
    rows = _sorted(table, rows)
    try:
        table.overwrite(rows, overwrite_filter=where, snapshot_properties={COMPACTION_KEY: "rewrite"})
    except ValidationException as error:
        msg = (f"{_name(table)}: another writer committed while the rewrite ran, so nothing was changed ({error}); "
               f"run it again while no flow writes the table")
        raise ConvoflowError(msg) from None
    after = table.current_snapshot()
    made = [s for s in ancestors_of(after, table.metadata) if s.timestamp_ms >= before.timestamp_ms
            and s.snapshot_id != before.snapshot_id]
    infos = tuple(_info(s, after) for s in reversed(made))
    files_after = _total(after, "total-data-files")
    operations = " + ".join(info.operation for info in infos)
    cost = (f"rewrote {rows.num_rows} rows by overwrite (PyIceberg 0.12 has no data-file compaction): data files "
            f"{files_before} -> {files_after}. Cost: it added {len(infos)} snapshots ({operations}), so incremental "
            f"readers (streaming reads, incremental_append_scan) see these {rows.num_rows} rows again as new rows; it "
            f"conflicts with concurrent writers (an append landing while it runs makes it fail; run it while no flow "
            f"writes the table); a convoflow sink resuming from a Bytewax snapshot taken before now may write again rows "
            f"whose commits were expired; the replaced files stay on disk until snapshots are expired and orphan files "
            f"removed by another tool.")
    return CompactReport(_name(table), rows.num_rows, files_before, files_after, infos, cost)


# --- helpers -----------------------------------------------------------------------------------

def _name(table: Table) -> str:
    return ".".join(table.name())


def _time(millis: int) -> datetime:
    return datetime.fromtimestamp(millis / 1000, timezone.utc)


def _has(table: Table, column: str) -> bool:
    try:
        table.schema().find_field(column, case_sensitive=False)
    except ValueError:
        return False
    return True


def _info(snapshot: Snapshot, current: Snapshot | None) -> SnapshotInfo:
    summary = snapshot.summary
    operation = summary.operation.value if summary is not None else "unknown"
    details = {str(k): str(v) for k, v in summary.additional_properties.items()} if summary is not None else {}
    return SnapshotInfo(snapshot.snapshot_id, snapshot.parent_snapshot_id, _time(snapshot.timestamp_ms),
                        operation, details, current is not None and snapshot.snapshot_id == current.snapshot_id)


def _total(snapshot: Snapshot | None, key: str) -> int:
    """A `total-*` count of a snapshot's summary (0 without one)."""
    if snapshot is None or snapshot.summary is None:
        return 0
    return int(snapshot.summary.get(key) or 0)


def _sorted(table: Table, rows: pa.Table) -> pa.Table:
    """`rows` in the table's sort order (identity fields; others are left to the order rows came in)."""
    schema, keys, columns = table.schema(), [], {}
    for n, sort_field in enumerate(table.sort_order().fields):
        name = schema.find_column_name(sort_field.source_id)
        if name is None or str(sort_field.transform) != "identity":
            continue
        head, *rest = name.split(".")
        column: Any = rows.column(head)
        for part in rest:
            column = pc.struct_field(column, part)
        columns[f"k{n}"] = column
        keys.append((f"k{n}", "ascending" if sort_field.direction == SortDirection.ASC else "descending",
                     "at_start" if sort_field.null_order == NullOrder.NULLS_FIRST else "at_end"))
    if not keys:
        return rows
    return rows.take(pc.sort_indices(pa.table(columns), sort_keys=keys))
