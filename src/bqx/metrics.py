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

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

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


# -- kernel -------------------------------------------------------------------------------


@numba.njit(cache=True, nogil=True, inline="always")
def _sums_contiguous(values, e0, m, k0, k1, s, s1, s2):  # pragma: no cover
    for k in range(k0, k1 + 1):
        for j in range(m):
            d = values[e0 + j - k] - s[j]
            s1[j] += d
            s2[j] += d * d


@numba.njit(cache=True, nogil=True, inline="always")
def _sums_gather(values, at, r0, m, k0, k1, s, s1, s2):  # pragma: no cover
    for k in range(k0, k1 + 1):
        for j in range(m):
            d = values[at[r0 + j] - k] - s[j]
            s1[j] += d
            s2[j] += d * d


@numba.njit(cache=True, nogil=True, inline="always")
def _sums_safe(values, at, r0, m, k0, k1, s, s1, s2):  # pragma: no cover
    for k in range(k0, k1 + 1):
        for j in range(m):
            e = at[r0 + j]
            d = (values[e - k] if e >= k else np.nan) - s[j]
            s1[j] += d
            s2[j] += d * d


_BLOCK = 128  # rows scanned together: the inner loops run across rows, so they vectorise


@numba.njit(cache=True, nogil=True)
def _scan(values, at, p_now, wins, out, contiguous):  # pragma: no cover - compiled
    """For each row r: the windows of ``values`` ending just before index ``at[r]``.

    ``values`` may hold NaN (a minute with no usable price): a window containing one is NaN,
    and so is every larger window. ``out`` has 6 rows per window then 7 aggregate rows.

    Sums: rows are taken ``_BLOCK`` at a time and the backward scan runs k = 1..W with the
    rows as the inner loop; each row still sums its own window in the same order, so a row's
    values never depend on which other rows are computed with it (bit-identical splits).
    Max/min, which round nothing, come from a sparse table (O(log W) per block element).
    """
    n = at.shape[0]
    nw = wins.shape[0]
    wmax = wins[nw - 1]
    levels = 1
    while (1 << levels) <= wmax:
        levels += 1
    nan = np.nan
    s = np.empty(_BLOCK)
    s1 = np.empty(_BLOCK)
    s2 = np.empty(_BLOCK)
    cap = _BLOCK + wmax
    tmax = np.empty((levels, cap))
    tmin = np.empty((levels, cap))
    for r0 in range(0, n, _BLOCK):
        m = min(_BLOCK, n - r0)
        e0 = at[r0]
        for j in range(m):
            e = at[r0 + j]
            s[j] = values[e - 1] if e >= 1 else nan  # shift: p_{t-1}, differences are exact
            s1[j] = 0.0
            s2[j] = 0.0
        # sparse table over the values the block's windows cover: [seg, at[last])
        seg = max(0, e0 - wmax)
        span = at[r0 + m - 1] - seg
        if span > cap:  # a gap in clock mode can widen a block's span
            cap = span
            tmax = np.empty((levels, cap))
            tmin = np.empty((levels, cap))
        for i in range(span):
            tmax[0, i] = values[seg + i]
            tmin[0, i] = values[seg + i]
        for lv in range(1, levels):
            h = 1 << (lv - 1)
            for i in range(span - (1 << lv) + 1):
                a = tmax[lv - 1, i]
                b = tmax[lv - 1, i + h]
                tmax[lv, i] = a if a > b else b
                a = tmin[lv - 1, i]
                b = tmin[lv - 1, i + h]
                tmin[lv, i] = a if a < b else b
        k0 = 1
        for wi in range(nw):
            w_int = wins[wi]
            # accumulate bars k0..W back; the branch is outside the loops so they vectorise
            if e0 < wmax:  # the first rows of the series: a missing bar k back gives NaN
                _sums_safe(values, at, r0, m, k0, w_int, s, s1, s2)
            elif contiguous:
                _sums_contiguous(values, e0, m, k0, w_int, s, s1, s2)
            else:
                _sums_gather(values, at, r0, m, k0, w_int, s, s1, s2)
            k0 = w_int + 1
            lv = 0
            while (2 << lv) <= w_int:
                lv += 1
            width = 1 << lv
            base = 6 * wi
            w = float(w_int)
            inv_w = 1.0 / w
            inv_w1 = 1.0 / (w - 1.0)
            # branch-free so that it vectorises; a NaN in the window makes s1 NaN
            for j in range(m):
                r = r0 + j
                e = at[r]
                p = p_now[r]
                inv_p = 1.0 / p
                ok = s1[j] == s1[j]
                a = max(e - w_int - seg, 0)
                b = max(e - width - seg, 0)
                x1 = tmax[lv, a]
                x2 = tmax[lv, b]
                hi = x1 if x1 > x2 else x2
                x1 = tmin[lv, a]
                x2 = tmin[lv, b]
                lo = x1 if x1 < x2 else x2
                mean_d = s1[j] * inv_w
                var = (s2[j] - s1[j] * mean_d) * inv_w1
                sd = np.sqrt(var if var > 0.0 else 0.0)
                # Σ(p_{t-i} − p_t) = Σd + W (s − p_t); s − p_t is exact too
                out[base, r] = (s1[j] + w * (s[j] - p)) * inv_p
                out[base + 1, r] = hi if ok else nan
                out[base + 2, r] = lo if ok else nan
                out[base + 3, r] = s[j] + mean_d
                out[base + 4, r] = (0.0 if hi == lo else sd) if ok else nan  # constant: 0
                out[base + 5, r] = (values[max(e - w_int, 0)] - p) * inv_p if ok else nan
        last = 6 * (nw - 1)
        agg = 6 * nw
        for j in range(m):
            r = r0 + j
            inv_p = 1.0 / p_now[r]
            out[agg, r] = out[last, r]
            out[agg + 1, r] = out[last + 1, r]
            out[agg + 2, r] = out[last + 2, r]
            out[agg + 3, r] = out[last + 3, r]
            out[agg + 4, r] = out[last + 4, r]
            out[agg + 5, r] = (out[last + 1, r] - out[last + 2, r]) * inv_p
            out[agg + 6, r] = out[last + 4, r] * inv_p


# -- streaming stores: output too large for the cache goes straight to memory ---------------

# Above this many output bytes (the L3's size) the grid kernel computes into a scratch matrix
# that stays in L2 and copies it to ``out`` with non-temporal (streaming) stores: a whole
# series' output (3 GB for 10 M bars) cannot stay in cache, and plain stores would first read
# every line they write (read-for-ownership), doubling the DRAM traffic. Below it (a month:
# 9 MB) the output stays in cache for the caller and plain stores are faster.
# docs/performance.md has the measurements.
STREAM_BYTES = 32 << 20
_NT_LANES = 8  # float64 per streaming store: one 64-byte cache line (two stores without AVX-512)
_NT_BYTES = 8 * _NT_LANES


@intrinsic
def _stream_line(typingctx, dst, i, src, j):  # pragma: no cover - compiled
    """``dst[i : i + 8] = src[j : j + 8]`` as one non-temporal store of a whole cache line
    (``dst[i]`` must be 64-byte aligned): LLVM's ``!nontemporal`` store, ``vmovntpd`` on x86."""
    sig = types.void(dst, i, src, j)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        vec = ir.VectorType(ir.DoubleType(), _NT_LANES)
        d = context.make_array(signature.args[0])(context, builder, value=args[0])
        s = context.make_array(signature.args[2])(context, builder, value=args[2])
        v = builder.load(builder.bitcast(builder.gep(s.data, [args[3]]), vec.as_pointer()), align=8)
        ptr = builder.bitcast(builder.gep(d.data, [args[1]]), vec.as_pointer())
        store = builder.store(v, ptr, align=8 * _NT_LANES)
        store.set_metadata("nontemporal", builder.module.add_metadata([ir.IntType(32)(1)]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def _store_fence(typingctx):  # pragma: no cover - compiled
    """A full fence: streaming stores are weakly ordered, this makes them visible in order."""

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return types.void(), codegen


@numba.njit(cache=True, nogil=True, inline="always")
def _stream_copy(dst, src):  # pragma: no cover - compiled
    """``dst[:] = src`` (1-D, contiguous), with streaming stores of the whole cache lines of
    ``dst`` and plain ones for the partial lines at its ends."""
    n = src.shape[0]
    head = min(((_NT_BYTES - dst.ctypes.data % _NT_BYTES) % _NT_BYTES) // 8, n)
    for i in range(head):
        dst[i] = src[i]
    i = head
    while i + _NT_LANES <= n:
        _stream_line(dst, i, src, i)
        i += _NT_LANES
    for k in range(i, n):
        dst[k] = src[k]


# -- the grid path: prices on a decimal grid, exact integer window sums ---------------------

GRID_DECIMALS = 5  # 10^-5: every 5-decimal price is on it, and so is every 3-decimal (JPY) one
_GRID = 10.0**GRID_DECIMALS
_GRID_BLOCK = 512  # rows per block: local prefix sums and sparse tables stay in L1/L2
# streaming: blocks collected per copy to ``out``; 16 KB runs per row stream far better than
# 4 KB ones, and the 37 × 2048 scratch (600 KB) still stays in L2
_STREAM_COLS = 4 * _GRID_BLOCK


def _grid_qmax(wmax: int) -> int:
    """Largest grid integer the int64 arithmetic of :func:`_grid_kernel` takes without overflow.

    Window sums of squares W·Σq² ≤ (W·q)² and block prefix sums (block + W)·q² must stay below
    2^63; beyond this (prices above ~400 at 5 decimals with the default windows) the scan runs.
    """
    limit = 2**62
    by_window = int(np.sqrt(limit)) // wmax
    by_block = int(np.sqrt(limit // (_GRID_BLOCK + wmax)))
    return min(by_window, by_block)


@numba.njit(cache=True, nogil=True, inline="always")
def _on_grid(x, qmax):  # pragma: no cover - compiled
    """x·10^5 as an integer if x is exactly the float64 nearest to that decimal (round-trip
    exact) and 0 < x·10^5 ≤ qmax; else 0 (off the grid)."""
    r = np.rint(x * _GRID)
    ok = (r / _GRID == x) and (r > 0.0) and (r <= qmax)
    return np.int64(r) if ok else np.int64(0)


@numba.njit(cache=True, nogil=True)
def _grid_off(values, qmax):  # pragma: no cover - compiled
    """How many values are off the grid."""
    off = 0
    for i in range(values.shape[0]):
        off += 1 if _on_grid(values[i], qmax) == 0 else 0
    return off


@numba.njit(cache=True, nogil=True)
def _grid_misses(values, qmax, wmax):  # pragma: no cover - compiled
    """Rows whose own price or any of the ``wmax`` bars before it is off the grid."""
    n = values.shape[0]
    rows = np.empty(n, dtype=np.int64)
    count = 0
    last_off = -(wmax + 2)
    for r in range(n):
        if _on_grid(values[r], qmax) == 0:
            last_off = r
        if r - last_off <= wmax:
            rows[count] = r
            count += 1
    return rows[:count]


@numba.njit(cache=True, nogil=True, inline="always")
def _grid_rows(c1b, c1a, c2b, c2a, hi_a, hi_b, lo_a, lo_b, qt, qw, inv_q, w_int, o_ret, o_max,
               o_min, o_avg, o_sd, o_end):  # pragma: no cover - compiled  # fmt: skip
    """One window for a run of rows; every array is a 1-D slice indexed from 0, so the loop
    vectorises."""
    w = float(w_int)
    c_avg = 1.0 / (w * _GRID)
    c_var = 1.0 / (w * (w - 1.0))
    for i in range(o_ret.shape[0]):
        s1 = c1b[i] - c1a[i]
        s2 = c2b[i] - c2a[i]
        num = w_int * s2 - s1 * s1  # exact: the sample variance numerator, ≥ 0
        x1 = hi_a[i]
        x2 = hi_b[i]
        x3 = lo_a[i]
        x4 = lo_b[i]
        o_ret[i] = float(s1 - w_int * qt[i]) * inv_q[i]
        o_max[i] = x1 if x1 > x2 else x2
        o_min[i] = x3 if x3 < x4 else x4
        o_avg[i] = float(s1) * c_avg
        o_sd[i] = np.sqrt(float(num) * c_var) * (1.0 / _GRID)
        o_end[i] = float(qw[i] - qt[i]) * inv_q[i]


@numba.njit(cache=True, nogil=True, error_model="numpy")  # 1/0 on off-grid rows: inf, no raise
def _grid_kernel(values, wins, out, qmax, stream):  # pragma: no cover - compiled
    """Bars mode for prices on the grid: every window sum is an exact int64 difference of
    block-local prefix sums, so each row costs O(1) per window whatever W is, and its values
    depend only on its own window (bit-identical however the series is split).

    ``stream``: compute the blocks into a scratch matrix of ``_STREAM_COLS`` rows (it stays in
    L2) and copy each full one to ``out`` with streaming stores (see ``STREAM_BYTES``); the
    values are the same either way.

    With S1 = Σq and S2 = Σq² over the window (q = p·10^5): mean = S1 / (W·10^5), and the
    sample variance has the exact integer numerator W·S2 − S1² (≥ 0, and 0 exactly when the
    window is constant). Return and endpoint have exact integer numerators too. Max and min
    come from a sparse table over the float64 prices themselves (exact).
    """
    n = values.shape[0]
    nw = wins.shape[0]
    wmax = wins[nw - 1]
    levels = 1
    while (1 << levels) <= wmax:
        levels += 1
    nan = np.nan
    cap = _GRID_BLOCK + wmax
    q = np.empty(cap, dtype=np.int64)  # the block's prices on the grid (0: off it)
    c1 = np.empty(cap + 1, dtype=np.int64)
    c2 = np.empty(cap + 1, dtype=np.int64)
    tmax = np.empty((levels, cap))
    tmin = np.empty((levels, cap))
    inv_q = np.empty(_GRID_BLOCK)
    last = 6 * (nw - 1)
    agg = 6 * nw
    scratch = np.empty((out.shape[0], _STREAM_COLS if stream else 0))
    for r0 in range(0, n, _GRID_BLOCK):
        m = min(_GRID_BLOCK, n - r0)
        dst = scratch if stream else out  # the block's rows are dst[:, c0 : c0 + m]
        c0 = r0 % _STREAM_COLS if stream else r0
        seg = max(0, r0 - wmax)
        span = r0 + m - seg
        off = r0 - seg  # local index of row r0
        src = values[seg : seg + span]
        for i in range(span):
            q[i] = _on_grid(src[i], qmax)
        c1[0] = 0
        c2[0] = 0
        for i in range(span):
            x = q[i]
            c1[i + 1] = c1[i] + x
            c2[i + 1] = c2[i] + x * x
        t0 = tmax[0]
        u0 = tmin[0]
        for i in range(span):
            t0[i] = src[i]
            u0[i] = src[i]
        for lv in range(1, levels):
            h = 1 << (lv - 1)
            cnt = span - (1 << lv) + 1
            ta, tb, tl = tmax[lv - 1, :cnt], tmax[lv - 1, h : h + cnt], tmax[lv, :cnt]
            ua, ub, ul = tmin[lv - 1, :cnt], tmin[lv - 1, h : h + cnt], tmin[lv, :cnt]
            for i in range(cnt):
                a = ta[i]
                b = tb[i]
                tl[i] = a if a > b else b
                a = ua[i]
                b = ub[i]
                ul[i] = a if a < b else b
        qb = q[off : off + m]
        iq = inv_q[:m]
        for j in range(m):
            iq[j] = 1.0 / qb[j]
        for wi in range(nw):
            w_int = wins[wi]
            base = 6 * wi
            lv = 0
            while (2 << lv) <= w_int:
                lv += 1
            width = 1 << lv
            j0 = min(max(0, w_int - r0), m)  # the first W rows of the series have no window
            for c in range(6):
                dst[base + c, c0 : c0 + j0] = nan
            b0, b1 = off + j0, off + m  # local prefix ends of the rows' windows
            _grid_rows(
                c1[b0:b1], c1[b0 - w_int : b1 - w_int], c2[b0:b1], c2[b0 - w_int : b1 - w_int],
                tmax[lv, b0 - w_int : b1 - w_int], tmax[lv, b0 - width : b1 - width],
                tmin[lv, b0 - w_int : b1 - w_int], tmin[lv, b0 - width : b1 - width],
                qb[j0:], q[b0 - w_int : b1 - w_int], iq[j0:], w_int,
                dst[base, c0 + j0 : c0 + m], dst[base + 1, c0 + j0 : c0 + m],
                dst[base + 2, c0 + j0 : c0 + m], dst[base + 3, c0 + j0 : c0 + m],
                dst[base + 4, c0 + j0 : c0 + m], dst[base + 5, c0 + j0 : c0 + m],
            )  # fmt: skip
        vb = values[r0 : r0 + m]
        hi, lo, sd = (
            dst[last + 1, c0 : c0 + m],
            dst[last + 2, c0 : c0 + m],
            dst[last + 4, c0 : c0 + m],
        )
        o_rng, o_vol = dst[agg + 5, c0 : c0 + m], dst[agg + 6, c0 : c0 + m]
        for c in range(5):
            dst[agg + c, c0 : c0 + m] = dst[last + c, c0 : c0 + m]
        for j in range(m):
            inv_p = 1.0 / vb[j]
            o_rng[j] = (hi[j] - lo[j]) * inv_p
            o_vol[j] = sd[j] * inv_p
        if stream and (c0 + m == _STREAM_COLS or r0 + m == n):
            a = r0 + m - (c0 + m)
            for c in range(out.shape[0]):
                _stream_copy(out[c, a : r0 + m], scratch[c, : c0 + m])
    if stream:
        _store_fence()


@numba.njit(cache=True, nogil=True)
def _minute_grid(minutes, prices, max_fill):  # pragma: no cover - compiled
    """Calendar-minute prices from the first bar's minute on, forward-filled at most
    ``max_fill`` minutes; NaN where no bar is recent enough."""
    first = minutes[0]
    size = minutes[minutes.shape[0] - 1] - first + 1
    grid = np.empty(size, dtype=np.float64)
    j = 0
    last_price = np.nan
    last_minute = first
    for g in range(size):
        m = first + g
        if minutes[j] == m:
            last_price = prices[j]
            last_minute = m
            j += 1
        grid[g] = last_price if m - last_minute <= max_fill else np.nan
    return grid


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
    """Bars mode: the grid kernel for rows whose window and price are on the 10^-5 grid, the
    scan for the others. The choice is per row, from its own window, so a row's values never
    depend on how the series is split."""
    n = len(prices)
    wmax = int(wins[-1])
    qmax = _grid_qmax(wmax)
    off = _grid_off(prices, qmax)
    if off == n:
        _scan(prices, np.arange(n, dtype=np.int64), prices, wins, out, True)
        return
    stream = out.nbytes > STREAM_BYTES and out.flags.aligned
    _grid_kernel(prices, wins, out, qmax, stream)
    if off:
        rows = _grid_misses(prices, qmax, wmax)
        part = np.empty((out.shape[0], len(rows)), dtype=np.float64)
        _scan(prices, rows, prices[rows], wins, part, False)
        out[:, rows] = part


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
        grid = _minute_grid(minutes, prices, int(max_fill))
        _scan(grid, minutes - minutes[0], prices, wins, out, False)
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
        from bqx import frames  # series and frames: converted there, pandas/polars optional

        return frames.compute_any(
            compute, times, prices, windows=windows, mode=mode, max_fill=max_fill
        )
    matrix = compute_matrix(times, prices, windows=windows, mode=mode, max_fill=max_fill)
    return dict(zip(metric_columns(windows), matrix, strict=True))
