"""A Bytewax sink with one partition per output kind (messages, windows, late, ...)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

from bytewax.outputs import FixedPartitionedSink

from dataflows.errors import ConvoflowError

X = TypeVar("X")
S = TypeVar("S")


class KindPartitionedSink(FixedPartitionedSink[X, S], Generic[X, S]):
    """Routes `(kind, payload)` to the partition named `kind`; subclasses build the partitions.

    Bytewax picks a partition by indexing `part_fn`'s value into the *sorted* partition names.
    """

    output = "sink"

    def __init__(self, kinds: Sequence[str]) -> None:
        self.kinds = list(kinds)

    def list_parts(self) -> list[str]:
        return self.kinds

    def part_fn(self, item_key: str) -> int:
        try:
            return sorted(self.kinds).index(item_key)
        except ValueError:
            msg = f"no {self.output} output for records of kind {item_key!r}; known kinds: {self.kinds}"
            raise ConvoflowError(msg) from None
