"""The record types' JSON form; `iso` must format exactly as `datetime.isoformat` does."""

from __future__ import annotations

from datetime import datetime, timezone

from hypothesis import given
from hypothesis import strategies as st

from dataflows.events import iso


@given(st.floats(min_value=-2e9, max_value=4e9, allow_nan=False) | st.integers(-10**9, 4 * 10**9).map(float)
       | st.integers(0, 10**6).map(lambda us: 1_709_542_800 + us / 1e6))
def test_iso_formats_exactly_as_datetime_does(seconds: float) -> None:
    assert iso(seconds) == datetime.fromtimestamp(seconds, timezone.utc).isoformat()


def test_iso_rounds_microseconds_half_to_even_and_carries_into_the_second() -> None:
    assert iso(1_709_542_800.0) == "2024-03-04T09:00:00+00:00"
    assert iso(1_709_542_800.25) == "2024-03-04T09:00:00.250000+00:00"
    assert iso(1_709_542_800.9999999) == "2024-03-04T09:00:01+00:00"
    assert iso(-0.5) == "1969-12-31T23:59:59.500000+00:00"
