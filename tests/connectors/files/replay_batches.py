"""Helpers for tests of the replay source's batches."""

from __future__ import annotations

import polars as pl

from dataflows.sequencing import stamped_rows


def expanded(items: list) -> list:
    """A batch with its event frame as the `Stamped` events the flow makes of it."""
    return [one for item in items for one in (stamped_rows(item) if isinstance(item, pl.DataFrame) else [item])]
