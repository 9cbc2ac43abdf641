"""Frame operations that skip Polars' query engine, for the few-row frames of a paced or live stream.

On a frame of a handful of rows, `select`, `filter` and `with_columns` cost 100-200 µs each,
nearly all of it planning the query; picking columns, gathering rows by position and appending
columns directly costs 5-50 µs. A shard handles such frames many times a second, so these are
what its hot path uses where no expression is needed.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl


def rows_where(frame: pl.DataFrame, mask: np.ndarray) -> pl.DataFrame:
    """The rows of `frame` where the boolean array `mask` is true, in order."""
    if mask.all():
        return frame
    return frame[np.flatnonzero(mask)]


def with_series(frame: pl.DataFrame, *columns: pl.Series) -> pl.DataFrame:
    """`frame` with `columns` appended (their names must be new to it)."""
    return frame.hstack(list(columns))


def only(frame: pl.DataFrame, names: Sequence[str]) -> pl.DataFrame:
    """The columns `names` of `frame`, in that order."""
    return frame if frame.columns == list(names) else frame[list(names)]
