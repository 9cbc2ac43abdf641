"""Shared factories: events as dicts with overridable defaults, and JSONL helpers."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from bytewax.dataflow import Dataflow
from bytewax.testing import TestingSink, cluster_main, run_main
from hypothesis import settings

from dataflows.events import DeadLetter, LineRef
from dataflows.flow import FlowOutput, OutputKind
from dataflows.parse import RAW_EXCERPT_CHARS, REASON_CHARS

pytest_plugins = ["tests.kafka_broker"]

Records = dict[str, list[dict[str, Any]]]
"""A flow's records by output kind."""


class FakeClock:
    """A monotonic clock for tests: it reads `now`, which the test moves."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

# Per-example deadlines measure the machine, not the code: a cold 2-core CI box trips them.
settings.register_profile("convoflow", deadline=None)
settings.load_profile("convoflow")


@pytest.fixture
def conversation() -> Callable[..., dict[str, Any]]:
    def make(**overrides: Any) -> dict[str, Any]:
        event = {"session_id": "s-1", "sender": "customer", "message": "hi", "timestamp": "2024-01-01T10:00:00+00:00"}
        event.update(overrides)
        return {k: v for k, v in event.items() if v is not ...}

    return make


@pytest.fixture
def chat() -> Callable[..., dict[str, Any]]:
    def make(**overrides: Any) -> dict[str, Any]:
        event = {"username": "alice", "text": "Hello", "type": "USER_MESSAGE", "preferredLanguage": "es", "timestamp": 1704103200}
        event.update(overrides)
        return {k: v for k, v in event.items() if v is not ...}

    return make


def jsonl(*events: dict[str, Any] | str) -> list[str]:
    """Events as JSONL lines; strings are taken as already-raw lines."""
    return [e if isinstance(e, str) else orjson.dumps(e).decode() for e in events]


def run_by_kind(build: Callable[[FlowOutput], Dataflow], workers: int = 1) -> Records:
    """Run the flow `build` makes around one in-memory output; return its records by output kind."""
    out: list[tuple[str, list[dict[str, Any]]]] = []
    flow = build(FlowOutput("test", TestingSink(out)))
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    by_kind: Records = {k.value: [] for k in OutputKind}
    for kind, records in out:
        by_kind[kind].extend(records)
    return by_kind


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL output file."""
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def jsonl_counts(out_dir: Path) -> dict[str, Counter[bytes]]:
    """Every JSONL output file of `out_dir`, as its lines with their counts: two runs compared this
    way agree when they wrote the same records, in any order, each as many times."""
    return {p.name: Counter(p.read_bytes().splitlines()) for p in sorted(out_dir.glob("*.jsonl"))}


def check_dead_letter(result: object, ref: LineRef, step: str, *fragments: str) -> DeadLetter:
    """`result` is a dead letter of the line at `ref`, from `step`, within the size bounds, whose reason
    contains one of `fragments` ("" for any)."""
    assert isinstance(result, DeadLetter), f"accepted: {result}"
    assert result.ref == ref and result.step == step
    assert result.reason and len(result.reason) <= REASON_CHARS
    assert len(result.raw) <= RAW_EXCERPT_CHARS
    assert any(f in result.reason for f in fragments), result.reason
    return result
