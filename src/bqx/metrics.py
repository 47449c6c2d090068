"""The BQX formulas (docs/metrics.md): arrays in, metric columns out. Pure computation, no I/O.

For the bar at t with price p_t and the W bars before it, P = (p_{t-W}, …, p_{t-1}):

- ``w{W}_bqx_return``   Σ (p_{t-i} − p_t) / p_t
- ``w{W}_bqx_max/min/avg``  max / min / mean of P
- ``w{W}_bqx_stdev``    sample standard deviation of P (n − 1)
- ``w{W}_bqx_endpoint`` (p_{t-W} − p_t) / p_t
- ``agg_bqx_*``         the same over the largest window, plus range (max − min)/p_t and
  volatility stdev/p_t.

Two exact paths, chosen per row from that row's own window (docs/performance.md):

- Prices on the 10^-5 grid (every 5- and 3-decimal forex price: p = q / 10^5 exactly, checked
  by the float64 round trip) use int64 prefix sums of q and q², so every window sum is an exact
  integer difference: O(1) per window and bar, and the variance numerator W·Σq² − (Σq)² is
  exact (0 on a constant window, never negative).
- Other rows take a backward scan of W_max bars that yields every nested window at once. Sums
  are taken of differences from p_{t-1}, which are exact for nearby prices (Sterbenz) and
  small, so the variance needs no subtraction of large numbers: no digits are lost at 1.07 or
  at 160, and a constant window gives exactly 0.

Max and min come from a sparse table of the prices themselves (exact). Each row's arithmetic
depends only on its own window, in a fixed order, so results are bit-identical however a
series is split into jobs.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

DEFAULT_WINDOWS: tuple[int, ...] = (15, 30, 45, 60, 75)
MODES: tuple[str, ...] = ("bars", "clock")

WINDOW_STATS: tuple[str, ...] = ("return", "max", "min", "avg", "stdev", "endpoint")
AGG_STATS: tuple[str, ...] = ("return", "max", "min", "avg", "stdev", "range", "volatility")


def normalize_windows(windows: Sequence[int]) -> tuple[int, ...]:
    """Sorted unique positive window sizes; ValueError for anything else."""
    try:
        wins = sorted({int(w) for w in windows})
    except (TypeError, ValueError):
        raise ValueError(f"windows must be integers, got {windows!r}") from None
    if not wins:
        raise ValueError("at least one window is needed")
    if wins[0] < 2:
        raise ValueError(f"window {wins[0]} is too small: a sample stdev needs at least 2 bars")
    return tuple(wins)


def metric_columns(windows: Sequence[int] = DEFAULT_WINDOWS) -> list[str]:
    """Metric column names in table order: 6 per window, then 7 aggregates (37 by default)."""
    cols = [f"w{w}_bqx_{s}" for w in normalize_windows(windows) for s in WINDOW_STATS]
    return cols + [f"agg_bqx_{s}" for s in AGG_STATS]


def lookback_bars(windows: Sequence[int]) -> int:
    """Bars of history needed before the first bar wanted (``bars`` mode)."""
    return max(normalize_windows(windows))


def lookback_minutes(windows: Sequence[int], max_fill: int) -> int:
    """Minutes of history needed before the first bar wanted (``clock`` mode).

    The oldest window minute is W_max before t, and its price may come from a bar up to
    ``max_fill`` minutes older still.
    """
    return max(normalize_windows(windows)) + int(max_fill)


# Above this many output bytes (the L3's size) the grid kernel computes into a scratch matrix
# that stays in L2 and copies it to ``out`` with non-temporal (streaming) stores: a whole
# series' output (3 GB for 10 M bars) cannot stay in cache, and plain stores would first read
# every line they write (read-for-ownership), doubling the DRAM traffic. Below it (a month:
# 9 MB) the output stays in cache for the caller and plain stores are faster.
# docs/performance.md has the measurements.
STREAM_BYTES = 32 << 20


# -- API ----------------------------------------------------------------------------------


def _to_minutes(times: np.ndarray) -> np.ndarray:
    """Whole minutes since the epoch (floored) as int64, for any datetime64 unit."""
    unit, count = np.datetime_data(times.dtype)
    per_minute = {"m": 1, "s": 60, "ms": 60_000, "us": 60_000_000, "ns": 60_000_000_000}
    if unit in per_minute:
        factor = per_minute[unit]
        ticks = times.view(np.int64) * count if count != 1 else times.view(np.int64)
        return ticks // factor if factor != 1 else ticks.copy()
    return times.astype("datetime64[m]").view(np.int64)


class BadBar(ValueError):
    """An element the formulas refuse; ``index`` says which, so a caller can name its time."""

    def __init__(self, index: int, problem: str, message: str) -> None:
        super().__init__(message)
        self.index, self.problem = index, problem


_CHECK_CHUNK = 1 << 16  # elements checked at a time: a big call's temporaries stay in cache


def _first_bad(check: Callable[[int, int], np.ndarray], n: int) -> int:
    """The first index where ``check(lo, hi)`` (a mask of elements lo … hi − 1) is True, or −1.

    Chunked so that one whole-series call builds no series-sized temporaries (fresh memory,
    first-touched every call: docs/performance.md)."""
    for lo in range(0, n, _CHECK_CHUNK):
        bad = check(lo, min(lo + _CHECK_CHUNK, n))
        if bad.any():
            return lo + int(np.flatnonzero(bad)[0])
    return -1


def _validate(times: np.ndarray, prices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    times = np.asarray(times)
    prices = np.asarray(prices)
    if times.ndim != 1 or prices.ndim != 1:
        raise ValueError("times and prices must be one-dimensional arrays")
    if len(times) != len(prices):
        raise ValueError(f"times has {len(times)} elements but prices has {len(prices)}")
    if not np.issubdtype(times.dtype, np.datetime64):
        raise ValueError(f"times must be numpy datetime64, got dtype {times.dtype}")
    ticks = times.view(np.int64)  # unit-agnostic: order and NaT checks need no conversion
    nat = np.iinfo(np.int64).min
    i = _first_bad(lambda a, b: ticks[a:b] == nat, len(ticks))
    if i >= 0:
        raise BadBar(i, "has no time (NaT)", f"times[{i}] is NaT")
    try:
        prices = prices.astype(np.float64, copy=False)
    except (TypeError, ValueError):
        raise ValueError(f"prices must be numeric, got dtype {prices.dtype}") from None
    i = _first_bad(lambda a, b: ~(np.isfinite(prices[a:b]) & (prices[a:b] > 0)), len(prices))
    if i >= 0:
        problem = f"has price {float(prices[i])!r} (prices must be finite and > 0)"
        raise BadBar(
            i, problem, f"prices[{i}] is {float(prices[i])!r}: prices must be finite and > 0"
        )
    i = _first_bad(lambda a, b: ticks[a + 1 : b + 1] <= ticks[a:b], len(ticks) - 1) + 1
    if i > 0:
        why = "a duplicate of" if ticks[i] == ticks[i - 1] else "earlier than"
        raise BadBar(
            i,
            "repeats or precedes the bar before it (times must be sorted and unique)",
            f"times[{i}] ({times[i]}) is {why} times[{i - 1}]: times must be sorted and unique",
        )
    return ticks, np.ascontiguousarray(prices)


def _bars(prices: np.ndarray, wins: np.ndarray, out: np.ndarray) -> None:
    """Bars mode: the grid kernel for rows whose window and price are on a decimal grid, each
    run of rows on one grid in one call, and the scan for the others. The choice is per row,
    from its own window (``kernels._row_scales``), so a row's values never depend on how the
    series is split."""
    from bqx.core import kernels as k

    n = len(prices)
    wmax = int(wins[-1])
    qmax = k._grid_qmax(wmax)
    stream = out.nbytes > STREAM_BYTES and out.flags.aligned
    if k._grid_off(prices, qmax, k._GRID) == 0:  # forex: every row on 10^-5, one call
        k._grid_kernel(prices, wins, out, qmax, k._GRID, 0, n, stream)
        return
    # an instrument on one grid: its first rows' grid, checked for the whole series at once
    head = k._row_scales(prices[: 2 * wmax + 2], qmax, wmax)
    if k._one_grid(prices, qmax, wmax, int(head[-1])):
        k._grid_kernel(prices, wins, out, qmax, float(10 ** int(head[-1])), 0, n, stream)
        return
    scales = k._row_scales(prices, qmax, wmax)
    for lo, hi, d in grid_runs(scales):
        if d == k.NO_GRID:
            continue
        k._grid_kernel(prices, wins, out, qmax, float(10**d), lo, hi, stream)
    rows = np.flatnonzero(scales == k.NO_GRID)
    if len(rows) == n:
        k._scan(prices, np.arange(n, dtype=np.int64), prices, wins, out, True)
    elif len(rows):
        part = np.empty((out.shape[0], len(rows)), dtype=np.float64)
        k._scan(prices, rows, prices[rows], wins, part, False)
        out[:, rows] = part


def grid_runs(scales: np.ndarray) -> list[tuple[int, int, int]]:
    """(first row, end row, decimals) of each run of rows on one grid (decimals -1: none)."""
    if not len(scales):
        return []
    cuts = np.flatnonzero(np.diff(scales)) + 1
    starts = np.concatenate(([0], cuts))
    ends = np.concatenate((cuts, [len(scales)]))
    return [(int(a), int(b), int(scales[a])) for a, b in zip(starts, ends, strict=True)]


def row_grids(prices: np.ndarray, windows: Sequence[int] = DEFAULT_WINDOWS) -> np.ndarray:
    """The decimals of the grid each row's bars-mode metrics are computed on (-1: the scan,
    no grid fits its window): what ``compute`` does, for tests and for the curious."""
    from bqx.core import kernels as k

    wins = normalize_windows(windows)
    p = np.ascontiguousarray(prices, dtype=np.float64)
    return k._row_scales(p, k._grid_qmax(wins[-1]), wins[-1]).astype(np.int64)


def compute_matrix(
    times: np.ndarray,
    prices: np.ndarray,
    *,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    mode: str = "bars",
    max_fill: int = 5,
    out: np.ndarray | None = None,
) -> np.ndarray:
    """Like :func:`compute`, as one (columns × bars) float64 array in ``metric_columns`` order.

    ``out``: a C-contiguous float64 array of that shape to write into (and return). Fresh
    memory costs its first touch (the OS zeroing it), which for a whole series' output (10 M
    bars: 3 GB) costs about as much as computing it (docs/performance.md); a caller computing
    many series in turn can reuse one array. An output larger than ``STREAM_BYTES`` is written
    with streaming stores, past the cache.
    """
    wins = np.array(normalize_windows(windows), dtype=np.int64)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if int(max_fill) < 0:
        raise ValueError(f"max_fill must be >= 0, got {max_fill}")
    ticks, prices = _validate(times, prices)
    n = len(prices)
    shape = (6 * len(wins) + len(AGG_STATS), n)
    if out is None:
        out = np.empty(shape, dtype=np.float64)
    elif out.shape != shape or out.dtype != np.float64 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a C-contiguous float64 array of shape {shape}")
    if n == 0:
        return out
    if mode == "bars":
        _bars(prices, wins, out)
    else:
        minutes = _to_minutes(np.asarray(times))
        if (np.diff(minutes) <= 0).any():
            i = int(np.flatnonzero(np.diff(minutes) <= 0)[0]) + 1
            raise ValueError(
                f"times[{i}] falls in the same minute as times[{i - 1}]: clock mode needs at "
                "most one bar per minute"
            )
        from bqx.core import kernels

        grid = kernels._minute_grid(minutes, prices, int(max_fill))
        kernels._scan(grid, minutes - minutes[0], prices, wins, out, False)
    return out


def compute(
    times: np.ndarray | object,
    prices: np.ndarray | object = None,
    *,
    windows: Sequence[int] = DEFAULT_WINDOWS,
    mode: str = "bars",
    max_fill: int = 5,
) -> Mapping[str, np.ndarray]:
    """Every window and aggregate column of the target table for each bar; NaN = NULL.

    ``times``: sorted unique ``numpy.datetime64`` (any unit); ``prices``: float64, finite, > 0.
    ``mode="bars"``: a window is the W bars before t, however much clock time they span; the
    first W bars have no such window. ``mode="clock"``: a window is the W calendar minutes
    t−W … t−1, each priced by the last bar at or before it if that bar is at most ``max_fill``
    minutes old, else the whole window is NaN (a weekend gives NaN, not a mix of sessions).

    Computing a tail with ``lookback_bars(windows)`` bars (bars mode) or
    ``lookback_minutes(windows, max_fill)`` minutes (clock mode) of history before it gives
    the same values, bit for bit, as computing the whole series.

    pandas / polars series and Arrow arrays are accepted too (aware times converted to UTC),
    and a data frame with a time column (or a DatetimeIndex) and a price column, named by
    ``prices`` or found by name (close, rate, price), gives that kind of frame back.
    """
    if not (isinstance(times, np.ndarray) and isinstance(prices, np.ndarray)):
        from bqx.core import frames  # series and frames: converted there, pandas/polars optional

        return frames.compute_any(
            compute, times, prices, windows=windows, mode=mode, max_fill=max_fill
        )
    matrix = compute_matrix(times, prices, windows=windows, mode=mode, max_fill=max_fill)
    return dict(zip(metric_columns(windows), matrix, strict=True))
