"""The flow's outputs on Kafka topics, through Bytewax's `KafkaSink`.

Each output kind goes to its own topic (`OutputTopics`); every record is keyed by its session,
so a session's messages, windows and alerts stay on one partition and in order. Messages take
the chat pipeline's envelope (`envelope`). Delivery is at-least-once: Bytewax's sink flushes
after every batch, and a message the brokers finally refuse stops the run with the reason
(`undelivered`) instead of vanishing; while brokers are away librdkafka keeps retrying for
`message.timeout.ms`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from typing import Any

import orjson
from bytewax.connectors.kafka import KafkaSink, KafkaSinkMessage

from dataflows.errors import ConvoflowError
from dataflows.flow import FlowOutput, OutputKind, Record

KafkaMessage = KafkaSinkMessage[bytes | None, bytes]


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


@dataclass(frozen=True)
class KafkaEncoder:
    """Turns a batch of records of one kind into keyed messages for that kind's topic."""

    topics: OutputTopics

    def __call__(self, kind: str, records: list[Record]) -> list[KafkaMessage]:
        topic = self.topics.of(kind)
        wrap = envelope if kind == OutputKind.MESSAGES else None
        return [
            KafkaSinkMessage(_key(r), orjson.dumps(wrap(r) if wrap else r), topic=topic)
            for r in records
        ]


def _key(record: Record) -> bytes | None:
    session = record.get("session_id")
    return session.encode() if isinstance(session, str) else None


def undelivered(err: Any, message: Any) -> None:
    """librdkafka's delivery report: a message it gave up on stops the run, naming the topic."""
    if err is not None:
        msg = f"Kafka did not accept a message for topic {message.topic()!r}: {err.str()}"
        raise ConvoflowError(msg)


def kafka_output(brokers: str, topics: OutputTopics, config: Mapping[str, Any] | None = None) -> FlowOutput:
    """The flow output that writes every kind to its topic on `brokers`."""
    add_config = {**(config or {}), "on_delivery": undelivered}
    sink = KafkaSink(brokers.split(","), None, add_config=add_config)
    return FlowOutput("kafka", sink, KafkaEncoder(topics), per_item=True)
