from pathlib import Path

from connectors.progress import GaugeSink, TallySink, read_gauges, read_tallies, tally_of


def test_tallies_sum_every_workers_counts_with_alerts_by_pattern(tmp_path: Path) -> None:
    assert read_tallies(tmp_path) == {}, "no tally file yet counts as nothing"
    sink = TallySink(tmp_path, min_interval=0.0)
    first, second = sink.build("tally", 0, 2), sink.build("tally", 1, 2)
    first.write_batch([("messages", tally_of("messages", [{}, {}])),
                       ("alerts", tally_of("alerts", [{"pattern": "x"}, {"pattern": "y"}, {"pattern": "x"}]))])
    second.write_batch([("messages", tally_of("messages", [{}]))])
    (tmp_path / "tally-9.json").write_bytes(b'{"messa')
    assert read_tallies(tmp_path) == {"messages": 3, "alerts": 3, "alerts:x": 2, "alerts:y": 1}, "a half-written file is skipped"
    first.close()
    second.close()


def test_gauges_sum_the_latest_value_of_every_shard_but_not_the_rule_set_version(tmp_path: Path) -> None:
    path = tmp_path / "gauges.json"
    zeros = {"open_windows": 0, "buffered": 0, "rules_version": 0, "rules_stale": 0}
    assert read_gauges(path) == zeros
    part = GaugeSink(path, min_interval=0.0).build_part("gauges", "gauges", None)
    part.write_batch([{"shard": "a", "open_windows": 3, "buffered": 1}, {"shard": "b", "open_windows": 2, "buffered": 0}])
    part.write_batch([{"shard": "a", "open_windows": 1, "buffered": 0}])
    part.write_batch([{"shard": "a", "rules_version": 4, "rules_stale": 1}, {"shard": "b", "rules_version": 3}])
    part.close()
    assert read_gauges(path) == {"open_windows": 3, "buffered": 0, "rules_version": 4, "rules_stale": 1}


def test_tallies_count_judged_messages_by_action() -> None:
    judged = [{"moderation": {"action": a}} for a in ("allow", "mask", "flag", "mask")]
    assert tally_of("messages", judged) == {"messages": 4, "mask": 2, "flag": 1}
    assert tally_of("messages", [{"text": "no rules stream"}]) == {"messages": 1}
