"""The rules stream: versioned, scoped moderation rules, and what is in effect at any event time.

Each line of the stream is one version of one rule id:
`{"id", "kind", "version", "effective_from", "scope", "enabled", "deleted", "body"}`. Kinds:
`blocked_words` (`words`, `action`), `feature_flag` (`flag`, `enabled`), `language_model`
(`language`, `model`), `user_permission` (`user`, `role`) and `pattern` (a pattern definition).

A message at event time t is judged by, for each id, the highest version received whose
`effective_from` is at or before t; when that version is disabled or a tombstone the id is not in
effect. A version not higher than one already received for its id is ignored as stale. Scopes
are `global`, a tenant or a room (a session id): feature flags, roles and language models take
the most specific scope (room, then tenant, then global); blocked words all apply and the
strictest action wins. Within one scope, the rule with the later `effective_from` (then the
greater id) wins.

`RuleBook` keeps every version received; what a set of versions in effect compiles to (one
`BlockList` per scope, flags, roles, models, and the verdicts on recent texts) is cached per
process and shared by every book with that set (every shard holds one), so judging a message
costs a bounds check, a dict lookup or two and, for a text not seen lately, the block list's own
word test until event time crosses the next `effective_from` or a rule arrives.
"""

from __future__ import annotations

import difflib
import functools
import math
import pickle
from bisect import bisect_right
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Final, Literal, NamedTuple, get_args

import orjson
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from dataflows.blocklist import Action, BlockedTerm, BlockList, Match, mask, remember, strictest
from dataflows.errors import ConvoflowError
from dataflows.events import DeadLetter, LineRef, iso
from dataflows.parse import dead_letter, json_type, read_json
from dataflows.patterns.definitions import PatternDef, PatternError, ResolvedRole, pattern_from_dict
from dataflows.timestamps import TimestampError, parse_timestamp

Kind = Literal["blocked_words", "feature_flag", "language_model", "user_permission", "pattern"]
KINDS: Final = get_args(Kind)
ScopeKind = Literal["global", "tenant", "room"]
Scope = tuple[ScopeKind, str | None]
GLOBAL: Final[Scope] = ("global", None)
Role = Literal["customer", "rm", "muted"]
Verdict = Literal["allow", "flag", "mask", "block"]
STEP: Final = "rules"
# Compiled views of distinct sets of rules in effect, and block lists of distinct sets of
# blocked_words versions, kept per process: events straddling a few effective_from boundaries,
# changes to other rules or other scopes, and every shard's book with the same rules reuse them.
COMPILED_VIEWS: Final = 64
COMPILED_LISTS: Final = 64

PATTERN_ROLES: Final[dict[str, ResolvedRole]] = {"rm": "agent", "customer": "customer"}

_Text = Annotated[str, Field(strict=True, min_length=1)]
_Flag = Annotated[bool, Field(strict=True)]


class RuleError(ConvoflowError, ValueError):
    """A rule that cannot be used; the reason names the rule id (when readable), the field and the problem."""


class _Body(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class BlockedWords(_Body):
    """Words and phrases to find in messages (see `dataflows.blocklist`), and what a match does."""

    words: tuple[_Text, ...] = Field(min_length=1)
    action: Action


class FeatureFlag(_Body):
    """A feature (e.g. `translation`, `pattern:spam_burst`) switched on or off."""

    flag: _Text
    enabled: _Flag


class LanguageModel(_Body):
    """The model to use for one language; the code is compared case-insensitively."""

    language: _Text
    model: _Text

    @field_validator("language")
    @classmethod
    def _folded(cls, value: str) -> str:
        return value.strip().casefold()


class UserPermission(_Body):
    """A user's role: `rm` is an agent, `muted` has every message blocked."""

    user: _Text
    role: Role


Body = BlockedWords | FeatureFlag | LanguageModel | UserPermission | PatternDef
_BODIES: Final[dict[str, type[BlockedWords | FeatureFlag | LanguageModel | UserPermission]]] = {
    "blocked_words": BlockedWords,
    "feature_flag": FeatureFlag,
    "language_model": LanguageModel,
    "user_permission": UserPermission,
}


@dataclass(frozen=True, slots=True)
class Rule:
    """One version of one rule. `effective_from` None is the beginning of time.

    `body` is None only for a rule that takes nothing into effect (a tombstone or a disabled rule
    given without one).
    """

    id: str
    kind: Kind
    version: int
    effective_from: float | None
    scope: Scope
    enabled: bool = True
    deleted: bool = False
    body: Body | None = None

    @property
    def active(self) -> bool:
        """Whether this version puts its id in effect (rather than taking it out)."""
        return self.enabled and not self.deleted

    def as_record(self) -> dict[str, Any]:
        """This rule as JSON-ready data, in the stream's own format (`rule_from_dict` reads it back)."""
        kind, value = self.scope
        return {
            "id": self.id,
            "kind": self.kind,
            "version": self.version,
            "effective_from": None if self.effective_from is None else iso(self.effective_from),
            "scope": kind if value is None else {kind: value},
            "enabled": self.enabled,
            "deleted": self.deleted,
            "body": None if self.body is None else self.body.model_dump(mode="json", exclude_defaults=True),
        }


class _RuleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    id: _Text
    kind: Kind
    version: Annotated[int, Field(strict=True, ge=0)]
    effective_from: float | None = None
    timestamp: float | None = None
    scope: Scope | None = None
    enabled: _Flag = True
    deleted: _Flag = False
    body: Any = None

    @field_validator("kind", mode="before")
    @classmethod
    def _known_kind(cls, value: object) -> object:
        if isinstance(value, str) and value not in KINDS:
            raise PydanticCustomError("kind", "unknown kind '{kind}' (known: {known})",
                                      {"kind": value, "known": ", ".join(KINDS)})
        return value

    @field_validator("effective_from", "timestamp", mode="before")
    @classmethod
    def _time(cls, value: object) -> float | None:
        try:
            return None if value is None else parse_timestamp(value)
        except TimestampError as exc:
            raise PydanticCustomError("timestamp", "{error}", {"error": str(exc)}) from None

    @field_validator("scope", mode="before")
    @classmethod
    def _scope(cls, value: object) -> object:
        if value is None or value == "global":
            return None if value is None else GLOBAL
        if isinstance(value, Mapping) and len(value) == 1:
            ((kind, name),) = value.items()
            if kind in ("tenant", "room") and isinstance(name, str) and name:
                return (kind, name)
        raise PydanticCustomError("scope", 'expected "global", {"tenant": NAME} or {"room": SESSION_ID} (got {value})',
                                  {"value": _show(value)})


_RULE_FIELDS: Final = sorted(_RuleIn.model_fields)


def rule_from_dict(data: Mapping[str, Any]) -> Rule:
    """Validate one rule of the stream.

    Raises:
        RuleError: every problem found, each as `rule 'ID' vN: field 'path': problem`.
    """
    if not isinstance(data, Mapping):
        msg = f"rule: expected a JSON object, got {json_type(data)}"
        raise RuleError(msg)
    label = _label(data)
    try:
        head = _RuleIn.model_validate(dict(data))
    except ValidationError as exc:
        raise RuleError(f"{label}: " + "; ".join(_problems(exc))) from None
    active = head.enabled and not head.deleted
    problems: list[str] = []
    if head.scope is None and active:
        problems.append("field 'scope': required (\"global\", {\"tenant\": NAME} or {\"room\": SESSION_ID})")
    if head.kind == "pattern" and head.scope not in (None, GLOBAL):
        problems.append(f"field 'scope': pattern rules are global (got {_show(data.get('scope'))}); "
                        "switch one per tenant or room with a feature flag 'pattern:ID'")
    body: Body | None = None
    if head.body is None:
        if active:
            problems.append(f"field 'body': required for a {head.kind} rule")
    else:
        try:
            body = _body(head.kind, head.body, head.id, head.version)
        except RuleError as exc:
            problems.append(str(exc))
    if problems:
        raise RuleError(f"{label}: " + "; ".join(problems))
    effective = head.effective_from if head.effective_from is not None else head.timestamp
    return Rule(head.id, head.kind, head.version, effective, head.scope or GLOBAL, head.enabled, head.deleted, body)


def _body(kind: Kind, data: object, rule_id: str, version: int) -> Body:
    """The validated body of a rule of `kind`; raises `RuleError` with the problems (no rule label)."""
    if kind == "pattern":
        if not isinstance(data, Mapping):
            msg = f"field 'body': expected an object, got {json_type(data)}"
            raise RuleError(msg)
        try:
            return pattern_from_dict(data, source="field 'body'")
        except PatternError as exc:
            raise RuleError("; ".join(str(exc).splitlines())) from None
    try:
        body = _BODIES[kind].model_validate(data)
    except ValidationError as exc:
        raise RuleError("; ".join(_problems(exc, "body"))) from None
    if isinstance(body, BlockedWords):
        _check_words(body, rule_id, version)
    return body


def _check_words(body: BlockedWords, rule_id: str, version: int) -> None:
    """Compile the words now, so a term the block list cannot use is rejected with the rule, not later."""
    try:
        BlockList.compile(BlockedTerm(w, rule_id, version, body.action) for w in body.words)
    except ConvoflowError:
        bad = [f"field 'body.words[{i}]': {w!r} has no letters or digits" for i, w in enumerate(body.words)
               if not _compiles(w)]
        raise RuleError("; ".join(bad)) from None


def _compiles(word: str) -> bool:
    try:
        BlockList.compile([BlockedTerm(word, "-", 0, "flag")])
    except ConvoflowError:
        return False
    return True


def parse_rule(raw: bytes, ref: LineRef) -> Rule | DeadLetter:
    """Parse one line of the rules stream; a bad line becomes a `DeadLetter` of step `rules`, never an exception."""
    read = read_json(raw, ref, STEP)
    if isinstance(read, DeadLetter):
        return read
    text, data = read
    try:
        return rule_from_dict(data)
    except RuleError as exc:
        return dead_letter(text, ref, str(exc), STEP)


def _label(data: Mapping[str, Any]) -> str:
    rule_id, version = data.get("id"), data.get("version")
    label = f"rule {rule_id!r}" if isinstance(rule_id, str) and rule_id else "rule"
    return f"{label} v{version}" if isinstance(version, int) and not isinstance(version, bool) else label


def _problems(exc: ValidationError, prefix: str = "") -> list[str]:
    """One `field 'path': problem` per pydantic error."""
    lines = []
    for err in exc.errors(include_url=False):
        path = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in (prefix, *err["loc"]) if p != "")
        where = f"field '{path.lstrip('.') or 'rule'}'"
        if err["type"] == "extra_forbidden":
            near = difflib.get_close_matches(str(err["loc"][-1]), _RULE_FIELDS if not prefix else [], n=1)
            lines.append(f"{where}: unknown field" + (f" (did you mean '{near[0]}'?)" if near else ""))
        elif err["type"] in ("missing", "kind", "scope", "timestamp"):
            lines.append(f"{where}: {err['msg']}")
        else:
            lines.append(f"{where}: {err['msg']} (got {_show(err['input'])})")
    return lines


def _show(value: object) -> str:
    try:
        return orjson.dumps(value).decode()
    except TypeError:
        return repr(value)


class Moderation(NamedTuple):
    """What the rules in effect say about one message."""

    action: Verdict
    text: str
    rules: tuple[tuple[str, int], ...] = ()
    reasons: tuple[str, ...] = ()
    flags: tuple[tuple[str, bool], ...] = ()
    role: str | None = None
    models: tuple[tuple[str, str], ...] = ()
    """The `language_model` rules in force: (language, model), read by the LLM stage."""

    def as_record(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "rules": [{"id": rule_id, "version": version} for rule_id, version in self.rules],
            "reasons": list(self.reasons),
            "flags": dict(self.flags),
            "role": self.role,
            "models": dict(self.models),
        }


_Held = tuple[str, str, int]  # (role, rule id, version)


class _Scoped:
    """What the rules in effect amount to for events of one (tenant, room)."""

    __slots__ = ("flag_map", "flags", "lists", "model_pairs", "models", "roles", "verdicts")

    def __init__(self, levels: Sequence[Sequence[Rule]], lists: tuple[BlockList, ...]) -> None:
        self.lists = lists
        self.verdicts: dict[tuple[str, str | None], Moderation] = {}
        """Verdicts on recent texts (see `blocklist.remember`), by text and the user when a role rule names them:
        a view never changes, so they never go stale."""
        self.flag_map: dict[str, bool] = {}
        self.roles: dict[str, _Held] = {}
        self.models: dict[str, str] = {}
        for rules in levels:  # least specific first, each in precedence order: later entries override
            for rule in rules:
                body = rule.body
                if isinstance(body, FeatureFlag):
                    self.flag_map[body.flag] = body.enabled
                elif isinstance(body, UserPermission):
                    self.roles[body.user] = (body.role, rule.id, rule.version)
                elif isinstance(body, LanguageModel):
                    self.models[body.language] = body.model
        self.flags = tuple(sorted(self.flag_map.items()))
        self.model_pairs = tuple(sorted(self.models.items()))


class _InEffect:
    """One set of rule versions in effect, compiled lazily for each scope that events ask about.

    Shared by every book of the process that has these rules in effect (see `_view`), with the
    verdicts its scopes remember; filled lazily, but what a scope compiles to never changes.
    """

    __slots__ = ("by_scope", "patterns", "rooms", "scoped", "tenants")

    def __init__(self, rules: Iterable[Rule]) -> None:
        self.by_scope: dict[Scope, list[Rule]] = {}
        for rule in sorted(rules, key=_precedence):
            self.by_scope.setdefault(rule.scope, []).append(rule)
        self.tenants = frozenset(name for kind, name in self.by_scope if kind == "tenant")
        self.rooms = frozenset(name for kind, name in self.by_scope if kind == "room")
        patterns: dict[str, PatternDef] = {}
        for rule in self.by_scope.get(GLOBAL, ()):
            if isinstance(rule.body, PatternDef):
                patterns[rule.body.id] = rule.body
        self.patterns = tuple(patterns[k] for k in sorted(patterns))
        self.scoped: dict[tuple[str | None, str | None], _Scoped] = {}

    def build(self, tenant: str | None, room: str | None) -> _Scoped:
        """The view for events of this tenant and room, cached under the scopes that have rules."""
        key = (tenant if tenant in self.tenants else None, room if room in self.rooms else None)
        scoped = self.scoped.get(key)
        if scoped is None:
            scopes: list[Scope] = [GLOBAL]
            if key[0] is not None:
                scopes.append(("tenant", key[0]))
            if key[1] is not None:
                scopes.append(("room", key[1]))
            lists = tuple(bl for bl in map(self._blocklist, scopes) if bl.terms)
            scoped = self.scoped[key] = _Scoped([self.by_scope.get(s, []) for s in scopes], lists)
        return scoped

    def _blocklist(self, scope: Scope) -> BlockList:
        """The block list of one scope's blocked_words rules, shared by every view with the same rules."""
        return _compile(tuple(sorted((r for r in self.by_scope.get(scope, ()) if isinstance(r.body, BlockedWords)),
                                     key=_identity)))


@functools.lru_cache(maxsize=COMPILED_VIEWS)
def _view(rules: tuple[Rule, ...]) -> _InEffect:
    """The compiled view of the rules in effect (by id): one per distinct set of rules, as rules hash by content."""
    return _InEffect(rules)


@functools.lru_cache(maxsize=COMPILED_LISTS)
def _compile(rules: tuple[Rule, ...]) -> BlockList:
    """The block list of some blocked_words rules (compiling 1,000 words takes ~7 ms)."""
    return BlockList.compile(BlockedTerm(word, rule.id, rule.version, rule.body.action)
                             for rule in rules if isinstance(rule.body, BlockedWords) for word in rule.body.words)


def _identity(rule: Rule) -> tuple[str, int]:
    return (rule.id, rule.version)


def _precedence(rule: Rule) -> tuple[float, str]:
    return (-math.inf if rule.effective_from is None else rule.effective_from, rule.id)


class RuleBook:
    """Every rule version received, and what is in effect at any event time.

    Picklable as a state snapshot: only the versions and counters are kept, compiled views are
    rebuilt on first use. The versions are pickled once per change, not at every snapshot.
    """

    def __init__(self, rules: Iterable[Rule] = ()) -> None:
        self.stale = 0
        self.applied = 0
        self._history: dict[str, list[Rule]] = {}
        self._held = 0
        self._pickled: bytes | None = None
        self._boundaries: list[float] = []
        self._reset_caches()
        for rule in rules:
            self.add(rule)

    def add(self, rule: Rule) -> bool:
        """Take in one version; False (and counted in `stale`) when its id already has this version or a higher one."""
        versions = self._history.setdefault(rule.id, [])
        if versions and rule.version <= versions[-1].version:
            self.stale += 1
            return False
        versions.append(rule)
        self._held += 1
        self._pickled = None
        if rule.effective_from is not None:
            i = bisect_right(self._boundaries, rule.effective_from)
            if not (i and self._boundaries[i - 1] == rule.effective_from):
                self._boundaries.insert(i, rule.effective_from)
        self.applied += 1
        self._forget_spans()
        return True

    def version(self) -> int:
        """A number that changes whenever the rule set does: the count of versions applied."""
        return self.applied

    def held(self) -> int:
        """How many rule versions are kept (see `prune`)."""
        return self._held

    def superseded(self) -> bool:
        """Whether some id holds more than one version: only then can `prune` drop anything."""
        return self._held > len(self._history)

    def in_effect(self, time: float) -> tuple[Rule, ...]:
        """The rule versions in effect at event time `time`, by id."""
        found = []
        for rule_id in sorted(self._history):
            for rule in reversed(self._history[rule_id]):
                if rule.effective_from is None or rule.effective_from <= time:
                    if rule.active:
                        found.append(rule)
                    break
        return tuple(found)

    def judge(self, text: str, *, time: float, user: str, room: str, tenant: str | None = None) -> Moderation:
        """The verdict on one message from `user` in `room` at event time `time`."""
        now = self._now if self._lo <= time < self._hi else self._settle(time)
        scoped = now.scoped.get((tenant if tenant in now.tenants else None, room if room in now.rooms else None))
        if scoped is None:
            scoped = now.build(tenant, room)
        held = scoped.roles.get(user) if scoped.roles else None
        verdicts = scoped.verdicts
        memo = (text, None if held is None else user)
        found = verdicts.get(memo)
        if found is not None:
            return found
        lists = scoped.lists
        matches: Sequence[Match]
        if not lists:
            matches = ()
        elif len(lists) == 1:
            matches = lists[0].find(text)
        else:
            matches = sorted((m for bl in lists for m in bl.find(text)), key=_position)
        if not matches and (held is None or held[0] != "muted"):
            verdict = Moderation("allow", text, (), (), scoped.flags, None if held is None else held[0],
                                 scoped.model_pairs)
        else:
            verdict = _verdict(text, user, matches, held, scoped)
        remember(verdicts, text, memo, verdict)
        return verdict

    def flags_at(self, time: float, *, room: str, tenant: str | None = None) -> dict[str, bool]:
        """The feature flags some rule sets for events of this room and tenant; unmentioned flags are absent."""
        return dict(self._scoped(time, tenant, room).flag_map)

    def model_for(
        self, language: str, *, time: float, room: str | None = None, tenant: str | None = None
    ) -> str | None:
        """The model a rule names for `language` (any case) in this scope, or None."""
        return self._scoped(time, tenant, room).models.get(language.strip().casefold())

    def role_of(self, user: str, *, time: float, room: str | None = None, tenant: str | None = None) -> str | None:
        """The role a permission rule gives `user` in this scope, or None."""
        held = self._scoped(time, tenant, room).roles.get(user)
        return None if held is None else held[0]

    def patterns_at(self, time: float) -> tuple[PatternDef, ...]:
        """The patterns the pattern rules in effect define, by pattern id, enabled or not (a disabled
        definition switches off a pattern of the same id given at start-up).

        Two rules defining one pattern id: the later `effective_from` (then the greater rule id) wins.
        """
        return self.patterns_span(time)[0]

    def patterns_span(self, time: float) -> tuple[tuple[PatternDef, ...], float, float]:
        """`patterns_at(time)` and the span of event times `[lo, hi)` over which it holds."""
        now = self._now if self._lo <= time < self._hi else self._settle(time)
        return now.patterns, self._lo, self._hi

    def prune(self, watermark: float) -> None:
        """Drop the versions that no message at time `watermark` or later can be judged by.

        A version is dropped when a higher version of its id takes effect by `watermark` or by its
        own `effective_from`, whichever is later. The highest version of each id is kept, so stale
        updates are still recognised.
        """
        for rule_id, versions in self._history.items():
            kept: list[Rule] = []
            earliest_above = math.inf
            for rule in reversed(versions):
                effective = -math.inf if rule.effective_from is None else rule.effective_from
                if earliest_above > max(watermark, effective):
                    kept.append(rule)
                earliest_above = min(earliest_above, effective)
            kept.reverse()
            self._history[rule_id] = kept
        self._held = sum(map(len, self._history.values()))
        self._pickled = None
        self._boundaries = _boundaries(self._history)
        self._forget_spans()

    def _scoped(self, time: float, tenant: str | None, room: str | None) -> _Scoped:
        now = self._now if self._lo <= time < self._hi else self._settle(time)
        return now.build(tenant, room)

    def _settle(self, time: float) -> _InEffect:
        """Find the rules in effect at `time` and the span of times they hold for; reuse their compiled view."""
        bounds = self._boundaries
        i = bisect_right(bounds, time)
        self._lo = bounds[i - 1] if i else -math.inf
        self._hi = bounds[i] if i < len(bounds) else math.inf
        now = self._spans.get(i)
        if now is None:
            now = self._spans[i] = _view(self.in_effect(time))
            if len(self._spans) > COMPILED_VIEWS:
                del self._spans[next(iter(self._spans))]
        self._now = now
        return now

    def _forget_spans(self) -> None:
        """Forget which view holds between which boundaries (they moved, or the versions did)."""
        self._lo, self._hi = math.inf, -math.inf
        self._spans: dict[int, _InEffect] = {}

    def _reset_caches(self) -> None:
        self._now = _view(())
        self._forget_spans()

    def __getstate__(self) -> dict[str, Any]:
        if self._pickled is None:
            self._pickled = pickle.dumps(self._history, protocol=pickle.HIGHEST_PROTOCOL)
        return {"stale": self.stale, "applied": self.applied, "history": self._pickled}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.stale, self.applied, history = state["stale"], state["applied"], state["history"]
        if isinstance(history, bytes):
            self._pickled, self._history = history, pickle.loads(history)
        else:  # a snapshot of an earlier version, which kept the versions unpickled
            self._pickled, self._history = None, history
        self._held = sum(map(len, self._history.values()))
        self._boundaries = _boundaries(self._history)
        self._reset_caches()


def _boundaries(history: Mapping[str, Sequence[Rule]]) -> list[float]:
    return sorted({r.effective_from for versions in history.values() for r in versions if r.effective_from is not None})


def _position(match: Match) -> tuple[int, int]:
    return (match.start, -match.end)


def _verdict(text: str, user: str, matches: Sequence[Match], held: _Held | None, scoped: _Scoped) -> Moderation:
    rules: dict[tuple[str, int], None] = {}
    reasons: dict[str, None] = {}
    muted = held is not None and held[0] == "muted"
    if held is not None and muted:
        rules[(held[1], held[2])] = None
        reasons[f"user {user!r} is muted (rule {held[1]} v{held[2]})"] = None
    for m in matches:
        rules[(m.rule_id, m.version)] = None
        reasons[f"blocked word {m.term!r} (rule {m.rule_id} v{m.version})"] = None
    action: Verdict = "block" if muted else strictest(matches) or "allow"
    return Moderation(action, mask(text, matches) if action == "mask" else text, tuple(rules), tuple(reasons),
                      scoped.flags, None if held is None else held[0], scoped.model_pairs)


def describe(rule: Rule) -> str:
    """What a rule does, in one line: for `rules check` and logs."""
    kind, value = rule.scope
    where = "everywhere" if value is None else f"in {kind} {value!r}"
    since = "" if rule.effective_from is None else f" from {iso(rule.effective_from)}"
    head = f"{rule.id} v{rule.version}"
    if not rule.active:
        return f"{head}: removes {rule.id}{since}"
    body = rule.body
    if isinstance(body, BlockedWords):
        shown = ", ".join(repr(w) for w in body.words[:5]) + (f" and {len(body.words) - 5} more" if len(body.words) > 5 else "")
        verbs = {"mask": "masks", "block": "blocks messages with", "flag": "flags messages with"}
        what = f"{verbs[body.action]} {shown}"
    elif isinstance(body, FeatureFlag):
        what = f"turns {body.flag} {'on' if body.enabled else 'off'}"
    elif isinstance(body, LanguageModel):
        what = f"translates to {body.language!r} with model {body.model!r}"
    elif isinstance(body, UserPermission):
        what = f"makes user {body.user!r} {body.role}"
    elif isinstance(body, PatternDef):
        what = f"detects pattern {body.id!r} ({len(body.steps)} steps, keyed by {body.key})"
    else:
        what = f"a {rule.kind} rule"
    return f"{head}: {what} {where}{since}"
