"""A predicate as a column: which rows of a frame of events fit it, less its tests of earlier steps' senders.

The column-wise matchers (`bursts`, `pairs`) decide a step for a whole frame at once. An event's class
(kind, shape, resolved role, scope) decides every static test of a predicate; what is left for some
classes (question, thanks, a regex) depends on the text alone, so its verdict per text is kept (a
bounded cache per class: chat repeats its texts) across frames. Sender tests (`same_sender_as`,
`other_sender_than`) compare with an earlier step's event: the matcher applies them itself (`SenderTest`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Literal, TypeAlias

import numpy as np
import polars as pl

from dataflows.event_frame import EVENT_SCHEMA
from dataflows.events import Event
from dataflows.patterns.definitions import CompiledPredicate, Predicate, ResidualTest, meets_scope

SenderTest: TypeAlias = "tuple[Literal['same', 'other'], int] | None"
"""A predicate's test of the sender against the sender of step `i`'s event: equal, different, or none."""
KEY_COLUMN = {False: "session_id", True: "user_key"}
"""The released rows' column of a pattern's key, by whether it is keyed by user."""
TEXT_VERDICTS = 4096
"""How many texts' verdicts a predicate column keeps per class of event: with every text new (live chat) the
caches of a process hold predicates x classes x shards x this many texts."""


@dataclass
class Released:
    """Rows the book releases to its matchers (`engine.BUFFER_SCHEMA`, in release order), with each
    row's class of event: `class_of` indexes `classes`, the distinct classes (kind, shape, role, scope).

    Frames here are often small (a paced input, many shards), where a Polars call costs more than
    Python over the rows: so the classes are numbered in Python, and the matchers share the columns
    they read as Python lists (`values`)."""

    rows: pl.DataFrame
    classes: list[str]
    class_of: np.ndarray
    _values: dict[str, list[Any]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, rows: pl.DataFrame) -> Released:
        numbers: dict[str, int] = {}
        class_of = np.fromiter((numbers.setdefault(name, len(numbers)) for name in rows["class"].to_list()),
                               dtype=np.int64, count=len(rows))
        return cls(rows, list(numbers), class_of)

    def values(self, name: str) -> list[Any]:
        """Column `name` as a Python list, made once for all matchers."""
        found = self._values.get(name)
        if found is None:
            found = self._values[name] = self.rows[name].to_list()
        return found


def sender_test(predicate: Predicate, refs: dict[str, int]) -> SenderTest:
    """The one sender test `predicate` makes at its top level (None if none). Column-wise matchers
    take only predicates with at most one, and none nested (`is_flat`)."""
    if predicate.same_sender_as is not None:
        return ("same", refs[predicate.same_sender_as])
    if predicate.other_sender_than is not None:
        return ("other", refs[predicate.other_sender_than])
    return None


def is_flat(predicate: Predicate) -> bool:
    """Whether `predicate` tests at most one earlier sender, at its top level, and never a key's first event."""
    nested = any(next(p.step_refs(), None) is not None for p in (*predicate.any_of, *predicate.none_of))
    both = predicate.same_sender_as is not None and predicate.other_sender_than is not None
    return not (nested or both or predicate.uses_first_of_key)


class PredicateColumn:
    """One predicate without its sender test, decided for the rows of a frame (`engine.BUFFER_SCHEMA`)."""

    def __init__(self, predicate: Predicate, by_user: bool, refs: dict[str, int]) -> None:
        self.compiled: CompiledPredicate = predicate.model_copy(
            update={"same_sender_as": None, "other_sender_than": None}).compile()
        self.by_user = by_user
        self.refs = refs
        self._tests: dict[str, bool | Callable[[str], bool]] = {}

    def __getstate__(self) -> dict[str, object]:
        # The per-class tests are a cache of closures: rebuilt on demand.
        return {**self.__dict__, "_tests": {}}

    def fits(self, released: Released) -> np.ndarray:
        """Which of the released rows fit."""
        class_of = released.class_of
        tests = [self._test(name, released, index) for index, name in enumerate(released.classes)]
        fits = np.array([test is True for test in tests], dtype=bool)[class_of]
        for index, test in enumerate(tests):
            if callable(test):
                rows = np.flatnonzero(class_of == index)
                texts = released.values("text")
                fits[rows] = np.fromiter(map(test, map(texts.__getitem__, rows.tolist())), dtype=np.bool_,
                                         count=len(rows))
        return fits

    def _test(self, name: str, released: Released, index: int) -> bool | Callable[[str], bool]:
        """The predicate for class `name` (the `index`th of `released`): decided, or a cached test of a
        text (the class's static tests are decided, so what is left reads the text alone; any event of
        the class stands in for the rest)."""
        found = self._tests.get(name)
        if found is None:
            kind, _, role, scope = name.split("\x00")
            residual = meets_scope(scope, self.by_user) and self.compiled.residual(
                kind, role, self.refs)  # type: ignore[arg-type]
            like = released.rows.select(EVENT_SCHEMA.names()).row(int(np.argmax(released.class_of == index)))
            found = residual if isinstance(residual, bool) else _text_test(residual, Event._make(like))
            self._tests[name] = found
        return found


def _text_test(residual: ResidualTest, like: Event) -> Callable[[str], bool]:
    @lru_cache(maxsize=TEXT_VERDICTS)
    def test(text: str) -> bool:
        return residual(like._replace(text=text), (), False)
    return test
