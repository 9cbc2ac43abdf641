"""Records: what the flow's outputs receive, as JSON-ready dicts or as a frame of columns."""

from __future__ import annotations

from typing import Any

import polars as pl

Record = dict[str, Any]
Records = list[Record] | pl.DataFrame
"""A batch of records of one kind: JSON-ready dicts, or a frame with a column per field (in the
record's order; nested fields as structs and lists), which encoders write column-wise. A column
of lists of `{key, value}` structs (a map column, `is_map`) stands for a JSON object with those
keys (a window's `counts`: one key per sender)."""
MAP_FIELDS = ("key", "value")


def is_map(dtype: pl.DataType) -> bool:
    """Whether a column of this type is a map column (see `Records`)."""
    return (isinstance(dtype, pl.List) and isinstance(dtype.inner, pl.Struct)
            and tuple(f.name for f in dtype.inner.fields) == MAP_FIELDS)


def as_records(records: Records) -> list[Record]:
    """A batch as JSON-ready dicts (a frame's rows become dicts, its map columns dicts too)."""
    if not isinstance(records, pl.DataFrame):
        return records
    rows = records.to_dicts()
    for name in [name for name, dtype in records.schema.items() if is_map(dtype)]:
        for row in rows:
            row[name] = {entry["key"]: entry["value"] for entry in row[name]}
    return rows
