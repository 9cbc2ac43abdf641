"""Iceberg sink throughput: 1M message rows through one sink partition into a fresh warehouse.

    python benchmarks/bench_lake.py [--rows 1000000] [--batch 1000] [--commit-rows 50000] [--shape plain|enriched]
                                    [--form frames|dicts]

Builds the message records first (as the flow's `Event.as_record()` makes them: 5,000 sessions,
one event every 0.2 s, so the rows span three days and their day partitions), then times one
`IcebergPartition` (one worker, the sink's defaults: commit every 50,000 rows, snapshot expiry on)
from its first `write_batch` to the end of `close()`, the last commit included. `--shape enriched`
adds a `moderation` verdict and a `user_context` to every record, shared per verdict and per user
as the flow shares them. Reports rows/s, commits, data files and their median size, read back
from the table's metadata. Batches come as the flow's frames (`--form dicts`: as lists of dicts).
Target: 300,000 rows/s.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_ROWS_PER_SECOND = 300_000
T0 = 1709542800.0  # 2024-03-04T09:00:00Z
TEXTS = (
    "Hi, any news on my loan application from last week?",
    "You should have a decision by the 20th.",
    "Thanks, that helps a lot!",
    "What are the fees for an international transfer?",
    "Could you send me the form again? I can't find it.",
    "Sure, I've just emailed it to you.",
)


def make_records(rows: int, shape: str) -> list[dict[str, Any]]:
    from dataflows.events import Event

    verdicts = [{"action": "allow", "rules": [], "reasons": [], "flags": {"translation": True}, "role": None},
                {"action": "flag", "rules": [{"id": "bw", "version": 2}], "reasons": ["w"], "flags": {}, "role": None}]
    contexts: dict[str, dict[str, Any]] = {}
    records = []
    for n in range(rows):
        session = f"s-{n % 5000:04d}"
        sender = "customer" if n % 3 else "rm"
        record = Event(f"chat.jsonl:{n + 1}", session, sender, "message", TEXTS[n % len(TEXTS)], None, "event",
                       "conversation", "chat.jsonl", n + 1, 120 * n).timed(T0 + 0.2 * n).as_record()
        if shape == "enriched":
            user = f"{session}/{sender}"
            record["moderation"] = verdicts[n % 7 == 0]
            record["user_context"] = contexts.setdefault(user, {"total_messages": n % 50,
                                                                "first_seen": "2024-03-01T08:00:00+00:00",
                                                                "last_active": "2024-03-03T18:30:00+00:00"})
        records.append(record)
    return records


def batches(records: list[dict[str, Any]], size: int, form: str) -> list[Any]:
    """The records in batches of `size`: lists of dicts, or frames as the flow's messages travel
    (a verdict as JSON text, a user context as a struct)."""
    import orjson
    import polars as pl

    from connectors.lake.profiles import CONTEXT_DTYPE

    cut = [records[first:first + size] for first in range(0, len(records), size)]
    if form == "dicts":
        return cut
    frames = []
    for part in cut:
        frame = pl.from_dicts([{k: v for k, v in r.items() if k not in ("moderation", "user_context")} for r in part],
                              infer_schema_length=None)
        if "moderation" in part[0]:
            texts = {id(r["moderation"]): orjson.dumps(r["moderation"]) for r in part}
            frame = frame.with_columns(pl.Series("moderation", [texts[id(r["moderation"])] for r in part], pl.Binary),
                                       pl.Series("user_context", [r["user_context"] for r in part], CONTEXT_DTYPE))
        frames.append(frame)
    return frames


def run(batched: list[Any], commit_rows: int, lake_dir: Path) -> dict[str, Any]:
    from connectors.lake.commits import PARTITION_KEY
    from connectors.lake.sink import IcebergSink
    from connectors.lake.tables import open_catalog

    sink = IcebergSink(open_catalog(lake_dir=lake_dir), kinds=["messages"], commit_rows=commit_rows)
    partition = sink.build_part("bench", "messages", None)
    start = time.perf_counter()
    for records in batched:
        partition.write_batch([records])
    partition.close()
    seconds = time.perf_counter() - start
    rows = sum(len(records) for records in batched)

    table = partition.table.refresh()
    commits = sum(1 for s in table.snapshots() if s.summary is not None and s.summary.get(PARTITION_KEY))
    commits += sum(int(v.count(",")) + 1 for k, v in table.properties.items() if k.startswith("convoflow.ledger."))
    sizes = table.inspect.files().column("file_size_in_bytes").to_pylist()
    rows_read = table.scan(selected_fields=("record_hash",)).to_arrow().num_rows
    return {"rows": rows, "rows_read": rows_read, "seconds": seconds, "rows_per_second": rows / seconds,
            "commits": commits, "snapshots_kept": len(table.metadata.snapshots), "data_files": len(sizes),
            "median_file_bytes": statistics.median(sizes) if sizes else 0, "smallest_file_bytes": min(sizes, default=0)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--batch", type=int, default=1000, help="records per write_batch (a Bytewax batch)")
    parser.add_argument("--commit-rows", type=int, default=50_000)
    parser.add_argument("--shape", choices=["plain", "enriched"], default="plain")
    parser.add_argument("--form", choices=["frames", "dicts"], default="frames",
                        help="batches as the flow's frames (default) or as lists of dicts (what stages may give)")
    parser.add_argument("--repeat", type=int, default=1, help="runs, each into a fresh warehouse; the best counts")
    parser.add_argument("--lake-dir", type=Path, help="keep the (last run's) warehouse here")
    args = parser.parse_args()

    batched = batches(make_records(args.rows, args.shape), args.batch, args.form)
    results = []
    for _ in range(args.repeat):
        with tempfile.TemporaryDirectory(prefix="bench-lake-") as scratch:
            result = run(batched, args.commit_rows, args.lake_dir or Path(scratch))
        if result["rows_read"] != result["rows"]:
            sys.exit(f"wrote {result['rows']} rows but read back {result['rows_read']}")
        results.append(result)
        print(f"  run: {result['rows_per_second']:,.0f} rows/s", file=sys.stderr)
    best = max(results, key=lambda r: r["rows_per_second"])
    met = "met" if best["rows_per_second"] >= TARGET_ROWS_PER_SECOND else "MISSED"
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(f"{best['rows']:,} {args.shape} message rows as {args.form} in {best['seconds']:.2f} s: {best['rows_per_second']:,.0f} rows/s "
          f"(best of {len(results)}; target {TARGET_ROWS_PER_SECOND:,}: {met}; {os.cpu_count()} CPUs, load {load})")
    print(f"commits: {best['commits']} of up to {args.commit_rows:,} rows (snapshots kept: {best['snapshots_kept']}); "
          f"data files: {best['data_files']}, median {best['median_file_bytes'] / 1e6:.2f} MB, "
          f"smallest {best['smallest_file_bytes'] / 1e6:.2f} MB (a commit's rows split by day)")


if __name__ == "__main__":
    main()
