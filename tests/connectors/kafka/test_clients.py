"""Kafka I/O: settings and file pacing without a broker; produce, topics and checks with one."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
from confluent_kafka import KafkaError
from confluent_kafka.admin import AdminClient
from hypothesis import given
from hypothesis import strategies as st

from connectors.kafka.clients import (
    check_reachable,
    ensure_topics,
    kafka_config,
    parse_kafka_options,
    produce_file,
    redact,
)
from dataflows.errors import ConvoflowError
from tests.conftest import jsonl
from tests.kafka_broker import consume_all

T0 = 1_704_103_200.0
BROKERS = "127.0.0.1:9092"


class FakeTime:
    """A clock that moves only when slept on, recording each sleep."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class Sent:
    topic: str
    value: bytes
    key: bytes | None
    at: float


@dataclass
class FakeProducer:
    """Records messages with the fake time they were handed over; delivers them on poll/flush."""

    time: FakeTime
    config: dict[str, Any] = field(default_factory=dict)
    fail_with: KafkaError | None = None
    full_once: bool = False
    undelivered: int = 0
    sent: list[Sent] = field(default_factory=list)
    pending: list[Callable[..., None]] = field(default_factory=list)
    flushed: bool = False

    def produce(self, topic: str, value: bytes, key: bytes | None = None,
                on_delivery: Callable[..., None] | None = None) -> None:
        if self.full_once:
            self.full_once = False
            raise BufferError("queue full")
        self.sent.append(Sent(topic, value, key, self.time.now))
        if on_delivery is not None:
            self.pending.append(on_delivery)

    def poll(self, timeout: float = 0) -> int:
        served, self.pending = self.pending, []
        for callback in served:
            callback(self.fail_with, None)
        return len(served)

    def flush(self, timeout: float = -1) -> int:
        self.poll()
        self.flushed = True
        return self.undelivered


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def replay(tmp_path: Path, lines: list[str], *, speed: float = 1.0, fake: FakeProducer | None = None,
           **kwargs: Any) -> tuple[int, FakeProducer]:
    """Run `produce_file` over `lines` against a fake producer and fake time."""
    producer = fake or FakeProducer(FakeTime())

    def factory(config: dict[str, Any]) -> FakeProducer:
        producer.config = config
        return producer

    count = produce_file(write(tmp_path / "in.jsonl", lines), BROKERS, "events", speed_factor=speed,
                         clock=producer.time.clock, sleep=producer.time.sleep, producer_factory=factory, **kwargs)
    return count, producer


def at(seconds: float, session: str = "s-1", **fields: Any) -> str:
    return orjson.dumps({"session_id": session, "sender": "customer", "message": f"at {seconds}",
                         "timestamp": T0 + seconds, **fields}).decode()


# --- settings -------------------------------------------------------------------------------


def test_config_merges_extra_settings_after_the_brokers() -> None:
    assert kafka_config(BROKERS, None) == {"bootstrap.servers": BROKERS}
    assert kafka_config(BROKERS, {"acks": "all", "linger.ms": "5"}) == {
        "bootstrap.servers": BROKERS, "acks": "all", "linger.ms": "5",
    }


def test_config_refuses_a_second_broker_list_and_no_brokers() -> None:
    with pytest.raises(ConvoflowError, match=r"bootstrap.servers=127.0.0.2:9092 conflicts with the brokers 127.0\.0\.1"):
        kafka_config(BROKERS, {"bootstrap.servers": "127.0.0.2:9092"})
    with pytest.raises(ConvoflowError, match="no Kafka brokers"):
        kafka_config(" ", None)


def test_kafka_options_are_key_value_pairs() -> None:
    assert parse_kafka_options(["acks=all", "sasl.jaas.config=a=b c"]) == {"acks": "all", "sasl.jaas.config": "a=b c"}
    with pytest.raises(ConvoflowError, match="'acks' is not key=value"):
        parse_kafka_options(["acks"])


def test_redact_masks_secrets_only_and_leaves_the_input_alone() -> None:
    config = {
        "bootstrap.servers": BROKERS, "sasl.username": "svc", "sasl.password": "p", "SSL.Key.Password": "k",
        "ssl.key.pem": "-----BEGIN", "sasl.jaas.config": "org...required;", "sasl.oauthbearer.client.secret": "s",
    }
    assert redact(config) == {
        "bootstrap.servers": BROKERS, "sasl.username": "svc", "sasl.password": "***", "SSL.Key.Password": "***",
        "ssl.key.pem": "***", "sasl.jaas.config": "***", "sasl.oauthbearer.client.secret": "***",
    }
    assert config["sasl.password"] == "p"


def test_an_unknown_setting_is_a_clear_error_without_a_network_call() -> None:
    with pytest.raises(ConvoflowError, match=r"invalid Kafka settings for 127.0.0.1:9092 .*no.such.setting"):
        check_reachable(BROKERS, {"no.such.setting": "1", "sasl.password": "hunter2"})
    with pytest.raises(ConvoflowError, match=r"'sasl.password': '\*\*\*'"):
        check_reachable(BROKERS, {"no.such.setting": "1", "sasl.password": "hunter2"})


def test_ensure_topics_refuses_zero_partitions() -> None:
    with pytest.raises(ConvoflowError, match="topic 'a' needs at least one partition, got 0"):
        ensure_topics(BROKERS, None, {"a": 0})


# --- produce_file with a fake producer --------------------------------------------------------


def test_pacing_follows_the_file_divided_by_the_speed_factor(tmp_path: Path) -> None:
    lines = [at(0), at(10), at(4), at(12, timestamp=None), "{not json", at(30), at(31, timestamp="garbage")]
    count, producer = replay(tmp_path, lines, speed=2.0)
    assert count == 7
    assert [s.at - 1000.0 for s in producer.sent] == [0, 5, 5, 5, 5, 15, 15]
    assert sum(producer.time.sleeps) == pytest.approx(15) and max(producer.time.sleeps) <= 1.0
    assert producer.flushed


def test_speed_zero_never_waits(tmp_path: Path) -> None:
    count, producer = replay(tmp_path, [at(0), at(3600), at(7200)], speed=0)
    assert count == 3 and producer.time.sleeps == []


def test_iso_and_millisecond_timestamps_pace_too(tmp_path: Path, conversation: Callable[..., dict]) -> None:
    lines = jsonl(conversation(timestamp="2024-01-01T10:00:00+00:00"), conversation(timestamp="2024-01-01T10:00:04"),
                  conversation(timestamp=int((T0 + 6) * 1000)))
    _, producer = replay(tmp_path, lines, speed=1.0)
    assert [s.at - 1000.0 for s in producer.sent] == [0, 4, 6]


def test_untimed_lines_before_the_first_timed_one_go_at_once(tmp_path: Path) -> None:
    _, producer = replay(tmp_path, [at(0, timestamp=None), at(50), at(52)], speed=1.0)
    assert [s.at - 1000.0 for s in producer.sent] == [0, 0, 2]


def test_lines_go_out_unchanged_with_their_session_as_key(tmp_path: Path, chat: Callable[..., dict]) -> None:
    bad = '{"session_id": "s-1", "sender": "customer", "message": "cut off'
    lines = [at(0, session="s-9"), *jsonl(chat(room="lobby"), chat(username="bob"), chat(session_id="s-2", room="r")),
             bad, '["an", "array"]', at(1, session="")]
    path_lines = [*lines[:4], "", "   ", *lines[4:]]
    count, producer = replay(tmp_path, path_lines, speed=0)
    assert count == len(lines)
    assert [s.value for s in producer.sent] == [line.encode() for line in lines]
    assert [s.key for s in producer.sent] == [b"s-9", b"lobby", b"bob", b"r", None, None, None], "room first, as parse.py"
    assert {s.topic for s in producer.sent} == {"events"}


def test_a_key_field_that_is_no_string_or_number_gives_no_key(tmp_path: Path) -> None:
    deep = "[" * 1000 + "]" * 1000
    lines = [f'{{"session_id": {deep}, "sender": "rm", "message": "x"}}', '{"session_id": {"a": 1}, "username": "ann"}',
             '{"session_id": 42}', '{"session_id": true}']
    count, producer = replay(tmp_path, lines, speed=0)
    assert count == 4
    assert [s.key for s in producer.sent] == [None, b"ann", b"42", None], "the next key field stands in"


def test_key_fields_can_be_chosen(tmp_path: Path, chat: Callable[..., dict]) -> None:
    _, producer = replay(tmp_path, jsonl(chat(username="ann", room="lobby")), speed=0, key_fields=("username",))
    assert producer.sent[0].key == b"ann"


def test_crlf_line_endings_are_not_part_of_the_message(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    path.write_bytes(at(0).encode() + b"\r\n" + at(1).encode())
    fake = FakeProducer(FakeTime())
    produce_file(path, BROKERS, "events", speed_factor=0, producer_factory=lambda _c: fake)
    assert [s.value for s in fake.sent] == [at(0).encode(), at(1).encode()]


def test_the_producer_gets_the_merged_settings(tmp_path: Path) -> None:
    _, producer = replay(tmp_path, [at(0)], speed=0, extra={"acks": "all"})
    assert producer.config["bootstrap.servers"] == BROKERS and producer.config["acks"] == "all"


def test_a_full_local_queue_is_waited_out(tmp_path: Path) -> None:
    count, producer = replay(tmp_path, [at(0), at(1)], speed=0, fake=FakeProducer(FakeTime(), full_once=True))
    assert count == 2 and len(producer.sent) == 2


def test_a_delivery_error_names_the_topic_line_and_error(tmp_path: Path) -> None:
    fake = FakeProducer(FakeTime(), fail_with=KafkaError(KafkaError._MSG_TIMED_OUT))
    with pytest.raises(ConvoflowError, match=r"topic 'events' on 127.0.0.1:9092 failed: in.jsonl line 1: .*timed out"):
        replay(tmp_path, [at(0), at(1)], speed=0, fake=fake)


def test_messages_left_after_flush_are_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConvoflowError, match="2 messages to Kafka topic 'events'"):
        replay(tmp_path, [at(0)], speed=0, fake=FakeProducer(FakeTime(), undelivered=2))


def test_bad_speed_and_missing_file_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(ConvoflowError, match="speed factor must be >= 0, got -1"):
        replay(tmp_path, [at(0)], speed=-1)
    with pytest.raises(ConvoflowError, match="does not exist"):
        produce_file(tmp_path / "nope.jsonl", BROKERS, "events", speed_factor=0,
                     producer_factory=lambda _c: FakeProducer(FakeTime()))


@given(offsets=st.lists(st.integers(min_value=-100, max_value=1000), min_size=1, max_size=30),
       speed=st.sampled_from([0.5, 1.0, 4.0, 100.0]))
def test_each_line_goes_when_due_and_never_before(tmp_path_factory: pytest.TempPathFactory, offsets: list[int],
                                                  speed: float) -> None:
    _, producer = replay(tmp_path_factory.mktemp("p"), [at(o) for o in offsets], speed=speed)
    sent = [s.at - 1000.0 for s in producer.sent]
    due = [(o - offsets[0]) / speed for o in offsets]
    expected = [max(max(due[: i + 1]), 0.0) for i in range(len(due))]
    assert sent == pytest.approx(expected)


# --- against a real broker --------------------------------------------------------------------


@pytest.mark.kafka
def test_produced_file_comes_back_whole_and_keyed_by_session(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: Callable[..., str], chat: Callable[..., dict]
) -> None:
    topic = kafka_topic(partitions=3)
    bad = '{"session_id": "s-1", "sender": "customer", "message": "cut off \xe9'
    lines = [at(i, session=f"s-{i % 6}") for i in range(24)]
    lines[5:5] = [bad]
    lines[9:9] = [at(0, session="s-2", timestamp=None)]
    lines += jsonl(chat(room="lobby"), chat(username="carol"))
    path = write(tmp_path / "mixed.jsonl", lines)

    count = produce_file(path, kafka_bootstrap, topic, speed_factor=0)
    messages = consume_all(kafka_bootstrap, topic, 3, expected=count)

    assert count == len(lines) == len(messages)
    assert sorted(m.value() for m in messages) == sorted(line.encode() for line in lines)
    partitions_of: dict[bytes | None, set[int]] = {}
    for m in messages:
        partitions_of.setdefault(m.key(), set()).add(m.partition())
    assert all(len(p) == 1 for key, p in partitions_of.items() if key is not None)
    assert len({p for ps in partitions_of.values() for p in ps}) > 1
    assert set(partitions_of) == {*(f"s-{i}".encode() for i in range(6)), b"lobby", b"carol", None}
    [dead] = [m for m in messages if m.key() is None]
    assert dead.value() == bad.encode()
    in_order = [m.value() for m in sorted(messages, key=lambda m: m.offset()) if m.key() == b"s-2"]
    assert in_order == [line.encode() for line in lines if '"session_id":"s-2"' in line]


@pytest.mark.kafka
def test_a_paced_replay_takes_the_file_time_over_the_speed(
    tmp_path: Path, kafka_bootstrap: str, kafka_topic: Callable[..., str]
) -> None:
    topic = kafka_topic(partitions=1)
    path = write(tmp_path / "paced.jsonl", [at(0), at(2), at(4)])
    started = time.monotonic()
    assert produce_file(path, kafka_bootstrap, topic, speed_factor=10) == 3
    assert time.monotonic() - started >= 0.4
    assert len(consume_all(kafka_bootstrap, topic, 1, expected=3)) == 3


@pytest.mark.kafka
def test_ensure_topics_creates_missing_topics_once(kafka_bootstrap: str, kafka_topic: Callable[..., str]) -> None:
    existing = kafka_topic(partitions=3)
    fresh = f"test-ensure-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    try:
        assert ensure_topics(kafka_bootstrap, None, {fresh: 2, existing: 1}) == [fresh]
        assert ensure_topics(kafka_bootstrap, None, {fresh: 2, existing: 1}) == []
        topics = admin.list_topics(timeout=5).topics
        assert len(topics[fresh].partitions) == 2 and len(topics[existing].partitions) == 3
    finally:
        admin.delete_topics([fresh], operation_timeout=10)[fresh].result(timeout=15)


@pytest.mark.kafka
def test_check_reachable_accepts_the_broker(kafka_bootstrap: str) -> None:
    check_reachable(kafka_bootstrap, None, timeout_s=5.0)


@pytest.mark.kafka
def test_check_reachable_fails_fast_on_a_closed_port() -> None:
    started = time.monotonic()
    with pytest.raises(ConvoflowError, match=r"Kafka brokers 127.0.0.1:1 did not answer within 5s: .*refused"):
        check_reachable("127.0.0.1:1", None)
    assert time.monotonic() - started < 8


@pytest.mark.kafka
def test_ensure_topics_fails_fast_on_a_closed_port() -> None:
    started = time.monotonic()
    with pytest.raises(ConvoflowError, match="127.0.0.1:1 did not answer within 1s"):
        ensure_topics("127.0.0.1:1", None, {"t": 1}, timeout_s=1.0)
    assert time.monotonic() - started < 4
