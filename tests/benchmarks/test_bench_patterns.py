"""The pattern engine benchmark: sharded like the flow, and its digest pins the alerts."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_patterns
from connectors.pattern_files import load_patterns
from dataflows.patterns.engine import PatternBook

SAMPLES = Path(__file__).parent.parent.parent / "samples"


def test_sharded_books_raise_what_one_book_raises_and_the_digest_is_stable() -> None:
    """Sessions and chat users each live in one shard, so sharding changes no alert."""
    events = bench_patterns.timed_events(SAMPLES / "conversations.jsonl")
    patterns = load_patterns(SAMPLES / "patterns.yaml")
    sharded = bench_patterns.run_books(events, patterns, batch=50)
    one = PatternBook(patterns, 5.0)
    for event in events:
        one.add(event, event.time)
    whole = one.flush()
    assert sharded, "the sample should match something"
    assert bench_patterns.digest(sharded) == bench_patterns.digest(whole)
    assert bench_patterns.digest(bench_patterns.run_books(events, patterns, batch=7)) == bench_patterns.digest(sharded)
