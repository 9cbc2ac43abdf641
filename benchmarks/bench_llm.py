"""LLM stage throughput against the local fake OpenAI server answering every call after 200 ms.

    python benchmarks/bench_llm.py [--items 2000] [--rounds 20] [--latency 0.2] [--no-pipeline]
                                   [--processes 1 2] [--server-in-process]

The fake server runs in its own process by default, since a real endpoint is remote: on a thread of
this process (`--server-in-process`, as in the tests) it would share the GIL with the client and
its own CPU per call would count against the client's. It counts the calls it answers either way.
The client is the real langchain-openai one (no network, no key):
- assistant: `LlmStage` called on one batch of windows, at concurrency 1, 16 and 64;
- translation: the same with chat messages that all need translating (two users of different
  languages per room, every text distinct), then the same messages again: served from the cache;
- pipeline: `--items` such messages replayed through the whole flow (`ReplayRun` with JSONL outputs,
  speed factor 0), every closed window assisted as well, 64 calls in flight in all: one process
  with the stage at concurrency 64, and two processes (the stage runs per worker) at 32 each.
  Two rates each: end to end (`run_job`: process start-up, LangChain's import and a warm-up call
  in each process included), and steady: over the span from the first batch entering the stage
  (after that warm-up) to the last leaving it, in any process, the rest of the pipeline running
  within it.

A case sends min(`--items`, concurrency × `--rounds`) items, so concurrency 1 takes `--rounds`
round trips instead of 400 s. Ideal throughput is concurrency / latency; the issue's target is
>= 0.7 × ideal at concurrency 64 (224 calls/s at 200 ms), pipeline included. The last line
judges the steady rate of the first `--processes` case: by default one process, the CLI's default.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.llm.config import LlmConfig  # noqa: E402
from connectors.llm.stage import Batches, LlmStage  # noqa: E402
from dataflows.events import Event, WindowRecord, iso  # noqa: E402
from dataflows.flow import OutputKind  # noqa: E402
from dataflows.records import Record  # noqa: E402
from tests.connectors.llm.fake_openai import FakeOpenAI  # noqa: E402

CONCURRENCIES = (1, 16, 64)
PIPELINE_CONCURRENCY = 64
TARGET_RATIO = 0.7
T0 = 1_704_103_200.0


class Server(Protocol):
    @property
    def base_url(self) -> str: ...

    @property
    def requests(self) -> int: ...

    def reset_counts(self) -> None: ...

    def stop(self) -> None: ...


FAKE_SERVER = ROOT / "tests" / "connectors" / "llm" / "fake_openai.py"
"""The fake OpenAI-compatible server, run as a script in its own process."""


class ServerProcess:
    """The fake server in a child process; its call count is read from its `GET /stats`."""

    def __init__(self, latency: float) -> None:
        self.process = subprocess.Popen([sys.executable, str(FAKE_SERVER), str(latency)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().strip()
        self._baseline = 0

    def _stats(self) -> dict[str, int]:
        with urllib.request.urlopen(self.base_url.removesuffix("/v1") + "/stats", timeout=5) as answer:
            stats: dict[str, int] = json.load(answer)
        return stats

    @property
    def requests(self) -> int:
        return self._stats()["requests"] - self._baseline

    def reset_counts(self) -> None:
        self._baseline = self._stats()["requests"]

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


class TimedStage:
    """`stage`, warmed up in each process on its first batch, noting when batches first entered and last left it.

    The warm-up (one window: LangChain's import, the client, a first call) is what a long run has
    behind it; each process appends its span to `log` on close.
    """

    def __init__(self, stage: LlmStage, log: Path) -> None:
        self.stage = stage
        self.log = log
        self.name = stage.name
        self._warm = False
        self._span: tuple[float, float] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"stage": self.stage, "log": self.log}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.stage, self.log, self.name = state["stage"], state["log"], state["stage"].name
        self._warm, self._span = False, None

    def __call__(self, batches: Batches) -> Batches:
        if not self._warm:
            self.stage([(OutputKind.WINDOWS, windows(1, "warm"))])
            self._warm = True
        entered = time.time()
        out = self.stage(batches)
        self._span = (entered if self._span is None else self._span[0], time.time())
        return out

    def close(self) -> None:
        self.stage.close()
        if self._span is not None:
            with self.log.open("a") as f:
                f.write(json.dumps(self._span) + "\n")
            self._span = None


@dataclass(frozen=True)
class PipelineResult:
    """One pipeline case: calls answered ok, seconds end to end (`run_job`) and steady (`TimedStage` spans)."""

    processes: int
    translated: int
    assisted: int
    calls: int
    seconds: float
    busy: float

    def line(self, concurrency: int) -> str:
        return (f"pipeline, {self.processes} process{'es' if self.processes > 1 else ''} x {concurrency} in flight: "
                f"{self.translated} translations + {self.assisted} windows = {self.calls} calls; end to end "
                f"{self.seconds:.2f} s = {self.calls / self.seconds:.1f} calls/s; steady {self.busy:.2f} s = "
                f"{self.calls / self.busy:.1f} calls/s")


def stage_for(server: Server, concurrency: int) -> LlmStage:
    config = LlmConfig.from_env({}, mode="on", base_url=server.base_url, api_key="bench", concurrency=concurrency,
                                timeout=10.0, max_retries=0)
    return LlmStage(config)


def windows(count: int, tag: str) -> list[Record]:
    out = []
    for i in range(count):
        events = tuple(Event(f"w:{i}:{j}", f"s-{i}", sender, "message", f"{tag} {i} {j}", T0 + j, "event",
                             "conversation", "bench", j, 0, None, None, iso(T0 + j))
                       for j, sender in enumerate(("customer", "rm", "customer")))
        out.append(WindowRecord(f"s-{i}", T0, T0 + 30, events, {"customer": 2, "rm": 1}).as_record())
    return out


def room_messages(count: int, tag: str) -> list[Record]:
    """`count` messages needing translation: a join per room first, so every message has a reader."""
    out = []
    for room in range((count + 9) // 10):
        for user, language in (("ana", "es"), ("ben", "en")):
            out.append(Event(f"j:{room}:{user}", f"r-{room}", user, "JOIN", "", T0, "event", "chat", "bench", 0, 0,
                             language, user, iso(T0)).as_record())
    for i in range(count):
        user, language = ("ana", "es") if i % 2 else ("ben", "en")
        out.append(Event(f"m:{i}", f"r-{i // 10}", user, "USER_MESSAGE", f"{tag} text {i}", T0 + i, "event", "chat",
                         "bench", i, 0, language, user, iso(T0 + i)).as_record())
    return out


def timed(server: Server, call: Callable[[], Any]) -> tuple[float, int]:
    server.reset_counts()
    started = time.perf_counter()
    call()
    return time.perf_counter() - started, server.requests


def verdict(rate: float, ideal: float) -> str:
    ratio = rate / ideal
    return f"{ratio:.2f} of ideal (target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'MISSED'})"


def row(case: str, concurrency: int, count: int, calls: int, seconds: float, ideal: str) -> str:
    return f"{case:<24}{concurrency:>6}{count:>7}{calls:>7}{seconds:>9.2f}{count / seconds:>9.1f}{ideal:>7}"


def direct_cases(server: Server, items: int, rounds: int, latency: float) -> None:
    print(f"{'case':<24}{'conc.':>6}{'items':>7}{'calls':>7}{'seconds':>9}{'items/s':>9}{'ideal':>7}")
    rates: dict[str, float] = {}
    for concurrency in CONCURRENCIES:
        count = min(items, concurrency * rounds)
        ideal = f"{concurrency / latency:.0f}"
        stage = stage_for(server, concurrency)
        stage([(OutputKind.WINDOWS, windows(1, "warm"))])  # a process's first call pays for lazy imports
        batch = windows(count, f"c{concurrency}")
        seconds, calls = timed(server, lambda: stage([(OutputKind.WINDOWS, batch)]))
        assert all(w["assistant"]["status"] == "ok" for w in batch)
        rates["windows"] = count / seconds
        print(row("assistant (windows)", concurrency, count, calls, seconds, ideal))
        messages = room_messages(count, f"c{concurrency}")
        seconds, calls = timed(server, lambda: stage([(OutputKind.MESSAGES, messages)]))
        assert sum(m["translation"]["status"] == "ok" for m in messages) == count
        rates["translations"] = count / seconds
        print(row("translation", concurrency, count, calls, seconds, ideal))
        again = room_messages(count, f"c{concurrency}")
        seconds, calls = timed(server, lambda: stage([(OutputKind.MESSAGES, again)]))
        assert sum(m["translation"]["status"] == "ok" for m in again) == count
        print(row("translation, repeated", concurrency, count, calls, seconds, "cache"))
        stage.close()
    for what, rate in rates.items():
        print(f"  {what} at concurrency {CONCURRENCIES[-1]}: {verdict(rate, CONCURRENCIES[-1] / latency)}")


def write_chat(path: Path, items: int) -> None:
    with path.open("wb") as f:
        for m in room_messages(items, "pipeline"):
            line = {"username": m["username"], "room": m["session_id"], "type": m["kind"], "text": m["text"] or None,
                    "preferredLanguage": m["language"], "timestamp": m["timestamp"]}
            f.write(orjson.dumps({k: v for k, v in line.items() if v is not None}) + b"\n")


def pipeline_case(server: Server, items: int, processes: int) -> PipelineResult:
    """`items` chat messages through the whole flow in `processes` processes, 64 calls in flight in all."""
    from connectors.run.runner import ReplayRun, run_job
    from dataflows.clock import ReplayClock
    from dataflows.flow import FlowConfig

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        out_dir = Path(tmp)
        write_chat(out_dir / "chat.jsonl", items)
        stage = TimedStage(stage_for(server, PIPELINE_CONCURRENCY // processes), out_dir / "spans.jsonl")
        run = ReplayRun(out_dir / "chat.jsonl", out_dir, FlowConfig(time_origin=T0), ReplayClock(T0, time.time(), 0.0),
                        stages=(stage,))
        seconds, answered = timed(server, lambda: run_job(run, processes=processes))
        stage.close()
        spans = [json.loads(line) for line in (out_dir / "spans.jsonl").read_text().splitlines()]
        out = [orjson.loads(line) for line in (out_dir / "messages.jsonl").read_bytes().splitlines()]
        wins = [orjson.loads(line) for line in (out_dir / "windows.jsonl").read_bytes().splitlines()]
    translated = sum(m["translation"]["status"] == "ok" for m in out)
    assisted = sum(w["assistant"]["status"] == "ok" for w in wins)
    assert answered == translated + assisted + len(spans), "every text differs: one call each, plus the warm-ups"
    busy = max(end for _, end in spans) - min(start for start, _ in spans)
    return PipelineResult(processes, translated, assisted, translated + assisted, seconds, busy)


def pipeline_cases(server: Server, items: int, latency: float, process_counts: list[int]) -> None:
    print()
    results = []
    for processes in process_counts:
        result = pipeline_case(server, items, processes)
        print(result.line(PIPELINE_CONCURRENCY // processes))
        results.append(result)
    judged = results[0]
    print(f"pipeline at concurrency {PIPELINE_CONCURRENCY}: {judged.processes} process(es), steady: {judged.calls} "
          f"calls in {judged.busy:.2f} s, {judged.calls / judged.busy:.1f} calls/s; "
          f"{verdict(judged.calls / judged.busy, PIPELINE_CONCURRENCY / latency)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=20, help="round trips per case at most (caps the items)")
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], choices=[1, 2, 4],
                        help="pipeline cases: Bytewax processes, sharing the 64 calls in flight")
    parser.add_argument("--server-in-process", action="store_true",
                        help="run the fake server on a thread of this process (it shares the client's GIL)")
    parser.add_argument("--server-process", action="store_true", help=argparse.SUPPRESS)  # the default now
    args = parser.parse_args()
    where = "a thread of this process" if args.server_in_process else "its own process"
    print(f"fake server: {where}, answering after {args.latency * 1000:.0f} ms")
    server: Server = FakeOpenAI(latency=args.latency).start() if args.server_in_process else ServerProcess(args.latency)
    try:
        direct_cases(server, args.items, args.rounds, args.latency)
        if not args.no_pipeline:
            pipeline_cases(server, args.items, args.latency, args.processes)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
