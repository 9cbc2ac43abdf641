"""pytest plugin: a real Kafka broker for tests marked `kafka`, and fresh topics on it.

`kafka_bootstrap` uses the brokers in `KAFKA_BOOTSTRAP_SERVERS` when that is set, after
checking that they answer. Otherwise it starts a private single-node broker with
`scripts/kafka-local.sh`, its state under pytest's tmp dir (so a developer's own broker and
parallel runs are left alone), and stops it when the session ends. A broker that cannot be
had fails the tests that need it, with the reason: nothing is skipped.

`kafka_topic(partitions=3)` creates a uniquely named topic, returns once its metadata shows
every partition with a leader, and deletes it after the test.
"""

from __future__ import annotations

import os
import re
import subprocess
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from typing import Any
from pathlib import Path

import pytest
from confluent_kafka import Consumer, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.kafka.clients import check_reachable
from dataflows.errors import ConvoflowError

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "kafka-local.sh"
BOOTSTRAP_ENV = "KAFKA_BOOTSTRAP_SERVERS"
# The first start resolves the Kafka jars through Maven; later starts take seconds.
START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 60.0
TOPIC_READY_TIMEOUT_S = 20.0
_BROKER_INFO = pytest.StashKey[str]()
_BROKER_STATE = pytest.StashKey[Path]()
_ADDRESS = re.compile(r"^[\w.-]+:\d+$")


@pytest.fixture(scope="session")
def kafka_bootstrap(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The bootstrap address of a running, answering Kafka broker."""
    given = os.environ.get(BOOTSTRAP_ENV, "").strip()
    if given:
        problem = _unreachable(given)
        if problem:
            pytest.fail(f"{BOOTSTRAP_ENV}={given} is set but unusable: {problem}", pytrace=False)
        request.config.stash[_BROKER_INFO] = f"kafka: using {BOOTSTRAP_ENV}={given}"
        yield given
        return
    state = tmp_path_factory.mktemp("kafka-local")
    env = {**os.environ, "KAFKA_LOCAL_DIR": str(state)}
    started = time.monotonic()
    try:
        address = _run_script("start", env, START_TIMEOUT_S, logs=state / "logs")
    except BaseException:
        # A start cut short can leave a broker behind; the start's own error is the one to report.
        subprocess.run(["bash", str(SCRIPT), "stop"], env=env, capture_output=True, timeout=STOP_TIMEOUT_S, check=False)
        raise
    took = time.monotonic() - started
    request.config.stash[_BROKER_INFO] = f"kafka: private broker {address} started in {took:.1f}s (state {state})"
    request.config.stash[_BROKER_STATE] = state
    yield address
    _run_script("stop", env, STOP_TIMEOUT_S)


@pytest.fixture
def kafka_broker_pid(kafka_bootstrap: str, request: pytest.FixtureRequest) -> int:
    """The process id of the private broker the tests started (to pause it); skips with an external broker."""
    state = request.config.stash.get(_BROKER_STATE, None)
    if state is None:
        pytest.skip(f"{BOOTSTRAP_ENV} names an external broker; only the tests' own broker may be paused")
    return int((state / "broker.pid").read_text().strip())


@pytest.fixture
def kafka_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[Callable[..., str]]:
    """A factory: `kafka_topic(partitions=3)` creates a fresh topic and returns its name."""
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []
    test_name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name)[:80]

    def make(partitions: int = 3) -> str:
        name = f"test-{test_name}-{uuid.uuid4().hex[:8]}"
        future = admin.create_topics([NewTopic(name, num_partitions=partitions)], operation_timeout=10)[name]
        try:
            future.result(timeout=15)
        except (KafkaException, TimeoutError) as exc:
            pytest.fail(f"could not create topic {name} on {kafka_bootstrap}: {exc!r}", pytrace=False)
        created.append(name)
        _wait_for_partitions(admin, name, partitions)
        return name

    yield make
    if created:
        for name, future in admin.delete_topics(created, operation_timeout=10).items():
            try:
                future.result(timeout=15)
            except (KafkaException, TimeoutError) as exc:
                warnings.warn(f"could not delete test topic {name} on {kafka_bootstrap}: {exc!r}", stacklevel=1)


def consume_all(brokers: str, topic: str, partitions: int, expected: int, timeout_s: float = 30.0) -> list[Any]:
    """Every message of `topic` from the beginning, once `expected` have arrived (or the time is up)."""
    consumer = Consumer({"bootstrap.servers": brokers, "group.id": f"test-{uuid.uuid4().hex}",
                         "enable.auto.commit": False})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(partitions)])
    messages: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(messages) < expected and time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=100, timeout=0.5):
                assert msg.error() is None, msg.error()
                messages.append(msg)
    finally:
        consumer.close()
    return messages


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    info = config.stash.get(_BROKER_INFO, None)
    if info:
        terminalreporter.write_line(info)


def _unreachable(brokers: str) -> str | None:
    """Why `brokers` cannot be used, or None when they answer."""
    try:
        check_reachable(brokers, None, timeout_s=5.0)
    except ConvoflowError as exc:
        return str(exc)
    return None


def _run_script(command: str, env: dict[str, str], timeout_s: float, logs: Path | None = None) -> str:
    """Run `kafka-local.sh command`; its last stdout line, or a test failure with its stderr.

    When the script stops without saying why (it can, for a JVM that does not start), the
    failure shows the end of the broker's logs under `logs` instead.
    """
    try:
        done = subprocess.run(["bash", str(SCRIPT), command], env=env, capture_output=True, text=True,
                              timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        returncode, last = None, ""
    else:
        stderr, returncode = done.stderr, done.returncode
        lines = done.stdout.strip().splitlines()
        last = lines[-1].strip() if lines else ""
        if returncode == 0 and (command != "start" or _ADDRESS.match(last)):
            return last
    outcome = f"did not finish within {timeout_s:g}s" if returncode is None else f"failed (exit {returncode})"
    pytest.fail(
        f"{SCRIPT.name} {command} {outcome}, last stdout line {last!r}\n"
        f"--- stderr ---\n{stderr.strip() or '(empty)'}{'' if 'ERROR' in stderr else _log_tails(logs)}",
        pytrace=False,
    )


def _log_tails(logs: Path | None, lines: int = 20) -> str:
    if logs is None or not logs.is_dir():
        return ""
    tails = []
    for log in sorted(logs.iterdir()):
        text = log.read_text(errors="replace").strip().splitlines()
        if text:
            tails.append(f"--- {log} (last {min(lines, len(text))} lines) ---\n" + "\n".join(text[-lines:]))
    return "\n" + "\n".join(tails) if tails else f"\n(no broker logs under {logs})"


def _wait_for_partitions(admin: AdminClient, topic: str, partitions: int) -> None:
    """Return once `topic`'s metadata shows `partitions` partitions, each with a leader."""
    deadline = time.monotonic() + TOPIC_READY_TIMEOUT_S
    seen = "no metadata"
    while time.monotonic() < deadline:
        try:
            meta = admin.list_topics(topic=topic, timeout=5).topics.get(topic)
        except KafkaException as exc:
            seen = repr(exc)
        else:
            if meta is not None and meta.error is None:
                ready = [p for p in meta.partitions.values() if p.error is None and p.leader >= 0]
                if len(ready) == partitions:
                    return
                seen = f"{len(ready)} of {partitions} partitions ready"
            elif meta is not None:
                seen = str(meta.error)
        time.sleep(0.1)
    pytest.fail(f"topic {topic} not ready after {TOPIC_READY_TIMEOUT_S:g}s: {seen}", pytrace=False)
