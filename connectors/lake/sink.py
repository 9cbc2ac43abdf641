"""Iceberg outputs: each output kind is one Iceberg table, written by one sink partition.

A sink partition turns each incoming batch of dicts into Arrow columns at once, and frames
(`Records`) once it has gathered `CONVERT_ROWS` rows of one schema, or before a commit or a
snapshot (`connectors.lake.rows`; records are checked against the table's schema there: an
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

Old snapshots are expired on a schedule (`SnapshotExpiry`; the ledger that keeps their markers:
`connectors.lake.commits`).

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
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import polars as pl
import pyarrow as pa
from bytewax.outputs import StatefulSinkPartition
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException, ValidationException
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Snapshot

from connectors.view.progress import FigureFile
from connectors.run.log import log_event
from connectors.by_kind import KindPartitionedSink
from dataflows.errors import ConvoflowError
from connectors.lake.rows import ArrowRows
from dataflows.records import Records
from connectors.lake.commits import (
    LEDGER_LIMIT, PARTITION_KEY, ROWS_KEY, SEQ_KEY, Commit, added_hashes, committed_batches, expire_snapshots,
    next_commit_seq, own_commits,
)
from connectors.lake.tables import TABLES, TableSpec, ensure_tables

CONVERT_ROWS = 20_000
"""Rows of frames a partition gathers before it converts them in one go (and checks them)."""
COMMIT_ATTEMPTS = 3
"""Appends a partition tries (each with PyIceberg's own retries) before it gives up."""

log = logging.getLogger(__name__)


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
