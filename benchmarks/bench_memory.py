"""Peak resident memory of a replay by the number of distinct sessions: state must stay bounded.

    python benchmarks/bench_memory.py [--sessions 10000 200000] [--max-growth 1.5]

For each count, writes (cached under benchmarks/data/) a conversation-shaped input of that many
sessions with 3-5 messages each: sessions start one every `--arrival-gap` seconds of event time and
last at most a minute or two, so only a few hundred are open at once however many there are. Then it
replays it, in a fresh Python process, as `cli.py run --speed-factor 0 --quiet` does (1 process, the
four patterns of samples/patterns.yaml on, all outputs written to a scratch folder) and reports:
- baseline: resident memory after imports and before the run;
- peak: the process's maximum resident set size (getrusage ru_maxrss, or the highest sample if higher);
- by quarter: the highest resident memory sampled (/proc/self/status) in each quarter of the run,
  flat when closed windows and finished pattern state are freed.
Target: peak with the most sessions <= `--max-growth` x peak with the fewest. The last line is
`RESULT {json}`.
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

T0 = 1_709_542_800  # 2024-03-04T09:00:00Z
DEFAULT_MAX_GROWTH = 1.5
QUESTIONS = ("Can you unblock my card today?", "What is the fee for a wire transfer?", "When will my loan be decided?")
ANSWERS = ("I have lifted the block.", "The fee is 25 USD.", "You should hear back by Friday.")
CLOSINGS = ("thanks, that helps", "ok", "Great, thank you.")

Line = tuple[float, int, str]


def session_lines(rng: random.Random, number: int, start: float) -> list[Line]:
    """One session's 3-5 messages as (time, order, JSON line): the customer asks, the RM answers, the
    customer asks again or closes; a last answer left unanswered fires `conversation_completion`."""
    session = f"m-{number:07d}"
    count = rng.randint(3, 5)
    lines: list[Line] = []
    at = start
    for index in range(count):
        sender = "customer" if index % 2 == 0 else "rm"
        if index == 0:
            text = rng.choice(QUESTIONS)
        elif sender == "rm":
            text = rng.choice(ANSWERS)
        else:
            text = rng.choice(QUESTIONS + CLOSINGS)
        record = {"session_id": session, "sender": sender, "message": text, "timestamp": round(at, 3)}
        lines.append((at, number * 8 + index, json.dumps(record)))
        at += rng.uniform(2.0, 25.0)
    return lines


def generate_lines(sessions: int, arrival_gap: float, seed: int) -> Iterator[str]:
    """Every session's lines in time order, holding only the sessions still running."""
    rng = random.Random(seed)
    pending: list[Line] = []
    for number in range(sessions):
        start = T0 + number * arrival_gap
        while pending and pending[0][0] < start:
            yield heapq.heappop(pending)[2]
        for line in session_lines(rng, number, start):
            heapq.heappush(pending, line)
    while pending:
        yield heapq.heappop(pending)[2]


def ensure_input(sessions: int, arrival_gap: float, seed: int, data_dir: Path) -> tuple[Path, int]:
    """The cached input for `sessions`, and its line count."""
    path = data_dir / f"sessions-{sessions}-gap{arrival_gap:g}-seed{seed}.jsonl"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(".partial")
        with partial.open("w", encoding="utf-8") as out:
            for line in generate_lines(sessions, arrival_gap, seed):
                out.write(line + "\n")
        partial.replace(path)
    return path, count_lines(path)


def count_lines(path: Path) -> int:
    """Lines in `path`, read 1 MiB at a time."""
    with path.open("rb") as f:
        return sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 20), b""))


def current_rss_kib() -> int:
    """This process's resident set size now, in KiB (VmRSS)."""
    with open("/proc/self/status", encoding="ascii") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


class RssSampler:
    """Samples this process's RSS every `interval` seconds on a side thread."""

    def __init__(self, interval: float = 0.2) -> None:
        self.interval = interval
        self.samples: list[tuple[float, int]] = []
        self.started = self.ended = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="rss-sampler")

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.perf_counter(), current_rss_kib()))

    def __enter__(self) -> RssSampler:
        self.started = time.perf_counter()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.ended = time.perf_counter()

    def quarters(self) -> list[int]:
        """The highest RSS sampled in each quarter of the run (0 for a quarter with no sample)."""
        span = max(self.ended - self.started, 1e-9)
        peaks = [0, 0, 0, 0]
        for at, rss in self.samples:
            quarter = min(3, int(4 * (at - self.started) / span))
            peaks[quarter] = max(peaks[quarter], rss)
        return peaks


def replay(path: Path) -> dict[str, Any]:
    """Run the replay pipeline (1 process, patterns on) on `path`; memory and time figures."""
    from connectors.files.jsonl import prepare_out_dir
    from connectors.files.patterns_file import load_patterns
    from connectors.files.replay import first_event_time
    from connectors.run.runner import OUTPUT_FILES, ReplayRun, run_job
    from dataflows.clock import ReplayClock
    from dataflows.flow import FlowConfig

    with tempfile.TemporaryDirectory(prefix="convoflow-memory-") as scratch:
        out = Path(scratch) / "out"
        prepare_out_dir(out, OUTPUT_FILES, overwrite=True)
        origin = first_event_time(path) or 0.0
        patterns = load_patterns(ROOT / "samples" / "patterns.yaml")
        job = ReplayRun(path, out, FlowConfig(time_origin=origin, patterns=patterns),
                        ReplayClock(origin, time.time(), 0.0))
        baseline = current_rss_kib()
        with RssSampler() as sampler:
            run_job(job)
        peak = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, *sampler.quarters())
        windows, alerts = count_lines(out / "windows.jsonl"), count_lines(out / "alerts.jsonl")
    return {"seconds": sampler.ended - sampler.started, "baseline_kib": baseline, "peak_kib": peak,
            "quarters_kib": sampler.quarters(), "windows": windows, "alerts": alerts}


def run_case(path: Path) -> dict[str, Any]:
    """`replay` in a fresh process; its last stdout line is the JSON result."""
    command = [sys.executable, str(Path(__file__).resolve()), "--case", "--input", str(path)]
    result = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if result.returncode != 0:
        sys.exit(f"memory case on {path.name} failed:\n{result.stderr[-3000:]}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def mib(kib: float) -> float:
    return kib / 1024


def summarise(cases: list[dict[str, Any]], max_growth: float) -> dict[str, Any]:
    """Growth of peak RSS from the fewest sessions to the most, and the marginal bytes per session."""
    first, last = cases[0], cases[-1]
    growth = last["peak_kib"] / first["peak_kib"]
    extra = last["sessions"] - first["sessions"]
    marginal = 1024 * (last["peak_kib"] - first["peak_kib"]) / extra if extra else 0.0
    return {"growth": growth, "marginal_bytes_per_session": marginal, "target": max_growth,
            "met": growth <= max_growth}


def print_table(cases: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    print(f"{'sessions':>9}{'events':>10}{'seconds':>9}{'base MiB':>10}{'peak MiB':>10}{'B/session':>11}"
          f"  {'by quarter (MiB)':<24}{'windows':>9}{'alerts':>8}")
    for c in cases:
        quarters = " ".join(f"{mib(q):.0f}" if q else "-" for q in c["quarters_kib"])
        print(f"{c['sessions']:>9,}{c['events']:>10,}{c['seconds']:>9.1f}{mib(c['baseline_kib']):>10.1f}"
              f"{mib(c['peak_kib']):>10.1f}{1024 * c['peak_kib'] / c['sessions']:>11,.0f}  {quarters:<24}"
              f"{c['windows']:>9,}{c['alerts']:>8,}")
    verdict = "met" if summary["met"] else "MISSED"
    print(f"peak RSS {cases[-1]['sessions']:,} / {cases[0]['sessions']:,} sessions: {summary['growth']:.2f}x "
          f"(target <= {summary['target']}: {verdict}); "
          f"marginal {summary['marginal_bytes_per_session']:,.0f} bytes per extra session")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, nargs="+", default=[10_000, 200_000],
                        help="distinct session counts to compare")
    parser.add_argument("--arrival-gap", type=float, default=0.5, help="event-time seconds between session starts")
    parser.add_argument("--max-growth", type=float, default=DEFAULT_MAX_GROWTH,
                        help="target: peak RSS at the most sessions over the peak at the fewest")
    parser.add_argument("--seed", type=int, default=11, help="seed of the generated inputs")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "data", help="where inputs are cached")
    parser.add_argument("--case", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--input", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        print(json.dumps(replay(args.input)))
        return

    cases = []
    for sessions in sorted(args.sessions):
        path, events = ensure_input(sessions, args.arrival_gap, args.seed, args.data_dir)
        cases.append({"sessions": sessions, "events": events, **run_case(path)})
    summary = summarise(cases, args.max_growth)
    print_table(cases, summary)
    print("RESULT " + json.dumps({"bench": "memory", "cases": cases, **summary}))


if __name__ == "__main__":
    main()
