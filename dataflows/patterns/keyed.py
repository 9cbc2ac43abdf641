"""A column-wise matcher's rows of one frame: what each key carries in from earlier frames, then its
released rows, as arrays sorted by key (release order within a key).

Keys and senders are numbered in Python and the rows ordered by numpy: released frames are often
small (a paced input over many shards), where that beats any Polars call, and it is linear for big
ones. The events themselves are made only for the rows a matcher keeps or alerts with (`events`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from dataflows.event_frame import EVENT_SCHEMA, frame_events
from dataflows.events import Event
from dataflows.patterns.columns import KEY_COLUMN, Released


class KeyedRows:
    """Rows `chosen` of `released`, after each of their keys' events in `carried`, grouped by key
    (the session, or the user when `by_user`)."""

    def __init__(self, released: Released, chosen: np.ndarray, by_user: bool,
                 carried: Mapping[str, Sequence[Event]]) -> None:
        self.released = released
        every_key, every_sender = released.values(KEY_COLUMN[by_user]), released.values("sender")
        rows = chosen.tolist()
        fresh_keys = [every_key[i] for i in rows]
        numbers: dict[str, int] = {}
        for key in fresh_keys:
            numbers.setdefault(key, len(numbers))
        self.keys = list(numbers)
        """Each group's key."""
        held = [carried.get(key, ()) for key in self.keys]
        self.carried = [event for events in held for event in events]
        carried_groups = [group for group, events in enumerate(held) for _ in events]
        self.n_carried = len(self.carried)
        codes: dict[str, int] = {}
        senders = [codes.setdefault(name, len(codes))
                   for name in [*(e.sender for e in self.carried), *(every_sender[i] for i in rows)]]
        self.sender_codes = codes
        """Each sender's number."""
        group = np.array([*carried_groups, *(numbers[key] for key in fresh_keys)], dtype=np.int64)
        self.order = np.argsort(group, kind="stable")
        self.n = len(self.order)
        self.group = group[self.order]
        self.starts = np.flatnonzero(np.diff(self.group, prepend=-1))
        self.ends = np.append(self.starts[1:], self.n) - 1
        times = released.rows["time"].to_numpy()
        self.times = self.column(np.array([e.time for e in self.carried], dtype=np.float64), times[chosen])
        self.pos = self.column(np.full(self.n_carried, -1, dtype=np.int64), chosen)
        """The row in `released`, or -1 for an event carried in."""
        self.source = self.column(np.arange(self.n_carried, dtype=np.int64), chosen)
        """The row in `released`, or the index in `carried`."""
        self.senders = np.array(senders, dtype=np.int64)[self.order]
        self.n_senders = max(len(codes), 1)

    def column(self, carried: np.ndarray, fresh: np.ndarray) -> np.ndarray:
        """A column of these rows from its values for the carried events and for the chosen rows."""
        return np.concatenate([carried, fresh])[self.order]

    def events(self, rows: list[int]) -> list[Event]:
        """The events of these rows: carried in, or made from the released rows (one gather for all)."""
        if not rows:
            return []
        pos, source = self.pos[rows], self.source[rows]
        fresh = np.unique(pos[pos >= 0])
        made = dict(zip(fresh.tolist(), frame_events(self.released.rows.select(EVENT_SCHEMA.names())[fresh]),
                        strict=True)) if len(fresh) else {}
        return [made[p] if p >= 0 else self.carried[s] for p, s in zip(pos.tolist(), source.tolist(), strict=True)]


    def carry(self, held: dict[str, list[Event]], rows: list[int]) -> None:
        """What `held` keeps for the next frame of each key here: the events of these rows (in order)."""
        for key in self.keys:
            held.pop(key, None)
        for group, event in zip(self.group[rows].tolist(), self.events(rows), strict=True):
            held.setdefault(self.keys[group], []).append(event)


def recent(held: Mapping[str, Sequence[Event]], lower: float, within: float) -> dict[str, list[Event]]:
    """`held` less the events more than `within` before `lower` (and the keys left with none)."""
    kept = {key: [e for e in events if lower - e.time <= within]  # type: ignore[operator]
            for key, events in held.items()}
    return {key: events for key, events in kept.items() if events}


def events_by_key(frame: pl.DataFrame) -> dict[str, list[Event]]:
    """Events held as one frame (event columns and `key`, in order), per key: how matchers held
    their carried events before `KeyedRows` (old snapshots)."""
    held: dict[str, list[Event]] = {}
    for key, values in zip(frame["key"].to_list(), frame.select(EVENT_SCHEMA.names()).rows(), strict=True):
        held.setdefault(key, []).append(Event._make(values))
    return held
