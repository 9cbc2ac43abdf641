import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml

from connectors.files.patterns_file import load_patterns
from dataflows.events import Event, iso
from dataflows.patterns.definitions import (
    PatternDef,
    PatternError,
    Predicate,
    is_question,
    is_thanks,
    key_of,
    pattern_from_dict,
    role_of,
)

SAMPLES = Path(__file__).parent.parent.parent / "samples" / "patterns.yaml"


def make_event(text: str = "hi", *, sender: str = "alice", kind: str | None = None, shape: str = "chat",
               session_id: str = "room-1", time: float = 1_704_103_200.0, line: int = 1) -> Event:
    """A timed event; chat by default (kind USER_MESSAGE), conversation when `shape="conversation"`."""
    chat = shape == "chat"
    return Event(event_id=f"in:{line}", session_id=session_id, sender=sender,
                 kind=kind or ("USER_MESSAGE" if chat else "message"), text=text, time=time, time_source="event",
                 shape=shape, source="in", line=line, offset=line * 100, username=sender if chat else None,
                 timestamp=iso(time))


def minimal(**overrides: Any) -> dict[str, Any]:
    """A valid definition dict with overridable top-level fields."""
    return {"id": "p", "key": "user", "steps": [{"name": "a", "where": {"message": True}}], **overrides}


def step(name: str, **fields: Any) -> dict[str, Any]:
    return {"name": name, "where": fields.pop("where", {}), **fields}


def problem(d: dict[str, Any]) -> str:
    with pytest.raises(PatternError) as caught:
        pattern_from_dict(d)
    return str(caught.value)


# The shipped file


def test_shipped_patterns_have_the_issues_defaults() -> None:
    patterns = {p.id: p for p in load_patterns(SAMPLES)}
    assert list(patterns) == ["spam_burst", "engagement", "abandonment", "conversation_completion"]
    spam = patterns["spam_burst"]
    assert (spam.key, spam.steps[0].times_or_more, spam.within_seconds, spam.emit) == ("user", 5, 10, "once_per_burst")
    assert [s.name for s in patterns["engagement"].steps] == ["join", "ask", "answer", "thanks"]
    assert patterns["engagement"].key == "session"
    abandonment = patterns["abandonment"]
    assert (abandonment.key, abandonment.absence and abandonment.absence.seconds) == ("user", 120)
    completion = patterns["conversation_completion"]
    assert [s.name for s in completion.steps] == ["question", "answer"]
    assert completion.absence is not None and completion.absence.seconds == 30
    assert all(p.enabled for p in patterns.values())
    assert {p.id: p.max_horizon_seconds for p in patterns.values()} == {
        "spam_burst": 10, "engagement": 1800, "abandonment": 120, "conversation_completion": 630}


def test_definitions_are_immutable_hashable_and_picklable() -> None:
    patterns = load_patterns(SAMPLES)
    assert pickle.loads(pickle.dumps(patterns)) == patterns
    assert len(set(patterns)) == 4
    with pytest.raises(ValueError, match="frozen"):
        patterns[0].within_seconds = 99  # type: ignore[misc]


def test_json_and_yaml_give_equal_results(tmp_path: Path) -> None:
    as_json = tmp_path / "patterns.json"
    as_json.write_text(json.dumps(yaml.safe_load(SAMPLES.read_text(encoding="utf-8"))), encoding="utf-8")
    as_yml = tmp_path / "patterns.yml"
    as_yml.write_text(SAMPLES.read_text(encoding="utf-8"), encoding="utf-8")
    assert load_patterns(as_json) == load_patterns(SAMPLES) == load_patterns(as_yml)


def test_a_bare_list_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "p.json"
    path.write_text(json.dumps([minimal(id="one"), minimal(id="two", enabled=False)]), encoding="utf-8")
    assert [(p.id, p.enabled) for p in load_patterns(path)] == [("one", True), ("two", False)]


def test_pattern_from_dict_takes_a_rules_stream_definition() -> None:
    pattern = pattern_from_dict(minimal(id="shouting", steps=[step("loud", where={"text_regex": "^[A-Z !]+$"})]))
    assert isinstance(pattern, PatternDef)
    assert (pattern.id, pattern.severity, pattern.emit, pattern.max_horizon_seconds) == ("shouting", "info", "every_match", 0)
    assert pattern.steps[0].where.matches(make_event("HELLO!"))


def test_a_definition_round_trips_through_its_json_form() -> None:
    for pattern in load_patterns(SAMPLES):
        assert pattern_from_dict(json.loads(json.dumps(pattern.model_dump(mode="json")))) == pattern


# Invalid definitions: each message names the source, the pattern, the field and the problem


@pytest.mark.parametrize(("definition", "expected"), [
    (minimal(steps=[step("a", where={"text_regex": "(unclosed"})]),
     "pattern 'p': steps[0].where.text_regex: invalid regular expression '(unclosed'"),
    (minimal(steps=[step("a", times=0)]), "pattern 'p': steps[0].times: Input should be greater than or equal to 1"),
    (minimal(steps=[step("a", times_or_more=0)], within_seconds=5), "steps[0].times_or_more: Input should be greater"),
    (minimal(steps=[step("a", times=2, times_or_more=3)], within_seconds=5),
     "pattern 'p': steps[0].times_or_more: give either times or times_or_more, not both"),
    (minimal(steps=[step("a", where={"txt_regex": "x"})]),
     "pattern 'p': steps[0].where.txt_regex: unknown field (did you mean 'text_regex'?)"),
    (minimal(within_secs=5), "pattern 'p': within_secs: unknown field (did you mean 'within_seconds'?)"),
    (minimal(steps=[step("a"), step("b", where={"other_sender_than": "c"}, within_seconds=5)]),
     "pattern 'p': steps: step 'b' where.other_sender_than: 'c' is not an earlier step (earlier: a)"),
    (minimal(steps=[step("a", where={"any_of": [{"same_sender_as": "b"}]}), step("b", within_seconds=5)]),
     "step 'a' where.any_of[0].same_sender_as: 'b' is not an earlier step (earlier: none)"),
    (minimal(absence={"not_followed_by": {"same_sender_as": "zz"}, "seconds": 5}),
     "pattern 'p': absence: not_followed_by.same_sender_as: 'zz' is not a step (steps: a)"),
    (minimal(within_seconds=-3), "pattern 'p': within_seconds: Input should be greater than 0 (got -3)"),
    (minimal(within_seconds=float("inf")), "pattern 'p': within_seconds: Input should be a finite number"),
    (minimal(absence={"not_followed_by": {}, "seconds": 0}), "pattern 'p': absence.seconds: Input should be greater than 0"),
    (minimal(steps=[step("a"), step("b", within_seconds=-1)]), "steps[1].within_seconds: Input should be greater than 0"),
    (minimal(steps=[step("a", within_seconds=5)]), "steps: step 'a' within_seconds: the first step has no previous step"),
    (minimal(steps=[step("a"), step("a", within_seconds=5)]), "pattern 'p': steps: duplicate step name 'a'"),
    (minimal(steps=[]), "pattern 'p': steps: a pattern needs at least one step"),
    (minimal(steps=[step("a"), step("b")]), "pattern 'p': within_seconds: required here"),
    (minimal(steps=[step("a", times_or_more=3)]), "pattern 'p': within_seconds: required here"),
    (minimal(emit="once_per_burst"), "pattern 'p': within_seconds: required by emit: once_per_burst"),
    (minimal(key="room"), "pattern 'p': key: Input should be 'user' or 'session' (got 'room')"),
    (minimal(severity="high"), "pattern 'p': severity: Input should be 'info', 'warning' or 'critical'"),
    (minimal(steps=[step("a", where={"role": "boss"})]), "steps[0].where.role[0]: Input should be 'customer'"),
    (minimal(steps=[step("a", where={"kind": []})]), "steps[0].where.kind: "),
    (minimal(steps=[step("a", where={"question": "yes"})]), "steps[0].where.question: Input should be a valid boolean"),
    (minimal(summary="{user} did it"), "pattern 'p': summary: unknown field(s) {user}; known: count, description"),
    (minimal(summary="{count:%Y}"), "pattern 'p': summary: not a usable template"),
    (minimal(steps=[step("two words")]), "pattern 'p': steps[0].name: String should match pattern"),
    ({"key": "user", "steps": []}, "rules stream: pattern: id: Field required"),
])
def test_invalid_definitions_are_rejected_with_pattern_field_and_problem(definition: dict[str, Any], expected: str) -> None:
    message = problem(definition)
    assert message.startswith("rules stream: pattern")
    assert expected in message


def test_every_problem_is_reported_one_per_line() -> None:
    lines = problem(minimal(key="room", severity="loud", within_seconds=0)).splitlines()
    assert len(lines) == 3
    assert [line.split(": ")[2] for line in lines] == ["key", "severity", "within_seconds"]


def test_a_definition_that_is_not_a_mapping_is_rejected() -> None:
    with pytest.raises(PatternError, match=r"rules stream: pattern: expected a mapping of fields, got list"):
        pattern_from_dict([1, 2])  # type: ignore[arg-type]


def write(tmp_path: Path, name: str, content: str) -> Path:
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    return path


def test_duplicate_ids_in_one_file_are_rejected(tmp_path: Path) -> None:
    path = write(tmp_path, "p.json", json.dumps({"patterns": [minimal(id="x"), minimal(id="y"), minimal(id="x")]}))
    with pytest.raises(PatternError, match=r"p\.json: pattern 'x': id: duplicate \(also pattern #0\)"):
        load_patterns(path)


def test_problems_in_a_file_name_the_file_and_the_pattern_by_id_or_index(tmp_path: Path) -> None:
    path = write(tmp_path, "p.yaml", "patterns:\n  - {id: ok, key: user, steps: [{name: a, where: {}}]}\n"
                                     "  - {key: user, steps: [{name: a, where: {}, times: 0}]}\n")
    with pytest.raises(PatternError) as caught:
        load_patterns(path)
    assert str(caught.value).splitlines() == [
        f"{path}: pattern #1: id: Field required",
        f"{path}: pattern #1: steps[0].times: Input should be greater than or equal to 1 (got 0)",
    ]


@pytest.mark.parametrize(("name", "content", "expected"), [
    ("p.toml", "x = 1", r"unknown pattern file extension '\.toml' \(expected \.yaml, \.yml or \.json\)"),
    ("p.yaml", "patterns: [\n  {id: a,\n", r"p\.yaml: not valid YAML: .*line 3"),
    ("p.yaml", "patterns:\n\t- id: a\n", r"p\.yaml: not valid YAML"),
    ("p.json", '{"patterns": [', r"p\.json: not valid JSON"),
    ("p.yaml", "", r"p\.yaml: expected a non-empty list of patterns"),
    ("p.yaml", "patterns: []", r"expected a non-empty list of patterns"),
    ("p.yaml", "pattern: []", r"expected a non-empty list of patterns"),
    ("p.yaml", "patterns: [42]", r"p\.yaml: pattern #0: expected a mapping of fields, got int"),
])
def test_bad_files_are_rejected(tmp_path: Path, name: str, content: str, expected: str) -> None:
    with pytest.raises(PatternError, match=expected):
        load_patterns(write(tmp_path, name, content))


def test_missing_or_unreadable_files_are_rejected(tmp_path: Path) -> None:
    with pytest.raises(PatternError, match=r"missing\.yaml: cannot read"):
        load_patterns(tmp_path / "missing.yaml")
    binary = tmp_path / "bin.yaml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(PatternError, match=r"bin\.yaml: cannot read"):
        load_patterns(binary)


def test_pattern_error_is_a_value_error_and_a_convoflow_error() -> None:
    from dataflows.errors import ConvoflowError

    assert issubclass(PatternError, ValueError)
    assert issubclass(PatternError, ConvoflowError)


# Predicates on events


@pytest.mark.parametrize(("text", "expected"), [
    ("Does anyone know how to reset the PIN?", True),
    ("what is the fee", True),
    ("How long does a transfer take", True),
    ("Can you unblock it today", True),
    ("¿Alguien sabe cómo cambiar el PIN?", True),
    ("cómo cambio el PIN", True),
    ("Quelqu'un sait comment débloquer la carte ?", True),
    ("pourquoi ma carte est bloquée", True),
    ("Est-ce que ça marche", True),
    ("Weiß jemand, wie man das Limit ändert?", True),
    ("wie lange dauert das", True),
    ("  ...why though  ", True),
    ("Try logging out and in again.", False),
    ("It took two days for me.", False),
    ("Showing how it works", False),
    ("thanks!", False),
    ("", False),
])
def test_question_detection(text: str, expected: bool) -> None:
    assert is_question(text) is expected


@pytest.mark.parametrize(("text", "expected"), [
    ("thanks!", True), ("Thank you", True), ("thank   you so much", True), ("thx, that worked", True),
    ("Cheers mate", True), ("¡muchas gracias!", True), ("merci beaucoup !", True), ("vielen Dank!", True),
    ("danke", True), ("Grazie mille", True), ("obrigada!", True), ("спасибо", True), ("谢谢你", True),
    ("Thanksgiving plans?", False), ("I think you are right", False), ("mercifully fast", False), ("", False),
])
def test_thanks_detection(text: str, expected: bool) -> None:
    assert is_thanks(text) is expected


def test_role_mapping() -> None:
    customer = make_event(shape="conversation", sender="customer", session_id="s-1")
    rm = make_event(shape="conversation", sender="rm", session_id="s-1")
    alice, bob = make_event(sender="alice"), make_event(sender="bob")
    assert [role_of(e) for e in (customer, rm, alice)] == ["customer", "agent", "user"]
    assert role_of(bob, {"bob": "agent"}) == "agent"
    assert role_of(alice, {"bob": "agent"}) == "user"
    agents = Predicate(role="agent")
    assert (agents.matches(rm), agents.matches(customer), agents.matches(alice)) == (True, False, False)
    assert Predicate(role="rm").matches(rm)
    assert agents.matches(bob, roles={"bob": "agent"})
    assert Predicate(role=["customer", "user"]).matches(alice)
    assert Predicate(role=["customer", "user"]).matches(customer)
    assert not Predicate(role=["customer", "user"]).matches(rm)
    assert all(Predicate(role="any").matches(e) for e in (customer, rm, alice))


def test_key_of_session_and_user() -> None:
    chat = make_event(sender="alice", session_id="room-2")
    conversation = make_event(shape="conversation", sender="customer", session_id="s-9")
    assert (key_of(chat, "session"), key_of(chat, "user")) == ("room-2", "alice")
    assert (key_of(conversation, "session"), key_of(conversation, "user")) == ("s-9", "s-9/customer")


def test_kind_lists_message_flag_and_regex() -> None:
    joined = make_event("", kind="USER_JOINED")
    said = make_event("Order #123 please")
    assert Predicate(kind="USER_JOINED").matches(joined)
    assert Predicate(kind=["USER_LEFT", "USER_JOINED"]).matches(joined)
    assert not Predicate(kind=["USER_LEFT"]).matches(joined)
    assert Predicate(message=True).matches(said) and Predicate(message=False).matches(joined)
    assert Predicate(message=True).matches(make_event(shape="conversation", sender="rm"))
    assert Predicate(text_regex=r"#\d+").matches(said)
    assert not Predicate(text_regex=r"^#\d+").matches(said)
    assert Predicate(text_regex=r"(?i)ORDER").matches(said) and not Predicate(text_regex="ORDER").matches(said)
    assert Predicate().matches(joined)


def test_question_and_thanks_flags_are_tri_state() -> None:
    asked, thanked = make_event("is it down?"), make_event("gracias")
    assert Predicate(question=True).matches(asked) and not Predicate(question=True).matches(thanked)
    assert Predicate(question=False).matches(thanked) and not Predicate(question=False).matches(asked)
    assert Predicate(thanks=True).matches(thanked) and Predicate(thanks=False).matches(asked)


def test_sender_references_compare_with_bound_steps() -> None:
    ask = make_event("anyone?", sender="alice")
    bound = {"ask": ask}
    other = Predicate(other_sender_than="ask")
    same = Predicate(same_sender_as="ask")
    assert other.matches(make_event("yes", sender="bob"), bound=bound)
    assert not other.matches(make_event("me", sender="alice"), bound=bound)
    assert same.matches(make_event("thx", sender="alice"), bound=bound)
    assert not same.matches(make_event("thx", sender="bob"), bound=bound)
    assert not same.matches(ask) and not other.matches(ask)


def test_any_of_none_of_and_first_of_key() -> None:
    join = Predicate.model_validate({"any_of": [{"kind": "USER_JOINED"}, {"first_of_key": True, "message": False}],
                                     "none_of": [{"kind": "USER_LEFT"}]})
    assert join.matches(make_event(kind="USER_JOINED"))
    assert join.matches(make_event(kind="USER_TYPING"), first_of_key=True)
    assert not join.matches(make_event(kind="USER_TYPING"))
    assert not join.matches(make_event("hi"), first_of_key=True)
    assert not join.matches(make_event(kind="USER_LEFT"), first_of_key=True)


def test_shipped_engagement_steps_match_a_chat_interaction() -> None:
    engagement = {p.id: p for p in load_patterns(SAMPLES)}["engagement"]
    join, ask, answer, thanks = (s.where for s in engagement.steps)
    events = [make_event("", kind="USER_JOINED", line=1), make_event("Is the app down for you too?", line=2),
              make_event("Works fine here.", sender="bob", line=3), make_event("merci", line=4)]
    bound = dict(zip(("join", "ask", "answer", "thanks"), events))
    assert join.matches(events[0], bound=bound)
    assert ask.matches(events[1], bound=bound)
    assert answer.matches(events[2], bound=bound) and not answer.matches(make_event("same here"), bound=bound)
    assert thanks.matches(events[3], bound=bound) and not thanks.matches(make_event("merci", sender="bob"), bound=bound)


def test_summary_renders_the_match() -> None:
    spam = {p.id: p for p in load_patterns(SAMPLES)}["spam_burst"]
    events = [make_event("buy!", time=1_704_103_200.0 + i * 1.5, line=i) for i in range(5)]
    assert spam.summarize("alice", events) == (
        "alice sent 5 messages in 6.0 s (2024-01-01T10:00:00+00:00 to 2024-01-01T10:00:06+00:00)")
    plain = pattern_from_dict(minimal())
    assert plain.summarize("alice", events[:1]) == (
        "p for alice: 1 events from 2024-01-01T10:00:00+00:00 to 2024-01-01T10:00:00+00:00")


@pytest.mark.parametrize("pattern_id", ["abandonment", "conversation_completion", "engagement"])
def test_shipped_summaries_render(pattern_id: str) -> None:
    pattern = {p.id: p for p in load_patterns(SAMPLES)}[pattern_id]
    events = [make_event("", kind="USER_JOINED"), make_event("thanks", sender="bob", time=1_704_103_230.0)]
    text = pattern.summarize("room-1", events)
    assert "room-1" in text and "{" not in text


@pytest.mark.parametrize("pattern", load_patterns(SAMPLES), ids=lambda p: p.id)
def test_compiled_predicates_survive_pickling(pattern: PatternDef) -> None:
    """Shard state, compiled predicates included, is pickled for every snapshot."""
    texts = ["hi", "How do I pay?", "thanks!", "Use the app.", "merci", ""]
    kinds = ["USER_MESSAGE", "USER_JOINED", "USER_LEFT", "message"]
    bound_sender = {"join": "ana", "ask": "ana", "question": "ana"}
    for step in [*pattern.steps, *([pattern.absence] if pattern.absence else [])]:
        predicate = step.where if hasattr(step, "where") else step.not_followed_by
        fresh = predicate.compile()
        compiled = pickle.loads(pickle.dumps(fresh))
        for kind in kinds:
            for text in texts:
                for sender, shape in [("ana", "chat"), ("joe", "chat"), ("customer", "conversation"), ("rm", "conversation")]:
                    event = make_event(text, kind=kind, sender=sender, shape=shape)
                    bound = {name: make_event(sender=who) for name, who in bound_sender.items()}
                    for first in (True, False):
                        assert compiled(event, bound, first) == fresh(event, bound, first)


@pytest.mark.parametrize("where", [
    *[s.where for p in load_patterns(SAMPLES) for s in p.steps],
    *[p.absence.not_followed_by for p in load_patterns(SAMPLES) if p.absence],
    Predicate.model_validate({"text_regex": "(?i)pin", "role": "rm", "other_sender_than": "ask"}),
    Predicate.model_validate({"any_of": [{"thanks": True}, {"kind": "USER_LEFT", "first_of_key": False}],
                              "none_of": [{"same_sender_as": "join"}, {"message": False, "role": "any"}]}),
    Predicate.model_validate({"none_of": [{}]}),
    Predicate(),
], ids=lambda p: p.model_dump_json(exclude_defaults=True))
def test_residuals_agree_with_the_compiled_predicate(where: Predicate) -> None:
    """The engine tests what a predicate leaves once kind and role are known: same answer, every case."""
    steps = {"join": 0, "ask": 1, "question": 2}
    compiled = where.compile()
    texts = ["hi", "How do I pay?", "thanks!", "my PIN", ""]
    kinds = ["USER_MESSAGE", "USER_JOINED", "USER_LEFT", "message", "MESSAGE"]
    for kind in kinds:
        for sender, shape in [("ana", "chat"), ("joe", "chat"), ("customer", "conversation"), ("rm", "conversation")]:
            probe = make_event(kind=kind, sender=sender, shape=shape)
            rest = compiled.residual(kind, role_of(probe), steps)
            for text in texts:
                event = make_event(text, kind=kind, sender=sender, shape=shape)
                for senders in [("ana", "ana", "ana"), ("joe", "customer", "rm")]:
                    bound = {name: make_event(sender=senders[i]) for name, i in steps.items()}
                    for first in (True, False):
                        expected = compiled(event, bound, first)
                        got = rest if isinstance(rest, bool) else rest(event, senders, first)
                        assert got == expected, (kind, sender, text, senders, first)


def test_summary_fields_named_in_format_specs_are_filled() -> None:
    pattern = pattern_from_dict(minimal(summary="{key}: {duration:.{count}f} s, {senders}"))
    events = [make_event("a", time=1_704_103_200.0), make_event("b", sender="bob", time=1_704_103_201.25)]
    assert pattern.summarize("room-1", events) == "room-1: 1.25 s, alice, bob"
