from pathlib import Path

from connectors.view.glimpses import latest_glimpses
from connectors.view.progress import GaugeSink, TallySink, read_gauges, read_tallies, reason_kind, tallied, tally_of


def test_tallies_sum_every_workers_counts_with_alerts_by_pattern(tmp_path: Path) -> None:
    assert read_tallies(tmp_path) == {}, "no tally file yet counts as nothing"
    sink = TallySink(tmp_path, min_interval=0.0)
    first, second = sink.build("tally", 0, 2), sink.build("tally", 1, 2)
    first.write_batch([("messages", tallied("messages", [{}, {}])),
                       ("alerts", tallied("alerts", [{"pattern": "x"}, {"pattern": "y"}, {"pattern": "x"}]))])
    second.write_batch([("messages", tallied("messages", [{}]))])
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


def test_the_tally_sink_keeps_glimpses_for_the_view_only_when_asked(tmp_path: Path) -> None:
    part = TallySink(tmp_path, min_interval=0.0).build("tally", 0, 1)
    alerts = [{"pattern": "p", "key": f"k{i}", "severity": "info", "summary": f"s{i}"} for i in range(3)]
    part.write_batch([("alerts", tallied("alerts", alerts))])
    assert not (tmp_path / "glimpse-0.json").exists()
    part.write_batch([("alerts", tallied("alerts", alerts, glimpses=True))])
    part.close()
    assert [g["key"] for g in latest_glimpses(tmp_path)["alerts"]] == ["k0", "k1", "k2"]
    assert read_tallies(tmp_path)["alerts:p"] == 6


def test_dead_letters_are_counted_by_step_and_kind_of_reason() -> None:
    dead = [{"step": "parse", "reason": "field 'sender': Input should be 'customer' or 'rm'"},
            {"step": "parse", "reason": "not JSON: unexpected character: line 1 column 2 (char 1)"},
            {"step": "parse", "reason": "not JSON: trailing comma"},
            {"step": "read", "reason": "line is 2000000 bytes, over the limit of 1048576"},
            {"step": "rules", "reason": "timestamp 'x' is neither ISO-8601 nor epoch seconds/milliseconds"}]
    assert tally_of("dead_letter", dead) == {
        "dead_letter": 5, "dead_letter:parse:field sender": 1, "dead_letter:parse:invalid json": 2,
        "dead_letter:read:too long": 1, "dead_letter:rules:timestamp": 1}
    assert reason_kind("expected a JSON object, got an array") == "not an object"
    assert reason_kind("something new: with details") == "something new"


def test_the_watermark_gauge_is_the_slowest_shards(tmp_path: Path) -> None:
    path = tmp_path / "gauges.json"
    assert "watermark" not in read_gauges(path)
    part = GaugeSink(path, min_interval=0.0).build_part("gauges", "gauges", None)
    part.write_batch([{"shard": "a", "watermark": 100.0}, {"shard": "b", "watermark": 90.0}, {"shard": "c", "open_windows": 1}])
    part.write_batch([{"shard": "b", "watermark": 120.0}])
    part.close()
    assert read_gauges(path)["watermark"] == 100.0
