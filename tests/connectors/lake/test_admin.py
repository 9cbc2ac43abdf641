from collections import Counter
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table

from connectors.lake.commits import PARTITION_KEY, SEQ_KEY
from connectors.lake.sink import IcebergSink, IcebergState, SnapshotExpiry
from connectors.lake.tables import open_catalog
from connectors.lake.admin import (
    COMPACTION_KEY, compact, evolve, expire, expired_markers, list_snapshots, list_tables, load_table, parse_as_of,
    parse_older_than, show,
)
from dataflows.errors import ConvoflowError
from dataflows.events import Event

pytestmark = pytest.mark.lake

T0 = 1704103200.0  # 2024-01-01T10:00:00Z


@pytest.fixture
def catalog(tmp_path: Path) -> Catalog:
    return open_catalog(lake_dir=tmp_path / "lake")


def message(n: int, **overrides: Any) -> dict[str, Any]:
    event = Event(f"chat.jsonl:{n}", f"s-{n % 3}", "customer", "message", f"text {n}", None, "event", "conversation",
                  "chat.jsonl", n, 10 * n)
    return {**event.timed(T0 + 3600 * n).as_record(), **overrides}


def write(catalog: Catalog, first: int, count: int, *, per_commit: int = 1, writer: str = "convoflow",
          resume: IcebergState | None = None) -> IcebergState:
    """Write messages `first`.. in commits of `per_commit`; return the partition's state before it wrote."""
    sink = IcebergSink(catalog, writer_id=writer, commit_rows=per_commit, expiry=None)
    partition = sink.build_part("w", "messages", resume)
    state = partition.snapshot()
    for n in range(first, first + count):
        partition.write_batch([[message(n)]])
    partition.close()
    return state


def messages_table(catalog: Catalog) -> Table:
    return load_table(catalog, "chat_messages")


def ids(rows: list[dict[str, Any]]) -> Counter[str]:
    return Counter(row["event_id"] for row in rows)


def test_tables_lists_rows_snapshots_files_and_size(catalog: Catalog) -> None:
    write(catalog, 1, 5, per_commit=2)
    IcebergSink(catalog).build_part("w", "alerts", None)  # an empty table
    infos = {info.name: info for info in list_tables(catalog)}
    assert set(infos) == {"chat_messages", "alerts"}
    messages = infos["chat_messages"]
    assert (messages.rows, messages.snapshots) == (5, 3) and messages.data_files >= 3 and messages.total_bytes > 1000
    assert (infos["alerts"].rows, infos["alerts"].snapshots, infos["alerts"].data_files) == (0, 0, 0)


def test_tables_of_a_missing_namespace_is_a_clear_error(catalog: Catalog) -> None:
    with pytest.raises(ConvoflowError, match="no namespace 'elsewhere' in catalog 'convoflow'"):
        list_tables(catalog, "elsewhere")
    write(catalog, 1, 1)
    with pytest.raises(ConvoflowError, match=r"no table 'chats' in namespace 'convoflow' .*\(tables: chat_messages\)"):
        load_table(catalog, "chats")
    assert load_table(catalog, "messages").name() == ("convoflow", "chat_messages")


def test_snapshots_show_operations_and_the_sinks_markers(catalog: Catalog) -> None:
    write(catalog, 1, 3, per_commit=2)
    snapshots = list_snapshots(messages_table(catalog))
    assert [(s.operation, s.summary[PARTITION_KEY], s.summary[SEQ_KEY], s.current) for s in snapshots] == [
        ("append", "convoflow/messages", "0", False), ("append", "convoflow/messages", "1", True)]
    assert snapshots[1].parent_id == snapshots[0].snapshot_id and snapshots[0].time.tzinfo is not None


def test_show_reads_the_table_now_and_as_it_was(catalog: Catalog) -> None:
    write(catalog, 1, 2, per_commit=2)
    table = messages_table(catalog)
    first = table.current_snapshot()
    assert first is not None
    write(catalog, 3, 2, per_commit=2)
    table.refresh()
    assert ids(show(table, limit=None)) == Counter(f"chat.jsonl:{n}" for n in range(1, 5))
    assert len(show(table, limit=3)) == 3
    assert ids(show(table, as_of=first.snapshot_id, limit=None)) == Counter(["chat.jsonl:1", "chat.jsonl:2"])
    when = datetime.fromtimestamp(first.timestamp_ms / 1000, timezone.utc)
    assert ids(show(table, as_of=when, limit=None)) == Counter(["chat.jsonl:1", "chat.jsonl:2"])
    assert show(table, as_of=when - timedelta(seconds=1)) == []  # before anything was written
    row = show(table, limit=None, row_filter="event_id == 'chat.jsonl:4'")[0]
    assert row["timestamp"] == datetime.fromtimestamp(T0 + 4 * 3600, timezone.utc)
    with pytest.raises(ConvoflowError, match="has no snapshot 42"):
        show(table, as_of=42)


def test_time_travel_before_an_expired_history_is_an_error_not_an_empty_table(catalog: Catalog) -> None:
    write(catalog, 1, 3)
    table = messages_table(catalog)
    first = min(table.snapshots(), key=lambda s: s.timestamp_ms)
    expire(table, datetime.now(timezone.utc) + timedelta(hours=1))
    with pytest.raises(ConvoflowError, match="its history before .* is expired"):
        show(table, as_of=datetime.fromtimestamp(first.timestamp_ms / 1000, timezone.utc))
    with pytest.raises(ConvoflowError, match=f"has no snapshot {first.snapshot_id}"):
        show(table, as_of=first.snapshot_id)


def test_as_of_and_older_than_parse_ids_times_and_ages() -> None:
    assert parse_as_of("5937117119577207079") == 5937117119577207079
    assert parse_as_of("2024-03-04T10:00:00Z") == datetime(2024, 3, 4, 10, tzinfo=timezone.utc)
    with pytest.raises(ConvoflowError, match="ISO-8601 time with an offset"):
        parse_as_of("2024-03-04T10:00:00")
    now = datetime(2024, 3, 4, 10, tzinfo=timezone.utc)
    assert parse_older_than("7d", now) == now - timedelta(days=7)
    assert parse_older_than("90s", now) == now - timedelta(seconds=90)
    assert parse_older_than("2024-03-01T00:00:00+01:00", now) == datetime(2024, 2, 29, 23, tzinfo=timezone.utc)
    with pytest.raises(ConvoflowError, match="give an age"):
        parse_older_than("last week", now)


def test_expire_keeps_the_newest_and_the_sinks_can_still_resume(catalog: Catalog) -> None:
    state = write(catalog, 1, 4)
    table = messages_table(catalog)
    newest = max(s.timestamp_ms for s in table.snapshots())
    report = expire(table, datetime.fromtimestamp(newest / 1000, timezone.utc))
    assert (report.expired, report.kept, report.markers) == (3, 1, 3)
    assert expired_markers(table) == {"convoflow/messages": {0: 1, 1: 2, 2: 3}}
    assert [s.current for s in list_snapshots(table)] == [True]
    write(catalog, 1, 6, resume=state)  # a resume from before all four commits: only rows 5 and 6 are new
    assert ids(show(messages_table(catalog), limit=None)) == Counter(f"chat.jsonl:{n}" for n in range(1, 7))
    assert expire(table.refresh(), datetime(2000, 1, 1, tzinfo=timezone.utc)).expired == 0


def test_evolve_adds_an_optional_column_old_rows_read_null(catalog: Catalog) -> None:
    write(catalog, 1, 2)
    table = messages_table(catalog)
    added = evolve(table, "sentiment_score", "double", "from -1 (negative) to 1 (positive)")
    assert (str(added.field_type), added.required, added.doc) == ("double", False, "from -1 (negative) to 1 (positive)")
    nested = evolve(table, "user_context.segment", "string")
    assert str(nested.field_type) == "string"
    partition = IcebergSink(catalog, expiry=None).build_part("w", "messages", None)
    partition.write_batch([[message(3, sentiment_score=0.5, user_context={"segment": "retail"}), message(4)]])
    partition.close()
    rows = {row["event_id"]: row for row in show(table.refresh(), limit=None)}
    assert [rows[f"chat.jsonl:{n}"]["sentiment_score"] for n in range(1, 5)] == [None, None, 0.5, None]
    assert rows["chat.jsonl:3"]["user_context"]["segment"] == "retail"
    assert rows["chat.jsonl:1"]["user_context"] is None


def test_a_partition_running_while_a_column_is_added_keeps_writing(catalog: Catalog) -> None:
    partition = IcebergSink(catalog, commit_rows=2, expiry=None).build_part("w", "messages", None)
    partition.write_batch([[message(1), message(2)]])
    evolve(load_table(catalog, "messages"), "sentiment_score", "double")
    partition.write_batch([[message(3), message(4)]])
    partition.close()
    rows = show(messages_table(catalog), limit=None)
    assert ids(rows) == Counter(f"chat.jsonl:{n}" for n in range(1, 5)) and {r["sentiment_score"] for r in rows} == {None}


def test_compact_keeps_the_values_of_columns_added_after_the_last_commits_schema(catalog: Catalog) -> None:
    stale = IcebergSink(catalog, commit_rows=1, expiry=None).build_part("w", "messages", None)  # loaded before evolve
    evolve(load_table(catalog, "messages"), "sentiment_score", "double")
    fresh = IcebergSink(catalog, writer_id="w2", commit_rows=1, expiry=None).build_part("w", "messages", None)
    fresh.write_batch([[message(1, sentiment_score=0.5)]])
    fresh.close()
    stale.write_batch([[message(2)]])  # the current snapshot now names the schema before the column
    stale.close()
    table = messages_table(catalog)
    compact(table)
    scores = {row["event_id"]: row["sentiment_score"] for row in show(table, limit=None)}
    assert scores == {"chat.jsonl:1": 0.5, "chat.jsonl:2": None}


def test_evolve_refuses_existing_columns_and_unknown_types(catalog: Catalog) -> None:
    write(catalog, 1, 1)
    table = messages_table(catalog)
    with pytest.raises(ConvoflowError, match="already has a column 'text'"):
        evolve(table, "text", "string")
    with pytest.raises(ConvoflowError, match="unknown column type 'float64'"):
        evolve(table, "score", "float64")
    with pytest.raises(ConvoflowError, match="cannot add column 'text.score'"):
        evolve(table, "text.score", "double")


def test_compact_rewrites_into_fewer_files_and_says_what_it_costs(catalog: Catalog) -> None:
    write(catalog, 1, 8)
    table = messages_table(catalog)
    before = table.current_snapshot()
    assert before is not None
    report = compact(table)
    assert (report.rows, report.files_before, report.files_after) == (8, 8, 1)
    assert [s.operation for s in report.snapshots] == ["delete", "append"]
    assert all(s.summary[COMPACTION_KEY] == "rewrite" for s in report.snapshots)
    for words in ("no data-file compaction", "2 snapshots (delete + append)", "see these 8 rows again as new rows",
                  "conflicts with concurrent writers", "may write again rows"):
        assert words in report.cost
    assert ids(show(table, limit=None)) == Counter(f"chat.jsonl:{n}" for n in range(1, 9))
    rows = table.scan().to_arrow().to_pylist()
    assert [(r["session_id"], r["timestamp"]) for r in rows] == sorted((r["session_id"], r["timestamp"]) for r in rows)
    reread = table.incremental_append_scan(from_snapshot_id_exclusive=before.snapshot_id).to_arrow()
    assert reread.num_rows == 8  # what an incremental reader sees: every row again


def test_compact_one_day_leaves_the_rest(catalog: Catalog) -> None:
    write(catalog, 1, 30)  # one message an hour: two days
    table = messages_table(catalog)
    report = compact(table, "timestamp < '2024-01-02T00:00:00+00:00'")
    assert report.rows == 13 and report.files_after == 30 - 13 + 1
    assert ids(show(table, limit=None)) == Counter(f"chat.jsonl:{n}" for n in range(1, 31))


def test_compact_fails_without_writing_when_another_writer_commits_meanwhile(
    catalog: Catalog, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(catalog, 1, 3)
    table = messages_table(catalog)
    overwrite = table.overwrite

    def racing(*args: Any, **kwargs: Any) -> None:
        write(open_catalog(lake_dir=Path(catalog.properties["warehouse"].removeprefix("file://"))), 10, 1, writer="w2")
        overwrite(*args, **kwargs)

    monkeypatch.setattr(table, "overwrite", racing)
    with pytest.raises(ConvoflowError, match="another writer committed while the rewrite ran, so nothing was changed"):
        compact(table)
    assert ids(show(messages_table(catalog), limit=None)) == Counter(["chat.jsonl:1", "chat.jsonl:2", "chat.jsonl:3",
                                                                      "chat.jsonl:10"])


def test_compact_of_an_empty_table_does_nothing(catalog: Catalog) -> None:
    IcebergSink(catalog).build_part("w", "messages", None)
    report = compact(messages_table(catalog))
    assert (report.rows, report.snapshots) == (0, ()) and "nothing to rewrite" in report.cost


def test_sink_expiry_defaults_keep_recent_history_for_time_travel() -> None:
    default = SnapshotExpiry()
    assert (default.every_commits, default.keep, default.min_age) == (10, 50, 60.0)
    with pytest.raises(ConvoflowError, match="keep >= 1"):
        SnapshotExpiry(keep=0)
