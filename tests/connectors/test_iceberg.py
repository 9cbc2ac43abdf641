import itertools
import sys
import threading
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import bytewax.operators as op
import polars as pl
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main
from hypothesis import given, settings
from hypothesis import strategies as st
from pyiceberg.catalog import Catalog
from pyiceberg.exceptions import CommitFailedException
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.schema import Schema, index_by_name
from pyiceberg.table import Table
from pyiceberg.table.snapshots import ancestors_of
from pyiceberg.types import LongType, NestedField, StringType, StructType, TimestamptzType

from connectors.iceberg import (
    PARTITION_KEY, ROWS_KEY, SEQ_KEY, TABLES, IcebergPartition, IcebergSink, IcebergState, SnapshotExpiry,
    committed_batches, ensure_tables, expire_snapshots, ledger, next_seqs, open_catalog,
)
from connectors.lake_rows import ArrowRows, record_hash, row_converter
from dataflows.errors import ConvoflowError
from dataflows.events import DeadLetter, Event, LateEvent, LineRef, WindowRecord, iso
from dataflows.patterns.engine import Alert
from dataflows.rules import Moderation
from tests.conftest import FakeClock
from tests.progress import wait_until

pytestmark = pytest.mark.lake

T0 = 1704103200.0  # 2024-01-01T10:00:00Z


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return open_catalog(lake_dir=tmp_path / "lake")


@pytest.fixture
def make_event() -> Callable[..., Event]:
    def make(n: int = 1, session: str = "s-1", text: str = "hi", **overrides: Any) -> Event:
        event = Event(f"chat.jsonl:{n}", session, "customer", "message", text, None, "event", "conversation",
                      "chat.jsonl", n, 10 * n, **overrides)
        return event.timed(T0 + 60 * n)

    return make


@pytest.fixture
def records(make_event: Callable[..., Event]) -> dict[str, list[dict[str, Any]]]:
    """A few records of each kind, as the flow's `as_record()` makes them."""
    e1, e2, e3 = make_event(1), make_event(2, language="es", username="alice"), make_event(3, session="s-2")
    return {
        "messages": [e.as_record() for e in (e3, e1)] + [judged(e2, Moderation("flag", e2.text, (("bw", 2),), ("w",)))],
        # The profiles stage gives every window a (maybe empty) `user_context` list; PyIceberg 0.12
        # reads a null top-level list back as [], so a window without one would not round-trip.
        "windows": [{**WindowRecord("s-1", T0, T0 + 300, (e1, e2), {"message": 2}).as_record(),
                     "user_context": [{"user": "s-1/customer", "total_messages": 3, "first_seen": iso(T0),
                                       "last_active": iso(T0 + 60)}]},
                    {**WindowRecord("s-2", T0, T0 + 300, (e3,), {}).as_record(), "user_context": []}],
        "late": [LateEvent(e1, T0, T0 + 300, T0 + 400).as_record()],
        "dead_letter": [DeadLetter(LineRef("chat.jsonl", 4, 40), "{oops", "invalid JSON").as_record(),
                        DeadLetter(LineRef("chat/1", 7, 7), "{", "not JSON", "parse",
                                   (("topic", "chat"), ("partition", 1), ("offset", 7))).as_record()],
        "moderated": [judged(e3, Moderation("block", e3.text, (("perm-eve", 1),), ("muted",), (("translation", False),),
                                            "muted"))],
        "alerts": [Alert("angry", "s-1", "high", T0 + 150, (e1, e2), "two messages").as_record()],
    }


def judged(event: Event, moderation: Moderation) -> dict[str, Any]:
    return {**event.as_record(), "moderation": moderation.as_record()}


def messages(first: int, count: int, make_event: Callable[..., Event]) -> list[dict[str, Any]]:
    return [make_event(n).as_record() for n in range(first, first + count)]


def table_of(catalog: Catalog, kind: str) -> Table:
    return catalog.load_table(("convoflow", TABLES[kind].name))


def event_ids(catalog: Catalog) -> Counter[str]:
    return Counter(table_of(catalog, "messages").scan(selected_fields=("event_id",)).to_arrow()["event_id"].to_pylist())


def snapshot_count(catalog: Catalog, kind: str = "messages") -> int:
    return len(table_of(catalog, kind).metadata.snapshots)


def part(catalog: Catalog, resume: IcebergState | None = None, *, kind: str = "messages", writer: str = "convoflow",
         commit_rows: int = 1000, clock: Callable[[], float] | None = None,
         expiry: SnapshotExpiry | None = SnapshotExpiry()) -> IcebergPartition:
    sink = IcebergSink(catalog, writer_id=writer, commit_rows=commit_rows, clock=clock or FakeClock(), expiry=expiry)
    return sink.build_part("write", kind, resume)


def test_tables_are_created_once_with_the_declared_schema_partitioning_and_sort_order(catalog: Catalog) -> None:
    tables = ensure_tables(catalog)
    locations = {kind: table.metadata_location for kind, table in tables.items()}
    assert {kind: t.metadata_location for kind, t in ensure_tables(catalog).items()} == locations
    layout = {}
    for kind, table in tables.items():
        spec, schema = TABLES[kind], table.schema()
        assert schema_to_pyarrow(schema, include_field_ids=False) == schema_to_pyarrow(spec.schema, include_field_ids=False)
        assert table.properties["commit.manifest-merge.enabled"] == "true"
        layout[table.name()[-1]] = (
            [(schema.find_column_name(f.source_id), str(f.transform)) for f in table.spec().fields],
            [schema.find_column_name(f.source_id) for f in table.sort_order().fields],
        )
    assert layout == {
        "chat_messages": ([("timestamp", "day")], ["session_id", "timestamp"]),
        "conversation_windows": ([("window_start", "day")], ["session_id", "window_start"]),
        "late_events": ([("event.timestamp", "day")], ["session_id", "event.timestamp"]),
        "alerts": ([("detected_at", "day")], ["session_id", "detected_at"]),
        "dead_letter": ([], ["source", "line"]),
        "moderated_messages": ([("timestamp", "day")], ["session_id", "timestamp"]),
    }
    assert str(tables["messages"].schema().find_type("timestamp")) == "timestamptz"


def test_an_older_table_gains_the_columns_added_since(catalog: Catalog) -> None:
    old = Schema(*[f for f in TABLES["dead_letter"].schema.fields if f.name not in ("topic", "partition")])
    catalog.create_namespace_if_not_exists("convoflow")
    catalog.create_table(("convoflow", "dead_letter"), old)
    table = ensure_tables(catalog, kinds=["dead_letter"])["dead_letter"]
    assert {"topic", "partition"} <= {f.name for f in table.schema().fields}


def test_rows_of_every_kind_read_back_equal_and_sorted(catalog: Catalog, records: dict[str, list[dict[str, Any]]]) -> None:
    sink = IcebergSink(catalog)
    for kind in sink.list_parts():
        partition = sink.build_part("write", kind, None)
        partition.write_batch([records[kind]])
        partition.close()
        spec = TABLES[kind]
        expected = sorted(map(row_converter(spec.name, spec.schema), records[kind]), key=spec.sort_key)
        assert table_of(catalog, kind).scan().to_arrow().to_pylist() == expected, kind
    got = table_of(catalog, "windows").scan().to_arrow().to_pylist()[0]
    assert got["counts"] == [("message", 2)] and [m["event_id"] for m in got["messages"]] == ["chat.jsonl:1", "chat.jsonl:2"]
    assert got["window_start"].isoformat() == "2024-01-01T10:00:00+00:00"


def test_a_record_that_does_not_fit_the_schema_is_a_clear_error(catalog: Catalog, records: dict[str, list[dict[str, Any]]]) -> None:
    with pytest.raises(ConvoflowError, match=r"chat_messages: fields \['mood'\] are not in the table's schema"):
        part(catalog).write_batch([[{**records["messages"][0], "mood": "sad"}]])
    with pytest.raises(ConvoflowError, match=r"chat_messages.session_id is required"):
        part(catalog).write_batch([[{**records["messages"][0], "session_id": None}]])
    with pytest.raises(ConvoflowError, match="no Iceberg output for records of kind 'gauge'"):
        IcebergSink(catalog).part_fn("gauge")


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
    monkeypatch.setattr("connectors.iceberg.LEDGER_LIMIT", 3)
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

    monkeypatch.setattr("connectors.iceberg.expire_snapshots", fail)
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

def test_user_context_is_an_optional_column_of_the_message_tables(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    context = {"total_messages": 3, "first_seen": "2024-01-01T08:00:00+00:00", "last_active": "2024-01-01T09:30:00.25+01:00"}
    partition = part(catalog)
    partition.write_batch([[{**make_event(1).as_record(), "user_context": context}, make_event(2).as_record(),
                            {**make_event(3).as_record(), "user_context": None}]])
    partition.close()
    got = {row["event_id"]: row["user_context"] for row in table_of(catalog, "messages").scan().to_arrow().to_pylist()}
    assert got["chat.jsonl:2"] is None and got["chat.jsonl:3"] is None
    assert got["chat.jsonl:1"]["total_messages"] == 3
    assert got["chat.jsonl:1"]["last_active"].isoformat() == "2024-01-01T08:30:00.250000+00:00"
    assert TABLES["moderated"].schema.find_field("user_context.last_active")


def test_a_field_outside_the_schema_is_an_error_at_any_depth(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    record = judged(make_event(1), Moderation("flag", "hi", (("bw", 2),), ("w",)))
    record["moderation"]["rules"][0]["weight"] = 1
    with pytest.raises(ConvoflowError, match=r"chat_messages.moderation.rules: fields \['weight'\] are not in"):
        part(catalog).write_batch([[record]])
    with pytest.raises(ConvoflowError, match=r"chat_messages.user_context: fields \['tier'\] are not in"):
        part(catalog).write_batch([[{**make_event(2).as_record(), "user_context": {"tier": "gold"}}]])


def test_a_required_nested_field_missing_is_an_error(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    late = LateEvent(make_event(1), T0, T0 + 300, T0 + 400).as_record()
    late["event"]["session_id"] = None
    with pytest.raises(ConvoflowError, match=r"late_events.event.session_id is required"):
        part(catalog, kind="late").write_batch([[late]])


TEXT = st.text(max_size=8)
TIME = st.one_of(
    st.none(),
    st.integers(1_600_000_000_000_000, 1_800_000_000_000_000).map(lambda us: iso(us / 1_000_000)),
    st.integers(1_600_000_000, 1_800_000_000).map(float),  # epoch seconds: taken by the per-row path
)
MODERATION = st.one_of(st.none(), st.fixed_dictionaries(
    {"action": st.sampled_from(["allow", "flag"])},
    optional={"rules": st.lists(st.fixed_dictionaries({"id": TEXT, "version": st.integers(0, 9)}), max_size=2),
              "reasons": st.lists(TEXT, max_size=2), "flags": st.dictionaries(TEXT, st.booleans(), max_size=2),
              "role": st.none() | TEXT}))
MESSAGE = st.fixed_dictionaries(
    {"event_id": TEXT, "session_id": TEXT},
    optional={"sender": TEXT, "text": TEXT, "timestamp": TIME, "username": st.none() | TEXT, "line": st.integers(0, 99),
              "moderation": MODERATION,
              "user_context": st.none() | st.fixed_dictionaries({}, optional={
                  "total_messages": st.integers(0, 10**6), "first_seen": TIME, "last_active": TIME})})


@given(st.lists(MESSAGE, max_size=6))
@settings(max_examples=60, deadline=None)
def test_batches_become_the_same_rows_as_record_by_record(records: list[dict[str, Any]]) -> None:
    spec = TABLES["messages"]
    to_rows = ArrowRows(spec.name, spec.schema)
    expected = pa.Table.from_pylist([row_converter(spec.name, spec.schema)(record) for record in records], schema=to_rows.schema)
    assert to_rows(records).equals(expected)


def test_a_buffer_from_before_a_schema_change_resumes_into_the_new_schema(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    first = part(catalog)
    first.write_batch([messages(1, 2, make_event)])
    old = first.snapshot()
    assert old.rows is not None
    state = IcebergState(old.next_seq, old.rows.drop_columns(["user_context"]), old.skip)
    resumed = part(catalog, state)
    resumed.write_batch([messages(3, 1, make_event)])
    resumed.close()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 4))


def test_nested_columns_added_to_the_declared_schema_reach_an_existing_table(
    catalog: Catalog, make_event: Callable[..., Event]
) -> None:
    """An older `chat_messages`: no `user_context`, and `moderation` without `role`."""
    i = itertools.count(1).__next__
    old_moderation = StructType(NestedField(i(), "action", StringType()))
    old = Schema(NestedField(i(), "event_id", StringType(), required=True),
                 NestedField(i(), "session_id", StringType(), required=True),
                 NestedField(i(), "timestamp", TimestamptzType()), NestedField(i(), "moderation", old_moderation),
                 NestedField(i(), "record_hash", LongType(), required=True))
    catalog.create_namespace_if_not_exists("convoflow")
    table = catalog.create_table(("convoflow", "chat_messages"), old)
    old_row = {"event_id": "old-1", "session_id": "s-0", "timestamp": datetime(2024, 1, 1, tzinfo=timezone.utc),
               "moderation": {"action": "flag"}, "record_hash": 1}
    table.append(pa.Table.from_pylist([old_row], schema=table.schema().as_arrow()))
    table = ensure_tables(catalog, kinds=["messages"])["messages"]
    names = set(index_by_name(table.schema()))
    assert {"moderation.role", "moderation.rules.element.id", "user_context.first_seen", "text"} <= names
    record = judged(make_event(1), Moderation("block", "hi", (), (), (), "muted"))
    partition = part(catalog)
    partition.write_batch([[{**record, "user_context": {"total_messages": 1}}]])
    partition.close()
    rows = {r["event_id"]: r for r in table.refresh().scan().to_arrow().to_pylist()}
    assert rows["old-1"]["moderation"] == {"action": "flag", "role": None, "rules": None, "reasons": None, "flags": None,
                                           "models": None}
    assert rows["old-1"]["user_context"] is None and rows["old-1"]["text"] is None
    assert rows["chat.jsonl:1"]["moderation"]["role"] == "muted"
    assert rows["chat.jsonl:1"]["user_context"]["total_messages"] == 1


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
