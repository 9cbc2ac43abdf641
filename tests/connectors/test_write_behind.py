"""WriteBehind: writes one at a time, in call order, on a thread or in place; failures surface."""

from __future__ import annotations

import threading

import pytest

from connectors.write_behind import WriteBehind


@pytest.mark.parametrize("thread_name", ["test-writer", None])
def test_writes_run_in_call_order_and_close_waits_for_the_last(thread_name: str | None) -> None:
    done: list[tuple[int, str]] = []
    behind = WriteBehind(thread_name)
    for n in range(5):
        behind.run(lambda batch: done.append((batch, threading.current_thread().name)), n)
    behind.close()
    assert [n for n, _ in done] == [0, 1, 2, 3, 4]
    on_caller = {name == threading.current_thread().name for _, name in done}
    assert on_caller == {thread_name is None}


def test_a_failed_write_is_raised_by_the_next_call_and_not_again() -> None:
    behind = WriteBehind("test-writer")

    def fail(batch: int) -> None:
        raise ValueError(f"batch {batch}")

    behind.run(fail, 1)
    with pytest.raises(ValueError, match="batch 1"):
        behind.run(lambda batch: None, 2)
    behind.wait()
    behind.close()


def test_without_a_thread_a_failed_write_is_raised_at_once() -> None:
    behind = WriteBehind(None)
    with pytest.raises(ZeroDivisionError):
        behind.run(lambda batch: 1 // batch, 0)
    behind.close()
