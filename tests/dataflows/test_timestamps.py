from datetime import datetime, timezone

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dataflows.timestamps import TimestampError, parse_timestamp

JAN1 = datetime(2024, 1, 1, 10, 0, tzinfo=timezone.utc).timestamp()


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-01-01T10:00:00+00:00", JAN1),
        ("2024-01-01T10:00:00Z", JAN1),
        ("2024-01-01T10:00:00", JAN1),
        ("2024-01-01T12:00:00+02:00", JAN1),
        ("2024-01-01T10:00:00.250Z", JAN1 + 0.25),
        (1704103200, JAN1),
        (1704103200.5, JAN1 + 0.5),
        (1704103200000, JAN1),
        ("1704103200", JAN1),
        ("1704103200000", JAN1),
    ],
)
def test_accepts_iso_and_epoch_forms(value: object, expected: float) -> None:
    assert parse_timestamp(value) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("yesterday", "neither ISO-8601 nor epoch"),
        (True, "boolean"),
        ([1], "type list"),
        (-5, "outside 1970-2200"),
        (1e300, "outside 1970-2200"),
        ("nan", "not a finite number"),
    ],
)
def test_rejects_with_reason(value: object, fragment: str) -> None:
    with pytest.raises(TimestampError, match=fragment):
        parse_timestamp(value)


@given(st.datetimes(min_value=datetime(1971, 1, 1), max_value=datetime(2199, 1, 1), timezones=st.just(timezone.utc)))
def test_iso_round_trip(moment: datetime) -> None:
    assert parse_timestamp(moment.isoformat()) == pytest.approx(moment.timestamp(), abs=1e-6)
