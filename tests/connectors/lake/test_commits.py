"""Snapshot expiry and the commit ledger: markers kept, resumes exact, concurrent expiries safe."""

from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.table.snapshots import ancestors_of

from connectors.lake.commits import committed_batches, expire_snapshots, ledger
from connectors.lake.sink import SnapshotExpiry
from connectors.lake.tables import ensure_tables, open_catalog
from dataflows.errors import ConvoflowError
from dataflows.events import Event
from tests.conftest import FakeClock
from tests.connectors.lake.conftest import event_ids, messages, part, snapshot_count, table_of

pytestmark = pytest.mark.lake


def test_expiry_keeps_the_newest_snapshots_and_moves_the_markers_to_the_ledger(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    partition = part(catalog, commit_rows=2, expiry=SnapshotExpiry(every_commits=3, keep=2, min_age=0))
    for n in range(1, 21, 2):
        partition.write_batch([messages(n, 2, make_event)])
    partition.wait()
    table = table_of(catalog, "messages")
    assert len(table.metadata.snapshots) <= 2 + 2
    history = list(ancestors_of(table.current_snapshot(), table.metadata))
    assert len(history) == len(table.metadata.snapshots)  # what stays is one unbroken history
    expired = ledger(table)["convoflow/messages"]
    assert sorted(expired) == list(range(10 - len(history)))
    assert [seq for seq, _ in committed_batches(table, "convoflow/messages")] == list(range(9, -1, -1))
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 21))


def test_a_resume_from_an_old_snapshot_after_many_expiries_writes_each_row_once(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    expiry = SnapshotExpiry(every_commits=2, keep=1, min_age=0)
    first = part(catalog, commit_rows=3, expiry=expiry)
    first.write_batch([messages(1, 2, make_event)])
    old_state = first.snapshot()  # the last Bytewax snapshot that made it to the recovery store
    for n in range(3, 41, 2):  # then many commits, most of them expired
        first.write_batch([messages(n, 2, make_event)])
    first.wait()
    table = table_of(catalog, "messages")
    assert len(table.metadata.snapshots) <= 2 and len(ledger(table)["convoflow/messages"]) >= 8
    resumed = part(catalog, old_state, commit_rows=3, expiry=expiry)
    for n in range(3, 51, 4):  # the replay, batched differently, and new rows after it
        resumed.write_batch([messages(n, 4, make_event)])
    resumed.close()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 51))


def test_lake_expire_keeps_the_bookkeeping_too(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    first = part(catalog, commit_rows=2, expiry=None)
    state = first.snapshot()
    for n in range(1, 13, 2):
        first.write_batch([messages(n, 2, make_event)])
    first.wait()
    report = expire_snapshots(table_of(catalog, "messages"), older_than=datetime.now(timezone.utc) + timedelta(hours=1))
    assert (report.expired, report.kept, report.markers) == (5, 1, 5)
    resumed = part(catalog, state, commit_rows=2, expiry=None)
    resumed.write_batch([messages(1, 14, make_event)])
    resumed.close()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 15))


def test_markers_expired_by_another_tool_stop_a_resume_instead_of_duplicating(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    first = part(catalog, commit_rows=2, expiry=None)
    first.write_batch([messages(1, 2, make_event)])
    state = first.snapshot()
    for n in range(3, 9, 2):
        first.write_batch([messages(n, 2, make_event)])
    first.wait()
    table = table_of(catalog, "messages")
    table.maintenance.expire_snapshots().older_than(datetime.now(timezone.utc) + timedelta(hours=1)).commit()
    with pytest.raises(ConvoflowError, match=r"chat_messages: resuming convoflow/messages from its batch 1 needs"):
        part(catalog, state, commit_rows=2)


def test_the_ledger_keeps_a_partitions_newest_commits_and_a_resume_beyond_them_is_refused(
    catalog: Catalog, make_event: Callable[..., Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("connectors.lake.commits.LEDGER_LIMIT", 3)
    first = part(catalog, commit_rows=1, expiry=SnapshotExpiry(every_commits=1, keep=1, min_age=0))
    state = first.snapshot()
    first.write_batch([messages(1, 1, make_event)])
    recent = first.snapshot()
    for n in range(2, 8):
        first.write_batch([messages(n, 1, make_event)])
    first.wait()
    assert sorted(ledger(table_of(catalog, "messages"))["convoflow/messages"]) == [3, 4, 5]
    with pytest.raises(ConvoflowError, match="from its batch 0 needs the markers"):
        part(catalog, state, commit_rows=1)
    with pytest.raises(ConvoflowError, match="from its batch 1 needs the markers"):
        part(catalog, recent, commit_rows=1)  # seqs 1 and 2 fell out of the ledger


def test_writers_expiring_each_others_snapshots_lose_no_commit_and_no_marker(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    ensure_tables(catalog, kinds=["messages"])
    lake_dir = Path(catalog.properties["warehouse"].removeprefix("file://"))
    expiry = SnapshotExpiry(every_commits=1, keep=1, min_age=0)
    w1, w2 = (part(open_catalog(lake_dir=lake_dir), writer=writer, commit_rows=1, expiry=expiry) for writer in ("w1", "w2"))
    for n in range(8):
        w1.write_batch([messages(n, 1, make_event)])  # commits, then expires every other snapshot, w2's current one too
        w2.write_batch([messages(100 + n, 1, make_event)])  # so w2's append starts from a snapshot that is gone
        w1.wait()
        w2.wait()
    table = table_of(catalog, "messages")
    assert len(table.metadata.snapshots) == 1
    for writer in ("w1", "w2"):
        assert [seq for seq, _ in committed_batches(table, f"{writer}/messages")] == list(range(7, -1, -1)), writer
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for f in (0, 100) for n in range(f, f + 8))


def test_an_expiry_on_stale_metadata_changes_nothing_and_ledger_keys_merge(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    partition = part(catalog, commit_rows=1, expiry=None)
    for n in range(6):
        partition.write_batch([messages(n, 1, make_event)])
    partition.wait()
    first, stale = table_of(catalog, "messages"), table_of(catalog, "messages")
    expire_snapshots(first, keep=4)
    with pytest.raises(ValueError, match="does not exist"):  # SQL catalog: it names snapshots already expired
        expire_snapshots(stale, keep=2)
    table = table_of(catalog, "messages")
    assert sorted(ledger(table)["convoflow/messages"]) == [0, 1]
    # A catalog that ignores missing snapshot ids would let both land: each adds its own key.
    with table.transaction() as transaction:
        transaction.set_properties({"convoflow.ledger.convoflow/messages#0-3": "0:1,1:2,2:3,3:4"})
    assert sorted(ledger(table)["convoflow/messages"]) == [0, 1, 2, 3]
    expire_snapshots(table, keep=1)
    keys = [key for key in table.refresh().properties if key.startswith("convoflow.ledger.")]
    assert keys == ["convoflow.ledger.convoflow/messages#0-4"]
    assert [seq for seq, _ in committed_batches(table, "convoflow/messages")] == list(range(5, -1, -1))


def test_a_failed_expiry_is_logged_and_the_sink_goes_on(
    catalog: Catalog, make_event: Callable[..., Event], monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def fail(*args: Any, **kwargs: Any) -> None:
        raise CommitFailedException("someone else expired first")

    monkeypatch.setattr("connectors.lake.sink.expire_snapshots", fail)
    partition = part(catalog, commit_rows=1, expiry=SnapshotExpiry(every_commits=1, keep=1, min_age=0))
    partition.write_batch([messages(1, 1, make_event)])
    partition.write_batch([messages(2, 1, make_event)])
    partition.wait()
    assert "snapshot expiry of chat_messages failed" in caplog.text
    assert event_ids(catalog) == Counter(["chat.jsonl:1", "chat.jsonl:2"])


def test_expiry_is_also_due_after_every_seconds(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    clock = FakeClock()
    expiry = SnapshotExpiry(every_commits=100, every_seconds=60, keep=1, min_age=0)
    partition = part(catalog, commit_rows=1, clock=clock, expiry=expiry)
    for n in range(1, 4):
        partition.write_batch([messages(n, 1, make_event)])
    partition.wait()
    assert snapshot_count(catalog) == 3
    clock.now = 60.0
    partition.write_batch([messages(4, 1, make_event)])
    partition.wait()
    assert snapshot_count(catalog) == 1


# --- rows --------------------------------------------------------------------------------------
