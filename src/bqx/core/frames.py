"""Data frames in and out of :func:`bqx.metrics.compute`: pandas, polars and Arrow.

Most people hold forex times as a timezone-aware pandas column. ``compute`` takes such
series (and polars series, Arrow arrays) for ``times`` and ``prices``, and a whole data frame
(pandas, polars or a ``pyarrow.Table``) for ``times``, giving the same kind of frame back with
the metric columns. Aware times are converted to UTC; naive times are read as UTC.

pandas and polars stay optional: a value's kind is told by the module its type comes from,
and the library is imported only when such a value is given.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

# Column names tried, in order, when a frame is given without saying which columns to use.
TIME_NAMES: tuple[str, ...] = ("time", "ts_utc", "timestamp", "datetime", "date", "ts")
PRICE_NAMES: tuple[str, ...] = ("close", "rate", "price", "mid", "rate_index")


def _kind(value: object) -> str:
    """``pandas`` / ``polars`` / ``pyarrow`` / ``numpy`` / ``other`` by the type's module."""
    module = type(value).__module__.split(".")[0]
    return module if module in ("pandas", "polars", "pyarrow", "numpy") else "other"


def is_frame(value: object) -> bool:
    """A pandas or polars DataFrame, or a pyarrow Table."""
    kind, name = _kind(value), type(value).__name__
    return (kind in ("pandas", "polars") and name == "DataFrame") or (
        kind == "pyarrow" and name == "Table"
    )


# -- columns to numpy ---------------------------------------------------------------------


def times_to_numpy(values: Any, what: str = "times") -> np.ndarray:
    """A sequence of times as naive-UTC ``datetime64``: aware values are converted to UTC."""
    kind = _kind(values)
    if kind == "pandas":
        import pandas as pd

        series = pd.Series(values) if type(values).__name__ != "Series" else values
        dtype = series.dtype
        if isinstance(dtype, pd.DatetimeTZDtype):
            series = series.dt.tz_convert("UTC").dt.tz_localize(None)
        elif dtype.kind == "O":  # e.g. datetime objects from several zones
            try:
                series = pd.to_datetime(series, utc=True).dt.tz_localize(None)
            except (TypeError, ValueError) as exc:
                raise ValueError(f"{what} could not be read as times: {exc}") from None
        if series.isna().any():
            raise ValueError(f"{what}[{int(np.flatnonzero(series.isna().to_numpy())[0])}] is NaT")
        return series.to_numpy()
    if kind == "polars":
        import polars as pl

        series = values if isinstance(values, pl.Series) else pl.Series(values)
        if isinstance(series.dtype, pl.Datetime) and series.dtype.time_zone is not None:
            series = series.dt.convert_time_zone("UTC").dt.replace_time_zone(None)
        elif series.dtype == pl.Date:
            series = series.cast(pl.Datetime("us"))
        if series.null_count():
            raise ValueError(f"{what}[{int(series.is_null().arg_true()[0])}] is null")
        return series.to_numpy()
    if kind == "pyarrow":
        import pyarrow as pa
        import pyarrow.compute as pc

        array = values.combine_chunks() if isinstance(values, pa.ChunkedArray) else values
        if array.null_count:
            first = int(pc.index(pc.is_null(array), True).as_py())
            raise ValueError(f"{what}[{first}] is null")
        if pa.types.is_timestamp(array.type):
            # Arrow stores aware timestamps as UTC already; dropping the zone keeps the instant
            array = array.cast(pa.timestamp(array.type.unit))
        elif pa.types.is_date(array.type):
            array = array.cast(pa.timestamp("us"))
        return array.to_numpy(zero_copy_only=False)
    return np.asarray(values)


def prices_to_numpy(values: Any, what: str = "prices") -> np.ndarray:
    """A sequence of prices as float64 (nulls become NaN, which ``compute`` then refuses)."""
    kind = _kind(values)
    if kind == "pandas":
        return values.astype("float64").to_numpy(dtype=np.float64, na_value=np.nan)
    if kind == "polars":
        import polars as pl

        return values.cast(pl.Float64).to_numpy()
    if kind == "pyarrow":
        import pyarrow as pa

        array = values.cast(pa.float64())
        return array.to_numpy(zero_copy_only=False)
    return np.asarray(values)


# -- frames -------------------------------------------------------------------------------


def _pick(names: list[str], wanted: str | None, preferred: tuple[str, ...], what: str) -> str:
    if wanted is not None:
        if wanted not in names:
            raise ValueError(f"the frame has no {what} column {wanted!r}; it has {names}")
        return wanted
    lower = {n.lower(): n for n in names}
    for cand in preferred:
        if cand in lower:
            return lower[cand]
    raise ValueError(
        f"cannot tell the {what} column of a frame with columns {names}: name it, e.g."
        f" compute(df, {'prices=' if what == 'price' else ''}'close')"
    )


def _time_column_of(frame: Any, kind: str) -> str | None:
    """The one datetime column of a frame, or a conventional name, else None."""
    if kind == "pandas":
        dated = [c for c in frame.columns if str(frame[c].dtype).startswith("datetime")]
    elif kind == "polars":
        import polars as pl

        dated = [c for c, t in frame.schema.items() if isinstance(t, pl.Datetime)]
    else:
        import pyarrow as pa

        dated = [f.name for f in frame.schema if pa.types.is_timestamp(f.type)]
    if len(dated) == 1:
        return str(dated[0])
    names = [str(c) for c in frame.columns] if kind != "pyarrow" else frame.column_names
    for cand in TIME_NAMES:
        if cand in names:
            return cand
    return None


def compute_any(
    compute: Callable[..., Mapping[str, np.ndarray]],
    times: Any,
    prices: Any,
    **options: Any,
) -> Any:
    """Convert the inputs, call ``compute`` on numpy arrays and shape the result like the input.

    Series or arrays in give the usual mapping of numpy arrays. A frame in (``times`` is the
    frame, ``prices`` its price column name or None) gives a frame of the same library: pandas
    keeps the input's index and adds nothing else; polars and Arrow get the time column first,
    since they have no index to align by.
    """
    if not is_frame(times):
        if prices is None:
            raise ValueError("prices are missing: compute(times, prices) or compute(frame)")
        if isinstance(prices, str):
            raise ValueError(f"prices={prices!r} names a column, but times is not a data frame")
        return compute(times_to_numpy(times), prices_to_numpy(prices), **options)
    frame, kind = times, _kind(times)
    if prices is not None and not isinstance(prices, str):
        raise ValueError("with a data frame, prices is the name of its price column (or None)")
    if kind == "pandas":
        names = [str(c) for c in frame.columns]
        time_col = _time_column_of(frame, kind)
        import pandas as pd

        if isinstance(frame.index, pd.DatetimeIndex):
            time_values: Any = frame.index.to_series()
        elif time_col is not None:
            time_values = frame[time_col]
        else:
            raise ValueError(f"the frame has no DatetimeIndex and no time column among {names}")
        price_col = _pick(names, prices, PRICE_NAMES, "price")
        cols = compute(
            times_to_numpy(time_values, "times"),
            prices_to_numpy(frame[price_col], price_col),
            **options,
        )
        return pd.DataFrame(dict(cols), index=frame.index)
    names = list(frame.columns) if kind == "polars" else frame.column_names
    time_col = _time_column_of(frame, kind)
    if time_col is None:
        raise ValueError(f"the frame has no time column among {names}")
    price_col = _pick(names, prices, PRICE_NAMES, "price")
    cols = compute(
        times_to_numpy(frame[time_col], time_col),
        prices_to_numpy(frame[price_col], price_col),
        **options,
    )
    if kind == "polars":
        import polars as pl

        return pl.DataFrame({time_col: frame[time_col], **cols})
    import pyarrow as pa

    return pa.table({time_col: frame[time_col], **{k: pa.array(v) for k, v in cols.items()}})
