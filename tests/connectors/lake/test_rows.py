"""Records into lake rows: frames give the rows and hashes their records give."""

import itertools
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pyiceberg.schema import Schema
from pyiceberg.types import (
    BooleanType, DoubleType, IntegerType, ListType, LongType, MapType, NestedField, StringType, StructType,
    TimestamptzType,
)

from cli import main
from connectors.lake.rows import ArrowRows, frame_hashes, record_hashes, row_converter
from dataflows.records import as_records
from tests.conftest import read_jsonl
from tests.golden.cases import write_rules


def _schema() -> Schema:
    i = itertools.count(1).__next__
    message = StructType(NestedField(i(), "text", StringType()), NestedField(i(), "n", LongType()),
                         NestedField(i(), "timestamp", TimestamptzType()))
    rule = StructType(NestedField(i(), "id", StringType()), NestedField(i(), "version", LongType()))
    moderation = StructType(
        NestedField(i(), "action", StringType()),
        NestedField(i(), "rules", ListType(i(), rule, element_required=True)),
        NestedField(i(), "flags", MapType(i(), StringType(), i(), BooleanType(), value_required=False)),
    )
    return Schema(
        NestedField(i(), "session_id", StringType(), required=True), NestedField(i(), "at", TimestamptzType()),
        NestedField(i(), "messages", ListType(i(), message, element_required=True)),
        NestedField(i(), "counts", MapType(i(), StringType(), i(), IntegerType(), value_required=False)),
        NestedField(i(), "moderation", moderation), NestedField(i(), "score", DoubleType()),
        NestedField(i(), "language", StringType()), NestedField(i(), "record_hash", LongType(), required=True),
    )


SCHEMA = _schema()
texts = st.text(alphabet=st.sampled_from(["a", "B", "é", "😀", '"', "\\", "\n", "\x00", "\u2028", " "]), max_size=6)
times = st.one_of(st.none(), st.sampled_from(["2024-03-04T09:00:00+00:00", "2024-03-04T09:00:00.250000+00:00",
                                              "2024-02-29T23:59:59.999999+00:00"]))
verdicts = st.one_of(st.none(), st.fixed_dictionaries({
    "action": st.sampled_from(["allow", "flag", "block"]),
    "rules": st.lists(st.fixed_dictionaries({"version": st.integers(1, 3), "id": texts}), max_size=2),
    "flags": st.dictionaries(texts, st.one_of(st.none(), st.booleans()), max_size=3),
}))
rows = st.fixed_dictionaries({
    "session_id": texts,
    "messages": st.lists(st.fixed_dictionaries({"text": texts, "n": st.integers(-5, 5), "timestamp": times}), max_size=3),
    "counts": st.dictionaries(texts, st.integers(0, 9), max_size=4),
    "at": times,
    "moderation": verdicts,
    "score": st.one_of(st.none(), st.floats(-1e6, 1e6, allow_nan=False)),
    "language": st.one_of(st.none(), st.sampled_from(["en", "fr"])),
})


def frame_of(records: list[dict[str, Any]]) -> pl.DataFrame:
    """Records as a flow's frame carries them: the map as entries, the verdict as JSON text."""
    return pl.DataFrame({
        "session_id": [r["session_id"] for r in records],
        "messages": [r["messages"] for r in records],
        "counts": [[{"key": k, "value": v} for k, v in r["counts"].items()] for r in records],
        "at": [r["at"] for r in records],
        "moderation": [None if r["moderation"] is None else orjson.dumps(r["moderation"]) for r in records],
        "score": [r["score"] for r in records],
        "language": [r["language"] for r in records],
    }, schema={"session_id": pl.String,
               "messages": pl.List(pl.Struct({"text": pl.String, "n": pl.Int64, "timestamp": pl.String})),
               "counts": pl.List(pl.Struct({"key": pl.String, "value": pl.Int64})), "at": pl.String,
               "moderation": pl.Binary, "score": pl.Float64, "language": pl.String})


@settings(max_examples=150, deadline=None)
@given(st.lists(rows, min_size=1, max_size=6))
def test_a_frame_gives_the_rows_and_hashes_of_its_records(drawn: list[dict[str, Any]]) -> None:
    frame = frame_of(drawn)
    records = as_records(frame)
    assert frame_hashes(frame).to_pylist() == record_hashes(records)
    to_rows = ArrowRows("t", SCHEMA)
    assert to_rows(frame).equals(to_rows(records))


def test_the_hash_leaves_out_enrichment_and_sees_every_other_field() -> None:
    base = {"session_id": "s", "messages": [], "counts": {"rm": 1}, "at": None, "moderation": None, "score": 1.0,
            "language": None}
    variants = [base, {**base, "language": "fr"}, {**base, "counts": {"rm": 2}}, {**base, "score": 1.5}]
    hashes = frame_hashes(frame_of(variants)).to_pylist()
    assert hashes[0] == hashes[1], "language is filled by a stage: not part of the identity"
    assert len({hashes[0], hashes[2], hashes[3]}) == 3


def test_a_frame_that_does_not_fit_goes_row_by_row_and_names_the_field() -> None:
    frame = frame_of([{"session_id": "s", "messages": [], "counts": {}, "at": None, "moderation": None, "score": None,
                       "language": None}]).with_columns(pl.lit("x").alias("extra"))
    with pytest.raises(Exception, match=r"t: fields \['extra'\] are not in the table's schema"):
        ArrowRows("t", SCHEMA)(frame)
    missing = frame.drop("extra").with_columns(pl.lit(None, pl.String).alias("session_id"))
    with pytest.raises(Exception, match="t.session_id is required but missing"):
        ArrowRows("t", SCHEMA)(missing)


def test_a_verdict_field_outside_the_schema_is_an_error_as_for_dicts() -> None:
    frame = frame_of([{"session_id": "s", "messages": [], "counts": {}, "at": None, "score": None, "language": None,
                       "moderation": {"action": "flag", "rules": [], "flags": {}, "why": "x"}}])
    with pytest.raises(Exception, match=r"t.moderation: fields \['why'\]"):
        ArrowRows("t", SCHEMA)(frame)


@pytest.mark.lake
def test_a_run_with_rules_writes_the_rows_its_files_hold(tmp_path: Path) -> None:
    from connectors.lake.tables import TABLES, open_catalog

    out = tmp_path / "out"
    options = write_rules(tmp_path)
    assert main(["run", *options, "--out-dir", str(out), "--speed-factor", "0", "--quiet", "--lake"]) == 0
    catalog = open_catalog(lake_dir=out / "lake")
    for kind, spec in TABLES.items():
        table = catalog.load_table(("convoflow", spec.name))
        written = table.scan().to_arrow()
        records = read_jsonl(out / f"{kind}.jsonl")
        expected = pa.Table.from_pylist(list(map(row_converter(spec.name, table.schema()), records)),
                                        schema=written.schema)
        assert len(records) > 0 or kind == "late", kind
        assert Counter(map(repr, written.to_pylist())) == Counter(map(repr, expected.to_pylist())), kind


def test_a_frame_of_enrichment_only_hashes_as_empty_records() -> None:
    frame = pl.DataFrame({"language": ["en", None]})
    assert frame_hashes(frame).to_pylist() == record_hashes([{}, {}])
