"""A Kafka topic as the flow's rules stream (see `dataflows.rules_gate` for the join).

The rules topic is state, not traffic: it is always read from its beginning (keep it compacted),
and until that backlog is read the stream promises nothing (`RulesMark(-inf)`), so no message is
judged before the rules it had on start-up are known. Then the stream's clock is the system clock
minus `grace`: a rule may reach the flow up to `grace` seconds after its `timestamp` and still
be applied exactly from then, and a live message waits at most `grace` for rules. A rule that
arrives later, or has no timestamp, takes effect from the clock the stream had promised. A run
that stops at the end of its input (`tail=False`) reads the rules backlog, then ends the rules
stream: the rules it started with hold for the whole run.

Bytewax's `KafkaSource` cannot say when a backlog has been read, so this partition keeps its
own consumer: one partition of the flow reads every partition of the (small) rules topic.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any

from bytewax.inputs import FixedPartitionedSource, StatefulSourcePartition
from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from connectors.run.log import log_rules
from connectors.kafka.source import kafka_ref
from dataflows.errors import ConvoflowError
from dataflows.events import DeadLetter
from dataflows.rules import Rule, parse_rule
from dataflows.rules_gate import RulesMark, arrived

Item = Rule | RulesMark | DeadLetter
Offsets = dict[int, int]
DEFAULT_GRACE_S = 1.0
POLL_S = 0.1


class KafkaRulesSource(FixedPartitionedSource[Item, Offsets]):
    """Reads `topic` (all `partitions`) as rules; its snapshot is the next offset of each partition."""

    def __init__(self, brokers: str, topic: str, partitions: int, *, config: Mapping[str, str] | None = None,
                 grace: float = DEFAULT_GRACE_S, tail: bool = True, wall: Callable[[], float] = time.time) -> None:
        self.brokers = brokers
        self.topic = topic
        self.partitions = partitions
        self.config = dict(config or {})
        self.grace = grace
        self.tail = tail
        self.wall = wall

    def list_parts(self) -> list[str]:
        return [f"rules-{self.topic}"]

    def build_part(self, step_id: str, for_part: str, resume_state: Offsets | None) -> KafkaRulesPartition:
        consumer = Consumer({"group.id": "convoflow-rules", "enable.auto.commit": False, **self.config,
                             "bootstrap.servers": self.brokers})
        offsets = resume_state or {}
        consumer.assign([TopicPartition(self.topic, p, offsets.get(p, OFFSET_BEGINNING)) for p in range(self.partitions)])
        ends = {p: _end_offset(consumer, TopicPartition(self.topic, p)) for p in range(self.partitions)}
        return KafkaRulesPartition(consumer, self.topic, ends, dict(offsets), self.grace, self.wall, tail=self.tail)


def _end_offset(consumer: Any, partition: TopicPartition, timeout_s: float = 15.0) -> int:
    """The partition's end offset; a topic created a moment ago may need a few tries to have a leader."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return int(consumer.get_watermark_offsets(partition, timeout=2)[1])
        except KafkaException as exc:
            if time.monotonic() >= deadline:
                msg = f"cannot read the end of rules topic {partition.topic}/{partition.partition}: {exc}"
                raise ConvoflowError(msg) from None
            time.sleep(0.2)


class KafkaRulesPartition(StatefulSourcePartition[Item, Offsets]):
    def __init__(self, consumer: Any, topic: str, ends: Offsets, offsets: Offsets, grace: float,
                 wall: Callable[[], float], *, tail: bool = True) -> None:
        self.consumer = consumer
        self.topic = topic
        self.behind = {p: end for p, end in ends.items() if offsets.get(p, 0) < end}
        self.offsets = offsets
        self.grace = grace
        self.wall = wall
        self.promised = -math.inf
        self.idle = False
        self.tail = tail
        self.ended = False

    def next_batch(self) -> list[Item]:
        if self.ended:
            raise StopIteration
        batch: list[Item] = []
        messages = self.consumer.consume(1000, 0)
        self.idle = not messages
        for message in messages:
            error = message.error()
            if error is not None and error.code() == KafkaError._PARTITION_EOF:
                continue
            partition, offset = message.partition(), message.offset()
            ref = kafka_ref(self.topic, partition, offset)
            if error is not None:
                batch.append(DeadLetter(ref, "", f"Kafka error: {error}", "rules"))
            else:
                rule = parse_rule(message.value() or b"", ref)
                batch.append(rule if isinstance(rule, DeadLetter) else arrived(rule, self._arrival(rule)))
            self.offsets[partition] = offset + 1
            if self.behind.get(partition, math.inf) <= offset + 1:
                del self.behind[partition]
        log_rules(batch, source=f"Kafka topic {self.topic}")
        if not self.behind:
            if not self.tail:
                # a finite run: the rules it started with hold to its end
                self.ended = True
                return [*batch, RulesMark(math.inf)]
            self.promised = max(self.promised, self.wall() - self.grace)
        batch.append(RulesMark(self.promised))
        return batch

    def next_awake(self) -> datetime | None:
        """Rules are rare: when the last poll found none, look again after `POLL_S` (the stream's tick)."""
        if not self.idle:
            return None
        return datetime.fromtimestamp(self.wall() + POLL_S, timezone.utc)

    def _arrival(self, rule: Rule) -> float | None:
        """After the backlog, a rule cannot take effect before what the stream already promised."""
        return None if math.isinf(self.promised) else self.promised

    def snapshot(self) -> Offsets:
        return dict(self.offsets)

    def close(self) -> None:
        self.consumer.close()
