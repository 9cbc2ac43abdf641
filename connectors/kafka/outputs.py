"""The flow's outputs on Kafka topics.

Each output kind goes to its own topic (`OutputTopics`); every record is keyed by its session,
so a session's messages, windows and alerts stay on one partition and in order. Messages take
the chat pipeline's envelope (`envelope`). With recovery, delivery is at-least-once: the sink
flushes after every batch, so the epoch a snapshot closes holds only delivered outputs. Without
recovery a restart resumes nothing, so the sink encodes and produces on a thread of its own and
flushes when the run ends. Either way a message the brokers finally refuse
stops the run with the reason (`undelivered`) instead of vanishing; while brokers are away
librdkafka keeps retrying for `message.timeout.ms`. Only failed deliveries are reported back
(`PRODUCER_DEFAULTS`).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from datetime import datetime
from types import MappingProxyType
from typing import Any

import orjson
import polars as pl
from bytewax.outputs import DynamicSink, StatelessSinkPartition
from confluent_kafka import Producer

from dataflows.errors import ConvoflowError
from dataflows.flow import FlowOutput, OutputKind, as_given
from connectors.files.jsonl import json_expr
from connectors.write_behind import WriteBehind
from dataflows.records import Record, Records

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
    """The flow's encoder for Kafka: each record keyed by session, messages in the envelope. A
    frame is encoded column-wise, byte for byte as its rows would be."""
    if isinstance(batch, pl.DataFrame):
        return _encoded_frame(kind, batch)
    dumps = orjson.dumps
    if kind == OutputKind.MESSAGES:
        return [(_key(r), dumps(envelope(r))) for r in batch]
    return [(_key(r), dumps(r)) for r in batch]


def _encoded_frame(kind: str, frame: pl.DataFrame) -> list[Keyed]:
    if frame.is_empty():
        return []
    if kind == OutputKind.MESSAGES:
        payloads = _payloads(frame)
        seconds = _epoch_seconds(frame["timestamp"])
        values = payloads.select(pl.concat_str(
            pl.lit('{"type":"chat_message","timestamp":'), pl.lit(seconds).cast(pl.String), pl.lit(',"payload":'),
            json_expr(payloads.schema), pl.lit("}"),
        )).to_series()
    else:
        values = frame.select(json_expr(frame.schema)).to_series()
    keys = frame["session_id"].cast(pl.Binary).to_list() if "session_id" in frame.columns else [None] * len(frame)
    return list(zip(keys, values.cast(pl.Binary).to_list(), strict=True))


def _payloads(messages: pl.DataFrame) -> pl.DataFrame:
    """`envelope`'s payload of each message, a column per field."""
    username = pl.col("username")
    return messages.select(
        pl.col("event_id").alias("id"),
        pl.when(username.is_null() | (username == "")).then(pl.col("sender")).otherwise(username).alias("username"),
        "text",
        (pl.col("translated") if "translated" in messages.columns else pl.lit(None, pl.String)).alias("translated"),
        "language", "session_id", "sender", "kind", "time_source",
        *[extra for extra in ("moderation", "translation") if extra in messages.columns],
    )


def _epoch_seconds(timestamps: pl.Series) -> pl.Series:
    """`envelope`'s `timestamp` of each ISO time: whole epoch seconds, computed once per distinct time."""
    distinct = timestamps.unique()
    seconds = [int(datetime.fromisoformat(ts).timestamp()) for ts in distinct.to_list()]
    return timestamps.replace_strict(distinct, pl.Series(seconds, dtype=pl.Int64), return_dtype=pl.Int64)


def _key(record: Record) -> bytes | None:
    session = record.get("session_id")
    return session.encode() if isinstance(session, str) else None


def undelivered(err: Any, message: Any) -> None:
    """librdkafka's delivery report: a message it gave up on stops the run, naming the topic."""
    if err is not None:
        msg = f"Kafka did not accept a message for topic {message.topic()!r}: {err.str()}"
        raise ConvoflowError(msg)


class KafkaTopicsSink(DynamicSink[tuple[str, Records]]):
    """Writes each output kind's batches to its topic; one producer per worker.

    Bytewax's own `KafkaSink` wants one `KafkaSinkMessage` object per record and polls the
    producer after every message; this takes the flow's batches of records as they come, encodes
    them column-wise (`encode_for_kafka`) and polls once per batch. With `in_background` (a run
    without recovery) a partition encodes and produces each batch on a thread of its own while the
    worker goes on (Polars' encoding releases the GIL), and waits for deliveries only at the end;
    else, like Bytewax's, it flushes after every batch (at-least-once). A delivery that librdkafka
    gives up on raises (`undelivered`) at the next poll, and so from the next call.
    """

    def __init__(self, brokers: str, topics: OutputTopics, config: Mapping[str, Any] | None = None, *,
                 in_background: bool = False) -> None:
        self.brokers = brokers
        self.topics = topics
        self.config = dict(config or {})
        self.in_background = in_background

    def build(self, step_id: str, worker_index: int, worker_count: int) -> _TopicsPartition:
        return _TopicsPartition(Producer(self.producer_config()), self.topics, in_background=self.in_background)

    def producer_config(self) -> dict[str, Any]:
        """The defaults, the run's own settings, then the brokers and the delivery callback."""
        config = {**PRODUCER_DEFAULTS, **self.config, "bootstrap.servers": self.brokers, "on_delivery": undelivered}
        only_errors = config[ONLY_ERRORS]
        if isinstance(only_errors, str):  # from --kafka-config; confluent-kafka takes only a bool here
            config[ONLY_ERRORS] = only_errors.strip().lower() in ("true", "1")
        return config


class _TopicsPartition(StatelessSinkPartition[tuple[str, Records]]):
    """One worker's producer. In the background one batch at most is being encoded and produced
    at a time: the next batch and close wait for it, and raise what it raised."""

    def __init__(self, producer: Producer, topics: OutputTopics, *, in_background: bool = False) -> None:
        self.producer = producer
        self.topics = topics
        self.sender = WriteBehind("convoflow-kafka" if in_background else None)
        self.flush_each_batch = not in_background

    def write_batch(self, items: list[tuple[str, Records]]) -> None:
        self.sender.run(self._send, items)

    def close(self) -> None:
        self.sender.close()
        self.producer.flush()

    def _send(self, items: list[tuple[str, Records]]) -> None:
        produce = self.producer.produce
        for kind, records in items:
            topic = self.topics.of(kind)
            for key, value in encode_for_kafka(kind, records):
                try:
                    produce(topic, value, key)
                except BufferError:  # librdkafka's queue is full: let it drain, then go on
                    self.producer.flush()
                    produce(topic, value, key)
            self.producer.poll(0)
        if self.flush_each_batch:
            self.producer.flush()


def kafka_output(brokers: str, topics: OutputTopics, config: Mapping[str, Any] | None = None, *,
                 in_background: bool = False) -> FlowOutput:
    """The flow output that writes every kind to its topic on `brokers` (see `KafkaTopicsSink`)."""
    return FlowOutput("kafka", KafkaTopicsSink(brokers, topics, config, in_background=in_background), as_given)
