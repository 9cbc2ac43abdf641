"""From `RunSettings` to a job ready to run: checks the settings together, opens recovery, prepares
the output folder and the lake, checks the Kafka brokers and topics, and builds the `FlowJob`."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

from connectors.files.jsonl import prepare_out_dir
from connectors.kafka.outputs import OutputTopics
from connectors.llm.config import LlmConfig
from connectors.llm.stage import LlmStage
from connectors.files.patterns_file import load_patterns
from connectors.run.recovery import Recovery, RecoveryState
from connectors.files.replay import check_readable, first_event_time
from connectors.run.runner import OUTPUT_FILES, Cluster, FlowJob, KafkaRun, LakeConfig, ReplayRun
from connectors.run.settings import RunSettings
from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from dataflows.flow import FlowConfig, Stage
from dataflows.sequencing import ReplayLayout
from dataflows.windows import WindowConfig

DEFAULT_LAKE = "lake"
DEFAULT_PARTITIONS = 3
PROFILES_START = "profiles_start"
"""The recovery fact naming the lake snapshot a job's user history was first read from."""
LAKE_START = "lake_start_seqs"
"""The recovery fact holding each lake table's next commit seq when the job first started."""


@dataclass(frozen=True)
class RunPlan:
    """A job and how to run it."""

    job: FlowJob
    processes: int
    workers: int
    cluster: Cluster | None
    destination: str
    """Where the outputs go, for the summary."""
    recovery: Recovery | None
    resuming: bool
    lake: LakeConfig | None


@dataclass(frozen=True)
class AlreadyFinished:
    """The recovery folder says this job ran to its end: there is nothing to do."""

    recovery_dir: Path
    finished_at: str | None


def plan_run(s: RunSettings, state_dir: Path, *, glimpses: bool = False) -> RunPlan | AlreadyFinished:
    """The job `s` describes, its outputs prepared; `state_dir` holds its progress files (and, with
    `glimpses`, what a live view's panes show)."""
    if (s.input is None) == (s.kafka_brokers is None):
        msg = "give either --input FILE to replay a file or --kafka-brokers HOST:PORT to read a topic"
        raise ConvoflowError(msg)
    for name, path in (("--rules", s.rules), ("--kafka-config-file", s.kafka_config_file)):
        if path is not None and not path.is_file():
            raise ConvoflowError(f"{name} {path}: no such file")
    cluster = cluster_of(s.addresses, s.process_id, s.processes)
    processes = len(cluster.addresses) if cluster is not None else s.processes
    recovery = None
    if s.recovery_dir is not None:
        recovery = Recovery(s.recovery_dir.resolve(), timedelta(seconds=s.snapshot_interval),
                            timedelta(seconds=s.backup_interval))
    window = window_config(s)
    pattern_defs = () if s.no_patterns else load_patterns(s.patterns)
    llm_config = LlmConfig.from_env(
        {}, api_key=s.llm_api_key.get_secret_value() if s.llm_api_key else None, base_url=s.llm_base_url,
        mode=s.llm.value, model=s.llm_model, concurrency=s.llm_concurrency, timeout=s.llm_timeout,
        max_retries=s.llm_max_retries, rate_limit=s.llm_rate_limit,
    )
    stages: tuple[Stage, ...] = (LlmStage(llm_config, figures_dir=state_dir),)
    out_dir = s.out_dir
    if s.input is not None:
        check_readable(s.input)
        out_dir = out_dir or Path("out")
    live = None
    if s.kafka_brokers is not None:
        topics = OutputTopics(s.output_topic, s.windows_topic, s.alerts_topic, s.late_topic, s.dead_letter_topic,
                              s.moderated_topic)
        live = _kafka_input(s.kafka_brokers, s.input_topic, topics, None if s.rules else s.rules_topic,
                            s.create_topics, _kafka_settings(s.kafka_config, s.kafka_config_file))
    lake = s.lake or s.catalog is not None or s.lake_dir is not None
    embedded = lake and s.catalog is None
    resuming = False
    if recovery is not None:
        recovered = recovery.open(job_identity(s, out_dir, lake, window, processes), partitions=processes * s.workers)
        if recovered is RecoveryState.FINISHED:
            assert s.recovery_dir is not None
            return AlreadyFinished(s.recovery_dir, recovery.finished_at())
        resuming = recovered is RecoveryState.RESUME
    if out_dir is not None and resuming:
        if not out_dir.is_dir():
            msg = f"--out-dir {out_dir} of the run being resumed is gone; delete --recovery-dir {s.recovery_dir} to start over"
            raise ConvoflowError(msg)
    elif out_dir is not None and cluster is not None and cluster.process_id > 0:
        out_dir.mkdir(parents=True, exist_ok=True)  # process 0 prepares a shared out-dir; this one only writes
    elif out_dir is not None:
        prepare_out_dir(out_dir, OUTPUT_FILES, overwrite=s.overwrite,
                        dirs=(DEFAULT_LAKE,) if embedded and s.lake_dir is None else ())
    if embedded and out_dir is None and s.lake_dir is None:
        msg = "--lake needs --out-dir, --lake-dir or --catalog to know where the tables go"
        raise ConvoflowError(msg)
    lake_config = None
    if lake:
        where = (s.lake_dir or _given(out_dir) / DEFAULT_LAKE).resolve() if embedded else None
        lake_config = _prepare_lake(LakeConfig(where, s.catalog or "convoflow", s.lake_commit_rows,
                                               s.lake_commit_interval, s.lake_keep_snapshots), recovery, resuming)
        if s.profiles:
            stages = (_profiles_stage(lake_config, s.profiles_refresh, s.profiles_as_of, recovery, resuming), *stages)
    rules_path = s.rules.resolve() if s.rules else None
    job: FlowJob
    if live is None:
        input_path, replay_out = _given(s.input), _given(out_dir)
        start = time.time()
        first = first_event_time(input_path, max_line_bytes=s.max_line_bytes)
        origin = start if first is None else first
        layout = ReplayLayout(partitions=processes * s.workers, block_bytes=s.block_kib * 1024)
        job = ReplayRun(
            input_path=input_path.resolve(), out_dir=replay_out.resolve(),
            flow=FlowConfig(window=window, layout=layout, time_origin=origin, patterns=pattern_defs,
                            rules=s.rules is not None),
            clock=ReplayClock(event_origin=origin, wall_origin=start, speed=s.speed_factor),
            state_dir=state_dir, lake=lake_config, rules_path=rules_path, stages=stages, recovery=recovery,
            max_line_bytes=s.max_line_bytes, glimpses=glimpses, writer_threads=s.writer_threads,
        )
        destination = str(replay_out)
    else:
        flow = FlowConfig(window=window, layout=ReplayLayout(partitions=len(live.parts)), patterns=pattern_defs,
                          live=True, rules=True)
        job = KafkaRun(
            brokers=live.brokers, input_topic=s.input_topic, parts=live.parts, topics=live.topics, flow=flow,
            kafka_config=live.settings, from_beginning=s.from_beginning, tail=not s.stop_at_end,
            out_dir=out_dir.resolve() if out_dir else None, state_dir=state_dir, lake=lake_config,
            rules_path=rules_path, rules_topic=live.rules_topic, rules_partitions=live.rules_partitions,
            rules_grace=s.rules_grace, stages=stages, recovery=recovery, glimpses=glimpses,
            writer_threads=s.writer_threads,
        )
        destination = f"Kafka topics {', '.join(live.topics.all())}" + (f" and {out_dir}" if out_dir else "")
    return RunPlan(job, processes, s.workers, cluster, destination, recovery, resuming, lake_config)


def metrics_for(s: RunSettings, plan: RunPlan, state_dir: Path) -> AbstractContextManager[object]:
    """Prometheus endpoints for the processes this program runs, with `--metrics-port` (else nothing)."""
    if s.metrics_port is None:
        return nullcontext()
    from connectors.view.metrics import collectors_for, serving_metrics

    job = plan.job
    event_now: Callable[[], float | None] | None = time.time
    if isinstance(job, ReplayRun):
        clock = job.clock
        event_now = (lambda: clock.event_time_at(time.time())) if clock.paced else None
    processes = [plan.cluster.process_id] if plan.cluster is not None else list(range(plan.processes))
    return serving_metrics(collectors_for(state_dir, processes, plan.workers, event_now), s.metrics_host,
                           s.metrics_port)


def _given(path: Path | None) -> Path:
    assert path is not None, "checked above"
    return path


def cluster_of(addresses: str | None, process_id: int | None, processes: int) -> Cluster | None:
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


def window_config(s: RunSettings) -> WindowConfig:
    try:
        return WindowConfig(size=s.window_size, out_of_orderness=s.max_out_of_orderness,
                            max_messages=s.max_window_messages, max_open_windows=s.max_open_windows)
    except ValueError as exc:
        raise ConvoflowError(str(exc)) from None


def job_identity(s: RunSettings, out_dir: Path | None, lake: bool, window: WindowConfig,
                 processes: int) -> dict[str, Any]:
    """What a resumed run must share with the one that crashed: its input, outputs, partitions and flow."""
    def path(p: Path | None) -> str | None:
        return None if p is None else str(p.resolve())

    return {
        "input": path(s.input) if s.input else f"kafka://{s.kafka_brokers}/{s.input_topic}",
        "out_dir": path(out_dir), "lake": lake, "lake_dir": path(s.lake_dir), "catalog": s.catalog,
        "rules": path(s.rules), "window_size": window.size, "max_out_of_orderness": window.out_of_orderness,
        "window_align_to": window.align_to, "max_window_messages": window.max_messages,
        "max_open_windows": window.max_open_windows, "patterns": None if s.no_patterns else path(s.patterns),
        "processes": processes, "workers": s.workers, "block_kib": s.block_kib, "max_line_bytes": s.max_line_bytes,
    }


def _prepare_lake(lake: LakeConfig, recovery: Recovery | None, resuming: bool) -> LakeConfig:
    """Create the lake's tables; with recovery, give the sink where the job's commits began (`job_start`)."""
    from connectors.lake.commits import next_seqs
    from connectors.lake.tables import ensure_tables, open_catalog  # heavy: only when asked for

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
    from connectors.lake.admin import parse_as_of
    from connectors.lake.profiles import HistoryStart, ProfilesStage

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


def _kafka_settings(pairs: list[str], file: Path | None) -> dict[str, str]:
    from connectors.kafka.clients import parse_kafka_options, read_kafka_config_file

    return {**(read_kafka_config_file(file) if file else {}), **parse_kafka_options(pairs)}


def _kafka_input(brokers: str, input_topic: str, topics: OutputTopics, rules_topic: str | None, create: bool,
                 settings: dict[str, str]) -> _LiveInput:
    """Check the brokers answer and every topic exists (or create the missing ones if asked).

    Topics are created with the input topic's partition count, the rules topic with one.
    """
    from connectors.kafka.clients import check_reachable, ensure_topics, kafka_config, partition_counts

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
