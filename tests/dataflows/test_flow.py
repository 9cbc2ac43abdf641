"""The whole dataflow on `bytewax.testing` inputs."""

import pickle
from collections.abc import Callable
from typing import Any

import polars as pl
import pytest
from bytewax.testing import TestingSource
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.event_frame import events_frame
from dataflows.flow import FlowConfig, ShardLogic, build_flow, chat_shards, routed_frame, shard_of
from dataflows.events import DeadLetter, Event
from dataflows.sequencing import DONE, Progress, ReplayLayout, Stamped, replay_items
from dataflows.windows import WindowConfig
from tests.conftest import run_by_kind
from tests.conftest import jsonl

ONE_BLOCK = ReplayLayout(partitions=1, block_bytes=DONE)
T = "2024-01-01T10:00:{:02d}+00:00"


def run(lines: list[str], workers: int = 1, **config: Any) -> dict[str, list[dict[str, Any]]]:
    source: TestingSource[Stamped | DeadLetter | Progress] = TestingSource(replay_items(lines))
    return run_by_kind(lambda output: build_flow(source, [output], FlowConfig(layout=ONE_BLOCK, **config)), workers)


def texts(window: dict[str, Any]) -> list[str]:
    return [m["text"] for m in window["messages"]]


def test_every_event_is_a_message_and_lands_in_one_window(conversation: Callable[..., dict]) -> None:
    out = run(jsonl(conversation(message="a", timestamp=T.format(1)), conversation(sender="rm", message="b", timestamp=T.format(5))))
    assert [m["text"] for m in out["messages"]] == ["a", "b"]
    (window,) = out["windows"]
    assert window["window_start"] == "2024-01-01T10:00:00+00:00"
    assert window["window_end"] == "2024-01-01T10:00:30+00:00"
    assert texts(window) == ["a", "b"]
    assert window["counts"] == {"customer": 1, "rm": 1}


def test_window_boundary_splits_at_exactly_size(conversation: Callable[..., dict]) -> None:
    out = run(jsonl(conversation(message="a", timestamp=T.format(29)), conversation(message="b", timestamp=T.format(30))))
    assert sorted((w["window_start"][-14:-6], texts(w)) for w in out["windows"]) == [("10:00:00", ["a"]), ("10:00:30", ["b"])]


def test_out_of_order_within_tolerance_is_kept_and_merged_in_time_order(conversation: Callable[..., dict]) -> None:
    lines = jsonl(
        conversation(message="first", timestamp=T.format(20)),
        conversation(message="third", timestamp=T.format(33)),
        conversation(sender="rm", message="second", timestamp=T.format(29)),
    )
    out = run(lines)
    assert out["late"] == []
    assert [texts(w) for w in out["windows"]] == [["first", "second"], ["third"]]


def test_event_after_its_window_was_emitted_goes_to_late_with_that_window(conversation: Callable[..., dict]) -> None:
    lines = jsonl(
        conversation(message="a", timestamp=T.format(1)),
        conversation(session_id="other", message="clock", timestamp=T.format(50)),
        conversation(message="late", timestamp=T.format(2)),
    )
    out = run(lines)
    (late,) = out["late"]
    assert late["event"]["text"] == "late"
    assert (late["window_start"], late["window_end"]) == (T.format(0), T.format(30))
    assert late["watermark"] == T.format(45)
    assert [texts(w) for w in out["windows"] if w["session_id"] == "s-1"] == [["a"]]
    assert "late" in [m["text"] for m in out["messages"]], "late events are still accepted messages"


def test_late_event_after_session_state_is_gone_does_not_reemit_the_window(conversation: Callable[..., dict]) -> None:
    """Bytewax 0.21.1's tumbling windower forgets a key once it has no open window; a late
    event then reopens the same window id and emits it a second time."""
    lines = jsonl(
        conversation(message="a", timestamp=T.format(1)),
        conversation(session_id="other", message="x", timestamp="2024-01-01T10:05:00+00:00"),
        conversation(message="late", timestamp=T.format(3)),
        conversation(session_id="other", message="y", timestamp="2024-01-01T10:10:00+00:00"),
    )
    out = run(lines)
    s1 = [w for w in out["windows"] if w["session_id"] == "s-1"]
    assert [(w["window_start"], texts(w)) for w in s1] == [(T.format(0), ["a"])]
    assert [l["event"]["text"] for l in out["late"]] == ["late"]


def test_untimed_event_takes_the_replay_clock(conversation: Callable[..., dict], chat: Callable[..., dict]) -> None:
    lines = jsonl(conversation(message="a", timestamp=T.format(12)), chat(timestamp=...), conversation(message="b", timestamp=T.format(14)))
    out = run(lines)
    untimed = next(m for m in out["messages"] if m["shape"] == "chat")
    assert (untimed["timestamp"], untimed["time_source"]) == (T.format(12), "system")


def test_untimed_event_before_any_timed_one_takes_the_clock_origin(chat: Callable[..., dict]) -> None:
    out = run(jsonl(chat(timestamp=...)), time_origin=1_704_103_207.0)
    assert out["messages"][0]["timestamp"] == T.format(7)


def test_open_windows_are_flushed_at_end_of_input(conversation: Callable[..., dict]) -> None:
    out = run(jsonl(*(conversation(session_id=f"s-{i}", timestamp=T.format(i)) for i in range(5))))
    assert sorted(w["session_id"] for w in out["windows"]) == [f"s-{i}" for i in range(5)]


def test_dead_letters_carry_line_raw_and_reason(conversation: Callable[..., dict]) -> None:
    out = run(jsonl(conversation(), "not json", conversation(sender="bot")))
    assert [(d["line"], d["raw"][:8]) for d in out["dead_letter"]] == [(2, "not json"), (3, '{"sessio')]
    assert all(d["reason"] for d in out["dead_letter"])
    assert len(out["messages"]) == 1


def test_window_size_and_tolerance_are_configurable(conversation: Callable[..., dict]) -> None:
    lines = jsonl(conversation(message="a", timestamp=T.format(1)), conversation(message="b", timestamp=T.format(12)), conversation(message="c", timestamp=T.format(3)))
    out = run(lines, window=WindowConfig(size=10, out_of_orderness=1))
    assert [texts(w) for w in out["windows"]] == [["a"], ["b"]]
    assert [l["event"]["text"] for l in out["late"]] == ["c"]


def test_shard_of_is_stable() -> None:
    assert shard_of("s-1", 64) == shard_of("s-1", 64)
    assert len({shard_of(f"s-{i}", 64) for i in range(500)}) == 64


@pytest.mark.parametrize("workers", [2, 3])
def test_same_outputs_with_several_workers(conversation: Callable[..., dict], workers: int) -> None:
    lines = jsonl(*(
        conversation(session_id=f"s-{i % 7}", sender="rm" if i % 3 else "customer", message=f"m{i}",
                     timestamp=f"2024-01-01T10:{(i * 7 // 60) % 60:02d}:{(i * 7) % 60:02d}+00:00")
        for i in range(300)
    ), "broken")

    def canonical(out: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
        return {k: sorted(map(repr, v)) for k, v in out.items()}

    assert canonical(run(lines, workers=workers)) == canonical(run(lines))


def test_a_chat_user_in_rooms_on_other_shards_gives_the_outputs_of_one_shard(chat: Callable[..., dict]) -> None:
    from pathlib import Path

    from connectors.files.patterns_file import load_patterns

    patterns = load_patterns(Path(__file__).parent.parent.parent / "samples" / "patterns.yaml")
    rooms = [f"r-{i}" for i in range(20)]
    away = [room for room in rooms if shard_of(room, 8) != shard_of("eve", 8)][:3]
    home = [room for room in rooms if shard_of(room, 8) == shard_of("eve", 8)][:1]
    assert len(away) == 3 and home, "rooms on eve's shard and on others"
    lines = jsonl(
        chat(username="eve", type="USER_JOINED", text="", room=away[0], timestamp=1704103200),
        *(chat(username="eve", text=f"buy {i}?", room=(away + home)[i % 4], timestamp=1704103210 + i) for i in range(6)),
        chat(username="bob", text="No.", room=away[0], timestamp=1704103217),
        chat(username="eve", text="thanks", room=away[0], timestamp=1704103219),
    )

    def canonical(out: dict[str, list[dict[str, Any]]]) -> dict[str, list[str]]:
        return {k: sorted(map(repr, v)) for k, v in out.items()}

    split = run(lines, shards=8, patterns=patterns)
    assert len(split["messages"]) == 9, "each message is output once, by its room's shard"
    assert sum(len(w["messages"]) for w in split["windows"]) == 9
    assert {(a["pattern"], a["key"]) for a in split["alerts"]} >= {("spam_burst", "eve"), ("engagement", away[0])}
    assert canonical(split) == canonical(run(lines, shards=1, patterns=patterns))


def test_alerts_from_session_and_user_patterns_with_any_worker_count(chat: Callable[..., dict]) -> None:
    from pathlib import Path

    from connectors.files.patterns_file import load_patterns

    patterns = load_patterns(Path(__file__).parent.parent.parent / "samples" / "patterns.yaml")
    lines = jsonl(
        chat(username="zoe", type="USER_JOINED", text="", room="r-1", timestamp=1704103200),
        *(chat(username="eve", text=f"buy {i}", room=f"r-{i % 3}", timestamp=1704103210 + i) for i in range(6)),
        chat(username="ana", type="USER_JOINED", text="", room="r-2", timestamp=1704103300),
        chat(username="ana", text="How do I pay?", room="r-2", timestamp=1704103303),
        chat(username="joe", text="Use the app.", room="r-2", timestamp=1704103309),
        chat(username="ana", text="merci", room="r-2", timestamp=1704103312),
    )

    def alerts(workers: int) -> list[tuple[str, str, str]]:
        out = run(lines, workers=workers, patterns=patterns)
        return sorted((a["pattern"], a["key"], a["detected_at"]) for a in out["alerts"])

    expected = alerts(1)
    assert ("spam_burst", "eve", "2024-01-01T10:00:14+00:00") in expected, "a user's burst across rooms"
    assert ("abandonment", "zoe", "2024-01-01T10:02:00+00:00") in expected
    assert ("engagement", "r-2", "2024-01-01T10:01:52+00:00") in expected
    assert alerts(3) == expected


def frame_items(lines: list[str]) -> list[Any]:
    """What a one-partition replay source emits for `lines`: their events as one stamped frame."""
    stamped = [item for item in replay_items(lines) if isinstance(item, Stamped)]
    rest = [item for item in replay_items(lines) if not isinstance(item, Stamped)]
    frame = events_frame(s.event for s in stamped).with_columns(
        pl.Series("block", [s.block for s in stamped], dtype=pl.Int64),
        pl.Series("clock_before", [s.clock_before for s in stamped], dtype=pl.Float64),
    )
    return [frame, *rest]


@pytest.mark.parametrize("workers", [1, 2])
def test_events_as_frames_give_the_outputs_of_events_one_by_one(chat: Callable[..., dict], workers: int) -> None:
    from pathlib import Path

    from connectors.files.patterns_file import load_patterns

    patterns = load_patterns(Path(__file__).parent.parent.parent / "samples" / "patterns.yaml")
    lines = jsonl(*(
        chat(username=f"u{i % 5}", text=f"buy {i}?", room=f"r-{i % 3}", timestamp=1704103200 + 2 * i + (i % 4))
        for i in range(120)
    ), "broken", chat(username="ann", type="USER_JOINED", text="", timestamp=None))

    def outputs(items: list[Any]) -> dict[str, list[str]]:
        source: TestingSource[Any] = TestingSource(items)
        out = run_by_kind(lambda o: build_flow(source, [o], FlowConfig(layout=ONE_BLOCK, shards=8, patterns=patterns)),
                          workers)
        return {k: sorted(map(repr, v)) for k, v in out.items()}

    framed = outputs(frame_items(lines))
    assert len(framed["messages"]) == 121 and framed["alerts"] and len(framed["dead_letter"]) == 1
    assert framed == outputs(replay_items(lines))


events = st.builds(
    lambda n, shape, user, room, sender: Event(
        f"in:{n}", room, sender if shape == "conversation" else user, "message", "t", 1.0, "event", shape, "in", n, n,
        None, user if shape == "chat" else None, None),
    st.integers(0, 10_000), st.sampled_from(["chat", "conversation"]), st.sampled_from(["ann", "bob", "r-1", "eve"]),
    st.sampled_from(["r-1", "r-2", "r-3", "ann", "s-9"]), st.sampled_from(["customer", "rm"]),
)


@settings(max_examples=100, deadline=None)
@given(st.lists(events, max_size=40), st.integers(1, 16), st.booleans())
def test_routed_frames_place_events_where_chat_shards_does(batch: list[Event], shards: int, by_user: bool) -> None:
    frame = events_frame(batch).with_columns(pl.lit(0, pl.Int64).alias("block"), pl.lit(None, pl.Float64).alias("clock_before"))
    routed = routed_frame(frame, shards, by_user)
    expected = sorted(
        (event.event_id, shard, scope)
        for event in batch
        for shard, scope in (chat_shards(event, shards) if by_user and event.shape == "chat"
                             else ((shard_of(event.session_id, shards), "all"),))
    )
    assert sorted(routed.select("event_id", "shard", "scope").iter_rows()) == expected


def test_a_shard_snapshots_its_state_only_when_snapshots_are_kept() -> None:
    """Bytewax asks for a snapshot every epoch even without recovery: a run without recovery gets
    an empty one (pickling the buffered events stalls a paced run), one with recovery the state."""
    kept = ShardLogic(FlowConfig(), None)
    resumed = ShardLogic(FlowConfig(), kept.snapshot())
    assert resumed.state.sequencer.clock_floor() == kept.state.sequencer.clock_floor()
    assert pickle.loads(kept.snapshot()).__class__ is kept.state.__class__
    assert ShardLogic(FlowConfig(snapshots=False), None).snapshot() == b""
