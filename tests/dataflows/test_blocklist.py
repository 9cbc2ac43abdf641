import pickle

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataflows.blocklist import (
    MEMO_TEXT_CHARS,
    MEMO_TEXTS,
    Action,
    BlockedTerm,
    BlockList,
    Match,
    fold,
    mask,
    normalise,
    strictest,
)
from dataflows.errors import ConvoflowError


def term(word: str, rule_id: str = "bw-1", action: Action = "mask", version: int = 2) -> BlockedTerm:
    return BlockedTerm(word, rule_id, version, action)


BLOCKED = BlockList.compile([term("darn"), term("scam link"), term("ass")])


def spans(text: str, blocklist: BlockList = BLOCKED) -> list[tuple[str, str]]:
    """Each match as (term, the original text it covers)."""
    return [(m.term, text[m.start : m.end]) for m in blocklist.find(text)]


@pytest.mark.parametrize(
    ("text", "covered"),
    [
        pytest.param("Oh DARN it", "DARN", id="case"),
        pytest.param("oh ｄａｒｎ it", "ｄａｒｎ", id="fullwidth"),
        pytest.param("oh d\u0430rn it", "d\u0430rn", id="cyrillic-a"),
        pytest.param("oh \u0501\u0430rn it", "\u0501\u0430rn", id="cyrillic-komi-de"),
        pytest.param("oh dárn it", "dárn", id="accent-precomposed"),
        pytest.param("oh da\u0301rn it", "da\u0301rn", id="accent-combining"),
        pytest.param("oh da\u200brn it", "da\u200brn", id="zero-width-space"),
        pytest.param("oh d a r n it", "d a r n", id="spaced"),
        pytest.param("oh d.a.r.n. it", "d.a.r.n", id="dotted"),
        pytest.param("oh d-a-r-n it", "d-a-r-n", id="hyphenated"),
        pytest.param("oh d_a_r_n it", "d_a_r_n", id="underscored"),
        pytest.param("oh d . a . r . n it", "d . a . r . n", id="spaced-dots"),
        pytest.param("oh (darn)!", "darn", id="punctuation-around"),
    ],
)
def test_each_trick_still_matches(text: str, covered: str) -> None:
    assert spans(text) == [("darn", covered)]


def test_greek_look_alikes_match() -> None:
    assert spans("you \u0391SS") == [("ass", "\u0391SS")]


@pytest.mark.parametrize(
    "text", ["a scam  link", "a SCAM-link", "a scam... link", "a scam\nlink", "so s c a m  l i n k"]
)
def test_phrase_matches_across_any_separators(text: str) -> None:
    assert [t for t, _ in spans(text)] == ["scam link"]
    assert spans(text)[0][1].endswith(("link", "l i n k"))


@pytest.mark.parametrize(
    "text", ["first class", "my assistant", "assess it", "a compass", "darned", "scam linker", "scamlink"]
)
def test_no_match_inside_words(text: str) -> None:
    assert spans(text) == []


@pytest.mark.parametrize("text", ["a b", "d  a  r  n", "d..a..r..n", "I saw a b c"])
def test_spaced_letters_do_not_glue_ordinary_text(text: str) -> None:
    blocklist = BlockList.compile([term("ab"), term("darn"), term("abc d")])
    assert spans(text, blocklist) == []


def test_mask_keeps_the_rest_of_the_text() -> None:
    text = "Oh d a r n, that's a SCAM -- link! (dárn)"
    assert mask(text, BLOCKED.find(text)) == "Oh ***, that's a ***! (***)"


def test_mask_covers_combining_marks_and_keeps_emoji() -> None:
    text = "😀 da\u0301rn\u0301 😀 ｄａｒｎ."
    assert mask(text, BLOCKED.find(text)) == "😀 *** 😀 ***."


def test_mask_only_touches_mask_matches() -> None:
    blocklist = BlockList.compile([term("darn", action="flag"), term("scam", action="block"), term("heck")])
    text = "darn scam heck"
    assert mask(text, blocklist.find(text)) == "darn scam ***"


def test_a_term_in_several_rules_is_reported_once_per_rule() -> None:
    flag, block = term("darn", "r-flag", "flag"), term("DARN", "r-block", "block")
    found = BlockList.compile([flag, block, flag]).find("well darn")
    assert [(m.rule_id, m.action, m.start, m.end) for m in found] == [
        ("r-flag", "flag", 5, 9),
        ("r-block", "block", 5, 9),
    ]
    assert strictest(found) == "block"


def test_a_shorter_term_inside_a_phrase_is_not_hidden() -> None:
    blocklist = BlockList.compile([term("scam link", "r-flag", "flag"), term("scam", "r-block", "block")])
    found = blocklist.find("a scam link")
    assert [(m.term, m.start, m.end) for m in found] == [("scam link", 2, 11), ("scam", 2, 6)]
    assert strictest(found) == "block"


def test_match_carries_the_rule() -> None:
    assert BLOCKED.find("darn") == (Match("darn", "bw-1", 2, "mask", 0, 4),)


def test_empty_word_lists() -> None:
    empty = BlockList.compile([])
    assert empty.find("darn it") == ()
    assert BLOCKED.find("") == ()
    assert strictest([]) is None


@pytest.mark.parametrize(
    ("bad", "reason"),
    [(term("!!!"), "no letters or digits"), (term("darn", action="ban"), "'ban'")],  # type: ignore[arg-type]
)
def test_bad_terms_are_rejected_naming_the_rule(bad: BlockedTerm, reason: str) -> None:
    with pytest.raises(ConvoflowError, match=rf"rule bw-1 v2: .*{reason}"):
        BlockList.compile([bad])


def test_compiled_list_pickles() -> None:
    restored = pickle.loads(pickle.dumps(BLOCKED))
    assert restored == BLOCKED
    assert restored.find("DARN") == BLOCKED.find("DARN")


def test_non_ascii_terms() -> None:
    blocklist = BlockList.compile([term("жук"), term("Straße")])
    assert spans("большой ЖУК!", blocklist) == [("жук", "ЖУК")]
    assert spans("die STRASSE", blocklist) == [("Straße", "STRASSE")]


def test_normalise_maps_back_to_the_original() -> None:
    folded = normalise("Ｘ dá\u200bß")
    assert folded.text == "x dass"
    assert [(folded.starts[j], folded.ends[j]) for j in range(len(folded.text))] == [
        (0, 1), (1, 2), (2, 3), (3, 5), (5, 6), (5, 6)]


TRICKY = st.text(
    st.sampled_from([*"darnscmlikASS .-_!", *"аáｄ😀ß™ｶﾞжук", "\u0301", "\u200b", "\u3000", "\xa0"]),
    max_size=40,
)
WITH_NON_ASCII_KEY = BlockList.compile([term("darn"), term("scam link"), term("a s"), term("жук"), term("ss")])


@given(st.one_of(st.text(max_size=80), TRICKY))
def test_find_never_raises_and_spans_stay_in_the_text(text: str) -> None:
    for blocklist in (BLOCKED, WITH_NON_ASCII_KEY):
        for m in blocklist.find(text):
            assert 0 <= m.start < m.end <= len(text)


@given(st.one_of(st.text(max_size=80), TRICKY))
def test_quick_rejection_never_hides_a_match(text: str) -> None:
    for blocklist in (BLOCKED, WITH_NON_ASCII_KEY):
        assert blocklist._may_match(text) or blocklist._scan(text) == []
        assert blocklist.find(text) == tuple(blocklist._scan(text))


@given(st.one_of(st.text(max_size=80), TRICKY))
def test_normalise_agrees_with_fold(text: str) -> None:
    folded = normalise(text)
    assert folded.text == fold(text)
    assert len(folded.starts) == len(folded.ends) == len(folded.text)
    assert all(0 <= s < e <= len(text) for s, e in zip(folded.starts, folded.ends))


@given(st.text(max_size=80))
def test_masking_without_matches_changes_nothing(text: str) -> None:
    assert mask(text, []) == text
    assert mask(text, [m for m in BLOCKED.find(text) if m.action != "mask"]) == text


def test_a_repeated_text_is_answered_from_memory_and_a_long_one_is_not_kept() -> None:
    blocklist = BlockList.compile([term("darn")])
    first = blocklist.find("oh darn it")
    assert blocklist.find("oh darn it") is first
    assert list(blocklist.memo) == ["oh darn it"]
    long = "darn " * (MEMO_TEXT_CHARS // 5 + 1)
    assert len(blocklist.find(long)) == MEMO_TEXT_CHARS // 5 + 1
    assert long not in blocklist.memo
    for n in range(MEMO_TEXTS + 1):
        blocklist.find(f"message {n}")
    assert len(blocklist.memo) <= MEMO_TEXTS, "the memory is bounded"
    assert blocklist.find("oh darn it") == first
