"""Shared factories: events as dicts with overridable defaults, and JSONL helpers."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson
import pytest
from hypothesis import settings

pytest_plugins = ["tests.kafka_broker"]

# Per-example deadlines measure the machine, not the code: a cold 2-core CI box trips them.
settings.register_profile("convoflow", deadline=None)
settings.load_profile("convoflow")


@pytest.fixture
def conversation() -> Callable[..., dict[str, Any]]:
    def make(**overrides: Any) -> dict[str, Any]:
        event = {"session_id": "s-1", "sender": "customer", "message": "hi", "timestamp": "2024-01-01T10:00:00+00:00"}
        event.update(overrides)
        return {k: v for k, v in event.items() if v is not ...}

    return make


@pytest.fixture
def chat() -> Callable[..., dict[str, Any]]:
    def make(**overrides: Any) -> dict[str, Any]:
        event = {"username": "alice", "text": "Hello", "type": "USER_MESSAGE", "preferredLanguage": "es", "timestamp": 1704103200}
        event.update(overrides)
        return {k: v for k, v in event.items() if v is not ...}

    return make


def jsonl(*events: dict[str, Any] | str) -> list[str]:
    """Events as JSONL lines; strings are taken as already-raw lines."""
    return [e if isinstance(e, str) else orjson.dumps(e).decode() for e in events]
