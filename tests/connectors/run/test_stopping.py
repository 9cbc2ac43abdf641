"""Stopping on signals: the flag ends every input; a first signal drains, a second aborts."""

from __future__ import annotations

import os
import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from bytewax.testing import TestingSink, run_main
import bytewax.operators as op
from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

from connectors.run.stopping import CHECK_EVERY, StopFlag, StoppableSource, stop_on_signals


class Counting(FixedPartitionedSource[int, int]):
    """One partition counting up forever, one number per batch; sets `flag` at `stop_at`."""

    def __init__(self, flag: StopFlag, stop_at: int) -> None:
        self.flag, self.stop_at = flag, stop_at

    def list_parts(self) -> list[str]:
        return ["only"]

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> _Counter:
        return _Counter(self.flag, self.stop_at)


class _Counter(StatefulSourcePartition[int, int]):
    def __init__(self, flag: StopFlag, stop_at: int) -> None:
        self.n, self.flag, self.stop_at = 0, flag, stop_at

    def next_batch(self) -> list[int]:
        self.n += 1
        if self.n == self.stop_at:
            self.flag.set()
        return [self.n]

    def next_awake(self) -> datetime | None:
        return datetime.now(timezone.utc) + timedelta(hours=1) if self.n > 10**9 else None

    def snapshot(self) -> int:
        return self.n


def test_an_endless_input_ends_once_the_flag_is_set(tmp_path: Path) -> None:
    flag = StopFlag(tmp_path / "stop")
    out: list[int] = []
    flow = Dataflow("stoppable")
    op.output("out", op.input("in", flow, StoppableSource(Counting(flag, stop_at=50), flag)), TestingSink(out))
    run_main(flow, epoch_interval=timedelta(0))
    assert out == list(range(1, 51))


def test_a_waiting_input_wakes_soon_enough_to_see_the_flag(tmp_path: Path) -> None:
    flag = StopFlag(tmp_path / "stop")
    part = StoppableSource(Counting(flag, stop_at=0), flag).build_part("in", "only", None)
    part.inner.n = 10**9 + 1  # type: ignore[attr-defined]
    awake = part.next_awake()
    assert awake is not None and awake - datetime.now(timezone.utc) <= CHECK_EVERY
    part.inner.n = 0  # type: ignore[attr-defined]
    assert part.next_awake() is None, "an input with more to read at once is not slowed down"


def test_a_first_signal_sets_the_flag_and_a_second_aborts(tmp_path: Path) -> None:
    flag = StopFlag(tmp_path / "stop")
    with pytest.raises(KeyboardInterrupt), stop_on_signals(flag) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
        assert flag.is_set() and signals.received == ["SIGTERM"] and signals.exit_code == 143
        os.kill(os.getpid(), signal.SIGINT)
    assert signals.received == ["SIGTERM", "SIGINT"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "the handlers are put back"


def test_without_a_flag_a_signal_aborts_at_once() -> None:
    with pytest.raises(KeyboardInterrupt), stop_on_signals(None) as signals:
        os.kill(os.getpid(), signal.SIGTERM)
    assert signals.received == ["SIGTERM"]

