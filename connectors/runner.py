"""Run the replay pipeline on real files: in this process, or as a local Bytewax cluster.

`ReplayRun` holds everything a process needs to build the same flow, so it can be handed to
spawned processes. With several processes each one runs `cluster_main` with the same
addresses and its own process id; all share the replay clock's anchors, so they replay in step.
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

from bytewax.dataflow import Dataflow
from bytewax.testing import cluster_main

from connectors.jsonl import JsonlSink
from connectors.progress import GaugeSink
from connectors.replay import ReplaySource
from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from dataflows.flow import FlowConfig, OutputKind, build_flow

OUTPUT_FILES = tuple(JsonlSink.file_name(k) for k in OutputKind)


@dataclass(frozen=True)
class ReplayRun:
    """One replay job: input, outputs, the flow's config and the shared clock."""

    input_path: Path
    out_dir: Path
    flow: FlowConfig
    clock: ReplayClock
    state_dir: Path | None = None
    batch_size: int = 1000
    epoch_interval: timedelta = timedelta(seconds=1)

    def build(self) -> Dataflow:
        source = ReplaySource(self.input_path, layout=self.flow.layout, clock=self.clock, batch_size=self.batch_size)
        sink = JsonlSink(self.out_dir, [k.value for k in OutputKind])
        gauges = GaugeSink(self.state_dir / "gauges.json") if self.state_dir else None
        return build_flow(source, sink, self.flow, gauges=gauges)


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


def _run_process(run: ReplayRun, addresses: list[str], process_id: int, workers: int) -> None:
    cluster_main(
        run.build(), addresses, process_id, worker_count_per_proc=workers, epoch_interval=run.epoch_interval
    )


class RunHandle:
    """A started run: poll `running`, then `wait()` to get its outcome."""

    def __init__(self, run: ReplayRun, processes: int, workers: int) -> None:
        self.error: BaseException | None = None
        self.procs: list[multiprocessing.process.BaseProcess] = []
        self.thread: threading.Thread | None = None
        if processes == 1:
            self.thread = threading.Thread(target=self._in_thread, args=(run, workers), daemon=True)
            self.thread.start()
            return
        ctx = multiprocessing.get_context("spawn")
        addresses = free_addresses(processes)
        for pid in range(processes):
            proc = ctx.Process(target=_run_process, args=(run, addresses, pid, workers), name=f"convoflow-{pid}")
            proc.start()
            self.procs.append(proc)

    def _in_thread(self, run: ReplayRun, workers: int) -> None:
        try:
            _run_process(run, [], 0, workers)
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self.error = exc

    @property
    def running(self) -> bool:
        if self.thread is not None:
            return self.thread.is_alive()
        if any(p.exitcode not in (None, 0) for p in self.procs):
            return False
        return any(p.is_alive() for p in self.procs)

    def wait(self, poll: Callable[[], None] | None = None, interval: float = 0.25) -> None:
        """Block until the run ends, calling `poll` every `interval` s; raise if it failed."""
        while self.running:
            if poll is not None:
                poll()
            if self.thread is not None:
                self.thread.join(interval)
            else:
                self.procs[0].join(interval)
        failed = [p for p in self.procs if p.exitcode not in (None, 0)]
        for p in self.procs:
            if p.is_alive():
                p.terminate()
            p.join()
        if self.error is not None:
            msg = f"the dataflow failed: {self.error}"
            raise ConvoflowError(msg) from self.error
        if failed:
            codes = ", ".join(f"process {p.name} exit code {p.exitcode}" for p in failed)
            msg = f"the dataflow failed ({codes}); see the messages above"
            raise ConvoflowError(msg)
