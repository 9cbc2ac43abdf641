"""Find blocked words and phrases in message text, through the usual evasion tricks.

Matching is whole-word on normalised tokens: a blocked `ass` never fires inside `class` or
`assistant`, and `darn` does not match `darned` (list inflections as terms of their own).
A text is split into tokens (runs of letters and digits, with any diacritics and invisible
characters inside them). Each token is normalised: NFKD (fullwidth and other compatibility
forms), diacritics and zero-width characters dropped, the Cyrillic/Greek look-alikes in
`CONFUSABLES` mapped to Latin, NFKC, casefold. A run of three or more single letters joined by
single separators (`d a r n`, `d.a.r.n`, `d - a - r - n`, `d_a_r_n`) reads as one word; two
spaces end the run, so `s c a m  l i n k` reads as `scam link`. A phrase matches its words
with any separators between them (`scam  link`, `SCAM-link`). Terms are normalised the same
way and indexed by their first word, so finding costs one dict lookup per token however many
terms are loaded.

Deliberately not caught: leetspeak (`d4rn`), repeated letters (`daaarn`), words split in two
(`da rn`), spaced-out words of one or two letters, terms inside longer words, and look-alikes
outside `CONFUSABLES` (this is not the full Unicode confusables data). The table is applied to
every token, so a Cyrillic or Greek word spelt only with look-alikes (Russian `рот`) matches
the Latin term it resembles (`pot`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Final, Literal, NamedTuple, get_args

from dataflows.errors import ConvoflowError

Action = Literal["mask", "block", "flag"]
ACTIONS: Final = frozenset(get_args(Action))
STRICTNESS: Final = {"flag": 0, "mask": 1, "block": 2}
MASK: Final = "***"
MIN_SPACED_LETTERS = 3

CONFUSABLES: Final = {
    "a": "АаΑα", "b": "ВвΒβ", "c": "Ссϲ", "d": "Ԁԁ", "e": "ЕеΕε", "h": "НнҺһΗ", "i": "ІіΙι", "j": "ЈјͿϳ",
    "k": "КкΚκ", "l": "Ӏӏ", "m": "МмΜ", "n": "Νη", "o": "ОоΟο", "p": "РрΡρ", "q": "Ԛԛ", "s": "Ѕѕ",
    "t": "ТтΤτ", "u": "μυ", "v": "ν", "w": "Ԝԝ", "x": "ХхΧχ", "y": "УуҮүΥγ", "z": "Ζ",
}
_DROPPED: Final = (  # combining diacritics, then soft hyphen and zero-width characters
    (0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF), (0xFE20, 0xFE2F),
    (0x00AD, 0x00AD), (0x180E, 0x180E), (0x200B, 0x200D), (0x2060, 0x2060), (0xFEFF, 0xFEFF),
)
_DROPPED_CLASS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _DROPPED)
_TOKEN: Final = re.compile(rf"(?:[^\W_]|[{_DROPPED_CLASS}])+")
_ASCII_TOKEN: Final = re.compile(r"[a-z0-9]+")
_GAP = r"\s|\s?[^\w\s]\s?|\s?_\s?"
_GLUE_GAP: Final = re.compile(_GAP)
_ASCII_SPACED: Final = re.compile(rf"(?<![a-z0-9])[a-z0-9](?:(?:{_GAP})[a-z0-9](?![a-z0-9])){{2}}")
_FOLD: Final = str.maketrans(
    "".join(CONFUSABLES.values()),
    "".join(latin * len(alike) for latin, alike in CONFUSABLES.items()),
    "".join(chr(c) for lo, hi in _DROPPED for c in range(lo, hi + 1)),
)


class Token(NamedTuple):
    """One normalised word and its span `[start, end)` in the original text."""

    text: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class BlockedTerm:
    """One word or phrase of a blocked_words rule, with the rule's id, version and action."""

    term: str
    rule_id: str
    version: int
    action: Action


@dataclass(frozen=True, slots=True)
class Match:
    """One occurrence of a blocked term; `start`/`end` span the original text."""

    term: str
    rule_id: str
    version: int
    action: Action
    start: int
    end: int


_Phrase = tuple[tuple[str, ...], tuple[BlockedTerm, ...]]


@dataclass(frozen=True, slots=True)
class BlockList:
    """The blocked terms of every rule in force, indexed for matching; build it with `compile`."""

    terms: tuple[BlockedTerm, ...]
    index: dict[str, tuple[_Phrase, ...]] = field(repr=False, compare=False)

    @classmethod
    def compile(cls, terms: Iterable[BlockedTerm]) -> BlockList:
        """Index `terms` by their first normalised word, longest phrase first.

        A term written twice in one rule (`darn`, `DARN`) is kept once. Raises `ConvoflowError`
        for an unknown action or a term with no letters or digits.
        """
        kept = tuple(dict.fromkeys(terms))
        phrases: dict[tuple[str, ...], dict[tuple[str, int, str], BlockedTerm]] = {}
        for t in kept:
            if t.action not in ACTIONS:
                msg = f"rule {t.rule_id} v{t.version}: action {t.action!r} is not one of {sorted(ACTIONS)}"
                raise ConvoflowError(msg)
            words = tuple(tok.text for tok in tokenise(t.term))
            if not words:
                msg = f"rule {t.rule_id} v{t.version}: blocked term {t.term!r} has no letters or digits"
                raise ConvoflowError(msg)
            phrases.setdefault(words, {}).setdefault((t.rule_id, t.version, t.action), t)
        index: dict[str, list[_Phrase]] = {}
        for words, hits in sorted(phrases.items(), key=lambda p: -len(p[0])):
            index.setdefault(words[0], []).append((words[1:], tuple(hits.values())))
        return cls(kept, {w: tuple(p) for w, p in index.items()})

    def find(self, text: str) -> list[Match]:
        """Every occurrence of every term in `text`, by start, longest first at one start.

        Overlapping occurrences are all reported (`scam` inside `scam link`), and a term in
        several rules gives one match per rule, so a `block` rule is never hidden behind a
        `flag` one: pick the action with `strictest`.
        """
        if not self.index:
            return []
        if text.isascii():
            lowered = text.lower()
            if self.index.keys().isdisjoint(_ASCII_TOKEN.findall(lowered)) and not _ASCII_SPACED.search(lowered):
                return []
        tokens = tokenise(text)
        words = [tok.text for tok in tokens]
        found: list[Match] = []
        for i, (word, start, _) in enumerate(tokens):
            for rest, hits in self.index.get(word, ()):
                if rest and tuple(words[i + 1 : i + 1 + len(rest)]) != rest:
                    continue
                end = tokens[i + len(rest)].end
                found.extend(Match(h.term, h.rule_id, h.version, h.action, start, end) for h in hits)
        return found


def tokenise(text: str) -> list[Token]:
    """The normalised words of `text` with their original spans, spaced-out letters joined."""
    if text.isascii():
        tokens = [Token(m.group(), m.start(), m.end()) for m in _ASCII_TOKEN.finditer(text.lower())]
    else:
        tokens = [Token(w, m.start(), m.end()) for m in _TOKEN.finditer(text) if (w := normalise_word(m.group()))]
    return _join_spaced(tokens, text)


def normalise_word(word: str) -> str:
    """One token in matching form: compatibility forms, diacritics, look-alikes and case folded."""
    if word.isascii():
        return word.lower()
    return unicodedata.normalize("NFKC", unicodedata.normalize("NFKD", word).translate(_FOLD)).casefold()


def _join_spaced(tokens: list[Token], text: str) -> list[Token]:
    out: list[Token] = []
    run: list[Token] = []
    for tok in [*tokens, Token("", len(text), len(text))]:
        if len(tok.text) == 1 and (not run or _GLUE_GAP.fullmatch(text, run[-1].end, tok.start)):
            run.append(tok)
            continue
        if len(run) >= MIN_SPACED_LETTERS:
            out.append(Token("".join(t.text for t in run), run[0].start, run[-1].end))
        else:
            out.extend(run)
        run = [tok] if len(tok.text) == 1 else []
        if not run and tok.text:
            out.append(tok)
    return out


def mask(text: str, matches: Iterable[Match], replacement: str = MASK) -> str:
    """`text` with the span of each `mask` match replaced by `replacement`, overlaps merged."""
    spans = sorted((m.start, m.end) for m in matches if m.action == "mask")
    parts: list[str] = []
    pos = 0
    for start, end in spans:
        if start >= pos:
            parts += [text[pos:start], replacement]
        pos = max(pos, end)
    return "".join([*parts, text[pos:]]) if parts else text


def strictest(matches: Iterable[Match]) -> Action | None:
    """The strictest action among `matches` (block > mask > flag), or None when there are none."""
    return max((m.action for m in matches), key=STRICTNESS.__getitem__, default=None)
