"""compute() takes pandas, polars and Arrow as well as numpy, with the same values out."""

from __future__ import annotations

import numpy as np
import pandas as pd
import polars as pl
import pyarrow as pa
import pytest

from bqx.metrics import compute, metric_columns

WINDOWS = (3, 5, 8)


def _bars(n: int = 400, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """UTC minutes across the 2024-03-10 New York DST change, with gaps, and prices."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2024-03-10T05:00", "m")  # 00:00 EST; clocks jump at 07:00 UTC
    steps = rng.choice([1, 1, 1, 2, 7], size=n)
    steps[:130] = 1  # no gap of their own around 07:00 UTC (bar 113)
    steps = steps.astype("timedelta64[m]")
    times = (start + np.cumsum(steps)).astype("datetime64[us]")
    prices = 1.08 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
    return times, prices


def _same(a: dict, b: dict) -> None:
    assert list(a) == list(b) == metric_columns(WINDOWS)
    for k in a:
        np.testing.assert_array_equal(np.asarray(a[k]), np.asarray(b[k]), err_msg=k)


@pytest.mark.parametrize("mode", ["bars", "clock"])
def test_series_inputs_give_the_numpy_values(mode: str) -> None:
    times, prices = _bars()
    ref = compute(times, prices, windows=WINDOWS, mode=mode)
    # clock mode makes the times matter: a wrong zone conversion shifts the DST hour's gaps
    assert np.isnan(ref["w8_bqx_return"]).sum() > 8 if mode == "clock" else True
    ny = pd.Series(pd.DatetimeIndex(times).tz_localize("UTC").tz_convert("America/New_York"))
    tokyo = pl.Series("t", times).dt.replace_time_zone("UTC").dt.convert_time_zone("Asia/Tokyo")
    arrow_t = pa.chunked_array(
        [pa.array(times[:150], pa.timestamp("us", tz="Europe/Berlin")),
         pa.array(times[150:], pa.timestamp("us", tz="Europe/Berlin"))]
    )  # fmt: skip
    cases = {
        "pandas aware": (ny, pd.Series(prices)),
        "pandas naive": (pd.Series(times), pd.Series(prices)),
        "pandas datetime objects": (pd.Series(list(ny), dtype=object), list(prices)),
        "polars aware": (tokyo, pl.Series(prices)),
        "polars naive": (pl.Series(times), pl.Series(prices)),
        "arrow chunked aware": (arrow_t, pa.array(prices)),
        "arrow naive ns": (pa.array(times.astype("datetime64[ns]")), pa.array(prices)),
    }
    for name, (t, p) in cases.items():
        got = compute(t, p, windows=WINDOWS, mode=mode)
        assert all(isinstance(v, np.ndarray) for v in got.values()), name
        _same(ref, got)


def test_wall_clock_times_would_differ() -> None:
    """The check above can fail: New York wall-clock times give other clock-mode values."""
    times, prices = _bars()
    ref = compute(times, prices, windows=WINDOWS, mode="clock")
    wall = pd.DatetimeIndex(times).tz_localize("UTC").tz_convert("America/New_York")
    local = compute(wall.tz_localize(None).to_numpy(), prices, windows=WINDOWS, mode="clock")
    assert any(not np.array_equal(ref[k], local[k], equal_nan=True) for k in ref)


def test_frames_in_give_frames_out() -> None:
    times, prices = _bars()
    ref = compute(times, prices, windows=WINDOWS, mode="clock")
    aware = pd.DatetimeIndex(times).tz_localize("UTC").tz_convert("America/New_York")

    indexed = pd.DataFrame({"close": prices, "volume": 1.0}, index=aware)
    out = compute(indexed, windows=WINDOWS, mode="clock")
    assert isinstance(out, pd.DataFrame) and out.index.equals(indexed.index)
    assert list(out.columns) == metric_columns(WINDOWS)
    _same(ref, {c: out[c].to_numpy() for c in out.columns})

    with_col = pd.DataFrame({"when": aware, "mid": prices}, index=np.arange(10, 10 + len(times)))
    out = compute(with_col, "mid", windows=WINDOWS, mode="clock")
    assert out.index.equals(with_col.index)
    _same(ref, {c: out[c].to_numpy() for c in out.columns})

    plf = pl.DataFrame({"time": pl.Series(times).dt.replace_time_zone("UTC"), "close": prices})
    out = compute(plf, windows=WINDOWS, mode="clock")
    assert isinstance(out, pl.DataFrame) and out.columns == ["time", *metric_columns(WINDOWS)]
    assert out["time"].equals(plf["time"])
    _same(ref, {c: out[c].to_numpy() for c in metric_columns(WINDOWS)})

    table = pa.table({"ts_utc": pa.array(times, pa.timestamp("us", tz="UTC")), "rate": prices})
    out = compute(table, windows=WINDOWS, mode="clock")
    assert isinstance(out, pa.Table) and out.column_names[0] == "ts_utc"
    _same(ref, {c: out[c].to_numpy() for c in metric_columns(WINDOWS)})


def test_unclear_frames_are_refused_with_the_columns_named() -> None:
    times, prices = _bars(50)
    frame = pd.DataFrame({"t": times, "a": prices, "b": prices})
    with pytest.raises(ValueError, match=r"price column.*\['t', 'a', 'b'\]"):
        compute(frame)
    with pytest.raises(ValueError, match="no price column 'close'"):
        compute(frame, "close")
    with pytest.raises(ValueError, match=r"times\[2\] is NaT"):
        compute(pd.Series(pd.to_datetime(["2024-01-01", "2024-01-02", None])), [1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match="prices are missing"):
        compute(pd.Series(times))
