"""Records into rows of a lake table: Arrow columns in the table's schema and each row's `record_hash`.

A batch arrives as dicts or as a frame (`Records`). Dicts become one Arrow struct array at once
(`ArrowRows`), or row by row when that fast path cannot take them (`row_converter`, whose errors
name the table and field). A frame becomes Arrow columns without a dict per row
(`frame_columns`), its hashes written from column-wise JSON (`frame_hashes`); a frame that does
not fit goes the dict way.

`record_hash` is a 64-bit BLAKE2b of the record's canonical JSON (keys sorted at every depth)
without the fields stages fill from outside the flow (`ENRICHMENT_FIELDS`): the same in every
process and run, whichever way the record came.
"""

from __future__ import annotations

import hashlib
import itertools
import struct
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any

import numpy as np
import orjson
import polars as pl
import pyarrow as pa
from polars._typing import PolarsDataType
from pyiceberg.schema import Schema
from pyiceberg.types import IcebergType, ListType, MapType, NestedField, StructType, TimestamptzType

from connectors.files.jsonl import json_expr
from dataflows.errors import ConvoflowError
from dataflows.flow import ENRICHMENT_FIELDS
from dataflows.records import Record, Records, as_records, is_json, is_map

Row = dict[str, Any]

def record_hash(record: Record) -> int:
    """A 64-bit fingerprint of a record's content, the same in every process and run.

    Fields a stage fills from outside the flow (`ENRICHMENT_FIELDS`: user history, LLM answers)
    are left out: a record replayed after a crash is the same record even if its enrichment is not.
    """
    return record_hashes([record])[0]


def record_hashes(records: Sequence[Record]) -> list[int]:
    """`record_hash` of each record, in one pass."""
    blake2b, dumps, sort_keys, enriched = hashlib.blake2b, orjson.dumps, orjson.OPT_SORT_KEYS, ENRICHMENT_FIELDS
    digests = b"".join([
        blake2b(dumps(record if enriched.isdisjoint(record) else {k: v for k, v in record.items() if k not in enriched},
                      option=sort_keys), digest_size=8).digest()
        for record in records
    ])
    return list(struct.unpack(f">{len(records)}q", digests))


def to_timestamp(value: Any) -> datetime:
    """An aware UTC datetime from an ISO-8601 string with offset, epoch seconds or an aware datetime."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    elif isinstance(value, (int, float)):
        return datetime.fromtimestamp(value, timezone.utc)
    if not isinstance(value, datetime) or value.tzinfo is None:
        msg = f"expected an ISO-8601 time with an offset, epoch seconds or an aware datetime, got {value!r}"
        raise ConvoflowError(msg)
    return value


def _converter(kind: IcebergType, where: str) -> Callable[[Any], Any] | None:
    """A function turning a JSON value into the Python value PyArrow takes for `kind`; None: as is."""
    if isinstance(kind, TimestamptzType):
        return to_timestamp
    if isinstance(kind, StructType):
        return _struct_converter(kind.fields, where)
    if isinstance(kind, ListType):
        item = _converter(kind.element_type, where)
        return None if item is None else (lambda values: [None if v is None else item(v) for v in values])
    if isinstance(kind, MapType):
        value = _converter(kind.value_type, where) or (lambda v: v)
        return lambda mapping: [(k, None if v is None else value(v)) for k, v in mapping.items()]
    return None


def _struct_converter(fields: Sequence[NestedField], where: str) -> Callable[[Record], Row]:
    plan = [(f.name, f.required, _converter(f.field_type, f"{where}.{f.name}")) for f in fields]
    names = {f.name for f in fields}

    def convert(record: Record) -> Row:
        if not names.issuperset(record):
            msg = f"{where}: fields {sorted(set(record) - names)} are not in the table's schema"
            raise ConvoflowError(msg)
        row: Row = {}
        for name, required, conv in plan:
            value = record.get(name)
            if value is None:
                if required:
                    msg = f"{where}.{name} is required but missing in {record!r}"
                    raise ConvoflowError(msg)
                row[name] = None
            else:
                row[name] = value if conv is None else conv(value)
        return row

    return convert


def row_converter(table: str, schema: Schema) -> Callable[[Record], Row]:
    """Turns a record into a row of the table named `table` (errors name it), `record_hash` included.

    `schema` is the table's (it may have columns added since its declaration).
    """
    fields = [f for f in schema.fields if f.name != "record_hash"]
    convert = _struct_converter(fields, table)
    return lambda record: {**convert(record), "record_hash": record_hash(record)}


class ArrowRows:
    """Turns a batch of records of one table into an Arrow table of its rows, `record_hash` included.

    Fast path: the records become one Arrow struct array in a single call, with times as text, and
    one cast turns the text into `timestamptz`; field names are checked per record with set
    operations. A batch the fast path cannot take (a time given as epoch seconds or a datetime, a
    field outside the schema, a required field missing) goes through `row_converter` row by row,
    which converts it the same way or raises the error that names the table and field.
    """

    def __init__(self, table: str, schema: Schema) -> None:
        self.schema = schema.as_arrow()
        self.hash_field = self.schema.field("record_hash")
        self.columns = pa.struct([f for f in self.schema if f.name != "record_hash"])
        self.ingest = _as_text_times(self.columns)
        self.names = frozenset(self.columns.names)
        self.nested = [(f.name, _fits(f.type)) for f in self.columns if _has_struct(f.type)]
        self.per_row = row_converter(table, schema)

    def __call__(self, records: Records) -> pa.Table:
        if isinstance(records, pl.DataFrame):
            columns = frame_columns(records, self.columns, self.ingest)
            if columns is not None:
                return columns.append_column(self.hash_field, frame_hashes(records)).select(self.schema.names)
            records = as_records(records)
        rows = self._at_once(records)
        if rows is None:
            return pa.Table.from_pylist([self.per_row(record) for record in records], schema=self.schema)
        hashes = pa.array(record_hashes(records), pa.int64())
        return rows.append_column(self.hash_field, hashes).select(self.schema.names)

    def _at_once(self, records: Sequence[Record]) -> pa.Table | None:
        if not self._fit(records):
            return None
        try:
            rows = _cast_times(pa.array(records, type=self.ingest), self.columns)
        except (pa.ArrowException, TypeError, ValueError):
            return None
        if _nulls_in_required(rows, self.columns):
            return None
        return pa.Table.from_struct_array(rows)

    def _fit(self, records: Sequence[Record]) -> bool:
        """Whether every record names only the table's fields, nested ones included.

        Nested values are checked once per distinct object: flows share them (one `moderation`
        per verdict, one `user_context` per user).
        """
        if not all(map(self.names.issuperset, records)):
            return False
        for name, fits in self.nested:
            values = list(map(dict.get, records, itertools.repeat(name)))
            if not all(map(fits, dict(zip(map(id, values), values)).values())):
                return False
        return True

    def conform(self, rows: pa.Table | list[Row]) -> pa.Table:
        """Rows buffered by an earlier run (perhaps before the table's schema changed) in this table's schema."""
        if isinstance(rows, pa.Table):
            if rows.schema.equals(self.schema):
                return rows
            rows = rows.to_pylist()
        return pa.Table.from_pylist(rows, schema=self.schema)


def _as_text_times(kind: pa.DataType) -> pa.DataType:
    """`kind` with every timestamp as a string: how records carry times."""
    if pa.types.is_timestamp(kind):
        return pa.large_string()
    if pa.types.is_struct(kind):
        return pa.struct([f.with_type(_as_text_times(f.type)) for f in kind])
    if pa.types.is_map(kind):
        return pa.map_(kind.key_field.with_type(_as_text_times(kind.key_type)),
                       kind.item_field.with_type(_as_text_times(kind.item_type)))
    if pa.types.is_large_list(kind):
        return pa.large_list(kind.value_field.with_type(_as_text_times(kind.value_type)))
    if pa.types.is_list(kind):
        return pa.list_(kind.value_field.with_type(_as_text_times(kind.value_type)))
    return kind


def _cast_times(array: pa.Array, kind: pa.DataType) -> pa.Array:
    """`array` (of `_as_text_times(kind)`) as `kind`: its ISO-8601 texts parsed as timestamps.

    Goes down the nesting itself because a null struct's children hold placeholders (`""`) that
    a plain cast would try to parse.
    """
    if array.type == kind:
        return array
    mask = array.is_null() if array.null_count else None
    if pa.types.is_struct(kind):
        children = [_cast_times(child, f.type) for child, f in zip(array.flatten(), kind)]
        return pa.StructArray.from_arrays(children, fields=list(kind), mask=mask)
    if pa.types.is_large_list(kind):
        return pa.LargeListArray.from_arrays(array.offsets, _cast_times(array.values, kind.value_type), type=kind,
                                             mask=mask)
    if pa.types.is_list(kind):
        return pa.ListArray.from_arrays(array.offsets, _cast_times(array.values, kind.value_type), type=kind, mask=mask)
    return array.cast(kind)


def _fits(kind: pa.DataType) -> Callable[[Any], bool]:
    """A test that every dict in a value of `kind` names only fields that `kind` declares.

    Values of another shape pass: Arrow rejects those itself.
    """
    if pa.types.is_struct(kind):
        names = frozenset(f.name for f in kind)
        inner = [(f.name, _fits(f.type)) for f in kind if _has_struct(f.type)]
        if not inner:
            return lambda value: not isinstance(value, dict) or value.keys() <= names
        return lambda value: not isinstance(value, dict) or (
            value.keys() <= names and all(fits(value.get(name)) for name, fits in inner))
    if pa.types.is_map(kind):
        item = _fits(kind.item_type)
        return lambda value: not isinstance(value, dict) or all(map(item, value.values()))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        element = _fits(kind.value_type)
        return lambda value: not isinstance(value, (list, tuple)) or all(map(element, value))
    return lambda value: True


def _has_struct(kind: pa.DataType) -> bool:
    if pa.types.is_struct(kind):
        return True
    if pa.types.is_map(kind):
        return _has_struct(kind.item_type)
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return _has_struct(kind.value_type)
    return False


def _nulls_in_required(array: pa.Array, kind: pa.DataType) -> bool:
    """Whether a non-nullable field below the top holds a null (cautious: nulls under a null parent count)."""
    if pa.types.is_struct(kind):
        return any((not f.nullable and array.field(i).null_count > 0) or _nulls_in_required(array.field(i), f.type)
                   for i, f in enumerate(kind))
    if pa.types.is_map(kind):
        return ((not kind.item_field.nullable and array.items.null_count > 0)
                or _nulls_in_required(array.items, kind.item_type))
    if pa.types.is_list(kind) or pa.types.is_large_list(kind):
        return ((not kind.value_field.nullable and array.values.null_count > 0)
                or _nulls_in_required(array.values, kind.value_type))
    return False


# --- frames ----------------------------------------------------------------------------------

def frame_hashes(frame: pl.DataFrame) -> pa.Array:
    """Each row's `record_hash` (int64), the same as the row's record gets from `record_hashes`."""
    canonical = _canonical(frame)
    if not canonical.width:
        texts = [b"{}"] * len(frame)
    else:
        texts = canonical.select(json_expr(canonical.schema)).to_series().cast(pl.Binary).to_list()
    blake2b = hashlib.blake2b
    digests = b"".join([blake2b(text, digest_size=8).digest() for text in texts])
    return pa.array(np.frombuffer(digests, dtype=">i8").astype(np.int64), pa.int64())


def _canonical(frame: pl.DataFrame) -> pl.DataFrame:
    """`frame` as the JSON its records hash: identity fields only, keys sorted at every depth."""
    names = sorted(name for name in frame.columns if name not in ENRICHMENT_FIELDS)
    columns: list[pl.Expr | pl.Series] = []
    for name in names:
        dtype = frame.schema[name]
        if is_json(dtype):
            columns.append(_sorted_json(frame[name]))
        else:
            columns.append(_sorted(pl.col(name), dtype).alias(name))
    return frame.select(columns)


def _sorted(expr: pl.Expr, dtype: PolarsDataType) -> pl.Expr:
    """`expr` with the fields of its structs in name order and the entries of its maps in key order."""
    if not _needs_sorting(dtype):
        return expr
    if is_map(dtype):
        return expr.list.eval(pl.element().sort_by(pl.element().struct.field("key")))
    if isinstance(dtype, pl.Struct):
        fields = sorted(dtype.fields, key=lambda f: f.name)
        rebuilt = pl.struct([_sorted(expr.struct.field(f.name), f.dtype).alias(f.name) for f in fields])
        return pl.when(expr.is_null()).then(None).otherwise(rebuilt)
    assert isinstance(dtype, pl.List)
    return expr.list.eval(_sorted(pl.element(), dtype.inner))


def _needs_sorting(dtype: PolarsDataType) -> bool:
    if is_map(dtype):
        return True
    if isinstance(dtype, pl.Struct):
        names = [f.name for f in dtype.fields]
        return names != sorted(names) or any(_needs_sorting(f.dtype) for f in dtype.fields)
    return isinstance(dtype, pl.List) and _needs_sorting(dtype.inner)


def _sorted_json(texts: pl.Series) -> pl.Series:
    """A JSON column with each distinct text re-encoded with sorted keys."""
    distinct = texts.drop_nulls().unique().to_list()
    resorted = [orjson.dumps(orjson.loads(text), option=orjson.OPT_SORT_KEYS) for text in distinct]
    return texts.replace_strict(distinct, resorted, return_dtype=pl.Binary) if distinct else texts


def frame_columns(frame: pl.DataFrame, columns: pa.StructType, ingest: pa.StructType) -> pa.Table | None:
    """The table's `columns` (its schema without `record_hash`) from `frame`, or None when the
    frame does not fit them. `ingest` is `columns` with times as text, as records carry them."""
    if not set(frame.columns) <= set(columns.names):
        return None
    arrow = frame.to_arrow()
    arrays = []
    for field, text_field in zip(columns, ingest):
        if field.name not in frame.columns:
            arrays.append(pa.nulls(len(frame), field.type))
            continue
        dtype = frame.schema[field.name]
        try:
            if is_json(dtype):
                array = _json_values(frame[field.name], field.type, text_field.type)
                if array is None:
                    return None
            else:
                if is_map(dtype):
                    mappings = _mappings(frame[field.name])
                    if not all(map(_fits(field.type), mappings)):
                        return None
                    array = pa.array(mappings, type=text_field.type)
                else:
                    array = arrow.column(field.name).combine_chunks().cast(text_field.type)
                array = _cast_times(array, field.type)
        except (pa.ArrowException, TypeError, ValueError):
            return None
        if (not field.nullable and array.null_count) or _nulls_in_required(array, field.type):
            return None
        arrays.append(array)
    return pa.Table.from_arrays(arrays, schema=pa.schema(list(columns)))


def _json_values(texts: pl.Series, kind: pa.DataType, text_kind: pa.DataType) -> pa.Array | None:
    """A JSON column as an Arrow array of `kind`, each distinct text decoded and converted once;
    None if a value names a field `kind` lacks."""
    distinct = texts.drop_nulls().unique().to_list()
    values = [orjson.loads(text) for text in distinct]
    if not all(map(_fits(kind), values)):
        return None
    converted = _cast_times(pa.array(values, type=text_kind), kind)
    positions = texts.replace_strict(distinct, list(range(len(distinct))), return_dtype=pl.UInt32)
    return converted.take(positions.to_arrow())


def _mappings(column: pl.Series) -> list[dict[Any, Any] | None]:
    """A map column's values as the dicts its records hold (`as_records`)."""
    return [None if entries is None else {e["key"]: e["value"] for e in entries} for entries in column.to_list()]
