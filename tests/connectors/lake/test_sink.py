"""The exactly-once Iceberg sink: commits, resumes, concurrency, the appender thread."""

import sys
import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import polars as pl
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException

from connectors.lake.commits import PARTITION_KEY, ROWS_KEY, SEQ_KEY, committed_batches, next_seqs
from connectors.lake.sink import IcebergSink
from connectors.lake.tables import TABLES, ensure_tables, open_catalog
from connectors.lake.rows import record_hash, row_converter
from dataflows.errors import ConvoflowError
from dataflows.events import Event
from tests.conftest import FakeClock
from tests.progress import wait_until
from tests.connectors.lake.conftest import event_ids, messages, part, snapshot_count, table_of

pytestmark = pytest.mark.lake


def test_commits_every_commit_rows_not_per_message_and_at_close(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    partition = part(catalog, commit_rows=5)
    for n in range(12):
        partition.write_batch([messages(n, 1, make_event)])
    partition.wait()  # appends run on the partition's appender thread
    assert snapshot_count(catalog) == 2
    partition.close()
    partition.close()
    assert snapshot_count(catalog) == 3
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(12))


def test_commits_once_the_oldest_buffered_row_is_commit_interval_old(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    clock = FakeClock()
    partition = part(catalog, clock=clock)
    partition.write_batch([messages(1, 2, make_event)])
    clock.now = 29.9
    partition.write_batch([messages(3, 2, make_event)])
    partition.snapshot()
    assert snapshot_count(catalog) == 0
    clock.now = 30.0
    partition.write_batch([messages(5, 1, make_event)])
    partition.wait()
    assert snapshot_count(catalog) == 1
    clock.now = 31.0
    partition.write_batch([messages(6, 1, make_event)])
    clock.now = 61.0
    state = partition.snapshot()
    assert snapshot_count(catalog) == 2 and state.rows is None and state.next_seq == 2


def test_each_commit_names_its_partition_and_sequence(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    partition = part(catalog, commit_rows=2)
    partition.write_batch([messages(1, 5, make_event)])
    partition.close()
    table = table_of(catalog, "messages")
    summaries = [s.summary.additional_properties for s in table.snapshots() if s.summary is not None]
    assert [(s[PARTITION_KEY], s[SEQ_KEY], s[ROWS_KEY]) for s in summaries] == [("convoflow/messages", "0", "5")]
    again = part(catalog, commit_rows=2)
    again.write_batch([messages(6, 1, make_event)])
    again.write_batch([messages(7, 1, make_event)])
    again.wait()
    assert [seq for seq, _ in committed_batches(table.refresh(), "convoflow/messages")] == [1, 0]


def test_crash_before_the_commit_resumes_from_the_snapshot(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    first = part(catalog)
    first.write_batch([messages(1, 3, make_event)])
    state = first.snapshot()
    first.write_batch([messages(4, 2, make_event)])  # then the process dies: nothing committed
    resumed = part(catalog, state)
    resumed.write_batch([messages(4, 2, make_event), messages(6, 2, make_event)])
    resumed.close()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 8))
    assert snapshot_count(catalog) == 1


def test_crash_after_the_commit_skips_what_was_committed_whatever_the_replay_order(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    first = part(catalog, commit_rows=5)
    first.write_batch([messages(1, 3, make_event)])
    state = first.snapshot()
    first.write_batch([messages(4, 3, make_event)])  # commits rows 1-6 as batch 0, then dies holding row 7...
    first.wait()
    assert snapshot_count(catalog) == 1
    resumed = part(catalog, state, commit_rows=5)
    crashed_again = resumed.snapshot()  # ...and dies again before the replay arrives
    assert crashed_again.rows is None and sum(crashed_again.skip.values()) == 3  # rows 1-3 were in its buffer
    resumed = part(catalog, crashed_again, commit_rows=5)
    replay = messages(4, 5, make_event)  # rows 4-8, another worker interleaving
    resumed.write_batch([replay[::-1][:2]])
    resumed.write_batch([replay[::-1][2:]])
    resumed.close()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 9))
    assert [seq for seq, _ in committed_batches(table_of(catalog, "messages"), "convoflow/messages")] == [1, 0]


def test_frames_are_gathered_snapshotted_and_skipped_on_resume_as_their_records(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    records = messages(1, 8, make_event)
    for record in records[4:6]:
        record["username"] = "alice"  # a column of text in one frame, all null (type Null) in the others

    def frame(first: int, last: int) -> pl.DataFrame:
        return pl.from_dicts(records[first - 1:last], infer_schema_length=None)

    first = part(catalog, commit_rows=5)
    first.write_batch([frame(1, 2)])
    state = first.snapshot()
    assert state.rows is not None and state.rows.num_rows == 2, "rows gathered, not yet converted, are in the snapshot"
    first.write_batch([frame(3, 4), frame(5, 6)])  # rows 1-6 committed as batch 0, then the process dies
    first.wait()
    assert snapshot_count(catalog) == 1
    resumed = part(catalog, state, commit_rows=5)
    resumed.write_batch([frame(3, 6), frame(7, 8)])
    resumed.close()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 9))
    written = table_of(catalog, "messages").scan().to_arrow()
    expected = pa.Table.from_pylist([row_converter("chat_messages", TABLES["messages"].schema)(r) for r in records],
                                    schema=written.schema)
    assert Counter(map(repr, written.to_pylist())) == Counter(map(repr, expected.to_pylist()))


def test_a_gathered_frame_that_does_not_fit_is_an_error_by_the_next_snapshot(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    partition = part(catalog)
    partition.write_batch([pl.from_dicts(messages(1, 2, make_event)).with_columns(pl.lit("sad").alias("mood"))])
    with pytest.raises(ConvoflowError, match=r"chat_messages: fields \['mood'\] are not in the table's schema"):
        partition.snapshot()


def test_a_replayed_record_with_other_enrichment_is_the_same_record(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    """What stages add (history, LLM answers) may differ after a crash; the record was written already."""
    first = part(catalog, commit_rows=2)
    state = first.snapshot()
    first.write_batch([[{**record, "user_context": None, "translated": "hola"} for record in messages(1, 2, make_event)]])
    first.wait()
    replay = [{**record, "user_context": {"total_messages": 2}, "translated": None, "translation": {"status": "error"}}
              for record in messages(1, 3, make_event)]
    assert record_hash(replay[0]) == record_hash(messages(1, 1, make_event)[0])
    assert record_hash(replay[0]) != record_hash(replay[1]), "the flow's own fields are the identity"
    resumed = part(catalog, state, commit_rows=2)
    resumed.write_batch([replay])
    resumed.close()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 4))
    rows = {row["event_id"]: row["translated"] for row in table_of(catalog, "messages").scan().to_arrow().to_pylist()}
    assert rows == {"chat.jsonl:1": "hola", "chat.jsonl:2": "hola", "chat.jsonl:3": None}, "the first write stays"


def test_a_partition_without_a_snapshot_in_a_resumed_job_skips_the_jobs_commits(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    """Killed before its first Bytewax snapshot, the resumed partition starts from the job's start."""
    before = part(catalog)
    before.write_batch([messages(1, 1, make_event)])  # another job, earlier
    before.close()
    start = next_seqs(ensure_tables(catalog))
    assert start["messages"] == 1 and start["windows"] == 0
    first = IcebergSink(catalog, expiry=None, commit_rows=2, job_start=start).build_part("lake", "messages", None)
    first.write_batch([messages(2, 3, make_event)])  # commits rows 2-4, then dies with no snapshot
    first.wait()
    resumed = IcebergSink(catalog, expiry=None, job_start=start).build_part("lake", "messages", None)
    resumed.write_batch([messages(2, 4, make_event)])
    resumed.close()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 6))
    assert [seq for seq, _ in committed_batches(table_of(catalog, "messages"), "convoflow/messages")] == [2, 1, 0]


def test_records_delivered_twice_on_purpose_are_written_twice(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    first = part(catalog, commit_rows=2)
    state = first.snapshot()
    first.write_batch([messages(1, 1, make_event) * 2])
    first.wait()
    resumed = part(catalog, state, commit_rows=2)
    resumed.write_batch([messages(1, 1, make_event) * 3])
    resumed.close()
    assert event_ids(catalog) == Counter({"chat.jsonl:1": 3})


def test_partitions_and_writers_commit_concurrently_without_losing_commits(
    catalog: Catalog, make_event: Callable[..., Event], records: dict[str, list[dict[str, Any]]]
) -> None:
    ensure_tables(catalog)

    def write(writer: str, kind: str, first: int) -> None:
        partition = part(open_catalog(lake_dir=Path(catalog.properties["warehouse"].removeprefix("file://"))),
                         kind=kind, writer=writer, commit_rows=2)
        for n in range(first, first + 16, 2):
            partition.write_batch([messages(n, 2, make_event) if kind == "messages" else records[kind][:1]])
        partition.close()

    threads = [threading.Thread(target=write, args=args) for args in
               [("w1", "messages", 0), ("w2", "messages", 100), ("w3", "messages", 200), ("w1", "windows", 0)]]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for f in (0, 100, 200) for n in range(f, f + 16))
    table = table_of(catalog, "messages")
    for writer in ("w1", "w2", "w3"):
        assert [seq for seq, _ in committed_batches(table, f"{writer}/messages")] == list(range(7, -1, -1))
    assert snapshot_count(catalog) == 24 and snapshot_count(catalog, "windows") == 4


def test_a_commit_on_a_stale_table_is_retried_against_the_new_state(
    catalog: Catalog, make_event: Callable[..., Event], caplog: pytest.LogCaptureFixture
) -> None:
    first, second = part(catalog, writer="w1"), part(catalog, writer="w2")
    first.write_batch([messages(1, 2, make_event)])
    second.write_batch([messages(3, 2, make_event)])
    first.close()
    second.close()  # its table object still has the metadata from before `first` committed
    assert "Commit failed due to a concurrent update, retrying" in caplog.text
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 5))


def mini_flow(inp: list[Any], catalog: Catalog) -> Dataflow:
    flow = Dataflow("iceberg_test")
    op.output("write", op.input("read", flow, TestingSource(inp)), IcebergSink(catalog, commit_rows=2))
    return flow


def test_a_flow_writes_every_kind_through_op_output(catalog: Catalog, records: dict[str, list[dict[str, Any]]]) -> None:
    run_main(mini_flow([(kind, [record]) for kind, batch in records.items() for record in batch], catalog))
    for kind, batch in records.items():
        spec = TABLES[kind]
        rows = table_of(catalog, kind).scan().to_arrow().to_pylist()
        assert sorted(rows, key=spec.sort_key) == sorted(map(row_converter(spec.name, spec.schema), batch), key=spec.sort_key), kind


def test_a_flow_resumed_from_bytewax_recovery_writes_each_message_once(
    catalog: Catalog, make_event: Callable[..., Event], tmp_path: Path
) -> None:
    (tmp_path / "recovery").mkdir()
    init_db_dir(tmp_path / "recovery", 1)
    recovery = RecoveryConfig(str(tmp_path / "recovery"))
    batches = [("messages", messages(n, 1, make_event)) for n in range(1, 8)]
    inp: list[Any] = [*batches[:5], TestingSource.ABORT(), *batches[5:]]
    run_main(mini_flow(inp, catalog), epoch_interval=timedelta(0), recovery_config=recovery)
    before = event_ids(catalog)
    run_main(mini_flow(inp, catalog), epoch_interval=timedelta(0), recovery_config=recovery)
    assert set(before) <= set(event_ids(catalog))
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 8))


# --- snapshot expiry and the ledger ------------------------------------------------------------




# --- the appender thread -----------------------------------------------------------------------

def waiting_on_a_future(thread: threading.Thread) -> bool:
    """Whether `thread` is blocked in `concurrent.futures.Future.result` right now."""
    frame = sys._current_frames().get(thread.ident or 0)
    while frame is not None:
        if frame.f_code.co_name == "result" and "concurrent" in frame.f_code.co_filename:
            return True
        frame = frame.f_back
    return False


def test_a_bytewax_snapshot_waits_for_the_append_in_flight(
    catalog: Catalog, make_event: Callable[..., Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    partition = part(catalog, commit_rows=2)
    append, release, landed = partition.table.append, threading.Event(), threading.Event()

    def held_append(*args: Any, **kwargs: Any) -> None:
        release.wait()
        append(*args, **kwargs)
        landed.set()

    monkeypatch.setattr(partition.table, "append", held_append)
    partition.write_batch([messages(1, 2, make_event)])
    assert not landed.is_set()  # the batch was handed to the appender; write_batch did not wait
    partition.write_batch([messages(3, 1, make_event)])
    seen: dict[str, Any] = {}

    def take_snapshot() -> None:
        seen["state"] = partition.snapshot()
        seen["landed"] = landed.is_set()

    snapshotter = threading.Thread(target=take_snapshot)
    snapshotter.start()
    # Let the append go once the snapshot is seen waiting for it; a snapshot that does not wait returns first.
    wait_until(lambda: waiting_on_a_future(snapshotter), snapshotter)
    release.set()
    snapshotter.join()
    state = seen["state"]
    assert seen["landed"] and state.next_seq == 1 and state.rows is not None and state.rows.num_rows == 1


def test_a_failed_append_is_raised_by_the_next_call_and_no_snapshot_claims_it(
    catalog: Catalog, make_event: Callable[..., Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    partition = part(catalog, commit_rows=2)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise CommitFailedException("lost every race")

    monkeypatch.setattr(partition.table, "append", fail)
    partition.write_batch([messages(1, 2, make_event)])
    with pytest.raises(CommitFailedException, match="lost every race"):
        partition.snapshot()
    with pytest.raises(CommitFailedException):
        partition.close()
    assert snapshot_count(catalog) == 0


def test_an_append_of_unknown_outcome_is_looked_up_by_its_marker(
    catalog: Catalog, make_event: Callable[..., Event], monkeypatch: pytest.MonkeyPatch
) -> None:
    partition = part(catalog, commit_rows=2)
    append = partition.table.append

    def lost_response(*args: Any, **kwargs: Any) -> None:
        append(*args, **kwargs)
        raise OSError("connection reset after the commit")

    monkeypatch.setattr(partition.table, "append", lost_response)
    partition.write_batch([messages(1, 2, make_event)])
    assert partition.snapshot().next_seq == 1
    def down(*args: Any, **kwargs: Any) -> None:
        raise OSError("down")

    monkeypatch.setattr(partition.table, "append", down)
    partition.write_batch([messages(3, 2, make_event)])
    with pytest.raises(OSError, match="down"):  # no marker of batch 1: it did not land
        partition.close()
    assert event_ids(catalog) == Counter(["chat.jsonl:1", "chat.jsonl:2"])
