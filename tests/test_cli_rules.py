"""The command line with a rules stream: the same moderation for any workers, processes and speed; `rules check`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import pytest

from cli import main

T0 = 1_709_542_800.0  # 2024-03-04T09:00:00Z
WORDS = ["darn", "scam link", "refund", "fee", "premium"]


def write_lines(path: Path, records: list[dict[str, Any]]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(r) + b"\n" for r in records))
    return path


@pytest.fixture(scope="module")
def events(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Six sessions over 20 s of event time, each message naming one word or none."""
    records = []
    for i in range(240):
        word = WORDS[i % 6] if i % 6 < len(WORDS) else "nothing"
        if i % 3 == 0:
            records.append({"username": f"user{i % 4}", "room": f"room-{i % 2}", "type": "USER_MESSAGE",
                            "text": f"hello {word} {i}", "timestamp": T0 + i / 12})
        else:
            records.append({"session_id": f"s-{i % 4}", "sender": "customer" if i % 2 else "rm",
                            "message": f"about the {word}, {i}", "timestamp": T0 + i / 12})
    return write_lines(tmp_path_factory.mktemp("rules") / "events.jsonl", records)


@pytest.fixture(scope="module")
def rules(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Rules arriving during the replay, some effective later than they arrive, one retroactive, one stale."""
    def at(seconds: float) -> str:
        return f"2024-03-04T09:00:{seconds:06.3f}Z"

    records: list[dict[str, Any]] = [
        {"id": "bw-1", "kind": "blocked_words", "version": 1, "scope": "global",
         "body": {"words": ["darn"], "action": "mask"}},
        {"id": "bw-2", "kind": "blocked_words", "version": 1, "timestamp": at(4), "scope": {"room": "s-1"},
         "body": {"words": ["scam link"], "action": "block"}},
        {"id": "bw-1", "kind": "blocked_words", "version": 2, "timestamp": at(5), "effective_from": at(9),
         "scope": "global", "body": {"words": ["darn", "refund"], "action": "mask"}},
        {"id": "bw-3", "kind": "blocked_words", "version": 1, "timestamp": at(7), "effective_from": at(2),
         "scope": "global", "body": {"words": ["fee"], "action": "flag"}},
        {"id": "perm", "kind": "user_permission", "version": 1, "timestamp": at(8), "scope": "global",
         "body": {"user": "user1", "role": "muted"}},
        {"id": "bw-1", "kind": "blocked_words", "version": 1, "timestamp": at(10), "scope": "global",
         "body": {"words": ["premium"], "action": "block"}},
        {"id": "bw-2", "kind": "blocked_words", "version": 2, "timestamp": at(12), "deleted": True},
        {"id": "broken", "kind": "blocked_words", "version": 1, "timestamp": at(13), "scope": "global",
         "body": {"words": [], "action": "mask"}},
    ]
    return write_lines(tmp_path_factory.mktemp("rules") / "rules.jsonl", records)


def run(events: Path, rules: Path, out: Path, *extra: str) -> dict[str, list[dict[str, Any]]]:
    assert main(["run", "--input", str(events), "--rules", str(rules), "--out-dir", str(out), "--quiet",
                 "--no-patterns", *extra]) == 0
    return {kind: [orjson.loads(line) for line in (out / f"{kind}.jsonl").read_bytes().splitlines()]
            for kind in ("messages", "moderated", "dead_letter", "windows")}


def decisions(outputs: dict[str, list[dict[str, Any]]]) -> list[tuple[str, str, str, str]]:
    return sorted((r["event_id"], r["moderation"]["action"], r["text"], orjson.dumps(r["moderation"]).decode())
                  for r in outputs["messages"] + outputs["moderated"])


def test_moderation_is_the_same_for_any_workers_processes_and_speed(events: Path, rules: Path, tmp_path: Path) -> None:
    reference = run(events, rules, tmp_path / "1x1", "--speed-factor", "0")
    by_event = {r["event_id"]: r for r in reference["messages"] + reference["moderated"]}
    text = {r["event_id"]: r for r in reference["messages"] + reference["moderated"]}

    def action_of(fragment: str, seconds_from: float, seconds_to: float) -> set[str]:
        return {r["moderation"]["action"] for r in text.values()
                if fragment in r["text"] and seconds_from <= _seconds(r) < seconds_to}

    assert action_of("***", 0, 20) == {"mask"}
    assert {r["moderation"]["action"] for r in reference["moderated"]} == {"block"}
    refunds_early = [r for r in by_event.values() if "refund" in r["text"] and _seconds(r) < 9]
    assert refunds_early and all(r["moderation"]["action"] == "allow" for r in refunds_early), "v2 is effective at 9 s"
    fees = {r["moderation"]["action"] for r in by_event.values() if " fee" in r["text"] and 2 <= _seconds(r) < 7}
    assert fees == {"allow"}, "a rule never applies before it arrives, whatever its effective_from says"
    assert any("scam link" in r["text"] for r in reference["moderated"]), "the room rule blocks in s-1"
    assert any("rules" == d["step"] and "broken" in d["reason"] for d in reference["dead_letter"])
    assert not any(r["username"] == "user1" and _seconds(r) >= 8 for r in reference["messages"]), "muted from 8 s"

    for name, extra in {"1x2": ["--workers", "2"], "2x1-paced": ["--processes", "2", "--speed-factor", "8"],
                        "1x1-paced-blocks": ["--speed-factor", "5", "--block-kib", "4"]}.items():
        other = run(events, rules, tmp_path / name, *extra)
        assert decisions(other) == decisions(reference), name
        assert sorted(map(orjson.dumps, other["windows"])) == sorted(map(orjson.dumps, reference["windows"])), name


def test_a_user_keyed_pattern_in_the_rules_file_matches_chat_users(events: Path, tmp_path: Path) -> None:
    """The rules file is read at start to know whether chat events must reach their users' shards: here they do."""
    burst = {"id": "burst", "key": "user", "within_seconds": 2, "steps": [
        {"name": "first", "where": {"message": True}}, {"name": "more", "where": {"message": True}, "times": 2}]}
    rules = write_lines(tmp_path / "rules.jsonl", [{"id": "p-burst", "kind": "pattern", "version": 1,
                                                     "scope": "global", "body": burst}])
    out = tmp_path / "out"
    run(events, rules, out, "--speed-factor", "0")
    alerts = [orjson.loads(line) for line in (out / "alerts.jsonl").read_bytes().splitlines()]
    chat_users = {a["key"] for a in alerts if "/" not in a["key"]}  # conversation users are `session/sender`
    assert chat_users == {"user0", "user1", "user2", "user3"}
    assert all(len({e["event_id"] for e in a["events"]}) == 3 for a in alerts)


def _seconds(record: dict[str, Any]) -> float:
    from datetime import datetime

    return datetime.fromisoformat(record["timestamp"]).timestamp() - T0


def test_rules_check_prints_what_each_rule_does_and_fails_on_a_bad_one(
    rules: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["rules", "check", str(rules)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "bw-1 v1: masks 'darn' everywhere"
    assert out[1] == "bw-2 v1: blocks messages with 'scam link' in room 's-1' from 2024-03-04T09:00:04+00:00"
    assert "bw-1 v1: ignored, a version as high was already given" in out
    assert any(line.startswith("line 8: rejected: rule 'broken' v1: field 'body.words'") for line in out)
    assert out[-1] == f"6 rules applied, 1 ignored as stale, 1 rejected in {rules}"
    good = write_lines(tmp_path / "good.jsonl", [{"id": "lm", "kind": "language_model", "version": 1,
                                                   "scope": "global", "body": {"language": "es", "model": "qwen"}}])
    assert main(["rules", "check", str(good)]) == 0
    assert "lm v1: translates to 'es' with model 'qwen' everywhere" in capsys.readouterr().out
