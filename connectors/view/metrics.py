"""Prometheus metrics of a running job (`run --metrics-port N`), through `prometheus-client`.

Each process of the job serves its own endpoint, port N + its process id, with a `process` label.
Figures are read when Prometheus scrapes, from the files the run already keeps for its live view
(`connectors.view.progress`): each process's workers' tallies; the flow's gauges and the figures its
parts keep (lake commits and rows, Kafka consumer lag, LLM cache hits), served by the first process
whose folder holds them. Nothing is polled between scrapes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from connectors.view.progress import (
    GAUGES_FILE, LLM_LATENCY_BUCKETS_MS, events_read, read_figures, read_gauges, read_tallies,
)
from dataflows.flow import OutputKind



@dataclass(eq=False)  # the registry keys collectors by identity
class RunCollector(Collector):
    """The figures of one process of a run, read from `state_dir` at each scrape.

    `workers` are the process's worker indices (their tally files); `event_now`, when given, is the
    event time the input is at now (wall time for a live input, the replay clock's time for a
    paced replay), against which the watermark's lag is measured.
    """

    state_dir: Path
    process: int
    workers: range
    event_now: Callable[[], float | None] | None = None
    gauges: bool = True
    """Whether to serve the figures of the whole flow (when this process's folder holds them): its
    gauges, and those its parts keep (lake commits, Kafka lag, the LLM cache)."""
    started: float = field(default_factory=time.time)

    def collect(self) -> Iterator[Metric]:
        counts = read_tallies(self.state_dir, self.workers)
        label = [str(self.process)]

        def counter(name: str, text: str, value: float) -> CounterMetricFamily:
            family = CounterMetricFamily(name, text, labels=["process"])
            family.add_metric(label, value)
            return family

        yield counter("convoflow_events_read", "Input lines read (each becomes a message, a moderated message or a dead letter).",
                      events_read(counts))
        written = CounterMetricFamily("convoflow_records_written", "Records written, by output.", labels=["process", "output"])
        for output in OutputKind:
            written.add_metric([*label, output.value], counts.get(output, 0))
        yield written
        dead = CounterMetricFamily("convoflow_dead_letters", "Rejected input, by step and kind of reason.",
                                   labels=["process", "step", "reason"])
        for key, value in _prefixed(counts, "dead_letter:"):
            step, _, reason = key.partition(":")
            dead.add_metric([*label, step, reason], value)
        yield dead
        yield counter("convoflow_late_events", "Events whose window had already been emitted.", counts.get("late", 0))
        yield counter("convoflow_windows_emitted", "Windows closed and written.", counts.get("windows", 0))
        alerts = CounterMetricFamily("convoflow_alerts", "Pattern alerts, by pattern.", labels=["process", "pattern"])
        for pattern, value in _prefixed(counts, "alerts:"):
            alerts.add_metric([*label, pattern], value)
        yield alerts
        judged = CounterMetricFamily("convoflow_messages_judged", "Messages the rules masked, flagged or blocked.",
                                     labels=["process", "action"])
        for action, key in (("mask", "mask"), ("flag", "flag"), ("block", "moderated")):
            judged.add_metric([*label, action], counts.get(key, 0))
        yield judged
        yield from self._llm(counts, label)
        if self.gauges:
            if (self.state_dir / GAUGES_FILE).exists():
                yield from self._gauges(label)
            yield from self._parts(label)
        yield counter("convoflow_run_started", "When this process started the run (Unix time).", self.started)

    def _llm(self, counts: dict[str, int], label: list[str]) -> Iterator[Metric]:
        calls = CounterMetricFamily("convoflow_llm_answers", "Answers of the LLM stage, by stage and status "
                                    "(ok, error, invalid_response, skipped).", labels=["process", "stage", "status"])
        for key, value in _prefixed(counts, "llm:"):
            stage, _, status = key.partition(":")
            calls.add_metric([*label, stage, status], value)
        yield calls
        for stage in ("assistant", "translation"):
            total = counts.get(f"llm_ms:{stage}:count", 0)
            if not total:
                continue
            buckets = [(str(bound / 1000), float(counts.get(f"llm_ms:{stage}:{bound}", 0)))
                       for bound in LLM_LATENCY_BUCKETS_MS]
            histogram = HistogramMetricFamily(f"convoflow_llm_{stage}_latency_seconds",
                                              f"Latency of the LLM stage's {stage} calls.", labels=["process"])
            histogram.add_metric(label, [*buckets, ("+Inf", float(total))],
                                 sum_value=counts.get(f"llm_ms:{stage}:sum", 0) / 1000)
            yield histogram

    def _gauges(self, label: list[str]) -> Iterator[Metric]:
        gauges: dict[str, Any] = read_gauges(self.state_dir / GAUGES_FILE)

        def gauge(name: str, text: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(name, text, labels=["process"])
            family.add_metric(label, value)
            return family

        yield gauge("convoflow_open_windows", "Windows open now, over the whole flow.", gauges["open_windows"])
        yield gauge("convoflow_rules_version", "The rule-set version in effect (0: no rules stream).", gauges["rules_version"])
        watermark = gauges.get("watermark")
        if watermark is not None and watermark > float("-inf"):
            yield gauge("convoflow_watermark_seconds", "The flow's event-time watermark (Unix time; its slowest shard's).",
                        watermark)
            now = self.event_now() if self.event_now is not None else None
            if now is not None:
                yield gauge("convoflow_watermark_lag_seconds", "How far the watermark is behind the input's "
                            "event time now.", max(0.0, now - watermark))


    def _parts(self, label: list[str]) -> Iterator[Metric]:
        """The figures parts of the flow keep for themselves: lake commits, Kafka lag, LLM cache."""
        commits = CounterMetricFamily("convoflow_lake_commits", "Iceberg commits this run made, by table.",
                                      labels=["process", "table"])
        rows = CounterMetricFamily("convoflow_lake_rows", "Rows those commits appended, by table.",
                                   labels=["process", "table"])
        by_table: dict[str, tuple[int, int]] = {}
        for part in read_figures(self.state_dir, "lake"):
            made, appended = by_table.get(part["table"], (0, 0))
            by_table[part["table"]] = (made + part["commits"], appended + part["rows"])
        for table, (made, appended) in sorted(by_table.items()):
            commits.add_metric([*label, table], made)
            rows.add_metric([*label, table], appended)
        yield commits
        yield rows
        lag = GaugeMetricFamily("convoflow_kafka_consumer_lag", "Messages of an input partition not read yet "
                                "(its high watermark as last fetched, less the next offset).",
                                labels=["process", "topic", "partition"])
        for part in read_figures(self.state_dir, "kafka"):
            lag.add_metric([*label, part["topic"], str(part["partition"])], part["lag"])
        yield lag
        caches = read_figures(self.state_dir, "llm")
        lookups = CounterMetricFamily("convoflow_llm_cache_lookups", "Lookups of the translation cache.", labels=["process"])
        lookups.add_metric(label, sum(c["cache_lookups"] for c in caches))
        hits = CounterMetricFamily("convoflow_llm_cache_hits", "Lookups of the translation cache that found an answer.",
                                   labels=["process"])
        hits.add_metric(label, sum(c["cache_hits"] for c in caches))
        yield lookups
        yield hits


def _prefixed(counts: dict[str, int], prefix: str) -> Iterator[tuple[str, int]]:
    for key, value in sorted(counts.items()):
        if key.startswith(prefix):
            yield key.removeprefix(prefix), value


def collectors_for(state_dir: Path, processes: Sequence[int], workers: int,
                   event_now: Callable[[], float | None] | None) -> list[RunCollector]:
    """A collector per process this program runs (all of a local cluster, or its one process of a
    cluster across machines), each over its `workers` worker threads; the first serves the gauges."""
    return [RunCollector(state_dir, p, range(p * workers, (p + 1) * workers), event_now, gauges=i == 0)
            for i, p in enumerate(processes)]


@contextmanager
def serving_metrics(collectors: Sequence[RunCollector], host: str, port: int) -> Iterator[list[int]]:
    """Serve each collector on its own port (`port` + its process id; any free one for port 0) while the
    block runs; yield the ports."""
    servers = []
    try:
        for collector in collectors:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(collector)
            server, _thread = start_http_server(port + collector.process, addr=host, registry=registry)
            servers.append(server)
        yield [server.server_port for server in servers]
    finally:
        for server in servers:
            server.shutdown()
            server.server_close()
