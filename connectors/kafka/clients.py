"""Kafka plumbing around confluent-kafka: client settings, broker checks, topics, file replay.

`produce_file` replays a JSONL file into a topic with the file's own pacing, the way
`connectors.files.replay` replays it into a flow: every line is sent as it is (a line that is not
JSON too, so the pipeline's dead-letter path sees it), keyed by its session so one session's
events stay in one partition and in order.
Admin calls are bounded by a timeout (a delivery by librdkafka's `message.timeout.ms`) and
fail as a `ConvoflowError` naming the brokers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any, Protocol

import orjson
from confluent_kafka import KafkaError, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from connectors.files.replay import check_readable
from dataflows.clock import ReplayClock
from dataflows.errors import ConvoflowError
from dataflows.timestamps import TimestampError, parse_timestamp

# The pipeline's session of a line (`dataflows.parse`): a chat event's room first, then its session_id,
# then its username; a conversation's session_id. Keying by it keeps a session on one partition.
SESSION_KEY_FIELDS = ("room", "session_id", "username")
SECRET_MARKERS = ("password", "secret", "sasl.jaas", "ssl.key")
REDACTED = "***"
# Longest single sleep while pacing: delivery reports are served between slices.
_MAX_SLEEP_S = 1.0
_LOG = logging.getLogger("convoflow.kafka")

DeliveryCallback = Callable[[KafkaError | None, Any], None]


class ProducerLike(Protocol):
    """The part of `confluent_kafka.Producer` that `produce_file` uses."""

    def produce(self, topic: str, value: bytes, key: bytes | None = None,
                on_delivery: DeliveryCallback | None = None) -> None: ...

    def poll(self, timeout: float = ...) -> int: ...

    def flush(self, timeout: float = ...) -> int: ...


ProducerFactory = Callable[[dict[str, Any]], ProducerLike]


def parse_kafka_options(pairs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """Read `--kafka-config key=value` options into librdkafka settings.

    Raises:
        ConvoflowError: for an option without `=` or with an empty key.
    """
    settings: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            msg = f"--kafka-config {pair!r} is not key=value"
            raise ConvoflowError(msg)
        settings[key.strip()] = value
    return settings


def read_kafka_config_file(path: Path) -> dict[str, str]:
    """librdkafka settings from a properties file: `key=value` lines, `#` comments, blank lines.

    The format of Kafka's own client `.properties` files, so an existing one can be reused.

    Raises:
        ConvoflowError: naming the file and line of a setting that is not key=value.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        msg = f"cannot read Kafka config file {path}: {exc}"
        raise ConvoflowError(msg) from None
    settings: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith(("#", "!")):
            continue
        key, sep, value = line.partition("=")
        if not sep or not key.strip():
            msg = f"{path}:{number}: expected key=value, got {line!r}"
            raise ConvoflowError(msg)
        settings[key.strip()] = value.strip()
    return settings


def kafka_config(brokers: str, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """librdkafka settings for `brokers` plus `extra` (from `--kafka-config key=value`).

    Raises:
        ConvoflowError: when `brokers` is empty or `extra` sets `bootstrap.servers` too.
    """
    if not brokers.strip():
        msg = "no Kafka brokers given (expected host:port[,host:port...])"
        raise ConvoflowError(msg)
    extra = dict(extra or {})
    if "bootstrap.servers" in extra:
        msg = f"--kafka-config bootstrap.servers={extra['bootstrap.servers']} conflicts with the brokers {brokers}"
        raise ConvoflowError(msg)
    return {"bootstrap.servers": brokers, **extra}


def redact(config: Mapping[str, Any]) -> dict[str, Any]:
    """`config` fit for printing: values of password, secret, JAAS and SSL key settings masked."""
    return {k: REDACTED if any(m in k.lower() for m in SECRET_MARKERS) else v for k, v in config.items()}


def check_reachable(brokers: str, extra: Mapping[str, str] | None = None, timeout_s: float = 5.0) -> None:
    """Return once a broker of `brokers` answers a metadata request; give up after `timeout_s`.

    Raises:
        ConvoflowError: naming the brokers and the last connection error.
    """
    admin, errors = _admin(brokers, extra)
    _metadata(admin, errors, brokers, timeout_s)


def ensure_topics(
    brokers: str, extra: Mapping[str, str] | None, topics: Mapping[str, int], *, timeout_s: float = 10.0
) -> list[str]:
    """Create those of `topics` (name -> partition count) that do not exist yet; return their names.

    Existing topics are left as they are, whatever their partition count; a topic created
    concurrently by someone else counts as existing. Replication follows the broker's default.

    Raises:
        ConvoflowError: when the brokers do not answer or a topic cannot be created.
    """
    for name, partitions in topics.items():
        if partitions < 1:
            msg = f"topic {name!r} needs at least one partition, got {partitions}"
            raise ConvoflowError(msg)
    admin, errors = _admin(brokers, extra)
    existing = _metadata(admin, errors, brokers, timeout_s).topics
    missing = [NewTopic(name, num_partitions=n) for name, n in topics.items() if name not in existing]
    if not missing:
        return []
    futures = admin.create_topics(missing, operation_timeout=timeout_s, request_timeout=timeout_s)
    created: list[str] = []
    for name, future in futures.items():
        try:
            future.result(timeout=timeout_s + 1)
        except KafkaException as exc:
            err = exc.args[0]
            if isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                continue
            msg = f"could not create Kafka topic {name!r} on {brokers}: {_describe(exc)}"
            raise ConvoflowError(msg) from None
        except TimeoutError:
            msg = f"creating Kafka topic {name!r} on {brokers} took longer than {timeout_s:g}s"
            raise ConvoflowError(msg) from None
        created.append(name)
    return created


def partition_counts(
    brokers: str, extra: Mapping[str, str] | None, topics: Iterable[str], *, timeout_s: float = 10.0
) -> dict[str, int | None]:
    """The partition count of each of `topics`, None for a topic that does not exist.

    Raises:
        ConvoflowError: when the brokers do not answer.
    """
    admin, errors = _admin(brokers, extra)
    existing = _metadata(admin, errors, brokers, timeout_s).topics
    return {name: len(existing[name].partitions) if name in existing else None for name in topics}


def produce_file(
    path: Path,
    brokers: str,
    topic: str,
    *,
    extra: Mapping[str, str] | None = None,
    speed_factor: float,
    key_fields: tuple[str, ...] = SESSION_KEY_FIELDS,
    clock: Callable[[], float] = time.time,
    sleep: Callable[[float], None] = time.sleep,
    producer_factory: ProducerFactory | None = None,
) -> int:
    """Replay the JSONL file `path` into `topic`, paced by its own timestamps; return the count sent.

    Each non-blank line is one message, its bytes unchanged (invalid JSON included). The first
    timed line is sent at once; a later line waits until its timestamp's distance from that
    first one, divided by `speed_factor`, has passed (0 = no waiting). Lines with no readable
    `timestamp`, and lines earlier than the pace already reached, are sent without waiting.
    The key is the first of `key_fields` the line has (by default the pipeline's session), else none.

    Raises:
        ConvoflowError: for an unreadable file, a negative speed factor, bad settings, or a
            message the brokers did not take (naming the topic, line and error).
    """
    check_readable(path)
    if not speed_factor >= 0:
        msg = f"speed factor must be >= 0, got {speed_factor}"
        raise ConvoflowError(msg)
    producer = _client(producer_factory or Producer, kafka_config(brokers, extra), brokers)
    failures: list[str] = []

    def check() -> None:
        producer.poll(0)
        if failures:
            msg = f"Kafka delivery to topic {topic!r} on {brokers} failed: {failures[0]}"
            raise ConvoflowError(msg)

    pace: ReplayClock | None = None
    count = 0
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            line = raw.rstrip(b"\n").rstrip(b"\r")
            if not line.strip():
                continue
            key, event_time = _key_and_time(line, key_fields)
            if event_time is not None:
                if pace is None:
                    pace = ReplayClock(event_origin=event_time, wall_origin=clock(), speed=speed_factor)
                while (delay := pace.wall_time_for(event_time) - clock()) > 0:
                    check()
                    sleep(min(delay, _MAX_SLEEP_S))
            _produce(producer, topic, line, key, _on_delivery(failures, f"{path.name} line {number}"), check)
            count += 1
            check()
    remaining = producer.flush()
    check()
    if remaining:
        msg = f"{remaining} messages to Kafka topic {topic!r} on {brokers} were not delivered"
        raise ConvoflowError(msg)
    return count


def _key_and_time(line: bytes, key_fields: tuple[str, ...]) -> tuple[bytes | None, float | None]:
    """The message key and event time of one line; (None, None) when it is not a JSON object."""
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError:
        return None, None
    if not isinstance(obj, dict):
        return None, None
    key = next((str(v) for f in key_fields if _usable_key(v := obj.get(f))), None)
    try:
        event_time = None if obj.get("timestamp") is None else parse_timestamp(obj["timestamp"])
    except TimestampError:
        event_time = None
    return (None if key is None else key.encode()), event_time


def _usable_key(value: object) -> bool:
    """A key field's value worth keying by: a non-empty string or a number (never a list or object,
    which the flow dead-letters anyway and whose text may be huge or too deep to print)."""
    if isinstance(value, str):
        return value != ""
    return isinstance(value, int | float) and not isinstance(value, bool)


def _on_delivery(failures: list[str], where: str) -> DeliveryCallback:
    def delivered(err: KafkaError | None, _msg: Any) -> None:
        if err is not None:
            failures.append(f"{where}: {err.str()}")

    return delivered


def _produce(producer: ProducerLike, topic: str, value: bytes, key: bytes | None,
             on_delivery: DeliveryCallback, check: Callable[[], None]) -> None:
    """Hand one message to the producer, waiting for room when its local queue is full."""
    while True:
        try:
            producer.produce(topic, value=value, key=key, on_delivery=on_delivery)
            return
        except BufferError:
            producer.poll(0.5)
            check()
        except KafkaException as exc:
            msg = f"Kafka topic {topic!r} refused a message: {_describe(exc)}"
            raise ConvoflowError(msg) from None


def _client(factory: Callable[[dict[str, Any]], Any], config: dict[str, str], brokers: str) -> Any:
    """A confluent-kafka client whose librdkafka logs go to the `convoflow.kafka` logger."""
    try:
        return factory({"logger": _LOG, **config})
    except (KafkaException, ValueError, TypeError) as exc:
        shown = {k: v for k, v in redact(config).items() if isinstance(v, str)}
        msg = f"invalid Kafka settings for {brokers} {shown}: {_describe(exc)}"
        raise ConvoflowError(msg) from None


def _admin(brokers: str, extra: Mapping[str, str] | None) -> tuple[AdminClient, list[KafkaError]]:
    """An admin client that keeps its connection errors for the message if the brokers never answer.

    Its own error logs are off unless `extra` sets `log_level`: a failure is reported once, as
    the `ConvoflowError`, not as a stream of reconnect attempts.
    """
    errors: list[KafkaError] = []
    config: dict[str, Any] = {"log_level": "2", **kafka_config(brokers, extra), "error_cb": errors.append}
    return _client(AdminClient, config, brokers), errors


def _metadata(admin: AdminClient, errors: list[KafkaError], brokers: str, timeout_s: float) -> Any:
    try:
        return admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        admin.poll(0)  # serves the error callbacks that say why
        causes = [e for e in errors if e.code() != KafkaError._ALL_BROKERS_DOWN] or errors
        cause = causes[-1].str() if causes else _describe(exc)
        msg = f"Kafka brokers {brokers} did not answer within {timeout_s:g}s: {cause}"
        raise ConvoflowError(msg) from None


def _describe(exc: BaseException) -> str:
    err = exc.args[0] if exc.args else None
    return err.str() if isinstance(err, KafkaError) else str(exc)
