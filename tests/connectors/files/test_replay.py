"""The replay source on real files, driven by a fake wall clock (no sleeping)."""

from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from connectors.files.replay import ReplayPartition, ReplaySource, check_readable, first_event_time
from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from tests.connectors.files.replay_batches import expanded
from dataflows.events import DeadLetter
from dataflows.sequencing import DONE, Progress, ReplayLayout, Stamped

T0 = 1_704_103_200.0


class FakeWall:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write(path: Path, events: list[dict | str]) -> Path:
    path.write_text("".join((e if isinstance(e, str) else orjson.dumps(e).decode()) + "\n" for e in events))
    return path


def timed(seconds: float, session: str = "s-1") -> dict:
    return {"session_id": session, "sender": "customer", "message": f"at {seconds}", "timestamp": T0 + seconds}


def drain(part: ReplayPartition) -> list:
    items: list = []
    while True:
        try:
            items.extend(expanded(part.next_batch()))
        except StopIteration:
            return items


def partition(tmp_path: Path, events: list, *, speed: float = 0, layout: ReplayLayout | None = None,
              wall: FakeWall | None = None, index: int = 0, **kwargs: object) -> ReplayPartition:
    path = write(tmp_path / "in.jsonl", events)
    wall = wall or FakeWall()
    source = ReplaySource(path, layout=layout or ReplayLayout(), clock=ReplayClock(T0, wall.now, speed), wall=wall, **kwargs)
    return source.build_part("read", source.list_parts()[index], None)


def test_unpaced_replay_emits_everything_with_line_numbers(tmp_path: Path) -> None:
    items = drain(partition(tmp_path, [timed(0), "bad", timed(5)]))
    stamped = [i for i in items if isinstance(i, Stamped)]
    assert [s.event.ref.line for s in stamped] == [1, 3]
    assert [d.ref.line for d in items if isinstance(d, DeadLetter)] == [2]
    assert stamped[1].clock_before == T0
    assert items[-1] == Progress(0, DONE, ((0, T0 + 5),))


def test_paced_replay_waits_for_due_time_without_sleeping(tmp_path: Path) -> None:
    wall = FakeWall()
    part = partition(tmp_path, [timed(0), timed(10), timed(11)], speed=2, wall=wall, tick_seconds=1.0)
    first = expanded(part.next_batch())
    assert [i.event.text for i in first if isinstance(i, Stamped)] == ["at 0"]
    assert first[-1].clock == T0, "waiting: the marker carries the replay time"
    assert part.next_awake().timestamp() == pytest.approx(wall.now + 1.0), "ticks while waiting"
    wall.now += 4.9
    assert [i for i in expanded(part.next_batch()) if isinstance(i, Stamped)] == []
    assert part.next_awake().timestamp() == pytest.approx(wall.now + 0.1), "wakes when the next line is due"
    wall.now += 0.1
    assert [i.event.text for i in expanded(part.next_batch()) if isinstance(i, Stamped)] == ["at 10"]
    wall.now += 0.5
    rest = expanded(part.next_batch())
    assert [i.event.text for i in rest if isinstance(i, Stamped)] == ["at 11"]
    assert rest[-1].next_offset == DONE


def test_a_paced_replay_parses_a_block_piece_by_piece_into_the_same_items(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("connectors.files.replay.PACED_PIECE_BYTES", 150)
    long = {**timed(3), "message": "x" * 400}  # longer than a piece
    events: list = [timed(0), "bad", {"session_id": "s-2", "sender": "rm", "message": "untimed"},
                    *[timed(1 + n / 10, f"s-{n % 3}") for n in range(10)], long,
                    *[timed(4 + n, f"s-{n % 3}") for n in range(10)]]
    (tmp_path / "unpaced").mkdir()
    unpaced = drain(partition(tmp_path / "unpaced", events))
    (tmp_path / "paced").mkdir()
    wall = FakeWall()
    paced_part = partition(tmp_path / "paced", events, speed=1.0, wall=wall)
    wall.now += 3600  # everything is due
    paced = drain(paced_part)
    strip = lambda items: [i for i in items if not isinstance(i, Progress)] + [items[-1]]  # noqa: E731
    assert strip(paced) == strip(unpaced)
    assert sum(isinstance(i, Stamped) for i in paced) == 23


def test_untimed_and_out_of_order_lines_are_not_waited_for(tmp_path: Path) -> None:
    untimed = {"username": "bob", "type": "USER_JOINED"}
    part = partition(tmp_path, [timed(0), untimed, timed(-30)], speed=1)
    assert len([i for i in expanded(part.next_batch()) if isinstance(i, Stamped)]) == 3


def test_blocks_are_dealt_round_robin_and_cover_every_line_once(tmp_path: Path) -> None:
    events = [timed(i, session=f"s-{i}") for i in range(200)]
    layout = ReplayLayout(partitions=3, block_bytes=512)
    parts = [partition(tmp_path, events, layout=layout, index=p) for p in range(3)]
    seen = {}
    for p, part in enumerate(parts):
        for item in drain(part):
            if isinstance(item, Stamped):
                assert layout.block_of(item.event.ref.offset) % 3 == p
                seen[item.event.ref.line] = item.event.session_id
    assert seen == {i + 1: f"s-{i}" for i in range(200)}


def test_overlong_and_empty_lines_are_dead_letters(tmp_path: Path) -> None:
    items = drain(partition(tmp_path, [timed(0), "x" * 5000, "", timed(1)], max_line_bytes=1000))
    dead = {d.ref.line: d.reason for d in items if isinstance(d, DeadLetter)}
    assert dead == {2: "line is 5,000 bytes, over the limit of 1,000", 3: "empty line"}
    assert [i.event.ref.line for i in items if isinstance(i, Stamped)] == [1, 4]


def test_resume_continues_after_the_snapshot(tmp_path: Path) -> None:
    events = [timed(i) for i in range(10)]
    part = partition(tmp_path, events, batch_size=4)
    first = [i.event.ref.line for i in expanded(part.next_batch()) if isinstance(i, Stamped)]
    state = part.snapshot()
    source = part.src
    resumed = source.build_part("read", source.list_parts()[0], state)
    rest = [i.event.ref.line for i in drain(resumed) if isinstance(i, Stamped)]
    assert first + rest == list(range(1, 11))


def test_a_resumed_paced_replay_goes_on_from_its_snapshot_not_from_the_first_event(tmp_path: Path) -> None:
    part = partition(tmp_path, [timed(i) for i in range(10)], batch_size=4)
    expanded(part.next_batch())
    state = part.snapshot()
    assert state.latest is not None and state.latest > T0
    source = part.src
    source.clock = ReplayClock(event_origin=T0, wall_origin=1_000.0, speed=2.0)
    resumed = source.build_part("read", source.list_parts()[0], state)
    assert isinstance(resumed, ReplayPartition)
    assert resumed.clock.wall_time_for(state.latest) == 1_000.0, "the event the run had reached is due at once"
    assert source.build_part("read", source.list_parts()[0], None).clock == source.clock


def test_first_event_time_skips_untimed_and_bad_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "in.jsonl", ["junk", {"username": "bob", "type": "USER_JOINED"}, timed(3)])
    assert first_event_time(path) == T0 + 3


@pytest.mark.parametrize(("make", "fragment"), [
    (lambda p: p / "missing.jsonl", "does not exist"),
    (lambda p: p, "is not a regular file"),
])
def test_unreadable_inputs_are_named(tmp_path: Path, make: Callable[[Path], Path], fragment: str) -> None:
    with pytest.raises(ConvoflowError, match=fragment):
        check_readable(make(tmp_path))


@pytest.mark.parametrize(("partitions", "block_bytes", "workers"), [(3, 4096, 1), (5, 1024, 2), (2, 700, 3)])
def test_partitioning_does_not_change_results(tmp_path: Path, partitions: int, block_bytes: int, workers: int) -> None:
    from bytewax.testing import TestingSink, cluster_main

    from dataflows.flow import FlowConfig, FlowOutput, build_flow
    from samples.generate import SampleSpec, write_sample

    path = tmp_path / "sample.jsonl"
    write_sample(path, SampleSpec(sessions=30, chat_users=6, seed=3))
    origin = first_event_time(path)

    def outputs(layout: ReplayLayout, workers: int) -> dict[str, list[str]]:
        out: list[tuple[str, list[dict]]] = []
        source = ReplaySource(path, layout=layout, clock=ReplayClock(origin, 0.0, 0.0))
        outputs = [FlowOutput("test", TestingSink(out))]
        cluster_main(build_flow(source, outputs, FlowConfig(layout=layout, time_origin=origin)), [], 0,
                     worker_count_per_proc=workers)
        by_kind: dict[str, list[str]] = {}
        for kind, records in out:
            by_kind.setdefault(kind, []).extend(orjson.dumps(r).decode() for r in records)
        return {kind: sorted(lines) for kind, lines in by_kind.items()}

    reference = outputs(ReplayLayout(), 1)
    assert len(reference["windows"]) > 100 and reference["late"] and reference["dead_letter"]
    assert outputs(ReplayLayout(partitions, block_bytes), workers) == reference
