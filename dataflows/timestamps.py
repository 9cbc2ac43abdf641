"""Timestamp parsing for both input shapes: ISO-8601 (naive means UTC) or epoch s / ms."""

from __future__ import annotations

import reprlib
from datetime import datetime, timezone

# Epoch values at or above this are milliseconds: 1e11 s is the year 5138, 1e11 ms is 1973.
_MILLIS_THRESHOLD = 1e11
# Years 1970..2200: anything outside is a corrupt value, not a real conversation.
_MIN_EPOCH = 0.0
_MAX_EPOCH = 7_258_118_400.0


class TimestampError(ValueError):
    """A timestamp value that is present but cannot be read as a point in time."""


def parse_timestamp(value: object) -> float:
    """Read an ISO-8601 string or epoch seconds/milliseconds as epoch seconds (UTC).

    Raises:
        TimestampError: naming the value and why it is not a timestamp.
    """
    if isinstance(value, bool):
        msg = f"timestamp {_shown(value)} is a boolean, not a time"
        raise TimestampError(msg)
    if isinstance(value, (int, float)):
        return _from_epoch(float(value), value)
    if isinstance(value, str):
        text = value.strip()
        try:
            parsed = datetime.fromisoformat(text)
        except ValueError:
            pass
        else:
            if parsed.tzinfo is None:
                parsed = parsed.replace(tzinfo=timezone.utc)
            return _in_range(parsed.timestamp(), value)
        try:
            number = float(text)
        except ValueError:
            msg = f"timestamp {_shown(value)} is neither ISO-8601 nor epoch seconds/milliseconds"
            raise TimestampError(msg) from None
        return _from_epoch(number, value)
    msg = f"timestamp {_shown(value)} has type {type(value).__name__}; expected a string or a number"
    raise TimestampError(msg)


def _from_epoch(number: float, original: object) -> float:
    if number != number or number in (float("inf"), float("-inf")):
        msg = f"timestamp {_shown(original)} is not a finite number"
        raise TimestampError(msg)
    seconds = number / 1000.0 if abs(number) >= _MILLIS_THRESHOLD else number
    return _in_range(seconds, original)


def _in_range(seconds: float, original: object) -> float:
    if not _MIN_EPOCH <= seconds <= _MAX_EPOCH:
        msg = f"timestamp {_shown(original)} is outside 1970-2200"
        raise TimestampError(msg)
    return seconds


def _shown(value: object) -> str:
    """`value` for an error message: depth and length bounded, whatever the input nests."""
    return reprlib.repr(value)
