"""The pattern engine benchmark: sharded like the flow, and its digest pins the alerts."""

from __future__ import annotations

from pathlib import Path

from benchmarks import bench_patterns
from connectors.files.patterns_file import load_patterns
from dataflows.flow import FlowConfig

SAMPLES = Path(__file__).parent.parent.parent / "samples"


def test_sharded_books_raise_what_one_book_raises_however_the_events_are_batched() -> None:
    """Sessions and chat users each live in one shard, and lateness is judged by the replay clock,
    so neither sharding nor source batches change an alert."""
    events = bench_patterns.accepted_events(SAMPLES / "conversations.jsonl")
    patterns = load_patterns(SAMPLES / "patterns.yaml")
    sharded = bench_patterns.run_books(events, patterns, batch=50)
    whole = bench_patterns.run_books(events, patterns, batch=len(events), config=FlowConfig(shards=1))
    assert sharded, "the sample should match something"
    assert bench_patterns.digest(sharded) == bench_patterns.digest(whole)
    assert bench_patterns.digest(bench_patterns.run_books(events, patterns, batch=7)) == bench_patterns.digest(sharded)
