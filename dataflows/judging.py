"""Judge a frame of messages by the rules in effect at each one's time, column-wise around the book.

`RuleBook.judge` decides one text (and remembers recent verdicts per text); this module feeds it a
frame's columns and turns its verdicts back into columns: the text as the rules leave it (masked
or not), the action, the role a permission rule gives the sender and the `moderation` record as
JSON text (a binary column, see `dataflows.records`), encoded once per distinct verdict.
"""

from __future__ import annotations

import functools

import orjson
import polars as pl

from dataflows.rules import PATTERN_ROLES, Moderation, RuleBook, Verdict

NO_RULES = Moderation("allow", "")
"""The verdict while the rules stream has sent no rule (its text is never read)."""


def judged(book: RuleBook, events: pl.DataFrame) -> pl.DataFrame:
    """`events` (timed, event columns) with each message's verdict: `text` as the rules leave it,
    `action`, `role` (a permission rule's) and `moderation` (JSON, binary)."""
    if not book.version():
        return events.with_columns(
            pl.lit(NO_RULES.action, pl.String).alias("action"), pl.lit(None, pl.String).alias("role"),
            pl.lit(moderation_json(NO_RULES), pl.Binary).alias("moderation"),
        )
    users = events.select(pl.coalesce("username", pl.concat_str("session_id", pl.lit("/"), "sender"))).to_series()
    judge = book.judge
    verdicts = [
        judge(text, time=time, user=user, room=room)
        for text, time, user, room in zip(
            events["text"].to_list(), events["time"].to_list(), users.to_list(), events["session_id"].to_list(),
            strict=True,
        )
    ]
    # The book hands back one object per remembered verdict: make each column once per distinct
    # verdict and gather it to the rows.
    slots: dict[int, int] = {}
    distinct: list[Moderation] = []
    picks: list[int] = []
    for verdict in verdicts:
        slot = slots.setdefault(id(verdict), len(distinct))
        if slot == len(distinct):
            distinct.append(verdict)
        picks.append(slot)
    rows = pl.Series(picks, dtype=pl.UInt32)
    return events.with_columns(
        pl.Series("text", [v.text for v in distinct], dtype=pl.String).gather(rows),
        pl.Series("action", [v.action for v in distinct], dtype=pl.String).gather(rows),
        pl.Series("role", [v.role for v in distinct], dtype=pl.String).gather(rows),
        pl.Series("moderation", [moderation_json(v) for v in distinct], dtype=pl.Binary).gather(rows),
    )


def pattern_roles(roles: pl.Expr) -> pl.Expr:
    """How the pattern engine sees each permission role: `rm` is an agent, `customer` a customer; others null."""
    return roles.replace_strict(PATTERN_ROLES, default=None, return_dtype=pl.String)


def moderation_json(verdict: Moderation) -> bytes:
    """A verdict's `moderation` record as JSON: the same few values again and again, so each is encoded once."""
    return _json_of(verdict.action, verdict.rules, verdict.reasons, verdict.flags, verdict.role, verdict.models)


@functools.lru_cache(maxsize=4096)
def _json_of(action: Verdict, rules: tuple[tuple[str, int], ...], reasons: tuple[str, ...],
             flags: tuple[tuple[str, bool], ...], role: str | None, models: tuple[tuple[str, str], ...]) -> bytes:
    return orjson.dumps(Moderation(action, "", rules, reasons, flags, role, models).as_record())
