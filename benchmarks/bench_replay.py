"""Replay pipeline throughput against Bytewax's own ceiling, and scaling to 2 processes.

    python benchmarks/bench_replay.py [--events 500000] [--repeat 3] [--only pipeline rules]

Generates the sample (seeded; cached under benchmarks/data/) and runs, each in a fresh
Python process so no case warms another:
- bare: a plain Bytewax flow that only parses (orjson) and collects the same 30 s tumbling
  windows per session with Bytewax's EventClock + TumblingWindower (wake-ups off, its fastest
  setting), writing nothing: the engine's ceiling;
- pipeline: `convoflow run --speed-factor 0` on 1 process, all four outputs written;
- pipeline x2: the same on a 2-process local cluster (spawn and imports included), threads as
  each process takes them (Polars' pool, a JSONL writer thread per output); its ratio to one process
  is shown without a target: the target figure holds each process to one compute thread over 2M
  events (bench_scaling.py);
- pipeline + patterns: 1 process with the four patterns of samples/patterns.yaml (alerts.jsonl);
- pipeline + rules: 1 process joined with a rules stream of 100 rules holding 1,000 blocked
  words and phrases (global and per-room; mask, flag and block; a few match real messages).
  Chat repeats itself and so does the sample (about 10k distinct texts in 500k messages), so
  block lists answer most texts from memory; rules-cold runs the same with that memory off,
  every text matched afresh (the figure for a feed where no text repeats).
Times are wall clock from building the flow to its end. This machine's speed drifts by up to 2x
within minutes, so the cases run in interleaved rounds (`--repeat`, default 3): each figure is the
median over rounds, each ratio the median of its rounds' ratios (shown by round too).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from bytewax.operators import KeyedStream
    from bytewax.operators.windowing import WindowOut

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The columnar-core targets (issue 19): pipeline without patterns and rules / bare Bytewax, the full
# pipeline (four patterns, 100 rules) / bare, patterns on / off, 100 rules / none. (2 processes / 1 is
# bench_scaling's.)
TARGET_RATIO = 2.5
TARGET_FULL = 1.5
TARGET_PATTERNS = 0.6
TARGET_RULES = 0.8


def session_and_time(raw: str | bytes) -> tuple[str, datetime, dict[str, Any]] | None:
    """What a bare flow reads of a line: its session (session_id, room or username), its time
    (0 without one) and its fields; None for a line it skips."""
    import orjson

    from dataflows.timestamps import TimestampError, parse_timestamp

    try:
        obj = orjson.loads(raw)
        session = obj.get("session_id") or obj.get("room") or obj["username"]
        stamp = obj.get("timestamp")
        seconds = parse_timestamp(stamp) if stamp is not None else 0.0
    except (orjson.JSONDecodeError, KeyError, AttributeError, TimestampError):
        return None
    if not isinstance(session, str):
        return None
    return session, datetime.fromtimestamp(seconds, timezone.utc), obj


def session_windows(step_id: str, keyed: KeyedStream[Any]) -> WindowOut[Any, list[Any]]:
    """Bytewax's own 30 s tumbling windows of `keyed` items `(session, (time, ...))` on event time,
    wake-ups off (its fastest setting)."""
    import bytewax.operators.windowing as win

    clock = win.EventClock(lambda e: e[1][0], wait_for_system_duration=timedelta(seconds=5), to_system_utc=lambda _: None)
    windower = win.TumblingWindower(length=timedelta(seconds=30), align_to=datetime(1970, 1, 1, tzinfo=timezone.utc))
    return win.collect_window(step_id, keyed, clock, windower)


def bare_flow_seconds(path: Path) -> dict[str, float]:
    """Bytewax alone: parse each line and collect per-session tumbling windows."""
    import bytewax.operators as op
    from bytewax.connectors.files import FileSource
    from bytewax.dataflow import Dataflow
    from bytewax.testing import TestingSink, run_main

    def parse(line: str) -> tuple[str, tuple[datetime, object, object]] | None:
        read = session_and_time(line)
        if read is None:
            return None
        session, at, obj = read
        return (session, (at, obj.get("sender"), obj.get("message")))

    flow = Dataflow("bare")
    lines = op.input("read", flow, FileSource(path, batch_size=1000))
    keyed = op.key_on("key", op.filter_map("parse", lines, parse), lambda e: e[0])
    windows = session_windows("windows", keyed)
    emitted: list[int] = []
    op.output("count", op.map("one", windows.down, lambda _: 1), TestingSink(emitted))
    start = time.perf_counter()
    run_main(flow)
    return {"seconds": time.perf_counter() - start, "windows": len(emitted), "cpu": cpu_seconds()}


def cpu_seconds() -> float:
    """CPU time of this process (all threads) and of its finished children (a cluster's processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def write_bench_rules(path: Path, rules: int = 100, words_per_rule: int = 10) -> Path:
    """`rules` blocked-words rules of `words_per_rule` terms each; most never match, a few do."""
    import orjson

    real = ["monthly fee", "premium", "account number", "date of birth", "card"]
    lines = []
    for r in range(rules):
        words = [f"w{r}x{k}" if k or r >= len(real) else real[r] for k in range(words_per_rule)]
        if r % 7 == 0:
            words[1] = f"scam link {r}"
        scope: object = "global" if r < 90 else {"room": f"s-{r:04d}"}
        action = ("mask", "flag", "block")[r % 3] if r < len(real) else "mask"
        lines.append(orjson.dumps({"id": f"bw-{r}", "kind": "blocked_words", "version": 1, "scope": scope,
                                   "body": {"words": words, "action": action}}))
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def pipeline_seconds(path: Path, processes: int, *, patterns: bool = False, rules: bool = False,
                     remember_texts: bool = True) -> dict[str, float]:
    """convoflow's replay pipeline, as `cli.py run --speed-factor 0` runs it (patterns off unless asked)."""
    import dataflows.blocklist

    if not remember_texts:
        dataflows.blocklist.MEMO_TEXT_CHARS = -1  # no text is short enough to be remembered
    from connectors.files.jsonl import prepare_out_dir
    from connectors.files.replay import first_event_time
    from connectors.run.runner import OUTPUT_FILES, ReplayRun, run_job
    from dataflows.clock import ReplayClock
    from dataflows.flow import FlowConfig
    from connectors.files.patterns_file import load_patterns
    from dataflows.sequencing import ReplayLayout

    with tempfile.TemporaryDirectory(prefix="convoflow-bench-") as scratch:  # ~300 MB of outputs per run
        out = Path(scratch) / "out"
        prepare_out_dir(out, OUTPUT_FILES, overwrite=True)
        start = time.perf_counter()
        origin = first_event_time(path) or 0.0
        defs = load_patterns(ROOT / "samples" / "patterns.yaml") if patterns else ()
        rules_path = write_bench_rules(Path(scratch) / "rules.jsonl") if rules else None
        job = ReplayRun(
            path, out, FlowConfig(layout=ReplayLayout(partitions=processes), time_origin=origin, patterns=defs,
                                  rules=rules),
            ReplayClock(origin, time.time(), 0.0), rules_path=rules_path,
        )
        run_job(job, processes=processes)
        seconds = time.perf_counter() - start
        windows = (out / "windows.jsonl").read_bytes().count(b"\n")
    return {"seconds": seconds, "windows": windows, "cpu": cpu_seconds()}


def run_case(case: str, path: Path) -> dict[str, float]:
    result = subprocess.run(
        [sys.executable, __file__, "--case", case, "--input", str(path)],
        capture_output=True, text=True, check=False, cwd=ROOT,
    )
    if result.returncode != 0:
        sys.exit(f"benchmark case {case} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def ensure_sample(events: int, data_dir: Path) -> tuple[Path, int]:
    from samples.generate import SampleSpec, sessions_for_events, write_sample

    path = data_dir / f"replay-{events}.jsonl"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        write_sample(path, SampleSpec(sessions=sessions_for_events(events)))
    with path.open("rb") as f:
        lines = sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))
    return path, lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=500_000)
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "data")
    cases = ["bare", "pipeline", "pipeline2", "patterns", "rules", "rules-cold", "full"]
    parser.add_argument("--case", choices=cases, help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="+", choices=cases,
                        help="run only these cases (ratios need their reference case too)")
    parser.add_argument("--repeat", type=int, default=3,
                        help="rounds of all cases, interleaved; figures are medians, ratios the median of each round's")
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        cases = {"bare": lambda: bare_flow_seconds(args.input), "pipeline": lambda: pipeline_seconds(args.input, 1),
                 "pipeline2": lambda: pipeline_seconds(args.input, 2),
                 "patterns": lambda: pipeline_seconds(args.input, 1, patterns=True),
                 "rules": lambda: pipeline_seconds(args.input, 1, rules=True),
                 "rules-cold": lambda: pipeline_seconds(args.input, 1, rules=True, remember_texts=False),
                 "full": lambda: pipeline_seconds(args.input, 1, patterns=True, rules=True)}
        print(json.dumps(cases[args.case]()))
        return

    path, lines = ensure_sample(args.events, args.data_dir)
    print(f"input: {path.name}, {lines:,} lines, {args.repeat} round(s)")
    chosen = args.only or cases
    rounds = [{case: run_case(case, path) for case in chosen} for _ in range(args.repeat)]
    seconds = {case: statistics.median(r[case]["seconds"] for r in rounds) for case in chosen}
    print(f"{'case':<34}{'seconds':>9}{'events/s':>11}{'windows':>10}{'CPU s':>8}")
    labels = {"bare": "bare Bytewax (parse + windows)", "pipeline": "convoflow replay, 1 process",
              "pipeline2": "convoflow replay, 2 processes", "patterns": "convoflow replay + 4 patterns",
              "rules": "convoflow replay + 100 rules", "rules-cold": "convoflow replay + rules, cold",
              "full": "convoflow replay, patterns + rules"}
    for case in chosen:
        cpu = statistics.median(r[case]["cpu"] for r in rounds)
        print(f"{labels[case]:<34}{seconds[case]:>9.2f}{lines / seconds[case]:>11,.0f}"
              f"{int(rounds[0][case]['windows']):>10,}{cpu:>8.1f}")
    for case, reference, target, what in (("pipeline", "bare", TARGET_RATIO, "pipeline / bare"),
                                          ("full", "bare", TARGET_FULL, "full pipeline (patterns, rules) / bare"),
                                          ("pipeline2", "pipeline", None, "2 processes / 1"),
                                          ("patterns", "pipeline", TARGET_PATTERNS, "with patterns / without"),
                                          ("rules", "pipeline", TARGET_RULES, "with rules / without"),
                                          ("rules-cold", "pipeline", TARGET_RULES, "with rules, cold (no text remembered) / without")):
        if case in chosen and reference in chosen:
            ratios = [r[reference]["seconds"] / r[case]["seconds"] for r in rounds]
            ratio = statistics.median(ratios)
            if target is None:
                print(f"{what}: {ratio:.2f} (no target here: see bench_scaling.py)")
            else:
                print(f"{what}: {ratio:.2f} (target >= {target}: {'met' if ratio >= target else 'MISSED'})")
            if len(rounds) > 1:
                print(f"    by round: {', '.join(f'{x:.2f}' for x in ratios)}")


if __name__ == "__main__":
    main()
