"""The LLM stage on batches and inside a Bytewax flow, against the local fake OpenAI server."""

from __future__ import annotations

from pathlib import Path

import copy
import gc
import json
import logging
import pickle
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import orjson
import polars as pl
import pytest
from bytewax.testing import TestingSink, TestingSource, cluster_main, run_main

from connectors.llm import stage as llm_stage
from connectors.llm.client import LlmConfig
from connectors.llm.stage import FLAG_OFF, NO_READER, NO_SOURCE, LlmStage, ReaderLanguages, model_for
from dataflows.events import DeadLetter, Event, WindowRecord, iso
from dataflows.flow import FlowConfig, FlowOutput, OutputKind, build_flow
from dataflows.records import Record, as_records
from dataflows.sequencing import DONE, Progress, ReplayLayout, Stamped, replay_items
from tests.connectors.llm.fake_openai import FakeOpenAI

KEY = "sk-test-CONVOFLOW-0xDEADBEEF"
Batches = list[tuple[str, list[Record]]]


@pytest.fixture
def fake() -> Iterator[FakeOpenAI]:
    with FakeOpenAI() as server:
        yield server


@pytest.fixture
def make_stage(fake: FakeOpenAI) -> Iterator[Callable[..., LlmStage]]:
    stages: list[LlmStage] = []

    def make(models: Mapping[str, str] | None = None, figures_dir: Path | None = None, **overrides: Any) -> LlmStage:
        options: dict[str, Any] = {"mode": "on", "base_url": fake.base_url, "api_key": KEY, "timeout": 2.0,
                                   "max_retries": 1, "concurrency": 4}
        options.update(overrides)
        stage = LlmStage(LlmConfig.from_env({}, **options), models=models, figures_dir=figures_dir)
        stages.append(stage)
        return stage

    yield make
    for stage in stages:
        stage.close()


def make_event(text: str = "hola", *, sender: str = "alice", language: str | None = "es", session: str = "room-1",
               line: int = 1) -> Event:
    at = 1_704_103_200.0 + line
    return Event(f"in:{line}", session, sender, "USER_MESSAGE", text, at, "event", "chat", "in", line, 0,
                 language, sender, iso(at))


def message(text: str = "hola", **fields: Any) -> Record:
    """A `messages` record; `fields` are `make_event`'s keywords, others are added to the record."""
    event_keys = {"sender", "language", "session", "line"}
    record = make_event(text, **{k: v for k, v in fields.items() if k in event_keys}).as_record()
    record.update({k: v for k, v in fields.items() if k not in event_keys})
    return record


def window(*turns: tuple[str, str], session: str = "s-1") -> Record:
    """A `windows` record of `(sender, text)` turns in time order."""
    events = tuple(make_event(text, sender=sender, language=None, session=session, line=i)
                   for i, (sender, text) in enumerate(turns or (("customer", "hi"),), start=1))
    return WindowRecord(session, events[0].time or 0.0, (events[-1].time or 0.0) + 30, events,
                        {"customer": 1}).as_record()


CARD = (("customer", "hello"), ("rm", "hi, how can I help?"), ("customer", "where is my card?"))


def conversation_of(*turns: tuple[str, str | None, str]) -> list[Record]:
    """Messages of one room from `(sender, language, text)` turns."""
    return [message(text, sender=sender, language=language, line=i) for i, (sender, language, text) in enumerate(turns, 1)]


# --- LLM off -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("env", "mode", "reason"), [
    ({"OPENAI_API_KEY": KEY}, "off", "LLM mode is off"),
    ({}, "auto", "LLM mode auto: no API key or base URL configured"),
])
def test_llm_off_marks_every_record_skipped_and_calls_nothing(
    fake: FakeOpenAI, env: dict[str, str], mode: str, reason: str
) -> None:
    stage = LlmStage(LlmConfig.from_env(env, mode=mode))
    alert = {"pattern": "spam", "session_id": "s-1"}
    batches: Batches = [(OutputKind.WINDOWS, [window(*CARD)]), (OutputKind.MESSAGES, [message(), message("x", line=2)]),
                        (OutputKind.ALERTS, [alert])]
    out = stage(batches)
    assert all(got is given for (_, got), (_, given) in zip(out, batches, strict=True)), "dicts are enriched in place"
    assert [len(records) for _, records in out] == [1, 2, 1]
    assert out[0][1][0]["assistant"] == {"suggested_reply": None, "summary": None, "model": "gpt-4o-mini",
                                         "latency_ms": None, "status": "skipped", "reason": reason}
    for record in out[1][1]:
        assert record["translated"] is None and record["language"] == "es"
        assert record["translation"] == {"status": "skipped", "model": "gpt-4o-mini", "latency_ms": None, "reason": reason}
    assert alert == {"pattern": "spam", "session_id": "s-1"} and fake.requests == 0
    stage.close()


def test_llm_off_marks_a_frame_of_records_as_it_marks_dicts(fake: FakeOpenAI) -> None:
    stage = LlmStage(LlmConfig.from_env({}, mode="off"))
    records = [message(), message("x", line=2)]
    [(_, framed)] = stage([(OutputKind.MESSAGES, pl.DataFrame(records))])
    [(_, listed)] = stage([(OutputKind.MESSAGES, [dict(r) for r in records])])
    assert isinstance(framed, pl.DataFrame) and as_records(framed) == listed and fake.requests == 0
    stage.close()


# --- window assistant --------------------------------------------------------------------------


def test_window_gets_the_validated_suggested_reply(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    [(_, [record])] = make_stage()([(OutputKind.WINDOWS, [window(*CARD)])])
    assistant = record["assistant"]
    assert assistant | {"latency_ms": 0} == {"suggested_reply": "Re: where is my card?", "summary": "3 lines, last from customer",
                                              "model": "gpt-4o-mini", "latency_ms": 0, "status": "ok"}
    assert assistant["latency_ms"] > 0
    [payload] = fake.payloads
    assert payload["messages"][1]["content"] == "customer: hello\nrm: hi, how can I help?\ncustomer: where is my card?"


def test_malformed_answer_is_asked_again_once_then_invalid_response(
    fake: FakeOpenAI, make_stage: Callable[..., LlmStage]
) -> None:
    fake.inject("malformed", match="once")
    fake.inject("malformed", times=2, match="twice")
    batches: Batches = [(OutputKind.WINDOWS, [window(("customer", "once")), window(("customer", "twice"))])]
    [(_, [once, twice])] = make_stage()(batches)
    assert once["assistant"]["status"] == "ok" and once["assistant"]["suggested_reply"] == "Re: once"
    assert twice["assistant"] | {"latency_ms": None} == {
        "suggested_reply": None, "summary": None, "model": "gpt-4o-mini", "latency_ms": None,
        "status": "invalid_response", "raw": '{"suggested_reply": "cut sh'}
    assert fake.requests == 4


def test_server_errors_are_retried_then_recorded_without_the_key(
    fake: FakeOpenAI, make_stage: Callable[..., LlmStage], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    fake.inject("500", times=1, match="flaky", retry_after=0.05)
    fake.inject("500", times=2, match="doomed", retry_after=0.05)
    windows = [window(("customer", "flaky")), window(("customer", "doomed")), window(("customer", "fine"))]
    [(_, out)] = make_stage(max_retries=1)([(OutputKind.WINDOWS, windows)])
    assert [w["assistant"]["status"] for w in out] == ["ok", "error", "ok"]
    assert out[1]["assistant"]["error"].startswith("InternalServerError: Error code: 500")
    assert fake.requests == 5
    seen = json.dumps(out) + caplog.text
    assert KEY not in seen and "DEADBEEF" not in seen


def test_a_window_that_times_out_is_an_error(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    fake.inject("hang", match="slowpoke")
    [(_, [slow, fine])] = make_stage(timeout=0.3, max_retries=0)(
        [(OutputKind.WINDOWS, [window(("customer", "slowpoke")), window(("customer", "fine"))])])
    assert slow["assistant"]["status"] == "error" and "timed out" in slow["assistant"]["error"]
    assert fine["assistant"]["status"] == "ok"
    assert fake.hanging == 1, "the stage returned while the server still held the call: the timeout cut it short"


def test_windows_of_a_batch_are_called_concurrently_within_the_bound(
    fake: FakeOpenAI, make_stage: Callable[..., LlmStage]
) -> None:
    fake.gather = 16  # every call held until all sixteen are in flight
    windows = [window(("customer", f"question {i}")) for i in range(16)]
    [(_, out)] = make_stage(concurrency=16)([(OutputKind.WINDOWS, windows)])
    assert [w["assistant"]["suggested_reply"] for w in out] == [f"Re: question {i}" for i in range(16)]
    assert fake.max_in_flight == 16


def test_concurrency_bounds_all_calls_of_a_batch(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    fake.gather = 3  # the first three held until all are in flight; a fourth would show in max_in_flight
    room = conversation_of(("bob", "en", "hi"), *(("alice", "es", f"texto {i}") for i in range(6)))
    make_stage(concurrency=3)([(OutputKind.WINDOWS, [window(("customer", f"q{i}")) for i in range(6)]),
                               (OutputKind.MESSAGES, room)])
    assert fake.requests == 12 and fake.max_in_flight == 3


# --- translation -------------------------------------------------------------------------------


def test_reader_is_the_latest_other_sender_with_a_language() -> None:
    readers = ReaderLanguages()
    assert readers.reader_of("r", "alice", "es") is None
    assert readers.reader_of("r", "bob", "en") == "es"
    assert readers.reader_of("r", "alice", "es") == "en"
    assert readers.reader_of("r", "carol", "de") == "es"  # alice spoke last
    assert readers.reader_of("r", "bob", None) == "de" and readers.reader_of("r", "bob", "en") == "de"
    assert readers.reader_of("other", "bob", "en") is None and readers.reader_of("none", "x", None) is None
    assert len(readers) == 2


def test_reader_state_is_bounded() -> None:
    readers = ReaderLanguages(max_sessions=2, max_senders=2)
    for session in ("a", "b", "c"):
        readers.reader_of(session, "u1", "es")
    assert len(readers) == 2 and readers.reader_of("a", "u2", "en") is None  # "a" was forgotten
    readers.reader_of("b", "u2", "en")
    readers.reader_of("b", "u3", "de")  # u1 forgotten
    assert readers.reader_of("b", "u4", "fr") == "de" and readers.reader_of("b", "u2", "en") == "fr"


def test_messages_are_translated_into_the_other_partys_language(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    room = conversation_of(("alice", "es", "hola"), ("bob", "en-US", "hello"), ("alice", "es", "qué tal"),
                           ("carol", "en-GB", "hi all"), ("bob", "en", "welcome"), ("dave", None, "yo"))
    [(_, out)] = make_stage()([(OutputKind.MESSAGES, room)])
    assert [(m["translated"], m["language"], m["translation"]["status"]) for m in out] == [
        (None, "es", "skipped"),                  # nobody else has spoken yet
        ("[es] hello", "es", "ok"),
        ("[en-US] qué tal", "en-US", "ok"),
        ("[es] hi all", "es", "ok"),              # alice spoke last
        ("welcome", "en", "skipped"),             # carol reads English already
        (None, None, "skipped"),                  # dave's language is unknown
    ]
    assert out[0]["translation"] == {"status": "skipped", "model": "gpt-4o-mini", "latency_ms": None,
                                     "source": "es", "target": None, "reason": NO_READER}
    assert out[1]["translation"] | {"latency_ms": 0} == {"status": "ok", "model": "gpt-4o-mini", "latency_ms": 0,
                                                         "source": "en-US", "target": "es"}
    assert out[4]["translation"]["reason"] == "already in en-GB"
    assert out[5]["translation"]["reason"] == NO_SOURCE and out[5]["translation"]["target"] == "en"
    assert fake.requests == 3


def test_repeated_texts_are_translated_once_per_run(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    stage = make_stage()
    first = conversation_of(("bob", "en", "hi"), ("alice", "es", "gracias"), ("alice", "es", "gracias"))
    stage([(OutputKind.MESSAGES, first)])
    assert fake.requests == 1
    later = [message("gracias", sender="alice", line=9)]
    stage([(OutputKind.MESSAGES, later)])
    assert later[0]["translated"] == "[en] gracias" and later[0]["translation"]["status"] == "ok"
    assert [m["translated"] for m in first[1:]] == ["[en] gracias"] * 2 and fake.requests == 1


def test_translation_cache_lookups_and_hits_are_kept_for_the_metrics(
    fake: FakeOpenAI, make_stage: Callable[..., LlmStage], tmp_path: Path
) -> None:
    from connectors.view.progress import read_figures

    stage = make_stage(figures_dir=tmp_path)
    stage([(OutputKind.MESSAGES, conversation_of(("bob", "en", "hi"), ("alice", "es", "gracias")))])
    stage([(OutputKind.MESSAGES, [message("gracias", sender="alice", line=9)])])
    stage([(OutputKind.MESSAGES, [message("hasta luego", sender="alice", line=10)])])
    [figures] = read_figures(tmp_path, "llm")
    assert figures == {"cache_lookups": 3, "cache_hits": 1} and fake.requests == 2


def test_translation_flag_off_skips_and_leaves_the_shared_moderation_alone(
    fake: FakeOpenAI, make_stage: Callable[..., LlmStage]
) -> None:
    moderation: Record = {"action": "allow", "rules": [], "reasons": [], "flags": {"translation": False}, "role": None}
    before = copy.deepcopy(moderation)
    room = [message("hi", sender="bob", language="en", moderation=moderation),
            message("hola", sender="alice", line=2, moderation=moderation),
            message("adiós", sender="alice", line=3, moderation={**moderation, "flags": {"translation": True}})]
    [(_, out)] = make_stage()([(OutputKind.MESSAGES, room)])
    assert [m["translation"]["status"] for m in out] == ["skipped", "skipped", "ok"]
    assert out[1]["translation"]["reason"] == FLAG_OFF and out[1]["translated"] is None
    assert out[2]["translated"] == "[en] adiós" and fake.requests == 1
    assert moderation == before and out[0]["moderation"] is moderation


def test_the_model_follows_the_record_hint_then_the_stage_models(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    stage = make_stage(models={"ES": "qwen-es", "pt-BR": "qwen-ptbr"})
    room = [message("hola", sender="alice", language="es", line=1), message("hi", sender="bob", language="en", line=2),
            message("hey", sender="bob", language="en", line=3, language_model={"es": "llama-es"}),
            message("oi", sender="carol", language="pt-BR", line=4),
            message("ok", sender="bob", language="en", line=5, language_model="mistral")]
    [(_, out)] = stage([(OutputKind.MESSAGES, room)])
    assert [m["translation"]["model"] for m in out] == ["gpt-4o-mini", "qwen-es", "llama-es", "gpt-4o-mini", "mistral"]
    assert sorted(p["model"] for p in fake.payloads) == ["gpt-4o-mini", "llama-es", "mistral", "qwen-es"]
    assert model_for({}, "pt-br", stage.models) == "qwen-ptbr" and model_for({}, "es-MX", stage.models) == "qwen-es"


def test_language_model_rules_on_the_verdict_choose_the_model(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    verdict = {"action": "allow", "rules": [], "reasons": [], "flags": {}, "role": None, "models": {"es": "qwen-es"}}
    room = [message("hola", sender="alice", language="es", line=1, moderation=verdict),
            message("hi", sender="bob", language="en", line=2, moderation=verdict),
            message("hi", sender="bob", language="en", line=3, moderation={**verdict, "models": {}})]
    [(_, out)] = make_stage()([(OutputKind.MESSAGES, room)])
    assert [m["translation"]["model"] for m in out[1:]] == ["qwen-es", "gpt-4o-mini"]


def test_a_failed_translation_keeps_the_record_and_its_language(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    fake.inject("500", times=2, match="doomed", retry_after=0.05)
    room = conversation_of(("bob", "en", "hi"), ("alice", "es", "doomed"), ("alice", "es", "bien"))
    [(_, out)] = make_stage(max_retries=1)([(OutputKind.MESSAGES, room)])
    assert [(m["translated"], m["language"]) for m in out] == [(None, "en"), (None, "es"), ("[en] bien", "en")]
    assert out[1]["translation"]["status"] == "error" and out[1]["translation"]["target"] == "en"


# --- batches, lifetime -------------------------------------------------------------------------


def test_every_record_comes_back_in_order_whatever_fails(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    fake.inject("slow", match="first", delay=0.3)
    dead = {"source": "in", "line": 7, "reason": "not JSON"}
    broken = {"session_id": "s-9"}  # a window record without messages
    batches: Batches = [
        (OutputKind.WINDOWS, [window(("customer", "first")), broken, window(("customer", "third"))]),
        (OutputKind.DEAD_LETTER, [dead]),
        (OutputKind.MESSAGES, conversation_of(("bob", "en", "first"), ("alice", "es", "second"))),
        (OutputKind.WINDOWS, [window(("customer", "last"))]),
    ]
    shape = [(kind, [id(r) for r in records]) for kind, records in batches]
    out = make_stage()(batches)
    assert [(kind, [id(r) for r in records]) for kind, records in out] == shape
    assert [w["assistant"]["suggested_reply"] for w in out[0][1]] == ["Re: first", None, "Re: third"]
    assert out[0][1][1]["assistant"]["status"] == "error" and "messages" in out[0][1][1]["assistant"]["error"]
    assert out[1][1] == [dead] and out[3][1][0]["assistant"]["status"] == "ok"


def test_a_stage_failure_marks_records_as_errors_instead_of_stopping(
    make_stage: Callable[..., LlmStage], monkeypatch: pytest.MonkeyPatch
) -> None:
    stage = make_stage()

    def broken(*args: Any) -> None:
        raise RuntimeError(f"boom with {KEY}")

    monkeypatch.setattr("connectors.llm.client.LlmClient.run_batch", broken)
    batches: Batches = [(OutputKind.WINDOWS, [window()]), (OutputKind.MESSAGES, conversation_of(("bob", "en", "hi"), ("alice", "es", "x")))]
    [(_, [win]), (_, [first, second])] = stage(batches)
    assert win["assistant"]["status"] == "error" and win["assistant"]["error"] == "RuntimeError: boom with ***"
    assert first["translation"]["reason"] == NO_READER and second["translation"]["status"] == "error"


def test_the_stage_pickles_without_its_clients_and_closes_them(fake: FakeOpenAI, make_stage: Callable[..., LlmStage]) -> None:
    stage = make_stage(models={"es": "qwen"})
    stage([(OutputKind.WINDOWS, [window()])])
    [worker] = stage._workers.values()
    copy_ = pickle.loads(pickle.dumps(stage))
    assert copy_._workers == {} and copy_.models == {"es": "qwen"} and copy_.config == stage.config
    assert KEY not in repr(stage)
    stage.close()
    assert worker.client._loop is not None and worker.client._loop.is_closed() and stage._workers == {}
    stage([(OutputKind.WINDOWS, [window()])])  # reopens
    assert fake.requests == 2


def test_the_first_client_of_a_process_leaves_the_loaded_heap_to_reference_counting(
    fake: FakeOpenAI, make_stage: Callable[..., LlmStage], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(llm_stage, "_heap_settled", False)
    gc.unfreeze()
    loaded = ["alive before the first batch"]
    make_stage()([(OutputKind.WINDOWS, [window()])])
    assert gc.get_freeze_count() > 0 and not any(o is loaded for o in gc.get_objects())
    frozen = gc.get_freeze_count()
    make_stage()([(OutputKind.WINDOWS, [window()])])
    assert gc.get_freeze_count() == frozen, "once per process"


# --- in a flow ---------------------------------------------------------------------------------


def chat_line(username: str, language: str, text: str, second: int) -> str:
    return orjson.dumps({"username": username, "room": "r-1", "type": "USER_MESSAGE", "text": text,
                         "preferredLanguage": language, "timestamp": 1_704_103_200 + second}).decode()


@pytest.mark.parametrize("workers", [1, 2])
def test_the_stage_enriches_the_flows_outputs(fake: FakeOpenAI, make_stage: Callable[..., LlmStage], workers: int) -> None:
    lines = [orjson.dumps({"session_id": f"s-{i}", "sender": "customer", "message": f"q{i}",
                           "timestamp": 1_704_103_200 + i}).decode() for i in range(6)]
    lines += [chat_line("alice", "es", "hola", 6), chat_line("bob", "en", "hello", 7), chat_line("alice", "es", "adiós", 8),
              "not json", chat_line("carol", "de", "hallo", 40)]
    out: list[tuple[str, list[Record]]] = []
    source: TestingSource[Stamped | DeadLetter | Progress] = TestingSource(replay_items(lines))
    flow = build_flow(source, [FlowOutput("test", TestingSink(out))],
                      FlowConfig(layout=ReplayLayout(partitions=1, block_bytes=DONE)), stages=[make_stage()])
    if workers == 1:
        run_main(flow)
    else:
        cluster_main(flow, [], 0, worker_count_per_proc=workers)
    by_kind: dict[str, list[Record]] = {k.value: [] for k in OutputKind}
    for kind, records in out:
        by_kind[kind].extend(records)
    room = sorted((m for m in by_kind["messages"] if m["session_id"] == "r-1"), key=lambda m: m["line"])
    assert [(m["text"], m["translated"], m["language"]) for m in room] == [
        ("hola", None, "es"), ("hello", "[es] hello", "es"), ("adiós", "[en] adiós", "en"), ("hallo", "[es] hallo", "es")]
    assert all(m["translation"]["status"] == "skipped" for m in by_kind["messages"] if m["session_id"] != "r-1")
    assert len(by_kind["windows"]) == 8 and len(by_kind["dead_letter"]) == 1 and by_kind["late"] == []
    assert {w["assistant"]["status"] for w in by_kind["windows"]} == {"ok"}
    replies = {w["assistant"]["suggested_reply"] for w in by_kind["windows"] if w["session_id"] == "r-1"}
    assert replies == {"Re: adiós", "Re: hallo"}
