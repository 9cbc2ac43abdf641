"""convoflow's command line: parse options, wire connectors to the dataflow, print results."""

from __future__ import annotations

import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Annotated, Any, cast

import orjson
import typer
from rich.console import Console

from connectors.jsonl import prepare_out_dir
from connectors.live_view import LiveView, RunStats
from connectors.replay import check_readable, first_event_time
from connectors.kafka_outputs import OutputTopics
from connectors.llm_config import LlmConfig
from connectors.llm_stage import LlmStage
from connectors.recovery import Recovery, RecoveryState
from connectors.stopping import RunAborted
from connectors.runner import OUTPUT_FILES, Cluster, FlowJob, KafkaRun, LakeConfig, ReplayRun, run_job
from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from dataflows.events import DeadLetter
from dataflows.parse import MAX_LINE_BYTES
from dataflows.flow import FlowConfig, Stage
from connectors.pattern_files import load_patterns
from dataflows.sequencing import ReplayLayout
from dataflows.windows import WindowConfig
from samples.generate import SampleSpec, sessions_for_events, write_sample

if sys.version_info < (3, 10) or sys.version_info >= (3, 13):  # noqa: UP036 - a message beats a wheel error
    sys.exit(f"convoflow needs Python 3.10-3.12 (Bytewax 0.21.1 has no wheels for {sys.version.split()[0]})")

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
DEFAULT_PATTERNS = Path(__file__).parent / "samples" / "patterns.yaml"
DEFAULT_LAKE = "lake"
DEFAULT_PARTITIONS = 3
PROFILES_START = "profiles_start"
"""The recovery fact naming the lake snapshot a job's user history was first read from."""
LAKE_START = "lake_start_seqs"
"""The recovery fact holding each lake table's next commit seq when the job first started."""

Processes = Annotated[int, typer.Option("--processes", min=1, help="Local Bytewax processes forming one cluster.")]
Workers = Annotated[int, typer.Option("--workers", min=1, help="Worker threads in each process.")]


class LlmMode(StrEnum):
    off = "off"
    on = "on"
    auto = "auto"


KafkaConfig = Annotated[list[str] | None, typer.Option(help="Any librdkafka setting as key=value (repeatable).")]
KafkaConfigFile = Annotated[
    Path | None,
    typer.Option(exists=True, dir_okay=False, help="A properties file of librdkafka settings (key=value lines)."),
]


@app.command()
def run(
    input_path: Annotated[
        Path | None, typer.Option("--input", help="JSONL file of events to replay (or read a topic: --kafka-brokers).")
    ] = None,
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Folder for JSONL outputs [default: out for a file; none when reading Kafka]."),
    ] = None,
    speed_factor: Annotated[
        float, typer.Option(min=0.0, help="Replay gaps between timestamps this many times faster; 0 = no waiting.")
    ] = 1.0,
    window_size: Annotated[float, typer.Option(help="Tumbling window length in seconds.")] = 30.0,
    max_out_of_orderness: Annotated[float, typer.Option(help="Watermark delay in seconds.")] = 5.0,
    max_line_bytes: Annotated[
        int, typer.Option(min=1, help="Longest input line in bytes; a longer one goes to dead_letter unread.")
    ] = MAX_LINE_BYTES,
    max_window_messages: Annotated[
        int, typer.Option(min=1, help="Messages listed per window record (the earliest); the rest are counted in its overflow.")
    ] = 10_000,
    max_open_windows: Annotated[
        int, typer.Option(min=1, help="Open windows per session; one more closes the session's oldest early.")
    ] = 1_000,
    processes: Processes = 1,
    workers: Workers = 1,
    addresses: Annotated[
        str | None,
        typer.Option(rich_help_panel="Cluster", help="host:port of every process of a cluster across machines, comma-separated."),
    ] = None,
    process_id: Annotated[
        int | None, typer.Option(min=0, rich_help_panel="Cluster", help="This process's index in --addresses.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace the outputs of an earlier run in --out-dir.")] = False,
    quiet: Annotated[bool, typer.Option(help="No live view; print only the summary.")] = False,
    patterns: Annotated[
        Path, typer.Option(help="YAML or JSON file of pattern definitions (alerts output).")
    ] = DEFAULT_PATTERNS,
    no_patterns: Annotated[bool, typer.Option("--no-patterns", help="Detect no patterns.")] = False,
    lake: Annotated[bool, typer.Option(help="Also write every output to Iceberg tables (see --lake-dir).")] = False,
    lake_dir: Annotated[
        Path | None, typer.Option(help="Folder of the embedded Iceberg catalog and warehouse [default: OUT_DIR/lake].")
    ] = None,
    catalog: Annotated[
        str | None, typer.Option(rich_help_panel="Lake", help="Write to this catalog of PyIceberg's configuration instead.")
    ] = None,
    lake_commit_rows: Annotated[int, typer.Option(min=1, rich_help_panel="Lake", help="Rows per Iceberg commit.")] = 50_000,
    lake_commit_interval: Annotated[
        float, typer.Option(min=0.1, rich_help_panel="Lake", help="Seconds at most between commits.")
    ] = 30.0,
    lake_keep_snapshots: Annotated[
        int, typer.Option(min=1, rich_help_panel="Lake", help="Snapshots kept when old ones are expired.")
    ] = 50,
    profiles: Annotated[
        bool, typer.Option(rich_help_panel="Lake", help="Attach each user's history from the lake to messages (user_context).")
    ] = True,
    profiles_refresh: Annotated[
        float, typer.Option(min=0.0, rich_help_panel="Lake", help="Seconds between checks for new lake snapshots.")
    ] = 60.0,
    profiles_as_of: Annotated[
        str | None, typer.Option(rich_help_panel="Lake", help="Read the history as of this time or snapshot id.")
    ] = None,
    rules: Annotated[
        Path | None,
        typer.Option(exists=True, dir_okay=False, help="JSONL rules stream joined to every message (see `rules check`)."),
    ] = None,
    kafka_brokers: Annotated[
        str | None, typer.Option(help="Read --input-topic live from these Kafka brokers and write to topics.")
    ] = None,
    input_topic: Annotated[str, typer.Option(rich_help_panel="Kafka", help="Topic of input events.")] = "websocket_fanout",
    output_topic: Annotated[
        str, typer.Option(rich_help_panel="Kafka", help="Topic of accepted messages (chat envelope).")
    ] = OutputTopics.messages,
    windows_topic: Annotated[str, typer.Option(rich_help_panel="Kafka", help="Topic of closed windows.")] = OutputTopics.windows,
    alerts_topic: Annotated[str, typer.Option(rich_help_panel="Kafka", help="Topic of pattern alerts.")] = OutputTopics.alerts,
    late_topic: Annotated[str, typer.Option(rich_help_panel="Kafka", help="Topic of late events.")] = OutputTopics.late,
    dead_letter_topic: Annotated[
        str, typer.Option(rich_help_panel="Kafka", help="Topic of rejected input.")
    ] = OutputTopics.dead_letter,
    moderated_topic: Annotated[
        str, typer.Option(rich_help_panel="Kafka", help="Topic of messages blocked by the rules.")
    ] = OutputTopics.moderated,
    rules_topic: Annotated[
        str, typer.Option(rich_help_panel="Kafka", help="Topic of the rules stream, read from its beginning (ignored with --rules).")
    ] = "rules",
    rules_grace: Annotated[
        float, typer.Option(min=0.0, rich_help_panel="Kafka", help="Seconds a live message waits for rules stamped before it.")
    ] = 1.0,
    create_topics: Annotated[
        bool, typer.Option(rich_help_panel="Kafka", help="Create missing topics (with the input topic's partition count).")
    ] = False,
    kafka_config: KafkaConfig = None,
    kafka_config_file: KafkaConfigFile = None,
    from_beginning: Annotated[
        bool,
        typer.Option(
            "--from-beginning/--from-latest", rich_help_panel="Kafka",
            help="Where to start reading the input topic; without recovery every run starts there.",
        ),
    ] = True,
    stop_at_end: Annotated[
        bool, typer.Option(rich_help_panel="Kafka", help="Stop at the input topic's current end instead of waiting.")
    ] = False,
    llm: Annotated[
        LlmMode, typer.Option(rich_help_panel="LLM", help="Window assistant and translation: auto = on when a key or base URL is set.")
    ] = LlmMode.auto,
    llm_base_url: Annotated[
        str | None, typer.Option(rich_help_panel="LLM", envvar="OPENAI_BASE_URL", help="OpenAI-compatible endpoint (vLLM, Ollama, ...).")
    ] = None,
    llm_model: Annotated[str, typer.Option(rich_help_panel="LLM", help="Model name.")] = "gpt-4o-mini",
    llm_api_key: Annotated[
        str | None, typer.Option(rich_help_panel="LLM", envvar="OPENAI_API_KEY", show_envvar=True, help="API key (never printed).")
    ] = None,
    llm_concurrency: Annotated[int, typer.Option(min=1, rich_help_panel="LLM", help="Calls in flight per worker.")] = 16,
    llm_timeout: Annotated[float, typer.Option(min=0.1, rich_help_panel="LLM", help="Seconds per HTTP attempt.")] = 30.0,
    llm_max_retries: Annotated[int, typer.Option(min=0, rich_help_panel="LLM", help="Retries of 429/5xx/timeouts.")] = 2,
    llm_rate_limit: Annotated[
        float | None, typer.Option(min=0.01, rich_help_panel="LLM", help="Requests per second per worker (default: unpaced).")
    ] = None,
    recovery_dir: Annotated[
        Path | None,
        typer.Option(rich_help_panel="Recovery", help="Snapshot state here; the same command resumes after a crash."),
    ] = None,
    snapshot_interval: Annotated[
        float, typer.Option(min=0.05, rich_help_panel="Recovery", help="Seconds between snapshots (at most this much is redone).")
    ] = 5.0,
    backup_interval: Annotated[
        float, typer.Option(min=0.0, rich_help_panel="Recovery", help="Seconds superseded snapshots are kept (for backups).")
    ] = 0.0,
    block_kib: Annotated[
        int, typer.Option(min=1, help="Size of the file blocks dealt to partitions, in KiB.", hidden=True)
    ] = 1024,
) -> None:
    """Run the pipeline on a JSONL file (--input) or live on a Kafka topic (--kafka-brokers)."""
    if (input_path is None) == (kafka_brokers is None):
        msg = "give either --input FILE to replay a file or --kafka-brokers HOST:PORT to read a topic"
        raise ConvoflowError(msg)
    cluster = _cluster(addresses, process_id, processes)
    if cluster is not None:
        processes = len(cluster.addresses)
    recovery = None
    if recovery_dir is not None:
        recovery = Recovery(recovery_dir.resolve(), timedelta(seconds=snapshot_interval), timedelta(seconds=backup_interval))
    window = _window_config(window_size, max_out_of_orderness, max_window_messages, max_open_windows)
    pattern_defs = () if no_patterns else load_patterns(patterns)
    llm_config = LlmConfig.from_env(
        {}, api_key=llm_api_key, base_url=llm_base_url, mode=llm.value, model=llm_model, concurrency=llm_concurrency,
        timeout=llm_timeout, max_retries=llm_max_retries, rate_limit=llm_rate_limit,
    )
    stages: tuple[Stage, ...] = (LlmStage(llm_config),)
    if input_path is not None:
        check_readable(input_path)
        out_dir = out_dir or Path("out")
    live = None
    if kafka_brokers is not None:
        topics = OutputTopics(output_topic, windows_topic, alerts_topic, late_topic, dead_letter_topic, moderated_topic)
        settings = _kafka_settings(kafka_config, kafka_config_file)
        live = _kafka_input(kafka_brokers, input_topic, topics, None if rules else rules_topic, create_topics, settings)
    lake = lake or catalog is not None or lake_dir is not None
    embedded = lake and catalog is None
    resuming = False
    if recovery is not None:
        job_id = _job_identity(input_path, kafka_brokers, input_topic, out_dir, lake, lake_dir, catalog, rules,
                               window, () if no_patterns else patterns, processes, workers, block_kib, max_line_bytes)
        recovered = recovery.open(job_id, partitions=processes * workers)
        if recovered is RecoveryState.FINISHED:
            typer.echo(f"nothing to do: this job finished at {recovery.finished_at()} (--recovery-dir {recovery_dir}); "
                       "delete that folder to run it again")
            return
        resuming = recovered is RecoveryState.RESUME
    if out_dir is not None and resuming:
        if not out_dir.is_dir():
            msg = f"--out-dir {out_dir} of the run being resumed is gone; delete --recovery-dir {recovery_dir} to start over"
            raise ConvoflowError(msg)
    elif out_dir is not None and cluster is not None and cluster.process_id > 0:
        out_dir.mkdir(parents=True, exist_ok=True)  # process 0 prepares a shared out-dir; this one only writes
    elif out_dir is not None:
        prepare_out_dir(out_dir, OUTPUT_FILES, overwrite=overwrite, dirs=(DEFAULT_LAKE,) if embedded and lake_dir is None else ())
    if embedded and out_dir is None and lake_dir is None:
        msg = "--lake needs --out-dir, --lake-dir or --catalog to know where the tables go"
        raise ConvoflowError(msg)
    lake_config = None
    if lake:
        lake_config = _prepare_lake(LakeConfig(
            (lake_dir or cast(Path, out_dir) / DEFAULT_LAKE).resolve() if embedded else None, catalog or "convoflow",
            lake_commit_rows, lake_commit_interval, lake_keep_snapshots,
        ), recovery, resuming)
        if profiles:
            stages = (_profiles_stage(lake_config, profiles_refresh, profiles_as_of, recovery, resuming), *stages)
    console = Console(stderr=True)
    with tempfile.TemporaryDirectory(prefix="convoflow-") as state:
        state_dir = Path(state)
        job: FlowJob
        if live is None:
            assert input_path is not None and out_dir is not None
            start = time.time()
            first = first_event_time(input_path, max_line_bytes=max_line_bytes)
            origin = start if first is None else first
            layout = ReplayLayout(partitions=processes * workers, block_bytes=block_kib * 1024)
            job = ReplayRun(
                input_path=input_path.resolve(),
                out_dir=out_dir.resolve(),
                flow=FlowConfig(window=window, layout=layout, time_origin=origin, patterns=pattern_defs,
                                rules=rules is not None),
                clock=ReplayClock(event_origin=origin, wall_origin=start, speed=speed_factor),
                state_dir=state_dir,
                lake=lake_config,
                rules_path=rules.resolve() if rules else None,
                stages=stages,
                recovery=recovery,
                max_line_bytes=max_line_bytes,
            )
            destination = str(out_dir)
        else:
            flow = FlowConfig(window=window, layout=ReplayLayout(partitions=len(live.parts)), patterns=pattern_defs,
                              live=True, rules=True)
            job = KafkaRun(
                brokers=live.brokers, input_topic=input_topic, parts=live.parts, topics=live.topics, flow=flow,
                kafka_config=live.settings, from_beginning=from_beginning, tail=not stop_at_end,
                out_dir=out_dir.resolve() if out_dir else None, state_dir=state_dir, lake=lake_config,
                rules_path=rules.resolve() if rules else None, rules_topic=live.rules_topic,
                rules_partitions=live.rules_partitions, rules_grace=rules_grace, stages=stages, recovery=recovery,
            )
            destination = f"Kafka topics {', '.join(live.topics.all())}" + (f" and {out_dir}" if out_dir else "")
        stats = RunStats(state_dir, destination)
        if resuming:
            console.print(f"resuming from the last snapshot in {recovery_dir}")
        try:
            with LiveView(stats, console, enabled=console.is_terminal and not quiet) as view:
                signals = run_job(job, processes, workers, poll=view.poll, cluster=cluster)
        except RunAborted as stop:
            then = ("rerun the same command to resume from the last snapshot" if recovery
                    else "outputs end where the stop found them")
            typer.echo(f"{stop}: {then}", err=True)
            raise typer.Exit(stop.exit_code) from None
    typer.echo(stats.summary() + (f"; {lake_config.describe()}" if lake_config else ""))
    if signals.received:
        typer.echo(f"stopped by {signals.received[0]}: the input was read up to the stop, and every window, "
                   "alert and output buffer was flushed", err=True)
        raise typer.Exit(signals.exit_code)
    if recovery is not None:
        recovery.mark_finished()


def _cluster(addresses: str | None, process_id: int | None, processes: int) -> Cluster | None:
    """The cluster this process joins, from --addresses and --process-id (both or neither)."""
    if addresses is None and process_id is None:
        return None
    if addresses is None or process_id is None:
        msg = "--addresses and --process-id go together: every process of the cluster gets the same --addresses and its own --process-id"
        raise ConvoflowError(msg)
    if processes != 1:
        msg = "--processes starts a local cluster; with --addresses each process is started by hand (one per address)"
        raise ConvoflowError(msg)
    listed = [a.strip() for a in addresses.split(",") if a.strip()]
    bad = [a for a in listed if a.rpartition(":")[0] == "" or not a.rpartition(":")[2].isdigit()]
    if bad or not listed:
        msg = f"--addresses {addresses!r}: expected host:port[,host:port...], got {', '.join(bad) or 'nothing'}"
        raise ConvoflowError(msg)
    if process_id >= len(listed):
        msg = f"--process-id {process_id} is out of range for {len(listed)} addresses (0 to {len(listed) - 1})"
        raise ConvoflowError(msg)
    return Cluster(tuple(listed), process_id)


def _job_identity(input_path: Path | None, brokers: str | None, input_topic: str, out_dir: Path | None, lake: bool,
                  lake_dir: Path | None, catalog: str | None, rules: Path | None, window: WindowConfig,
                  patterns: Path | tuple[()], processes: int, workers: int, block_kib: int,
                  max_line_bytes: int) -> dict[str, Any]:
    """What a resumed run must share with the one that crashed: its input, outputs, partitions and flow."""
    def path(p: Path | None) -> str | None:
        return None if p is None else str(p.resolve())

    return {
        "input": path(input_path) if input_path else f"kafka://{brokers}/{input_topic}",
        "out_dir": path(out_dir), "lake": lake, "lake_dir": path(lake_dir), "catalog": catalog, "rules": path(rules),
        "window_size": window.size, "max_out_of_orderness": window.out_of_orderness, "window_align_to": window.align_to,
        "max_window_messages": window.max_messages, "max_open_windows": window.max_open_windows,
        "patterns": path(patterns) if patterns else None, "processes": processes, "workers": workers,
        "block_kib": block_kib, "max_line_bytes": max_line_bytes,
    }


def _prepare_lake(lake: LakeConfig, recovery: Recovery | None, resuming: bool) -> LakeConfig:
    """Create the lake's tables; with recovery, give the sink where the job's commits began (`job_start`)."""
    from connectors.iceberg import ensure_tables, next_seqs, open_catalog  # heavy: only when asked for

    tables = ensure_tables(open_catalog(lake.catalog, lake.lake_dir))
    if recovery is None:
        return lake
    start = recovery.recall(LAKE_START) if resuming else None
    if start is None:  # the job's first run (or one that died before it got this far)
        start = next_seqs(tables)
        recovery.remember(LAKE_START, start)
    return replace(lake, job_start=start)


def _profiles_stage(lake: LakeConfig, refresh: float, as_of: str | None, recovery: Recovery | None,
                    resuming: bool) -> Stage:
    """The stage that reads user history back from the lake (loaded now, so a bad lake fails early).

    With recovery, the job's first run remembers which snapshot the history was read from and a
    resumed run starts from it: the rows the crashed run committed are not history to it.
    """
    from connectors.lake_admin import parse_as_of
    from connectors.profiles import HistoryStart, ProfilesStage

    pins = recovery if as_of is None else None  # a time-travel read is pinned by its own time
    held = pins.recall(PROFILES_START) if pins is not None and resuming else None
    stage = ProfilesStage(lake_dir=lake.lake_dir, catalog_name=lake.catalog, refresh_seconds=refresh,
                          as_of=parse_as_of(as_of) if as_of else None,
                          start=None if held is None else HistoryStart.from_json(held))
    loaded = stage.loaded_from()
    if pins is not None and held is None:
        pins.remember(PROFILES_START, loaded.as_json())
        stage.start = loaded  # the copies other processes get read this same snapshot first
    return stage


@dataclass(frozen=True)
class _LiveInput:
    """A checked Kafka input: brokers answered, topics exist, the input's partitions listed."""

    brokers: str
    topics: OutputTopics
    parts: tuple[str, ...]
    settings: dict[str, str]
    rules_topic: str | None
    rules_partitions: int


def _kafka_settings(pairs: list[str] | None, file: Path | None) -> dict[str, str]:
    from connectors.kafka_io import parse_kafka_options, read_kafka_config_file

    return {**(read_kafka_config_file(file) if file else {}), **parse_kafka_options(pairs or [])}


def _kafka_input(brokers: str, input_topic: str, topics: OutputTopics, rules_topic: str | None, create: bool,
                 settings: dict[str, str]) -> _LiveInput:
    """Check the brokers answer and every topic exists (or create the missing ones if asked).

    Topics are created with the input topic's partition count, the rules topic with one.
    """
    from connectors.kafka_io import check_reachable, ensure_topics, kafka_config, partition_counts

    kafka_config(brokers, settings)
    check_reachable(brokers, settings)
    names = [input_topic, *topics.all(), *([rules_topic] if rules_topic else [])]
    counts = partition_counts(brokers, settings, names)
    missing = [name for name, count in counts.items() if count is None]
    if missing and not create:
        msg = f"Kafka topics {', '.join(missing)} do not exist on {brokers}; create them or pass --create-topics"
        raise ConvoflowError(msg)
    if missing:
        wanted = counts[input_topic] or DEFAULT_PARTITIONS
        ensure_topics(brokers, settings, {name: 1 if name == rules_topic else wanted for name in missing})
        counts = partition_counts(brokers, settings, names)
    partitions = counts[input_topic] or DEFAULT_PARTITIONS
    parts = tuple(f"{index}-{input_topic}" for index in range(partitions))
    rules_partitions = (counts[rules_topic] or 1) if rules_topic else 0
    return _LiveInput(brokers, topics, parts, settings, rules_topic, rules_partitions)


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
    from connectors.kafka_io import check_reachable, ensure_topics, parse_kafka_options, produce_file

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
    from connectors.rules_source import read_rules
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
    from connectors.iceberg import open_catalog

    if catalog is None and not (lake_dir / "catalog.db").exists():
        msg = f"no lake in {lake_dir} (a run with --lake --out-dir DIR writes DIR/lake); pass --lake-dir or --catalog"
        raise ConvoflowError(msg)
    return open_catalog(catalog or "convoflow", None if catalog else lake_dir.resolve())


@lake_app.command("tables")
def lake_tables(lake_dir: LakeDir = Path("out/lake"), catalog: CatalogName = None) -> None:
    """Every table with its rows, snapshots, data files and size."""
    from connectors.lake_admin import list_tables

    for t in list_tables(_lake_catalog(lake_dir, catalog)):
        typer.echo(f"{t.name:<22} {t.rows:>10,} rows {t.snapshots:>5} snapshots {t.data_files:>5} files "
                   f"{t.total_bytes / 1e6:>9.2f} MB")


@lake_app.command("snapshots")
def lake_snapshots(table: TableName, lake_dir: LakeDir = Path("out/lake"), catalog: CatalogName = None) -> None:
    """A table's snapshots, oldest first, with their summaries (convoflow's commit markers included)."""
    from connectors.lake_admin import list_snapshots, load_table

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
    from connectors.lake_admin import load_table, parse_as_of, show

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

    from connectors.lake_admin import expire, load_table, parse_older_than

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
    from connectors.lake_admin import evolve, load_table

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
    from connectors.lake_admin import compact, load_table

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


def _window_config(size: float, out_of_orderness: float, max_messages: int, max_open_windows: int) -> WindowConfig:
    try:
        return WindowConfig(size=size, out_of_orderness=out_of_orderness, max_messages=max_messages,
                            max_open_windows=max_open_windows)
    except ValueError as exc:
        raise ConvoflowError(str(exc)) from None


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


if __name__ == "__main__":
    sys.exit(main())
