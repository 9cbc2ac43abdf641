"""convoflow's command line: parse options, call the connectors, print results."""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from rich.console import Console

from connectors.run.cli_options import ConfigOption, settings_command
from connectors.run.job_plan import AlreadyFinished, metrics_for, plan_run
from connectors.view.live import LiveView, RunStats
from connectors.files.replay import check_readable
from connectors.run.log import configure_logging, log_event
from connectors.run.runner import run_job
from connectors.run.settings import as_toml, load_settings, redacted
from connectors.run.stopping import RunAborted
from dataflows.errors import ConvoflowError
from dataflows.events import DeadLetter
from samples.generate import SampleSpec, sessions_for_events, write_sample

if sys.version_info < (3, 10) or sys.version_info >= (3, 13):  # noqa: UP036 - a message beats a wheel error
    sys.exit(f"convoflow needs Python 3.10-3.12 (Bytewax 0.21.1 has no wheels for {sys.version.split()[0]})")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
KafkaConfig = Annotated[list[str] | None, typer.Option(help="Any librdkafka setting as key=value (repeatable).")]


def run(config: Path | None, given: dict[str, Any]) -> None:
    """Run the pipeline on a JSONL file (--input) or live on a Kafka topic (--kafka-brokers)."""
    settings = load_settings(config, given).settings
    configure_logging(settings.log_format, logging.WARNING if settings.quiet else logging.INFO)
    console = Console(stderr=True)
    view = console.is_terminal and not settings.quiet
    with tempfile.TemporaryDirectory(prefix="convoflow-") as state:
        plan = plan_run(settings, Path(state), glimpses=view)
        if isinstance(plan, AlreadyFinished):
            typer.echo(f"nothing to do: this job finished at {plan.finished_at} (--recovery-dir {plan.recovery_dir}); "
                       "delete that folder to run it again")
            return
        stats = RunStats(Path(state), plan.destination)
        if plan.resuming:
            console.print(f"resuming from the last snapshot in {settings.recovery_dir}")
        log_event("start", input=str(settings.input or settings.kafka_brokers), outputs=plan.destination,
                  processes=plan.processes, workers=plan.workers, resuming=plan.resuming)
        try:
            with metrics_for(settings, plan, Path(state)), \
                    LiveView(stats, console, enabled=view) as live:
                signals = run_job(plan.job, plan.processes, plan.workers, poll=live.poll, cluster=plan.cluster)
        except RunAborted as stop:
            log_event("stop", reason=str(stop), exit_code=stop.exit_code)
            then = ("rerun the same command to resume from the last snapshot" if plan.recovery
                    else "outputs end where the stop found them")
            typer.echo(f"{stop}: {then}", err=True)
            raise typer.Exit(stop.exit_code) from None
    summary = stats.summary()
    typer.echo(summary + (f"; {plan.lake.describe()}" if plan.lake else ""))
    log_event("stop", reason=signals.received[0] if signals.received else "end of input", summary=summary)
    if signals.received:
        typer.echo(f"stopped by {signals.received[0]}: the input was read up to the stop, and every window, "
                   "alert and output buffer was flushed", err=True)
        raise typer.Exit(signals.exit_code)
    if plan.recovery is not None:
        plan.recovery.mark_finished()


app.command("run")(settings_command(run))

config_app = typer.Typer(no_args_is_help=True, help="See the settings a run would use.")
app.add_typer(config_app, name="config")


@config_app.command("show")
def config_show(config: ConfigOption = None) -> None:
    """Print the effective run settings (defaults, --config FILE, CONVOFLOW_* variables) as TOML,
    each with where it came from; secrets redacted."""
    loaded = load_settings(config, {})
    typer.echo(as_toml(redacted(loaded.settings), loaded.sources), nl=False)


@app.command()
def produce(
    input_path: Annotated[Path, typer.Argument(metavar="FILE", help="JSONL file to replay into the topic.")],
    kafka_brokers: Annotated[
        str, typer.Option(envvar="KAFKA_BOOTSTRAP_SERVERS", help="Bootstrap servers, host:port[,host:port].")
    ],
    topic: Annotated[str, typer.Option(help="Topic to write to.")] = "websocket_fanout",
    speed_factor: Annotated[
        float, typer.Option(min=0.0, help="Replay gaps between timestamps this many times faster; 0 = no waiting.")
    ] = 1.0,
    kafka_config: KafkaConfig = None,
    create_topic: Annotated[
        int | None, typer.Option(min=1, metavar="PARTITIONS", help="Create the topic if missing, with this many partitions.")
    ] = None,
) -> None:
    """Replay a JSONL file into a Kafka topic with the file's own pacing, keyed by session."""
    from connectors.kafka.clients import check_reachable, ensure_topics, parse_kafka_options, produce_file

    check_readable(input_path)
    extra = parse_kafka_options(kafka_config or [])
    check_reachable(kafka_brokers, extra)
    if create_topic is not None:
        ensure_topics(kafka_brokers, extra, {topic: create_topic})
    sent = produce_file(input_path, kafka_brokers, topic, extra=extra, speed_factor=speed_factor)
    typer.echo(f"produced {sent:,} messages from {input_path} to {topic} at {kafka_brokers}")


rules_app = typer.Typer(no_args_is_help=True, help="Work with rules files (the rules stream as JSONL).")
app.add_typer(rules_app, name="rules")


@rules_app.command("check")
def rules_check(
    path: Annotated[Path, typer.Argument(metavar="FILE", exists=True, dir_okay=False, help="JSONL rules file.")],
) -> None:
    """Validate a rules file and print what each rule would do; exit 1 if any rule is rejected."""
    from connectors.files.rules_file import read_rules
    from dataflows.rules import RuleBook, describe

    book = RuleBook()
    rejected = ignored = 0
    for item, _arrival in read_rules(path):
        if isinstance(item, DeadLetter):
            rejected += 1
            typer.echo(f"line {item.ref.line}: rejected: {item.reason}")
        elif not book.add(item):
            ignored += 1
            typer.echo(f"{item.id} v{item.version}: ignored, a version as high was already given")
        else:
            typer.echo(describe(item))
    typer.echo(f"{book.applied} rules applied, {ignored} ignored as stale, {rejected} rejected in {path}")
    if rejected:
        raise typer.Exit(code=1)


lake_app = typer.Typer(no_args_is_help=True, help="Look into the Iceberg tables a run wrote (and maintain them).")
app.add_typer(lake_app, name="lake")
LakeDir = Annotated[Path, typer.Option("--lake-dir", help="The embedded catalog's folder.")]
CatalogName = Annotated[str | None, typer.Option("--catalog", help="A catalog of PyIceberg's configuration instead.")]
TableName = Annotated[str, typer.Argument(metavar="TABLE", help="A table (chat_messages, ...) or an output kind (messages, ...).")]


def _lake_catalog(lake_dir: Path, catalog: str | None) -> Any:
    from connectors.lake.tables import open_catalog

    if catalog is None and not (lake_dir / "catalog.db").exists():
        msg = f"no lake in {lake_dir} (a run with --lake --out-dir DIR writes DIR/lake); pass --lake-dir or --catalog"
        raise ConvoflowError(msg)
    return open_catalog(catalog or "convoflow", None if catalog else lake_dir.resolve())


@lake_app.command("tables")
def lake_tables(lake_dir: LakeDir = Path("out/lake"), catalog: CatalogName = None) -> None:
    """Every table with its rows, snapshots, data files and size."""
    from connectors.lake.admin import list_tables

    for t in list_tables(_lake_catalog(lake_dir, catalog)):
        typer.echo(f"{t.name:<22} {t.rows:>10,} rows {t.snapshots:>5} snapshots {t.data_files:>5} files "
                   f"{t.total_bytes / 1e6:>9.2f} MB")


@lake_app.command("snapshots")
def lake_snapshots(table: TableName, lake_dir: LakeDir = Path("out/lake"), catalog: CatalogName = None) -> None:
    """A table's snapshots, oldest first, with their summaries (convoflow's commit markers included)."""
    from connectors.lake.admin import list_snapshots, load_table

    for snap in list_snapshots(load_table(_lake_catalog(lake_dir, catalog), table)):
        marker = "*" if snap.current else " "
        summary = ", ".join(f"{k}={v}" for k, v in sorted(snap.summary.items()) if k.startswith(("added-records", "convoflow")))
        typer.echo(f"{marker} {snap.snapshot_id} {snap.time.isoformat()} {snap.operation:<9} {summary}")


@lake_app.command("show")
def lake_show(
    table: TableName, lake_dir: LakeDir = Path("out/lake"), catalog: CatalogName = None,
    as_of: Annotated[str | None, typer.Option(help="A time (ISO-8601) or snapshot id: the table as it was.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="Rows to print.")] = 20,
    where: Annotated[str | None, typer.Option(help="A row filter, e.g. \"session_id = 's-1'\".")] = None,
) -> None:
    """Rows of a table as JSON lines (time travel with --as-of)."""
    from connectors.lake.admin import load_table, parse_as_of, show

    rows = show(load_table(_lake_catalog(lake_dir, catalog), table), parse_as_of(as_of) if as_of else None, limit,
                *((where,) if where else ()))
    for row in rows:
        typer.echo(orjson.dumps(row, default=str).decode())


@lake_app.command("expire")
def lake_expire(
    table: TableName,
    older_than: Annotated[str, typer.Option(help="An age (90s, 30m, 12h, 7d) or an ISO-8601 time.")],
    keep: Annotated[int, typer.Option(min=1, help="Snapshots kept whatever their age.")] = 1,
    lake_dir: LakeDir = Path("out/lake"), catalog: CatalogName = None,
) -> None:
    """Expire old snapshots (PyIceberg's maintenance); convoflow's commit markers are kept in a ledger."""
    from datetime import datetime, timezone

    from connectors.lake.admin import expire, load_table, parse_older_than

    report = expire(load_table(_lake_catalog(lake_dir, catalog), table),
                    parse_older_than(older_than, datetime.now(timezone.utc)), keep=keep)
    typer.echo(f"expired {report.expired} snapshots, kept {report.kept}, {report.markers} commit markers in the ledger")


@lake_app.command("evolve")
def lake_evolve(
    table: TableName,
    column: Annotated[str, typer.Argument(help="The new column (a.b adds inside struct a).")],
    type_name: Annotated[str, typer.Argument(metavar="TYPE", help="string, long, int, double, boolean, timestamptz, ...")],
    doc: Annotated[str | None, typer.Option(help="The column's description.")] = None,
    lake_dir: LakeDir = Path("out/lake"), catalog: CatalogName = None,
) -> None:
    """Add an optional column; rows written before read back with it null."""
    from connectors.lake.admin import evolve, load_table

    field = evolve(load_table(_lake_catalog(lake_dir, catalog), table), column, type_name, doc)
    typer.echo(f"added {column} ({field.field_type}) to {table}")


@lake_app.command("compact")
def lake_compact(
    table: TableName, lake_dir: LakeDir = Path("out/lake"), catalog: CatalogName = None,
    where: Annotated[str | None, typer.Option(help="Only the rows (partitions) this filter selects.")] = None,
) -> None:
    """Rewrite a table's data files into fewer, sorted ones. PyIceberg 0.12 cannot compact: this is an
    overwrite, a delete+append snapshot pair that incremental readers see as new rows, and it fails
    if another writer commits meanwhile."""
    from connectors.lake.admin import compact, load_table

    report = compact(load_table(_lake_catalog(lake_dir, catalog), table), *((where,) if where else ()))
    typer.echo(f"rewrote {report.rows:,} rows of {report.table}: {report.files_before} files -> {report.files_after}")
    typer.echo(report.cost)


@app.command()
def samples(
    out: Annotated[Path, typer.Option("--out", dir_okay=False, help="File to write.")] = Path(
        "samples/conversations.jsonl"
    ),
    events: Annotated[
        int | None, typer.Option(min=1, help="About this many events (sets the session count).")
    ] = None,
    sessions: Annotated[int, typer.Option(min=1, help="RM–customer conversations.")] = SampleSpec.sessions,
    seed: Annotated[int, typer.Option(help="Random seed: same seed, same file.")] = SampleSpec.seed,
) -> None:
    """Generate realistic sample events (seeded, reproducible) as JSONL."""
    count = sessions_for_events(events) if events is not None else sessions
    spec = SampleSpec(sessions=count, seed=seed)
    out.parent.mkdir(parents=True, exist_ok=True)
    lines = write_sample(out, spec)
    typer.echo(f"wrote {lines:,} lines ({count:,} sessions, seed {seed}) to {out}")


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; user errors become one line on stderr and exit code 2."""
    try:
        code = app(args=argv, standalone_mode=False)
    except typer.Exit as exc:
        return exc.exit_code
    except (typer.Abort, KeyboardInterrupt):
        print("interrupted", file=sys.stderr)
        return 130
    except typer.TyperException as exc:
        print(f"error: {exc.format_message()}", file=sys.stderr)
        return 2
    except ConvoflowError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return code if isinstance(code, int) else 0


def entry() -> None:
    """The `convoflow` command that `pip install` makes."""
    sys.exit(main())


if __name__ == "__main__":
    entry()
