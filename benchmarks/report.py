"""Run every benchmark, parse its figures and write benchmarks/RESULTS.md and benchmarks/results.png.

    python benchmarks/report.py [--quick] [--only replay scaling ...] [--kafka-brokers HOST:PORT]

Runs bench_replay, bench_kafka, bench_latency, bench_kafka_latency, bench_lake, bench_llm,
bench_scaling and bench_memory one after the other, each as a subprocess with the sizes of BENCHES (`--quick`: small ones, for a smoke run), and
parses what each prints: the existing benchmarks' tables and verdict lines, the new ones' final
`RESULT {json}` line. RESULTS.md gets a table of the figures with their targets (met or missed), the
machine (CPU, cores, RAM, load), the versions that matter, the date and the exact commands; the chart
shows throughput by stage (pipeline, + patterns, + rules, Kafka, lake) and by processes x workers.
The chart needs matplotlib (`pip install -e '.[bench]'`); without it a plain bar chart without text
is written by the standard library alone.

bench_kafka and bench_kafka_latency use --kafka-brokers, else KAFKA_BOOTSTRAP_SERVERS, else start the
project's broker (scripts/kafka-local.sh), which this script stops again if it was not running before.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import signal
import statistics
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH_DIR = ROOT / "benchmarks"
KAFKA_SCRIPT = ROOT / "scripts" / "kafka-local.sh"
PACKAGES = ("bytewax", "pyiceberg", "confluent-kafka", "langchain-openai", "orjson", "matplotlib")

_NUMBER = r"\d[\d,]*(?:\.\d+)?"
_VERDICT = r"\(target (?P<target>[<>]=? ?[\d.,]+): (?P<verdict>met|MISSED)\)"


@dataclass(frozen=True)
class Figure:
    """One measured figure; `key` names it for the chart, `target` is e.g. '>= 1.6'."""

    bench: str
    key: str
    name: str
    value: float
    unit: str
    target: str = ""
    met: bool | None = None


Parser = Callable[[str], list[Figure]]


@dataclass(frozen=True)
class Bench:
    """A benchmark script with its arguments for a full and a quick run, and its output's parser."""

    name: str
    script: str
    full: tuple[str, ...]
    quick: tuple[str, ...]
    parse: Parser


@dataclass
class BenchRun:
    """What running one benchmark gave: its command, exit code (None: timed out), output and figures."""

    bench: Bench
    command: list[str]
    returncode: int | None
    seconds: float
    stdout: str
    stderr: str
    figures: list[Figure] = field(default_factory=list)
    result: dict[str, Any] | None = None
    error: str | None = None


def number(text: str) -> float:
    """A printed number, thousands separators allowed."""
    return float(text.replace(",", ""))


def verdict_met(word: str) -> bool:
    return word == "met"


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")


def key_for(label: str, keys: Sequence[tuple[str, str]], prefix: str) -> str:
    """The chart key of a printed label: the first of `keys` ((regex, key)) that it matches, else a slug."""
    for pattern, key in keys:
        if re.search(pattern, label):
            return key
    return f"{prefix}.{slug(label)}"


REPLAY_KEYS = (("bare", "replay.bare"), ("2 processes", "replay.pipeline2"), (r"patterns \+ rules", "replay.full"),
               ("patterns", "replay.patterns"),
               ("cold", "replay.rules_cold"), ("rules", "replay.rules"), ("1 process", "replay.pipeline"))
REPLAY_ROW = re.compile(rf"^(?P<label>\S.*?)\s+(?P<seconds>\d+\.\d+)\s+(?P<rate>{_NUMBER})\s+(?P<windows>{_NUMBER})"
                        r"(?:\s+\d+\.\d+)?$")
RATIO_LINE = re.compile(rf"^(?P<what>[^:]+): (?P<value>\d+(?:\.\d+)?) {_VERDICT}$")


def parse_replay(text: str) -> list[Figure]:
    """bench_replay: a row per case (events/s) and a verdict line per ratio."""
    figures = []
    for line in text.splitlines():
        if row := REPLAY_ROW.match(line.strip()):
            label = row["label"]
            figures.append(Figure("replay", key_for(label, REPLAY_KEYS, "replay"), label, number(row["rate"]),
                                  "events/s"))
        elif ratio := RATIO_LINE.match(line.strip()):
            figures.append(Figure("replay", f"replay.ratio.{slug(ratio['what'])}", ratio["what"],
                                  number(ratio["value"]), "x", ratio["target"], verdict_met(ratio["verdict"])))
    return figures


KAFKA_KEYS = (("loop", "kafka.loop"), ("2 processes", "kafka.convoflow2"), ("convoflow", "kafka.convoflow"))
KAFKA_ROW = re.compile(rf"^(?P<round>\d+)\s+(?P<label>\S.*?)\s+(?P<seconds>\d+\.\d+)\s+(?P<span>\d+\.\d+)\s+"
                       rf"(?P<rate>{_NUMBER})\s+(?P<cpu>\d+\.\d+)\s+(?P<messages>{_NUMBER})$")
KAFKA_RATIO = re.compile(rf"^(?P<what>.+?), by round: (?P<values>[\d., ]+?) {_VERDICT}$")


def parse_kafka(text: str) -> list[Figure]:
    """bench_kafka: the median events/s of each case over its rounds, and the ratio verdicts (the
    median round, as the benchmark judges)."""
    rates: dict[str, list[float]] = {}
    figures = []
    for line in text.splitlines():
        if row := KAFKA_ROW.match(line.strip()):
            rates.setdefault(row["label"], []).append(number(row["rate"]))
        elif ratio := KAFKA_RATIO.match(line.strip()):
            values = [float(v) for v in ratio["values"].split(",") if v.strip()]
            figures.append(Figure("kafka", f"kafka.ratio.{slug(ratio['what'])}", ratio["what"] + " (median of rounds)",
                                  statistics.median(values), "x", ratio["target"], verdict_met(ratio["verdict"])))
    rows = [Figure("kafka", key_for(label, KAFKA_KEYS, "kafka"), label, statistics.median(values), "events/s")
            for label, values in rates.items()]
    return rows + figures


LAKE_MAIN = re.compile(rf"^(?P<rows>{_NUMBER}) (?P<shape>\w+) message rows(?: as \w+)? in (?P<seconds>[\d.]+) s: "
                       rf"(?P<rate>{_NUMBER}) rows/s \(best of \d+; target (?P<target>{_NUMBER}): (?P<verdict>met|MISSED)")
LAKE_FILES = re.compile(r"^commits: (?P<commits>\d+) .*data files: (?P<files>\d+), median (?P<median>[\d.]+) MB")


def parse_lake(text: str) -> list[Figure]:
    """bench_lake: rows/s against its target, commits, data files and their median size."""
    figures = []
    for line in text.splitlines():
        if main := LAKE_MAIN.match(line.strip()):
            name = f"Iceberg sink, {main['rows']} {main['shape']} rows, one worker"
            figures.append(Figure("lake", "lake.rows", name, number(main["rate"]), "rows/s",
                                  f">= {main['target']}", verdict_met(main["verdict"])))
        elif files := LAKE_FILES.match(line.strip()):
            figures += [Figure("lake", "lake.commits", "commits", number(files["commits"]), ""),
                        Figure("lake", "lake.files", "data files", number(files["files"]), ""),
                        Figure("lake", "lake.median_file", "median data file", number(files["median"]), "MB")]
    return figures


LLM_ROW = re.compile(r"^(?P<case>\S.*?)\s+(?P<conc>\d+)\s+(?P<items>\d+)\s+(?P<calls>\d+|-)\s+(?P<seconds>\d+\.\d+)"
                     r"\s+(?P<rate>\d+(?:\.\d+)?)\s+(?P<ideal>\d+)$")
LLM_VERDICT = re.compile(rf"^(?P<what>\w+) at concurrency (?P<conc>\d+): (?P<ratio>[\d.]+) of ideal {_VERDICT}$")
LLM_PIPELINE = re.compile(rf"^pipeline at concurrency (?P<conc>\d+): (?:(?P<detail>[^:]+?): )?.*? (?P<rate>[\d.]+) "
                          rf"calls/s; (?P<ratio>[\d.]+) of ideal {_VERDICT}$")
LLM_PIPELINE_CASE = re.compile(r"^pipeline, (?P<setup>(?P<processes>\d+) process(?:es)? x \d+ in flight): .*; "
                               r"end to end [\d.]+ s = (?P<total>[\d.]+) calls/s; steady [\d.]+ s = (?P<steady>[\d.]+) calls/s$")


def parse_llm(text: str) -> list[Figure]:
    """bench_llm: items/s at the highest concurrency (cache rows left out), the pipeline's calls/s (each
    process count's, end to end and steady, when printed) and the fractions of ideal with their verdicts."""
    rows = [m for line in text.splitlines() if (m := LLM_ROW.match(line.strip()))]
    top = max((int(m["conc"]) for m in rows), default=0)
    figures = [Figure("llm", f"llm.{slug(m['case'])}", f"{m['case']} at concurrency {top}", number(m["rate"]),
                      "calls/s") for m in rows if int(m["conc"]) == top]
    for line in text.splitlines():
        if v := LLM_VERDICT.match(line.strip()):
            figures.append(Figure("llm", f"llm.ratio.{v['what']}", f"{v['what']} at concurrency {v['conc']} / ideal",
                                  number(v["ratio"]), "x", v["target"], verdict_met(v["verdict"])))
        elif c := LLM_PIPELINE_CASE.match(line.strip()):
            figures += [Figure("llm", f"llm.pipeline.{c['processes']}p.{how}", f"pipeline, {c['setup']}, {how}",
                               number(c[how]), "calls/s") for how in ("total", "steady")]
        elif p := LLM_PIPELINE.match(line.strip()):
            name = f"pipeline at concurrency {p['conc']}" + (f", {p['detail']}" if p["detail"] else "")
            figures += [Figure("llm", "llm.pipeline", name, number(p["rate"]), "calls/s"),
                        Figure("llm", "llm.ratio.pipeline", f"{name} / ideal", number(p["ratio"]), "x", p["target"],
                               verdict_met(p["verdict"]))]
    return figures


def result_json(text: str) -> dict[str, Any] | None:
    """The last `RESULT {json}` line's object, if any."""
    for line in reversed(text.splitlines()):
        if line.startswith("RESULT "):
            value = json.loads(line[len("RESULT "):])
            return value if isinstance(value, dict) else None
    return None


SCALING_NAMES = {"1p1w": "replay, 1 process x 1 worker", "2p1w": "replay, 2 processes x 1 worker",
                 "1p2w": "replay, 1 process x 2 workers", "2x1p1w": "replay, 2 separate 1 x 1 runs at once"}


def parse_scaling(text: str) -> list[Figure]:
    """bench_scaling's RESULT: median events/s per case and the ratios to 1 x 1 (2 processes: targeted)."""
    result = result_json(text)
    if result is None:
        return []
    figures = [Figure("scaling", f"scaling.{case}", f"{SCALING_NAMES.get(case, case)}, {result['events']:,} lines",
                      rate, "events/s") for case, rate in result["median"].items()]
    for case, ratio in result["ratio_median"].items():
        targeted = case == "2p1w"
        figures.append(Figure("scaling", f"scaling.ratio.{case}", f"{SCALING_NAMES.get(case, case)} / 1 x 1 (median)",
                              ratio, "x", f">= {result['target']}" if targeted else "",
                              bool(result.get("met")) if targeted else None))
    if "cpu_bound_2p1w" in result:
        figures.append(Figure("scaling", "scaling.cpu_bound.2p1w", "2 processes / 1, CPU-bound ceiling on idle cores "
                              "(2 x CPU s of 1 x 1 / CPU s of 2 x 1)", result["cpu_bound_2p1w"], "x"))
    if "cluster_share" in result:
        figures.append(Figure("scaling", "scaling.cluster_share", "2 processes / 2 separate runs at once (median)",
                              result["cluster_share"]["median"], "x"))
    return figures


def parse_memory(text: str) -> list[Figure]:
    """bench_memory's RESULT: peak RSS per session count, its growth (targeted) and bytes per extra session."""
    result = result_json(text)
    if result is None:
        return []
    figures = [Figure("memory", f"memory.peak.{c['sessions']}", f"peak RSS, {c['sessions']:,} sessions "
                      f"({c['events']:,} events)", c["peak_kib"] / 1024, "MiB") for c in result["cases"]]
    first, last = result["cases"][0]["sessions"], result["cases"][-1]["sessions"]
    figures += [Figure("memory", "memory.growth", f"peak RSS {last:,} / {first:,} sessions", result["growth"], "x",
                       f"<= {result['target']}", bool(result["met"])),
                Figure("memory", "memory.marginal", "marginal RSS per extra session",
                       result["marginal_bytes_per_session"], "bytes")]
    return figures


LATENCY = re.compile(rf"^message latency \(due -> written\): p50 (?P<p50>{_NUMBER}) ms, p99 (?P<p99>{_NUMBER}) ms")
LATENCY_P99 = re.compile(rf"^p99 latency: (?P<p99>{_NUMBER}) ms {_VERDICT}$")


KAFKA_LATENCY = re.compile(rf"^message latency \(produced -> produced\): p50 (?P<p50>{_NUMBER}) ms, "
                           rf"p99 (?P<p99>{_NUMBER}) ms")


def parse_latency(text: str) -> list[Figure]:
    """bench_latency: a paced replay's message latency, p50, and p99 against its target."""
    return _latency_figures(text, LATENCY, "latency", "paced replay 2,000 events/s")


def parse_kafka_latency(text: str) -> list[Figure]:
    """bench_kafka_latency: a live Kafka run's message latency, p50, and p99 against its target."""
    return _latency_figures(text, KAFKA_LATENCY, "latency.kafka", "Kafka live 2,000 events/s")


def _latency_figures(text: str, p50_line: re.Pattern[str], key: str, what: str) -> list[Figure]:
    figures = []
    for line in text.splitlines():
        if found := p50_line.match(line.strip()):
            figures.append(Figure("latency", f"{key}.p50", f"message latency p50, {what}", number(found["p50"]), "ms"))
        elif found := LATENCY_P99.match(line.strip()):
            figures.append(Figure("latency", f"{key}.p99", f"message latency p99, {what}", number(found["p99"]), "ms",
                                  found["target"], verdict_met(found["verdict"])))
    return figures


BENCHES = (
    Bench("replay", "bench_replay.py", ("--events", "1000000", "--repeat", "3"), ("--events", "100000", "--repeat", "1"),
          parse_replay),
    Bench("kafka", "bench_kafka.py", ("--events", "200000", "--repeat", "3"), ("--events", "20000"), parse_kafka),
    Bench("latency", "bench_latency.py", (), ("--seconds", "2"), parse_latency),
    Bench("kafka-latency", "bench_kafka_latency.py", (), ("--seconds", "2"), parse_kafka_latency),
    Bench("lake", "bench_lake.py", ("--rows", "1000000"), ("--rows", "100000"), parse_lake),
    Bench("llm", "bench_llm.py", (), ("--items", "200", "--rounds", "5"), parse_llm),
    Bench("scaling", "bench_scaling.py", ("--events", "2000000", "--repeat", "2"),
          ("--events", "100000", "--profile-events", "50000"), parse_scaling),
    Bench("memory", "bench_memory.py", ("--sessions", "10000", "200000"), ("--sessions", "2000", "20000"),
          parse_memory),
)


KAFKA_BENCHES = ("kafka", "kafka-latency")
"""The benchmarks that take --brokers (else start the project's broker, stopped after each)."""


def bench_command(bench: Bench, quick: bool, brokers: str | None) -> list[str]:
    extra = ["--brokers", brokers] if bench.name in KAFKA_BENCHES and brokers else []
    return [sys.executable, str(BENCH_DIR / bench.script), *(bench.quick if quick else bench.full), *extra]


def run_bench(bench: Bench, command: list[str], timeout: float) -> BenchRun:
    """Run one benchmark to its end (or `timeout`) and parse its figures."""
    print(f"running {display_command(command)}", file=sys.stderr, flush=True)
    started = time.perf_counter()
    code, stdout, stderr = run_group(command, timeout)
    run = BenchRun(bench, command, code, time.perf_counter() - started, stdout, stderr)
    try:
        run.figures = bench.parse(stdout)
        run.result = result_json(stdout)
    except (ValueError, KeyError, TypeError) as exc:
        run.error = f"could not parse the output: {exc}"
    if code != 0:
        run.error = "timed out" if code is None else f"exit code {code}"
    elif not run.figures and run.error is None:
        run.error = "no figures found in the output"
    print(f"  {bench.name}: {run.seconds:.0f} s, {len(run.figures)} figures{'; ' + run.error if run.error else ''}",
          file=sys.stderr, flush=True)
    return run


def run_group(command: list[str], timeout: float) -> tuple[int | None, str, str]:
    """Run `command` in a process group of its own: (exit code or None on timeout, stdout, stderr).

    On a timeout or an interrupt the whole group is killed, the benchmark's own case processes too.
    """
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
                          start_new_session=True) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
            return proc.returncode, stdout, stderr
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            return None, stdout, stderr
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGKILL)
            raise


def kafka_running() -> bool:
    """Whether the project's local broker answers now."""
    try:
        return subprocess.run([str(KAFKA_SCRIPT), "status"], capture_output=True, check=False,
                              timeout=30).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def stop_kafka() -> None:
    subprocess.run([str(KAFKA_SCRIPT), "stop"], capture_output=True, check=False, timeout=60)


def display_command(command: Sequence[str]) -> str:
    """A command with paths inside the project shown relative to it (run from the project's root)."""
    def short(part: str) -> str:
        path = Path(part)
        return str(path.relative_to(ROOT)) if path.is_absolute() and path.is_relative_to(ROOT) else part

    return shlex.join(short(p) for p in command)


def cpu_model(cpuinfo: str) -> str:
    """The CPU model named in /proc/cpuinfo's text."""
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("model name", "Model", "Hardware"):
            return value.strip()
    return platform.processor() or "unknown"


def memory_gib(meminfo: str) -> float:
    """MemTotal of /proc/meminfo's text, in GiB."""
    match = re.search(r"^MemTotal:\s+(\d+) kB", meminfo, re.MULTILINE)
    return int(match.group(1)) / (1024 * 1024) if match else 0.0


def read_proc(name: str) -> str:
    try:
        return Path("/proc", name).read_text()
    except OSError:
        return ""


def machine() -> dict[str, str]:
    return {"CPU": cpu_model(read_proc("cpuinfo")), "cores": str(os.cpu_count()),
            "RAM": f"{memory_gib(read_proc('meminfo')):.1f} GiB", "OS": platform.platform(),
            "load average before": load_average()}


def versions() -> dict[str, str]:
    found = {"Python": platform.python_version()}
    for package in PACKAGES:
        try:
            found[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            found[package] = "not installed"
    return found


def format_value(value: float, unit: str) -> str:
    if unit == "x":
        return f"{value:.2f}x"
    if unit in ("MiB", "MB"):
        return f"{value:,.1f} {unit}"
    text = f"{value:,.0f}" if abs(value) >= 100 or value == int(value) else f"{value:,.1f}"
    return f"{text} {unit}".strip()


def status(figure: Figure) -> str:
    return "" if figure.met is None else ("met" if figure.met else "**missed**")


def figures_table(runs: Sequence[BenchRun]) -> list[str]:
    lines = ["| benchmark | figure | value | target | status |", "| --- | --- | --- | --- | --- |"]
    for run in runs:
        for f in run.figures:
            lines.append(f"| {f.bench} | {f.name} | {format_value(f.value, f.unit)} | {f.target} | {status(f)} |")
        if run.error:
            lines.append(f"| {run.bench.name} | *{run.error}* | | | |")
    return lines


def profile_table(result: dict[str, Any] | None) -> list[str]:
    """bench_scaling's profile as a table of percent per stage (empty without one)."""
    if not result or "profile" not in result:
        return []
    profile = result["profile"]
    lines = [f"Where one worker's time goes (py-spy, 1 process, patterns + 100 rules, {profile['events']:,} lines, "
             f"{profile['samples']:,} samples):", "", "| stage | % of samples |", "| --- | --- |"]
    lines += [f"| {stage} | {pct:.1f} |" for stage, pct in profile["percent"].items()]
    return lines


def memory_table(result: dict[str, Any] | None) -> list[str]:
    """bench_memory's cases: baseline, peak and the highest RSS in each quarter of the run."""
    if not result or "cases" not in result:
        return []
    lines = ["| sessions | events | seconds | baseline MiB | peak MiB | peak bytes / session | MiB by quarter of the run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for c in result["cases"]:
        quarters = " / ".join(f"{q / 1024:.0f}" if q else "-" for q in c["quarters_kib"])
        lines.append(f"| {c['sessions']:,} | {c['events']:,} | {c['seconds']:.1f} | {c['baseline_kib'] / 1024:.1f} | "
                     f"{c['peak_kib'] / 1024:.1f} | {1024 * c['peak_kib'] / c['sessions']:,.0f} | {quarters} |")
    return lines


CHART_PANELS: tuple[tuple[str, tuple[tuple[str, str], ...]], ...] = (
    ("throughput by stage (1 process)", (("pipeline", "replay.pipeline"), ("+ patterns", "replay.patterns"),
                                         ("+ rules", "replay.rules"), ("Kafka", "kafka.convoflow"),
                                         ("lake (rows)", "lake.rows"))),
    ("replay by processes x workers", (("1 x 1", "scaling.1p1w"), ("2 x 1", "scaling.2p1w"),
                                       ("1 x 2", "scaling.1p2w"))),
)
"""The chart: panels of (bar label, figure key)."""

Panel = tuple[str, list[tuple[str, float]]]


def chart_panels(figures: Sequence[Figure]) -> list[Panel]:
    """The chart's panels with the values found among `figures` (bars without a figure left out)."""
    by_key = {f.key: f.value for f in figures}
    panels = [(title, [(label, by_key[key]) for label, key in bars if key in by_key]) for title, bars in CHART_PANELS]
    return [p for p in panels if p[1]]


def write_chart(path: Path, panels: Sequence[Panel]) -> str:
    """Write the chart as a PNG with matplotlib, else with the standard library; say which."""
    try:
        from matplotlib.figure import Figure as Chart
    except ImportError:
        path.write_bytes(encode_png(*bar_canvas([[v for _, v in bars] for _, bars in panels])))
        return "plain PNG without labels (matplotlib is not installed: pip install -e '.[bench]')"
    chart = Chart(figsize=(5.5 * len(panels), 4.2), layout="tight")
    for ax, (title, bars) in zip(chart.subplots(1, len(panels), squeeze=False)[0], panels):
        labels, values = [b[0] for b in bars], [b[1] for b in bars]
        drawn = ax.bar(labels, values, color=PALETTE_HEX[: len(values)])
        ax.bar_label(drawn, labels=[f"{v:,.0f}" for v in values], fontsize=8)
        ax.set_title(title)
        ax.set_ylabel("events (rows) per second")
        ax.tick_params(axis="x", labelsize=8)
    chart.savefig(path, dpi=110)
    return "matplotlib"


PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75))
PALETTE_HEX = ["#{:02x}{:02x}{:02x}".format(*c) for c in PALETTE]


def bar_canvas(groups: Sequence[Sequence[float]], bar: int = 40, gap: int = 12, height: int = 240,
               margin: int = 20) -> tuple[int, int, list[bytearray]]:
    """A white RGB canvas with one panel of bars per group, each scaled to its group's largest value,
    coloured in order; returns (width, height, rows)."""
    panel_widths = [gap + len(g) * (bar + gap) for g in groups]
    width = max(1, sum(panel_widths) + margin * (len(groups) + 1))
    total = height + 2 * margin
    rows = [bytearray(b"\xff" * (3 * width)) for _ in range(total)]
    left = margin
    for values, panel_width in zip(groups, panel_widths):
        top = max(values, default=0.0) or 1.0
        for x in range(left, left + panel_width):
            rows[margin + height][3 * x:3 * x + 3] = b"\x40\x40\x40"
        for index, value in enumerate(values):
            x0 = left + gap + index * (bar + gap)
            bar_height = round(height * max(value, 0.0) / top)
            colour = bytes(PALETTE[index % len(PALETTE)])
            for y in range(margin + height - bar_height, margin + height):
                rows[y][3 * x0:3 * (x0 + bar)] = colour * bar
        left += panel_width + margin
    return width, total, rows


def encode_png(width: int, height: int, rows: Sequence[bytes | bytearray]) -> bytes:
    """An 8-bit RGB PNG of `rows` (each 3 * width bytes), with zlib and struct only."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    if len(rows) != height or any(len(r) != 3 * width for r in rows):
        msg = f"rows do not make a {width}x{height} RGB image"
        raise ValueError(msg)
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"".join(b"\x00" + bytes(r) for r in rows), 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", data) + chunk(b"IEND", b"")


def chart_legend(panels: Sequence[Panel]) -> list[str]:
    return [f"- {title}: " + ", ".join(f"{label} {value:,.0f}" for label, value in bars) for title, bars in panels]


@dataclass(frozen=True)
class Context:
    """When and where the benchmarks ran."""

    quick: bool
    started: datetime
    seconds: float
    machine: dict[str, str]
    versions: dict[str, str]


@dataclass(frozen=True)
class ChartInfo:
    """The chart written, how, and its bars."""

    path: Path
    how: str
    panels: list[Panel]


def header_section(context: Context) -> list[str]:
    quick = " (quick: small sizes, a smoke run, not figures to quote)" if context.quick else ""
    return ["# Benchmark results", "",
            f"Run by `benchmarks/report.py{' --quick' if context.quick else ''}` on {context.started:%Y-%m-%d %H:%M} "
            f"UTC, {context.seconds / 60:.1f} min in all{quick}.",
            "Timings move with the machine's other load (see the load averages): compare figures within one report.",
            "", "## Machine", "", *(f"- {k}: {v}" for k, v in context.machine.items()), "",
            "## Versions", "", ", ".join(f"{k} {v}" for k, v in context.versions.items()), ""]


def chart_section(chart: ChartInfo | None) -> list[str]:
    if chart is None:
        return []
    return ["## Chart", "", f"![throughput]({chart.path.name})", "", f"({chart.how}; bars from left to right:)", "",
            *chart_legend(chart.panels), ""]


def details_sections(runs: Sequence[BenchRun]) -> list[str]:
    """The profile and memory tables of bench_scaling and bench_memory, when they ran."""
    results = {r.bench.name: r.result for r in runs}
    lines = []
    if profile := profile_table(results.get("scaling")):
        lines += ["## Profile", "", *profile, ""]
    if memory := memory_table(results.get("memory")):
        lines += ["## Memory", "", *memory, ""]
    return lines


def commands_section(runs: Sequence[BenchRun]) -> list[str]:
    def outcome(run: BenchRun) -> str:
        return "timed out" if run.returncode is None else f"exit {run.returncode}"

    return ["## Commands", "", "From the project's root:", "", "```",
            *(f"{display_command(r.command)}    # {r.seconds:.0f} s, {outcome(r)}" for r in runs), "```", ""]


def output_section(runs: Sequence[BenchRun], tail: int = 40) -> list[str]:
    """The last lines each benchmark printed (and its stderr when it failed), folded."""
    lines = ["## Output", ""]
    for r in runs:
        err = r.stderr.strip().splitlines()[-15:] if r.error else []
        lines += [f"<details><summary>{r.bench.script}</summary>", "", "```", *r.stdout.strip().splitlines()[-tail:],
                  *(["--- stderr:", *err] if err else []), "```", "", "</details>", ""]
    return lines


def render(runs: Sequence[BenchRun], context: Context, chart: ChartInfo | None) -> str:
    """RESULTS.md's text."""
    return "\n".join([*header_section(context), "## Figures", "", *figures_table(runs), "", *chart_section(chart),
                      *details_sections(runs), *commands_section(runs), *output_section(runs)])


def load_average() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke run of every benchmark")
    parser.add_argument("--only", nargs="+", choices=[b.name for b in BENCHES], help="run only these benchmarks")
    parser.add_argument("--kafka-brokers", help="bootstrap address for bench_kafka (else its own default)")
    parser.add_argument("--keep-broker", action="store_true", help="leave a broker started for bench_kafka running")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds allowed to each benchmark")
    parser.add_argument("--out", type=Path, default=BENCH_DIR / "RESULTS.md", help="the report to write")
    parser.add_argument("--chart", type=Path, default=BENCH_DIR / "results.png", help="the chart to write")
    args = parser.parse_args()

    started, clock = datetime.now(timezone.utc), time.perf_counter()
    machine_info = machine()
    runs = []
    for bench in (b for b in BENCHES if args.only is None or b.name in args.only):
        own_broker = (bench.name in KAFKA_BENCHES and not args.kafka_brokers and not os.environ.get("KAFKA_BOOTSTRAP_SERVERS")
                      and not args.keep_broker and not kafka_running())
        runs.append(run_bench(bench, bench_command(bench, args.quick, args.kafka_brokers), args.timeout))
        if own_broker:
            stop_kafka()
    panels = chart_panels([f for r in runs for f in r.figures])
    chart = ChartInfo(args.chart, write_chart(args.chart, panels), panels) if panels else None
    machine_info["load average after"] = load_average()
    context = Context(args.quick, started, time.perf_counter() - clock, machine_info, versions())
    args.out.write_text(render(runs, context, chart) + "\n", encoding="utf-8")
    print(f"wrote {args.out}" + (f" and {chart.path} ({chart.how})" if chart else ""))


if __name__ == "__main__":
    main()
