"""LLM calls through LangChain's `ChatOpenAI`: a window assistant and message translation.

Works against any OpenAI-compatible endpoint. Bytewax has no async operators, so `LlmClient`
offers synchronous batch facades (for `flat_map_batch` or a `collect`ed batch): each runs the
batch's calls on the client's own persistent event loop, at most `concurrency` requests in flight
(see `LlmClient`), and returns one result per input, in input order (`run_batch` does a batch's
windows and translations in one go). Windows are `WindowRecord`s or their JSON-ready records, as
a `Stage` sees them. A failed call never raises: its result says `status: "error"`. Each client
has its own aiohttp connection pool (openai's `DefaultAioHttpClient`, `concurrency` connections)
on that loop.

What LangChain and the openai SDK do for us: HTTP 408/409/429/5xx, timeouts and connection errors
are retried by the openai SDK inside `ChatOpenAI` (`max_retries`; exponential backoff 0.5 s · 2^n,
capped at 8 s, with jitter; a `Retry-After`/`retry-after-ms` of up to 120 s is honoured instead);
`InMemoryRateLimiter` paces model calls; `InMemoryCache` caches translations; `.with_retry` asks
the assistant once more when its answer is malformed.

CPU per call is what limits throughput (a few ms of LangChain, openai SDK and httpx work per call,
against 64 calls in flight), so the hot path avoids what costs and changes nothing: one `ChatOpenAI`
per model, built once; the assistant binds the `response_format` that `with_structured_output`
would send (computed once) and validates the answer as it would (`parse_json_mode`,
`parse_json_schema`) in one plain Runnable, instead of its chain of parsers, lambdas and fallbacks
(about 40% of a window call's CPU); the translation system prompt is one message per language;
the loop's default executor runs LangChain's hand-offs inline (`InlineExecutor`); and a few more
calls than connections are under way, so their CPU work overlaps the network wait. (The stage
also takes the loaded libraries out of the garbage collector's full passes: `connectors.llm.stage`.)
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from functools import lru_cache
from typing import Any, TypeVar, cast

import httpx
import openai
from langchain_core.caches import InMemoryCache
from langchain_core.exceptions import OutputParserException
from langchain_core.messages import BaseMessage, HumanMessage, SystemMessage
from langchain_core.output_parsers import PydanticOutputParser
from langchain_core.rate_limiters import InMemoryRateLimiter
from langchain_core.runnables import Runnable, RunnableConfig
from langchain_openai import ChatOpenAI
from openai.lib._parsing import type_to_response_format_param
from pydantic import BaseModel, SecretStr, ValidationError

from connectors.llm.config import (  # noqa: F401 - re-exported: the client's configuration and requests
    LlmConfig, Mode, Status, TranslationRequest, describe_error, language_code, same_language,
)
from dataflows.events import Event, WindowRecord

Record = dict[str, Any]
WindowLike = WindowRecord | Mapping[str, Any]
"""A closed window: the typed `WindowRecord`, or its JSON-ready record (`WindowRecord.as_record()`)."""
T = TypeVar("T")

ASSISTANT_PROMPT = (
    "You assist a bank relationship manager (rm) chatting with a customer. Read the conversation and "
    "answer in JSON with two keys: suggested_reply (the rm's next message, in the customer's language) "
    "and summary (one sentence)."
)
TRANSLATION_PROMPT = (
    "Translate the user's message into the language with code '{language}'. Answer with the translation "
    "only; if the message is already in that language, repeat it unchanged."
)


TranslationItem = TranslationRequest | tuple[str, str] | tuple[str, str, str | None]
"""A `TranslationRequest`, or the plain tuple `(text, target[, source])`."""


class WindowAssist(BaseModel):
    """The structured answer asked of the model for one window."""

    suggested_reply: str
    summary: str


class InvalidResponse(Exception):
    """The model answered, but not with the JSON asked for; `raw` is its text."""

    def __init__(self, raw: str) -> None:
        super().__init__("the model's answer is not the JSON asked for")
        self.raw = raw


def transcript(messages: Iterable[Event]) -> str:
    """The messages as `sender: text` lines in time order (ties keep their order)."""
    ordered = sorted(messages, key=lambda m: m.time if m.time is not None else float("-inf"))
    return "\n".join(f"{m.sender}: {m.text}" for m in ordered)


def record_transcript(messages: Iterable[Mapping[str, Any]]) -> str:
    """A window record's `messages` as `sender: text` lines, in the record's (time) order."""
    return "\n".join(f"{m['sender']}: {m['text']}" for m in messages)


_ASSISTANT_SYSTEM = SystemMessage(ASSISTANT_PROMPT)


def window_prompt(window: WindowLike) -> list[BaseMessage]:
    """The assistant prompt for one window (a `WindowRecord` or its record): system prompt (shared), then transcript."""
    if isinstance(window, WindowRecord):
        return [_ASSISTANT_SYSTEM, HumanMessage(transcript(window.messages))]
    known = window.get("user_context") or []
    history = "".join(
        f"History of {c['user']}: {c['total_messages']} messages since {c['first_seen']}, last active {c['last_active']}\n"
        for c in known
    )
    return [_ASSISTANT_SYSTEM, HumanMessage(history + record_transcript(window["messages"]))]


@lru_cache(maxsize=256)
def _translation_system(language: str) -> SystemMessage:
    return SystemMessage(TRANSLATION_PROMPT.format(language=language))


def translation_prompt(text: str, language: str) -> list[BaseMessage]:
    """The translation prompt for one text (the system message is built once per language and shared)."""
    return [_translation_system(language), HumanMessage(text)]


class InlineExecutor(ThreadPoolExecutor):
    """The client loop's default executor: runs what is handed to it on the loop's own thread.

    LangChain hands short CPU-bound steps to the default executor on every call (building the
    chat result, the openai SDK's platform probe); under the GIL a thread hop only adds a wake-up,
    a lock handoff and contention (about 10% of a call's CPU). Name resolution, which may block on
    the network, still goes to a real thread.
    """

    def submit(self, fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> Future[T]:
        if fn is socket.getaddrinfo or fn is socket.getnameinfo:
            return super().submit(fn, *args, **kwargs)
        future: Future[T] = Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except Exception as e:  # noqa: BLE001 - handed to the awaiting coroutine, as a thread would
            future.set_exception(e)
        return future


def _no_translation_reason(request: TranslationRequest) -> str | None:
    if same_language(request.source, request.target):
        return f"already in {request.target}"
    return None if request.text.strip() else "blank text"


_JSON_MODE_PARSER = PydanticOutputParser(pydantic_object=WindowAssist)


def parse_json_mode(content: str) -> WindowAssist:
    """The answer asked for with `json_mode`, parsed as LangChain's structured output did (code fences allowed)."""
    try:
        return _JSON_MODE_PARSER.parse(content)
    except OutputParserException as e:
        raise InvalidResponse(content) from e


def parse_json_schema(content: str) -> WindowAssist:
    """The answer asked for with a strict `json_schema`, validated as the openai SDK's `parse` did."""
    try:
        return WindowAssist.model_validate_json(content)
    except ValidationError as e:
        raise InvalidResponse(content) from e


STRUCTURED: dict[str, tuple[dict[str, Any], Callable[[str], WindowAssist]]] = {
    "json_mode": ({"type": "json_object"}, parse_json_mode),
    "json_schema": (cast(dict[str, Any], type_to_response_format_param(WindowAssist)), parse_json_schema),
}
"""Per `structured_method`: the `response_format` sent (computed once) and how the answer is validated."""


class _AskAndParse(Runnable[list[BaseMessage], WindowAssist]):
    """One model call whose answer is validated as a `WindowAssist`; raises `InvalidResponse` with the raw text.

    One plain Runnable rather than `model | parser`: a sequence, a `RunnableLambda` or an output
    parser each add callbacks, signature inspection or a thread hop to every call.
    """

    def __init__(self, model: Runnable[list[BaseMessage], BaseMessage], parse: Callable[[str], WindowAssist]) -> None:
        self._model = model
        self._parse = parse

    def invoke(self, input: list[BaseMessage], config: RunnableConfig | None = None,  # noqa: A002
               **kwargs: Any) -> WindowAssist:
        return self._parse(str(self._model.invoke(input, config).content))

    async def ainvoke(self, input: list[BaseMessage], config: RunnableConfig | None = None,  # noqa: A002
                      **kwargs: Any) -> WindowAssist:
        return self._parse(str((await self._model.ainvoke(input, config)).content))


class CountingCache(InMemoryCache):
    """LangChain's in-memory cache, counting lookups and hits (its async lookup goes through `lookup`)."""

    def __init__(self, maxsize: int | None = None) -> None:
        super().__init__(maxsize=maxsize)
        self.lookups = 0
        self.hits = 0

    def lookup(self, prompt: str, llm_string: str) -> Any:
        found = super().lookup(prompt, llm_string)
        self.lookups += 1
        self.hits += found is not None
        return found


class LlmClient:
    """Batch facades over ChatOpenAI for a Bytewax worker.

    Thread affinity: the client owns one event loop (made in `__init__`) and an aiohttp connection
    pool bound to it; `assist_windows`, `translate` and `run_batch` run that loop with
    `run_until_complete`, so call them from one thread at a time and never from inside a running
    event loop. Build one client per worker (in the operator's builder, not at import) and
    `close()` it at the end. `clock` measures latency (seconds, monotonic).

    Translations go to the request's `model` (default: the config's); every model shares the
    connection pool, the rate limiter and one translation cache, whose key includes the model.

    Concurrency: the connection pool has `concurrency` connections, so at most that many requests
    are in flight. Up to `concurrency // 2` more calls may be under way meanwhile, building their
    request or reading their answer (LangChain's and the openai SDK's CPU work, about half of a
    call's), so that work overlaps the network wait instead of keeping a connection idle; about
    10% more calls/s at 64 in flight. Such a call may wait for a free connection; that wait has its
    own `timeout` (aiohttp's pool timeout), which only a stall of every request in flight exhausts.
    """

    def __init__(self, config: LlmConfig, *, clock: Callable[[], float] = time.perf_counter) -> None:
        self.config = config
        self._clock = clock
        self._loop: asyncio.AbstractEventLoop | None = None
        if not config.enabled:
            return
        self._loop = asyncio.new_event_loop()
        self._loop.set_default_executor(InlineExecutor(max_workers=2, thread_name_prefix="convoflow-llm-dns"))
        self._semaphore = asyncio.Semaphore(config.concurrency + config.concurrency // 2)
        limits = httpx.Limits(max_connections=config.concurrency, max_keepalive_connections=config.concurrency)
        # Our own pool: ChatOpenAI otherwise shares one process-wide client, whose connections
        # would cross event loops when several clients (or workers) exist. aiohttp rather than
        # httpx's pool, which costs O(connections) CPU per request (47 calls/s at 64-way, 200 ms).
        self._http = openai.DefaultAioHttpClient(limits=limits)
        limiter = None
        if config.rate_limit is not None:
            limiter = InMemoryRateLimiter(requests_per_second=config.rate_limit,
                                          check_every_n_seconds=min(0.1, 1 / config.rate_limit),
                                          max_bucket_size=max(1.0, config.rate_limit / 10))
        key = config.api_key or SecretStr("unused")
        self._common: dict[str, Any] = dict(api_key=key, base_url=config.base_url, temperature=0,
                                            timeout=config.timeout, max_retries=config.max_retries,
                                            rate_limiter=limiter, http_async_client=self._http)
        # No cache for the assistant: a cached malformed answer would defeat the retry.
        response_format, parse = STRUCTURED[config.structured_method]
        model = ChatOpenAI(model=config.model, **self._common, cache=False).bind(response_format=response_format)
        self._assistant: Runnable[list[BaseMessage], WindowAssist] = _AskAndParse(model, parse).with_retry(
            retry_if_exception_type=(InvalidResponse,), stop_after_attempt=2, wait_exponential_jitter=False)
        self._cache = CountingCache(maxsize=config.cache_size)
        self._translators: dict[str, ChatOpenAI] = {}

    @property
    def cache_counts(self) -> tuple[int, int]:
        """Lookups of the translation cache so far, and how many found an answer."""
        return self._cache.lookups, self._cache.hits

    def __enter__(self) -> LlmClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the connection pool and the event loop (idempotent)."""
        if self._loop is not None and not self._loop.is_closed():
            self._loop.run_until_complete(self._http.aclose())
            self._loop.close()

    def assist_windows(self, windows: Sequence[WindowLike]) -> list[Record]:
        """`{"assistant": {suggested_reply, summary, model, latency_ms, status, ...}}` per window."""
        return self.run_batch(windows, ())[0]

    def translate(self, items: Sequence[TranslationItem]) -> list[Record]:
        """`{translated, language, translation: {status, model, latency_ms, ...}}` per request.

        Not sent to the model: a text whose known `source` language is the target (returned as
        is, `skipped`) and a blank text. Identical (text, target, model) requests make one call
        per batch and, through the cache, one per run.
        """
        return self.run_batch((), items)[1]

    def run_batch(self, windows: Sequence[WindowLike], items: Sequence[TranslationItem]) -> tuple[list[Record], list[Record]]:
        """Assist `windows` and translate `items` together, `concurrency` calls at a time in all.

        Returns what `assist_windows` and `translate` would, in input order; one wait for the
        whole batch instead of one per kind.
        """
        requests = [TranslationRequest(*item) for item in items]
        reason = self.config.off_reason
        if reason is not None:
            return ([{"assistant": self._assistant_body("skipped", reason=reason)} for _ in windows],
                    [self._translation(None, r.target, "skipped", r.model, reason=reason) for r in requests])
        skips = [_no_translation_reason(r) for r in requests]
        unique = list(dict.fromkeys((r.text, r.target, r.model or self.config.model)
                                    for r, skip in zip(requests, skips) if skip is None))
        calls: list[Awaitable[Record]] = [self._assist_one(w) for w in windows]
        calls += [self._translate_one(*key) for key in unique]
        results = self._run(calls)
        answers = dict(zip(unique, results[len(windows):]))
        translations = [_copy(answers[(r.text, r.target, r.model or self.config.model)]) if skip is None
                        else self._translation(r.text, r.target, "skipped", r.model, reason=skip)
                        for r, skip in zip(requests, skips)]
        return results[:len(windows)], translations

    def _run(self, calls: list[Awaitable[T]]) -> list[T]:
        if not calls:
            return []
        assert self._loop is not None

        async def bounded(call: Awaitable[T]) -> T:
            async with self._semaphore:
                return await call

        async def gather() -> list[T]:
            return list(await asyncio.gather(*(bounded(c) for c in calls)))

        return self._loop.run_until_complete(gather())

    def _translator(self, model: str) -> ChatOpenAI:
        found = self._translators.get(model)
        if found is None:
            found = self._translators[model] = ChatOpenAI(model=model, **self._common, cache=self._cache)
        return found

    async def _assist_one(self, window: WindowLike) -> Record:
        start = self._clock()
        try:
            answer = await self._assistant.ainvoke(window_prompt(window))
            body = self._assistant_body("ok")
            body.update(suggested_reply=answer.suggested_reply, summary=answer.summary)
        except InvalidResponse as e:
            body = self._assistant_body("invalid_response", raw=e.raw)
        except Exception as e:  # noqa: BLE001 - any failure becomes the item's error; the flow goes on
            body = self._assistant_body("error", error=self.describe(e))
        body["latency_ms"] = round((self._clock() - start) * 1000, 1)
        return {"assistant": body}

    async def _translate_one(self, text: str, language: str, model: str) -> Record:
        start = self._clock()
        try:
            message = await self._translator(model).ainvoke(translation_prompt(text, language))
            result = self._translation(str(message.content).strip(), language, "ok", model)
        except Exception as e:  # noqa: BLE001 - any failure becomes the item's error; the flow goes on
            result = self._translation(None, language, "error", model, error=self.describe(e))
        result["translation"]["latency_ms"] = round((self._clock() - start) * 1000, 1)
        return result

    def _assistant_body(self, status: Status, **extra: Any) -> Record:
        return {"suggested_reply": None, "summary": None, "model": self.config.model, "latency_ms": None,
                "status": status, **extra}

    def _translation(self, translated: str | None, language: str, status: Status, model: str | None,
                     **extra: Any) -> Record:
        return {"translated": translated, "language": language,
                "translation": {"status": status, "model": model or self.config.model, "latency_ms": None, **extra}}

    def describe(self, error: BaseException) -> str:
        """The error as one line of text, with the API key (should any layer echo it) masked."""
        return describe_error(error, self.config)


def _copy(result: Record) -> Record:
    return {**result, "translation": dict(result["translation"])}
