import random

from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.events import Event, LineRef
from dataflows.sequencing import DONE, BlockStamper, Progress, ReplayLayout, Sequencer, Stamped, stamped_frame

LAYOUT = ReplayLayout(partitions=2, block_bytes=100)


def stamped(offset: int, t: float | None, clock_before: float | None = None) -> Stamped:
    ref = LineRef("in", offset, offset)
    event = Event(ref.event_id, "s", "rm", "message", "", t, "event", "conversation", *ref)
    return Stamped(event, LAYOUT.block_of(offset), clock_before)


def partition_streams() -> list[list[Stamped | Progress]]:
    """Two partitions' output for lines at offsets 0,10,..,390 with times = offset (block 0/2 → p0, 1/3 → p1)."""
    streams: list[list[Stamped | Progress]] = [[], []]
    for block in range(4):
        p = block % 2
        stamper = BlockStamper(block)
        for offset in range(block * 100, block * 100 + 100, 10):
            line_time = float(offset) if offset != 250 else None
            ref = LineRef("in", offset, offset)
            item = stamper.stamp(Event(ref.event_id, "s", "rm", "message", "", line_time, "event", "conversation", *ref))
            streams[p].append(item)
        next_offset = LAYOUT.block_start(block + 2) if block < 2 else DONE
        streams[p].append(Progress(p, next_offset, (stamper.finish(),)))
    return streams


def framed(items: list[Stamped | Progress]) -> list:
    """Events as the shard receives them (frames), markers as they are."""
    return [stamped_frame([item]) if isinstance(item, Stamped) else item for item in items]


def drain(sequencer: Sequencer, arrivals: list[Stamped | Progress]) -> list[tuple[int, float | None]]:
    released = []
    for item in arrivals:
        sequencer.push(framed([item]))
        released.extend(sequencer.release().select("offset", "clock").iter_rows())
    return released


def test_releases_in_file_order_with_the_clock_of_a_single_reader() -> None:
    p0, p1 = partition_streams()
    released = drain(Sequencer(LAYOUT), p1 + p0)
    assert [offset for offset, _ in released] == list(range(0, 400, 10))
    clocks = dict(released)
    assert clocks[0] is None
    assert clocks[10] == 0.0
    assert clocks[100] == 90.0, "block 1's first line sees the latest time of block 0"
    assert clocks[260] == 240.0, "an untimed line does not move the clock"


@settings(max_examples=60, deadline=None)
@given(st.randoms(use_true_random=False))
def test_any_interleaving_of_partitions_gives_the_same_release(rnd: random.Random) -> None:
    p0, p1 = partition_streams()
    merged: list[Stamped | Progress] = []
    while p0 or p1:
        source = p0 if (p0 and (not p1 or rnd.random() < 0.5)) else p1
        merged.append(source.pop(0))
    expected = drain(Sequencer(LAYOUT), sum(partition_streams(), []))
    assert drain(Sequencer(LAYOUT), merged) == expected


def test_nothing_is_released_past_a_lagging_partition() -> None:
    sequencer = Sequencer(LAYOUT)
    sequencer.push(framed([stamped(100, 100.0), stamped(110, 110.0), Progress(1, 300)]))
    assert sequencer.release().is_empty()
    assert sequencer.buffered == 2


def test_clock_floor_uses_finished_blocks_and_paced_ticks() -> None:
    sequencer = Sequencer(LAYOUT)
    sequencer.push([Progress(0, 200, ((0, 95.0),), clock=150.0)])
    assert sequencer.clock_floor() == 95.0, "block 0 is complete; partition 1 has sent no tick"
    sequencer.push([Progress(1, 300, ((1, 190.0),), clock=160.0)])
    assert sequencer.clock_floor() == 190.0
    sequencer.push([Progress(0, 200, (), clock=250.0), Progress(1, 300, (), clock=240.0)])
    assert sequencer.clock_floor() == 240.0


def test_release_all_flushes_at_end_of_input() -> None:
    sequencer = Sequencer(LAYOUT)
    sequencer.push(framed([stamped(0, 1.0), Progress(0, 5)]))
    assert sequencer.release_all()["offset"].to_list() == [0]
