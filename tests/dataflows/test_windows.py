import math
import pickle
from collections import Counter
from collections.abc import Callable

import pytest
from bytewax.testing import TestingSource
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.events import DeadLetter, Event, LineRef, iso
from dataflows.flow import FlowConfig, build_flow
from dataflows.sequencing import DONE, Progress, ReplayLayout, Stamped, replay_items
from dataflows.windows import WindowBook, WindowConfig
from tests.conftest import jsonl, run_by_kind

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


@pytest.mark.parametrize("limits", [{"max_messages": 0}, {"max_open_windows": 0}, {"max_messages": True}, {"max_open_windows": 2.5}])
def test_bad_limits_are_rejected(limits: dict) -> None:
    with pytest.raises(ValueError, match="maximum of (messages per window|open windows per session) must be a whole number >= 1"):
        WindowConfig(**limits)


def test_limits_have_defaults() -> None:
    assert (WindowConfig().max_messages, WindowConfig().max_open_windows) == (10_000, 1_000)


# --- maximum messages per window ---------------------------------------------------------------


def test_window_over_max_messages_lists_the_earliest_and_counts_the_rest() -> None:
    book = WindowBook(WindowConfig(size=30, max_messages=3))
    for line, (t, sender) in enumerate([(9, "rm"), (2, "customer"), (7, "rm"), (1, "customer"), (8, "rm"), (4, "bot")], 1):
        book.add(event(t, sender=sender, line=line))
    (window,) = book.flush()
    assert [m.time - T0 for m in window.messages] == [1, 2, 4]
    assert window.overflow == 3
    assert window.counts == {"customer": 2, "bot": 1, "rm": 3}, "counts cover the dropped messages too"
    record = window.as_record()
    assert (record["truncated"], record["overflow"], record["closed_early"]) == (True, 3, None)
    assert len(record["messages"]) == 3
    assert (record["first_event_time"], record["last_event_time"]) == (iso(T0 + 1), iso(T0 + 9))


def test_window_within_max_messages_is_not_truncated() -> None:
    book = WindowBook(WindowConfig(size=30, max_messages=2))
    book.add(event(1, line=1))
    book.add(event(2, line=2))
    record = book.flush()[0].as_record()
    assert (record["truncated"], record["overflow"], record["closed_early"]) == (False, 0, None)
    assert record["last_event_time"] == iso(T0 + 2)


def test_an_open_window_holds_at_most_twice_max_messages() -> None:
    book = WindowBook(WindowConfig(size=1000, max_messages=5))
    for line in range(1, 101):
        book.add(event(100 - line * 0.5, line=line))
        assert all(len(held) <= 10 for held in book.open.values())
    (window,) = book.flush()
    assert [m.ref.line for m in window.messages] == [100, 99, 98, 97, 96]
    assert (window.overflow, window.counts, window.last and window.last.ref.line) == (95, {"customer": 100}, 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 29), st.sampled_from(["customer", "rm", "bot"])), min_size=1, max_size=60),
       st.integers(1, 8))
def test_truncation_keeps_exactly_the_first_n_in_time_then_file_order(items: list[tuple[int, str]], limit: int) -> None:
    events = [event(t, sender=s, line=n) for n, (t, s) in enumerate(items, 1)]
    book = WindowBook(WindowConfig(size=30, max_messages=limit))
    for e in events:
        book.add(e)
    (window,) = book.flush()
    ordered = sorted(events, key=lambda e: (e.time, e.offset))
    assert list(window.messages) == ordered[:limit]
    assert window.overflow == max(0, len(events) - limit)
    assert window.counts == dict(Counter(e.sender for e in events))
    assert window.as_record()["last_event_time"] == ordered[-1].timestamp


# --- maximum open windows per session ----------------------------------------------------------


def crowded_book(max_open: int = 2) -> WindowBook:
    """A book whose watermark lags far behind: every window stays open until a limit closes it."""
    return WindowBook(WindowConfig(size=10, out_of_orderness=10_000, max_open_windows=max_open))


def test_too_many_open_windows_closes_the_sessions_oldest_early() -> None:
    book = crowded_book()
    book.add(event(1, line=1))
    book.add(event(11, line=2))
    book.add(event(25, session="other", line=3))
    assert book.advance(T0 + 30) == []
    book.add(event(21, line=4))
    (early,) = book.advance(None)
    assert (early.session_id, early.start, early.closed_early) == ("s-1", T0, "too many open windows")
    assert early.as_record()["closed_early"] == "too many open windows"
    assert sorted(book.open) == [("other", T0 + 20), ("s-1", T0 + 10), ("s-1", T0 + 20)]
    assert book.advance(None) == [], "emitted once"


def test_a_window_closed_early_is_never_reopened() -> None:
    book = crowded_book()
    for line, t in enumerate([1, 11, 21], 1):
        book.add(event(t, line=line))
    book.advance(None)
    for t in (5, -30):
        late = book.add(event(t, line=9))
        assert late is not None and "closed early (too many open windows)" in late.reason
        assert (late.as_record()["reason"], late.as_record()["watermark"]) == (late.reason, None), "no watermark yet"
        assert late.reason.startswith("window already emitted: the session's windows up to 2024-01-01T10:00:10+00:00")
    assert book.add(event(5, session="other", line=10)) is None, "other sessions are not affected"
    emitted = book.advance(T0 + 10_100) + book.flush()
    assert sorted((w.session_id, w.start - T0) for w in emitted) == [("other", 0), ("s-1", 10), ("s-1", 20)]
    assert all(w.closed_early is None for w in emitted)
    assert (book.closed_to, book.closed_ends, book.starts) == ({}, [], {}), "the session's state is gone"


def test_opening_a_window_older_than_the_open_ones_closes_that_one() -> None:
    book = crowded_book()
    book.add(event(11, line=1))
    book.add(event(21, line=2))
    assert book.add(event(1, line=3)) is None
    (early,) = book.flush()[:1]
    assert (early.start, [m.ref.line for m in early.messages], early.closed_early) == (T0, [3], "too many open windows")


def test_windows_closed_early_are_emitted_by_flush_in_order() -> None:
    book = crowded_book(max_open=1)
    for line, t in enumerate([1, 11, 21], 1):
        book.add(event(t, line=line))
    emitted = book.flush()
    assert [(w.start - T0, w.closed_early) for w in emitted] == [(0, "too many open windows"), (10, "too many open windows"), (20, None)]


def test_a_book_with_limits_hit_survives_a_snapshot() -> None:
    book = WindowBook(WindowConfig(size=10, out_of_orderness=10_000, max_messages=1, max_open_windows=1))
    for line, t in enumerate([1, 2, 3, 11, 12], 1):
        book.add(event(t, line=line))
    copy = pickle.loads(pickle.dumps(book))
    assert copy.flush() == book.flush()


# --- through the flow --------------------------------------------------------------------------


def test_limits_through_the_flow_drop_nothing(conversation: Callable[..., dict]) -> None:
    lines = jsonl(
        *(conversation(message=f"m{i}", timestamp=T0 + i) for i in (3, 1, 2, 4)),
        conversation(message="w10", timestamp=T0 + 10),
        conversation(message="w20", timestamp=T0 + 20),
        conversation(message="late", timestamp=T0 + 5),
    )
    source: TestingSource[Stamped | DeadLetter | Progress] = TestingSource(replay_items(lines))
    config = FlowConfig(layout=ReplayLayout(partitions=1, block_bytes=DONE),
                        window=WindowConfig(size=10, out_of_orderness=1000, max_messages=2, max_open_windows=2))
    out = run_by_kind(lambda output: build_flow(source, [output], config))
    assert sorted(m["text"] for m in out["messages"]) == ["late", "m1", "m2", "m3", "m4", "w10", "w20"]
    windows = {w["window_start"]: w for w in out["windows"]}
    first = windows[iso(T0)]
    assert [m["text"] for m in first["messages"]] == ["m1", "m2"]
    assert (first["truncated"], first["overflow"], first["closed_early"]) == (True, 2, "too many open windows")
    assert first["counts"] == {"customer": 4} and first["last_event_time"] == iso(T0 + 4)
    assert [(w["overflow"], w["closed_early"]) for s, w in sorted(windows.items())[1:]] == [(0, None), (0, None)]
    (late,) = out["late"]
    assert late["event"]["text"] == "late" and "closed early" in late["reason"]
