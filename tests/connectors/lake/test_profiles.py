import pickle
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import bytewax.operators as op
import polars as pl
import pyarrow as pa
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, TestingSource, run_main
from pyiceberg.catalog import Catalog
from pyiceberg.schema import Schema
from pyiceberg.types import LongType, NestedField, StringType, TimestamptzType

from connectors.lake.sink import IcebergSink
from connectors.lake.tables import open_catalog
from connectors.lake.admin import compact, load_table
from connectors.lake.profiles import HistoryStart, ProfilesStage, aggregate_messages, user_key
from dataflows.errors import ConvoflowError
from dataflows.flow import Stage
from dataflows.events import Event, Shape, iso
from dataflows.patterns.definitions import key_of
from dataflows.records import as_records
from tests.conftest import FakeClock

pytestmark = pytest.mark.lake

T0 = 1704103200.0  # 2024-01-01T10:00:00Z


@pytest.fixture
def lake_dir(tmp_path: Path) -> Path:
    return tmp_path / "lake"


@pytest.fixture
def catalog(lake_dir: Path) -> Catalog:
    return open_catalog(lake_dir=lake_dir)


@pytest.fixture
def make_event() -> Callable[..., Event]:
    def make(n: int = 1, session: str = "s-1", sender: str = "customer", *, at: float | None = None,
             username: str | None = None, shape: Shape = "conversation") -> Event:
        event = Event(f"chat.jsonl:{n}", session, sender, "message", f"text {n}", None, "event", shape, "chat.jsonl",
                      n, 10 * n, username=username)
        return event.timed(T0 + 60 * n if at is None else at)

    return make


def write(catalog: Catalog, events: list[Event]) -> None:
    partition = IcebergSink(catalog, expiry=None).build_part("w", "messages", None)
    partition.write_batch([[event.as_record() for event in events]])
    partition.close()


def contexts(stage: ProfilesStage, *events: Event) -> list[Any]:
    """The contexts the stage gives the events' records; checks that a frame of them gets the same."""
    records = [event.as_record() for event in events]
    frame = pl.from_dicts(records, infer_schema_length=None)
    batches = stage([("messages", records), ("alerts", [{"session_id": "s-1"}]), ("messages", frame)])
    assert batches[1] == ("alerts", [{"session_id": "s-1"}]), "other kinds pass untouched"
    assert isinstance(batches[2][1], pl.DataFrame) and as_records(batches[2][1]) == batches[0][1]
    return [record["user_context"] for record in batches[0][1]]


def context(total: int, first: float, last: float) -> dict[str, Any]:
    return {"total_messages": total, "first_seen": iso(first), "last_active": iso(last)}


def test_without_tables_every_user_has_no_history(lake_dir: Path, make_event: Callable[..., Event]) -> None:
    stage = ProfilesStage(lake_dir=lake_dir)
    assert contexts(stage, make_event(1), make_event(2, username="alice", shape="chat")) == [None, None]


def test_history_per_user_from_chat_messages(catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]) -> None:
    write(catalog, [
        make_event(1, "s-1", "customer"), make_event(2, "s-1", "rm"), make_event(3, "s-1", "customer", at=T0 + 0.25),
        make_event(4, "room", "alice", username="alice", shape="chat"),
        make_event(5, "other-room", "alice", username="alice", shape="chat"),
        make_event(6, "s-2", "customer", username=""),  # an empty username is no username
    ])
    stage = ProfilesStage(lake_dir=lake_dir)
    got = contexts(stage, make_event(7, "s-1", "customer"), make_event(8, "s-1", "rm"),
                   make_event(9, "room", "alice", username="alice", shape="chat"), make_event(10, "s-2", "customer"),
                   make_event(11, "s-3", "customer"))
    assert got == [context(2, T0 + 0.25, T0 + 60), context(1, T0 + 120, T0 + 120), context(2, T0 + 240, T0 + 300),
                   context(1, T0 + 360, T0 + 360), None]
    assert stage.lookup("alice") == context(2, T0 + 240, T0 + 300)


def test_a_window_gets_the_history_of_its_known_senders_in_order(
    catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]
) -> None:
    write(catalog, [make_event(1, "s-1", "customer"), make_event(2, "room", "alice", username="alice", shape="chat")])
    stage = ProfilesStage(lake_dir=lake_dir)
    windows = [{"session_id": "s-1", "messages": [{"sender": "rm"}, {"sender": "customer"}, {"sender": "customer"}]},
               {"session_id": "room", "messages": [{"sender": "alice"}, {"sender": "zoe"}]}]
    [(_, out)] = stage([("windows", windows)])
    assert [w["user_context"] for w in out] == [[{"user": "s-1/customer", **context(1, T0 + 60, T0 + 60)}],
                                                [{"user": "alice", **context(1, T0 + 120, T0 + 120)}]]


def test_the_user_key_is_the_pattern_engines(make_event: Callable[..., Event]) -> None:
    events = [make_event(1), make_event(2, username="bob", shape="chat"), make_event(3, username="", sender="rm")]
    rows = pa.Table.from_pylist([{"username": e.username, "session_id": e.session_id, "sender": e.sender,
                                  "timestamp": datetime.fromtimestamp(e.time or 0, timezone.utc)} for e in events],
                                schema=pa.schema([("username", pa.large_string()), ("session_id", pa.large_string()),
                                                  ("sender", pa.large_string()), ("timestamp", pa.timestamp("us", "UTC"))]))
    assert sorted(aggregate_messages(rows).column("user").to_pylist()) == sorted(key_of(e, "user") for e in events)
    assert [user_key(e.as_record()) for e in events] == [key_of(e, "user") for e in events]


def test_reloads_when_the_table_changes_at_most_every_refresh_seconds(
    catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]
) -> None:
    write(catalog, [make_event(1)])
    clock = FakeClock()
    stage = ProfilesStage(lake_dir=lake_dir, refresh_seconds=30, clock=clock)
    assert contexts(stage, make_event(9)) == [context(1, T0 + 60, T0 + 60)]
    write(catalog, [make_event(2), make_event(3, sender="rm")])
    clock.now = 29.0
    assert contexts(stage, make_event(9)) == [context(1, T0 + 60, T0 + 60)]  # not checked yet
    clock.now = 30.0
    assert contexts(stage, make_event(9), make_event(9, sender="rm")) == [context(2, T0 + 60, T0 + 120),
                                                                          context(1, T0 + 180, T0 + 180)]
    compact(load_table(catalog, "messages"))  # not appends only: loaded again in full, not added twice
    write(catalog, [make_event(4)])
    clock.now = 60.0
    assert contexts(stage, make_event(9)) == [context(3, T0 + 60, T0 + 240)]


def test_as_of_reads_the_lake_as_it_was(catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]) -> None:
    write(catalog, [make_event(1)])
    table = load_table(catalog, "messages")
    first = table.current_snapshot()
    assert first is not None
    write(catalog, [make_event(2)])
    then = datetime.fromtimestamp(first.timestamp_ms / 1000, timezone.utc)
    clock = FakeClock()
    for as_of in (first.snapshot_id, then):
        stage = ProfilesStage(lake_dir=lake_dir, as_of=as_of, refresh_seconds=0, clock=clock)
        assert contexts(stage, make_event(9)) == [context(1, T0 + 60, T0 + 60)]
        write(catalog, [make_event(3)])
        clock.now += 100
        assert contexts(stage, make_event(9)) == [context(1, T0 + 60, T0 + 60)]  # the past does not change
    before = ProfilesStage(lake_dir=lake_dir, as_of=datetime(2000, 1, 1, tzinfo=timezone.utc))
    assert contexts(before, make_event(9)) == [None]
    with pytest.raises(ConvoflowError, match="has no snapshot 42"):
        ProfilesStage(lake_dir=lake_dir, as_of=42).history()


def test_a_pinned_start_is_read_first_then_the_lake_as_it_is(
    catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]
) -> None:
    write(catalog, [make_event(1)])
    first_run = ProfilesStage(lake_dir=lake_dir)
    start = first_run.loaded_from()
    assert start.table == "chat_messages" and start.snapshot_id is not None
    assert HistoryStart.from_json(start.as_json()) == start
    write(catalog, [make_event(2)])  # what the crashed run committed
    clock = FakeClock()
    resumed = ProfilesStage(lake_dir=lake_dir, start=start, refresh_seconds=30, clock=clock)
    assert contexts(resumed, make_event(9)) == [context(1, T0 + 60, T0 + 60)]
    clock.now = 30.0
    assert contexts(resumed, make_event(9)) == [context(2, T0 + 60, T0 + 120)], "later refreshes read the lake"


def test_a_pinned_start_of_an_empty_lake_is_an_empty_history(
    catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]
) -> None:
    start = ProfilesStage(lake_dir=lake_dir).loaded_from()
    assert start == HistoryStart(None, None)
    write(catalog, [make_event(1)])
    assert contexts(ProfilesStage(lake_dir=lake_dir, start=start), make_event(9)) == [None]
    assert contexts(ProfilesStage(lake_dir=lake_dir, start=HistoryStart("chat_messages", None)), make_event(9)) == [None]


def test_a_pinned_start_that_is_gone_reads_the_lake_as_it_is(
    catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event], caplog: pytest.LogCaptureFixture
) -> None:
    write(catalog, [make_event(1)])
    expired = ProfilesStage(lake_dir=lake_dir, start=HistoryStart("chat_messages", 42))
    assert contexts(expired, make_event(9)) == [context(1, T0 + 60, T0 + 60)]
    dropped = ProfilesStage(lake_dir=lake_dir, start=HistoryStart("user_profiles", 42))
    assert contexts(dropped, make_event(9)) == [context(1, T0 + 60, T0 + 60)]
    assert "snapshot 42 of chat_messages" in caplog.text and "user_profiles, the table" in caplog.text


def test_a_user_profiles_table_is_preferred(catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]) -> None:
    write(catalog, [make_event(1)])
    schema = Schema(NestedField(1, "user_key", StringType(), required=True), NestedField(2, "total_messages", LongType()),
                    NestedField(3, "first_seen", TimestamptzType()), NestedField(4, "last_active", TimestamptzType()))
    profiles = catalog.create_table(("convoflow", "user_profiles"), schema)
    first = datetime(2023, 5, 1, 8, tzinfo=timezone.utc)
    last = datetime(2023, 12, 24, 18, 30, 0, 500000, tzinfo=timezone.utc)
    profiles.append(pa.Table.from_pylist([{"user_key": "s-1/customer", "total_messages": 120, "first_seen": first,
                                           "last_active": last}], schema=profiles.schema().as_arrow()))
    stage = ProfilesStage(lake_dir=lake_dir)
    assert contexts(stage, make_event(9)) == [{"total_messages": 120, "first_seen": "2023-05-01T08:00:00+00:00",
                                               "last_active": "2023-12-24T18:30:00.500000+00:00"}]


def test_a_user_profiles_table_without_the_columns_is_a_clear_error(catalog: Catalog, lake_dir: Path) -> None:
    catalog.create_namespace_if_not_exists("convoflow")
    catalog.create_table(("convoflow", "user_profiles"), Schema(NestedField(1, "user", StringType())))
    with pytest.raises(ConvoflowError, match=r"user_profiles lacks the columns \['user_key', 'total_messages'"):
        ProfilesStage(lake_dir=lake_dir).history()


def test_the_stage_pickles_without_its_catalog_and_cache(
    catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]
) -> None:
    write(catalog, [make_event(1)])
    stage = ProfilesStage(lake_dir=lake_dir, refresh_seconds=5, clock=FakeClock())
    contexts(stage, make_event(9))
    copy = pickle.loads(pickle.dumps(stage))
    assert copy._loaded is None and copy.refresh_seconds == 5
    assert contexts(copy, make_event(9)) == [context(1, T0 + 60, T0 + 60)]
    stage.close()
    assert stage._loaded is None and contexts(stage, make_event(9)) == [context(1, T0 + 60, T0 + 60)]


def test_a_flow_enriches_messages_on_their_way_out(
    catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]
) -> None:
    write(catalog, [make_event(1), make_event(2)])
    stage: Stage = ProfilesStage(lake_dir=lake_dir)
    inp = [("messages", [make_event(3).as_record()]), ("alerts", [{"pattern": "p"}]),
           ("messages", [make_event(4, sender="rm").as_record()])]
    out: list[Any] = []
    flow = Dataflow("profiles_test")
    records = op.flat_map_batch(f"stage_{stage.name}", op.input("read", flow, TestingSource(inp)), stage)
    op.output("write", records, TestingSink(out))
    run_main(flow)
    assert out[1] == ("alerts", [{"pattern": "p"}])
    assert [batch[0]["user_context"] for kind, batch in out if kind == "messages"] == [context(2, T0 + 60, T0 + 120), None]


def test_enriched_messages_write_to_the_lake(catalog: Catalog, lake_dir: Path, make_event: Callable[..., Event]) -> None:
    write(catalog, [make_event(1)])
    batch = [make_event(2).as_record(), make_event(3, "s-9").as_record()]
    enriched = ProfilesStage(lake_dir=lake_dir)([("messages", batch)])
    partition = IcebergSink(catalog, expiry=None).build_part("w", "messages", None)
    partition.write_batch([enriched[0][1]])
    partition.close()
    rows = {r["event_id"]: r["user_context"] for r in load_table(catalog, "messages").scan().to_arrow().to_pylist()}
    assert rows["chat.jsonl:3"] is None and rows["chat.jsonl:1"] is None
    assert rows["chat.jsonl:2"] == {"total_messages": 1, "first_seen": datetime.fromtimestamp(T0 + 60, timezone.utc),
                                    "last_active": datetime.fromtimestamp(T0 + 60, timezone.utc)}


def test_settings_are_checked(lake_dir: Path) -> None:
    with pytest.raises(ConvoflowError, match="needs an offset"):
        ProfilesStage(lake_dir=lake_dir, as_of=datetime(2024, 1, 1))
    with pytest.raises(ConvoflowError, match="refresh must be >= 0"):
        ProfilesStage(lake_dir=lake_dir, refresh_seconds=-1)
