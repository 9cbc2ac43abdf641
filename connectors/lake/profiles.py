"""Per-user history read back from the lake and attached to each message as `user_context`.

`ProfilesStage` is a flow stage (`dataflows.flow.Stage`): on its first batch in a worker it
loads every user's `total_messages`, `first_seen` and `last_active` into memory, from the
`user_profiles` table when one exists (columns `user_key`, `total_messages`, `first_seen`,
`last_active`: a summary another job may keep) or else aggregated from `chat_messages` with
PyArrow (`group_by` on the user key). Each `messages` record then gets
`user_context = {"total_messages", "first_seen", "last_active"}` (times as ISO-8601 text), or
None for a user the lake has not seen. Each
`windows` record gets `user_context`, the list of its known senders' histories (with `user`),
which the LLM stage's assistant prompt includes.

At most every `refresh_seconds` the stage looks at the table's current snapshot and, when it has
changed, loads again: only the rows appended since when the history in between is appends only
(the flow's own commits), everything otherwise. `as_of` (a time or a snapshot id) reads the
lake as it was then, once (time travel). A missing table is an empty history.

`start` pins the first load to a `HistoryStart` (a table and snapshot; `loaded_from()` says
which one a load read): a run resumed after a crash first reads the lake as its job's first run
did, not with the rows that run committed before it died, so replayed records get the history
they had. Later refreshes read the lake as it is then, as in any run.

The user key is the pattern engine's (`dataflows.patterns.definitions.key_of`): a chat record's
`username`, else `session_id/sender`. The history is what the lake held when it was loaded: a
message's own row is in it only once the sink has committed it. A batch of messages that comes
as a frame is joined with the history as a frame (built once per load): no dict per message.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from datetime import datetime
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.compute as pc
from pyiceberg.catalog import Catalog
from pyiceberg.table import Table
from pyiceberg.table.snapshots import Operation, Snapshot, ancestors_of

from connectors.lake.tables import TABLES, open_catalog
from connectors.lake.admin import AsOf, snapshot_at
from dataflows.errors import ConvoflowError
from dataflows.events import iso
from dataflows.records import Records, as_records

Record = dict[str, Any]
UserContext = dict[str, Any]
Aggregate = tuple[int, int | None, int | None]
"""A user's message count and first and last message time (µs since the epoch)."""
PROFILES_TABLE = "user_profiles"
HISTORY_TABLE = TABLES["messages"].name
PROFILE_COLUMNS = ("user_key", "total_messages", "first_seen", "last_active")
MESSAGE_COLUMNS = ("username", "session_id", "sender", "timestamp")
USER = "_user"
CONTEXT_DTYPE = pl.Struct({"total_messages": pl.Int64, "first_seen": pl.String, "last_active": pl.String})
"""A `user_context` as a frame column holds it (times as ISO-8601 text, as in the records)."""

log = logging.getLogger(__name__)


def user_key(record: Record) -> str:
    """The user a message record is from: its `username`, else `session_id/sender`."""
    return record.get("username") or f"{record['session_id']}/{record['sender']}"


@dataclass(frozen=True)
class _Loaded:
    """What is in memory: whose history, read from which table at which snapshot."""

    table: str | None
    snapshot_id: int | None
    history: dict[str, UserContext]
    aggregates: dict[str, Aggregate]
    """user → (total, first µs, last µs); kept for `chat_messages` so appended rows can be added in."""

    @cached_property
    def frame(self) -> pl.DataFrame:
        """`history` as a frame to join messages with: `USER` and `user_context` columns."""
        return pl.DataFrame({USER: list(self.history), "user_context": list(self.history.values())},
                            schema={USER: pl.String, "user_context": CONTEXT_DTYPE})


_EMPTY = _Loaded(None, None, {}, {})


@dataclass(frozen=True)
class HistoryStart:
    """Which table, at which snapshot, a history was first loaded from (None: none / empty)."""

    table: str | None
    snapshot_id: int | None

    def as_json(self) -> dict[str, Any]:
        return {"table": self.table, "snapshot_id": self.snapshot_id}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> HistoryStart:
        return cls(data["table"], data["snapshot_id"])


class ProfilesStage:
    """Attaches each message's `user_context` from the lake (see the module doc).

    Holds the catalog's configuration, not a catalog: `lake_dir` for the embedded catalog, else
    the PyIceberg catalog `catalog_name`; it opens it on first use in the worker, so it pickles.
    `clock` (monotonic seconds) paces the refresh checks.
    """

    name = "profiles"

    def __init__(self, *, lake_dir: Path | None = None, catalog_name: str = "convoflow", namespace: str = "convoflow",
                 refresh_seconds: float = 60.0, as_of: AsOf | None = None, start: HistoryStart | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if refresh_seconds < 0:
            msg = f"profiles refresh must be >= 0 seconds, got {refresh_seconds}"
            raise ConvoflowError(msg)
        if isinstance(as_of, datetime) and as_of.tzinfo is None:
            msg = f"profiles as-of time {as_of.isoformat()} needs an offset (UTC: +00:00)"
            raise ConvoflowError(msg)
        self.lake_dir, self.catalog_name, self.namespace = lake_dir, catalog_name, namespace
        self.refresh_seconds, self.as_of, self.start, self.clock = refresh_seconds, as_of, start, clock
        self._reset()

    def _reset(self) -> None:
        self._catalog: Catalog | None = None
        self._loaded: _Loaded | None = None
        self._checked = 0.0
        self._lock = threading.Lock()

    def __getstate__(self) -> dict[str, Any]:
        return {"lake_dir": self.lake_dir, "catalog_name": self.catalog_name, "namespace": self.namespace,
                "refresh_seconds": self.refresh_seconds, "as_of": self.as_of, "start": self.start, "clock": self.clock}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset()

    def __call__(self, batches: list[tuple[str, Records]]) -> list[tuple[str, Records]]:
        self.history()
        loaded = self._loaded or _EMPTY
        out: list[tuple[str, Records]] = []
        for kind, records in batches:
            if kind == "messages":
                if isinstance(records, pl.DataFrame):
                    records = _with_contexts(records, loaded.frame)
                else:
                    for record in records:
                        record["user_context"] = loaded.history.get(user_key(record))
                out.append((kind, records))
            elif kind == "windows":
                windows = as_records(records)
                for record in windows:
                    record["user_context"] = _participants(record, loaded.history)
                out.append((kind, windows))
            else:
                out.append((kind, records))
        return out

    def close(self) -> None:
        """Close the catalog and drop the history (called once the flow has ended); a later batch loads again."""
        with self._lock:
            if self._catalog is not None:
                self._catalog.close()
            self._catalog, self._loaded, self._checked = None, None, 0.0

    def loaded_from(self) -> HistoryStart:
        """The table and snapshot the history in memory was read from (loading it first if need be)."""
        self.history()
        loaded = self._loaded or _EMPTY
        return HistoryStart(loaded.table, loaded.snapshot_id)

    def lookup(self, user: str) -> UserContext | None:
        """One user's history (None if the lake has none), e.g. for an assistant prompt."""
        return self.history().get(user)

    def history(self) -> dict[str, UserContext]:
        """Every user's history, loaded on first use and refreshed as the module doc says."""
        loaded = self._loaded
        if loaded is not None and not self._due():
            return loaded.history
        with self._lock:  # worker threads share the stage: one of them loads
            loaded = self._loaded
            if loaded is None or self._due():
                try:
                    loaded = self._load(loaded)
                except Exception:
                    if loaded is None:
                        raise
                    log.warning("user profiles: refresh failed, keeping the history of snapshot %s",
                                loaded.snapshot_id, exc_info=True)
                self._loaded, self._checked = loaded, self.clock()
            return loaded.history

    def _due(self) -> bool:
        return self.as_of is None and self.clock() - self._checked >= self.refresh_seconds

    def _load(self, loaded: _Loaded | None) -> _Loaded:
        if self._catalog is None:
            self._catalog = open_catalog(self.catalog_name, self.lake_dir)
        if loaded is None and self.start is not None:
            pinned = self._load_start(self._catalog, self.start)
            if pinned is not None:
                return pinned
        table = self._table(self._catalog)
        if table is None:
            return _EMPTY
        return self._load_table(table, snapshot_at(table, self.as_of), loaded)

    def _load_start(self, catalog: Catalog, start: HistoryStart) -> _Loaded | None:
        """The history as `start` names it; the current snapshot if it is gone, None if its table is (both logged)."""
        if start.table is None:
            return _EMPTY
        if not catalog.table_exists((self.namespace, start.table)):
            log.warning("user profiles: %s, the table this job first read, is gone: reading the lake as it is",
                        start.table)
            return None
        table = catalog.load_table((self.namespace, start.table))
        if start.snapshot_id is None:
            return _Loaded(start.table, None, {}, {})
        snapshot = table.snapshot_by_id(start.snapshot_id)
        if snapshot is None:
            log.warning("user profiles: snapshot %s of %s, which this job first read, is expired: reading the "
                        "table as it is", start.snapshot_id, start.table)
            snapshot = table.current_snapshot()
        return self._load_table(table, snapshot, None)

    def _load_table(self, table: Table, snapshot: Snapshot | None, loaded: _Loaded | None) -> _Loaded:
        name = table.name()[-1]
        if name == PROFILES_TABLE:
            missing = [c for c in PROFILE_COLUMNS if c not in {f.name for f in table.schema().fields}]
            if missing:
                msg = f"{PROFILES_TABLE} lacks the columns {missing}; it needs {list(PROFILE_COLUMNS)}"
                raise ConvoflowError(msg)
        if snapshot is None:
            return _Loaded(name, None, {}, {})
        if loaded is not None and loaded.table == name and loaded.snapshot_id == snapshot.snapshot_id:
            return loaded
        if name == PROFILES_TABLE:
            rows = table.scan(snapshot_id=snapshot.snapshot_id, selected_fields=PROFILE_COLUMNS).to_arrow()
            return _Loaded(name, snapshot.snapshot_id, profiles_from_summary(rows), {})
        since = loaded.snapshot_id if loaded is not None and loaded.table == name else None
        if loaded is not None and since is not None and _appends_only(table, since, snapshot.snapshot_id):
            rows = table.incremental_append_scan(from_snapshot_id_exclusive=since,
                                                 to_snapshot_id_inclusive=snapshot.snapshot_id,
                                                 selected_fields=MESSAGE_COLUMNS).to_arrow()
            aggregates, history = dict(loaded.aggregates), dict(loaded.history)
        else:
            rows = table.scan(snapshot_id=snapshot.snapshot_id, selected_fields=MESSAGE_COLUMNS).to_arrow()
            aggregates, history = {}, {}
        for user in merge_aggregates(aggregates, aggregate_messages(rows)):
            history[user] = _context(*aggregates[user])
        return _Loaded(name, snapshot.snapshot_id, history, aggregates)

    def _table(self, catalog: Catalog) -> Table | None:
        for name in (PROFILES_TABLE, HISTORY_TABLE):
            if catalog.table_exists((self.namespace, name)):
                return catalog.load_table((self.namespace, name))
        return None


def aggregate_messages(rows: pa.Table) -> pa.Table:
    """Per user (`user`): message count (`total`) and first and last time (`first`, `last`, µs since the epoch).

    Vectorised: the user key is built column-wise (`username`, else `session_id/sender`, as
    `user_key`), then one `group_by`.
    """
    if rows.num_rows == 0:
        return pa.table({"user": pa.array([], pa.large_string()), "total": pa.array([], pa.int64()),
                         "first": pa.array([], pa.int64()), "last": pa.array([], pa.int64())})
    username = rows.column("username")
    named = pc.and_kleene(pc.is_valid(username), pc.not_equal(username, ""))
    session, sender = (rows.column(name).cast(pa.large_string()) for name in ("session_id", "sender"))
    pairs = pc.binary_join_element_wise(session, sender, pa.scalar("/", pa.large_string()),
                                        null_handling="replace", null_replacement="None")
    users = pc.if_else(named, username.cast(pa.large_string()), pairs)
    micros = rows.column("timestamp").cast(pa.int64())
    grouped = pa.table({"user": users, "t": micros}).group_by("user").aggregate(
        [("user", "count"), ("t", "min"), ("t", "max")])
    return grouped.rename_columns(["user", "total", "first", "last"])


def merge_aggregates(into: dict[str, Aggregate], grouped: pa.Table) -> list[str]:
    """Add the per-user aggregates `grouped` into `into`; return the users whose entry changed."""
    users = grouped.column("user").to_pylist()
    for user, total, first, last in zip(users, grouped.column("total").to_pylist(), grouped.column("first").to_pylist(),
                                        grouped.column("last").to_pylist()):
        old = into.get(user)
        if old is None:
            into[user] = (total, first, last)
        else:
            into[user] = (old[0] + total, _min(old[1], first), _max(old[2], last))
    return users


def _with_contexts(messages: pl.DataFrame, history: pl.DataFrame) -> pl.DataFrame:
    """A frame of message records with each one's `user_context` (null for a user without history) as the last column."""
    messages = messages.drop("user_context", strict=False)
    if history.is_empty():
        return messages.with_columns(pl.lit(None, CONTEXT_DTYPE).alias("user_context"))
    username = pl.col("username") if "username" in messages.columns else pl.lit(None, pl.String)
    pair = pl.concat_str([pl.col("session_id").fill_null("None"), pl.lit("/"), pl.col("sender").fill_null("None")])
    key = pl.when(username.is_not_null() & (username != "")).then(username).otherwise(pair)
    return (messages.with_columns(key.alias(USER))
            .join(history, on=USER, how="left", maintain_order="left")
            .drop(USER))


def _participants(window: Record, history: dict[str, UserContext]) -> list[UserContext]:
    """The history of each sender of a window, in order of first message: for the assistant's prompt.

    A window message names its sender only: a chat sender is a username, a conversation's is a
    role within the session (`session_id/sender`, the key the lake's history uses).
    """
    found: dict[str, UserContext] = {}
    for message in window["messages"]:
        sender = message["sender"]
        for key in (sender, f"{window['session_id']}/{sender}"):
            if key not in found and key in history:
                found[key] = {"user": key, **history[key]}
                break
    return list(found.values())


def profiles_from_summary(rows: pa.Table) -> dict[str, UserContext]:
    """Histories from the rows of a `user_profiles` table."""
    return {user: _context(total, first, last) for user, total, first, last in zip(
        rows.column("user_key").to_pylist(), rows.column("total_messages").to_pylist(),
        rows.column("first_seen").cast(pa.int64()).to_pylist(), rows.column("last_active").cast(pa.int64()).to_pylist(),
    ) if user is not None}


def _context(total: int | None, first_us: int | None, last_us: int | None) -> UserContext:
    return {"total_messages": total, "first_seen": None if first_us is None else iso(first_us / 1_000_000),
            "last_active": None if last_us is None else iso(last_us / 1_000_000)}


def _min(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else min(a, b)


def _max(a: int | None, b: int | None) -> int | None:
    return b if a is None else a if b is None else max(a, b)


def _appends_only(table: Table, since: int, until: int) -> bool:
    """Whether `until` descends from `since` through append snapshots only (then the rows in between are new)."""
    for snapshot in ancestors_of(table.snapshot_by_id(until), table.metadata):
        if snapshot.snapshot_id == since:
            return True
        if snapshot.summary is None or snapshot.summary.operation != Operation.APPEND:
            return False
    return False
