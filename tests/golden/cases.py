"""The inputs of the golden test: seeded, small, each aimed at one part of the core.

Each case writes its input (and rules) into a folder and names the `run` options that go with them.
The golden files next to this module hold, per case and output file, a digest of every record
today's core wrote for it (`python -m tests.golden.record` writes them; do that only for a change
of output that is meant, and say so in the commit).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from cli import main
from samples.generate import SampleSpec, generate_lines
from tests.conftest import jsonl_counts

ROOT = Path(__file__).resolve().parent.parent.parent
GOLDEN_DIR = Path(__file__).resolve().parent
T0 = datetime(2024, 3, 4, 9, 0, tzinfo=timezone.utc)
OUTPUTS = ("messages", "windows", "late", "alerts", "moderated", "dead_letter")
DIGEST_CHARS = 16


@dataclass(frozen=True)
class Case:
    """A golden input: `write(folder)` writes it and returns the `run` options that read it."""

    name: str
    write: Callable[[Path], list[str]]
    paced_speed: float | None = None
    """A speed factor that replays this input in a few seconds, for the paced run; None: not paced."""


def _lines(path: Path, lines: Iterator[str] | list[str]) -> Path:
    path.write_text("".join(f"{line}\n" for line in lines), encoding="utf-8")
    return path


def _conversations(rng: random.Random, sessions: int, events: int, gap: float, start_spread: float) -> list[tuple[float, dict]]:
    """`events` messages per session, `gap` seconds apart on average, sessions starting within `start_spread` s."""
    out = []
    for s in range(sessions):
        at = rng.uniform(0, start_spread)
        for i in range(events):
            sender = "customer" if i % 2 == 0 else "rm"
            out.append((at, {"session_id": f"s-{s:05d}", "sender": sender, "message": f"{sender} line {i} of s-{s}"}))
            at += rng.uniform(0.2 * gap, 1.8 * gap)
    return out


def _timed(items: list[tuple[float, dict]]) -> list[str]:
    return [json.dumps({**event, "timestamp": (T0 + timedelta(seconds=at)).isoformat()}) for at, event in sorted(items, key=lambda x: x[0])]


def write_sample(folder: Path) -> list[str]:
    return ["--input", str(ROOT / "samples" / "conversations.jsonl"), "--rules", str(ROOT / "samples" / "rules.jsonl")]


def write_dense(folder: Path) -> list[str]:
    """About 10 events per session window: 300 sessions x 24 messages 3 s apart (7,200 events)."""
    items = _conversations(random.Random(19), sessions=300, events=24, gap=3.0, start_spread=20.0)
    return ["--input", str(_lines(folder / "dense.jsonl", _timed(items)))]


def write_sparse(folder: Path) -> list[str]:
    """Under one event per window: 3,000 sessions x 2 messages 90 s apart, over ten minutes."""
    items = _conversations(random.Random(23), sessions=3000, events=2, gap=90.0, start_spread=600.0)
    return ["--input", str(_lines(folder / "sparse.jsonl", _timed(items)))]


def write_chat(folder: Path) -> list[str]:
    """Chat rooms with joins and preferred languages, from the sample generator, and its four patterns."""
    spec = SampleSpec(sessions=20, chat_users=150, seed=11)
    return ["--input", str(_lines(folder / "chat.jsonl", generate_lines(spec)))]


def write_disorder(folder: Path) -> list[str]:
    """Events up to 15 s out of order (with a 5 s bound, so some are late), untimed ones, every timestamp form."""
    rng = random.Random(29)
    items = _conversations(rng, sessions=200, events=20, gap=4.0, start_spread=30.0)
    shown = [(at + (rng.uniform(0.0, 15.0) if rng.random() < 0.15 else 0.0), at, event) for at, event in items]
    lines = []
    for _, at, event in sorted(shown, key=lambda x: x[0]):
        moment, form = T0 + timedelta(seconds=at), rng.random()
        if form < 0.03:
            lines.append(json.dumps(event))  # no timestamp: takes the replay clock
            continue
        stamp: object = (moment.isoformat() if form < 0.6 else moment.isoformat().replace("+00:00", "Z") if form < 0.7
                         else moment.replace(tzinfo=None).isoformat() if form < 0.8 else round(moment.timestamp())
                         if form < 0.9 else int(moment.timestamp() * 1000))
        lines.append(json.dumps({**event, "timestamp": stamp}))
    return ["--input", str(_lines(folder / "disorder.jsonl", lines))]


MALFORMED = [
    "this is not json",
    '{"session_id": "s-1", "sender": "customer", "message": "cut off',
    "[1, 2, 3]",
    '"a string"',
    "",
    "   ",
    '{"sender": "customer", "message": "no session", "timestamp": "2024-03-04T09:00:05Z"}',
    '{"session_id": "s-1", "message": "no sender", "timestamp": "2024-03-04T09:00:05Z"}',
    '{"session_id": "s-1", "sender": "customer", "timestamp": "2024-03-04T09:00:05Z"}',
    '{"session_id": "s-1", "sender": "customer", "message": "bad time", "timestamp": "yesterday"}',
    '{"session_id": "s-1", "sender": "customer", "message": "bad time", "timestamp": "2024-13-45T99:00:00Z"}',
    '{"session_id": 7, "sender": "customer", "message": "session is a number", "timestamp": "2024-03-04T09:00:05Z"}',
    '{"session_id": "s-1", "sender": ["rm"], "message": "sender is a list", "timestamp": "2024-03-04T09:00:05Z"}',
    '{"username": "ann", "type": "USER_MESSAGE", "timestamp": 1709542805}',
    '{"username": "ann", "text": "no type", "timestamp": 1709542805}',
    '{"username": "", "text": "empty user", "type": "USER_MESSAGE", "timestamp": 1709542805}',
    '{"session_id": "s-1", "sender": "customer", "message": "far future", "timestamp": 99999999999999999}',
    '{"session_id": "s-1", "sender": "customer", "message": "' + "x" * 3000 + '", "timestamp": "2024-03-04T09:00:05Z"}',
]


def write_malformed(folder: Path) -> list[str]:
    """Malformed lines of every kind among good ones, bytes that are not UTF-8 and a line over the limit."""
    good = _timed(_conversations(random.Random(31), sessions=40, events=10, gap=5.0, start_spread=20.0))
    rng = random.Random(37)
    path = folder / "malformed.jsonl"
    with path.open("wb") as out:
        for i, line in enumerate(good):
            out.write(line.encode() + b"\n")
            if i % 20 == 5:
                out.write(MALFORMED[(i // 20) % len(MALFORMED)].encode() + b"\n")
            if i % 97 == 50:
                out.write(b'{"session_id": "s-1", "sender": "rm", "message": "caf\xe9", "timestamp": 1709542805}\n')
            if rng.random() < 0.01:
                out.write(b"\xff\xfe not utf-8 at all\n")
        out.write(b'{"session_id": "s-9", "sender": "rm", "message": "no newline at the end", "timestamp": 1709542900}')
    return ["--input", str(path), "--max-line-bytes", "2048"]


EVASIONS = ["darn", "DARN", "d a r n", "d.a.r.n", "d-a-r-n", "dаrn", "ｄａｒｎ", "da\u200brn", "scam link", "scam  l.i.n.k"]


def write_rules(folder: Path) -> list[str]:
    """A rules stream with versions, scopes, pattern rules, muted users, a bad rule and evasion tricks."""
    spec = SampleSpec(sessions=60, chat_users=40, seed=41)
    rng = random.Random(43)
    lines = list(generate_lines(spec))
    out = []
    for i, line in enumerate(lines):
        out.append(line)
        if i % 15 == 7:
            event = json.loads(lines[i - 1]) if lines[i - 1].startswith("{") else None
            if isinstance(event, dict) and isinstance(event.get("timestamp"), str) and "session_id" in event:
                word = rng.choice(EVASIONS)
                out.append(json.dumps({**event, "message": f"well {word}, that again"}))
    start = T0.isoformat()
    later = (T0 + timedelta(minutes=4)).isoformat()
    burst = {"id": "quick_pair", "key": "session", "within_seconds": 20, "steps": [
        {"name": "ask", "where": {"question": True}}, {"name": "reply", "where": {"role": "rm"}}]}
    rules = [
        {"id": "bw-mask", "kind": "blocked_words", "version": 1, "scope": "global", "timestamp": start,
         "body": {"words": ["darn", "scam link"], "action": "mask"}},
        {"id": "bw-mask", "kind": "blocked_words", "version": 2, "scope": "global", "effective_from": later,
         "body": {"words": ["darn", "scam link", "premium"], "action": "block"}},
        {"id": "bw-mask", "kind": "blocked_words", "version": 1, "scope": "global",
         "body": {"words": ["ignored: not newer"], "action": "block"}},
        {"id": "bw-flag-s3", "kind": "blocked_words", "version": 1, "scope": {"room": "s-0003"},
         "body": {"words": ["you"], "action": "flag"}},
        {"id": "bw-tenant", "kind": "blocked_words", "version": 1, "scope": {"tenant": "acme"},
         "body": {"words": ["mortgage"], "action": "mask"}},
        {"id": "perm-muted", "kind": "user_permission", "version": 1, "scope": "global",
         "body": {"user": "bruno_3", "role": "muted"}},
        {"id": "ff-spam", "kind": "feature_flag", "version": 1, "scope": "global", "effective_from": later,
         "body": {"flag": "pattern:spam_burst", "enabled": False}},
        {"id": "lm-de", "kind": "language_model", "version": 1, "scope": "global", "body": {"language": "de", "model": "m-de"}},
        {"id": "p-pair", "kind": "pattern", "version": 1, "scope": "global", "body": burst},
        {"id": "p-pair", "kind": "pattern", "version": 2, "scope": "global", "effective_from": later,
         "body": {**burst, "enabled": False}},
        {"id": "bw-gone", "kind": "blocked_words", "version": 1, "scope": "global", "body": {"words": ["thanks"], "action": "mask"}},
        {"id": "bw-gone", "kind": "blocked_words", "version": 2, "scope": "global", "deleted": True,
         "effective_from": (T0 + timedelta(minutes=2)).isoformat()},
        {"id": "bad", "kind": "blocked_words", "version": 1, "scope": "nowhere", "body": {"words": []}},
    ]
    rules_path = _lines(folder / "rules.jsonl", [json.dumps(rule) for rule in rules])
    return ["--input", str(_lines(folder / "rules-input.jsonl", out)), "--rules", str(rules_path)]


CASES = {case.name: case for case in [
    Case("sample", write_sample, paced_speed=200.0),
    Case("dense", write_dense, paced_speed=20.0),
    Case("sparse", write_sparse),
    Case("chat", write_chat),
    Case("disorder", write_disorder),
    Case("malformed", write_malformed),
    Case("rules", write_rules),
]}


def digest(line: bytes) -> str:
    return hashlib.blake2b(line, digest_size=DIGEST_CHARS // 2).hexdigest()


def output_lines(out_dir: Path) -> dict[str, Counter[bytes]]:
    """The records of each output file with their counts (an output never written holds none)."""
    written = jsonl_counts(out_dir)
    return {f"{kind}.jsonl": written.get(f"{kind}.jsonl", Counter()) for kind in OUTPUTS}


def output_digests(lines: dict[str, Counter[bytes]]) -> dict[str, Counter[str]]:
    """Per output file, how often each record (by the digest of its bytes) was written."""
    return {file: Counter(digest(line) for line in counter.elements()) for file, counter in lines.items()}


def run_golden(name: str, folder: Path, *extra: str) -> dict[str, Counter[bytes]]:
    """Write case `name`'s input into `folder`, run it with `extra` options and return its output records."""
    args = CASES[name].write(folder)
    out = folder / "out"
    if main(["run", *args, "--out-dir", str(out), "--quiet", *extra]) != 0:
        msg = f"the run of golden case {name!r} with {list(extra)} failed"
        raise AssertionError(msg)
    return output_lines(out)


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def load_golden(name: str) -> dict[str, Counter[str]]:
    stored = json.loads(golden_path(name).read_text())
    return {file: Counter(digests) for file, digests in stored["files"].items()}


def save_golden(name: str, found: dict[str, Counter[str]]) -> None:
    files = {file: sorted(counter.elements()) for file, counter in found.items()}
    counts = {file: len(digests) for file, digests in files.items()}
    golden_path(name).write_text(json.dumps({"case": name, "records": counts, "files": files}, indent=0) + "\n")
