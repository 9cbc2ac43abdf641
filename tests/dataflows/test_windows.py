import math

import pytest

from dataflows.events import Event, LineRef, iso
from dataflows.windows import WindowBook, WindowConfig

T0 = 1_704_103_200.0  # 2024-01-01T10:00:00Z, a multiple of 30 s


def event(t: float, session: str = "s-1", sender: str = "customer", line: int = 1) -> Event:
    ref = LineRef("in", line, line * 100)
    return Event(ref.event_id, session, sender, "message", f"m{line}", T0 + t, "event", "conversation", *ref, timestamp=iso(T0 + t))


def test_windows_are_aligned_to_the_epoch() -> None:
    config = WindowConfig(size=30)
    assert config.start_of(T0 + 29.999) == T0
    assert config.start_of(T0 + 30) == T0 + 30
    assert config.start_of(T0 - 0.001) == T0 - 30


@pytest.mark.parametrize(("size", "ooo"), [(0, 5), (-1, 5), (math.inf, 5), (30, -1), (30, math.nan)])
def test_bad_config_is_rejected(size: float, ooo: float) -> None:
    with pytest.raises(ValueError, match="window size|out-of-orderness"):
        WindowConfig(size=size, out_of_orderness=ooo)


def test_window_closes_only_when_watermark_passes_its_end() -> None:
    book = WindowBook(WindowConfig(size=30, out_of_orderness=5))
    assert book.add(event(1)) is None
    assert book.advance(T0 + 34.9) == []
    (closed,) = book.advance(T0 + 35)
    assert (closed.start, closed.end, closed.session_id) == (T0, T0 + 30, "s-1")
    assert book.open == {}


def test_out_of_order_within_bound_lands_in_its_open_window() -> None:
    book = WindowBook(WindowConfig(size=30, out_of_orderness=5))
    book.add(event(10, line=1))
    book.add(event(31, line=2))
    book.advance(T0 + 31)
    assert book.add(event(28, line=3)) is None
    first = book.advance(T0 + 40)[0]
    assert [m.ref.line for m in first.messages] == [1, 3]


def test_event_is_late_only_once_its_window_was_emitted() -> None:
    book = WindowBook(WindowConfig(size=30, out_of_orderness=5))
    book.add(event(1, line=1))
    book.advance(T0 + 29)
    assert book.add(event(2, line=2)) is None, "behind the watermark but its window is still open"
    book.advance(T0 + 36)
    late = book.add(event(3, line=3))
    assert late is not None
    assert (late.window_start, late.window_end, late.watermark) == (T0, T0 + 30, T0 + 31)


def test_emitted_window_is_never_reopened() -> None:
    book = WindowBook(WindowConfig(size=30, out_of_orderness=5))
    book.add(event(1))
    emitted = book.advance(T0 + 100)
    assert len(emitted) == 1 and book.open == {}
    assert book.add(event(2)) is not None
    assert book.advance(T0 + 1000) == [] and book.flush() == []


def test_merge_is_chronological_with_counts_per_sender() -> None:
    book = WindowBook(WindowConfig(size=30))
    book.add(event(9, sender="rm", line=1))
    book.add(event(3, sender="customer", line=2))
    book.add(event(9, sender="customer", line=3))
    (window,) = book.flush()
    assert [(m.sender, m.ref.line) for m in window.messages] == [("customer", 2), ("rm", 1), ("customer", 3)]
    assert window.counts == {"rm": 1, "customer": 2}
    record = window.as_record()
    assert record["first_event_time"] == "2024-01-01T10:00:03+00:00"
    assert record["last_event_time"] == "2024-01-01T10:00:09+00:00"


def test_sessions_have_separate_windows() -> None:
    book = WindowBook(WindowConfig(size=30))
    book.add(event(1, session="a"))
    book.add(event(2, session="b"))
    assert sorted(w.session_id for w in book.flush()) == ["a", "b"]
