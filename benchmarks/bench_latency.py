"""Message latency of a paced replay: from an event being due to its message record being written.

    python benchmarks/bench_latency.py [--rate 2000] [--seconds 10] [--sessions 500]

Writes a conversation input of `rate` events per second of event time for `seconds`, and replays
it at speed 1 (so `rate` events/s arrive) through the whole pipeline (the four patterns on, LLM
off), in this process. The run's replay clock is built here, so each event's due wall time is
known (`ReplayClock.wall_time_for`): the replay cannot read an event before then. A thread tails
`messages.jsonl` and notes when each record appears (polled every millisecond; it parses the records
only after the run, to take as little of the pipeline's interpreter as it can). Latency = seen -
due; prints p50, p99 and max. Target (issue 19): p99 <= 100 ms without the LLM stage.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_P99_MS = 100.0
T0 = 1709542800.0  # 2024-03-04T09:00:00Z
POLL_S = 0.001


def write_input(path: Path, rate: float, seconds: float, sessions: int) -> int:
    """`rate` x `seconds` conversation lines, sessions taking turns, customer and rm alternating."""
    from dataflows.events import iso

    count = int(rate * seconds)
    lines = [
        orjson.dumps({"session_id": f"s-{i % sessions:04d}", "sender": ("customer", "rm")[(i // sessions) % 2],
                      "message": f"message {i}?", "timestamp": iso(T0 + i / rate)})
        for i in range(count)
    ]
    path.write_bytes(b"\n".join(lines) + b"\n")
    return count


class Tail(threading.Thread):
    """Notes the wall time each new line of a growing file is first seen, with its `timestamp`.

    It shares the pipeline's process (and GIL), so each poll only reads what was appended and
    notes the time; the lines are split and parsed after the run (`seen`)."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.chunks: list[tuple[float, bytes]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with self.path.open("rb") as file:
            while True:
                stopping = self.stop.is_set()
                chunk = file.read()
                if chunk:
                    self.chunks.append((time.time(), chunk))
                if stopping:
                    return
                time.sleep(POLL_S)

    @property
    def seen(self) -> list[tuple[float, str]]:
        """Per whole line, when it was first seen and its `timestamp`."""
        found: list[tuple[float, str]] = []
        partial = b""
        for now, chunk in self.chunks:
            *whole, partial = (partial + chunk).split(b"\n")
            found += [(now, orjson.loads(line)["timestamp"]) for line in whole]
        return found


def main() -> None:
    from connectors.files.jsonl import prepare_out_dir
    from connectors.files.patterns_file import load_patterns
    from connectors.run.runner import OUTPUT_FILES, ReplayRun, run_job
    from dataflows.clock import ReplayClock
    from dataflows.flow import FlowConfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=2000.0, help="events per second")
    parser.add_argument("--seconds", type=float, default=10.0, help="seconds of input")
    parser.add_argument("--sessions", type=int, default=500)
    parser.add_argument("--no-patterns", action="store_true", help="run without the four patterns")
    parser.add_argument("--shards", type=int, default=FlowConfig.shards, help="the flow's shards (default: its own)")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="convoflow-latency-") as scratch:
        source, out = Path(scratch) / "input.jsonl", Path(scratch) / "out"
        count = write_input(source, args.rate, args.seconds, args.sessions)
        prepare_out_dir(out, OUTPUT_FILES, overwrite=True)
        tail = Tail(out / "messages.jsonl")
        tail.start()
        clock = ReplayClock(T0, time.time() + 1.0, 1.0)  # a second to start Bytewax before the first is due
        patterns = () if args.no_patterns else load_patterns(ROOT / "samples" / "patterns.yaml")
        job = ReplayRun(source, out, FlowConfig(time_origin=T0, patterns=patterns, shards=args.shards), clock)
        run_job(job, processes=1)
        tail.stop.set()
        tail.join()
    latencies = sorted((seen - clock.wall_time_for(datetime.fromisoformat(stamp).timestamp())) * 1000
                       for seen, stamp in tail.seen)
    if len(latencies) != count:
        sys.exit(f"saw {len(latencies):,} message records of {count:,} events")
    p50 = statistics.quantiles(latencies, n=100)[49]
    p99 = statistics.quantiles(latencies, n=100)[98]
    patterns = "no patterns" if args.no_patterns else "four patterns"
    print(f"paced replay, {args.rate:,.0f} events/s for {args.seconds:g} s, 1 process, {args.shards} shards, "
          f"{patterns}, LLM off")
    print(f"message latency (due -> written): p50 {p50:.1f} ms, p99 {p99:.1f} ms, max {latencies[-1]:.1f} ms "
          f"over {count:,} messages")
    print(f"p99 latency: {p99:.1f} ms (target <= {TARGET_P99_MS:g}: {'met' if p99 <= TARGET_P99_MS else 'MISSED'})")


if __name__ == "__main__":
    main()
