"""LLM stage throughput against the local fake OpenAI server answering every call after 200 ms.

    python benchmarks/bench_llm.py [--items 2000] [--rounds 20] [--latency 0.2] [--no-pipeline] [--server-process]

The server runs in this process (sharing its GIL with the client, as in the tests) or, with
`--server-process`, in its own (then the call counts are not shown). The client is the real
langchain-openai one (no network, no key):
- assistant: `LlmStage` called on one batch of windows, at concurrency 1, 16 and 64;
- translation: the same with chat messages that all need translating (two users of different
  languages per room, every text distinct), then the same messages again: served from the cache;
- pipeline: `--items` such messages replayed through the whole flow (`ReplayRun` with JSONL outputs,
  speed factor 0) with the stage at concurrency 64, every closed window assisted as well.

A case sends min(`--items`, concurrency × `--rounds`) items, so concurrency 1 takes `--rounds`
round trips instead of 400 s. Ideal throughput is concurrency / latency; the issue's target is
>= 0.7 × ideal at concurrency 64 (224 calls/s at 200 ms), pipeline included.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import orjson

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from connectors.llm import LlmConfig  # noqa: E402
from connectors.llm_stage import LlmStage  # noqa: E402
from dataflows.events import Event, WindowRecord, iso  # noqa: E402
from dataflows.flow import OutputKind, Record  # noqa: E402
from tests.connectors.fake_openai import FakeOpenAI  # noqa: E402

CONCURRENCIES = (1, 16, 64)
TARGET_RATIO = 0.7
T0 = 1_704_103_200.0


class Server(Protocol):
    @property
    def base_url(self) -> str: ...

    @property
    def requests(self) -> int: ...

    def reset_counts(self) -> None: ...


class ServerProcess:
    """The fake server in a child process: only its address is known here."""

    def __init__(self, latency: float) -> None:
        self.requests = -1
        script = ROOT / "tests" / "connectors" / "fake_openai.py"
        self.process = subprocess.Popen([sys.executable, str(script), str(latency)], stdout=subprocess.PIPE, text=True)
        assert self.process.stdout is not None
        self.base_url = self.process.stdout.readline().strip()

    def reset_counts(self) -> None:
        pass

    def stop(self) -> None:
        self.process.terminate()
        self.process.wait()


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


def shown(calls: int) -> str:
    return "-" if calls < 0 else str(calls)


def verdict(rate: float, ideal: float) -> str:
    ratio = rate / ideal
    return f"{ratio:.2f} of ideal (target >= {TARGET_RATIO}: {'met' if ratio >= TARGET_RATIO else 'MISSED'})"


def direct_cases(server: Server, items: int, rounds: int, latency: float) -> None:
    print(f"{'case':<24}{'conc.':>6}{'items':>7}{'calls':>7}{'seconds':>9}{'items/s':>9}{'ideal':>7}")
    rates: dict[str, float] = {}
    for concurrency in CONCURRENCIES:
        count = min(items, concurrency * rounds)
        ideal = concurrency / latency
        stage = stage_for(server, concurrency)
        stage([(OutputKind.WINDOWS, windows(1, "warm"))])  # a process's first call pays for lazy imports
        batch = windows(count, f"c{concurrency}")
        seconds, calls = timed(server, lambda: stage([(OutputKind.WINDOWS, batch)]))
        assert all(w["assistant"]["status"] == "ok" for w in batch)
        rates["windows"] = count / seconds
        print(f"{'assistant (windows)':<24}{concurrency:>6}{count:>7}{shown(calls):>7}{seconds:>9.2f}{count / seconds:>9.1f}{ideal:>7.0f}")
        messages = room_messages(count, f"c{concurrency}")
        seconds, calls = timed(server, lambda: stage([(OutputKind.MESSAGES, messages)]))
        assert sum(m["translation"]["status"] == "ok" for m in messages) == count
        rates["translations"] = count / seconds
        print(f"{'translation':<24}{concurrency:>6}{count:>7}{shown(calls):>7}{seconds:>9.2f}{count / seconds:>9.1f}{ideal:>7.0f}")
        again = room_messages(count, f"c{concurrency}")
        seconds, calls = timed(server, lambda: stage([(OutputKind.MESSAGES, again)]))
        print(f"{'translation, repeated':<24}{concurrency:>6}{count:>7}{shown(calls):>7}{seconds:>9.2f}{count / seconds:>9.0f}{'cache':>7}")
        stage.close()
    for what, rate in rates.items():
        print(f"  {what} at concurrency {CONCURRENCIES[-1]}: {verdict(rate, CONCURRENCIES[-1] / latency)}")


def pipeline_case(server: Server, items: int, latency: float, concurrency: int = 64) -> None:
    from connectors.runner import ReplayRun, run_job
    from dataflows.clock import ReplayClock
    from dataflows.flow import FlowConfig

    with tempfile.TemporaryDirectory(prefix="bench-llm-") as tmp:
        path = Path(tmp) / "chat.jsonl"
        with path.open("wb") as f:
            for m in room_messages(items, "pipeline"):
                line = {"username": m["username"], "room": m["session_id"], "type": m["kind"], "text": m["text"] or None,
                        "preferredLanguage": m["language"], "timestamp": m["timestamp"]}
                f.write(orjson.dumps({k: v for k, v in line.items() if v is not None}) + b"\n")
        stage = stage_for(server, concurrency)
        stage([(OutputKind.WINDOWS, windows(1, "warm"))])
        run = ReplayRun(path, Path(tmp), FlowConfig(time_origin=T0), ReplayClock(T0, time.time(), 0.0), stages=(stage,))
        seconds, calls = timed(server, lambda: run_job(run))
        stage.close()
        out = [orjson.loads(line) for line in (Path(tmp) / "messages.jsonl").read_bytes().splitlines()]
        wins = [orjson.loads(line) for line in (Path(tmp) / "windows.jsonl").read_bytes().splitlines()]
    translated = sum(m["translation"]["status"] == "ok" for m in out)
    assisted = sum(w["assistant"]["status"] == "ok" for w in wins)
    calls = translated + assisted if calls < 0 else calls  # every text differs: no cache hits
    print(f"\npipeline at concurrency {concurrency}: {translated} translations + {assisted} windows = {calls} calls "
          f"in {seconds:.2f} s, {calls / seconds:.1f} calls/s; {verdict(calls / seconds, concurrency / latency)}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=20, help="round trips per case at most (caps the items)")
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--no-pipeline", action="store_true")
    parser.add_argument("--server-process", action="store_true", help="run the fake server in its own process")
    args = parser.parse_args()
    server = ServerProcess(args.latency) if args.server_process else FakeOpenAI(latency=args.latency).start()
    try:
        direct_cases(server, args.items, args.rounds, args.latency)
        if not args.no_pipeline:
            pipeline_case(server, args.items, args.latency)
    finally:
        server.stop()


if __name__ == "__main__":
    main()
