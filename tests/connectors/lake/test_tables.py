"""The lake's tables: created with the declared schemas, evolved, and records checked against them."""

import itertools
from collections import Counter
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyiceberg.catalog import Catalog
from pyiceberg.io.pyarrow import schema_to_pyarrow
from pyiceberg.schema import Schema, index_by_name
from pyiceberg.types import LongType, NestedField, StringType, StructType, TimestamptzType

from connectors.lake.sink import IcebergSink, IcebergState
from connectors.lake.tables import TABLES, ensure_tables
from connectors.lake.rows import ArrowRows, row_converter
from dataflows.errors import ConvoflowError
from dataflows.events import Event, LateEvent, iso
from dataflows.rules import Moderation
from tests.connectors.lake.conftest import T0, event_ids, judged, messages, part, table_of

pytestmark = pytest.mark.lake


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
