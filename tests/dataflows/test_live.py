"""Live (Kafka) clocks: `LiveStamper` and `LiveMerger` with a frozen wall clock, and the live flow."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st
import polars as pl
import pytest
from bytewax.testing import TestingSource

from connectors.kafka.source import kafka_ref
from dataflows.event_frame import STAMPED_SCHEMA
from dataflows.events import DeadLetter, Event, LineRef, iso
from dataflows.flow import FlowConfig, build_flow
from dataflows.live import LiveMerger, LiveStamper
from dataflows.parse import parse_line
from dataflows.sequencing import LiveMark, Progress, ReplayLayout, Stamped, from_wire, stamped_frame, to_wire
from dataflows.windows import WindowConfig
from tests.conftest import run_by_kind

T0 = 1_704_103_200.0
"""2024-01-01T10:00:00+00:00: event times are given as seconds after it."""
W0 = 1_800_000_000.0
"""The wall clock when the partitions start reading (far from event time, as in a backlog)."""
TOPIC = "chat"
WINDOW = WindowConfig(size=30, out_of_orderness=5)

LiveItem = Stamped | DeadLetter | LiveMark
Records = dict[str, list[dict[str, Any]]]


def message(t: float | None, session: str = "s-1", text: str = "hi", sender: str = "customer") -> dict[str, Any]:
    """A conversation line; `t` in seconds after T0, None for no timestamp."""
    fields: dict[str, Any] = {"session_id": session, "sender": sender, "message": text}
    if t is not None:
        fields["timestamp"] = iso(T0 + t)
    return fields


def make_event(partition: int = 0, offset: int = 0, **overrides: Any) -> Event:
    """The event a Kafka partition reads at `offset`; `overrides` go to `message`."""
    parsed = parse_line(orjson.dumps(message(**{"t": 0.0, **overrides})), kafka_ref(TOPIC, partition, offset))
    assert isinstance(parsed, Event), parsed
    return parsed


@dataclass
class Reader:
    """One simulated Kafka partition: parses, stamps and marks each batch as `LivePartition` does."""

    partition: int
    started: float = W0
    idle_after: float = 5.0
    stamper: LiveStamper = field(init=False)
    offset: int = 0

    def __post_init__(self) -> None:
        self.stamper = LiveStamper(self.partition, started=self.started, idle_after=self.idle_after)

    def batch(self, now: float, *lines: dict[str, Any] | bytes, at_end: bool = True) -> list[LiveItem]:
        """The batch read at wall time `now`; `at_end`: the lines reach the end of the partition."""
        items: list[LiveItem] = []
        for line in lines:
            raw = line if isinstance(line, bytes) else orjson.dumps(line)
            items.append(self.stamper.stamp(parse_line(raw, kafka_ref(TOPIC, self.partition, self.offset)), now))
            self.offset += 1
        if at_end:
            self.stamper.caught_up(now)
        return [*items, self.stamper.mark(now)]


def run_live(items: list[LiveItem], partitions: int = 2, shards: int = 64, window: WindowConfig = WINDOW) -> Records:
    config = FlowConfig(live=True, layout=ReplayLayout(partitions=partitions), window=window, shards=shards)
    source: TestingSource[LiveItem] = TestingSource(items)
    return run_by_kind(lambda output: build_flow(source, [output], config))


def stamp(stamper: LiveStamper, now: float, **event: Any) -> Stamped:
    """`stamper.stamp` of an event (never a dead letter), typed as such."""
    stamped = stamper.stamp(make_event(partition=stamper.partition, **event), now)
    assert isinstance(stamped, Stamped)
    return stamped


def windows_of(out: Records) -> list[tuple[str, str, list[str]]]:
    return sorted((w["session_id"], w["window_start"], [m["text"] for m in w["messages"]]) for w in out["windows"])


# LiveStamper


def test_stamper_has_no_clock_before_any_event_then_an_untimed_one_starts_it_on_the_wall_clock() -> None:
    stamper = LiveStamper(0, started=W0)
    assert stamper.clock(W0) is None
    assert stamper.mark(W0 + 1) == LiveMark(0, None, False)
    stamper.stamp(make_event(t=None), W0 + 1)
    stamper.caught_up(W0 + 1)
    assert stamper.clock(W0 + 2) == W0 + 2, "with nothing else to go by, the partition follows the wall clock"
    assert stamper.mark(W0 + 9) == LiveMark(0, W0 + 9, False), "a partition that read something is not idle"


def test_stamper_clock_is_latest_event_time_then_moves_with_the_wall_once_the_partition_is_read() -> None:
    stamper = LiveStamper(0, started=W0)
    first = stamper.stamp(make_event(t=10), W0)
    assert first == Stamped(make_event(t=10), 0, None), "the clock before the first timed event is None"
    assert stamper.clock(W0 + 3) == T0 + 10, "more to read: wall time says nothing about event time"
    stamper.caught_up(W0 + 1)
    stamper.caught_up(W0 + 2)
    assert stamper.clock(W0 + 4) == T0 + 13, "system-clock fallback from the moment it was read to its end"
    assert stamper.clock(W0) == T0 + 10, "a wall clock that steps back never lowers the clock"
    second = stamp(stamper, W0 + 5, offset=1, t=12)
    assert second.clock_before == T0 + 14
    assert stamper.clock(W0 + 9) == T0 + 14, "reading again stops the fallback where it had got to"
    third = stamp(stamper, W0 + 9, offset=2, t=20)
    assert (third.clock_before, stamper.clock(W0 + 9)) == (T0 + 14, T0 + 20), "a newer event moves the clock"


def test_a_backlog_read_slowly_keeps_its_own_events_in_time() -> None:
    """Minutes of wall time between batches of a backlog (a loaded machine, a restart) make no event late."""
    stamper = LiveStamper(0, started=W0)
    stamper.stamp(make_event(t=100), W0)
    held_back = stamp(stamper, W0 + 300, offset=1, t=96)
    assert held_back.clock_before == T0 + 100


def test_stamper_ignores_an_older_event_for_its_clock() -> None:
    stamper = LiveStamper(0, started=W0)
    stamper.stamp(make_event(t=10), W0)
    stamper.caught_up(W0)
    older = stamp(stamper, W0 + 2, offset=1, t=4)
    assert (older.event.time, older.clock_before) == (T0 + 4, T0 + 12)
    assert stamper.clock(W0 + 5) == T0 + 12


def test_untimed_event_takes_the_partition_clock_and_stays_system_timed() -> None:
    stamper = LiveStamper(3, started=W0)
    stamper.stamp(make_event(t=10), W0)
    stamper.caught_up(W0)
    stamped = stamp(stamper, W0 + 4, offset=1, t=None)
    assert (stamped.block, stamped.clock_before) == (3, T0 + 14)
    event = stamped.event
    assert (event.time, event.timestamp, event.time_source) == (T0 + 14, iso(T0 + 14), "system")
    assert stamp(stamper, W0 + 6, offset=2, t=None).event.time == T0 + 14, "read on without reaching the end"


def test_untimed_event_before_any_timed_one_takes_the_wall_clock() -> None:
    stamped = stamp(LiveStamper(0, started=W0), W0 + 2, t=None)
    assert (stamped.event.time, stamped.event.time_source, stamped.clock_before) == (W0 + 2, "system", None)


def test_dead_letter_passes_the_stamper_unchanged() -> None:
    stamper = LiveStamper(0, started=W0)
    stamper.stamp(make_event(t=10), W0)
    dead = parse_line(b"not json", kafka_ref(TOPIC, 0, 1))
    assert isinstance(dead, DeadLetter)
    assert stamper.stamp(dead, W0 + 1) is dead
    assert stamper.clock(W0 + 5) == T0 + 10


def test_partition_is_idle_only_after_idle_after_seconds_without_data_or_once_found_empty() -> None:
    stamper = LiveStamper(1, started=W0, idle_after=5.0)
    assert stamper.mark(W0 + 4.9) == LiveMark(1, None, False)
    assert stamper.mark(W0 + 5.0) == LiveMark(1, None, True)
    stamper.stamp(make_event(partition=1, t=10), W0 + 6)
    stamper.caught_up(W0 + 6)
    assert stamper.mark(W0 + 100) == LiveMark(1, T0 + 104, False), "a partition that has data keeps its clock"
    empty = LiveStamper(2, started=W0, idle_after=5.0)
    empty.caught_up(W0 + 0.1)
    assert empty.mark(W0 + 0.1) == LiveMark(2, None, True), "read to its end with nothing in it"


def test_done_partition_is_idle_with_its_clock() -> None:
    stamper = LiveStamper(0, started=W0)
    assert stamper.mark(W0, done=True) == LiveMark(0, None, True)
    stamper.stamp(make_event(t=10), W0)
    stamper.caught_up(W0)
    assert stamper.mark(W0 + 1, done=True) == LiveMark(0, T0 + 11, True)


def test_resume_continues_from_the_snapshot_clock_and_follows_the_wall_only_once_caught_up() -> None:
    stamper = LiveStamper(0, started=W0)
    stamper.resume(T0 + 50)
    assert stamper.clock(W0 + 100) == T0 + 50, "a consumer still connecting moves no clock"
    assert stamp(stamper, W0 + 101, t=48).clock_before == T0 + 50
    stamper.caught_up(W0 + 101)
    assert stamper.clock(W0 + 102) == T0 + 51
    fresh = LiveStamper(0, started=W0)
    fresh.resume(None)
    assert fresh.clock(W0 + 200) is None


def test_live_marks_and_progress_markers_cross_the_wire() -> None:
    mark = LiveMark(2, T0 + 5, True)
    assert from_wire(to_wire(mark)) == mark
    assert isinstance(from_wire(to_wire(mark)), LiveMark)
    progress = Progress(1, 4096, ((0, T0),), T0 + 1)
    assert from_wire(to_wire(progress)) == progress
    assert isinstance(from_wire(to_wire(progress)), Progress)


# LiveMerger


def stamped(partition: int, offset: int, t: float) -> Stamped:
    return Stamped(make_event(partition=partition, offset=offset, t=t), partition, None)


def framed(item: Stamped) -> pl.DataFrame:
    return stamped_frame([item])


def released(merger: LiveMerger) -> list[tuple[str, float | None]]:
    return merger.release().select("event_id", "clock").rows()


def test_merger_releases_in_arrival_order_with_the_clock_at_that_point() -> None:
    merger = LiveMerger(2)
    merger.push([
        framed(stamped(0, 0, 30)), LiveMark(0, 10.0), framed(stamped(1, 0, 5)), LiveMark(1, 20.0),
        framed(stamped(0, 1, 1)), LiveMark(0, 30.0), framed(stamped(1, 1, 40)),
    ])
    assert merger.buffered == 4, "four events wait"
    assert released(merger) == [("chat/0:0", None), ("chat/1:0", None), ("chat/0:1", 10.0), ("chat/1:1", 20.0)]
    assert merger.buffered == 0
    assert merger.clock_floor() == 20.0
    assert released(merger) == []


def test_merger_has_no_clock_while_a_non_idle_partition_has_not_reported() -> None:
    merger = LiveMerger(3)
    merger.push([LiveMark(0, 10.0), LiveMark(1, 20.0), LiveMark(2, None)])
    merger.release()
    assert merger.clock_floor() is None
    merger.push([LiveMark(2, 15.0)])
    merger.release()
    assert merger.clock_floor() == 10.0, "the minimum over the partitions"


def test_idle_partitions_do_not_hold_the_clock_back() -> None:
    merger = LiveMerger(3)
    merger.push([LiveMark(0, 10.0), LiveMark(1, None, idle=True), LiveMark(2, 30.0)])
    merger.release()
    assert merger.clock_floor() == 10.0
    merger.push([LiveMark(0, 40.0, idle=True)])
    merger.release()
    assert merger.clock_floor() == 30.0, "an ended partition no longer counts"


def test_all_idle_partitions_leave_the_clock_where_it_was() -> None:
    merger = LiveMerger(2)
    merger.push([LiveMark(0, 10.0), LiveMark(1, 12.0), LiveMark(0, 50.0, idle=True)])
    merger.release()
    assert merger.clock_floor() == 12.0
    merger.push([LiveMark(1, 60.0, idle=True)])
    merger.release()
    assert merger.clock_floor() == 12.0, "with no partition left to count, the last reading stands"


def test_merger_clock_never_goes_back() -> None:
    merger = LiveMerger(2)
    merger.push([LiveMark(0, 100.0), LiveMark(1, None, idle=True)])
    merger.release()
    assert merger.clock_floor() == 100.0
    merger.push([LiveMark(1, 50.0), framed(stamped(1, 0, 50))])
    assert released(merger) == [("chat/1:0", 100.0)], "a partition back from idle cannot pull the clock back"
    merger.push([LiveMark(1, 120.0), LiveMark(0, 80.0)])
    merger.release()
    assert merger.clock_floor() == 100.0, "nor can a partition's own lower reading"
    assert merger.clocks == [100.0, 120.0]


def test_merger_clock_moves_only_with_marks() -> None:
    merger = LiveMerger(1)
    read = framed(stamped(0, 0, 99)).with_columns(pl.lit(10.0).alias("clock"))
    assert merger.clock_after(read) == 10.0, "an event's time does not move it"
    assert merger.clock_after(read.with_columns(pl.lit(None, pl.Float64).alias("clock"))) is None
    merger.push([framed(stamped(0, 0, 99))])
    assert released(merger) == [("chat/0:0", None)]
    assert merger.clock_floor() is None


def test_release_all_is_release() -> None:
    merger = LiveMerger(1)
    merger.push([LiveMark(0, 5.0), framed(stamped(0, 0, 6))])
    assert merger.release_all().select("event_id", "clock").rows() == [("chat/0:0", 5.0)]


def test_replay_progress_marker_in_a_live_merger_is_refused() -> None:
    merger = LiveMerger(1)
    with pytest.raises(TypeError, match="Progress"):
        merger.push([LiveMark(0, 1.0), Progress(0, 100)])


# The live flow

P0_TIMES = list(range(0, 120, 4))
"""Partition 0: sessions a and b, in order."""
P1_TIMES = [1, 7, 13, 10, 19, 25, 31, 28, 37, 43, 58, 55, 61, 67, 73, 70, 79, 85, 91, 88, 97, 103, 115, 112]
"""Partition 1: sessions c and d, some events 3 s behind their predecessor (out_of_orderness is 5)."""


def p0_line(i: int, t: int) -> dict[str, Any]:
    return message(t, session="a" if i % 2 else "b", text=f"p0@{t}")


def p1_line(i: int, t: int) -> dict[str, Any]:
    return message(t, session="c" if i % 2 else "d", text=f"p1@{t}", sender="rm")


def expected_windows() -> list[tuple[str, str, list[str]]]:
    groups: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for lines in ([p0_line(i, t) for i, t in enumerate(P0_TIMES)], [p1_line(i, t) for i, t in enumerate(P1_TIMES)]):
        for line in lines:
            t = int(line["message"].split("@")[1])
            groups.setdefault((line["session_id"], iso(T0 + t // 30 * 30)), []).append((t, line["message"]))
    return sorted((s, start, [text for _, text in sorted(msgs)]) for (s, start), msgs in groups.items())


def far_ahead_items() -> list[LiveItem]:
    """Partition 0 read to its end before partition 1 is read at all, three lines a batch, a minute
    of wall time between batches (a backlog read on a loaded machine)."""
    items: list[LiveItem] = []
    for reader, lines, wall in ((Reader(0), P0_TIMES, W0), (Reader(1), P1_TIMES, W0 + 3600)):
        line = p0_line if reader.partition == 0 else p1_line
        starts = range(0, len(lines), 3)
        for n, start in enumerate(starts):
            batch = (line(i, lines[i]) for i in range(start, min(start + 3, len(lines))))
            items += reader.batch(wall + 60 * n, *batch, at_end=start == starts[-1])
    return items


def time_ordered_items() -> list[LiveItem]:
    """The same lines read one at a time in event-time order, each partition marking after each."""
    p0, p1 = Reader(0), Reader(1)
    lines = [(t, p0, p0_line(i, t)) for i, t in enumerate(P0_TIMES)] + [(t, p1, p1_line(i, t)) for i, t in enumerate(P1_TIMES)]
    items: list[LiveItem] = []
    for n, (_, reader, line) in enumerate(sorted(lines, key=lambda x: x[0])):
        items += reader.batch(W0 + 0.01 * n, line)
    return items


@pytest.mark.parametrize("shards", [1, 64])
def test_partition_read_far_ahead_makes_no_event_of_another_partition_late(shards: int) -> None:
    ahead = run_live(far_ahead_items(), shards=shards)
    in_time_order = run_live(time_ordered_items(), shards=shards)
    assert ahead["late"] == []
    assert in_time_order["late"] == []
    assert windows_of(ahead) == windows_of(in_time_order) == expected_windows()
    assert len(ahead["messages"]) == len(P0_TIMES) + len(P1_TIMES)


@pytest.mark.parametrize(("first_mark_at", "late"), [(4.9, []), (5.0, ["p1@2"])])
def test_idle_partition_stops_holding_the_clock(first_mark_at: float, late: list[str]) -> None:
    """A partition silent for `idle_after` no longer holds the others back: its first events may then be late."""
    p0, p1 = Reader(0), Reader(1)
    items: list[LiveItem] = [p1.stamper.mark(W0 + first_mark_at)]
    items += p0.batch(W0 + 5, message(1, session="a", text="p0@1"), message(50, session="b", text="p0@50"))
    items += p1.batch(W0 + 6, message(2, session="c", text="p1@2", sender="rm"))
    out = run_live(items)
    assert [r["event"]["text"] for r in out["late"]] == late


@pytest.mark.parametrize(("wall_after", "late", "window_a"), [
    (20.0, [], ["a@1", "a@3"]),
    (40.0, ["a@3"], ["a@1"]),
])
def test_marks_close_windows_by_wall_time_without_new_events(wall_after: float, late: list[str], window_a: list[str]) -> None:
    """System-clock fallback: with no new event, later marks carry the clock past window end + out_of_orderness."""
    p0, p1 = Reader(0), Reader(1)
    items = p0.batch(W0, message(1, session="a", text="a@1")) + p1.batch(W0, message(2, session="c", text="c@2"))
    for wall in (W0 + 10, W0 + wall_after):
        items += p0.batch(wall) + p1.batch(wall)
    items += p0.batch(W0 + wall_after, message(3, session="a", text="a@3"))
    out = run_live(items)
    assert [r["event"]["text"] for r in out["late"]] == late
    if late:
        assert out["late"][0]["watermark"] == iso(T0 + 1 + wall_after - WINDOW.out_of_orderness)
    assert [ws[2] for ws in windows_of(out) if ws[0] == "a"] == [window_a]
    assert [ws[2] for ws in windows_of(out) if ws[0] == "c"] == [["c@2"]]


def test_marks_close_windows_of_untimed_events_by_wall_time() -> None:
    """A topic without timestamps: its events are timed by the wall clock, and wall time passing
    with no new event must close their windows as it does for timed events ("windows still close")."""
    p0 = Reader(0)
    items = p0.batch(W0, message(None, text="u1"))
    items += p0.batch(W0 + 10) + p0.batch(W0 + 100)
    straggler = {"session_id": "s-1", "sender": "rm", "message": "t@2", "timestamp": iso(W0 + 2)}
    items += p0.batch(W0 + 100, straggler)
    out = run_live(items, partitions=1)
    assert [r["event"]["text"] for r in out["late"]] == ["t@2"], "window [W0, W0+30) closed at wall W0+100"
    assert windows_of(out) == [("s-1", iso(W0), ["u1"])]


def test_event_behind_its_partition_clock_after_its_window_was_emitted_is_late() -> None:
    p0, p1 = Reader(0), Reader(1)
    items = p0.batch(W0, message(1, session="a", text="a@1"), message(50, session="b", text="b@50"))
    items += p1.batch(W0, message(60, session="c", text="c@60", sender="rm"))
    items += p0.batch(W0, message(2, session="a", text="a@2"), message(46, session="b", text="b@46"))
    out = run_live(items)
    (late,) = out["late"]
    assert late["event"]["text"] == "a@2"
    assert (late["window_start"], late["window_end"]) == (iso(T0), iso(T0 + 30))
    assert late["watermark"] == iso(T0 + 45), "the flow's clock is partition 0's, the lower"
    assert windows_of(out) == [
        ("a", iso(T0), ["a@1"]),
        ("b", iso(T0 + 30), ["b@46", "b@50"]),
        ("c", iso(T0 + 60), ["c@60"]),
    ]
    assert "a@2" in [m["text"] for m in out["messages"]], "a late event is still an accepted message"


def test_live_dead_letters_and_untimed_events_in_the_flow() -> None:
    p0 = Reader(0)
    items = p0.batch(W0, message(10, text="timed"), b"\xff\xfe", message(None, text="untimed"))
    out = run_live(items, partitions=1)
    (dead,) = out["dead_letter"]
    assert (dead["source"], dead["line"]) == ("chat/0", 1)
    assert "UTF-8" in dead["reason"]
    untimed = next(m for m in out["messages"] if m["text"] == "untimed")
    assert (untimed["timestamp"], untimed["time_source"]) == (iso(T0 + 10), "system")
    assert [m["event_id"] for m in out["messages"]] == ["chat/0:0", "chat/0:2"]


def test_ref_of_a_live_event_names_topic_partition_and_offset() -> None:
    assert make_event(partition=2, offset=7).ref == LineRef("chat/2", 7, 7)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(
    st.lists(st.one_of(st.none(), st.floats(-50, 50)), max_size=6),  # event times of a batch (None: untimed)
    st.booleans(),                                                   # a dead letter in the batch too
    st.booleans(),                                                   # the partition's end after it
    st.floats(0, 30),                                                # wall time passed before it
), max_size=8), st.one_of(st.none(), st.floats(-20, 20)))
def test_stamp_frame_is_stamp_of_each_event_in_turn(batches: list[tuple[list[float | None], bool, bool, float]],
                                                    resumed: float | None) -> None:
    one, many = LiveStamper(0, started=W0), LiveStamper(0, started=W0)
    one.resume(None if resumed is None else T0 + resumed)
    many.resume(None if resumed is None else T0 + resumed)
    now = W0
    for times, dead, at_end, passed in batches:
        now += passed
        events = [make_event(offset=i, t=t) for i, t in enumerate(times)]
        expected = [s for s in (one.stamp(e, now) for e in events) if isinstance(s, Stamped)]
        if dead:
            one.stamp(DeadLetter(LineRef("chat/0", 99, 99), "", "bad"), now)
        frame = many.stamp_frame(stamped_frame(Stamped(e, 0, None) for e in events).drop("block", "clock_before",
                                                                                             "scope"), now, dead=dead)
        got = frame.select("time", "timestamp", "clock_before").rows()
        assert got == [(s.event.time, s.event.timestamp, s.clock_before) for s in expected]
        assert frame.schema == STAMPED_SCHEMA and frame["block"].to_list() == [0] * len(expected)
        assert (many.base, many.caught_up_at) == (one.base, one.caught_up_at)
        if at_end:
            one.caught_up(now)
            many.caught_up(now)
