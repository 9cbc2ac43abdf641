"""Tests for the seeded JSONL sample generator."""

from __future__ import annotations

import json
from collections import Counter, defaultdict
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from samples.generate import SampleSpec, generate_lines, sessions_for_events, write_sample

TARGET_LINES = 5_000
CHAT_TYPES = {"USER_JOINED", "USER_MESSAGE", "USER_LEFT"}
LANGUAGES = {"en", "es", "fr", "de"}


def parse(line: str) -> tuple[str, dict | None, datetime | None]:
    """Classify a line as ("conversation" | "chat" | "malformed", object, timestamp or None)."""
    try:
        obj = json.loads(line)
    except ValueError:
        return "malformed", None, None
    if not isinstance(obj, dict):
        return "malformed", None, None
    if "session_id" in obj:
        ok = (isinstance(obj["session_id"], str) and obj.get("sender") in {"customer", "rm"}
              and isinstance(obj.get("message"), str))
        shape = "conversation"
    else:
        ok = (isinstance(obj.get("username"), str) and isinstance(obj.get("text"), str)
              and obj.get("type") in CHAT_TYPES and obj.get("preferredLanguage") in LANGUAGES)
        shape = "chat"
    if not ok:
        return "malformed", obj, None
    if "timestamp" not in obj:
        return shape, obj, None
    raw = obj["timestamp"]
    if shape == "chat":
        if not isinstance(raw, int):
            return "malformed", obj, None
        seconds = raw / 1000 if raw > 10**11 else raw
        return shape, obj, datetime.fromtimestamp(seconds, timezone.utc)
    try:
        moment = datetime.fromisoformat(raw.replace("Z", "+00:00"))
    except (AttributeError, ValueError):
        return "malformed", obj, None
    return shape, obj, moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def lags(lines: list[str]) -> list[float]:
    """Seconds each timestamped line trails the newest timestamp written before it (0 when in order)."""
    newest: datetime | None = None
    out = []
    for line in lines:
        _, _, moment = parse(line)
        if moment is None:
            continue
        out.append(0.0 if newest is None else max(0.0, (newest - moment).total_seconds()))
        newest = moment if newest is None else max(newest, moment)
    return out


@pytest.fixture(scope="module")
def spec() -> SampleSpec:
    return SampleSpec(sessions=sessions_for_events(TARGET_LINES))


@pytest.fixture(scope="module")
def lines(spec: SampleSpec) -> list[str]:
    return list(generate_lines(spec))


@pytest.fixture(scope="module")
def parsed(lines: list[str]) -> list[tuple[str, dict | None, datetime | None]]:
    return [parse(line) for line in lines]


def test_same_spec_gives_identical_lines(lines: list[str], spec: SampleSpec) -> None:
    assert list(generate_lines(spec)) == lines


def test_other_seed_gives_different_lines(lines: list[str], spec: SampleSpec) -> None:
    other = SampleSpec(sessions=spec.sessions, seed=spec.seed + 1)
    assert list(generate_lines(other)) != lines


def test_sessions_for_events_hits_the_requested_size(lines: list[str]) -> None:
    assert abs(len(lines) - TARGET_LINES) < 0.15 * TARGET_LINES
    small = list(generate_lines(SampleSpec(sessions=sessions_for_events(1_000))))
    assert abs(len(small) - 1_000) < 0.25 * 1_000
    assert sessions_for_events(0) == 1


def test_every_line_is_non_empty_and_single_line(lines: list[str]) -> None:
    assert all(line.strip() and "\n" not in line for line in lines)


def test_both_shapes_present_with_chat_about_a_fifth(parsed: list) -> None:
    shapes = Counter(kind for kind, _, _ in parsed)
    assert shapes["conversation"] > 0
    assert 0.1 < shapes["chat"] / len(parsed) < 0.35


def test_conversation_events_look_like_rm_customer_sessions(parsed: list) -> None:
    by_session: dict[str, list[dict]] = defaultdict(list)
    forms: Counter[str] = Counter()
    for kind, obj, _ in parsed:
        if kind != "conversation":
            continue
        by_session[obj["session_id"]].append(obj)
        raw = obj.get("timestamp", "")
        forms["ms" if "." in raw else "Z" if raw.endswith("Z") else "offset" if raw.endswith("+00:00") else "naive"] += 1
    assert all(4 <= len(events) <= 16 for events in by_session.values())
    assert all({e["sender"] for e in events} == {"customer", "rm"} for events in by_session.values())
    messages = [e["message"] for events in by_session.values() for e in events]
    assert any(m.endswith("?") for m in messages)
    assert any("thank" in m.lower() for m in messages)
    assert forms["offset"] > forms["Z"] > 0 and forms["naive"] > 0 and forms["ms"] > 0


def test_chat_events_cover_types_languages_rooms_and_abandonment(parsed: list) -> None:
    chat = [(obj, moment) for kind, obj, moment in parsed if kind == "chat"]
    assert {obj["type"] for obj, _ in chat} == CHAT_TYPES
    assert {obj["preferredLanguage"] for obj, _ in chat} == LANGUAGES
    assert any("room" in obj for obj, _ in chat) and any("room" not in obj for obj, _ in chat)
    assert all(obj["text"] == "" for obj, _ in chat if obj["type"] != "USER_MESSAGE")
    stamps = [obj["timestamp"] for obj, _ in chat if "timestamp" in obj]
    assert any(s > 10**11 for s in stamps) and sum(s < 10**11 for s in stamps) > len(stamps) / 2
    texts = " ".join(obj["text"].lower() for obj, _ in chat)
    assert all(word in texts for word in ("gracias", "merci", "danke"))
    written = {obj["username"] for obj, _ in chat if obj["type"] == "USER_MESSAGE"}
    assert {obj["username"] for obj, _ in chat if obj["type"] == "USER_JOINED"} - written


def test_chat_has_spam_bursts(parsed: list) -> None:
    sent: dict[str, list[datetime]] = defaultdict(list)
    for kind, obj, moment in parsed:
        if kind == "chat" and obj["type"] == "USER_MESSAGE" and moment is not None:
            sent[obj["username"]].append(moment)
    window = timedelta(seconds=10.999)
    assert any(
        times[i + 4] - times[i] <= window
        for times in (sorted(t) for t in sent.values())
        for i in range(len(times) - 4)
    )


def test_malformed_lines_do_not_parse_or_lack_fields(parsed: list, spec: SampleSpec) -> None:
    broken = sum(kind == "malformed" for kind, _, _ in parsed)
    expected = spec.malformed_fraction * len(parsed)
    assert 0.3 * expected < broken < 2.5 * expected


def test_configured_fractions_are_roughly_respected() -> None:
    dirty = SampleSpec(sessions=sessions_for_events(TARGET_LINES), out_of_order_fraction=0.08,
                       late_fraction=0.03, malformed_fraction=0.05, no_timestamp_fraction=0.04)
    lines = list(generate_lines(dirty))
    kinds = [parse(line) for line in lines]
    n = len(lines)
    assert sum(k == "malformed" for k, _, _ in kinds) == pytest.approx(0.05 * n, rel=0.3)
    assert sum(k != "malformed" and m is None for k, _, m in kinds) == pytest.approx(0.04 * n, rel=0.3)
    lagging = lags(lines)
    assert sum(lag >= 60 for lag in lagging) == pytest.approx(0.03 * n, rel=0.3)
    assert sum(1 <= lag < 60 for lag in lagging) == pytest.approx(0.08 * n, rel=0.4)


def test_disorder_is_either_within_tolerance_or_clearly_late(lines: list[str]) -> None:
    lagging = lags(lines)
    assert sum(1 <= lag < 5 for lag in lagging) > 0
    assert sum(lag >= 60 for lag in lagging) > 0
    assert not [lag for lag in lagging if 5 <= lag < 60]
    assert max(lagging) <= 181


def test_some_valid_events_have_no_timestamp(parsed: list) -> None:
    missing = {kind for kind, obj, _ in parsed if kind != "malformed" and "timestamp" not in obj}
    assert missing == {"conversation", "chat"}


def test_timestamps_stay_near_start(parsed: list, spec: SampleSpec) -> None:
    moments = [moment for kind, _, moment in parsed if kind != "malformed" and moment is not None]
    assert min(moments) >= spec.start
    assert max(moments) <= spec.start + timedelta(hours=3)


def test_write_sample_returns_the_number_of_lines(tmp_path: Path) -> None:
    spec = SampleSpec(sessions=30, seed=3)
    path = tmp_path / "sample.jsonl"
    count = write_sample(path, spec)
    text = path.read_text(encoding="utf-8")
    assert text.endswith("\n")
    assert text.splitlines() == list(generate_lines(spec))
    assert count == len(text.splitlines())


def test_naive_start_is_rejected() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        SampleSpec(start=datetime(2024, 3, 4, 9, 0))
