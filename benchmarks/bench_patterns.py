"""The pattern engine alone: microseconds per event, and a digest of the alerts it raised.

    python benchmarks/bench_patterns.py [--events 200000] [--repeat 3] [--patterns FILE]

Parses the seeded sample (cached under benchmarks/data/) once, then feeds its events to
`PatternBook`s sharded as the flow shards them (64 shards; a chat event whose user hashes to
another shard than its room also goes there, scoped, see `flow.chat_shards`), each at the replay
clock the flow gives it, a source batch of `--batch` events at a time, advancing every book to the
clock after the batch: it raises the flow's alerts (`cli.py run` on the same file). No Bytewax,
no outputs: far steadier and quicker than the replay benchmark, for working on the engine. The
digest covers every alert record, so a change that keeps it kept the alerts. Each round builds
fresh books; the best and median rounds are printed.
"""

from __future__ import annotations

import argparse
import hashlib
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.bench_replay import ensure_sample  # noqa: E402  (after the path is set)

from connectors.files.patterns_file import load_patterns  # noqa: E402
from dataflows.events import Event, LineRef  # noqa: E402
from dataflows.flow import FlowConfig, chat_shards, shard_of  # noqa: E402
from dataflows.parse import parse_line  # noqa: E402
from dataflows.patterns.definitions import PatternDef  # noqa: E402
from dataflows.patterns.alerts import Alert  # noqa: E402
from dataflows.patterns.engine import PatternBook  # noqa: E402
from dataflows.sequencing import later  # noqa: E402


def accepted_events(path: Path) -> list[Event]:
    """The sample's accepted events, in file order, with their byte offsets (dead letters left out)."""
    events = []
    offset = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            event = parse_line(raw.rstrip(b"\n"), LineRef(path.name, number, offset))
            offset += len(raw)
            if isinstance(event, Event):
                events.append(event)
    return events


def run_books(events: Sequence[Event], patterns: tuple[PatternDef, ...], batch: int,
              config: FlowConfig = FlowConfig()) -> list[Alert]:
    """Every alert of `patterns` over `events`, sharded, scoped, timed and batched as the flow would.

    Each event arrives at the replay clock the flow's sequencer gives it (the latest time of all
    earlier events); an untimed event takes that clock's time (the first event's, before any).
    """
    ooo = config.window.out_of_orderness
    origin = next((e.time for e in events if e.time is not None), 0.0)
    books: dict[str, PatternBook] = {}
    alerts: list[Alert] = []
    clock: float | None = None

    for start in range(0, len(events), batch):
        for event in events[start:start + batch]:
            if event.time is None:
                event = event.timed(origin if clock is None else clock)
            targets = (chat_shards(event, config.shards) if event.shape == "chat"
                       else ((shard_of(event.session_id, config.shards), "all"),))
            for shard, scope in targets:
                book = books.get(shard)
                if book is None:
                    book = books[shard] = PatternBook(patterns, ooo)
                book.add(event, clock, scope=scope)
            clock = later(clock, event.time)
        for book in books.values():
            alerts.extend(book.advance(clock))
    for book in books.values():
        alerts.extend(book.flush())
    return alerts


def digest(alerts: Sequence[Alert]) -> str:
    """A short hash of every alert record, in a fixed order."""
    import orjson

    lines = sorted(orjson.dumps(a.as_record(), option=orjson.OPT_SORT_KEYS) for a in alerts)
    return hashlib.sha256(b"\n".join(lines)).hexdigest()[:12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="sample size in lines (about)")
    parser.add_argument("--input", type=Path, help="a JSONL file instead of the generated sample")
    parser.add_argument("--patterns", type=Path, default=ROOT / "samples" / "patterns.yaml")
    parser.add_argument("--repeat", type=int, default=3, help="rounds, each with fresh books")
    parser.add_argument("--batch", type=int, default=1000, help="events per source batch")
    parser.add_argument("--data-dir", type=Path, default=ROOT / "benchmarks" / "data", help="where samples are cached")
    args = parser.parse_args()
    path = args.input or ensure_sample(args.events, args.data_dir)[0]
    events = accepted_events(path)
    patterns = load_patterns(args.patterns)
    rounds = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        alerts = run_books(events, patterns, args.batch)
        rounds.append((time.perf_counter() - start) / len(events) * 1e6)
    print(f"input: {path.name}, {len(events):,} events, {len(patterns)} patterns, {args.repeat} round(s)")
    print(f"us/event: best {min(rounds):.2f}, median {statistics.median(rounds):.2f} "
          f"(rounds {', '.join(f'{r:.2f}' for r in rounds)})")
    print(f"alerts: {len(alerts):,}, digest {digest(alerts)}")


if __name__ == "__main__":
    main()
