"""Fuzzing the replay source: any file, cut into any blocks, gives each line exactly once, as an
event or a dead letter with its reason; a line over the limit is never held whole."""

import tempfile
import tracemalloc
from pathlib import Path

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.files.replay import ReplayPartition, ReplaySource, first_event_time
from dataflows.clock import ReplayClock
from tests.connectors.files.replay_batches import expanded
from dataflows.events import DeadLetter, Event
from dataflows.parse import RAW_EXCERPT_CHARS
from dataflows.sequencing import ReplayLayout, Stamped

T0 = 1_704_103_200.0


def event_line(n: int, text: str) -> bytes:
    return orjson.dumps({"session_id": f"s-{n % 3}", "sender": "rm", "message": text, "timestamp": T0 + n})


lines = st.one_of(
    st.builds(event_line, st.integers(0, 100), st.text(max_size=30)),
    st.builds(event_line, st.integers(0, 100), st.text(min_size=200, max_size=600)),
    st.sampled_from([b"", b" ", b"\r", b"{", b"[]", b"\xff\xfe", b'{"session_id": "s"}', b"x" * 700]),
    st.binary(max_size=80).map(lambda b: b.replace(b"\n", b"")),
)


def drain(part: ReplayPartition) -> list[Stamped | DeadLetter]:
    items: list[Stamped | DeadLetter] = []
    while True:
        try:
            items.extend(i for i in expanded(part.next_batch()) if isinstance(i, (Stamped, DeadLetter)))
        except StopIteration:
            return items


def replay(path: Path, layout: ReplayLayout, limit: int) -> dict[int, Event | DeadLetter]:
    source = ReplaySource(path, layout=layout, clock=ReplayClock(T0, 0.0, 0.0), max_line_bytes=limit, batch_size=7)
    by_line: dict[int, Event | DeadLetter] = {}
    for name in source.list_parts():
        for item in drain(source.build_part("read", name, None)):
            result = item.event if isinstance(item, Stamped) else item
            assert result.ref.line not in by_line, f"line {result.ref.line} read twice"
            by_line[result.ref.line] = result
    return by_line


@settings(max_examples=40, deadline=None)
@given(st.lists(lines, max_size=25), st.booleans(), st.integers(1, 3), st.integers(32, 1500), st.integers(20, 800))
def test_every_line_is_read_once_as_an_event_or_a_reasoned_dead_letter(
    body: list[bytes], final_newline: bool, partitions: int, block_bytes: int, limit: int
) -> None:
    data = b"\n".join(body) + (b"\n" if final_newline and body else b"")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "in.jsonl"
        path.write_bytes(data)
        by_line = replay(path, ReplayLayout(partitions, block_bytes), limit)
    expected = data.split(b"\n")
    if expected[-1] == b"":
        expected.pop()
    assert sorted(by_line) == list(range(1, len(expected) + 1))
    for number, raw in enumerate(expected, start=1):
        result = by_line[number]
        if len(raw) > limit:
            assert isinstance(result, DeadLetter)
            assert result.reason == f"line is {len(raw):,} bytes, over the limit of {limit:,}"
            assert "\n" not in result.raw and len(result.raw) <= RAW_EXCERPT_CHARS, "an excerpt of that line only"
        elif not raw.strip():
            assert isinstance(result, DeadLetter) and result.reason == "empty line"
        elif isinstance(result, DeadLetter):
            assert result.reason
        else:
            assert result.text == orjson.loads(raw)["message"]


def test_a_line_of_many_megabytes_is_skipped_in_bounded_memory(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    with path.open("wb") as f:
        f.write(event_line(1, "before") + b"\n" + b'{"message": "' + b"x" * (24 << 20) + b'"}\n' + event_line(2, "after") + b"\n")
    tracemalloc.start()
    try:
        by_line = replay(path, ReplayLayout(1, 64 << 10), 4096)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert by_line[2] == DeadLetter(by_line[2].ref, by_line[2].raw, f"line is {(24 << 20) + 15:,} bytes, over the limit of 4,096")
    assert by_line[2].raw.startswith('{"message": "xxx')
    assert [by_line[n].text for n in (1, 3)] == ["before", "after"]
    assert peak < 1 << 20, f"peak {peak:,} bytes"


def test_the_limit_is_the_sources_parameter_for_lines_in_and_past_a_block(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    line = event_line(1, "y" * 3000)
    path.write_bytes(line + b"\n" + line + b"\n")
    for block_bytes in (64, 1 << 20):
        assert all(isinstance(r, Event) for r in replay(path, ReplayLayout(1, block_bytes), len(line)).values())
        dead = replay(path, ReplayLayout(1, block_bytes), len(line) - 1)
        assert {r.reason for r in dead.values()} == {f"line is {len(line):,} bytes, over the limit of {len(line) - 1:,}"}


def test_first_event_time_skips_lines_over_the_limit(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(event_line(0, "z" * 5000) + b"\n" + event_line(7, "short") + b"\n")
    assert first_event_time(path, max_line_bytes=1000) == T0 + 7
    assert first_event_time(path) == T0
