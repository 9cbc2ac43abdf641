"""Records: what the flow's outputs receive, as JSON-ready dicts or as a frame of columns."""

from __future__ import annotations

from typing import Any

import orjson
import polars as pl
from polars._typing import PolarsDataType

Record = dict[str, Any]
Records = list[Record] | pl.DataFrame
"""A batch of records of one kind: JSON-ready dicts, or a frame with a column per field (in the
record's order; nested fields as structs and lists), which encoders write column-wise. A column
of lists of `{key, value}` structs (a map column, `is_map`) stands for a JSON object with those
keys (a window's `counts`: one key per sender). A binary column holds each row's value as JSON
text, encoded once for the few distinct values it takes (a judged message's `moderation`)."""
MAP_FIELDS = ("key", "value")


def is_map(dtype: PolarsDataType) -> bool:
    """Whether a column of this type is a map column (see `Records`)."""
    return (isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)
            and tuple(f.name for f in dtype.inner.fields) == MAP_FIELDS)


def is_json(dtype: PolarsDataType) -> bool:
    """Whether a column of this type holds JSON text (see `Records`)."""
    return dtype == pl.Binary


def as_records(records: Records) -> list[Record]:
    """A batch as JSON-ready dicts (a frame's rows become dicts, its map columns dicts too, and
    its JSON columns what their JSON says: one shared value per distinct text)."""
    if not isinstance(records, pl.DataFrame):
        return records
    rows = records.to_dicts()
    for name, dtype in records.schema.items():
        if is_map(dtype):
            for row in rows:
                row[name] = {entry["key"]: entry["value"] for entry in row[name]}
        elif is_json(dtype):
            decoded = {text: orjson.loads(text) for text in records[name].unique().to_list() if text is not None}
            for row in rows:
                text = row[name]
                row[name] = None if text is None else decoded[text]
    return rows
