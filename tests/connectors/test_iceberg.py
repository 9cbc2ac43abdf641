import threading
from collections import Counter
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import bytewax.operators as op
import pytest
from bytewax.dataflow import Dataflow
from bytewax.recovery import RecoveryConfig, init_db_dir
from bytewax.testing import TestingSource, run_main
from pyiceberg.catalog import Catalog
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.schema import Schema
from pyiceberg.table import Table

from connectors.iceberg import (
    PARTITION_KEY, ROWS_KEY, SEQ_KEY, TABLES, IcebergPartition, IcebergSink, IcebergState, committed_batches,
    ensure_tables, open_catalog, row_converter,
)
from dataflows.errors import ConvoflowError
from dataflows.events import DeadLetter, Event, LateEvent, LineRef, WindowRecord
from dataflows.patterns.engine import Alert
from dataflows.rules import Moderation

pytestmark = pytest.mark.lake

T0 = 1704103200.0  # 2024-01-01T10:00:00Z


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


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
        "windows": [WindowRecord("s-1", T0, T0 + 300, (e1, e2), {"message": 2}).as_record(),
                    WindowRecord("s-2", T0, T0 + 300, (e3,), {}).as_record()],
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
         commit_rows: int = 1000, clock: Callable[[], float] = FakeClock()) -> IcebergPartition:
    sink = IcebergSink(catalog, writer_id=writer, commit_rows=commit_rows, clock=clock)
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
        expected = sorted(map(row_converter(spec), records[kind]), key=spec.sort_key)
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
    assert snapshot_count(catalog) == 1
    clock.now = 31.0
    partition.write_batch([messages(6, 1, make_event)])
    clock.now = 61.0
    state = partition.snapshot()
    assert snapshot_count(catalog) == 2 and state.rows == [] and state.next_seq == 2


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
    assert snapshot_count(catalog) == 1
    resumed = part(catalog, state, commit_rows=5)
    crashed_again = resumed.snapshot()  # ...and dies again before the replay arrives
    assert crashed_again.rows == [] and sum(crashed_again.skip.values()) == 3  # rows 1-3 were in its buffer
    resumed = part(catalog, crashed_again, commit_rows=5)
    replay = messages(4, 5, make_event)  # rows 4-8, another worker interleaving
    resumed.write_batch([replay[::-1][:2]])
    resumed.write_batch([replay[::-1][2:]])
    resumed.close()
    assert event_ids(catalog) == Counter(f"chat.jsonl:{n}" for n in range(1, 9))
    assert [seq for seq, _ in committed_batches(table_of(catalog, "messages"), "convoflow/messages")] == [1, 0]


def test_records_delivered_twice_on_purpose_are_written_twice(catalog: Catalog, make_event: Callable[..., Event]) -> None:
    first = part(catalog, commit_rows=2)
    state = first.snapshot()
    first.write_batch([messages(1, 1, make_event) * 2])
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
        assert sorted(rows, key=spec.sort_key) == sorted(map(row_converter(spec), batch), key=spec.sort_key), kind


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
