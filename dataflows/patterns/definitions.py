"""Complex-event patterns as data: the vocabulary, its validation, and loading from YAML, JSON or a dict.

A pattern is a sequence of named steps, each a predicate on one event of a key (a user or a session),
optionally followed by an absence: nothing matching arrives for some seconds. Steps use relaxed
contiguity (Flink CEP's `followedBy`): events that match no step are skipped. A step's `within_seconds`
bounds the gap from the previous step's last event; the pattern's bounds its first to last matched
event. Every pattern must be bounded, so partial matches expire. Definitions are frozen pydantic
models: hashable, picklable, safe to share between workers and to replace from the rules stream.
"""

from __future__ import annotations

import difflib
from functools import lru_cache
import json
import re
import string
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from dataflows.errors import ConvoflowError
from dataflows.events import Event, iso
from dataflows.parse import MESSAGE_TYPES

RoleName = Literal["customer", "rm", "user", "agent", "any"]
ResolvedRole = Literal["customer", "agent", "user"]
KeyKind = Literal["user", "session"]

MESSAGE_KINDS = MESSAGE_TYPES | {"message"}
QUESTION_WORDS = frozenset({
    "what", "why", "how", "when", "where", "who", "whom", "whose", "which", "can", "could", "would", "will",
    "should", "shall", "may", "do", "does", "did", "is", "are", "was", "were", "anyone", "anybody",
    "qué", "cómo", "cuándo", "dónde", "quién", "quiénes", "cuál", "cuáles", "cuánto", "cuántos",
    "pourquoi", "comment", "quand", "où", "quel", "quelle", "quels", "quelles", "combien", "est-ce",
    "warum", "wieso", "weshalb", "wie", "wann", "wo", "wer", "wen", "wem", "welche", "welcher", "welches",
})
THANKS_WORDS = frozenset({
    "thanks", "thank you", "thank u", "thankyou", "thx", "thnx", "cheers", "gracias", "merci", "danke",
    "dankeschön", "vielen dank", "besten dank", "grazie", "obrigado", "obrigada", "bedankt", "dank je",
    "dank u", "tack", "takk", "kiitos", "dziękuję", "dzięki", "teşekkürler", "köszönöm", "arigato",
    "arigatou", "спасибо", "ありがとう", "谢谢", "감사합니다",
})
ResidualTest = Callable[[Event, Sequence[str], bool], bool]
"""What is left of a predicate once an event's kind and role are known, as `test(event, senders, first_of_key)`.

`senders[i]` is the sender of the last event taken by step `i`: the engine keeps senders, not events,
per step, since sender tests are the only ones that look at earlier events.
"""
SUMMARY_FIELDS = frozenset({"pattern", "description", "key", "severity", "count", "first_time", "last_time",
                            "duration", "steps", "senders", "silence"})
_WORD = re.compile(r"[^\W\d_]+(?:['’-][^\W\d_]+)*")


def _phrase(words: str) -> str:
    body = r"\s+".join(map(re.escape, words.split()))
    # Unspaced scripts (CJK, kana, hangul) have no word boundaries to require.
    return body if max(map(ord, words)) >= 0x3000 else rf"(?<!\w){body}(?!\w)"


_THANKS = re.compile("|".join(map(_phrase, sorted(THANKS_WORDS, key=len, reverse=True))), re.IGNORECASE)


@lru_cache(maxsize=4096)
def is_question(text: str) -> bool:
    """Whether `text` ends with a question mark, opens with `¿`, or starts with a word of `QUESTION_WORDS`."""
    text = text.strip()
    first = _WORD.search(text.lower())
    return text.endswith(("?", "？")) or text.startswith("¿") or (first is not None and first[0] in QUESTION_WORDS)


@lru_cache(maxsize=4096)
def is_thanks(text: str) -> bool:
    """Whether `text` contains a word or phrase of `THANKS_WORDS`, in any case."""
    return _THANKS.search(text) is not None


def role_of(event: Event, lookup: Mapping[str, ResolvedRole] | None = None) -> ResolvedRole:
    """The sender's role: conversation `rm` is an agent and `customer` a customer; chat senders are
    users unless `lookup` (sender → role, e.g. permissions from the rules stream) says otherwise."""
    if event.shape == "conversation":
        return "agent" if event.sender == "rm" else "customer"
    return lookup.get(event.sender, "user") if lookup else "user"


def role_is(wanted: RoleName, resolved: ResolvedRole) -> bool:
    """Whether a predicate's role covers a resolved role (`rm` and `agent` are synonyms, `any` covers all)."""
    return wanted == "any" or resolved == ("agent" if wanted == "rm" else wanted)


def iso_of(event: Event) -> str:
    """`iso(event.time)` of a timed event: its `timestamp`, which is exactly that, formatted once."""
    if event.timestamp is not None:
        return event.timestamp
    assert event.time is not None, "only timed events have an ISO time"
    return iso(event.time)


def meets_scope(scope: str, by_user: bool) -> bool:
    """Whether events of `scope` (`sequencing.Scope`: all, session, user) reach a pattern keyed by
    user (`by_user`) or by session."""
    return scope != ("session" if by_user else "user")


def key_of(event: Event, key: KeyKind) -> str:
    """The value a pattern is keyed by: the session, or the user (chat username, else `session/sender`)."""
    return event.session_id if key == "session" else event.username or f"{event.session_id}/{event.sender}"


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


Seconds = Annotated[float, Field(gt=0, allow_inf_nan=False, strict=True)]
Count = Annotated[int, Field(ge=1, strict=True)]
Flag = Annotated[bool, Field(strict=True)]


class Predicate(_Model):
    """A test on one event; every given field must hold (`any_of`: at least one of them; `none_of`: none).

    `message`/`question`/`thanks`/`first_of_key` are tri-state: omitted = don't care, false = must not be.
    `text_regex` is searched anywhere in the text (anchor with `^`/`$`; `(?i)` ignores case).
    `same_sender_as`/`other_sender_than` compare the sender with the event bound to an earlier step.
    """

    kind: tuple[Annotated[str, Field(min_length=1)], ...] | None = None
    role: tuple[RoleName, ...] | None = None
    text_regex: re.Pattern[str] | None = None
    message: Flag | None = None
    question: Flag | None = None
    thanks: Flag | None = None
    first_of_key: Flag | None = None
    same_sender_as: str | None = None
    other_sender_than: str | None = None
    any_of: tuple[Predicate, ...] = ()
    none_of: tuple[Predicate, ...] = ()

    @field_validator("kind", "role", mode="before")
    @classmethod
    def _one_or_many(cls, value: object) -> object:
        if value in ([], ()):
            raise PydanticCustomError("empty", "give one value or a non-empty list")
        return (value,) if isinstance(value, str) else value

    @field_validator("text_regex", mode="before")
    @classmethod
    def _compile(cls, value: object) -> object:
        try:
            return re.compile(value) if isinstance(value, str) else value
        except (re.error, OverflowError, RecursionError) as exc:  # the last two: repeats and nesting too deep
            raise PydanticCustomError("regex", "invalid regular expression '{regex}': {error}",
                                      {"regex": value, "error": str(exc)}) from None

    def matches(self, event: Event, *, roles: Mapping[str, ResolvedRole] | None = None,
                bound: Mapping[str, Event] | None = None, first_of_key: bool = False) -> bool:
        """Whether `event` satisfies this predicate (the engine calls the `compile`d form instead).

        `roles` overrides senders' roles (e.g. permissions from the rules stream); `bound` holds the
        events matched so far, by step name; `first_of_key` says whether this is the key's first event
        (none within the pattern's horizon before it).
        """
        return self.compile()(event, bound, first_of_key, roles)

    def compile(self) -> CompiledPredicate:
        """This predicate as a fast, picklable callable: the form the engine calls per event."""
        return CompiledPredicate(self)

    @property
    def uses_first_of_key(self) -> bool:
        """Whether this predicate, or one nested in it, asks if an event is its key's first."""
        return self.first_of_key is not None or any(p.uses_first_of_key for p in (*self.any_of, *self.none_of))

    def step_refs(self, path: str = "where") -> Iterator[tuple[str, str]]:
        """Yield (field path, step name) for every step this predicate refers to, nested ones included."""
        for name in ("same_sender_as", "other_sender_than"):
            if (ref := getattr(self, name)) is not None:
                yield f"{path}.{name}", ref
        for group in ("any_of", "none_of"):
            for i, p in enumerate(getattr(self, group)):
                yield from p.step_refs(f"{path}.{group}[{i}]")


class CompiledPredicate:
    """A `Predicate` flattened into slots: quick to test on any event, and the source of the
    `ResidualTest` the engine runs per event kind and role."""

    __slots__ = ("kinds", "message", "first_of_key", "roles", "question", "thanks", "regex", "same", "other",
                 "any_of", "none_of")

    def __init__(self, p: Predicate) -> None:
        resolved: tuple[ResolvedRole, ...] = ("customer", "agent", "user")
        self.kinds = frozenset(p.kind) if p.kind is not None else None
        self.message, self.first_of_key, self.question, self.thanks = p.message, p.first_of_key, p.question, p.thanks
        self.roles = None if p.role is None else frozenset(r for r in resolved if any(role_is(w, r) for w in p.role))
        self.regex, self.same, self.other = p.text_regex, p.same_sender_as, p.other_sender_than
        self.any_of = tuple(q.compile() for q in p.any_of)
        self.none_of = tuple(q.compile() for q in p.none_of)

    def __call__(self, event: Event, bound: Mapping[str, Event] | None = None, first_of_key: bool = False,
                 roles: Mapping[str, ResolvedRole] | None = None) -> bool:
        if self.kinds is not None and event.kind not in self.kinds:
            return False
        if self.message is not None and (event.kind in MESSAGE_KINDS) != self.message:
            return False
        if self.first_of_key is not None and first_of_key != self.first_of_key:
            return False
        if self.roles is not None and role_of(event, roles) not in self.roles:
            return False
        if self.question is not None and is_question(event.text) != self.question:
            return False
        if self.thanks is not None and is_thanks(event.text) != self.thanks:
            return False
        if self.regex is not None and self.regex.search(event.text) is None:
            return False
        if self.same is not None:
            same = bound.get(self.same) if bound else None
            if same is None or same.sender != event.sender:
                return False
        if self.other is not None:
            other = bound.get(self.other) if bound else None
            if other is None or other.sender == event.sender:
                return False
        if self.any_of and not any(q(event, bound, first_of_key, roles) for q in self.any_of):
            return False
        return not any(q(event, bound, first_of_key, roles) for q in self.none_of)

    def residual(self, kind: str, role: ResolvedRole, steps: Mapping[str, int]) -> bool | ResidualTest:
        """This predicate for every event of `kind` sent by `role`: True or False if those decide it, else
        the `ResidualTest` of what they leave (text, first-of-key, earlier steps' senders).

        The engine builds this once per kind and role, so its per-event work is only what the event's
        text, key or partial match can change. `steps` numbers the step names that sender tests refer
        to; `role` is the sender's resolved role (`role_of`, with the rules stream's roles for chat senders).
        """
        if self.kinds is not None and kind not in self.kinds:
            return False
        if self.message is not None and (kind in MESSAGE_KINDS) != self.message:
            return False
        if self.roles is not None and role not in self.roles:
            return False
        any_of = [r for q in self.any_of if (r := q.residual(kind, role, steps)) is not False]
        if self.any_of and not any_of:
            return False
        none_of = [r for q in self.none_of if (r := q.residual(kind, role, steps)) is not False]
        if any(r is True for r in none_of):
            return False
        same = None if self.same is None else steps[self.same]
        other = None if self.other is None else steps[self.other]
        some = () if any(r is True for r in any_of) else tuple(r for r in any_of if not isinstance(r, bool))
        none = tuple(r for r in none_of if not isinstance(r, bool))
        tests = (same, other, self.first_of_key, self.question, self.thanks, self.regex)
        if all(t is None for t in tests) and not some and not none:
            return True
        return _residual_test(same, other, self.first_of_key, self.question, self.thanks, self.regex, some, none)

    def __getstate__(self) -> tuple[object, ...]:
        return tuple(getattr(self, name) for name in self.__slots__)

    def __setstate__(self, state: tuple[object, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)


def _residual_test(same: int | None, other: int | None, first_of_key: bool | None, question: bool | None,
                   thanks: bool | None, regex: re.Pattern[str] | None, any_of: tuple[ResidualTest, ...],
                   none_of: tuple[ResidualTest, ...]) -> ResidualTest:
    """The tests a predicate leaves for one kind and role, as a closure (far cheaper to call than an
    object's `__call__`); cheap tests first."""

    def test(event: Event, senders: Sequence[str], first: bool) -> bool:
        if same is not None and senders[same] != event.sender:
            return False
        if other is not None and senders[other] == event.sender:
            return False
        if first_of_key is not None and first != first_of_key:
            return False
        if question is not None and is_question(event.text) != question:
            return False
        if thanks is not None and is_thanks(event.text) != thanks:
            return False
        if regex is not None and regex.search(event.text) is None:
            return False
        if any_of:
            for alternative in any_of:
                if alternative(event, senders, first):
                    break
            else:
                return False
        for excluded in none_of:
            if excluded(event, senders, first):
                return False
        return True

    return test


class Step(_Model):
    """One named step: `where` must match `times` events (default 1), or at least `times_or_more`."""

    name: str = Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]*$")
    where: Predicate
    times: Count | None = None
    times_or_more: Count | None = None
    within_seconds: Seconds | None = None

    @field_validator("times_or_more")
    @classmethod
    def _one_quantifier(cls, value: int | None, info: ValidationInfo) -> int | None:
        if value is not None and info.data.get("times") is not None:
            raise PydanticCustomError("quantifier", "give either times or times_or_more, not both")
        return value

    @property
    def min_count(self) -> int:
        """The fewest events that complete this step."""
        return self.times_or_more or self.times or 1

    @property
    def max_count(self) -> int | None:
        """The most events this step takes; None when open-ended (`times_or_more`)."""
        return None if self.times_or_more is not None else self.times or 1


class Absence(_Model):
    """Completes the pattern when nothing matching `not_followed_by` arrives within `seconds` of the last step."""

    not_followed_by: Predicate
    seconds: Seconds


class PatternDef(_Model):
    """One pattern: its steps, time bounds, optional trailing absence, and how its alerts look.

    `emit`: `every_match` alerts on each completed match, and matching resumes after its last event;
    `once_per_burst` also mutes the key until `within_seconds` pass with no event matching the first step.
    """

    id: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    key: KeyKind
    severity: Literal["info", "warning", "critical"] = "info"
    steps: tuple[Step, ...]
    absence: Absence | None = None
    emit: Literal["every_match", "once_per_burst"] = "every_match"
    within_seconds: Seconds | None = Field(default=None, validate_default=True)
    summary: str = "{pattern} for {key}: {count} events from {first_time} to {last_time}"
    enabled: Flag = True

    @field_validator("steps")
    @classmethod
    def _steps_consistent(cls, steps: tuple[Step, ...]) -> tuple[Step, ...]:
        if not steps:
            raise PydanticCustomError("step", "a pattern needs at least one step")
        if steps[0].within_seconds is not None:
            raise PydanticCustomError("step", "step '{name}' within_seconds: the first step has no previous step; "
                                      "use the pattern's within_seconds", {"name": steps[0].name})
        seen: list[str] = []
        for step in steps:
            if step.name in seen:
                raise PydanticCustomError("step", "duplicate step name '{name}'", {"name": step.name})
            for path, ref in step.where.step_refs():
                if ref not in seen:
                    raise PydanticCustomError("step", "step '{name}' {path}: '{ref}' is not an earlier step "
                                              "(earlier: {seen})", {"name": step.name, "path": path, "ref": ref,
                                                                    "seen": ", ".join(seen) or "none"})
            seen.append(step.name)
        return steps

    @field_validator("absence")
    @classmethod
    def _absence_refs(cls, absence: Absence | None, info: ValidationInfo) -> Absence | None:
        names = [s.name for s in info.data.get("steps", ())]
        if absence is None or not names:
            return absence
        for path, ref in absence.not_followed_by.step_refs("not_followed_by"):
            if ref not in names:
                raise PydanticCustomError("step", "{path}: '{ref}' is not a step (steps: {names})",
                                          {"path": path, "ref": ref, "names": ", ".join(names)})
        return absence

    @field_validator("within_seconds")
    @classmethod
    def _bounded(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value is None and info.data.get("emit") == "once_per_burst":
            raise PydanticCustomError("unbounded", "required by emit: once_per_burst (the quiet gap that ends a burst)")
        if value is None and "steps" in info.data and _span(info.data["steps"], None) is None:
            raise PydanticCustomError("unbounded", "required here: without it partial matches never expire "
                                      "(or give within_seconds on every step after the first, each taking one event)")
        return value

    @field_validator("summary")
    @classmethod
    def _template(cls, value: str) -> str:
        try:
            names = [f for _, f, _, _ in string.Formatter().parse(value) if f is not None]
            unknown = sorted({n for n in (re.split(r"[.\[]", f)[0] for f in names) if n not in SUMMARY_FIELDS})
            if not unknown:
                value.format(**_summary_fields("p", "d", "k", "info", (0.0,), "s", "u", 0.0))
        except (ValueError, KeyError, IndexError, AttributeError, TypeError) as exc:
            raise PydanticCustomError("summary", "not a usable template: {error}", {"error": str(exc)}) from None
        if unknown:
            raise PydanticCustomError("summary", "unknown field(s) {unknown}; known: {known}", {
                "unknown": ", ".join(f"{{{n}}}" for n in unknown), "known": ", ".join(sorted(SUMMARY_FIELDS))})
        return value

    @property
    def uses_first_of_key(self) -> bool:
        """Whether matching needs to know a key's first event (so every key seen must be remembered)."""
        return any(step.where.uses_first_of_key for step in self.steps)

    @property
    def max_horizon_seconds(self) -> float:
        """The longest a partial match may live: its span plus the trailing absence (for bounding state)."""
        return (_span(self.steps, self.within_seconds) or 0.0) + (self.absence.seconds if self.absence else 0.0)

    def summarize(self, key: str, events: Sequence[Event]) -> str:
        """The alert's human-readable summary for a match of `events` (in time order) under `key`."""
        return Summarizer(self)(key, events)


def _span(steps: Sequence[Step], within: float | None) -> float | None:
    """The longest time from a match's first to its last step event; None if nothing bounds it."""
    if within is not None:
        return within
    bounded = all(s.max_count == 1 for s in steps) and all(s.within_seconds is not None for s in steps[1:])
    return sum(s.within_seconds or 0.0 for s in steps[1:]) if bounded else None


class Summarizer:
    """`PatternDef.summarize` with the pattern's own fields worked out once (the engine keeps one per pattern).

    Of the fields that depend on the match, only those the template names are computed; times are
    the events' own `timestamp`s (see `iso_of`).
    """

    __slots__ = ("template", "constants", "used")

    def __init__(self, pattern: PatternDef) -> None:
        self.template = pattern.summary
        self.used = _template_fields(pattern.summary)
        self.constants = _summary_fields(
            pattern.id, pattern.description, "", pattern.severity, (), ", ".join(s.name for s in pattern.steps), "",
            pattern.absence.seconds if pattern.absence else 0.0)

    def __call__(self, key: str, events: Sequence[Event]) -> str:
        fields = {**self.constants, "key": key, "count": len(events)}
        used = self.used
        if "first_time" in used or "last_time" in used or "duration" in used:
            timed = [(e.time, e) for e in events if e.time is not None]
            if timed:
                (start, first), (end, last) = timed[0], timed[-1]
                fields["first_time"] = iso_of(first)
                fields["last_time"] = iso_of(last)
                fields["duration"] = end - start
        if "senders" in used:
            fields["senders"] = ", ".join(dict.fromkeys(e.sender for e in events))
        return self.template.format(**fields)


def _template_fields(template: str) -> frozenset[str]:
    """The summary fields `template` names, those nested in a format spec (`{duration:.{count}f}`) included."""
    names: set[str] = set()
    for _, name, spec, _ in string.Formatter().parse(template):
        if name is not None:
            names.add(re.split(r"[.\[]", name)[0])
        if spec:
            names |= _template_fields(spec)
    return frozenset(names)


def _summary_fields(pattern: str, description: str, key: str, severity: str, times: Sequence[float], steps: str,
                    senders: str, silence: float, count: int = 1) -> dict[str, Any]:
    return {"pattern": pattern, "description": description, "key": key, "severity": severity, "count": count,
            "first_time": iso(times[0]) if times else "?", "last_time": iso(times[-1]) if times else "?",
            "duration": times[-1] - times[0] if times else 0.0, "steps": steps, "senders": senders, "silence": silence}


class PatternError(ConvoflowError, ValueError):
    """A pattern definition that cannot be used: one line per problem, naming source, pattern and field."""


def pattern_from_dict(data: Mapping[str, Any], *, source: str = "rules stream", index: int | None = None) -> PatternDef:
    """Validate one definition (e.g. from the rules stream); raise `PatternError` naming what is wrong."""
    named = isinstance(data, Mapping) and isinstance(data.get("id"), str)
    label = f"pattern '{data['id']}'" if named else "pattern" if index is None else f"pattern #{index}"
    if not isinstance(data, Mapping):
        msg = f"{source}: {label}: expected a mapping of fields, got {type(data).__name__}"
        raise PatternError(msg)
    try:
        return PatternDef.model_validate(dict(data))
    except ValidationError as exc:
        raise PatternError("\n".join(f"{source}: {label}: {p}" for p in _problems(exc))) from None


def patterns_from_text(text: str, fmt: Literal["json", "yaml"], source: str) -> tuple[PatternDef, ...]:
    """Every pattern, enabled or not, in a JSON or YAML document: a list, or one under `patterns:`.

    `source` names the document in error messages (a file path, say).
    """
    try:
        data = json.loads(text) if fmt == "json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        msg = f"{source}: not valid {'JSON' if fmt == 'json' else 'YAML'}: {' '.join(str(exc).split())}"
        raise PatternError(msg) from None
    items = data.get("patterns") if isinstance(data, dict) and set(data) == {"patterns"} else data
    if not isinstance(items, list) or not items:
        msg = f"{source}: expected a non-empty list of patterns (top level, or under a 'patterns' key)"
        raise PatternError(msg)
    problems: list[str] = []
    patterns: dict[str, tuple[int, PatternDef]] = {}
    for i, item in enumerate(items):
        try:
            pattern = pattern_from_dict(item, source=source, index=i)
        except PatternError as exc:
            problems.append(str(exc))
            continue
        if pattern.id in patterns:
            problems.append(f"{source}: pattern '{pattern.id}': id: duplicate (also pattern #{patterns[pattern.id][0]})")
        patterns.setdefault(pattern.id, (i, pattern))
    if problems:
        raise PatternError("\n".join(problems))
    return tuple(p for _, p in patterns.values())


_KNOWN_FIELDS = sorted({f for model in (Predicate, Step, Absence, PatternDef) for f in model.model_fields})


def _problems(exc: ValidationError) -> list[str]:
    """One readable line per pydantic error: `field.path: problem (got value)`."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in err["loc"]).lstrip(".") or "definition"
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(err["loc"][-1]), _KNOWN_FIELDS, n=1)
            lines.append(f"{loc}: unknown field" + (f" (did you mean '{near[0]}'?)" if near else ""))
        elif err["type"] != "missing" and isinstance(err["input"], (str, int, float)):
            lines.append(f"{loc}: {err['msg']} (got {err['input']!r})")
        else:
            lines.append(f"{loc}: {err['msg']}")
    return lines
