"""What a running job has done, as seen from outside it: tests act on these, never on elapsed time.

A test that kills or stops a run picks its moment from observed progress (the recovery folder's
committed snapshots, the lines an output file has grown by), so it acts mid-way on a machine of
any speed: the runs it drives are paced (a replay speed factor) or never end by themselves.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

Condition = Callable[[], bool]
"""A question about a running job's progress, asked again and again until it says yes."""

POLL_SECONDS = 0.01


def committed_epoch(recovery_dir: Path) -> int:
    """The latest epoch whose snapshot every recovery partition has committed (0 before the first)."""
    epochs = []
    for part in recovery_dir.glob("part-*.sqlite3"):
        try:
            with sqlite3.connect(f"file:{part}?mode=ro", uri=True) as db:
                row = db.execute("SELECT min(commit_epoch) FROM commits").fetchone()
        except sqlite3.Error:  # created but not yet initialised, or busy: nothing committed to see
            return 0
        epochs.append(row[0] or 0)
    return min(epochs, default=0)


class LineCounter:
    """Counts the complete lines of a file that a running job appends to, reading only what is new.

    A file cut back (a resumed run truncates its outputs to the last snapshot) is counted afresh.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.offset = 0
        self.lines = 0

    def __call__(self) -> int:
        try:
            with self.path.open("rb") as file:
                size = file.seek(0, 2)
                if size < self.offset:
                    self.offset = self.lines = 0
                file.seek(self.offset)
                new = file.read(size - self.offset)
        except FileNotFoundError:
            return self.lines
        self.offset += len(new)
        self.lines += new.count(b"\n")
        return self.lines


def snapshots_after(recovery_dir: Path, count: int) -> Condition:
    """True once `count` more snapshots have been committed than when this was called."""
    start = committed_epoch(recovery_dir)
    return lambda: committed_epoch(recovery_dir) >= start + count


def grown_by(path: Path, lines: int) -> Condition:
    """True once `path` holds `lines` more lines than when this was called."""
    count = LineCounter(path)
    start = count()
    return lambda: count() >= start + lines


def wait_until(condition: Condition, job: subprocess.Popen[bytes] | subprocess.Popen[str] | threading.Thread) -> bool:
    """Poll `condition` while `job` (a process or a thread) runs; True if it came true before `job` ended."""
    running = job.is_alive if isinstance(job, threading.Thread) else lambda: job.poll() is None
    while running():
        if condition():
            return True
        time.sleep(POLL_SECONDS)
    return False


def has_file(folder: Path, pattern: str) -> Condition:
    """True once a file matching `pattern` exists under `folder` (e.g. a lake table's first data file)."""
    return lambda: folder.exists() and next(folder.rglob(pattern), None) is not None


def every(*conditions: Condition) -> Condition:
    """True once each of `conditions` is true at the same look."""
    return lambda: all(condition() for condition in conditions)
