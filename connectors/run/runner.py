"""Run the pipeline with real connectors: in this process, or as a local Bytewax cluster.

A job (`ReplayRun` for a file, `KafkaRun` for a topic) holds everything a process needs to build
the same flow, so it can be handed to spawned processes. With several processes each one runs
`cluster_main` with the same addresses and its own process id; replay jobs share the replay
clock's anchors, so they replay in step.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from bytewax.dataflow import Dataflow
from bytewax.inputs import FixedPartitionedSource
from bytewax.testing import cluster_main, run_main

from connectors.files.jsonl import JsonlSink, jsonl_output
from connectors.view.progress import GAUGES_FILE, GaugeSink, TallySink, tallied
from connectors.run.recovery import Recovery
from connectors.run.stopping import RunAborted, Signals, StopFlag, StoppableSource, stop_on_signals
from connectors.files.replay import ReplaySource
from connectors.files.rules_file import RulesFileSource
from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from dataflows.parse import MAX_LINE_BYTES
from dataflows.flow import FlowConfig, FlowOutput, OutputKind, RulesSourceItem, Stage, as_given, build_flow

if TYPE_CHECKING:
    from connectors.kafka.outputs import OutputTopics

OUTPUT_FILES = tuple(JsonlSink.file_name(k) for k in OutputKind)
X = TypeVar("X")
S = TypeVar("S")


@dataclass(frozen=True)
class ReplayRun:
    """One replay job: input, outputs, the flow's config and the shared clock."""

    input_path: Path
    out_dir: Path
    flow: FlowConfig
    clock: ReplayClock
    state_dir: Path | None = None
    lake: LakeConfig | None = None
    rules_path: Path | None = None
    stages: tuple[Stage, ...] = ()
    batch_size: int = 32768
    """Lines per batch at most: a batch is one frame of events for the flow to route."""
    recovery: Recovery | None = None
    max_line_bytes: int = MAX_LINE_BYTES
    glimpses: bool = False
    """Keep glimpses of the latest records for a live view's panes (in `state_dir`)."""
    writer_threads: bool = True
    """Encode and write JSONL outputs on a thread per file; off: encoded where made, written by the worker
    (`jsonl_output`)."""

    def build(self) -> Dataflow:
        """The flow with its real connectors: JSONL files, and Iceberg tables when `lake` is set."""
        source = ReplaySource(self.input_path, layout=self.flow.layout, clock=self.clock, batch_size=self.batch_size,
                              max_line_bytes=self.max_line_bytes,
                              figures_dir=self.state_dir if self.glimpses else None)
        outputs = (_file_outputs(self.out_dir, self.lake, self.state_dir, self.writer_threads)
                   + _tally(self.state_dir, self.glimpses))
        rules = RulesFileSource(self.rules_path, self.clock) if self.rules_path else None
        flag = stop_flag(self)
        return build_flow(_stoppable(source, flag), outputs, _knowing(self.flow, rules, self.recovery),
                          gauges=_gauges(self.state_dir),
                          rules=None if rules is None else _stoppable(rules, flag), stages=self.stages)


@dataclass(frozen=True)
class KafkaRun:
    """One live job: a Kafka topic in, Kafka topics out (and JSONL files or Iceberg tables if asked).

    `parts` are the input topic's partitions as listed at start-up (see `LiveKafkaSource`);
    `tail=False` stops at the end each partition had when the run reached it.
    """

    brokers: str
    input_topic: str
    parts: tuple[str, ...]
    topics: OutputTopics
    flow: FlowConfig
    kafka_config: Mapping[str, str] = field(default_factory=dict)
    from_beginning: bool = True
    tail: bool = True
    out_dir: Path | None = None
    state_dir: Path | None = None
    lake: LakeConfig | None = None
    rules_path: Path | None = None
    rules_topic: str | None = None
    rules_partitions: int = 1
    rules_grace: float = 1.0
    stages: tuple[Stage, ...] = ()
    batch_size: int = 32768
    recovery: Recovery | None = None
    glimpses: bool = False
    """Keep glimpses of the latest records for a live view's panes (in `state_dir`)."""
    writer_threads: bool = True
    """Encode and write JSONL outputs on a thread per file; off: encoded where made, written by the worker
    (`jsonl_output`)."""

    def build(self) -> Dataflow:
        """The flow reading `input_topic` live and writing every output kind to its topic."""
        from connectors.kafka.outputs import kafka_output
        from connectors.kafka.source import LiveKafkaSource

        source = LiveKafkaSource(
            self.brokers.split(","), self.input_topic, self.parts, from_beginning=self.from_beginning,
            tail=self.tail, config=dict(self.kafka_config), batch_size=self.batch_size, figures_dir=self.state_dir,
        )
        # Without recovery no epoch is resumed from, so nothing asks each batch to be delivered first.
        outputs = [kafka_output(self.brokers, self.topics, self.kafka_config, in_background=self.recovery is None)]
        outputs += (_file_outputs(self.out_dir, self.lake, self.state_dir, self.writer_threads)
                    + _tally(self.state_dir, self.glimpses))
        flag, rules = stop_flag(self), self._rules()
        return build_flow(_stoppable(source, flag), outputs, _knowing(self.flow, rules, self.recovery),
                          gauges=_gauges(self.state_dir),
                          rules=None if rules is None else _stoppable(rules, flag), stages=self.stages)

    def _rules(self) -> FixedPartitionedSource[RulesSourceItem, Any] | None:
        if self.rules_path is not None:
            # A rules file in a live run is sent at once: its rules take effect by their effective_from.
            return RulesFileSource(self.rules_path, ReplayClock(0.0, 0.0, 0.0))
        if self.rules_topic is not None:
            from connectors.kafka.rules_topic import KafkaRulesSource

            return KafkaRulesSource(self.brokers, self.rules_topic, self.rules_partitions,
                                    config=self.kafka_config, grace=self.rules_grace, tail=self.tail)
        return None


FlowJob = ReplayRun | KafkaRun


def _knowing(flow: FlowConfig, rules: FixedPartitionedSource[RulesSourceItem, Any] | None,
             recovery: Recovery | None) -> FlowConfig:
    """`flow`, told which pattern keys a rules file defines (a topic may define any), and whether its
    snapshots are kept (only with recovery)."""
    if isinstance(rules, RulesFileSource):
        flow = replace(flow, rule_pattern_keys=rules.pattern_keys())
    return replace(flow, snapshots=recovery is not None)


def stop_flag(run: FlowJob) -> StopFlag | None:
    """How a signal stops `run`: by draining (a flag in its state folder), or, with recovery or
    without a state folder, by aborting (None; see `connectors.run.stopping`)."""
    return StopFlag(run.state_dir / "stop") if run.state_dir is not None and run.recovery is None else None


def _stoppable(source: FixedPartitionedSource[X, S], flag: StopFlag | None) -> FixedPartitionedSource[X, S]:
    return source if flag is None else StoppableSource(source, flag)


@dataclass(frozen=True)
class LakeConfig:
    """Where the Iceberg outputs go and how they are committed.

    `lake_dir` is the embedded SQLite catalog's folder; without it, `catalog` names a catalog in
    PyIceberg's own configuration (`.pyiceberg.yaml`, `PYICEBERG_CATALOG__<NAME>__*`).
    """

    lake_dir: Path | None = None
    catalog: str = "convoflow"
    commit_rows: int = 50_000
    commit_interval: float = 30.0
    keep_snapshots: int = 50
    job_start: Mapping[str, int] | None = None
    """With recovery: each table's next commit seq when the job first started (`IcebergSink`)."""

    def describe(self) -> str:
        return f"Iceberg tables in {self.lake_dir}" if self.lake_dir else f"Iceberg catalog {self.catalog}"


def _file_outputs(out_dir: Path | None, lake: LakeConfig | None, state_dir: Path | None,
                  writer_threads: bool) -> list[FlowOutput]:
    kinds = [k.value for k in OutputKind]
    outputs = [] if out_dir is None else [jsonl_output(out_dir, kinds, writer_threads=writer_threads)]
    if lake is not None:
        # Imported here: pyiceberg and pyarrow add ~0.8 s to every worker process's start.
        from connectors.lake.sink import IcebergSink, SnapshotExpiry
        from connectors.lake.tables import open_catalog

        sink = IcebergSink(open_catalog(lake.catalog, lake.lake_dir), kinds=kinds, commit_rows=lake.commit_rows,
                           commit_interval=lake.commit_interval, expiry=SnapshotExpiry(keep=lake.keep_snapshots),
                           job_start=lake.job_start, figures_dir=state_dir)
        outputs.append(FlowOutput("lake", sink, as_given))
    return outputs


def _gauges(state_dir: Path | None) -> GaugeSink | None:
    return GaugeSink(state_dir / GAUGES_FILE) if state_dir else None


def _tally(state_dir: Path | None, glimpses: bool) -> list[FlowOutput]:
    """The output that counts records for a live view and the metrics (and, for a live view's panes,
    keeps glimpses of the latest), when the job has a state folder."""
    if state_dir is None:
        return []
    return [FlowOutput("tally", TallySink(state_dir), functools.partial(tallied, glimpses=glimpses))]


def free_addresses(count: int) -> list[str]:
    """`count` loopback addresses with ports free right now, for a local cluster."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [f"127.0.0.1:{s.getsockname()[1]}" for s in sockets]
    finally:
        for s in sockets:
            s.close()


EPOCH_INTERVAL = timedelta(seconds=5)
"""How often Bytewax closes an epoch (and snapshots, with recovery) when the job has no `recovery`."""


CLUSTER_SWITCH_INTERVAL = 0.1
"""The GIL switch interval (s) of a cluster process with one worker thread.

`cluster_main` keeps the process's main thread waking every 1 ms to check for signals, and each
time it asks for the GIL. At Python's default 5 ms interval the worker is made to hand the GIL
over some 200 times a second, then waits for that thread to be scheduled: on 2 busy cores,
2 processes ran 5-12% slower in wall and CPU time (3 paired runs of 500k events). With 0.1 s, a
signal is still seen within a tenth of a second. Several worker threads in one process keep the
default: they share the GIL between them.
"""


GC_YOUNG_THRESHOLD: int | None = 10_000
"""Container allocations between two collections of the youngest generation while a flow runs
(Python's default is 700); None leaves the collector alone.

A flow holds its events for a while (reorder buffers, windows, partial matches), so at 700 many of
them are traversed and promoted before they are freed, and every full collection also walks the
objects that importing left behind. The runner therefore freezes those (`gc.freeze`) and collects
the young generation less often while the flow runs, then restores both. Measured: 1 process, 50k
lines, 2.0-2.3% fewer instructions (callgrind); 2 processes, 500k lines, time in collections
1.7 s -> 0.3 s of ~23 CPU s (the sequencers there hold far more events waiting for the other partition).
"""


@contextmanager
def _collector_tuned() -> Iterator[None]:
    """Run with start-up objects frozen and young collections every GC_YOUNG_THRESHOLD allocations."""
    if GC_YOUNG_THRESHOLD is None:
        yield
        return
    previous = gc.get_threshold()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *previous[1:])
    try:
        yield
    finally:
        gc.set_threshold(*previous)
        gc.unfreeze()


def _run_process(run: FlowJob, addresses: list[str], process_id: int, workers: int, child: bool = False) -> None:
    if child and stop_flag(run) is not None:
        # The parent turns the terminal's Ctrl-C into the stop flag that drains every process.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    flow = run.build()
    recovery = run.recovery
    epoch = EPOCH_INTERVAL if recovery is None else recovery.snapshot_interval
    config = None if recovery is None else recovery.bytewax()
    previous_switch = sys.getswitchinterval()
    try:
        with _collector_tuned():
            if not addresses and workers == 1:
                # cluster_main's waiting thread contends for the GIL: measured 25% slower for one worker.
                run_main(flow, epoch_interval=epoch, recovery_config=config)
            else:
                if workers == 1:
                    sys.setswitchinterval(CLUSTER_SWITCH_INTERVAL)
                cluster_main(flow, addresses, process_id, worker_count_per_proc=workers, epoch_interval=epoch,
                             recovery_config=config)
    finally:
        sys.setswitchinterval(previous_switch)
        for stage in run.stages:
            stage.close()


class _Poller:
    """Calls `poll` every `interval` seconds on a side thread while the flow has the main one."""

    def __init__(self, poll: Callable[[], None] | None, interval: float) -> None:
        self.poll = poll
        self.interval = interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True, name="convoflow-poll")

    def _loop(self) -> None:
        while not self.stop.wait(self.interval):
            if self.poll is not None:
                self.poll()

    def __enter__(self) -> _Poller:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join()


@dataclass(frozen=True)
class Cluster:
    """A cluster across machines: every process's address, and which one this process is."""

    addresses: tuple[str, ...]
    process_id: int


def run_job(
    run: FlowJob,
    processes: int = 1,
    workers: int = 1,
    *,
    poll: Callable[[], None] | None = None,
    interval: float = 0.25,
    cluster: Cluster | None = None,
) -> Signals:
    """Run `run` to its end, calling `poll` every `interval` s; return the stop signals received.

    One process runs the flow on this thread; more form a local cluster of spawned processes;
    with `cluster`, this process is one of a cluster whose other processes are started elsewhere.
    SIGINT and SIGTERM drain the flow, or abort it (see `connectors.run.stopping`).

    Raises:
        ConvoflowError: the flow failed.
        RunAborted: a signal aborted the run.
    """
    with stop_on_signals(stop_flag(run)) as signals:
        try:
            if cluster is not None or processes == 1:
                _run_here(run, workers, poll, interval, cluster)
            else:
                _run_local_cluster(run, processes, workers, poll, interval)
        except KeyboardInterrupt:
            raise RunAborted(signals.received[0] if signals.received else "SIGINT") from None
        except ConvoflowError:
            # The interrupt raised in a step's code reaches here as that step's failure.
            if signals.received:
                raise RunAborted(signals.received[0]) from None
            raise
    return signals


def _run_here(run: FlowJob, workers: int, poll: Callable[[], None] | None, interval: float,
              cluster: Cluster | None) -> None:
    """Run on this thread the whole flow, or this process's part of `cluster`."""
    addresses, process_id = ([], 0) if cluster is None else (list(cluster.addresses), cluster.process_id)
    where = "" if cluster is None else f" in process {process_id} of {len(addresses)}"
    with _Poller(poll, interval):
        try:
            _run_process(run, addresses, process_id, workers)
        except Exception as exc:
            msg = f"the dataflow failed{where}: {exc}"
            raise ConvoflowError(msg) from exc


def _run_local_cluster(run: FlowJob, processes: int, workers: int, poll: Callable[[], None] | None,
                       interval: float) -> None:
    """Spawn `processes` local processes forming one cluster and watch them until they end."""
    ctx = multiprocessing.get_context("spawn")
    addresses = free_addresses(processes)
    procs = [
        ctx.Process(target=_run_process, args=(run, addresses, pid, workers, True), name=f"convoflow-{pid}")
        for pid in range(processes)
    ]
    for proc in procs:
        proc.start()
    try:
        while any(p.is_alive() for p in procs) and all(p.exitcode in (None, 0) for p in procs):
            procs[0].join(interval)
            if poll is not None:
                poll()
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
            proc.join()
    failed = [p for p in procs if p.exitcode != 0]
    if failed:
        codes = ", ".join(f"{p.name} exited with {p.exitcode}" for p in failed)
        msg = f"the dataflow failed ({codes}); see the messages above"
        raise ConvoflowError(msg)
