"""The job runner: how a flow is run on this process or a cluster."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import pytest

from connectors.jsonl import prepare_out_dir
from connectors.runner import CLUSTER_SWITCH_INTERVAL, OUTPUT_FILES, Cluster, ReplayRun, free_addresses, run_job
from dataflows.clock import ReplayClock
from dataflows.flow import FlowConfig

LINES = [
    '{"session_id": "s-1", "sender": "customer", "message": "Hi?", "timestamp": "2024-03-04T09:00:00Z"}',
    '{"session_id": "s-1", "sender": "rm", "message": "Hello.", "timestamp": "2024-03-04T09:00:05Z"}',
]


class SwitchProbe:
    """A stage that records the GIL switch interval the worker thread runs under."""

    name = "switch_probe"

    def __init__(self) -> None:
        self.seen: list[float] = []

    def __call__(self, batches: list[tuple[str, list[dict[str, Any]]]]) -> list[tuple[str, list[dict[str, Any]]]]:
        self.seen.append(sys.getswitchinterval())
        return batches

    def close(self) -> None:
        pass


def test_a_one_worker_cluster_process_hands_the_gil_over_less_often_and_restores_it(tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(LINES) + "\n")
    out = tmp_path / "out"
    prepare_out_dir(out, OUTPUT_FILES, overwrite=True)
    probe = SwitchProbe()
    job = ReplayRun(source, out, FlowConfig(), ReplayClock(1_709_542_800.0, time.time(), 0.0), stages=(probe,))
    before = sys.getswitchinterval()
    run_job(job, cluster=Cluster(tuple(free_addresses(1)), 0))
    assert probe.seen and all(seen == pytest.approx(CLUSTER_SWITCH_INTERVAL) for seen in probe.seen)
    assert sys.getswitchinterval() == before
    assert (out / "messages.jsonl").read_text().count("\n") == 2
