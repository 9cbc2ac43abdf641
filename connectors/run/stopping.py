"""Stopping a run on SIGINT or SIGTERM without half-written outputs.

Without recovery a stop drains the flow: every input ends at its next batch, as at the end of a
file, so open windows are emitted, waiting absences fire and every sink writes its last batch
and closes. With recovery the run is aborted instead and left to recovery: a drained end would
emit windows that the resumed run still has to fill. A second signal during a drain aborts.

The flag is a file, so that the spawned processes of a local cluster see it too.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import FrameType
from typing import Generic, TypeVar

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition

X = TypeVar("X")
S = TypeVar("S")
CHECK_EVERY = timedelta(milliseconds=200)
"""At most this long between two looks at the flag by a waiting input."""


@dataclass(frozen=True)
class StopFlag:
    """A file whose existence asks every input of a run to end."""

    path: Path

    def set(self) -> None:
        self.path.touch()

    def is_set(self) -> bool:
        return self.path.exists()


class StoppableSource(FixedPartitionedSource[X, S], Generic[X, S]):
    """`inner`, whose partitions end (as at end of input) once `flag` is set."""

    def __init__(self, inner: FixedPartitionedSource[X, S], flag: StopFlag) -> None:
        self.inner = inner
        self.flag = flag

    def list_parts(self) -> list[str]:
        return self.inner.list_parts()

    def build_part(self, step_id: str, for_part: str, resume_state: S | None) -> StoppablePartition[X, S]:
        return StoppablePartition(self.inner.build_part(step_id, for_part, resume_state), self.flag)


class StoppablePartition(StatefulSourcePartition[X, S], Generic[X, S]):
    def __init__(self, inner: StatefulSourcePartition[X, S], flag: StopFlag) -> None:
        self.inner = inner
        self.flag = flag

    def next_batch(self) -> Iterable[X]:
        if self.flag.is_set():
            raise StopIteration
        return self.inner.next_batch()

    def next_awake(self) -> datetime | None:
        """The inner partition's wake-up (None: at once), but soon enough to notice a stop."""
        wanted = self.inner.next_awake()
        if wanted is None:
            return None
        soon = datetime.now(timezone.utc) + CHECK_EVERY
        return soon if wanted > soon else wanted

    def snapshot(self) -> S:
        return self.inner.snapshot()

    def close(self) -> None:
        self.inner.close()


@dataclass
class Signals:
    """The stop signals a run received, by name (SIGINT, SIGTERM)."""

    received: list[str] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The first signal's exit code (`exit_code_of`), or 0 without one."""
        return exit_code_of(self.received[0]) if self.received else 0


def exit_code_of(signal_name: str) -> int:
    """The shell's convention for a process stopped by a signal: 128 + its number."""
    return 128 + signal.Signals[signal_name].value


@contextmanager
def stop_on_signals(flag: StopFlag | None) -> Iterator[Signals]:
    """While the block runs, SIGINT and SIGTERM set `flag` (a drain), or, with no flag or on a second
    signal, raise KeyboardInterrupt (an abort). Only installs handlers on the main thread."""
    signals = Signals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return

    def handle(number: int, frame: FrameType | None) -> None:
        signals.received.append(signal.Signals(number).name)
        if flag is None or len(signals.received) > 1:
            raise KeyboardInterrupt
        flag.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield signals
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class RunAborted(Exception):
    """A run stopped by a signal without draining: its outputs end wherever the stop found them."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(f"stopped by {signal_name}")
        self.signal_name = signal_name
        self.exit_code = exit_code_of(signal_name)
