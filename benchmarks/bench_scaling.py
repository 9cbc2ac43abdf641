"""Replay throughput by processes and workers, and where one worker's time goes.

    python benchmarks/bench_scaling.py [--events 1000000] [--repeat 1] [--skip-profile]

Runs the replay pipeline as `cli.py run --speed-factor 0 --quiet --no-patterns` runs it (ReplayRun and
run_job, as bench_replay does: all outputs written to a scratch folder, no live-view tallies), each case
in a fresh Python process, on the seeded sample (cached under benchmarks/data/):
1 process x 1 worker, 2 processes x 1 worker (a local cluster, spawn included), 1 process x 2 workers,
and two separate 1 x 1 runs at once (what two busy cores give this workload with no cluster at all).
Events/s are input lines over the wall time from building the job to its end; CPU s are the case's
whole processes' (start-up included), which other work on the machine does not inflate. With
`--repeat N` the cases run N times, interleaved; medians are reported and each round's ratio.
Each process is held to one compute thread: one Polars thread (`POLARS_MAX_THREADS=1`) and its JSONL
encoded and written by the worker itself (`writer_threads=False`). Target: 2 processes >= 1.6 x one. Also shown: the ceiling that ratio could reach on idle cores, from
the CPU seconds alone (see `cpu_bound`).

Then, unless `--skip-profile`, py-spy samples a 1-process run with the four patterns and a stream of
100 rules (`--profile-events` lines) and sums the worker thread's samples by stage: each goes to the
stage of its innermost frame in the project's code (STAGE_RULES). Sequencing is routing to shards and
the reorder buffer; engine is Bytewax between the steps; snapshots the per-epoch pickles of shard
state. The last line is `RESULT {json}`.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_SCALING = 1.6
CASES: dict[str, tuple[int, int]] = {"1p1w": (1, 1), "2p1w": (2, 1), "1p2w": (1, 2)}
SIDE_BY_SIDE = "2x1p1w"
ONE_THREAD = {**os.environ, "POLARS_MAX_THREADS": "1"}
"""Every case's environment: each process holds one compute thread, as a process per machine of a
cluster would (issue 19), so the ratio is the flow's scaling, not Polars' threads (nor the JSONL
writer threads: `pipeline_seconds` turns them off)."""
"""Two separate 1 x 1 runs of the whole file at once: no cluster, nothing exchanged. Their joint
events/s over one run's is what two busy cores give this workload on this machine, the most a
2-process cluster could reach."""
LABELS = {"1p1w": "1 process x 1 worker", "2p1w": "2 processes x 1 worker", "1p2w": "1 process x 2 workers",
          SIDE_BY_SIDE: "2 separate 1 x 1 runs at once"}
STAGES = ("parsing", "sequencing", "rules", "patterns", "windows", "sinks", "snapshots", "engine", "other")
STARTUP = "startup"
OUTSIDE = "outside"
WORKER_FRAME = re.compile(r"^_run_process \(.*connectors/run/runner\.py:\d+\)$")
"""The frame that runs the flow (Bytewax's run_main) on the worker's thread."""

STAGE_RULES: tuple[tuple[str, str, str], ...] = (
    (r"dataflows/flow\.py", r"ShardLogic\.snapshot", "snapshots"),
    (r"dataflows/flow\.py", r"_judge|_allowed|ShardLogic\._take_rules|ShardLogic\._switched_on", "rules"),
    (r"dataflows/flow\.py", r"ShardLogic\._(process|advance)|ShardLogic\.on_eof", "windows"),
    (r"dataflows/flow\.py", r"ShardLogic\._batches|apply", "sinks"),
    (r"dataflows/flow\.py", r".*", "sequencing"),
    (r"dataflows/events\.py", r".*as_record|.*as_window_message|iso|_second", "sinks"),
    (r"dataflows/(events|parse|parse_block|timestamps)\.py|connectors/files/replay\.py", r".*", "parsing"),
    (r"dataflows/(sequencing|live)\.py", r".*", "sequencing"),
    (r"dataflows/(rules|rules_gate|judging|blocklist)\.py|connectors/files/rules_file\.py", r".*", "rules"),
    (r"dataflows/patterns/", r".*", "patterns"),
    (r"dataflows/(windows|window_frames)\.py", r".*", "windows"),
    (r"connectors/(files/jsonl|view/progress|by_kind|lake/|kafka/outputs)", r".*", "sinks"),
    (r"connectors/", r".*", "engine"),
    (r"(^|/)bytewax/", r".*", "engine"),
)
"""(file pattern, function pattern, stage), tried in order on each frame from the innermost out."""

_FRAME = re.compile(r"^(?P<function>.*) \((?P<file>.*):(?P<line>\d+)\)$")
_COMPILED = tuple((re.compile(f), re.compile(rf"(?:^|\.)(?:{g})$"), stage) for f, g, stage in STAGE_RULES)


@dataclass(frozen=True)
class Profile:
    """Samples of the worker by stage; `startup` (importing) and `outside` (other threads, the
    harness) are left out of the stages."""

    by_stage: dict[str, int]
    startup: int = 0
    outside: int = 0

    @property
    def total(self) -> int:
        return sum(self.by_stage.values())

    def percent(self) -> dict[str, float]:
        total = self.total or 1
        return {stage: 100 * self.by_stage.get(stage, 0) / total for stage in STAGES}


def frame_stage(frame: str) -> str | None:
    """The stage of one py-spy frame (`function (file:line)`), or None for code outside the mapping."""
    match = _FRAME.match(frame)
    if match is None:
        return None
    for file_re, function_re, stage in _COMPILED:
        if file_re.search(match["file"]) and function_re.search(match["function"]):
            return stage
    return None


def stack_stage(frames: list[str]) -> str:
    """The stage of one sampled stack (outermost frame first).

    Importing is STARTUP; a stack that does not run the flow (no WORKER_FRAME) is OUTSIDE; else the
    stage of its innermost mapped frame, "other" if none is.
    """
    if any("importlib._bootstrap" in f for f in frames):
        return STARTUP
    if not any(WORKER_FRAME.match(f) for f in frames):
        return OUTSIDE
    for frame in reversed(frames):
        stage = frame_stage(frame)
        if stage is not None:
            return stage
    return "other"


def aggregate(raw: Iterable[str]) -> Profile:
    """Sum py-spy `--format raw` lines (`frame;frame;... count`) by stage."""
    counts: Counter[str] = Counter()
    for line in raw:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        counts[stack_stage(stack.split(";"))] += int(count)
    startup, outside = counts.pop(STARTUP, 0), counts.pop(OUTSIDE, 0)
    return Profile(dict(counts), startup, outside)


def pipeline_seconds(path: Path, processes: int, workers: int, *, patterns: bool = False,
                     rules: bool = False) -> dict[str, float]:
    """The replay pipeline on `processes` x `workers`, from building the job to its end."""
    from connectors.files.jsonl import prepare_out_dir
    from connectors.files.patterns_file import load_patterns
    from connectors.files.replay import first_event_time
    from connectors.run.runner import OUTPUT_FILES, ReplayRun, run_job
    from dataflows.clock import ReplayClock
    from dataflows.flow import FlowConfig
    from dataflows.sequencing import ReplayLayout

    with tempfile.TemporaryDirectory(prefix="convoflow-scaling-") as scratch:
        out = Path(scratch) / "out"
        prepare_out_dir(out, OUTPUT_FILES, overwrite=True)
        start = time.perf_counter()
        origin = first_event_time(path) or 0.0
        defs = load_patterns(ROOT / "samples" / "patterns.yaml") if patterns else ()
        rules_path = bench_replay().write_bench_rules(Path(scratch) / "rules.jsonl") if rules else None
        config = FlowConfig(layout=ReplayLayout(partitions=processes * workers), time_origin=origin, patterns=defs,
                            rules=rules)
        job = ReplayRun(path, out, config, ReplayClock(origin, time.time(), 0.0), rules_path=rules_path,
                        writer_threads=False)
        run_job(job, processes, workers)
        seconds = time.perf_counter() - start
        windows = (out / "windows.jsonl").read_bytes().count(b"\n")
    return {"seconds": seconds, "windows": windows}


def case_command(case: str, path: Path) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--case", case, "--input", str(path)]


def children_cpu() -> float:
    """CPU seconds of this process's finished children (and theirs: a cluster's spawned processes)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_case(case: str, path: Path) -> dict[str, float]:
    """One case in a fresh process (SIDE_BY_SIDE: two 1 x 1 processes started together): its JSON result
    (last stdout line; SIDE_BY_SIDE: the slower run's, with `runs` 2) and the CPU seconds it took."""
    before = children_cpu()
    runs = 2 if case == SIDE_BY_SIDE else 1
    command = case_command("1p1w" if case == SIDE_BY_SIDE else case, path)
    procs = [subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env=ONE_THREAD) for _ in range(runs)]
    results = []
    for proc in procs:
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            for other in procs:
                other.kill()
            sys.exit(f"benchmark case {case} failed:\n{stderr[-3000:]}")
        results.append(json.loads(stdout.strip().splitlines()[-1]))
    slowest = max(results, key=lambda r: r["seconds"])
    return {**slowest, "runs": runs, "cpu": children_cpu() - before}


def profile_run(path: Path, rate: int) -> Profile | str:
    """py-spy on a 1-process run with patterns and rules; the Profile, or why there is none."""
    spy = Path(sys.executable).parent / "py-spy"
    with tempfile.TemporaryDirectory(prefix="convoflow-spy-") as scratch:
        raw = Path(scratch) / "profile.txt"
        command = [str(spy), "record", "--format", "raw", "--rate", str(rate), "--output", str(raw), "--",
                   *case_command("profile", path)]
        try:
            result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
        except OSError as exc:
            return f"py-spy could not start: {exc}"
        if result.returncode != 0 or not raw.exists():
            return f"py-spy failed ({result.returncode}): {result.stderr.strip()[-500:]}"
        with raw.open() as lines:
            return aggregate(lines)


def bench_replay() -> Any:
    """benchmarks/bench_replay.py, for its sample and rules helpers; imported at run time so that type
    checks of this file do not follow into it."""
    return importlib.import_module("benchmarks.bench_replay")


def ensure_input(events: int, data_dir: Path) -> tuple[Path, int]:
    """The cached seeded sample of about `events` lines (bench_replay's), and its line count."""
    path, lines = bench_replay().ensure_sample(events, data_dir)
    return Path(path), int(lines)


def rounds_summary(rounds: list[dict[str, dict[str, float]]], lines: int, cores: int) -> dict[str, Any]:
    """Median events/s and CPU seconds per case, per-round ratios to 1 x 1, and the CPU-bound ceiling
    of 2 processes / 1 (see `cpu_bound`)."""
    rates = {case: [r[case].get("runs", 1) * lines / r[case]["seconds"] for r in rounds] for case in rounds[0]}
    median = {case: statistics.median(values) for case, values in rates.items()}
    cpu = {case: statistics.median(r[case]["cpu"] for r in rounds) for case in rounds[0]}
    ratios: dict[str, list[float]] = {}
    if "1p1w" in rates:
        for case in (c for c in rates if c != "1p1w"):
            ratios[case] = [mine / one for mine, one in zip(rates[case], rates["1p1w"])]
    summary = {"rates": rates, "median": median, "cpu": cpu, "ratios": ratios,
               "ratio_median": {case: statistics.median(v) for case, v in ratios.items()}}
    if "1p1w" in cpu and "2p1w" in cpu:
        summary["cpu_bound_2p1w"] = cpu_bound(cpu["1p1w"], cpu["2p1w"], min(2, cores))
    if "2p1w" in rates and SIDE_BY_SIDE in rates:
        shares = [cluster / apart for cluster, apart in zip(rates["2p1w"], rates[SIDE_BY_SIDE])]
        summary["cluster_share"] = {"rounds": shares, "median": statistics.median(shares)}
    return summary


def cpu_bound(one_cpu: float, many_cpu: float, parallel: int) -> float:
    """The highest speed-up over one process that `parallel` processes could reach on otherwise idle cores:
    one process's CPU seconds over the cluster's, spread evenly over `parallel` cores. It does not
    depend on what else the machine runs (CPU time is counted, not wall time)."""
    return parallel * one_cpu / many_cpu


def print_scaling(summary: dict[str, Any], rounds: list[dict[str, dict[str, float]]]) -> None:
    print(f"{'case':<32}{'median s':>10}{'events/s':>11}{'CPU s':>8}  events/s by round")
    for case, rate in summary["median"].items():
        seconds = statistics.median(r[case]["seconds"] for r in rounds)
        shown = ", ".join(f"{x:,.0f}" for x in summary["rates"][case])
        print(f"{LABELS[case]:<32}{seconds:>10.2f}{rate:>11,.0f}{summary['cpu'][case]:>8.1f}  {shown}")
    for case, values in summary["ratios"].items():
        ratio = summary["ratio_median"][case]
        shown = ", ".join(f"{x:.2f}" for x in values)
        target = f" (target >= {TARGET_SCALING}: {'met' if ratio >= TARGET_SCALING else 'MISSED'})" if case == "2p1w" else ""
        print(f"{LABELS[case]} / 1 x 1: {ratio:.2f}, by round {shown}{target}")
    if "cpu_bound_2p1w" in summary:
        print(f"CPU-bound ceiling of 2 processes / 1 on idle cores (CPU s of 1 x 1 over those of 2 x 1, x 2): "
              f"{summary['cpu_bound_2p1w']:.2f}")
    if "cluster_share" in summary:
        share = summary["cluster_share"]
        print(f"2 processes reach {share['median']:.2f} of the events/s of 2 separate runs at once "
              f"(by round {', '.join(f'{x:.2f}' for x in share['rounds'])})")


def print_profile(profile: Profile, events: int) -> None:
    print(f"\nwhere one worker's time goes (py-spy, 1 process, patterns + 100 rules, {events:,} lines):")
    print(f"{'stage':<14}{'samples':>9}{'%':>7}")
    for stage, pct in profile.percent().items():
        print(f"{stage:<14}{profile.by_stage.get(stage, 0):>9}{pct:>7.1f}")
    print(f"(not counted above: {profile.startup} samples importing modules, {profile.outside} outside the worker)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=1_000_000, help="sample size in lines (about)")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all cases, interleaved")
    parser.add_argument("--only", nargs="+", choices=[*CASES, SIDE_BY_SIDE], default=[*CASES, SIDE_BY_SIDE],
                        help="run only these cases")
    parser.add_argument("--skip-profile", action="store_true", help="no py-spy profile")
    parser.add_argument("--profile-events", type=int, default=200_000, help="sample size of the profiled run")
    parser.add_argument("--profile-rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "data", help="where samples are cached")
    parser.add_argument("--case", choices=[*CASES, "profile"], help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case == "profile":
        print(json.dumps(pipeline_seconds(args.input, 1, 1, patterns=True, rules=True)))
        return
    if args.case:
        print(json.dumps(pipeline_seconds(args.input, *CASES[args.case])))
        return

    path, lines = ensure_input(args.events, args.data_dir)
    print(f"input: {path.name}, {lines:,} lines; {args.repeat} round(s)")
    rounds = [{case: run_case(case, path) for case in args.only} for _ in range(args.repeat)]
    summary = rounds_summary(rounds, lines, os.cpu_count() or 1)
    print_scaling(summary, rounds)
    result: dict[str, Any] = {"bench": "scaling", "events": lines, "target": TARGET_SCALING, **summary}
    if "2p1w" in summary["ratio_median"]:
        result["met"] = summary["ratio_median"]["2p1w"] >= TARGET_SCALING
    if not args.skip_profile:
        profile_path, profile_lines = ensure_input(args.profile_events, args.data_dir)
        profile = profile_run(profile_path, args.profile_rate)
        if isinstance(profile, Profile):
            print_profile(profile, profile_lines)
            result["profile"] = {"events": profile_lines, "samples": profile.total, "percent": profile.percent()}
        else:
            print(f"\nno profile: {profile}")
            result["profile_error"] = profile
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
