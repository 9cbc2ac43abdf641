"""The Iceberg sink's exactly-once bookkeeping: the markers its commits carry, the ledger that
keeps them when snapshots expire, and the expiry itself (`connectors.lake.sink` states the
guarantee they make).

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
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime

from pyiceberg.expressions import AlwaysTrue
from pyiceberg.io.pyarrow import ArrowScan
from pyiceberg.manifest import DataFile, ManifestContent, ManifestEntryStatus
from pyiceberg.table import FileScanTask, Table
from pyiceberg.table.snapshots import Snapshot, ancestors_of
from pyiceberg.table.update.snapshot import ExpireSnapshots
from pyiceberg.utils.datetime import datetime_to_millis


PARTITION_KEY = "convoflow.partition"
SEQ_KEY = "convoflow.batch-seq"
ROWS_KEY = "convoflow.batch-rows"
LEDGER_PREFIX = "convoflow.ledger."
LEDGER_LIMIT = 2000
"""How many of a partition's expired commits the ledger remembers (its newest)."""


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
