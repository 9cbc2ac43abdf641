"""The flow's outputs on Kafka topics.

Each output kind goes to its own topic (`OutputTopics`); every record is keyed by its session,
so a session's messages, windows and alerts stay on one partition and in order. Messages take
the chat pipeline's envelope (`envelope`). Delivery is at-least-once: the sink flushes after
every batch, and a message the brokers finally refuse stops the run with the reason
(`undelivered`) instead of vanishing; while brokers are away librdkafka keeps retrying for
`message.timeout.ms`. Only failed deliveries are reported back (`PRODUCER_DEFAULTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from types import MappingProxyType
from typing import Any

import orjson
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer

from dataflows.errors import ConvoflowError
from dataflows.flow import FlowOutput, OutputKind
from dataflows.records import Record, Records, as_records

ONLY_ERRORS = "delivery.report.only.error"
PRODUCER_DEFAULTS: Mapping[str, Any] = MappingProxyType({ONLY_ERRORS: True})
"""librdkafka settings of the sink's producer, before the run's own (`--kafka-config`).

librdkafka's own defaults (`linger.ms=5`, 10,000 messages a request) measured as fast as any
tried for these outputs; what costs is a Python delivery callback per message, so only failures
are reported."""


@dataclass(frozen=True)
class OutputTopics:
    """The topic of each output kind; the defaults follow the original chat pipeline."""

    messages: str = "processing_fanout"
    windows: str = "conversation_windows"
    alerts: str = "alerts"
    late: str = "late_events"
    dead_letter: str = "dead_letter"
    moderated: str = "moderated"

    def of(self, kind: str) -> str:
        return str(getattr(self, kind))

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in fields(self)]

    def __post_init__(self) -> None:
        kinds = {f.name for f in fields(self)}
        missing = {k.value for k in OutputKind} - kinds
        if missing:
            msg = f"no Kafka topic for output kinds {sorted(missing)}"
            raise ConvoflowError(msg)


def envelope(message: Record) -> dict[str, Any]:
    """A `messages` record in the chat pipeline's envelope: `{type, timestamp (epoch s), payload}`.

    `translated` is the record's translation when the LLM stage gave one, else None.
    """
    payload = {
        "id": message["event_id"],
        "username": message["username"] or message["sender"],
        "text": message["text"],
        "translated": message.get("translated"),
        "language": message["language"],
        "session_id": message["session_id"],
        "sender": message["sender"],
        "kind": message["kind"],
        "time_source": message["time_source"],
    }
    for extra in ("moderation", "translation"):
        if extra in message:
            payload[extra] = message[extra]
    return {
        "type": "chat_message",
        "timestamp": int(datetime.fromisoformat(message["timestamp"]).timestamp()),
        "payload": payload,
    }


Keyed = tuple[bytes | None, bytes]
"""One message to produce: its key (the session) and its JSON value."""


def encode_for_kafka(kind: str, batch: Records) -> list[Keyed]:
    """The flow's encoder for Kafka: each record keyed by session, messages in the envelope."""
    dumps = orjson.dumps
    records = as_records(batch)
    if kind == OutputKind.MESSAGES:
        return [(_key(r), dumps(envelope(r))) for r in records]
    return [(_key(r), dumps(r)) for r in records]


def _key(record: Record) -> bytes | None:
    session = record.get("session_id")
    return session.encode() if isinstance(session, str) else None


def undelivered(err: Any, message: Any) -> None:
    """librdkafka's delivery report: a message it gave up on stops the run, naming the topic."""
    if err is not None:
        msg = f"Kafka did not accept a message for topic {message.topic()!r}: {err.str()}"
        raise ConvoflowError(msg)


class KafkaTopicsSink(DynamicSink[tuple[str, list[Keyed]]]):
    """Writes each output kind's batches to its topic; one producer per worker.

    Bytewax's own `KafkaSink` wants one `KafkaSinkMessage` object per record and polls the
    producer after every message; this takes the flow's encoded batches as they come and polls
    once per batch. Like it, it flushes after every batch (at-least-once), and a delivery that
    librdkafka gives up on raises (`undelivered`).
    """

    def __init__(self, brokers: str, topics: OutputTopics, config: Mapping[str, Any] | None = None) -> None:
        self.brokers = brokers
        self.topics = topics
        self.config = dict(config or {})

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _TopicsPartition:
        return _TopicsPartition(Producer(self.producer_config()), self.topics)

    def producer_config(self) -> dict[str, Any]:
        """The defaults, the run's own settings, then the brokers and the delivery callback."""
        config = {**PRODUCER_DEFAULTS, **self.config, "bootstrap.servers": self.brokers, "on_delivery": undelivered}
        only_errors = config[ONLY_ERRORS]
        if isinstance(only_errors, str):  # from --kafka-config; confluent-kafka takes only a bool here
            config[ONLY_ERRORS] = only_errors.strip().lower() in ("true", "1")
        return config


class _TopicsPartition(StatelessSinkPartition[tuple[str, list[Keyed]]]):
    def __init__(self, producer: Producer, topics: OutputTopics) -> None:
        self.producer = producer
        self.topics = topics

    def write_batch(self, items: list[tuple[str, list[Keyed]]]) -> None:
        produce = self.producer.produce
        for kind, messages in items:
            topic = self.topics.of(kind)
            for key, value in messages:
                try:
                    produce(topic, value, key)
                except BufferError:  # librdkafka's queue is full: let it drain, then go on
                    self.producer.flush()
                    produce(topic, value, key)
            self.producer.poll(0)
        self.producer.flush()

    def close(self) -> None:
        self.producer.flush()


def kafka_output(brokers: str, topics: OutputTopics, config: Mapping[str, Any] | None = None) -> FlowOutput:
    """The flow output that writes every kind to its topic on `brokers`."""
    return FlowOutput("kafka", KafkaTopicsSink(brokers, topics, config), encode_for_kafka)
