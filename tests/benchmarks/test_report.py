"""Unit tests of benchmarks/report.py's parsing, tables and PNG writing, and of the new benchmarks'
pure helpers; no benchmark runs."""

from __future__ import annotations

import json
import struct
import sys
import zlib
from datetime import datetime, timezone
from pathlib import Path

import pytest

from benchmarks import bench_memory, bench_scaling, report

REPLAY_OUT = """\
input: replay-500000.jsonl, 499,072 lines, 3 round(s)
case                                seconds   events/s   windows   CPU s
bare Bytewax (parse + windows)        11.20     44,560     4,123    11.4
convoflow replay, 1 process           14.80     33,721     4,123    15.0
convoflow replay, 2 processes         12.10     41,246     4,123    23.9
convoflow replay + 4 patterns         22.00     22,685     4,123    22.3
convoflow replay + 100 rules          24.90     20,043     4,123    25.1
pipeline / bare: 0.76 (target >= 0.6: met)
    by round: 0.76, 0.80, 0.71
2 processes / 1: 1.22 (target >= 1.6: MISSED)
    by round: 1.22, 1.30, 1.10
"""

KAFKA_OUT = """\
loaded 200,000 events into bench-replay-200000-ab12cd (3 partitions) at 127.0.0.1:9092 in 4.1 s
round case                             process s  span s  events/s  CPU s  outputs
1     (a) confluent-kafka loop              3.10    3.90    51,282    3.0  200,000
1     (b) convoflow Kafka → Kafka          15.20   14.10    14,184   14.2  234,567
1     (b) same, 2 processes                16.00   15.00    13,333   20.1  234,567
2     (a) confluent-kafka loop              3.10    4.90    40,816    3.0  200,000
2     (b) convoflow Kafka → Kafka          15.20   15.10    13,245   14.2  234,567
2     (b) same, 2 processes                16.00   16.00    12,500   20.1  234,567
events/s over the output span (first output message to last); process s includes start-up
(b) convoflow Kafka → Kafka / (a), by round: 0.22, 0.27 (target >= 0.5: MISSED)
(b) same, 2 processes / (a), by round: 0.21, 0.26 (target >= 0.5: MISSED)
"""

LAKE_OUT = """\
1,000,000 plain message rows as frames in 8.56 s: 116,822 rows/s (best of 1; target 100,000: met; 2 CPUs, load 3.1, 2.0, 1.5)
commits: 20 of up to 50,000 rows (snapshots kept: 20); data files: 22, median 1.18 MB, smallest 0.20 MB (a commit's rows split by day)
"""

LLM_OUT = """\
case                     conc.  items  calls  seconds  items/s  ideal
assistant (windows)          1     20     20     4.20      4.8      5
translation                  1     20      -     4.20      4.8      5
translation, repeated        1     20      0     0.01     2000  cache
assistant (windows)         64   1280   1280     6.50    196.9    320
translation                 64   1280      -     6.50    196.9    320
translation, repeated       64   1280      0     0.01   128000  cache
  windows at concurrency 64: 0.61 of ideal (target >= 0.7: MISSED)
  translations at concurrency 64: 0.72 of ideal (target >= 0.7: met)

pipeline at concurrency 64: 2000 translations + 230 windows = 2230 calls in 12.34 s, 180.7 calls/s; 0.56 of ideal (target >= 0.7: MISSED)
"""

SCALING_RESULT = {"bench": "scaling", "events": 1_000_352, "target": 1.6,
                  "median": {"1p1w": 30_000.0, "2p1w": 36_000.0, "1p2w": 18_000.0},
                  "ratio_median": {"2p1w": 1.2, "1p2w": 0.6}, "met": False, "cpu_bound_2p1w": 1.5,
                  "cluster_share": {"rounds": [0.8, 0.7], "median": 0.75},
                  "profile": {"events": 199_000, "samples": 100, "percent": {"parsing": 40.0, "rules": 60.0}}}

MEMORY_RESULT = {"bench": "memory", "growth": 1.1, "marginal_bytes_per_session": 55.5, "target": 1.5, "met": True,
                 "cases": [{"sessions": 10_000, "events": 40_000, "seconds": 3.0, "baseline_kib": 40_960,
                            "peak_kib": 102_400, "quarters_kib": [0, 90_000, 95_000, 100_000]},
                           {"sessions": 200_000, "events": 800_000, "seconds": 50.0, "baseline_kib": 40_960,
                            "peak_kib": 112_640, "quarters_kib": [100_000, 101_000, 102_000, 110_000]}]}


def by_key(figures: list[report.Figure]) -> dict[str, report.Figure]:
    return {f.key: f for f in figures}


def test_parse_replay_rows_and_verdicts() -> None:
    figures = by_key(report.parse_replay(REPLAY_OUT))
    assert figures["replay.pipeline"].value == 33_721
    assert figures["replay.pipeline2"].value == 41_246
    assert {"replay.bare", "replay.patterns", "replay.rules"} <= figures.keys()
    ratio = figures["replay.ratio.2_processes_1"]
    assert (ratio.value, ratio.target, ratio.met) == (1.22, ">= 1.6", False)
    assert figures["replay.ratio.pipeline_bare"].met is True
    assert len(figures) == 7, "five rows and two verdicts; the by-round lines are not figures"


def test_parse_kafka_takes_median_rate_and_median_ratio() -> None:
    figures = by_key(report.parse_kafka(KAFKA_OUT))
    assert figures["kafka.loop"].value == pytest.approx((51_282 + 40_816) / 2)
    assert figures["kafka.convoflow"].value == pytest.approx((14_184 + 13_245) / 2)
    assert figures["kafka.convoflow2"].value == pytest.approx((13_333 + 12_500) / 2)
    ratios = [f for f in figures.values() if f.unit == "x"]
    assert [(f.value, f.met) for f in ratios] == [(pytest.approx(0.245), False), (pytest.approx(0.235), False)]


def test_parse_lake() -> None:
    figures = by_key(report.parse_lake(LAKE_OUT))
    rows = figures["lake.rows"]
    assert (rows.value, rows.unit, rows.target, rows.met) == (116_822, "rows/s", ">= 100,000", True)
    assert (figures["lake.commits"].value, figures["lake.files"].value, figures["lake.median_file"].value) == (20, 22, 1.18)



def test_parse_kafka_latency() -> None:
    out = ("Kafka live, 2,000 events/s for 10 s (1,240 warm-up events over 3.1 s not measured), 1 process, ...\n"
           "message latency (produced -> produced): p50 12.0 ms, p99 48.5 ms, max 90.0 ms over 20,000 messages\n"
           "p99 latency: 48.5 ms (target <= 100: met)\n")
    figures = by_key(report.parse_kafka_latency(out))
    assert (figures["latency.kafka.p50"].value, figures["latency.kafka.p50"].target) == (12.0, "")
    p99 = figures["latency.kafka.p99"]
    assert (p99.value, p99.unit, p99.target, p99.met) == (48.5, "ms", "<= 100", True)

def test_parse_llm_keeps_top_concurrency_and_verdicts() -> None:
    figures = by_key(report.parse_llm(LLM_OUT))
    assert figures["llm.assistant_windows"].value == 196.9
    assert "concurrency 64" in figures["llm.translation"].name
    assert "llm.translation_repeated" not in figures
    assert (figures["llm.ratio.windows"].value, figures["llm.ratio.windows"].met) == (0.61, False)
    assert figures["llm.ratio.translations"].met is True
    assert (figures["llm.pipeline"].value, figures["llm.ratio.pipeline"].value) == (180.7, 0.56)


LLM_PIPELINES_OUT = """\
pipeline, 1 process x 64 in flight: 200 translations + 37 windows = 237 calls; end to end 1.99 s = 118.9 calls/s; steady 1.97 s = 120.4 calls/s
pipeline, 2 processes x 32 in flight: 200 translations + 37 windows = 237 calls; end to end 14.16 s = 16.7 calls/s; steady 8.68 s = 27.3 calls/s
pipeline at concurrency 64: 2 process(es), steady: 237 calls in 8.68 s, 27.3 calls/s; 0.09 of ideal (target >= 0.7: MISSED)
"""


def test_parse_llm_pipeline_per_process_count() -> None:
    figures = by_key(report.parse_llm(LLM_PIPELINES_OUT))
    assert figures["llm.pipeline.1p.steady"].value == 120.4
    assert figures["llm.pipeline.2p.total"].value == 16.7
    assert figures["llm.pipeline"].name == "pipeline at concurrency 64, 2 process(es), steady"
    assert (figures["llm.ratio.pipeline"].value, figures["llm.ratio.pipeline"].met) == (0.09, False)


def test_result_json_takes_the_last_result_line() -> None:
    text = "noise\nRESULT {\"a\": 1}\nmore\nRESULT {\"a\": 2}\n"
    assert report.result_json(text) == {"a": 2}
    assert report.result_json("no result here") is None


def test_parse_scaling_and_memory_results() -> None:
    scaling = by_key(report.parse_scaling("RESULT " + json.dumps(SCALING_RESULT)))
    assert scaling["scaling.2p1w"].value == 36_000
    assert (scaling["scaling.ratio.2p1w"].target, scaling["scaling.ratio.2p1w"].met) == (">= 1.6", False)
    assert scaling["scaling.ratio.1p2w"].met is None
    assert scaling["scaling.cpu_bound.2p1w"].value == 1.5
    assert scaling["scaling.cluster_share"].value == 0.75
    memory = by_key(report.parse_memory("RESULT " + json.dumps(MEMORY_RESULT)))
    assert memory["memory.peak.200000"].value == 110.0
    assert (memory["memory.growth"].target, memory["memory.growth"].met) == ("<= 1.5", True)
    assert report.parse_scaling("crashed") == []


def make_run(name: str, figures: list[report.Figure], error: str | None = None,
             result: dict[str, object] | None = None) -> report.BenchRun:
    bench = next(b for b in report.BENCHES if b.name == name)
    command = [sys.executable, str(report.BENCH_DIR / bench.script), *bench.quick]
    return report.BenchRun(bench, command, 0 if error is None else 1, 12.0, "out\n", "err\n", figures, result, error)


def test_figures_table_marks_verdicts_and_failures() -> None:
    runs = [make_run("replay", report.parse_replay(REPLAY_OUT)), make_run("kafka", [], "exit code 1")]
    table = report.figures_table(runs)
    assert table[0].startswith("| benchmark | figure | value | target | status |")
    assert "| replay | convoflow replay, 1 process | 33,721 events/s |  |  |" in table
    assert "| replay | 2 processes / 1 | 1.22x | >= 1.6 | **missed** |" in table
    assert "| replay | pipeline / bare | 0.76x | >= 0.6 | met |" in table
    assert "| kafka | *exit code 1* | | | |" in table


def test_render_has_sections_commands_and_profile() -> None:
    runs = [make_run("scaling", report.parse_scaling("RESULT " + json.dumps(SCALING_RESULT)), result=SCALING_RESULT),
            make_run("memory", report.parse_memory("RESULT " + json.dumps(MEMORY_RESULT)), result=MEMORY_RESULT)]
    chart = report.ChartInfo(Path("results.png"), "matplotlib", report.chart_panels([f for r in runs for f in r.figures]))
    context = report.Context(True, datetime(2026, 11, 21, tzinfo=timezone.utc), 60.0,
                             {"CPU": "Test CPU", "cores": "2"}, {"Python": "3.11.7"})
    text = report.render(runs, context, chart)
    assert text.startswith("# Benchmark results")
    for part in ("- CPU: Test CPU", "Python 3.11.7", "![throughput](results.png)", "| parsing | 40.0 |",
                 "| 200,000 | 800,000 | 50.0 | 40.0 | 110.0 |", "benchmarks/bench_scaling.py --events 100000",
                 "- replay by processes x workers: 1 x 1 30,000, 2 x 1 36,000, 1 x 2 18,000"):
        assert part in text


def test_display_command_shortens_project_paths() -> None:
    command = [str(report.ROOT / ".venv" / "bin" / "python"), str(report.BENCH_DIR / "bench_lake.py"), "--rows", "5"]
    assert report.display_command(command) == ".venv/bin/python benchmarks/bench_lake.py --rows 5"


def test_machine_parsers() -> None:
    assert report.cpu_model("processor\t: 0\nmodel name\t: Intel(R) Xeon(R)\n") == "Intel(R) Xeon(R)"
    assert report.memory_gib("MemTotal:       24684092 kB\nMemFree: 1 kB\n") == pytest.approx(23.54, abs=0.01)


def test_chart_panels_skip_missing_figures() -> None:
    figures = report.parse_replay(REPLAY_OUT) + report.parse_lake(LAKE_OUT)
    panels = report.chart_panels(figures)
    assert len(panels) == 1
    assert [label for label, _ in panels[0][1]] == ["pipeline", "+ patterns", "+ rules", "lake (rows)"]
    assert report.chart_panels([]) == []


def decode_png(data: bytes) -> tuple[int, int, list[bytes]]:
    """Width, height and RGB rows of a PNG made by encode_png (filter 0 rows), checking every CRC."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, chunks = 8, {}
    while at < len(data):
        (length,) = struct.unpack(">I", data[at:at + 4])
        tag, body = data[at + 4:at + 8], data[at + 8:at + 8 + length]
        (crc,) = struct.unpack(">I", data[at + 8 + length:at + 12 + length])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF
        chunks[tag] = body
        at += 12 + length
    width, height, depth, colour, *_ = struct.unpack(">IIBBBBB", chunks[b"IHDR"])
    assert (depth, colour) == (8, 2) and b"IEND" in chunks
    raw = zlib.decompress(chunks[b"IDAT"])
    stride = 1 + 3 * width
    rows = [raw[i * stride:(i + 1) * stride] for i in range(height)]
    assert all(r[0] == 0 for r in rows)
    return width, height, [r[1:] for r in rows]


def test_encode_png_round_trips() -> None:
    rows = [bytes([10, 20, 30, 40, 50, 60]), bytes([70, 80, 90, 100, 110, 120])]
    assert decode_png(report.encode_png(2, 2, rows)) == (2, 2, rows)
    with pytest.raises(ValueError):
        report.encode_png(3, 2, rows)


def test_bar_canvas_scales_bars_to_their_panel() -> None:
    width, height, rows = report.bar_canvas([[10.0, 5.0], [1.0]], bar=4, gap=2, height=20, margin=3)
    assert (width, height) == (3 + 14 + 3 + 8 + 3, 26)
    def column(x: int) -> list[bytes]:
        return [bytes(rows[y][3 * x:3 * x + 3]) for y in range(height)]

    first, second, third = column(3 + 2), column(3 + 2 + 6), column(3 + 14 + 3 + 2)
    blue, orange = bytes(report.PALETTE[0]), bytes(report.PALETTE[1])
    assert first.count(blue) == 20 and second.count(orange) == 10 and third.count(blue) == 20
    assert decode_png(report.encode_png(width, height, rows))[:2] == (width, height)


def test_write_chart_without_matplotlib(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    path = tmp_path / "chart.png"
    how = report.write_chart(path, [("stage", [("pipeline", 3.0), ("lake", 5.0)])])
    assert "without labels" in how
    assert decode_png(path.read_bytes())[0] > 0


@pytest.mark.slow
def test_write_chart_with_matplotlib(tmp_path: Path) -> None:
    """Slow only by importing matplotlib (1-4 s); skipped where the `bench` extra is not installed."""
    pytest.importorskip("matplotlib")
    path = tmp_path / "chart.png"
    assert report.write_chart(path, [("stage", [("pipeline", 3.0)]), ("scale", [("1 x 1", 2.0)])]) == "matplotlib"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_stacks_go_to_stages() -> None:
    worker = "<module> (bench_scaling.py:1);_run_process (connectors/run/runner.py:210)"
    raw = [f"{worker};ShardLogic.on_batch (dataflows/flow.py:150);WindowBook.add (dataflows/windows.py:110) 7",
           f"{worker};ReplayPartition.next_batch (connectors/files/replay.py:160);read_json (dataflows/parse.py:70) 3",
           f"{worker};json_lines (connectors/files/jsonl.py:51);json_line (connectors/files/jsonl.py:46) 2",
           f"{worker};_encoding.<locals>.apply (dataflows/flow.py:440) 1",
           f"{worker};ShardLogic._judged (dataflows/flow.py:260);judged (dataflows/judging.py:40) 6",
           f"{worker};ShardLogic._columns (dataflows/flow.py:250);FrameWindows.add (dataflows/window_frames.py:90) 2",
           f"{worker};ReplayPartition._load_block (connectors/files/replay.py:378);parse_block "
           "(dataflows/parse_block.py:76) 1",
           f"{worker} 4",
           "_bootstrap (threading.py:1);_Poller._loop (connectors/run/runner.py:222);wait (threading.py:600) 9",
           "<module> (x.py:1);_find_and_load (<frozen importlib._bootstrap>:1176) 5"]
    profile = bench_scaling.aggregate(raw)
    assert profile.by_stage == {"windows": 9, "parsing": 4, "sinks": 3, "rules": 6, "engine": 4}
    assert (profile.startup, profile.outside) == (5, 9)
    assert profile.percent()["windows"] == pytest.approx(9 / 26 * 100)


def test_cpu_bound_spreads_cluster_cpu_over_the_cores() -> None:
    assert bench_scaling.cpu_bound(10.0, 12.5, 2) == pytest.approx(1.6)
    summary = bench_scaling.rounds_summary([{"1p1w": {"seconds": 10.0, "cpu": 10.0},
                                             "2p1w": {"seconds": 8.0, "cpu": 16.0}}], 1000, cores=2)
    assert summary["median"] == {"1p1w": 100.0, "2p1w": 125.0}
    assert summary["ratio_median"] == {"2p1w": 1.25} and summary["cpu_bound_2p1w"] == pytest.approx(1.25)


def test_two_separate_runs_count_both_files_and_set_the_clusters_share() -> None:
    summary = bench_scaling.rounds_summary([{"1p1w": {"seconds": 10.0, "cpu": 10.0},
                                             "2p1w": {"seconds": 8.0, "cpu": 16.0},
                                             "2x1p1w": {"seconds": 12.5, "cpu": 24.0, "runs": 2}}], 1000, cores=2)
    assert summary["median"]["2x1p1w"] == 160.0
    assert summary["ratio_median"]["2x1p1w"] == pytest.approx(1.6)
    assert summary["cluster_share"]["median"] == pytest.approx(125.0 / 160.0)


def test_memory_input_has_3_to_5_messages_per_session_in_time_order() -> None:
    lines = [json.loads(line) for line in bench_memory.generate_lines(200, 0.5, seed=3)]
    per_session: dict[str, int] = {}
    for record in lines:
        per_session[record["session_id"]] = per_session.get(record["session_id"], 0) + 1
    assert len(per_session) == 200 and set(per_session.values()) <= {3, 4, 5}
    times = [record["timestamp"] for record in lines]
    assert times == sorted(times)


def test_parse_latency() -> None:
    text = ("paced replay, 2,000 events/s for 10 s, 1 process, 8 shards, four patterns, LLM off\n"
            "message latency (due -> written): p50 84.3 ms, p99 233.7 ms, max 310.7 ms over 20,000 messages\n"
            "p99 latency: 233.7 ms (target <= 100: MISSED)\n")
    figures = by_key(report.parse_latency(text))
    assert figures["latency.p50"].value == 84.3
    p99 = figures["latency.p99"]
    assert (p99.value, p99.unit, p99.target, p99.met) == (233.7, "ms", "<= 100", False)
