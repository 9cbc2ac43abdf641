from pathlib import Path

from connectors.progress import FieldTally, GaugeSink, LineCounter, read_gauges


def test_counters_read_only_complete_appended_lines(tmp_path: Path) -> None:
    path = tmp_path / "alerts.jsonl"
    lines, tally = LineCounter(path), FieldTally(path, "pattern")
    assert (lines.count(), tally.tally()) == (0, {}), "a missing file counts as empty"
    path.write_bytes(b'{"pattern": "x"}\n{"pattern": "y"}\n{"pattern": "x"')
    assert (lines.count(), tally.tally()) == (2, {"x": 1, "y": 1}), "the half-written line waits"
    with path.open("ab") as f:
        f.write(b"}\n")
    assert (lines.count(), tally.tally()) == (3, {"x": 2, "y": 1})


def test_gauges_sum_the_latest_value_of_every_shard(tmp_path: Path) -> None:
    path = tmp_path / "gauges.json"
    assert read_gauges(path) == {"open_windows": 0, "buffered": 0}
    part = GaugeSink(path, min_interval=0.0).build_part("gauges", "gauges", None)
    part.write_batch([{"shard": "a", "open_windows": 3, "buffered": 1}, {"shard": "b", "open_windows": 2, "buffered": 0}])
    part.write_batch([{"shard": "a", "open_windows": 1, "buffered": 0}])
    part.close()
    assert read_gauges(path) == {"open_windows": 3, "buffered": 0}
