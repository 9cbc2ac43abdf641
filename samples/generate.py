"""Seeded, streaming generator of realistic JSONL input for convoflow.

Two event shapes are interleaved in timestamp order:

* conversation events between a relationship manager and a customer::

    {"session_id": "s-0001", "sender": "customer", "message": "...", "timestamp": "2024-03-04T09:00:03+00:00"}

* chat-room events::

    {"username": "alice", "text": "Hello", "type": "USER_MESSAGE", "preferredLanguage": "es", "timestamp": 1709542800}

On top of that the file carries the dirt a real feed has: slightly out-of-order events, a few very late
events, malformed lines and events without a timestamp. Output is a pure function of the `SampleSpec`,
and generation is a lazy k-way merge, so memory stays bounded for any number of sessions.
"""

from __future__ import annotations

import heapq
import itertools
import json
import random
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

Shape = Literal["conversation", "chat"]
_Item = tuple[int, Shape, dict[str, object]]
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
_MEAN_SESSION_GAP_MS = 7_500
_LINES_PER_SESSION = 12.6


@dataclass(frozen=True)
class SampleSpec:
    """What to generate; every field affects the output, and equal specs give identical bytes."""

    sessions: int = 40
    chat_users: int = 12
    seed: int = 7
    start: datetime = datetime(2024, 3, 4, 9, 0, tzinfo=timezone.utc)
    out_of_order_fraction: float = 0.02
    late_fraction: float = 0.004
    malformed_fraction: float = 0.004
    no_timestamp_fraction: float = 0.003

    def __post_init__(self) -> None:
        if self.start.tzinfo is None:
            msg = f"SampleSpec.start must be timezone-aware, got {self.start!r}"
            raise ValueError(msg)
        if self.sessions < 0 or self.chat_users < 0:
            msg = f"SampleSpec counts must be >= 0, got sessions={self.sessions}, chat_users={self.chat_users}"
            raise ValueError(msg)
        fractions = (self.out_of_order_fraction, self.late_fraction, self.no_timestamp_fraction)
        if not all(0.0 <= f for f in (*fractions, self.malformed_fraction)) or sum(fractions) > 1.0:
            msg = f"SampleSpec fractions must be >= 0 and the per-event ones sum to <= 1: {self!r}"
            raise ValueError(msg)


@dataclass(frozen=True)
class _Topic:
    openers: tuple[str, ...]
    questions: tuple[str, ...]
    answers: tuple[str, ...]


_TOPICS = (
    _Topic(("Hi, my card ending {last4} was blocked at the supermarket. What happened?",
            "My debit card stopped working this morning, can you help?"),
           ("Can you unblock it today?", "Will I need a new card?", "Why was it blocked in the first place?"),
           ("I can see a security block after three wrong PIN attempts.",
            "I have lifted the block; please try a small purchase.",
            "A replacement card would arrive in 3-5 business days.")),
    _Topic(("Hello, what is the current rate for a 30-year fixed mortgage?",
            "Hi, is now a good time to refinance my mortgage?"),
           ("Is that rate locked if I apply this week?", "What would the monthly payment be on {amount} USD?",
            "Are there any closing costs?"),
           ("Today's 30-year fixed rate is {rate}% for your profile.",
            "A rate lock holds for 45 days once the application is in.",
            "Closing costs are usually 2-3% of the loan amount.")),
    _Topic(("I sent a wire of {amount} USD on {day} and it still hasn't arrived. Where is it?",
            "Hi, my international transfer is delayed, can you check?"),
           ("Can you give me the reference number?", "Is there a fee to trace it?", "When will it land?"),
           ("The wire left us on {day}; the receiving bank is holding it for review.",
            "I have opened a trace, reference WT-{last4}.",
            "International wires can take up to 5 business days.")),
    _Topic(("I got a fraud alert about a charge of {amount} USD in {place}. That was not me!",
            "Hi, I received a text saying there's suspicious activity on my account?"),
           ("Will I get the money back?", "Should I change my online banking password?",
            "Is my card still safe to use?"),
           ("I have frozen the card and flagged the charge as fraud.",
            "You will get a provisional credit within 2 business days.",
            "Yes, please change your password as a precaution.")),
    _Topic(("Hello, I'd like to upgrade my account to Premier. What do I need?",
            "Hi, what are the benefits of the premium checking account?"),
           ("Is there a monthly fee?", "Do I keep my account number?", "What balance do I need to keep?"),
           ("Premier waives the fee with a balance above {amount} USD.",
            "Your account number stays the same.",
            "I can switch you over today if you like.")),
    _Topic(("I'm travelling to {place} on {day}. Do I need to tell you?",
            "Hi, can I set a travel notice on my cards?"),
           ("Will my card work at ATMs there?", "Are there foreign transaction fees?",
            "Does that cover my credit card too?"),
           ("I have added a travel notice for {place} starting {day}.",
            "Your debit card has no foreign transaction fee.",
            "The notice covers all cards on the account.")),
    _Topic(("Hi, any news on my loan application from last week?",
            "Hello, what is the status of my personal loan request for {amount} USD?"),
           ("Do you need any more documents from me?", "When will I hear back?", "Was it approved?"),
           ("The application is with underwriting right now.",
            "We still need your last two pay slips.",
            "You should have a decision by {day}.")),
)
_CUSTOMER_FILLER = ("ok", "one sec, checking my app", "I see.", "Got it.", "Sorry, which form do you mean?")
_CUSTOMER_THANKS = ("thanks, that helps", "thank you!", "Great, thanks a lot.", "Perfect, thank you.")
_RM_FILLER = ("Let me check that for you.", "Could you confirm the last four digits of your card?",
              "Thanks for waiting, I'm looking into it.", "Can you confirm your date of birth?")
_RM_CLOSING = ("Is there anything else I can help you with today?", "You're welcome, have a great day!",
               "Happy to help. I'll follow up by email.", "Glad we sorted it out. Take care!")
_DAYS = ("Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "March 12", "the 20th")
_PLACES = ("Lisbon", "Tokyo", "Mexico City", "Berlin", "Toronto", "Cape Town")

_CHAT_TEXT: dict[str, dict[str, tuple[str, ...]]] = {
    "en": {"hello": ("Hello", "hi all", "hey everyone"),
           "question": ("Does anyone know how to reset the PIN?", "Is the app down for you too?",
                        "How long does a transfer take?"),
           "answer": ("Try logging out and in again.", "It took two days for me.", "Works fine here."),
           "thanks": ("thanks!", "thank you", "thx, that worked")},
    "es": {"hello": ("Hola", "hola a todos"),
           "question": ("¿Alguien sabe cómo cambiar el PIN?", "¿La app funciona para vosotros?"),
           "answer": ("Prueba a cerrar sesión.", "A mí me tardó dos días."),
           "thanks": ("gracias", "¡muchas gracias!")},
    "fr": {"hello": ("Bonjour", "salut"),
           "question": ("Quelqu'un sait comment débloquer la carte ?", "Le virement prend combien de temps ?"),
           "answer": ("Il faut appeler le service client.", "Chez moi ça marche."),
           "thanks": ("merci", "merci beaucoup !")},
    "de": {"hello": ("Hallo", "Guten Morgen"),
           "question": ("Weiß jemand, wie man das Limit ändert?", "Geht die App bei euch?"),
           "answer": ("Das geht in den Einstellungen.", "Bei mir hat es zwei Tage gedauert."),
           "thanks": ("danke", "vielen Dank!")},
}
_LANGUAGES = ("en", "en", "es", "fr", "de")
_ROOMS = ("room-1", "room-2", "room-3")
_NAMES = ("alice", "bruno", "chen", "dara", "elena", "farid", "greta", "hugo",
          "ines", "jonas", "kemal", "lucia", "marek", "noor", "oscar", "priya")
_BAD_TIMESTAMPS = ("yesterday", "not a date", "2024-13-45T25:61:00")


def _dumps(obj: object) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(", ", ": "))


def _gap_ms(rng: random.Random, sender: str) -> int:
    """Think time before a message: RMs look things up, customers type quickly, and some pauses are long."""
    if rng.random() < 0.05:
        return rng.randint(40_000, 120_000)
    return rng.randint(5_000, 25_000) if sender == "rm" else rng.randint(2_000, 15_000)


def _conversation(rng: random.Random, session_id: str, start_ms: int) -> Iterator[_Item]:
    """Yield one RM-customer conversation of 4-16 messages, customer first and RM last."""
    topic = rng.choice(_TOPICS)
    fills = {"last4": f"{rng.randint(0, 9999):04d}", "amount": f"{rng.randint(2, 250) * 100:,}",
             "day": rng.choice(_DAYS), "place": rng.choice(_PLACES), "rate": f"{rng.uniform(5.1, 7.4):.2f}"}
    questions = itertools.cycle(rng.sample(topic.questions, len(topic.questions)))
    answers = itertools.cycle(rng.sample(topic.answers, len(topic.answers)))
    count = rng.randint(4, 16)
    ts, sender = start_ms, "customer"
    for index in range(count):
        if index == 0:
            text = rng.choice(topic.openers)
        elif index == count - 1:
            text = rng.choice(_RM_CLOSING)
        elif sender == "customer":
            roll = 0.9 if index == count - 2 and rng.random() < 0.6 else rng.random()
            text = next(questions) if roll < 0.55 else rng.choice(_CUSTOMER_FILLER if roll < 0.8 else _CUSTOMER_THANKS)
        else:
            text = next(answers) if rng.random() < 0.65 else rng.choice(_RM_FILLER)
        yield ts, "conversation", {"session_id": session_id, "sender": sender, "message": text.format(**fills)}
        if index == count - 2:
            sender = "rm"
        elif index > 0 and sender == "customer" and rng.random() < 0.15:
            sender = "customer"
        else:
            sender = "rm" if sender == "customer" else "customer"
        ts += _gap_ms(rng, sender)


def _chat_user(rng: random.Random, base: str, start_ms: int) -> Iterator[_Item]:
    """Yield one chat slot forever: a user joins, maybe writes or spams, leaves, and later someone rejoins."""
    ts = start_ms + rng.randint(0, 90_000)
    for cycle in itertools.count(1):
        name = base if cycle == 1 else f"{base}_{cycle}"
        language = rng.choice(_LANGUAGES)
        texts = _CHAT_TEXT[language]
        room = {"room": rng.choice(_ROOMS)} if rng.random() < 0.6 else {}

        def event(kind: str, text: str) -> dict[str, object]:
            return {"username": name, "text": text, "type": kind, "preferredLanguage": language, **room}

        yield ts, "chat", event("USER_JOINED", "")
        messages = 0 if rng.random() < 0.2 else rng.randint(1, 6)
        for index in range(messages):
            ts += rng.randint(3_000, 40_000)
            kind = "hello" if index == 0 and rng.random() < 0.5 else rng.choice(("question", "answer", "thanks"))
            yield ts, "chat", event("USER_MESSAGE", rng.choice(texts[kind]))
        if messages and rng.random() < 0.06:
            burst_start = ts
            for offset in sorted(rng.randint(300, 10_000) for _ in range(rng.randint(5, 8))):
                ts = burst_start + offset
                yield ts, "chat", event("USER_MESSAGE", rng.choice(texts["question"] + texts["hello"]))
        ts += rng.randint(5_000, 60_000)
        yield ts, "chat", event("USER_LEFT", "")
        ts += rng.randint(20_000, 150_000)


def _arrivals(rng: random.Random, start_ms: int, sessions: int) -> Iterator[tuple[int, int]]:
    """Yield (start time, session number) with exponential gaps, so sessions overlap like Poisson arrivals."""
    ts = float(start_ms)
    for number in range(1, sessions + 1):
        yield int(ts), number
        ts += rng.expovariate(1.0 / _MEAN_SESSION_GAP_MS)


def _username(slot: int) -> str:
    base = _NAMES[slot % len(_NAMES)]
    return base if slot < len(_NAMES) else f"{base}{slot // len(_NAMES)}"


def _events(spec: SampleSpec, rng: random.Random) -> Iterator[_Item]:
    """Merge all sessions and chat slots in timestamp order, starting sessions only when their time comes.

    Chat slots stop at their next join once every session has started and finished, so the chat shape
    spans the same stretch of time as the conversations.
    """
    start_ms = int(spec.start.timestamp() * 1000)
    seeds = random.Random(rng.getrandbits(64))
    order = itertools.count()
    heap: list[tuple[int, int, _Item, Iterator[_Item]]] = []

    def push(stream: Iterator[_Item]) -> bool:
        item = next(stream, None)
        if item is not None:
            heapq.heappush(heap, (item[0], next(order), item, stream))
        return item is not None

    arrivals = _arrivals(random.Random(seeds.getrandbits(64)), start_ms, spec.sessions)
    arrival = next(arrivals, None)
    for slot in range(spec.chat_users):
        push(_chat_user(random.Random(seeds.getrandbits(64)), _username(slot), start_ms))
    active = 0
    while heap or arrival is not None:
        if arrival is not None and (not heap or arrival[0] <= heap[0][0]):
            ts, number = arrival
            active += push(_conversation(random.Random(seeds.getrandbits(64)), f"s-{number:04d}", ts))
            arrival = next(arrivals, None)
            continue
        _, _, item, stream = heapq.heappop(heap)
        _, shape, fields = item
        if shape == "chat" and arrival is None and active == 0 and fields["type"] == "USER_JOINED":
            continue
        yield item
        if not push(stream) and shape == "conversation":
            active -= 1


def _iso(ts_ms: int, rng: random.Random) -> str:
    """Mostly `+00:00`; some `Z`, a few naive, a few with milliseconds, as mixed producers would write."""
    moment = _EPOCH + timedelta(milliseconds=ts_ms)
    roll = rng.random()
    if roll < 0.05:
        return moment.isoformat(timespec="milliseconds")
    text = moment.isoformat(timespec="seconds")
    if roll < 0.83:
        return text
    return text[:-6] + "Z" if roll < 0.96 else text[:-6]


def _malformed(rng: random.Random, ts_ms: int, sessions: int) -> str:
    """Return one broken but non-empty line of a kind a real feed produces."""
    good: dict[str, object] = {"session_id": f"s-{rng.randint(1, max(sessions, 1)):04d}", "sender": "rm",
            "message": rng.choice(_RM_FILLER), "timestamp": _iso(ts_ms, rng)}
    kind = rng.randrange(6)
    if kind == 0:
        text = _dumps(good)
        return text[: rng.randint(1, len(text) - 1)]
    if kind == 1:
        return _dumps(list(good.values()))
    if kind == 2:
        del good["message"]
    elif kind == 3:
        good["timestamp"] = rng.choice(_BAD_TIMESTAMPS)
    elif kind == 4:
        good["session_id"] = 42
    else:
        good["sender"] = "bot"
    return _dumps(good)


def generate_lines(spec: SampleSpec) -> Iterator[str]:
    """Yield the sample's JSONL lines in file order, without trailing newlines.

    Out-of-order events are held back until a line 1-4 s newer has been written (but never behind one more
    than 4 s newer, so they stay inside a 5 s tolerance); late events until one 61-180 s newer has.
    No line is empty.
    """
    rng = random.Random(spec.seed)
    noise = random.Random(rng.getrandbits(64))
    held: list[tuple[int, int | None, str]] = []
    for ts_ms, shape, fields in _events(spec, rng):
        if noise.random() < spec.malformed_fraction:
            yield _malformed(noise, ts_ms, spec.sessions)
        roll = noise.random() - spec.no_timestamp_fraction
        if roll >= 0:
            if shape == "chat":
                fields["timestamp"] = ts_ms if noise.random() < 0.12 else ts_ms // 1000
            else:
                fields["timestamp"] = _iso(ts_ms, noise)
        line = _dumps(fields)
        if 0 <= roll < spec.late_fraction:
            held.append((ts_ms + noise.randint(61_000, 180_000), None, line))
            continue
        if 0 <= roll - spec.late_fraction < spec.out_of_order_fraction:
            held.append((ts_ms + noise.randint(1_000, 4_000), ts_ms + 4_000, line))
            continue
        if held:
            yield from (h[2] for h in held if h[1] is not None and ts_ms > h[1])
            held = [h for h in held if h[1] is None or ts_ms <= h[1]]
        yield line
        if held:
            yield from (h[2] for h in held if h[0] <= ts_ms)
            held = [h for h in held if h[0] > ts_ms]
    yield from (h[2] for h in held)


def write_sample(path: Path, spec: SampleSpec) -> int:
    """Write the sample to `path` as UTF-8 JSONL (overwriting it) and return the number of lines written."""
    count = 0
    with path.open("w", encoding="utf-8", newline="\n") as handle:
        for count, line in enumerate(generate_lines(spec), start=1):
            handle.write(line + "\n")
    return count


def sessions_for_events(n_events: int) -> int:
    """Return the session count whose default-spec sample has about `n_events` lines, chat and dirt included."""
    return max(1, round(n_events / _LINES_PER_SESSION))
