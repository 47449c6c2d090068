"""The metric engine against a plain reference written here, in both window modes."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from bqx import metrics
from bqx.core import kernels
from bqx.metrics import (
    DEFAULT_WINDOWS,
    compute,
    lookback_bars,
    lookback_minutes,
    metric_columns,
)

STATS = ("return", "max", "min", "avg", "stdev", "endpoint")
DIMENSIONLESS = ("return", "endpoint", "range", "volatility")

# -- the reference: loops over each window, two-pass variance, nothing shared with bqx --------


def window_stats(window: list[float], p_t: float) -> dict[str, float]:
    w = len(window)
    mean = sum(window) / w
    var = sum((x - mean) ** 2 for x in window) / (w - 1)
    return {
        "return": sum((x - p_t) / p_t for x in window),
        "max": max(window),
        "min": min(window),
        "avg": mean,
        "stdev": math.sqrt(var),
        "endpoint": (window[0] - p_t) / p_t,
    }


def reference(
    times: np.ndarray, prices: np.ndarray, windows=DEFAULT_WINDOWS, mode="bars", max_fill=5
) -> dict[str, np.ndarray]:
    minutes = [int(t) for t in times.astype("datetime64[m]").astype(np.int64)]
    by_minute = dict(zip(minutes, prices.tolist(), strict=True))
    n = len(prices)
    out = {c: np.full(n, np.nan) for c in metric_columns(windows)}
    wmax = max(windows)
    for i in range(n):
        p_t = float(prices[i])
        for w in windows:
            if mode == "bars":
                window = prices[i - w : i].tolist() if i >= w else None
            else:
                window = []
                for m in range(minutes[i] - w, minutes[i]):
                    # the last bar at or before m, if at most max_fill minutes old
                    price = None
                    for age in range(max_fill + 1):
                        if m - age < minutes[0]:
                            break
                        if m - age in by_minute:
                            price = by_minute[m - age]
                            break
                    if price is None or m < minutes[0]:
                        window = None
                        break
                    window.append(price)
            if window is None:
                continue
            stats = window_stats(window, p_t)
            for s in STATS:
                out[f"w{w}_bqx_{s}"][i] = stats[s]
            if w == wmax:
                for s in ("return", "max", "min", "avg", "stdev"):
                    out[f"agg_bqx_{s}"][i] = stats[s]
                out["agg_bqx_range"][i] = (stats["max"] - stats["min"]) / p_t
                out["agg_bqx_volatility"][i] = stats["stdev"] / p_t
    return out


def assert_close(got: dict[str, np.ndarray], ref: dict[str, np.ndarray], prices: np.ndarray):
    """The documented tolerances (docs/metrics.md); NaN exactly where the reference has no window."""
    assert list(got) == list(ref)
    for col, want in ref.items():
        have = np.asarray(got[col])
        assert np.array_equal(np.isnan(have), np.isnan(want)), f"{col}: NULLs differ"
        ok = ~np.isnan(want)
        scale = 1.0 if col.endswith(DIMENSIONLESS) else prices[ok]
        tol = 1e-9 * np.abs(want[ok]) + 1e-12 * scale
        err = np.abs(have[ok] - want[ok])
        assert (err <= tol).all(), f"{col}: max error/tolerance {np.max(err / tol):.3g}"


# -- data ------------------------------------------------------------------------------------


def walk(n: int, level: float, seed: int, decimals: int = 5, vol: float = 1e-4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.round(level * np.exp(np.cumsum(rng.normal(0, vol, n))), decimals)


def minutes_from(start: str, offsets) -> np.ndarray:
    return np.datetime64(start, "m") + np.asarray(offsets, dtype=np.int64).astype("timedelta64[m]")


def with_gaps(n: int, seed: int) -> np.ndarray:
    """Minute times with a few missing minutes and a 48-hour weekend in the middle."""
    rng = np.random.default_rng(seed)
    steps = np.where(rng.random(n) < 0.05, rng.integers(2, 9, n), 1)
    steps[n // 2] = 48 * 60
    return minutes_from("2024-07-05T20:00", np.cumsum(steps))


# -- accuracy against the reference ------------------------------------------------------------


@pytest.mark.parametrize("mode", ["bars", "clock"])
@pytest.mark.parametrize("level,decimals", [(1.07, 5), (160.0, 3)], ids=["EUR", "JPY"])
def test_random_walk_matches_reference(mode, level, decimals):
    n = 1500
    times = with_gaps(n, seed=7)
    prices = walk(n, level, seed=11, decimals=decimals)
    got = compute(times, prices, mode=mode)
    assert_close(got, reference(times, prices, mode=mode), prices)


@pytest.mark.parametrize("mode", ["bars", "clock"])
def test_flat_stretches_have_stdev_exactly_zero(mode):
    n = 600
    prices = walk(n, 1.08, seed=3)
    prices[100:300] = prices[100]  # a flat stretch of 200 bars
    times = minutes_from("2024-07-01", np.arange(n))
    got = compute(times, prices, mode=mode)
    assert_close(got, reference(times, prices, mode=mode), prices)
    for w in DEFAULT_WINDOWS:
        inside = got[f"w{w}_bqx_stdev"][100 + w : 301]
        assert (inside == 0.0).all() and not np.signbit(inside).any()
    assert (got["agg_bqx_volatility"][175:301] == 0.0).all()


def test_a_jump_after_a_flat_window_keeps_stdev_exactly_zero():
    # the bar at t jumps, the window before it is constant: stdev 0, return = W*(c - p_t)/p_t
    prices = np.array([1.5] * 80 + [1.7])
    times = minutes_from("2024-07-01", np.arange(81))
    got = compute(times, prices)
    assert got["w75_bqx_stdev"][80] == 0.0
    assert got["w75_bqx_return"][80] == pytest.approx(75 * (1.5 - 1.7) / 1.7, rel=1e-14)


@pytest.mark.parametrize("mode", ["bars", "clock"])
@pytest.mark.parametrize("n", [0, 1, 2, 14, 15, 16, 74, 75, 76])
def test_series_shorter_than_the_windows(mode, n):
    times = minutes_from("2024-07-01", np.arange(n))
    prices = walk(n, 1.08, seed=n)
    got = compute(times, prices, mode=mode)
    assert all(len(v) == n for v in got.values())
    assert_close(got, reference(times, prices, mode=mode), prices)
    for w in DEFAULT_WINDOWS:  # exactly the first w bars have no window
        col = got[f"w{w}_bqx_avg"]
        assert np.isnan(col[:w]).all() and not np.isnan(col[w:]).any()


def test_custom_windows_and_column_order():
    cols = metric_columns((30, 10))
    assert cols[:6] == [f"w10_bqx_{s}" for s in STATS]
    assert cols[-7:] == [
        f"agg_bqx_{s}" for s in ("return", "max", "min", "avg", "stdev", "range", "volatility")
    ]
    assert len(metric_columns()) == 37
    n = 300
    times, prices = minutes_from("2024-07-01", np.arange(n)), walk(n, 0.66, seed=5)
    got = compute(times, prices, windows=(30, 10))
    assert_close(got, reference(times, prices, windows=(10, 30)), prices)


def test_any_time_unit_gives_the_same_result():
    n = 400
    times = with_gaps(n, seed=1)
    prices = walk(n, 1.27, seed=2)
    for mode in ("bars", "clock"):
        base = compute(times, prices, mode=mode)
        for unit in ("s", "ms", "us", "ns"):
            other = compute(times.astype(f"datetime64[{unit}]"), prices, mode=mode)
            for col in base:
                assert np.array_equal(base[col], other[col], equal_nan=True)


# -- the two paths: exact integer sums on the decimal grid, the scan off it ---------------------


def off_grid(prices: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The same prices with [lo, hi) nudged off the 10^-5 grid (by 3e-12 relative)."""
    out = prices.copy()
    out[lo:hi] *= 1 + 3e-12
    return out


def test_grid_detection_is_exact():
    wmax = max(DEFAULT_WINDOWS)
    qmax = kernels._grid_qmax(wmax)
    on = np.array([1.07123, 160.123, 0.00001, 1.5, 99.99999])
    assert kernels._grid_off(on, qmax, 1e5) == 0
    # one ulp away from a 5-decimal price, a sixth decimal, too large for int64 sums: off
    off = np.array([np.nextafter(1.07123, 2.0), 1.071235, (qmax + 1) / 1e5, 1e-6])
    assert kernels._grid_off(off, qmax, 1e5) == len(off)
    # and per grid: 1.071235 is on 10^-6, 1e-6 on 10^-6 to 10^-12, one ulp off on none
    assert kernels._grid_off(np.array([1.071235, 1e-6]), qmax, 1e6) == 0
    assert metrics.row_grids(np.array([1.071235]), windows=(2,)).tolist() == [6]
    assert metrics.row_grids(np.array([np.nextafter(1.07123, 2.0)]), windows=(2,)).tolist() == [-1]
    # the largest grid price really fits: W·Σq² and the block prefix sums stay below 2^63
    assert wmax * wmax * qmax**2 < 2**63 and (512 + wmax) * qmax**2 < 2**63


@pytest.mark.parametrize("level,decimals", [(1.07, 5), (160.0, 3), (160.0, 5), (0.61, 5)],
                         ids=["EUR", "JPY", "JPY5", "NZD"])  # fmt: skip
def test_grid_path_matches_reference(level, decimals):
    n = 1200
    times = minutes_from("2024-07-01", np.arange(n))
    prices = walk(n, level, seed=21, decimals=decimals, vol=3e-4)
    assert kernels._grid_off(prices, kernels._grid_qmax(75), 1e5) == 0  # the grid path, all rows
    assert_close(compute(times, prices), reference(times, prices), prices)


def test_scan_path_matches_reference_off_the_grid():
    n = 1200
    times = minutes_from("2024-07-01", np.arange(n))
    prices = walk(n, 1.07, seed=22, decimals=12)
    assert (metrics.row_grids(prices) == -1).all()  # the scan, all rows
    assert_close(compute(times, prices), reference(times, prices), prices)


def test_prices_too_large_for_the_grid_take_the_scan():
    n = 400
    times = minutes_from("2024-07-01", np.arange(n))
    # BTC in rupiah: whole numbers near 1.5e9, whose W·Σq² would overflow int64 on any grid
    prices = walk(n, 1.5e9, seed=23, decimals=0)
    assert kernels._grid_off(prices, kernels._grid_qmax(75), 1.0) == n
    assert (metrics.row_grids(prices) == -1).all()
    assert_close(compute(times, prices), reference(times, prices), prices)


# The instruments of docs/metrics.md, each on its own grid: (level, decimals, the grid its rows
# take with the default windows). Forex keeps 10^-5 (JPY's 3 decimals are on it too); large
# prices take the finest grid whose integers fit the int64 sums, fine ones their own.
GRIDS = {
    "EURUSD": (1.07, 5, 5), "USDJPY": (160.0, 3, 5), "XAUUSD": (2400.0, 2, 4),
    "XAUUSD3": (2400.0, 3, 4), "US500": (5000.0, 2, 3), "GER40": (18000.0, 1, 3),
    "JPN225": (38000.0, 0, 2), "BTCUSDT": (100000.0, 2, 2), "ETHBTC": (0.05, 5, 5),
    "SHIBUSDT": (0.00001234, 8, 8), "PEPEBTC": (2.5e-9, 12, 12), "6E": (1.085, 5, 5),
}  # fmt: skip


@pytest.mark.parametrize("name", GRIDS)
def test_each_grid_takes_its_fast_path_and_matches_reference(name):
    """Every row of an instrument on its grid takes the integer path on the grid named in
    docs/metrics.md, and agrees with the two-pass reference within the tolerances: near
    100,000 (BTC) and below 0.0001 (small coins) too."""
    level, decimals, grid = GRIDS[name]
    n = 900
    times = minutes_from("2024-07-01", np.arange(n))
    prices = walk(n, level, seed=31, decimals=decimals, vol=3e-4)
    assert len(np.unique(prices)) > 20  # a real walk on that grid, not a constant
    scales = metrics.row_grids(prices)  # (a first price may have fewer decimals)
    assert (scales >= 0).all() and (scales[100:] == grid).all()
    # the shortcut for an instrument on one grid says so exactly when every row is on it
    one = kernels._one_grid(prices, kernels._grid_qmax(75), 75, grid)
    assert one == (grid != 5 and (scales == grid).all())
    got = compute(times, prices)
    assert_close(got, reference(times, prices), prices)
    prices[300:316] = prices[300]  # a flat window on the grid: stdev exactly 0
    assert compute(times, prices)["w15_bqx_stdev"][315:317].tolist() == [0.0, 0.0]


@pytest.mark.parametrize("name", GRIDS)
def test_each_grid_falls_back_to_the_scan_only_where_it_must(name):
    """A stretch of prices on no grid (nudged by 3e-13, as a computed mid price may be): the
    rows whose window holds one take the scan, every other row its grid; all agree with the
    reference, and each row at a switch equals that row computed from its own window alone."""
    level, decimals, grid = GRIDS[name]
    n = 700
    times = minutes_from("2024-07-01", np.arange(n))
    prices = walk(n, level, seed=32, decimals=decimals, vol=3e-4)
    prices[300:305] *= 1 + 3e-13
    scales = metrics.row_grids(prices)
    assert np.flatnonzero(scales == -1).tolist() == list(range(300, 305 + 75))
    assert (np.delete(scales, np.arange(300, 380)) == grid).all()
    got = compute(times, prices)
    assert_close(got, reference(times, prices), prices)
    for r in (299, 300, 379, 380, 455):
        lo = max(0, r - 75)
        alone = compute(times[lo : r + 1], prices[lo : r + 1])
        for col in got:
            assert np.array_equal(alone[col][-1:], got[col][r : r + 1], equal_nan=True), (r, col)


def test_a_series_crossing_grids_is_split_into_runs():
    """BTC from 20,000 to 40,000 at 2 decimals: windows below ~28,600 fit 10^-3, above only
    10^-2; a window holding a 9-decimal tick fits neither (the scan). Each row takes the grid
    of its own window, so any tail with its lookback gives the same bits."""
    n = 3000
    times = minutes_from("2024-07-01", np.arange(n))
    prices = np.round(np.linspace(20000.0, 40000.0, n) * (1 + 1e-4 * np.sin(np.arange(n))), 2)
    prices[2000] = 36000.123456789
    scales = metrics.row_grids(prices)
    assert set(np.unique(scales).tolist()) == {-1, 2, 3}
    assert len(metrics.grid_runs(scales)) == 4  # 3, then 2, then the scan, then 2 again
    whole = compute(times, prices)
    assert_close(whole, reference(times, prices), prices)
    for cut in (1000, 1300, 1999, 2040, 2076):
        lo = cut - 75
        tail = compute(times[lo:], prices[lo:])
        for col in whole:
            assert np.array_equal(tail[col][75:], whole[col][cut:], equal_nan=True), (cut, col)


def test_series_switching_between_the_paths():
    """Off-grid stretches in an on-grid series: rows whose window touches one take the scan,
    the rest the grid path; both agree with the reference on every row, at the switches too,
    and every row equals the row computed from its own window alone."""
    n = 900
    times = minutes_from("2024-07-01", np.arange(n))
    prices = off_grid(walk(n, 1.07, seed=24), 200, 210)
    prices = off_grid(prices, 500, 501)
    prices[600:700] = prices[600]  # a flat stretch right after the grid resumes
    rows = np.flatnonzero(metrics.row_grids(prices) == -1)
    assert rows.tolist() == list(range(200, 285)) + list(range(500, 576))
    got = compute(times, prices)
    assert_close(got, reference(times, prices), prices)
    for w in DEFAULT_WINDOWS:
        assert (got[f"w{w}_bqx_stdev"][600 + w : 701] == 0.0).all()
    for r in (199, 200, 209, 210, 284, 285, 500, 575, 576, 675):  # the switches, both sides
        lo = max(0, r - 75)
        alone = compute(times[lo : r + 1], prices[lo : r + 1])
        for col in got:
            assert np.array_equal(alone[col][-1:], got[col][r : r + 1], equal_nan=True), (r, col)


def test_constant_windows_have_stdev_exactly_zero_on_both_paths():
    n = 300
    times = minutes_from("2024-07-01", np.arange(n))
    for prices in (np.full(n, 1.23457), np.full(n, 1.23457 + 1e-9), np.full(n, 161.123)):
        got = compute(times, prices)
        for w in DEFAULT_WINDOWS:
            sd = got[f"w{w}_bqx_stdev"][w:]
            assert (sd == 0.0).all() and not np.signbit(sd).any()
            assert (got[f"w{w}_bqx_return"][w:] == 0.0).all()
        assert (got["agg_bqx_range"][75:] == 0.0).all()


def test_out_array_is_written_and_checked():
    n = 500
    times, prices = minutes_from("2024-07-01", np.arange(n)), walk(n, 1.08, seed=25)
    out = np.full((37, n), 7.0)
    got = metrics.compute_matrix(times, prices, out=out)
    assert got is out
    assert np.array_equal(out, metrics.compute_matrix(times, prices), equal_nan=True)
    with pytest.raises(ValueError, match="C-contiguous float64 array of shape"):
        metrics.compute_matrix(times, prices, out=np.empty((37, n + 1)))


@pytest.mark.parametrize("n", [1, 700, 2047, 2048, 2049, 5000])
def test_streamed_output_equals_plain_output(monkeypatch, n):
    """An output above ``STREAM_BYTES`` is computed in L2 and streamed to memory past the cache;
    bit for bit the same values as plain stores and as month-sized pieces give, into an ``out``
    at every alignment, just above and just at the threshold, with off-grid rows in between."""
    times = minutes_from("2024-07-01", np.arange(n))
    prices = walk(n, 1.07, seed=26)
    if n > 1200:
        prices = off_grid(prices, 1000, 1010)  # the scan's rows, written over the streamed ones
    plain = metrics.compute_matrix(times, prices)  # far below the threshold: plain stores
    lb = lookback_bars(DEFAULT_WINDOWS)
    for lo in range(0, n, 600):  # month-sized pieces, each with its lookback
        a = max(0, lo - lb)
        piece = metrics.compute_matrix(times[a : lo + 600], prices[a : lo + 600])
        assert np.array_equal(piece[:, lo - a :], plain[:, lo : lo + 600], equal_nan=True)
    streamed = []
    kernel = kernels._grid_kernel
    monkeypatch.setattr(
        kernels, "_grid_kernel", lambda *args: (streamed.append(args[-1]), kernel(*args))
    )
    nbytes = 37 * 8 * n
    for threshold, stream in ((nbytes - 1, True), (nbytes, False)):
        monkeypatch.setattr(metrics, "STREAM_BYTES", threshold)
        for shift in range(8):  # each of out's 8-byte offsets within a cache line
            buf = np.full(37 * n + 8, 7.0)
            out = buf[shift : shift + 37 * n].reshape(37, n)
            metrics.compute_matrix(times, prices, out=out)
            assert streamed.pop() is stream
            assert np.array_equal(out, plain, equal_nan=True), (threshold, shift)
            assert (buf[:shift] == 7.0).all() and (buf[shift + 37 * n :] == 7.0).all()


# -- properties ----------------------------------------------------------------------------


@st.composite
def series(draw):
    n = draw(st.integers(min_value=0, max_value=400))
    seed = draw(st.integers(min_value=0, max_value=2**32 - 1))
    rng = np.random.default_rng(seed)
    gaps = rng.choice([1, 1, 1, 1, 2, 3, 7, 600], size=n)
    times = minutes_from("2024-07-01", np.cumsum(gaps))
    level, decimals, _ = draw(st.sampled_from(sorted(GRIDS.values())))
    prices = np.round(level * np.exp(np.cumsum(rng.normal(0, 3e-4, n))), decimals)
    if n and draw(st.booleans()):  # a stretch on a finer grid: the rows change grids
        at = draw(st.integers(min_value=0, max_value=n - 1))
        prices[at : at + draw(st.integers(1, 100))] += 10.0 ** -(decimals + 1)
    flat = draw(st.integers(min_value=0, max_value=n))
    if flat < n:
        prices[flat : flat + 90] = prices[flat]
    off = draw(st.integers(min_value=0, max_value=n))
    if off < n and draw(st.booleans()):  # a stretch off the decimal grid: the scan's rows
        prices[off : off + draw(st.integers(1, 120))] *= 1 + 3e-12
    return times, prices


@settings(max_examples=60, deadline=None)
@given(
    data=series(), cut=st.floats(min_value=0, max_value=1), mode=st.sampled_from(["bars", "clock"])
)
def test_tail_with_lookback_equals_whole_series(data, cut, mode):
    """Bit for bit: a row's values depend only on its own window."""
    times, prices = data
    whole = compute(times, prices, mode=mode, max_fill=5)
    split = int(cut * len(times))
    if mode == "bars":
        lo = max(0, split - lookback_bars(DEFAULT_WINDOWS))
    elif split < len(times):
        first = times[split] - np.timedelta64(lookback_minutes(DEFAULT_WINDOWS, 5), "m")
        lo = int(np.searchsorted(times, first))
    else:
        lo = split
    tail = compute(times[lo:], prices[lo:], mode=mode, max_fill=5)
    for col in whole:
        assert np.array_equal(tail[col][split - lo :], whole[col][split:], equal_nan=True), col


@settings(max_examples=40, deadline=None)
@given(data=series())
def test_nulls_exactly_where_history_is_short_in_bars_mode(data):
    times, prices = data
    got = compute(times, prices)
    for w in DEFAULT_WINDOWS:
        for s in STATS:
            nulls = np.isnan(got[f"w{w}_bqx_{s}"])
            assert np.array_equal(nulls, np.arange(len(times)) < w)


@settings(max_examples=30, deadline=None)
@given(data=series(), mode=st.sampled_from(["bars", "clock"]))
def test_deterministic(data, mode):
    times, prices = data
    a = compute(times, prices, mode=mode)
    b = compute(times.copy(), prices.copy(), mode=mode)
    for col in a:
        assert np.array_equal(a[col], b[col], equal_nan=True)
        assert a[col].dtype == np.float64


# -- clock mode, by hand ------------------------------------------------------------------------


def clock_case(offsets, prices, max_fill=5, windows=(3,)):
    return compute(
        minutes_from("2024-07-01", offsets), np.array(prices, dtype=float),
        windows=windows, mode="clock", max_fill=max_fill,
    )  # fmt: skip


def test_clock_gap_of_exactly_max_fill_is_filled():
    # bars at minutes 0,1,2 then 8: minutes 3..7 take the price of minute 2 (ages 1..5)
    got = clock_case([0, 1, 2, 8], [1.0, 2.0, 3.0, 4.0], max_fill=5)
    # t = 8: window minutes 5,6,7, all filled with 3.0 (age 3,4,5)
    assert got["w3_bqx_avg"][3] == 3.0
    assert got["w3_bqx_stdev"][3] == 0.0
    assert got["w3_bqx_return"][3] == pytest.approx(3 * (3.0 - 4.0) / 4.0)
    assert got["w3_bqx_endpoint"][3] == pytest.approx((3.0 - 4.0) / 4.0)
    # t = 2: window minutes -1, 0, 1 starts before the first bar: NULL
    assert np.isnan(got["w3_bqx_avg"][2])


def test_clock_gap_one_minute_longer_than_max_fill_is_null():
    # minute 8 would need the price of minute 2 at age 6 > 5
    got = clock_case([0, 1, 2, 9], [1.0, 2.0, 3.0, 4.0], max_fill=5)
    assert np.isnan(got["w3_bqx_avg"][3]) and np.isnan(got["agg_bqx_range"][3])
    # the same series in bars mode has a window: the modes differ exactly here
    bars = compute(minutes_from("2024-07-01", [0, 1, 2, 9]), np.array([1.0, 2.0, 3.0, 4.0]),
                   windows=(3,))  # fmt: skip
    assert bars["w3_bqx_avg"][3] == 2.0


def test_clock_max_fill_zero_needs_every_minute():
    got = clock_case([0, 1, 2, 3, 5, 6, 7, 8], [1.0, 1.1, 1.2, 1.3, 1.5, 1.6, 1.7, 1.8], 0)
    avg = got["w3_bqx_avg"]
    assert avg[3] == pytest.approx((1.0 + 1.1 + 1.2) / 3)
    assert np.isnan(avg[4:7]).all()  # windows containing minute 4
    assert avg[7] == pytest.approx((1.5 + 1.6 + 1.7) / 3)


def test_clock_weekend_gives_null_until_a_full_window_after_the_reopen():
    # Friday 21:50..21:59, then Sunday 22:00..22:20
    fri = np.datetime64("2024-07-05T21:50", "m") + np.arange(10).astype("timedelta64[m]")
    sun = np.datetime64("2024-07-07T22:00", "m") + np.arange(21).astype("timedelta64[m]")
    times = np.concatenate([fri, sun])
    prices = np.linspace(1.08, 1.09, len(times))
    got = compute(times, prices, windows=(5,), mode="clock", max_fill=5)
    sunday = got["w5_bqx_avg"][10:]
    assert np.isnan(sunday[:5]).all()  # windows reaching back into the closed market
    assert not np.isnan(sunday[5:]).any()
    assert sunday[5] == pytest.approx(prices[10:15].mean())
    bars = compute(times, prices, windows=(5,))  # bars mode reaches back into Friday
    assert bars["w5_bqx_avg"][10] == pytest.approx(prices[5:10].mean())


# -- input validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "times,prices,message",
    [
        (minutes_from("2024-07-01", [0, 2, 1]), [1.0, 1.0, 1.0], r"times\[2\].*earlier than times\[1\]"),
        (minutes_from("2024-07-01", [0, 1, 1]), [1.0, 1.0, 1.0], r"times\[2\].*duplicate of times\[1\]"),
        (minutes_from("2024-07-01", [0, 1, 2]), [1.0, np.nan, 1.0], r"prices\[1\] is nan"),
        (minutes_from("2024-07-01", [0, 1, 2]), [1.0, 1.0, np.inf], r"prices\[2\] is inf"),
        (minutes_from("2024-07-01", [0, 1, 2]), [1.0, 0.0, 1.0], r"prices\[1\] is 0.0"),
        (minutes_from("2024-07-01", [0, 1, 2]), [-1.0, 1.0, 1.0], r"prices\[0\] is -1.0"),
        (minutes_from("2024-07-01", [0, 1]), [1.0, 1.0, 1.0], r"times has 2 elements but prices has 3"),
        (np.arange(3), [1.0, 1.0, 1.0], r"times must be numpy datetime64"),
        (np.array(["2024-07-01", "NaT"], dtype="datetime64[m]"), [1.0, 1.0], r"times\[1\] is NaT"),
    ],
)  # fmt: skip
def test_bad_input_names_the_index(times, prices, message):
    with pytest.raises(ValueError, match=message):
        compute(times, np.array(prices))


def test_bad_input_found_in_any_chunk_of_a_long_series():
    """The checks run chunk by chunk: the first bad element is named wherever it lies."""
    n = 3 * metrics._CHECK_CHUNK + 5
    times, prices = minutes_from("2024-07-01", np.arange(n)), np.ones(n)
    for i in (metrics._CHECK_CHUNK - 1, metrics._CHECK_CHUNK, n - 1):
        bad = times.copy()
        bad[i] = bad[i - 1]
        with pytest.raises(metrics.BadBar, match=rf"times\[{i}\].*duplicate") as err:
            compute(bad, prices)
        assert err.value.index == i
        bad = prices.copy()
        bad[i:] = np.nan
        with pytest.raises(metrics.BadBar, match=rf"prices\[{i}\] is nan"):
            compute(times, bad)
    bad = times.copy()
    bad[2 * metrics._CHECK_CHUNK] = np.datetime64("NaT")
    with pytest.raises(metrics.BadBar, match=rf"times\[{2 * metrics._CHECK_CHUNK}\] is NaT"):
        compute(bad, prices)


def test_clock_mode_refuses_two_bars_in_one_minute():
    times = np.array(["2024-07-01T00:00:00", "2024-07-01T00:00:30"], dtype="datetime64[s]")
    with pytest.raises(ValueError, match=r"times\[1\] falls in the same minute"):
        compute(times, np.array([1.0, 1.0]), mode="clock")


def test_bad_options():
    t, p = minutes_from("2024-07-01", [0, 1]), np.array([1.0, 1.0])
    with pytest.raises(ValueError, match="mode"):
        compute(t, p, mode="ticks")
    with pytest.raises(ValueError, match="max_fill"):
        compute(t, p, mode="clock", max_fill=-1)
    with pytest.raises(ValueError, match="too small"):
        compute(t, p, windows=(1, 5))
