"""Write-behind for a sink partition: each batch's write runs on a thread of the partition's own while
the worker goes on, one batch at a time (or in place, without a thread)."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

T = TypeVar("T")


class WriteBehind:
    """Runs `write(batch)` calls one at a time: on a thread named `thread_name`, or at once in the caller
    when it is None. The next call, `wait` and `close` wait for the one in flight and raise what it
    raised, so a failed write is never lost with its thread, and writes happen in call order."""

    def __init__(self, thread_name: str | None) -> None:
        self.thread = None if thread_name is None else ThreadPoolExecutor(max_workers=1, thread_name_prefix=thread_name)
        self.in_flight: Future[None] | None = None

    def run(self, write: Callable[[T], None], batch: T) -> None:
        self.wait()
        if self.thread is None:
            write(batch)
        else:
            self.in_flight = self.thread.submit(write, batch)

    def wait(self) -> None:
        """Wait for the write in flight (raising what it raised)."""
        if self.in_flight is not None:
            in_flight, self.in_flight = self.in_flight, None
            in_flight.result()

    def close(self) -> None:
        """Wait for the write in flight, then stop the thread."""
        try:
            self.wait()
        finally:
            if self.thread is not None:
                self.thread.shutdown()
