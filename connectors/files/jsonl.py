"""JSONL outputs: each output kind is one file in the out-dir, written by one sink partition.

A partition appends whole lines and flushes after every batch; its snapshot is the file's
length, so a run resumed from Bytewax recovery truncates what was written after the snapshot
and writes it again: the files hold every record exactly once. A batch is encoded and written on a
thread of the partition's own while the worker goes on (Polars' encoding and the write release the
GIL); the next batch, a snapshot and close wait for it first. Without writer threads the flow
encodes each batch where it is made (`jsonl_output`), spread over a cluster's workers, and the
file's partition only writes the lines: one compute thread per process.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, BinaryIO

import orjson
import polars as pl
from bytewax.outputs import StatefulSinkPartition

from connectors.by_kind import KindPartitionedSink
from connectors.write_behind import WriteBehind

from dataflows.errors import ConvoflowError
from dataflows.flow import FlowOutput, as_given
from dataflows.records import Records, is_json, is_map

Record = dict[str, Any]


def prepare_out_dir(out_dir: Path, file_names: Sequence[str], *, overwrite: bool, dirs: Sequence[str] = ()) -> None:
    """Create `out_dir` with every output file empty, refusing to mix with an earlier run's files
    unless `overwrite`, which also removes the folders `dirs` (an earlier run's lake). (Bytewax builds a sink partition only for its first item, so an output
    that gets none would otherwise not exist.)"""
    if out_dir.exists() and not out_dir.is_dir():
        msg = f"--out-dir {out_dir} exists and is not a directory"
        raise ConvoflowError(msg)
    out_dir.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out_dir.iterdir())
    if existing and not overwrite:
        shown = ", ".join(existing[:5]) + (", ..." if len(existing) > 5 else "")
        msg = f"--out-dir {out_dir} is not empty ({shown}); pass --overwrite to replace its outputs"
        raise ConvoflowError(msg)
    for name in dirs:
        shutil.rmtree(out_dir / name, ignore_errors=True)
    for name in file_names:
        (out_dir / name).write_bytes(b"")


def json_line(record: Record) -> bytes:
    """A record as one JSON line."""
    return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)


def json_lines(kind: str, records: Records) -> bytes:
    """A batch of records as JSON lines (how `JsonlPartition` writes them). A frame is encoded
    column-wise, byte for byte as `json_line` encodes its rows."""
    if isinstance(records, pl.DataFrame):
        if records.is_empty():
            return b""
        lines = records.select(json_expr(records.schema)).to_series()
        # Cast to bytes inside Polars: a Python str of the batch would be decoded and encoded again.
        joined: bytes = lines.str.join("\n").cast(pl.Binary).item()
        return joined + b"\n"
    return b"".join(map(json_line, records))


def json_expr(schema: pl.Schema) -> pl.Expr:
    """Each row of a frame of `schema` as the JSON `json_line` makes of its record (`as_records`)."""
    maps = {name for name, dtype in schema.items() if is_map(dtype)}
    texts = {name for name, dtype in schema.items() if is_json(dtype)}
    if not maps and not texts:
        return pl.struct(pl.all()).struct.json_encode()
    pieces: list[pl.Expr] = []
    plain: list[str] = []
    for name in [*schema.names(), None]:
        if (name is None or name in maps or name in texts) and plain:
            pieces.append(pl.struct(plain).struct.json_encode().str.slice(1).str.head(-1))
            plain = []
        if name in maps:
            pieces.append(pl.lit(f"{orjson.dumps(name).decode()}:") + _json_object(pl.col(name)))
        elif name in texts:
            pieces.append(pl.lit(f"{orjson.dumps(name).decode()}:") + pl.col(name).cast(pl.String).fill_null("null"))
        elif name is not None:
            plain.append(name)
    return pl.concat_str([pl.lit("{"), pl.concat_str(pieces, separator=","), pl.lit("}")])


def _json_object(entries: pl.Expr) -> pl.Expr:
    """A map column's entries as a JSON object."""
    key = pl.struct(pl.element().struct.field("key").alias("k")).struct.json_encode().str.slice(5).str.head(-1)
    value = pl.element().struct.field("value").cast(pl.String)
    return pl.lit("{") + entries.list.eval(key + pl.lit(":") + value).list.join(",") + pl.lit("}")


Batch = Records | bytes
"""What a JSONL partition takes: records, or the JSON lines `json_lines` made of them."""


def jsonl_output(out_dir: Path, kinds: Sequence[str], *, writer_threads: bool = True) -> FlowOutput:
    """The flow output writing each kind to its file: records encoded on the file's writer thread,
    or (without writer threads) where the flow makes them."""
    sink = JsonlSink(out_dir, kinds, writer_threads=writer_threads)
    return FlowOutput("jsonl", sink, as_given if writer_threads else json_lines)


class JsonlSink(KindPartitionedSink[Batch, int]):
    """Routes `(kind, batch)` to `<out_dir>/<kind>.jsonl`; one partition per kind, which encodes
    records (`json_lines`) as it writes them, on a thread of its own unless not `writer_threads`."""

    output = "JSONL"

    def __init__(self, out_dir: Path, kinds: Sequence[str], *, writer_threads: bool = True) -> None:
        super().__init__(kinds)
        self.out_dir = out_dir
        self.writer_threads = writer_threads

    @staticmethod
    def file_name(kind: str) -> str:
        return f"{kind}.jsonl"

    def build_part(self, step_id: str, for_part: str, resume_state: int | None) -> JsonlPartition:
        return JsonlPartition(self.out_dir / self.file_name(for_part), for_part, resume_state,
                              writer_thread=self.writer_threads)


class JsonlPartition(StatefulSinkPartition[Batch, int]):
    """Appends JSON lines; resumes by truncating to the snapshotted length.

    Without a snapshot the file starts empty: in a fresh run it is empty anyway (one partition
    writes it), and in a resumed run every line in it came after the last snapshot (the run died
    before its first one, or the kind's first record came after it), so it is written again.

    One batch at most is being encoded and written at a time, on the partition's writer thread:
    memory holds that batch and the one the worker makes meanwhile. A failed write is raised on the
    next call. Without `writer_thread`, `write_batch` encodes and writes the batch itself.
    """

    def __init__(self, path: Path, kind: str, resume_length: int | None, *, writer_thread: bool = True) -> None:
        self.kind = kind
        length = resume_length or 0
        self.file: BinaryIO = path.open("ab")
        self.file.truncate(length)
        self.file.seek(length)
        self.writer = WriteBehind(f"convoflow-{path.stem}" if writer_thread else None)

    def write_batch(self, values: list[Batch]) -> None:
        self.writer.run(self._write, values)

    def snapshot(self) -> int:
        self.writer.wait()
        return self.file.tell()

    def close(self) -> None:
        try:
            self.writer.close()
        finally:
            self.file.close()

    def _write(self, values: list[Batch]) -> None:
        self.file.writelines(batch if isinstance(batch, bytes) else json_lines(self.kind, batch) for batch in values)
        self.file.flush()
