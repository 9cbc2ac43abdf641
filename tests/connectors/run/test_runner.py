"""The job runner: how a flow is run on this process or a cluster."""

from __future__ import annotations

import gc
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from connectors.files.jsonl import prepare_out_dir
from connectors.run.recovery import Recovery
from connectors.run.runner import (
    CLUSTER_SWITCH_INTERVAL, GC_YOUNG_THRESHOLD, OUTPUT_FILES, Cluster, ReplayRun, _knowing, free_addresses, run_job,
)
from dataflows.clock import ReplayClock
from dataflows.flow import FlowConfig

LINES = [
    '{"session_id": "s-1", "sender": "customer", "message": "Hi?", "timestamp": "2024-03-04T09:00:00Z"}',
    '{"session_id": "s-1", "sender": "rm", "message": "Hello.", "timestamp": "2024-03-04T09:00:05Z"}',
]


@dataclass
class Seen:
    """The process-wide settings a worker ran a batch under."""

    switch_interval: float
    gc_threshold: tuple[int, int, int]
    frozen: int


class SettingsProbe:
    """A stage that records the GIL switch interval and the collector's settings the worker runs under."""

    name = "settings_probe"

    def __init__(self) -> None:
        self.seen: list[Seen] = []

    def __call__(self, batches: list[tuple[str, list[dict[str, Any]]]]) -> list[tuple[str, list[dict[str, Any]]]]:
        self.seen.append(Seen(sys.getswitchinterval(), gc.get_threshold(), gc.get_freeze_count()))
        return batches

    def close(self) -> None:
        pass


def probed_job(tmp_path: Path) -> tuple[ReplayRun, SettingsProbe]:
    """A replay of LINES into tmp_path/out with a SettingsProbe stage."""
    source = tmp_path / "in.jsonl"
    source.write_text("\n".join(LINES) + "\n")
    prepare_out_dir(tmp_path / "out", OUTPUT_FILES, overwrite=True)
    probe = SettingsProbe()
    clock = ReplayClock(1_709_542_800.0, time.time(), 0.0)
    return ReplayRun(source, tmp_path / "out", FlowConfig(), clock, stages=(probe,)), probe


def test_a_one_worker_cluster_process_hands_the_gil_over_less_often_and_restores_it(tmp_path: Path) -> None:
    job, probe = probed_job(tmp_path)
    before = sys.getswitchinterval()
    run_job(job, cluster=Cluster(tuple(free_addresses(1)), 0))
    assert probe.seen and all(seen.switch_interval == pytest.approx(CLUSTER_SWITCH_INTERVAL) for seen in probe.seen)
    assert sys.getswitchinterval() == before
    assert (tmp_path / "out" / "messages.jsonl").read_text().count("\n") == 2


def test_a_flow_runs_with_start_up_objects_frozen_and_fewer_young_collections_then_restores_them(
        tmp_path: Path) -> None:
    job, probe = probed_job(tmp_path)
    before = gc.get_threshold()
    run_job(job)
    assert probe.seen
    assert all(seen.gc_threshold == (GC_YOUNG_THRESHOLD, *before[1:]) and seen.frozen > 0 for seen in probe.seen)
    assert gc.get_threshold() == before
    assert gc.get_freeze_count() == 0
    assert (tmp_path / "out" / "messages.jsonl").read_text().count("\n") == 2


def test_a_run_keeps_shard_snapshots_only_with_recovery(tmp_path: Path) -> None:
    """Without recovery no snapshot is ever read back, so the flow is told not to make them."""
    assert _knowing(FlowConfig(), None, None).snapshots is False
    assert _knowing(FlowConfig(), None, Recovery(tmp_path / "recovery")).snapshots is True
