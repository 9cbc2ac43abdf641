"""Parse a block of JSONL lines column-wise into an event frame, and the lines it rejects into dead letters.

The lines go through Arrow's JSON reader with an explicit schema (its types are strict: a number
where a string is declared fails the read, naming the row), then every check that
`dataflows.parse.parse_line` makes is an expression over the columns. A line the columns cannot
decide exactly as `parse_line` would (not UTF-8, an escaped ASCII character that could spell a
key, `NaN`, deep nesting, a value of an unexpected type, an unusual timestamp, any rejected
value, a line Arrow refuses) goes to `parse_line` itself, so every line becomes the very event or
dead letter (with its reason) that `parse_line` makes of it.
"""

from __future__ import annotations

import functools
import io
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.json as pa_json

from dataflows.event_frame import EVENT_SCHEMA, events_frame, iso_expr
from dataflows.events import DeadLetter, Event, LineRef
from dataflows.parse import MAX_JSON_DEPTH, MAX_LINE_BYTES, MESSAGE_TYPES, RAW_EXCERPT_CHARS, oversized, parse_line
from dataflows.timestamps import _MAX_EPOCH, _MILLIS_THRESHOLD, _MIN_EPOCH

_FIELDS = ("session_id", "sender", "message", "username", "type", "text", "preferredLanguage", "room")
_TEXT_TIMES = pa.schema([(name, pa.string()) for name in _FIELDS] + [("timestamp", pa.string())])
_NUMBER_TIMES = pa.schema([(name, pa.string()) for name in _FIELDS] + [("timestamp", pa.float64())])
_MAX_REREADS = 16
_FAILED_ROW = re.compile(r"in row (\d+)")
_NEWLINE = ord("\n")
_ISO = r"^\d{4}-\d{2}-\d{2}[T ](?:[01]\d|2[0-3]):[0-5]\d:[0-5]\d(?:\.\d{1,6})?(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)?$"
"""The ISO-8601 forms read column-wise; any other timestamp string is left to `parse_timestamp`."""
_UNSURE = r"\\u00[0-7]|NaN"
"""Where Arrow's reading of a line could differ from orjson's: an escaped ASCII character (it
could spell a key such as `sender`) or `NaN` (Arrow reads it, orjson refuses it)."""
_MISTYPED = r'"(?:' + "|".join(_FIELDS) + r')"\s*:\s*[^"n\s]|"timestamp"\s*:\s*[tf\[{]'
"""A text field given something other than a string or null, or a timestamp neither a string, a
number nor null: Arrow would refuse the read at that line."""
_EMPTY = events_frame(())
COLUMNS_FROM = 1024
"""Blocks of fewer lines are parsed line by line (`parse_line`, the same events and dead letters): the
column-wise read costs ~10 ms however few lines it gets (a dozen Polars queries and Arrow's reader),
about what 1,500 lines cost one by one. A live poll or a paced replay's piece is often that small."""


@dataclass(frozen=True)
class ParsedBlock:
    """What a block's lines became: the accepted events (`EVENT_SCHEMA`, in file order) and the
    rejected lines, in file order; and where each line starts (byte offsets in the file)."""

    events: pl.DataFrame
    dead: list[DeadLetter]
    starts: np.ndarray


def parse_block(
    data: bytes, *, source: str, offset: int, line: int, max_bytes: int = MAX_LINE_BYTES,
    positions: np.ndarray | None = None, columns_from: int = COLUMNS_FROM,
) -> ParsedBlock:
    """Parse `data`, whole lines each ending in a newline, the first at byte `offset` of `source`
    and numbered `line`; a line of more than `max_bytes` bytes is rejected unread. `positions`,
    when given, is each line's number and offset instead (a Kafka message's offset, for both).
    Column-wise from `columns_from` lines on, else line by line."""
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == _NEWLINE)
    if not len(ends):
        return ParsedBlock(_EMPTY, [], np.empty(0, np.int64))
    starts = np.concatenate(([0], ends[:-1] + 1))
    raw = data.split(b"\n")
    numbers = np.arange(line, line + len(ends)) if positions is None else positions
    offsets = starts + offset if positions is None else positions
    if len(ends) < columns_from:
        return _line_by_line(raw, source, numbers, offsets, ends - starts, max_bytes, starts + offset)
    lines = pl.DataFrame({
        "row": np.arange(len(ends)),
        "line": numbers,
        "offset": offsets,
        "size": ends - starts,
        "body": _bodies(data, raw),
    }).with_columns(_plain(max_bytes), _text_times(), _names_conversation_fields())
    fast = _read_columns(lines.filter("plain"), source)
    rest = lines.select("row", "line", "offset", "size").join(fast.select("line"), on="line", how="anti").sort("row")
    slow = _line_by_line(raw, source, rest["line"].to_numpy(), rest["offset"].to_numpy(), rest["size"].to_numpy(),
                         max_bytes, starts + offset, rows=rest["row"].to_list())
    events = fast if slow.events.is_empty() else pl.concat([fast, slow.events]).sort("offset")
    return ParsedBlock(events, slow.dead, slow.starts)


def _line_by_line(raw: list[bytes], source: str, numbers: np.ndarray, offsets: np.ndarray, sizes: np.ndarray,
                  max_bytes: int, starts: np.ndarray, rows: list[int] | None = None) -> ParsedBlock:
    """Lines `rows` of `raw` (all by default), numbered and placed as given, each parsed on its own."""
    events: list[Event] = []
    dead: list[DeadLetter] = []
    for row, number, at, size in zip(range(len(numbers)) if rows is None else rows, numbers.tolist(),
                                     offsets.tolist(), sizes.tolist(), strict=True):
        parsed = _parse_one(raw[row], LineRef(source, number, at), size, max_bytes)
        if isinstance(parsed, Event):
            events.append(parsed)
        else:
            dead.append(parsed)
    return ParsedBlock(events_frame(events) if events else _EMPTY, dead, starts)


def _bodies(data: bytes, raw: list[bytes]) -> pl.Series:
    """Each line's text without its trailing carriage returns; null for a line that is not UTF-8."""
    try:
        lines: list[str | None] = list(data.decode().split("\n")[:-1])
    except UnicodeDecodeError:
        lines = [_text_or_none(line) for line in raw[:-1]]
    return pl.Series(lines, dtype=pl.String).str.strip_chars_end("\r")


def _text_or_none(line: bytes) -> str | None:
    try:
        return line.decode()
    except UnicodeDecodeError:
        return None


def _parse_one(body: bytes, ref: LineRef, size: int, max_bytes: int) -> Event | DeadLetter:
    """One line as the replay source has always read it (`parse_line`, after its own checks)."""
    if size > max_bytes:
        return oversized(body[:RAW_EXCERPT_CHARS], size, max_bytes, ref)
    body = body.rstrip(b"\r")
    if not body.strip():
        return DeadLetter(ref, "", "empty line")
    return parse_line(body, ref, max_bytes)


def _plain(max_bytes: int) -> pl.Expr:
    """Whether a line may be read column-wise (see the module docstring)."""
    body = pl.col("body")
    stripped = body.str.strip_chars()
    return (
        (pl.col("size") <= max_bytes)
        & stripped.str.starts_with("{")
        & stripped.str.ends_with("}")
        & ~body.str.contains(_UNSURE)
        & ~body.str.contains(_MISTYPED)
        & (body.str.count_matches(r"[\[{]") <= MAX_JSON_DEPTH)
    ).fill_null(False).alias("plain")


@functools.cache
def _text_times() -> pl.Expr:
    """Whether a line's timestamp is a string (Arrow wants one type per column: such lines are read apart)."""
    return pl.col("body").str.contains(r'"timestamp"\s*:\s*"').alias("text_times")


@functools.cache
def _names_conversation_fields() -> pl.Expr:
    """Whether a line names `sender` or `message`: present, even as null, they make it a conversation event."""
    return pl.col("body").str.contains_any(['"sender"', '"message"']).alias("names_conversation")


def _read_columns(plain: pl.DataFrame, source: str) -> pl.DataFrame:
    """The events among `plain` lines that every check accepts; the other lines are left out."""
    parts = [
        _with_time(
            pl.concat([part.select("line", "offset", "names_conversation"), _frame(table)], how="horizontal"),
            numbers=schema is _NUMBER_TIMES,
        )
        for text_times, schema in ((True, _TEXT_TIMES), (False, _NUMBER_TIMES))
        for part, table in _tables(plain.filter(pl.col("text_times") == text_times), schema)
    ]
    if not parts:
        return _EMPTY
    return pl.concat(parts).lazy().filter(_accepted()).select(_event_columns(source)).sort("offset").collect()


def _tables(lines: pl.DataFrame, schema: pa.Schema) -> Iterator[tuple[pl.DataFrame, pa.Table]]:
    """`lines` read by Arrow, in parts: when it refuses a line (it names the row), that line is
    left out and the lines before and after it are read again; after `_MAX_REREADS` reads, what
    is still unread is left out."""
    pending = [lines]
    for _ in range(_MAX_REREADS):
        if not pending:
            return
        part = pending.pop()
        data = "\n".join(part["body"].to_list()).encode()
        try:
            table = pa_json.read_json(io.BytesIO(data), read_options=_one_block(data), parse_options=_options(schema))
        except pa.ArrowInvalid as exc:
            found = _FAILED_ROW.search(str(exc))
            failed = part.height if found is None else int(found.group(1))
            pending += [cut for cut in (part.head(failed), part.slice(failed + 1)) if not cut.is_empty()]
            continue
        if table.num_rows == part.height:
            yield part, table


@functools.cache
def _options(schema: pa.Schema) -> pa_json.ParseOptions:
    return pa_json.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore", newlines_in_values=False)


def _one_block(data: bytes) -> pa_json.ReadOptions:
    """Read as one block, so that a failing row's number counts from the first line."""
    return pa_json.ReadOptions(block_size=max(len(data) + 1, 1 << 16), use_threads=False)


def _frame(table: pa.Table) -> pl.DataFrame:
    frame = pl.from_arrow(table)
    assert isinstance(frame, pl.DataFrame)
    return frame


@functools.cache
def _accepted() -> pl.Expr:
    """What `_ConversationIn`, `_ChatIn` and the chat and timestamp checks accept."""
    conversation = (
        (pl.col("session_id").str.len_chars() >= 1)
        & pl.col("sender").is_in(["customer", "rm"])
        & pl.col("message").is_not_null()
    )
    chat = (
        ~pl.col("names_conversation")
        & (pl.col("username").str.len_chars() >= 1)
        & (pl.col("type").str.len_chars() >= 1)
        & (pl.col("room").is_null() | (pl.col("room").str.len_chars() >= 1))
        & (pl.col("session_id").is_null() | (pl.col("session_id").str.len_chars() >= 1))
        & ~(pl.col("type").is_in(list(MESSAGE_TYPES)) & pl.col("text").is_null())
    )
    return (conversation | chat).fill_null(False) & pl.col("time_ok")


def _with_time(frame: pl.DataFrame, numbers: bool) -> pl.DataFrame:
    """`frame` with `time`, the epoch seconds of `timestamp` (null where absent or not read here:
    see `parse_timestamp`) and `time_ok` (absent, or read). Column by column, so that no
    expression is repeated inside another."""
    stamp = pl.col("timestamp")
    if numbers:
        seconds = pl.when(stamp.abs() >= _MILLIS_THRESHOLD).then(_divided(stamp, 1000.0)).otherwise(stamp)
    else:
        seconds = pl.when(stamp.str.contains(_ISO)).then(_divided(_iso_micros(stamp).cast(pl.Float64), 1e6))
    time = pl.col("time")
    return (
        frame.lazy()
        .with_columns(seconds.alias("time"))
        .with_columns(pl.when(time.is_between(_MIN_EPOCH, _MAX_EPOCH)).then(time).alias("time"))
        .with_columns((stamp.is_null() | time.is_not_null()).alias("time_ok"))
        .drop("timestamp")
        .collect()
    )


def _iso_micros(stamp: pl.Expr) -> pl.Expr:
    """Epoch microseconds of strings of the `_ISO` form: date and time at fixed places (a fixed
    format Polars parses fast; null for an impossible date), then the fraction and the offset."""
    wall = pl.concat_str(stamp.str.slice(0, 10), pl.lit("T"), stamp.str.slice(11, 8))
    micros = wall.str.strptime(pl.Datetime("us"), "%Y-%m-%dT%H:%M:%S", strict=False).dt.epoch("us")
    fraction = stamp.str.extract(r"^.{19}\.(\d{1,6})", 1).str.pad_end(6, "0").cast(pl.Int64).fill_null(0)
    sign = pl.when(stamp.str.slice(-6, 1) == "-").then(-1).otherwise(1)
    offset = sign * (stamp.str.slice(-5, 2).cast(pl.Int64, strict=False) * 3600
                     + stamp.str.slice(-2, 2).cast(pl.Int64, strict=False) * 60)
    has_offset = stamp.str.contains(r"[+-]\d{2}:\d{2}$")
    return micros + fraction - pl.when(has_offset).then(offset * 1_000_000).otherwise(0)


def _divided(values: pl.Expr, by: float) -> pl.Expr:
    """`values / by` rounded as Python rounds it: Polars' own division is an ulp off for ~30 % of
    epoch values, which would change the times (and so the records) of those lines."""
    return values.map_batches(lambda column: pl.Series(column.to_numpy() / by), return_dtype=pl.Float64)


@functools.cache
def _event_columns(source: str) -> list[pl.Expr]:
    """The `EVENT_SCHEMA` columns of accepted rows of either shape."""
    chat = pl.col("sender").is_null()
    columns = [
        (pl.lit(f"{source}:") + pl.col("line").cast(pl.String)).alias("event_id"),
        pl.when(chat).then(pl.coalesce("room", "session_id", "username")).otherwise("session_id").alias("session_id"),
        pl.when(chat).then(pl.col("username")).otherwise("sender").alias("sender"),
        pl.when(chat).then(pl.col("type")).otherwise(pl.lit("message")).alias("kind"),
        pl.when(chat).then(pl.col("text").fill_null("")).otherwise("message").alias("text"),
        pl.col("time"),
        pl.when(pl.col("time").is_null()).then(pl.lit("system")).otherwise(pl.lit("event")).alias("time_source"),
        pl.when(chat).then(pl.lit("chat")).otherwise(pl.lit("conversation")).alias("shape"),
        pl.lit(source).alias("source"),
        pl.col("line"),
        pl.col("offset"),
        pl.when(chat).then(pl.col("preferredLanguage")).alias("language"),
        pl.when(chat).then(pl.col("username")).alias("username"),
        iso_expr(pl.col("time")).alias("timestamp"),
    ]
    assert [c.meta.output_name() for c in columns] == EVENT_SCHEMA.names()
    return columns
