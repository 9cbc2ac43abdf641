from pathlib import Path

import orjson
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.files.jsonl import JsonlSink, json_line, json_lines, prepare_out_dir
from dataflows.errors import ConvoflowError
from dataflows.records import as_records


def test_refuses_a_non_empty_out_dir_unless_overwrite(tmp_path: Path) -> None:
    (tmp_path / "windows.jsonl").write_text("old\n")
    with pytest.raises(ConvoflowError, match="not empty"):
        prepare_out_dir(tmp_path, ["windows.jsonl"], overwrite=False)
    prepare_out_dir(tmp_path, ["windows.jsonl", "alerts.jsonl"], overwrite=True)
    assert (tmp_path / "windows.jsonl").read_bytes() == b"" and (tmp_path / "alerts.jsonl").read_bytes() == b""


def test_out_dir_that_is_a_file_is_an_error(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_text("")
    with pytest.raises(ConvoflowError, match="is not a directory"):
        prepare_out_dir(target, [], overwrite=True)


def test_routes_kinds_to_their_files_whatever_the_order(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, ["windows", "late", "messages"])
    parts = {name: sink.build_part("out", name, None) for name in sink.list_parts()}
    ordered = sorted(sink.list_parts())
    for kind in ["windows", "late", "messages"]:
        parts[ordered[sink.part_fn(kind)]].write_batch([[{"kind": kind}]])
    for part in parts.values():
        part.close()
    for kind in ["windows", "late", "messages"]:
        assert orjson.loads((tmp_path / f"{kind}.jsonl").read_bytes()) == {"kind": kind}


def test_unknown_kind_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConvoflowError, match="no JSONL output for records of kind 'alerts'"):
        JsonlSink(tmp_path, ["windows"]).part_fn("alerts")


def test_resume_truncates_what_was_written_after_the_snapshot(tmp_path: Path) -> None:
    sink = JsonlSink(tmp_path, ["windows"])
    part = sink.build_part("out", "windows", None)
    part.write_batch([[{"n": 1}]])
    length = part.snapshot()
    part.write_batch([[{"n": 2}]])
    part.close()
    resumed = sink.build_part("out", "windows", length)
    resumed.write_batch([[{"n": 2}], pl.DataFrame({"n": [3]})])
    resumed.close()
    assert [orjson.loads(line) for line in (tmp_path / "windows.jsonl").read_bytes().splitlines()] == [{"n": 1}, {"n": 2}, {"n": 3}]


def test_a_partition_without_a_snapshot_rewrites_its_file(tmp_path: Path) -> None:
    """Killed before its first snapshot (or first built after the last one): all of it is replayed."""
    sink = JsonlSink(tmp_path, ["late"])
    first = sink.build_part("out", "late", None)
    first.write_batch([[{"n": 1}]])
    first.close()
    resumed = sink.build_part("out", "late", None)
    resumed.write_batch([[{"n": 1}, {"n": 2}]])
    resumed.close()
    assert [orjson.loads(line) for line in (tmp_path / "late.jsonl").read_bytes().splitlines()] == [{"n": 1}, {"n": 2}]


def test_a_snapshot_counts_the_batch_written_on_the_writer_thread_and_a_failed_write_is_raised(tmp_path: Path) -> None:
    """Batches are encoded and written on the partition's own thread: its snapshot waits for the one
    in flight, and what encoding or writing raised comes out of the next call, not lost with the thread."""
    part = JsonlSink(tmp_path, ["late"]).build_part("out", "late", None)
    line = json_line({"n": 1})
    part.write_batch([[{"n": 1}]])
    assert part.snapshot() == len(line)
    part.write_batch([[{"n": object()}]])
    with pytest.raises(TypeError):
        part.snapshot()
    part.write_batch([pl.DataFrame({"n": [1]})])
    part.close()
    assert (tmp_path / "late.jsonl").read_bytes() == line * 2



def test_without_a_writer_thread_the_worker_writes_each_batch_before_going_on(tmp_path: Path) -> None:
    """`writer_threads=False` (one compute thread per process): the batch is in the file when
    `write_batch` returns, what encoding raised comes out of `write_batch` itself, and lines the
    flow encoded upstream are written as they are."""
    part = JsonlSink(tmp_path, ["late"], writer_threads=False).build_part("out", "late", None)
    assert part.writer.thread is None
    part.write_batch([[{"n": 1}], pl.DataFrame({"n": [2]})])
    assert (tmp_path / "late.jsonl").read_bytes() == json_line({"n": 1}) + json_line({"n": 2})
    with pytest.raises(TypeError):
        part.write_batch([[{"n": object()}]])
    assert part.snapshot() == len(json_line({"n": 1}) + json_line({"n": 2}))
    part.write_batch([json_lines("late", [{"n": 3}])])  # encoded where the records were made
    part.close()
    assert (tmp_path / "late.jsonl").read_bytes() == b"".join(json_line({"n": n}) for n in (1, 2, 3))

texts = st.text(alphabet=st.sampled_from(['a', 'é', '😀', '"', '\\', '/', '\n', '\t', '\x00', '\x1f', '\u2028', '<', ' ']),
                max_size=8)
rows = st.fixed_dictionaries({
    "session_id": texts,
    "messages": st.lists(st.builds(lambda t, n: {"text": t, "n": n}, texts, st.integers(-5, 5)), max_size=3),
    "counts": st.lists(st.tuples(texts, st.integers(0, 9)), max_size=4).map(lambda pairs: dict(pairs)),
    "score": st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
    "closed_early": st.one_of(st.none(), texts),
})


@settings(max_examples=150, deadline=None)
@given(st.lists(rows, min_size=1, max_size=6))
def test_a_frame_of_records_is_written_as_its_records_are(drawn: list[dict]) -> None:
    records = [{key: r[key] for key in ("session_id", "messages", "counts", "score", "closed_early")} for r in drawn]
    frame = pl.DataFrame({
        "session_id": [r["session_id"] for r in records],
        "messages": [r["messages"] for r in records],
        "counts": [[{"key": k, "value": v} for k, v in r["counts"].items()] for r in records],
        "score": pl.Series([r["score"] for r in records], dtype=pl.Float64),
        "closed_early": pl.Series([r["closed_early"] for r in records], dtype=pl.String),
    }, schema_overrides={"counts": pl.List(pl.Struct({"key": pl.String, "value": pl.Int64})),
                         "messages": pl.List(pl.Struct({"text": pl.String, "n": pl.Int64}))})
    assert as_records(frame) == records, "a map column reads back as a dict"
    assert json_lines("windows", frame) == b"".join(map(json_line, records))
