"""Windows over frames give what `WindowBook` gives event by event: the same window records and the same
late events, whatever the batches, limits and clocks."""

from typing import Any

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.event_frame import events_frame
from dataflows.events import Event, iso
from dataflows.records import as_records
from dataflows.window_frames import FrameWindows
from dataflows.windows import WindowBook, WindowConfig

T0 = 1_704_103_200.0


def event(n: int, session: str, time: float, sender: str = "customer") -> Event:
    return Event(f"in:{n}", session, sender, "message", f"m{n}", time, "event", "conversation", "in", n, n * 10,
                 timestamp=iso(time))


def by_book(batches: list[list[tuple[Event, float | None, bool]]], config: WindowConfig) -> tuple[list, list]:
    """The reference: the book moved to each event's clock before it takes the event."""
    book = WindowBook(config)
    windows: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    for batch in batches:
        for e, clock, windowed in batch:
            windows += [w.as_record() for w in book.advance(clock)]
            if windowed and (found := book.add(e)) is not None:
                late.append(found.as_record())
        windows += [w.as_record() for w in book.advance(_now(batch))]
    return windows + [w.as_record() for w in book.flush()], late


def by_frames(batches: list[list[tuple[Event, float | None, bool]]], config: WindowConfig) -> tuple[list, list]:
    windows_of = FrameWindows(config)
    windows: list[dict[str, Any]] = []
    late: list[dict[str, Any]] = []
    for batch in batches:
        frame = events_frame(e for e, _, _ in batch).with_columns(
            pl.Series("clock", [c for _, c, _ in batch], dtype=pl.Float64),
            pl.Series("windowed", [w for _, _, w in batch], dtype=pl.Boolean),
        )
        late += windows_of.add(frame)
        assert_counts_match(windows_of)
        windows += records(windows_of.advance(_now(batch)))
        assert_counts_match(windows_of)
    return windows + records(windows_of.flush()), late


def assert_counts_match(windows_of: FrameWindows) -> None:
    """The window counts kept as rows come and go are those of the open rows."""
    rows = windows_of.open_rows().group_by("session_id", "start").len().iter_rows()
    assert windows_of.held == {(session, start): n for session, start, n in rows}
    per_session = windows_of.open_rows().group_by("session_id").agg(pl.col("start").n_unique()).iter_rows()
    assert windows_of.windows_of == dict(per_session)


def records(batches: list) -> list[dict[str, Any]]:
    return [record for batch in batches for record in as_records(batch)]


def _now(batch: list[tuple[Event, float | None, bool]]) -> float | None:
    clocks = [c for _, c, _ in batch if c is not None]
    return max(clocks) if clocks else None


def canonical(records: list[dict[str, Any]]) -> list[str]:
    return sorted(map(repr, records))


@st.composite
def streams(draw: st.DrawFn) -> list[list[tuple[Event, float | None, bool]]]:
    n = draw(st.integers(0, 60))
    sessions = draw(st.lists(st.sampled_from(["a", "b", "c"]), min_size=n, max_size=n))
    offsets = draw(st.lists(st.integers(-40, 40), min_size=n, max_size=n))
    senders = draw(st.lists(st.sampled_from(["customer", "rm", "bot"]), min_size=n, max_size=n))
    windowed = draw(st.lists(st.booleans(), min_size=n, max_size=n))
    items: list[tuple[Event, float | None, bool]] = []
    latest: float | None = None
    for i in range(n):
        time = T0 + i * 3 + offsets[i]
        items.append((event(i, sessions[i], time, senders[i]), latest, windowed[i] or i % 3 > 0))
        latest = time if latest is None else max(latest, time)
    cuts = sorted(draw(st.sets(st.integers(1, max(1, n - 1)), max_size=6)))
    bounds = [0, *cuts, n]
    return [items[a:b] for a, b in zip(bounds, bounds[1:], strict=False) if b > a]


configs = st.builds(
    WindowConfig,
    size=st.sampled_from([5.0, 10.0, 30.0]),
    out_of_orderness=st.sampled_from([0.0, 5.0, 60.0]),
    max_messages=st.integers(1, 4),
    max_open_windows=st.integers(1, 4),
)


@settings(max_examples=300, deadline=None)
@given(streams(), configs)
def test_frames_window_as_the_book_does(batches: list[list[tuple[Event, float | None, bool]]], config: WindowConfig) -> None:
    windows, late = by_frames(batches, config)
    expected_windows, expected_late = by_book(batches, config)
    assert canonical(windows) == canonical(expected_windows)
    assert canonical(late) == canonical(expected_late)


@settings(max_examples=100, deadline=None)
@given(streams())
def test_without_limits_met_no_session_is_handed_to_the_book(batches: list[list[tuple[Event, float | None, bool]]]) -> None:
    config = WindowConfig(size=10.0, out_of_orderness=5.0)
    windows_of = FrameWindows(config)
    for batch in batches:
        windows_of.add(events_frame(e for e, _, _ in batch).with_columns(
            pl.Series("clock", [c for _, c, _ in batch], dtype=pl.Float64),
            pl.Series("windowed", [w for _, _, w in batch], dtype=pl.Boolean),
        ))
    assert windows_of.escaped is None


def test_a_late_event_names_its_window_and_the_watermark() -> None:
    config = WindowConfig(size=10.0, out_of_orderness=0.0)
    windows_of = FrameWindows(config)
    frame = events_frame([event(1, "a", T0 + 12), event(2, "a", T0 + 3)]).with_columns(
        pl.Series("clock", [None, T0 + 12], dtype=pl.Float64), pl.Series("windowed", [True, True]),
    )
    (late,) = windows_of.add(frame)
    assert (late["window_start"], late["window_end"], late["watermark"]) == (iso(T0), iso(T0 + 10), iso(T0 + 12))
    assert late["event"]["text"] == "m2"
    (window,) = records(windows_of.flush())
    assert [m["text"] for m in window["messages"]] == ["m1"] and window["counts"] == {"customer": 1}
