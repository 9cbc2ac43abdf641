"""Find blocked words and phrases in message text, through the usual evasion tricks.

Matching is whole-word on folded text, so a blocked `ass` never fires inside `class` and
`darn` does not match `darned` (list inflections as terms of their own). Folding: NFKD
(fullwidth and other compatibility forms), diacritics and zero-width characters dropped, the
look-alikes in `CONFUSABLES` mapped to Latin, NFKC, casefold. Words are runs of letters and
digits; three or more single letters joined by single separators (`d a r n`, `d.a.r.n`,
`d _ a _ r _ n`) read as one word, the whole run (`x d a r n` is `xdarn`), and two spaces end
a run (`s c a m  l i n k` is `scam link`). A phrase matches with any separators between its
words (`SCAM-link`). Terms fold the same way and are indexed by first word: a cheap word-set
test rejects most messages, the rest cost one dict lookup per word, whatever the term count.
A block list remembers the matches of the last texts it was asked about (a list is immutable, so
they never go stale), as chat repeats itself. Every occurrence of every term is reported, once
per rule; `strictest` picks the action.

Not caught, by design: leetspeak (`d4rn`), repeated letters (`daaarn`), split words (`da rn`),
spaced-out words of one or two letters, and look-alikes outside `CONFUSABLES` (a small table,
not Unicode's confusables data). The table applies to every word, so a Cyrillic word spelt
only with look-alikes (Russian `рот`) matches the Latin term it resembles (`pot`).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Container, Iterable, Sequence
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Final, Literal, NamedTuple, TypeVar, get_args

from dataflows.errors import ConvoflowError

Action = Literal["mask", "block", "flag"]
ACTIONS: Final = frozenset(get_args(Action))
STRICTNESS: Final = {"flag": 0, "mask": 1, "block": 2}
MASK: Final = "***"
MIN_SPACED_LETTERS: Final = 3
MEMO_TEXTS: Final = 16384
"""Texts whose matches a block list remembers; chat repeats itself (greetings, thanks, canned replies)."""
MEMO_TEXT_CHARS: Final = 512

K = TypeVar("K")
V = TypeVar("V")


def remember(memo: dict[K, V], text: str, key: K, value: V) -> None:
    """Keep what was worked out for `text` under `key` in a memo of recent texts: only texts of
    `MEMO_TEXT_CHARS` or fewer, and the memo starts afresh once it holds `MEMO_TEXTS`."""
    if len(text) <= MEMO_TEXT_CHARS:
        if len(memo) >= MEMO_TEXTS:
            memo.clear()
        memo[key] = value

CONFUSABLES: Final = {
    "a": "АаΑα", "b": "ВвΒβ", "c": "Ссϲ", "d": "Ԁԁ", "e": "ЕеΕε", "h": "НнҺһΗ", "i": "ІіΙι",
    "j": "ЈјͿϳ", "k": "КкΚκ", "l": "Ӏӏ", "m": "МмΜ", "n": "Νη", "o": "ОоΟο", "p": "РрΡρ",
    "q": "Ԛԛ", "s": "Ѕѕ", "t": "ТтΤτ", "u": "μυ", "v": "ν", "w": "Ԝԝ", "x": "ХхΧχ", "y": "УуҮүΥγ", "z": "Ζ",
}
_DROPPED: Final = (  # combining diacritics, soft hyphen, zero-width characters
    (0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF), (0xFE20, 0xFE2F),
    (0x00AD, 0x00AD), (0x180E, 0x180E), (0x200B, 0x200D), (0x2060, 0x2060), (0xFEFF, 0xFEFF),
)
_DROPPED_CLASS = "".join(f"{chr(lo)}-{chr(hi)}" for lo, hi in _DROPPED)
_FOLD: Final = str.maketrans(
    "".join(CONFUSABLES.values()),
    "".join(latin * len(alike) for latin, alike in CONFUSABLES.items()),
    "".join(chr(c) for lo, hi in _DROPPED for c in range(lo, hi + 1)),
)
_FOLDABLE: Final = re.compile(f"[{_DROPPED_CLASS}{''.join(CONFUSABLES.values())}]")
_FOREIGN: Final = re.compile(rf"[^\x00-\x7f{_DROPPED_CLASS}]")
_WORD: Final = re.compile(r"[^\W_]+")
_SEPARATORS: Final = re.compile(r"([\W_]+)")
_NON_ASCII: Final = re.compile(r"[^\x00-\x7f]+")
_SPACE: Final = re.compile(r"\s")
_GLUE_GAP: Final = re.compile(r"\s|\s?[^\w\s]\s?|\s?_\s?")
_ASCII_WORDS: Final = bytes(ord(chr(c).lower()) if c < 128 and chr(c).isalnum() else 32 for c in range(256))


class Folded(NamedTuple):
    """`fold(text)` with, for its character j, the span `starts[j]:ends[j]` of text it came from."""

    text: str
    starts: Sequence[int]
    ends: Sequence[int]


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
    """The blocked terms of every rule in force, indexed for matching; build it with `compile`.

    `ascii_keys` holds the ASCII first words as bytes, so most messages are ruled out on
    bytes without building a string per word; `all_ascii` says whether there are others.
    `memo` holds the matches of recent texts (up to `MEMO_TEXTS` of `MEMO_TEXT_CHARS` or fewer).
    """

    terms: tuple[BlockedTerm, ...]
    index: dict[str, tuple[_Phrase, ...]] = field(repr=False, compare=False)
    ascii_keys: frozenset[bytes] = field(repr=False, compare=False)
    all_ascii: bool = field(repr=False, compare=False)
    memo: dict[str, tuple[Match, ...]] = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def compile(cls, terms: Iterable[BlockedTerm]) -> BlockList:
        """Index `terms` by their first folded word, longest phrase first.

        A term written twice in one rule (`darn`, `DARN`) is kept once. Raises `ConvoflowError`
        for an unknown action or a term with no letters or digits.
        """
        kept = tuple(dict.fromkeys(terms))
        phrases: dict[tuple[str, ...], dict[tuple[str, int, str], BlockedTerm]] = {}
        for t in kept:
            if t.action not in ACTIONS:
                msg = f"rule {t.rule_id} v{t.version}: action {t.action!r} is not one of {sorted(ACTIONS)}"
                raise ConvoflowError(msg)
            words = tuple(w for w in _words(fold(t.term))[0] if w)
            if not words:
                msg = f"rule {t.rule_id} v{t.version}: blocked term {t.term!r} has no letters or digits"
                raise ConvoflowError(msg)
            phrases.setdefault(words, {}).setdefault((t.rule_id, t.version, t.action), t)
        index: dict[str, list[_Phrase]] = {}
        for words, hits in sorted(phrases.items(), key=lambda p: -len(p[0])):
            index.setdefault(words[0], []).append((words[1:], tuple(hits.values())))
        ascii_keys = frozenset(k.encode() for k in index if k.isascii())
        return cls(kept, {w: tuple(p) for w, p in index.items()}, ascii_keys, len(ascii_keys) == len(index))

    def find(self, text: str) -> tuple[Match, ...]:
        """Every occurrence of every term in `text`, by start, longest first at one start.

        Overlapping occurrences are all reported (`scam` inside `scam link`), and a term in
        several rules gives one match per rule, so a `block` rule is never hidden behind a
        `flag` one: pick the action with `strictest`.
        """
        found = self.memo.get(text)
        if found is None:
            found = tuple(self._scan(text)) if self.index and self._may_match(text) else ()
            remember(self.memo, text, text, found)
        return found

    def _scan(self, text: str) -> list[Match]:
        folded = normalise(text)
        words, starts, ends = _words(folded.text)
        found: list[Match] = []
        for i, word in enumerate(words):
            for rest, hits in self.index.get(word, ()):
                if rest and tuple(words[i + 1 : i + 1 + len(rest)]) != rest:
                    continue
                span = (folded.starts[starts[i]], folded.ends[ends[i + len(rest)] - 1])
                found.extend(Match(h.term, h.rule_id, h.version, h.action, *span) for h in hits)
        return found

    def _may_match(self, text: str) -> bool:
        """False only when no word of `fold(text)` can start a term, tested as cheaply as possible."""
        if text.isascii():
            flat = text.encode()
        else:
            decomposed = unicodedata.normalize("NFKD", text)
            if _FOREIGN.search(decomposed) is None:
                flat = decomposed.encode("ascii", "ignore")
            elif self.all_ascii:
                # no key holds a non-ASCII character, so reading one as a separator loses no key
                flat = _fold_decomposed(decomposed).encode("ascii", "replace")
            else:
                return _has_candidates(self.index.keys(), _WORD.findall(_fold_decomposed(decomposed)))
        return _has_candidates(self.ascii_keys, flat.translate(_ASCII_WORDS).split())


def _has_candidates(keys: Container[str] | Container[bytes], words: Sequence[str] | Sequence[bytes]) -> bool:
    run = 0
    for word in words:
        if word in keys:
            return True
        run = run + 1 if len(word) == 1 else 0
        if run == MIN_SPACED_LETTERS:
            return True
    return False


def fold(text: str) -> str:
    """`text` in matching form: compatibility forms, diacritics, look-alikes and case folded."""
    if text.isascii():
        return text.lower()
    return _fold_decomposed(unicodedata.normalize("NFKD", text))


def _fold_decomposed(text: str) -> str:
    if _FOLDABLE.search(text):
        text = text.translate(_FOLD)
    return unicodedata.normalize("NFKC", text).casefold()


def normalise(text: str) -> Folded:
    """`fold(text)` with the original span of each of its characters, for mapping matches back.

    Folding never joins across whitespace, so ASCII stretches are lowercased in bulk and each
    whitespace-delimited chunk holding other characters is folded alone. Within a chunk,
    characters map one by one unless folding joined them (a decomposed kana and its voicing
    mark); then every character of the chunk maps to the whole chunk.
    """
    if text.isascii():
        return Folded(text.lower(), range(len(text)), range(1, len(text) + 1))
    parts: list[str] = []
    starts: list[int] = []
    ends: list[int] = []
    pos = 0
    while True:
        run = _NON_ASCII.search(text, pos)
        at = len(text) if run is None else run.start()
        while run is not None and at > pos and not text[at - 1].isspace():
            at -= 1
        parts.append(text[pos:at].lower())
        starts += range(pos, at)
        ends += range(pos + 1, at + 1)
        if run is None:
            return Folded("".join(parts), starts, ends)
        space = _SPACE.search(text, run.end())
        end = len(text) if space is None else space.start()
        _map_chunk(text[at:end], at, parts, starts, ends)
        pos = end


def _map_chunk(chunk: str, at: int, parts: list[str], starts: list[int], ends: list[int]) -> None:
    whole = fold(chunk)
    parts.append(whole)
    pieces = [c.lower() if c < "\x80" else fold(c) for c in chunk]
    if "".join(pieces) != whole:
        starts += [at] * len(whole)
        ends += [at + len(chunk)] * len(whole)
        return
    first = len(ends)
    for i, piece in enumerate(pieces):
        if piece:
            starts += [at + i] * len(piece)
            ends += [at + i + 1] * len(piece)
        elif len(ends) > first:
            ends[-1] = at + i + 1  # a dropped mark or zero-width character goes with the letter before it


def _words(folded: str) -> tuple[list[str], list[int], list[int]]:
    """The words of a folded text and their spans, each run of spaced-out single letters joined.

    The first and last word are empty when the text starts or ends with a separator.
    """
    parts = _SEPARATORS.split(folded)
    bounds = list(accumulate(map(len, parts), initial=0))
    words, gaps, starts, ends = parts[0::2], parts[1::2], bounds[0::2], bounds[1::2]
    if list(map(len, words)).count(1) < MIN_SPACED_LETTERS:
        return words, starts, ends
    runs: list[tuple[int, int]] = []
    first = 0
    for k in range(1, len(words) + 1):
        if k < len(words) and len(words[k - 1]) == len(words[k]) == 1 and _GLUE_GAP.fullmatch(gaps[k - 1]):
            continue
        if k - first >= MIN_SPACED_LETTERS:
            runs.append((first, k))
        first = k
    for a, b in reversed(runs):
        words[a:b], starts[a:b], ends[a:b] = ["".join(words[a:b])], [starts[a]], [ends[b - 1]]
    return words, starts, ends


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
