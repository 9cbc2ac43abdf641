"""Fuzzing the rules loader: whatever a rules line holds, `parse_rule` gives a `Rule` with the
fields it gave, or a `DeadLetter` of step `rules` whose reason names the problem; nothing raises."""

from datetime import datetime, timezone
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dataflows.events import DeadLetter, LineRef
from dataflows.parse import MAX_JSON_DEPTH
from dataflows.rules import KINDS, BlockedWords, FeatureFlag, LanguageModel, Rule, UserPermission, parse_rule
from tests.conftest import check_dead_letter

REF = LineRef("rules.jsonl", 2, 80)
FAST = settings(max_examples=50, deadline=None)

EDGE = ["\u200f", "\u202e", "\u0301", "\x00", "\ufeff", "\u3000", "\U0010ffff"]
"""Marks that change no letter: RTL/LTR overrides, a combining accent, NUL, BOM, ideographic space."""
INT64 = st.integers(-(2**63), 2**64 - 1)
names = st.text(min_size=1, max_size=12)
scopes = st.one_of(st.just("global"), st.builds(lambda k, v: {k: v}, st.sampled_from(["tenant", "room"]), names))


def scope_of(value: Any) -> tuple[str, str | None]:
    return ("global", None) if value == "global" else next(iter(value.items()))


@st.composite
def words(draw: st.DrawFn) -> str:
    """A blocked term: letters, wrapped in Unicode marks that do not make it unusable."""
    core = draw(st.text(st.characters(categories=["Ll", "Lu"], codec="utf-8"), min_size=1, max_size=8))
    return draw(st.sampled_from(["", *EDGE[:3]])) + core + draw(st.sampled_from(["", "\u0301", " x"]))


bodies = {
    "blocked_words": st.fixed_dictionaries({"words": st.lists(words(), min_size=1, max_size=4),
                                            "action": st.sampled_from(["mask", "block", "flag"])}),
    "feature_flag": st.fixed_dictionaries({"flag": names, "enabled": st.booleans()}),
    "language_model": st.fixed_dictionaries({"language": names.filter(str.strip), "model": names}),
    "user_permission": st.fixed_dictionaries({"user": names, "role": st.sampled_from(["customer", "rm", "muted"])}),
}


@st.composite
def effective(draw: st.DrawFn) -> tuple[Any, float | None]:
    """An `effective_from` in one of its accepted forms, and its epoch seconds."""
    moment = draw(st.datetimes(datetime(1970, 1, 2), datetime(2199, 12, 30), timezones=st.just(timezone.utc)))
    return draw(st.sampled_from([
        (None, None), (moment.isoformat(), moment.timestamp()), (int(moment.timestamp()), float(int(moment.timestamp()))),
    ]))


@st.composite
def valid_rules(draw: st.DrawFn) -> tuple[dict[str, Any], float | None]:
    kind = draw(st.sampled_from(sorted(bodies)))
    when, seconds = draw(effective())
    rule = {"id": draw(names), "kind": kind, "version": draw(st.integers(0, 2**63 - 1)), "scope": draw(scopes),
            "body": draw(bodies[kind])}
    if when is not None:
        rule["effective_from"] = when
    return rule, seconds


def check_dead(result: Rule | DeadLetter, *fragments: str) -> DeadLetter:
    return check_dead_letter(result, REF, "rules", *fragments)


@FAST
@given(valid_rules())
def test_valid_rules_load_with_their_fields(case: tuple[dict[str, Any], float | None]) -> None:
    data, seconds = case
    rule = parse_rule(orjson.dumps(data), REF)
    assert isinstance(rule, Rule), rule
    assert (rule.id, rule.kind, rule.version, rule.scope, rule.active) == (
        data["id"], data["kind"], data["version"], scope_of(data["scope"]), True)
    assert rule.effective_from == seconds
    body = data["body"]
    if isinstance(rule.body, BlockedWords):
        assert (list(rule.body.words), rule.body.action) == (body["words"], body["action"])
    elif isinstance(rule.body, FeatureFlag):
        assert (rule.body.flag, rule.body.enabled) == (body["flag"], body["enabled"])
    elif isinstance(rule.body, LanguageModel):
        assert (rule.body.language, rule.body.model) == (body["language"].strip().casefold(), body["model"])
    else:
        assert isinstance(rule.body, UserPermission)
        assert (rule.body.user, rule.body.role) == (body["user"], body["role"])
    assert parse_rule(orjson.dumps(rule.as_record()), REF) == rule


GOOD = {"id": "r-1", "kind": "feature_flag", "version": 1, "scope": "global", "body": {"flag": "f", "enabled": True}}
OBJECTS = st.one_of(st.lists(INT64, max_size=2), st.dictionaries(st.text(max_size=3), INT64, max_size=2))
NOT_STRINGS = st.one_of(INT64, st.floats(allow_nan=False, allow_infinity=False), st.booleans(), OBJECTS)
NOT_TIMES = st.one_of(st.booleans(), OBJECTS, st.integers(-(2**63), -1), st.integers(7_258_118_401, 10**11 - 1),
                      st.text(st.characters(categories=["L"]), min_size=1, max_size=5))
WRONG = {
    "id": st.one_of(NOT_STRINGS, st.just("")),
    "kind": st.one_of(NOT_STRINGS, st.text(max_size=8).filter(lambda k: k not in KINDS)),
    "version": st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.booleans(), OBJECTS,
                         st.integers(-(2**63), -1), st.text(max_size=3)),
    "scope": st.one_of(NOT_STRINGS, st.text(max_size=8).filter(lambda v: v != "global"),
                       st.dictionaries(st.sampled_from(["tenant", "room", "other"]), st.one_of(st.just(""), INT64),
                                       min_size=1, max_size=2)),
    "enabled": st.one_of(INT64, st.floats(allow_nan=False, allow_infinity=False), OBJECTS, st.text(max_size=3)),
    "deleted": st.one_of(INT64, st.floats(allow_nan=False, allow_infinity=False), OBJECTS, st.text(max_size=3)),
    "effective_from": NOT_TIMES,
    "timestamp": NOT_TIMES,
    "body": st.one_of(NOT_STRINGS, st.text(max_size=3), st.fixed_dictionaries({"flag": NOT_STRINGS, "enabled": st.booleans()})),
}
"""For each field of a rule, values that are wrong for it."""


@FAST
@given(st.sampled_from(sorted(WRONG)).flatmap(lambda f: st.tuples(st.just(f), WRONG[f])))
def test_wrong_values_name_the_field(case: tuple[str, Any]) -> None:
    field, value = case
    check_dead(parse_rule(orjson.dumps({**GOOD, field: value}), REF), f"field '{field}")


@pytest.mark.parametrize("value", [1e300, -1e300, -1, 2**63, "nan", "-Infinity", "0000-01-01", "10000-01-01",
                                   "1969-12-31T23:59:59Z", True, []], ids=repr)
@pytest.mark.parametrize("field", ["effective_from", "timestamp"])
def test_extreme_times_name_the_field(field: str, value: Any) -> None:
    check_dead(parse_rule(orjson.dumps({**GOOD, field: value}), REF), f"field '{field}'")


@pytest.mark.parametrize("word", ["*", " ", *EDGE, "\u200f\u0301", "..."], ids=repr)
def test_words_without_letters_are_named(word: str) -> None:
    data = {**GOOD, "kind": "blocked_words", "body": {"words": ["fine", word], "action": "mask"}}
    check_dead(parse_rule(orjson.dumps(data), REF), "field 'body.words[1]'", "field 'body.words")


@FAST
@given(st.integers(MAX_JSON_DEPTH + 1, 3000), st.sampled_from(["id", "body", "scope", "effective_from"]))
def test_deep_nesting_is_rejected(depth: int, field: str) -> None:
    line = '{"id": "r", "kind": "pattern", "version": 1, "' + field + '": ' + "[" * depth + "]" * depth + "}"
    check_dead(parse_rule(line.encode(), REF), f"JSON nested more than {MAX_JSON_DEPTH} levels deep")


def test_nesting_1000_deep_is_a_dead_letter_not_a_recursion_error() -> None:
    """Was a crash: the error for a bad `id` repr'd the 1,000-deep list and raised RecursionError."""
    dead = check_dead(parse_rule(b'{"id": ' + b"[" * 1000 + b"]" * 1000 + b"}", REF), "nested")
    assert dead.reason == f"JSON nested more than {MAX_JSON_DEPTH} levels deep"


@FAST
@given(st.binary(max_size=300))
def test_random_bytes_never_raise(raw: bytes) -> None:
    result = parse_rule(raw, REF)
    if isinstance(result, DeadLetter):
        check_dead(result, "")


@FAST
@given(st.binary(min_size=1, max_size=40))
def test_truncated_or_corrupted_lines_are_dead_letters(noise: bytes) -> None:
    line = orjson.dumps(GOOD)
    for bad in (line[: len(line) // 2], line[:-1], line[:9] + noise + line[9:]):
        result = parse_rule(bad, REF)
        if isinstance(result, DeadLetter):
            check_dead(result, "not JSON", "not valid UTF-8", "rule")


JSON = st.recursive(
    st.one_of(st.none(), st.booleans(), INT64, st.floats(allow_nan=False, allow_infinity=False),
              st.text(max_size=8), st.sampled_from(EDGE)),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=6), inner, max_size=3)),
    max_leaves=10,
)
RULE_FIELDS = ["id", "kind", "version", "scope", "enabled", "deleted", "effective_from", "timestamp", "body", "extra"]


@FAST
@given(st.fixed_dictionaries({}, optional={
    **{f: JSON for f in RULE_FIELDS}, "kind": st.sampled_from([*KINDS, "nope"]), "version": st.integers(-2, 3),
    "body": st.one_of(JSON, *bodies.values()),
}))
def test_any_object_gives_a_rule_or_a_reasoned_dead_letter(data: dict[str, Any]) -> None:
    result = parse_rule(orjson.dumps(data), REF)
    if isinstance(result, DeadLetter):
        check_dead(result, "rule")


def _pattern_rule(regex: str) -> bytes:
    step = {"name": "a", "where": {"text_regex": regex}}
    body = {"id": "p", "key": "user", "within_seconds": 10, "steps": [step]}
    return orjson.dumps({"id": "p-1", "kind": "pattern", "version": 1, "scope": "global", "body": body})


@pytest.mark.parametrize("regex", ["a{4294967296}", "(" * 1000 + ")" * 1000], ids=["huge-repeat", "1000-groups"])
def test_a_pattern_regex_python_cannot_compile_is_a_dead_letter(regex: str) -> None:
    check_dead(parse_rule(_pattern_rule(regex), REF), "field 'body'")
