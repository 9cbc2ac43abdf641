"""The flow's Kafka outputs without a broker: envelope, per-kind topics and keys, delivery reports."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from connectors.kafka.outputs import (
    ONLY_ERRORS,
    PRODUCER_DEFAULTS,
    KafkaTopicsSink,
    OutputTopics,
    _TopicsPartition,
    encode_for_kafka,
    envelope,
    undelivered,
)
from dataflows.errors import ConvoflowError
from dataflows.event_frame import RECORD_FIELDS, events_frame
from dataflows.events import Event, iso
from dataflows.flow import OutputKind
from dataflows.records import as_records

T0 = 1_704_103_200.0
"""2024-01-01T10:00:00+00:00"""


@pytest.fixture
def make_event() -> Callable[..., Event]:
    def make(**overrides: Any) -> Event:
        fields: dict[str, Any] = {
            "event_id": "chat/0:7", "session_id": "s-1", "sender": "customer", "kind": "message", "text": "hi",
            "time": T0, "time_source": "event", "shape": "conversation", "source": "chat/0", "line": 7, "offset": 7,
        }
        fields.update(overrides)
        fields.setdefault("timestamp", iso(fields["time"]))
        return Event(**fields)

    return make


def test_envelope_of_a_conversation_message(make_event: Callable[..., Event]) -> None:
    record = make_event(time=T0 + 42.75).as_record()
    assert envelope(record) == {
        "type": "chat_message",
        "timestamp": int(T0) + 42,
        "payload": {
            "id": "chat/0:7",
            "username": "customer",
            "text": "hi",
            "translated": None,
            "language": None,
            "session_id": "s-1",
            "sender": "customer",
            "kind": "message",
            "time_source": "event",
        },
    }


def test_envelope_of_a_chat_message(make_event: Callable[..., Event]) -> None:
    event = make_event(session_id="room-1", sender="alice", username="alice", kind="USER_MESSAGE", text="Hola",
                       language="es", shape="chat", time_source="system")
    wrapped = envelope(event.as_record())
    assert wrapped["timestamp"] == int(T0)
    assert wrapped["payload"] == {
        "id": "chat/0:7", "username": "alice", "text": "Hola", "translated": None, "language": "es",
        "session_id": "room-1", "sender": "alice", "kind": "USER_MESSAGE", "time_source": "system",
    }


def test_envelope_takes_the_translation_and_moderation_when_the_record_has_them(make_event: Callable[..., Event]) -> None:
    record = {**make_event(text="Hola").as_record(), "translated": "Hello",
              "translation": {"model": "m"}, "moderation": {"flagged": False}}
    payload = envelope(record)["payload"]
    assert payload["translated"] == "Hello"
    assert (payload["translation"], payload["moderation"]) == ({"model": "m"}, {"flagged": False})
    assert "translation" not in envelope(make_event().as_record())["payload"]


def test_output_topics_default_to_the_chat_pipeline_names() -> None:
    topics = OutputTopics()
    chat_pipeline = {
        "messages": "processing_fanout", "windows": "conversation_windows", "late": "late_events",
        "dead_letter": "dead_letter", "alerts": "alerts",
    }
    assert {kind: topics.of(kind) for kind in chat_pipeline} == chat_pipeline
    assert sorted(topics.all()) == sorted(topics.of(k) for k in OutputKind), "one topic for every output kind"


def test_messages_are_keyed_by_session_in_the_envelope(make_event: Callable[..., Event]) -> None:
    records = [make_event().as_record(), make_event(event_id="chat/0:8", session_id="s-2").as_record()]
    sent = encode_for_kafka(OutputKind.MESSAGES, records)
    assert [key for key, _ in sent] == [b"s-1", b"s-2"]
    assert [orjson.loads(value) for _, value in sent] == [envelope(r) for r in records]


@pytest.mark.parametrize("kind", ["windows", "late", "alerts", "dead_letter", "moderated"])
def test_other_kinds_are_sent_as_the_record(kind: str) -> None:
    record = {"session_id": "s-1", "window_start": iso(T0), "counts": {"rm": 2}}
    assert [(key, orjson.loads(value)) for key, value in encode_for_kafka(kind, [record])] == [(b"s-1", record)]


def test_record_without_a_session_has_no_key() -> None:
    [(key, _)] = encode_for_kafka(OutputKind.DEAD_LETTER, [{"source": "chat/0", "line": 3, "reason": "x"}])
    assert key is None


@dataclass
class FakeProducer:
    """Records produce/poll/flush calls; its queue holds `room` messages before BufferError."""

    room: int = 1_000
    calls: list[tuple[Any, ...]] = field(default_factory=list)
    queued: int = 0

    def produce(self, topic: str, value: bytes, key: bytes | None) -> None:
        if self.queued >= self.room:
            raise BufferError
        self.queued += 1
        self.calls.append(("produce", topic, key, value))

    def poll(self, timeout: float) -> int:
        self.calls.append(("poll",))
        return 0

    def flush(self) -> int:
        self.queued = 0
        self.calls.append(("flush",))
        return 0


def late(session: str, n: int) -> dict[str, Any]:
    return {"session_id": session, "n": n}


def test_the_sink_encodes_and_writes_each_kind_to_its_topic_polls_once_per_batch_and_flushes() -> None:
    producer = FakeProducer()
    part = _TopicsPartition(producer, OutputTopics(late="late-test", windows="windows-test"))  # type: ignore[arg-type]
    part.write_batch([("late", [late("s-1", 1), late("s-2", 2)]), ("windows", pl.DataFrame([late("s-1", 3)])),
                      ("alerts", [])])
    assert producer.calls == [
        ("produce", "late-test", b"s-1", orjson.dumps(late("s-1", 1))),
        ("produce", "late-test", b"s-2", orjson.dumps(late("s-2", 2))), ("poll",),
        ("produce", "windows-test", b"s-1", orjson.dumps(late("s-1", 3))), ("poll",), ("poll",), ("flush",),
    ]


def test_without_recovery_the_sink_sends_in_the_background_and_waits_for_deliveries_only_at_the_end() -> None:
    """Each batch is encoded and produced on the partition's own thread; the next call waits for it
    (so calls stay in order) and close flushes."""
    producer = FakeProducer()
    part = _TopicsPartition(producer, OutputTopics(late="late-test"), in_background=True)  # type: ignore[arg-type]
    part.write_batch([("late", [late("s-1", 1)])])
    part.write_batch([("late", pl.DataFrame([late("s-2", 2)]))])
    part.close()
    assert producer.calls == [("produce", "late-test", b"s-1", orjson.dumps(late("s-1", 1))), ("poll",),
                              ("produce", "late-test", b"s-2", orjson.dumps(late("s-2", 2))), ("poll",), ("flush",)]


def test_a_failed_send_in_the_background_is_raised_by_the_next_call() -> None:
    part = _TopicsPartition(FakeProducer(), OutputTopics(), in_background=True)  # type: ignore[arg-type]
    part.write_batch([("late", [{"session_id": "s-1", "n": object()}])])
    with pytest.raises(TypeError):
        part.write_batch([("late", [late("s-1", 1)])])
    part.close()


def test_a_full_producer_queue_is_drained_and_nothing_is_lost() -> None:
    producer = FakeProducer(room=2)
    part = _TopicsPartition(producer, OutputTopics())  # type: ignore[arg-type]
    part.write_batch([("late", [late("k", i) for i in range(5)])])
    assert [orjson.loads(c[3])["n"] for c in producer.calls if c[0] == "produce"] == [0, 1, 2, 3, 4]


@dataclass
class FakeMessage:
    name: str

    def topic(self) -> str:
        return self.name


@dataclass
class FakeError:
    text: str

    def str(self) -> str:
        return self.text


def test_undelivered_message_stops_the_run_naming_its_topic() -> None:
    with pytest.raises(ConvoflowError, match="'late_events'.*Message timed out"):
        undelivered(FakeError("Local: Message timed out"), FakeMessage("late_events"))


def test_delivered_message_is_fine() -> None:
    undelivered(None, FakeMessage("late_events"))


def test_the_producer_reports_only_failed_deliveries_unless_the_run_says_otherwise() -> None:
    config = KafkaTopicsSink("b1:9092", OutputTopics()).producer_config()
    assert {k: config[k] for k in PRODUCER_DEFAULTS} == dict(PRODUCER_DEFAULTS)
    assert config[ONLY_ERRORS] is True
    assert (config["bootstrap.servers"], config["on_delivery"]) == ("b1:9092", undelivered)


@pytest.mark.parametrize(("given", "expected"), [("false", False), ("true", True), (False, False)])
def test_the_runs_own_producer_settings_win_and_a_text_switch_becomes_a_bool(given: Any, expected: bool) -> None:
    config = KafkaTopicsSink("b1:9092", OutputTopics(), {ONLY_ERRORS: given, "linger.ms": "50"}).producer_config()
    assert config[ONLY_ERRORS] is expected
    assert config["linger.ms"] == "50"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(
    st.one_of(st.none(), st.just(""), st.text(max_size=5)),         # username
    st.floats(-2e9, 4e9, allow_nan=False),                            # event time (before 1970 too)
    st.text(max_size=20),                                             # text
    st.sampled_from(["allow", "mask", "block"]),                      # a moderation action
), min_size=1, max_size=12), st.booleans(), st.booleans())
def test_a_frame_of_messages_is_encoded_as_its_records_are(
    rows: list[tuple[str | None, float, str, str]], judged: bool, translated: bool
) -> None:
    events = [Event(f"chat/0:{i}", f"s-{i % 3}", "customer", "message", text, t, "event", "chat", "chat/0", i, i,
                    "en", username, iso(t)) for i, (username, t, text, _) in enumerate(rows)]
    frame = events_frame(events).select(RECORD_FIELDS)
    if judged:
        frame = frame.with_columns(pl.Series("moderation", [orjson.dumps({"action": a, "rules": []}) for *_, a in rows],
                                             dtype=pl.Binary))
    if translated:
        frame = frame.with_columns(pl.lit(None).alias("translated"),
                                   pl.lit({"status": "skipped", "model": None}).alias("translation"))
    assert encode_for_kafka(OutputKind.MESSAGES, frame) == encode_for_kafka(OutputKind.MESSAGES, as_records(frame))


def test_a_frame_of_windows_is_encoded_as_its_records_are() -> None:
    windows = pl.DataFrame({
        "session_id": ["s-1", None], "window_start": ["a", "b"],
        "counts": [[{"key": "ann", "value": 2}], [{"key": "bob", "value": 1}, {"key": "cy", "value": 3}]],
        "overflow": [0, 1],
    })
    assert encode_for_kafka(OutputKind.WINDOWS, windows) == encode_for_kafka(OutputKind.WINDOWS, as_records(windows))
    assert [key for key, _ in encode_for_kafka(OutputKind.WINDOWS, windows)] == [b"s-1", None]
