"""What the live view's panes show: the latest windows, alerts, moderated messages and dead letters,
each cut down to a few short fields.

`glimpses_of` picks the last few records of an output batch (the tally output's encoder calls it, so
only these small dicts cross workers); the tally sink keeps each worker's latest in a file and
`latest_glimpses` merges the files by when each record was seen.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import orjson
import polars as pl

from dataflows.records import Record, Records, as_records

PANES = ("windows", "alerts", "moderated", "dead_letter")
PER_BATCH = 4
"""Records taken from the end of one batch: a pane shows the latest few, not every one."""
KEPT = 6
"""Records each pane keeps (per worker, then over all of them)."""
TEXT_CHARS = 70
CONVERSATION_LINES = 3
Glimpse = dict[str, Any]


def glimpses_of(kind: str, records: Records, seen: float | None = None) -> list[Glimpse]:
    """The last `PER_BATCH` records of a batch of `kind` as glimpses (none for other kinds), stamped
    with the wall time `seen` (default now)."""
    if kind not in PANES or not len(records):
        return []
    at = time.time() if seen is None else seen
    tail = records.tail(PER_BATCH) if isinstance(records, pl.DataFrame) else records[-PER_BATCH:]
    cut = _CUTS[kind]
    return [{"kind": kind, "at": at, **cut(record)} for record in as_records(tail)]


def short(text: object, chars: int = TEXT_CHARS) -> str:
    """`text` on one line, at most `chars` long (cut with `…`)."""
    flat = " ".join(str(text or "").split())
    return flat if len(flat) <= chars else flat[: chars - 1] + "…"


def _window(record: Record) -> Glimpse:
    messages = record.get("messages") or []
    assistant = record.get("assistant") or {}
    return {
        "session": record.get("session_id"), "start": record.get("window_start"), "end": record.get("window_end"),
        "counts": record.get("counts") or {}, "messages": len(messages),
        "lines": [f"{m.get('sender')}: {short(m.get('text') or m.get('kind'), TEXT_CHARS - 12)}"
                  for m in messages[:CONVERSATION_LINES]],
        "reply": short(assistant.get("suggested_reply")) if assistant.get("status") == "ok" else None,
        "summary": short(assistant.get("summary")) if assistant.get("status") == "ok" else None,
    }


def _alert(record: Record) -> Glimpse:
    return {"pattern": record.get("pattern"), "key": record.get("key"), "severity": record.get("severity"),
            "summary": short(record.get("summary"), 2 * TEXT_CHARS)}


def _moderated(record: Record) -> Glimpse:
    moderation = record.get("moderation") or {}
    if isinstance(moderation, str):
        moderation = orjson.loads(moderation)
    reasons = moderation.get("reasons") or ["blocked"]
    return {"session": record.get("session_id"), "sender": record.get("sender"), "text": short(record.get("text")),
            "reason": short(reasons[0])}


def _dead_letter(record: Record) -> Glimpse:
    return {"where": f"{record.get('source')}:{record.get('line')}", "reason": short(record.get("reason"), 2 * TEXT_CHARS)}


_CUTS = {"windows": _window, "alerts": _alert, "moderated": _moderated, "dead_letter": _dead_letter}


def kept(earlier: list[Glimpse], new: list[Glimpse]) -> list[Glimpse]:
    """A pane's glimpses after `new` ones came: the latest `KEPT`."""
    return (earlier + new)[-KEPT:]


def latest_glimpses(folder: Path) -> dict[str, list[Glimpse]]:
    """Every pane's latest glimpses over all workers' files, oldest first."""
    merged: dict[str, list[Glimpse]] = {pane: [] for pane in PANES}
    for path in folder.glob("glimpse-*.json"):
        try:
            panes = orjson.loads(path.read_bytes())
        except (FileNotFoundError, orjson.JSONDecodeError):
            continue
        for pane, glimpses in panes.items():
            merged.setdefault(pane, []).extend(glimpses)
    return {pane: sorted(glimpses, key=lambda g: g["at"])[-KEPT:] for pane, glimpses in merged.items()}
