"""The LLM connector against a local fake OpenAI server, through the real langchain-openai client."""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import SecretStr

from connectors.llm.client import (
    InlineExecutor, LlmClient, LlmConfig, TranslationRequest, same_language, transcript, translation_prompt,
    window_prompt,
)
from dataflows.errors import ConvoflowError
from dataflows.events import Event, WindowRecord
from tests.connectors.llm.fake_openai import FakeOpenAI

KEY = "sk-test-CONVOFLOW-0xDEADBEEF"


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def make_client(fake: FakeOpenAI) -> Iterator[Callable[..., LlmClient]]:
    clients: list[LlmClient] = []

    def make(**overrides: Any) -> LlmClient:
        options: dict[str, Any] = {"mode": "on", "base_url": fake.base_url, "api_key": KEY, "timeout": 2.0,
                                   "max_retries": 2, "concurrency": 4}
        options.update(overrides)
        client = LlmClient(LlmConfig.from_env({}, **options))
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.close()


def make_event(text: str = "hi", *, sender: str = "customer", time: float = 100.0, line: int = 1) -> Event:
    return Event(f"in:{line}", "s-1", sender, "message", text, time, "event", "conversation", "in", line, 0)


def make_window(*events: Event) -> WindowRecord:
    return WindowRecord("s-1", 0.0, 60.0, events or (make_event(),), {})


CARD_WINDOW = make_window(make_event("hello", line=1, time=1.0), make_event("hi, how can I help?", sender="rm", line=2, time=2.0),
                          make_event("where is my card?", line=3, time=3.0))


def test_transcript_merges_senders_in_time_order() -> None:
    events = [make_event("late", time=5.0, line=1), make_event("early", sender="rm", time=1.0, line=2),
              make_event("tie", time=5.0, line=3)]
    assert transcript(events) == "rm: early\ncustomer: late\ncustomer: tie"
    system, human = window_prompt(make_window(*events))
    assert "relationship manager" in str(system.content) and human.content == "rm: early\ncustomer: late\ncustomer: tie"


def test_window_prompt_starts_with_the_senders_history_from_the_lake() -> None:
    record = {**CARD_WINDOW.as_record(), "user_context": [
        {"user": "s-1/customer", "total_messages": 12, "first_seen": "2024-01-02T09:00:00+00:00",
         "last_active": "2024-03-01T10:00:00+00:00"}]}
    [_, human] = window_prompt(record)
    assert str(human.content).splitlines()[0] == (
        "History of s-1/customer: 12 messages since 2024-01-02T09:00:00+00:00, last active 2024-03-01T10:00:00+00:00")
    assert str(human.content).endswith(str(window_prompt(CARD_WINDOW)[1].content))


def test_window_prompt_takes_the_window_record_as_the_flow_emits_it() -> None:
    [_, from_event] = window_prompt(CARD_WINDOW)
    [_, from_record] = window_prompt(CARD_WINDOW.as_record())
    assert from_record.content == from_event.content == "customer: hello\nrm: hi, how can I help?\ncustomer: where is my card?"


def test_same_language_compares_primary_subtags_of_a_known_language() -> None:
    assert same_language("EN", "en-GB") and same_language("pt_BR", "pt")
    assert not same_language(None, "en") and not same_language("", "en") and not same_language("es", "en")


def test_config_resolves_auto_mode_from_key_or_base_url() -> None:
    assert not LlmConfig.from_env({}).enabled
    assert LlmConfig.from_env({}).off_reason == "LLM mode auto: no API key or base URL configured"
    assert LlmConfig.from_env({"OPENAI_API_KEY": KEY}).enabled
    assert LlmConfig.from_env({"OPENAI_BASE_URL": "http://127.0.0.1:1/v1"}).enabled
    assert not LlmConfig.from_env({"OPENAI_API_KEY": KEY}, mode="off").enabled
    assert KEY not in repr(LlmConfig.from_env({"OPENAI_API_KEY": KEY}))
    with pytest.raises(ConvoflowError, match="mode 'on' needs an API key"):
        LlmConfig.from_env({}, mode="on")
    with pytest.raises(ConvoflowError, match="concurrency 0 must be at least 1"):
        LlmConfig(concurrency=0)


def test_assistant_returns_the_validated_structured_answer(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    [out] = make_client().assist_windows([CARD_WINDOW])
    assistant = out["assistant"]
    assert assistant | {"latency_ms": 0} == {"suggested_reply": "Re: where is my card?", "summary": "3 lines, last from customer",
                                              "model": "gpt-4o-mini", "latency_ms": 0, "status": "ok"}
    assert assistant["latency_ms"] > 0
    [payload] = fake.payloads
    assert payload["response_format"] == {"type": "json_object"}
    assert payload["messages"][1]["content"] == "customer: hello\nrm: hi, how can I help?\ncustomer: where is my card?"


def test_malformed_answer_is_asked_again_once(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    fake.inject("malformed")
    [out] = make_client().assist_windows([CARD_WINDOW])
    assert out["assistant"]["status"] == "ok" and fake.requests == 2


@pytest.mark.filterwarnings("ignore::UserWarning")  # langchain-openai's json_schema path warns on model_dump
@pytest.mark.parametrize("method", ["json_mode", "json_schema"])
def test_malformed_twice_is_invalid_response_with_raw_text(
    fake: FakeOpenAI, make_client: Callable[..., LlmClient], method: str
) -> None:
    fake.inject("malformed", times=2)
    [out] = make_client(structured_method=method).assist_windows([CARD_WINDOW])
    assert out["assistant"]["status"] == "invalid_response"
    assert out["assistant"]["raw"] == '{"suggested_reply": "cut sh'
    assert out["assistant"]["suggested_reply"] is None and fake.requests == 2


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_json_schema_asks_for_the_strict_schema(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    [out] = make_client(structured_method="json_schema").assist_windows([CARD_WINDOW])
    assert out["assistant"]["status"] == "ok" and out["assistant"]["suggested_reply"] == "Re: where is my card?"
    [payload] = fake.payloads
    assert payload["response_format"] == {"type": "json_schema", "json_schema": {
        "name": "WindowAssist", "strict": True, "schema": {
            "description": "The structured answer asked of the model for one window.", "type": "object",
            "title": "WindowAssist", "additionalProperties": False, "required": ["suggested_reply", "summary"],
            "properties": {"suggested_reply": {"title": "Suggested Reply", "type": "string"},
                           "summary": {"title": "Summary", "type": "string"}}}}}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize(("method", "status", "calls"), [("json_mode", "ok", 1), ("json_schema", "invalid_response", 2)])
def test_a_fenced_answer_passes_in_json_mode_only(
    fake: FakeOpenAI, make_client: Callable[..., LlmClient], method: str, status: str, calls: int
) -> None:
    fake.inject("fenced", times=2)
    [out] = make_client(structured_method=method).assist_windows([CARD_WINDOW])
    assert out["assistant"]["status"] == status and fake.requests == calls
    if status == "ok":
        assert out["assistant"]["suggested_reply"] == "Re: where is my card?"
    else:
        assert out["assistant"]["raw"].startswith("```json\n{")


def test_429_waits_as_long_as_retry_after_says(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    fake.inject("429", retry_after=1.0)
    [out] = make_client().translate([("hola", "en")])
    assert out["translated"] == "[en] hola" and out["translation"]["status"] == "ok"
    # Without the header the first backoff would be 0.375-0.5 s.
    assert fake.requests == 2 and fake.arrivals[1] - fake.arrivals[0] >= 0.95


def test_500_is_retried_with_growing_backoff(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    fake.inject("500", times=2)
    [out] = make_client().assist_windows([CARD_WINDOW])
    assert out["assistant"]["status"] == "ok" and fake.requests == 3
    first, second = (b - a for a, b in zip(fake.arrivals, fake.arrivals[1:]))
    assert 0.3 <= first <= 0.8 and 0.7 <= second <= 1.3


def test_exhausted_retries_give_an_error_without_the_key(
    fake: FakeOpenAI, make_client: Callable[..., LlmClient], caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.inject("500", times=4, match="doomed", retry_after=0.05)
    client = make_client(max_retries=1)
    doomed = make_window(make_event("doomed"))
    windows = client.assist_windows([doomed, CARD_WINDOW])
    translations = client.translate([("doomed", "en"), ("fine", "en")])
    assert [w["assistant"]["status"] for w in windows] == ["error", "ok"]
    assert [t["translation"]["status"] for t in translations] == ["error", "ok"]
    assert windows[0]["assistant"]["error"].startswith("InternalServerError: Error code: 500")
    assert translations[0]["translated"] is None and "fake internal error" in translations[0]["translation"]["error"]
    assert fake.headers[0]["authorization"] == f"Bearer {KEY}"  # the key was really used
    seen = json.dumps([windows, translations]) + caplog.text + "".join(capsys.readouterr())
    assert "Retrying request" in caplog.text and KEY not in seen and "DEADBEEF" not in seen


def test_a_request_that_times_out_is_retried(make_client: Callable[..., LlmClient], fake: FakeOpenAI) -> None:
    fake.inject("hang", match="slowpoke")
    [retried] = make_client(timeout=0.3).translate([("slowpoke", "en")])
    assert retried["translated"] == "[en] slowpoke" and fake.requests == 2
    assert fake.hanging == 1, "the client returned while the server still held the first call: the timeout cut it short"
    fake.inject("hang", match="slowpoke")
    [failed] = make_client(timeout=0.3, max_retries=0).translate([("slowpoke", "de")])
    assert failed["translation"]["status"] == "error" and "timed out" in failed["translation"]["error"]
    assert fake.hanging == 2


def test_the_client_loop_runs_handed_off_work_inline_but_resolves_names_on_a_thread() -> None:
    executor = InlineExecutor(max_workers=1)
    try:
        assert executor.submit(threading.get_ident).result() == threading.get_ident()
        with pytest.raises(ZeroDivisionError):
            executor.submit(lambda: 1 / 0).result()
        resolving = executor.submit(socket.getaddrinfo, "localhost", 80)
        assert resolving.result(timeout=10) and threading.get_ident() not in {t.ident for t in executor._threads}
        assert len(executor._threads) == 1
    finally:
        executor.shutdown()


def test_a_host_name_base_url_is_resolved(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    [out] = make_client(base_url=fake.base_url.replace("127.0.0.1", "localhost")).translate([("hola", "en")])
    assert out["translated"] == "[en] hola"


def test_translation_prompts_share_one_system_message_per_language() -> None:
    first, second = translation_prompt("hola", "en"), translation_prompt("adiós", "en")
    assert first[0] is second[0] and first[1].content == "hola" and translation_prompt("hola", "de")[0] is not first[0]


def test_translations_are_cached_for_the_run(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    client = make_client()
    first = client.translate([("hola", "en"), ("hola", "en"), ("hola", "de")])
    assert [t["translated"] for t in first] == ["[en] hola", "[en] hola", "[de] hola"] and fake.requests == 2
    again = client.translate([("hola", "en")])
    assert again[0]["translated"] == "[en] hola" and fake.requests == 2


def test_each_request_can_name_its_model_and_the_cache_tells_models_apart(
    fake: FakeOpenAI, make_client: Callable[..., LlmClient]
) -> None:
    client = make_client()
    out = client.translate([TranslationRequest("hola", "en", "es", "qwen"), ("hola", "en"),
                            TranslationRequest("hola", "en", None, "qwen")])
    assert [o["translation"]["model"] for o in out] == ["qwen", "gpt-4o-mini", "qwen"]
    assert sorted(p["model"] for p in fake.payloads) == ["gpt-4o-mini", "qwen"]
    client.translate([TranslationRequest("hola", "en", "es", "qwen")])
    assert fake.requests == 2


def test_run_batch_sends_windows_and_translations_together(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    client = make_client(concurrency=8)
    client.run_batch([CARD_WINDOW], [("warm", "de")])  # a process's first calls pay for lazy imports
    fake.gather = 8  # all eight calls are held until all are in flight: they went out together
    fake.reset_counts()
    windows, translations = client.run_batch([make_window(make_event(f"w{i}")) for i in range(4)],
                                             [(f"t{i}", "de") for i in range(4)])
    assert [w["assistant"]["suggested_reply"] for w in windows] == [f"Re: w{i}" for i in range(4)]
    assert [t["translated"] for t in translations] == [f"[de] t{i}" for i in range(4)] and fake.max_in_flight == 8


def test_no_call_when_the_message_is_known_to_be_in_the_target_language(
    fake: FakeOpenAI, make_client: Callable[..., LlmClient]
) -> None:
    out = make_client().translate([("Hello there", "en-GB", "EN"), ("  ", "en"), ("Hola", "en", "es"), ("Hi", "en", None)])
    assert out[0] == {"translated": "Hello there", "language": "en-GB",
                      "translation": {"status": "skipped", "model": "gpt-4o-mini", "latency_ms": None, "reason": "already in en-GB"}}
    assert out[1]["translation"]["reason"] == "blank text"
    # A message of unknown language goes to the model, whose prompt says to repeat what needs no translation.
    assert [o["translated"] for o in out[2:]] == ["[en] Hola", "[en] Hi"] and fake.requests == 2


@pytest.mark.parametrize("concurrency", [1, 4])
def test_concurrency_is_bounded_and_used(fake: FakeOpenAI, make_client: Callable[..., LlmClient], concurrency: int) -> None:
    fake.gather = concurrency  # held until that many are in flight; more would show in max_in_flight
    out = make_client(concurrency=concurrency).translate([(f"text {i}", "es") for i in range(12)])
    assert [o["translated"] for o in out] == [f"[es] text {i}" for i in range(12)]
    assert fake.max_in_flight == concurrency


def test_a_call_waiting_for_a_connection_is_not_timed_out_by_the_wait(
    fake: FakeOpenAI, make_client: Callable[..., LlmClient]
) -> None:
    fake.latency = 0.5  # 8 calls through 2 connections: the last pair waits 1.5 s, then answers in 0.5 s
    out = make_client(concurrency=2, timeout=1.5, max_retries=0).translate([(f"text {i}", "es") for i in range(8)])
    assert [o["translation"]["status"] for o in out] == ["ok"] * 8
    assert fake.max_in_flight == 2 and fake.requests == 8


def test_results_keep_input_order_when_calls_finish_out_of_order(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    fake.inject("slow", match="first", delay=0.3)
    windows = [make_window(make_event(text)) for text in ["first", "second", "third"]]
    out = make_client().assist_windows(windows)
    assert [w["assistant"]["suggested_reply"] for w in out] == ["Re: first", "Re: second", "Re: third"]


def test_rate_limit_paces_calls(fake: FakeOpenAI, make_client: Callable[..., LlmClient]) -> None:
    started = time.monotonic()
    out = make_client(rate_limit=20.0, concurrency=8).translate([(f"t{i}", "es") for i in range(8)])
    assert all(o["translation"]["status"] == "ok" for o in out)
    assert time.monotonic() - started >= 0.3  # 8 calls at 20/s: ~0.4 s, unpaced: ~0.02 s


@pytest.mark.parametrize(("env", "mode", "reason"), [
    ({"OPENAI_API_KEY": KEY}, "off", "LLM mode is off"),
    ({}, "auto", "LLM mode auto: no API key or base URL configured"),
])
def test_llm_off_skips_with_the_reason(fake: FakeOpenAI, env: dict[str, str], mode: str, reason: str) -> None:
    with LlmClient(LlmConfig.from_env(env, mode=mode)) as client:
        [window] = client.assist_windows([CARD_WINDOW])
        [translation] = client.translate([("hola", "en")])
    assert window["assistant"] == {"suggested_reply": None, "summary": None, "model": "gpt-4o-mini", "latency_ms": None,
                                   "status": "skipped", "reason": reason}
    assert translation == {"translated": None, "language": "en",
                           "translation": {"status": "skipped", "model": "gpt-4o-mini", "latency_ms": None, "reason": reason}}
    assert fake.requests == 0


def test_api_key_is_kept_secret_in_config() -> None:
    config = LlmConfig.from_env({}, api_key=KEY)
    assert isinstance(config.api_key, SecretStr) and KEY not in repr(config) and KEY not in str(config.api_key)
