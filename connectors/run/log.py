"""The run's own log lines (start, rule changes, broker trouble, lake commits, stop) on stderr, as
text or as JSON objects (`--log-format`), through the standard `logging` module.

Lines are logged as events with fields (`log_event("start", input=...)`); a JSON line holds them as
keys. Callers log no secrets: settings are never logged whole.
"""

from __future__ import annotations

import logging
import sys
from datetime import datetime, timezone
from collections.abc import Sequence
from typing import Any, TextIO

import orjson

from connectors.run.settings import LogFormat
from dataflows.rules import Rule

RUN_LOGGER = "convoflow"
"""The run's own logger; `connectors.*` modules log warnings through their own loggers too."""
_FIELDS = "convoflow_fields"


class _Stderr(logging.StreamHandler):  # type: ignore[type-arg]
    """A handler writing to whatever `sys.stderr` is when it writes (the live view swaps it)."""

    @property  # type: ignore[override]
    def stream(self) -> TextIO:
        return sys.stderr

    @stream.setter
    def stream(self, _value: TextIO) -> None:
        pass


class _Text(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = getattr(record, _FIELDS, {})
        pairs = "".join(f" {key}={value}" for key, value in fields.items())
        return f"{_time(record)} {record.levelname.lower()} {record.name}: {record.getMessage()}{pairs}"


class _Json(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {"time": _time(record), "level": record.levelname.lower(), "logger": record.name,
                "message": record.getMessage(), **getattr(record, _FIELDS, {})}
        return orjson.dumps(line, default=str).decode()


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def configure_logging(form: LogFormat, level: int = logging.INFO) -> None:
    """Send convoflow's log lines (and every logger's warnings) to stderr in `form`."""
    handler = _Stderr()
    handler.setFormatter(_Json() if form is LogFormat.json else _Text())
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Stderr)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)
    for name in (RUN_LOGGER, "connectors"):
        logging.getLogger(name).setLevel(level)


def log_event(event: str, logger: str = RUN_LOGGER, level: int = logging.INFO, **fields: Any) -> None:
    """Log `event` with `fields` (values JSON-ready or printable)."""
    logging.getLogger(logger).log(level, event, extra={_FIELDS: fields})


def log_rules(items: Sequence[object], source: str) -> None:
    """A line per rule a rules source sends into the flow: a change of the rules in effect."""
    for item in items:
        if isinstance(item, Rule):
            kind, value = item.scope
            log_event("rule", source=source, id=item.id, kind=item.kind, version=item.version,
                      enabled=item.enabled, scope=kind if value is None else f"{kind} {value}")
