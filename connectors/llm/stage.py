"""The LLM stage: a suggested reply for every closed window, and each chat message in its reader's language.

`LlmStage` is a `dataflows.flow.Stage`: `build_flow(..., stages=[LlmStage(config)])` runs it with
`flat_map_batch` on every list of `(kind, records)` batches before the outputs. Per call it sends
the model every window and every message to translate of the whole list at once, through one
`LlmClient` per worker (`concurrency` requests in flight; retries, rate limit and cache are
LangChain's and the openai SDK's, see `connectors.llm.client`), waits for them all and returns the same
batches, in the same order, with every record enriched in place; none is dropped, and a failure
becomes the record's `status: "error"`. Other kinds pass through untouched.

What a record gains (the top-level keys always; `reason`, `error` and `raw` only where they apply):

- `windows`: `assistant: {suggested_reply, summary, model, latency_ms, status, reason, error, raw}`,
  `status` one of `ok`, `invalid_response` (with the model's `raw` text), `error` (with the
  `error` text) or `skipped` (with the `reason`).
- `messages`: `translated` and `translation: {status, model, latency_ms, source, target, reason,
  error}`. `translated` is the text in the reader's language when the stage has it: the model's
  translation (`status: "ok"`; `language` is then set to the target, the language of
  `translated`, the message's own staying in `translation.source`), or the text itself when it
  is already in that language (`skipped`, `language` unchanged); otherwise None, `language`
  unchanged.

Who reads a message (the translation target). A chat event carries its author's
`preferredLanguage` (the record's `language`); the room (session) has no language of its own. So a
message's reader is the other party: the target is the preferredLanguage most recently seen, in
this stage's order of records, from a sender other than the message's author in the same session
(any chat event counts, a join as much as a message). The message's language is taken to be its
author's preferredLanguage. It is translated when both are known and differ by primary subtag
(`connectors.llm.client.same_language`: `en-GB` and `en` are the same); otherwise it is skipped with the reason:
`no reader language known for this session yet` (the first messages of a room, a room of one,
conversation events, which carry no language), `the message's language is unknown`, or
`already in <target>` (then `translated` is the text itself). No call goes out for any of them,
nor for a blank text. In a room with several other parties the most recent speaker is the
reader, since a record has a single `translated`.

Rules. A message whose `moderation.flags` has `"translation": false` (a `feature_flag` rule for
its room, tenant or everywhere, as the flow attaches it) is skipped with that reason. The model of
a translation is, first match wins: the record's `language_model` (a model name, or a mapping
language → model looked up by the target's full tag, then its primary subtag, case-insensitively),
else the `language_model` rules in force for the message (`moderation.models`, which the flow
attaches with a rules stream; same lookup), the stage's `models` mapping (same lookup), the
config's model.

State. The reader languages are per-worker state kept inside the stage (`ReaderLanguages`, at most
`max_sessions` sessions, least recently seen dropped first), not a Bytewax state: a session's
records always come out of the one shard, and so the one worker, that owns it, in order, so a
worker sees every language of its sessions. It is not snapshotted or recovered: after a resume (or
when sessions move to other workers) a session's messages are skipped with `no reader language
known` until the other party speaks again. Acceptable for an enrichment that changes no other
field and is re-derived as the conversation goes on, and cheaper than keying the stage by session.

With the LLM off nothing is called and no state is kept: windows get `assistant` and messages
`translated: None` and `translation`, both `status: "skipped"` with the reason. Those two values
are shared by every record (built once, like the flow's `moderation` of allowed messages), so
this costs two dict stores per record: never mutate them downstream.

Lifetime. The stage pickles to spawned worker processes holding only its config and plain data; each
worker thread builds its own `LlmClient` (event loop and connection pool) on its first batch.
`close()` closes them all after a run; a `weakref.finalize` closes any left at interpreter exit.
`concurrency`, the rate limit and the translation cache are per worker.

Heap. Loading LangChain and the openai SDK leaves about 220,000 long-lived objects, which every
full pass of Python's cyclic garbage collector rescans: 12% of a call's CPU at 64 calls in flight.
So the first client of a process is followed by `gc.collect()` and `gc.freeze()` (once per
process): what exists then (modules, classes, the flow's state so far) is left to reference
counting, and later passes scan only newer objects. A frozen object is still freed when its last
reference goes; only a reference cycle among objects alive at that moment would never be.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import weakref
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import polars as pl

from connectors.view.progress import FigureFile
from connectors.llm.config import LlmConfig, TranslationRequest, describe_error, language_code
from dataflows.flow import OutputKind
from dataflows.records import Record, Records, as_records

if TYPE_CHECKING:
    from connectors.llm.client import LlmClient

log = logging.getLogger(__name__)
_heap_settled = False

Batches = list[tuple[str, Records]]
Listed = list[tuple[str, list[Record]]]
TRANSLATION_FLAG: Final = "translation"
NO_READER: Final = "no reader language known for this session yet"
NO_SOURCE: Final = "the message's language is unknown"
FLAG_OFF: Final = f"feature flag '{TRANSLATION_FLAG}' is off"


class ReaderLanguages:
    """Per session, the preferredLanguage last seen from each sender, for finding a message's reader.

    Bounded: at most `max_sessions` sessions (the least recently seen is forgotten first) and
    `max_senders` senders per session (likewise).
    """

    def __init__(self, max_sessions: int = 100_000, max_senders: int = 16) -> None:
        self.max_sessions = max_sessions
        self.max_senders = max_senders
        self._sessions: OrderedDict[str, dict[str, str]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sessions)

    def reader_of(self, session: str, sender: str, language: str | None) -> str | None:
        """Note `sender`'s `language` (when known) in `session`; return the language of its latest other sender.

        Returns None when no other sender of the session has shown a language yet.
        """
        senders = self._sessions.get(session)
        if senders is None:
            if language is None:
                return None
            senders = self._sessions[session] = {}
            if len(self._sessions) > self.max_sessions:
                self._sessions.popitem(last=False)
        else:
            self._sessions.move_to_end(session)
        reader = next((lang for who, lang in reversed(senders.items()) if who != sender), None)
        if language is not None:
            senders.pop(sender, None)
            senders[sender] = language
            if len(senders) > self.max_senders:
                del senders[next(iter(senders))]
        return reader


def model_for(record: Mapping[str, Any], target: str, models: Mapping[str, str]) -> str | None:
    """The model to translate `record` into `target` with: the record's `language_model` hint, else the
    `language_model` rules in force for it (`moderation.models`, attached by the flow), then `models`.

    None: the config's model. `models` keys must be case-folded (`LlmStage` folds them).
    """
    hint = record.get("language_model")
    if hint is None and isinstance(moderation := record.get("moderation"), Mapping):
        hint = moderation.get("models")
    if isinstance(hint, str) and hint:
        return hint
    if isinstance(hint, Mapping):
        found = _lookup(hint, target)
        if found is not None:
            return found
    return _lookup(models, target) if models else None


def _lookup(models: Mapping[str, Any], target: str) -> str | None:
    folded = target.strip().casefold()
    found = models.get(folded)
    if found is None:
        found = models.get(language_code(folded))
    return found if isinstance(found, str) and found else None


def translation_flag_off(record: Mapping[str, Any]) -> bool:
    """Whether a rule turned translation off for this message (`moderation.flags.translation` is false)."""
    moderation = record.get("moderation")
    if not isinstance(moderation, Mapping):
        return False
    flags = moderation.get("flags")
    return isinstance(flags, Mapping) and flags.get(TRANSLATION_FLAG) is False


@dataclass
class _Worker:
    """What one worker thread holds: its client and its sessions' reader languages."""

    client: LlmClient
    readers: ReaderLanguages
    figures: FigureFile | None = None
    """Where its translation cache's lookups and hits are kept for the metrics endpoint."""

    def report(self) -> None:
        if self.figures is not None:
            lookups, hits = self.client.cache_counts
            self.figures.write({"cache_lookups": lookups, "cache_hits": hits})


class LlmStage:
    """Window assistant and translation for `build_flow(..., stages=...)`; see the module docstring.

    Args:
        config: how to reach the model, and whether to (`config.enabled`).
        models: language → model for translations into that language (keys any case; a full tag
            such as `pt-BR` or a primary subtag such as `pt`).
        max_sessions: how many sessions' reader languages each worker keeps.
    """

    name = "llm"

    def __init__(self, config: LlmConfig, *, models: Mapping[str, str] | None = None,
                 max_sessions: int = 100_000, figures_dir: Path | None = None) -> None:
        self.config = config
        self.models = {lang.strip().casefold(): model for lang, model in (models or {}).items()}
        self.max_sessions = max_sessions
        self.figures_dir = figures_dir
        self._setup()

    def _setup(self) -> None:
        reason = self.config.off_reason
        self._off_assistant: Record | None = None
        self._off_translation: Record | None = None
        if reason is not None:
            self._off_assistant = {"suggested_reply": None, "summary": None, "model": self.config.model,
                                   "latency_ms": None, "status": "skipped", "reason": reason}
            self._off_translation = {"status": "skipped", "model": self.config.model, "latency_ms": None,
                                     "reason": reason}
        self._workers: dict[int, _Worker] = {}
        self._lock = threading.Lock()
        self._finalizer: weakref.finalize[Any, Any] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {"config": self.config, "models": self.models, "max_sessions": self.max_sessions,
                "figures_dir": self.figures_dir}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.config, self.models, self.max_sessions = state["config"], state["models"], state["max_sessions"]
        self.figures_dir = state.get("figures_dir")
        self._setup()

    def __repr__(self) -> str:
        return f"LlmStage({self.config!r}, models={self.models!r})"

    def __call__(self, batches: Batches) -> Batches:
        """Enrich every `windows` and `messages` record of `batches`; return them."""
        if self._off_assistant is not None:
            return [self._skipped(kind, records) for kind, records in batches]
        listed = [(kind, as_records(records)) for kind, records in batches]
        try:
            self._enrich(listed)
        except Exception as e:  # noqa: BLE001 - an LLM stage failure must not stop the flow or drop records
            self._fail(listed, describe_error(e, self.config))
        return list(listed)

    def _skipped(self, kind: str, records: Records) -> tuple[str, Records]:
        """`records` with what the stage says while it is off."""
        assistant, translation = self._off_assistant, self._off_translation
        if isinstance(records, pl.DataFrame):
            if kind == OutputKind.MESSAGES:
                records = records.with_columns(pl.lit(None).alias("translated"), pl.lit(translation).alias("translation"))
            elif kind == OutputKind.WINDOWS:
                records = records.with_columns(pl.lit(assistant).alias("assistant"))
        elif kind == OutputKind.WINDOWS:
            for record in records:
                record["assistant"] = assistant
        elif kind == OutputKind.MESSAGES:
            for record in records:
                record["translated"] = None
                record["translation"] = translation
        return kind, records

    def close(self) -> None:
        """Close every worker's client (call once the run has ended); the stage reopens them if called again."""
        with self._lock:
            workers, self._workers = self._workers, {}
            finalizer, self._finalizer = self._finalizer, None
        if finalizer is not None:
            finalizer.detach()
        _close_all(workers)

    def _worker(self) -> _Worker:
        ident = threading.get_ident()
        worker = self._workers.get(ident)
        if worker is None:
            with self._lock:
                from connectors.llm.client import LlmClient  # LangChain: loaded only when calls are on

                figures = None if self.figures_dir is None else FigureFile(self.figures_dir, f"llm-{os.getpid()}-{ident}")
                worker = self._workers[ident] = _Worker(LlmClient(self.config), ReaderLanguages(self.max_sessions),
                                                        figures)
                if self._finalizer is None:
                    self._finalizer = weakref.finalize(self, _close_all, self._workers)
                _settle_heap()
        return worker

    def _enrich(self, batches: Listed) -> None:
        worker = self._worker()
        windows = [r for kind, records in batches if kind == OutputKind.WINDOWS for r in records]
        asked: list[Record] = []
        requests: list[TranslationRequest] = []
        for kind, records in batches:
            if kind != OutputKind.MESSAGES:
                continue
            for record in records:
                request = self._plan(record, worker.readers)
                if request is not None:
                    asked.append(record)
                    requests.append(request)
        if not windows and not requests:
            return
        assisted, translations = worker.client.run_batch(windows, requests)
        for record, result in zip(windows, assisted):
            record["assistant"] = result["assistant"]
        for record, request, result in zip(asked, requests, translations):
            _fill(record, result, request.source)
        worker.report()

    def _plan(self, record: Record, readers: ReaderLanguages) -> TranslationRequest | None:
        """The translation to ask for `record`, or None after marking it skipped with the reason."""
        source = record.get("language") or None
        target = readers.reader_of(str(record.get("session_id")), str(record.get("sender")), source)
        reason = None
        if translation_flag_off(record):
            reason = FLAG_OFF
        elif target is None:
            reason = NO_READER
        elif source is None:
            reason = NO_SOURCE
        if reason is not None:
            model = self.config.model if target is None else model_for(record, target, self.models) or self.config.model
            record["translated"] = None
            record["translation"] = {"status": "skipped", "model": model, "latency_ms": None, "source": source,
                                     "target": target, "reason": reason}
            return None
        assert target is not None
        return TranslationRequest(str(record.get("text") or ""), target, source, model_for(record, target, self.models))

    def _fail(self, batches: Listed, error: str) -> None:
        """Mark every record the failed call left without its result as an error."""
        log.warning("LLM stage %r: %s", self.name, error)
        for kind, records in batches:
            for record in records:
                if kind == OutputKind.WINDOWS and "assistant" not in record:
                    record["assistant"] = {"suggested_reply": None, "summary": None, "model": self.config.model,
                                           "latency_ms": None, "status": "error", "error": error}
                elif kind == OutputKind.MESSAGES and "translation" not in record:
                    record["translated"] = None
                    record["translation"] = {"status": "error", "model": self.config.model, "latency_ms": None,
                                             "error": error}


def _fill(record: Record, result: Record, source: str | None) -> None:
    record["translated"] = result["translated"]
    body = result["translation"]
    if body["status"] == "ok":
        record["language"] = result["language"]
    body["source"] = source
    body["target"] = result["language"]
    record["translation"] = body


def _settle_heap() -> None:
    """Once per process, move every object alive now out of the cyclic GC's reach (see "Heap" above)."""
    global _heap_settled
    if not _heap_settled:
        _heap_settled = True
        gc.collect()
        gc.freeze()


def _close_all(workers: dict[int, _Worker]) -> None:
    for worker in list(workers.values()):
        try:
            worker.client.close()
        except Exception as e:  # noqa: BLE001 - closing is best effort (at exit the loop may be gone)
            log.debug("closing an LLM client failed: %s", e)
    workers.clear()
