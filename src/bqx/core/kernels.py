"""Everything numba compiles: the kernels behind :mod:`bqx.metrics` (the scan, the grid path
with its streaming stores, the clock-mode minute grid) and the COPY binary codec behind
:mod:`bqx.db`. docs/metrics.md has the formulas, docs/performance.md the measurements.

Kept apart so that what only needs names, columns and SQL (planning a run, a resume with
nothing to do, status, reports) does not import numba, which takes a fifth of a second.
"""

from __future__ import annotations

from typing import Any

import numba
import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic

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

_NT_LANES = 8  # float64 per streaming store: one 64-byte cache line (two stores without AVX-512)
_NT_BYTES = 8 * _NT_LANES


@intrinsic
def _stream_line(typingctx, dst, i, src, j):  # pragma: no cover - compiled
    """``dst[i : i + 8] = src[j : j + 8]`` as one non-temporal store of a whole cache line
    (``dst[i]`` must be 64-byte aligned): LLVM's ``!nontemporal`` store, ``vmovntpd`` on x86."""
    sig = types.void(dst, i, src, j)

    def codegen(context, builder, signature, args):
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

    def codegen(context, builder, signature, args):
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
        _stream_line(dst, i, src, i)  # type: ignore[call-arg]  # typingctx: numba's
        i += _NT_LANES
    for k in range(i, n):
        dst[k] = src[k]


# -- the grid path: prices on a decimal grid, exact integer window sums ---------------------
#
# A price p is on the grid 10^-d when it is the float64 nearest to q·10^-d for an integer q
# (checked by the round trip). Which d: per row, from the prices of its own window (and its
# own), so a row's values never depend on how the series is split. Every grid a window is on
# is exact; the row takes GRID_DECIMALS (10^-5: every 5- and 3-decimal forex price, so forex
# rows are computed as they always were) when its window is on it, else the grid nearest to it
# that the window is on: the finest one whose integers fit the int64 sums for large prices
# (indices at 2 decimals on 10^-3, BTC near 100,000 on 10^-2), the coarsest one for fine ones
# (a coin at 0.00001234 on 10^-8). A row whose window is on no grid takes the scan.

GRID_DECIMALS = 5  # 10^-5: every 5-decimal price is on it, and so is every 3-decimal (JPY) one
MAX_DECIMALS = 12  # the finest grid tried: 10^-12
NO_GRID = -1  # a row's scale when its window is on no grid: the scan computes it
_GRID = 10.0**GRID_DECIMALS
_ROUND_TRIP_MAX = 2.0**50  # above this the float64 round trip says nothing (see _exact)
_GRID_BLOCK = 512  # rows per block: local prefix sums and sparse tables stay in L1/L2
# streaming: blocks collected per copy to ``out``; 16 KB runs per row stream far better than
# 4 KB ones, and the 37 × 2048 scratch (600 KB) still stays in L2
_STREAM_COLS = 4 * _GRID_BLOCK


def _grid_qmax(wmax: int) -> int:
    """Largest grid integer the int64 arithmetic of :func:`_grid_kernel` takes without overflow.

    Window sums of squares W·Σq² ≤ (W·q)² and block prefix sums (block + W)·q² must stay below
    2^63: about 2.9e7 with the default windows (prices up to ~286 on 10^-5, ~286,000 on 10^-2).
    """
    limit = 2**62
    by_window = int(np.sqrt(limit)) // wmax
    by_block = int(np.sqrt(limit // (_GRID_BLOCK + wmax)))
    return min(by_window, by_block)


@numba.njit(cache=True, nogil=True, inline="always")
def _on_grid(x, g, qmax):  # pragma: no cover - compiled
    """x·g (g = 10^d) as an integer if x is exactly the float64 nearest to that decimal
    (round-trip exact) and 0 < x·g ≤ qmax; else 0 (off the grid)."""
    r = np.rint(x * g)
    ok = (r / g == x) and (r > 0.0) and (r <= qmax)
    return np.int64(r) if ok else np.int64(0)


@numba.njit(cache=True, nogil=True)
def _grid_off(values, qmax, g):  # pragma: no cover - compiled
    """How many values are off the grid 1/g."""
    off = 0
    for i in range(values.shape[0]):
        off += 1 if _on_grid(values[i], g, qmax) == 0 else 0
    return off


@numba.njit(cache=True, nogil=True, inline="always")
def _exact(x, g):  # pragma: no cover - compiled
    """Whether x is the float64 nearest to a positive multiple of 1/g.

    Exact and monotone: if x = fl(q/10^d), then x·10^(d+1) is within q·2^-52 of the integer
    10q, which rounds back to it while 10q < 2^51, and 10q / 10^(d+1) rounds to x again. So
    a value on a grid is on every finer one (below ``_ROUND_TRIP_MAX``)."""
    r = np.rint(x * g)
    return r > 0.0 and r <= _ROUND_TRIP_MAX and r / g == x


@numba.njit(cache=True, nogil=True, inline="always")
def _decimals(x, d, powers):  # pragma: no cover - compiled
    """The coarsest grid 10^-k that x is on (``powers.shape[0]``: none), searched from d."""
    top = powers.shape[0] - 1
    while d > 0 and np.rint(x * powers[d]) > _ROUND_TRIP_MAX:
        d -= 1  # too fine to tell there: the answer, if any, is coarser
    if _exact(x, powers[d]):
        while d > 0 and _exact(x, powers[d - 1]):
            d -= 1
        return d
    while d < top and np.rint(x * powers[d + 1]) <= _ROUND_TRIP_MAX:
        d += 1
        if _exact(x, powers[d]):
            return d
    return top + 1


@numba.njit(cache=True, nogil=True)
def _value_grids(values, qmax, powers, lo, hi):  # pragma: no cover - compiled
    """Per value: ``lo``, its decimals (the coarsest grid it is on; MAX_DECIMALS + 1: none),
    and ``hi``, the finest grid whose integer for it fits ``qmax`` (-1: none). It is on the
    grid 10^-d, in the kernel's sense, exactly for lo ≤ d ≤ hi. Each search starts from the
    previous value's answer, which in a price series is nearly always the answer again."""
    top = powers.shape[0] - 1
    d_lo = GRID_DECIMALS
    d_hi = GRID_DECIMALS
    for i in range(values.shape[0]):
        x = values[i]
        found = _decimals(x, d_lo, powers)
        lo[i] = found
        d_lo = min(found, top)
        d_hi = min(max(d_hi, 0), top)
        if np.rint(x * powers[d_hi]) <= qmax:
            while d_hi < top and np.rint(x * powers[d_hi + 1]) <= qmax:
                d_hi += 1
        else:
            while d_hi >= 0 and np.rint(x * powers[d_hi]) > qmax:
                d_hi -= 1
        hi[i] = d_hi


@numba.njit(cache=True, nogil=True)
def _one_grid(values, qmax, wmax, d):  # pragma: no cover - compiled
    """Whether every row's grid is 10^-d (what ``_row_scales`` would say) with two cheap checks
    a value: every value is on it, and every window holds a value that rules out the grid one
    step nearer to ``GRID_DECIMALS`` (too large for 10^-(d+1) when d < 5; not on 10^-(d-1)
    when d > 5). An instrument on one grid is answered so at a fraction of the full search."""
    if d == GRID_DECIMALS or d < 0 or d > MAX_DECIMALS:
        return False
    g = 10.0**d
    nearer = 10.0 ** (d + 1) if d < GRID_DECIMALS else 10.0 ** (d - 1)
    last = -(wmax + 2)  # the last value that rules the nearer grid out
    for r in range(values.shape[0]):
        x = values[r]
        if _on_grid(x, g, qmax) == 0:
            return False
        if d < GRID_DECIMALS:
            out = np.rint(x * nearer) > qmax
        else:
            out = not _exact(x, nearer)
        if out:
            last = r
        if r - last > wmax:
            return False
    return True


@numba.njit(cache=True, nogil=True)
def _window_max(x, k):  # pragma: no cover - compiled
    """max(x[r − k + 1 … r]) for every r (fewer at the start), in O(n): prefix and suffix
    maxima within blocks of k, so a window is one block's suffix and the next one's prefix."""
    n = x.shape[0]
    pre = np.empty(n, dtype=x.dtype)
    suf = np.empty(n, dtype=x.dtype)
    for b0 in range(0, n, k):
        b1 = min(b0 + k, n)
        m = x[b0]
        for i in range(b0, b1):
            m = max(m, x[i])
            pre[i] = m
        m = x[b1 - 1]
        for i in range(b1 - 1, b0 - 1, -1):
            m = max(m, x[i])
            suf[i] = m
    out = np.empty(n, dtype=x.dtype)
    for r in range(n):
        a = r - k + 1
        out[r] = pre[r] if a <= 0 else max(suf[a], pre[r])
    return out


@numba.njit(cache=True, nogil=True)
def _row_scales(values, qmax, wmax):  # pragma: no cover - compiled
    """Each row's grid decimals (``NO_GRID``: the scan), from its own price and the ``wmax``
    before it: the window is on 10^-d for max(lo) ≤ d ≤ min(hi) over those values, and the
    row takes the d of that range nearest to ``GRID_DECIMALS``."""
    n = values.shape[0]
    powers = np.empty(MAX_DECIMALS + 1)
    g = 1.0
    for d in range(MAX_DECIMALS + 1):
        powers[d] = g  # exact: every 10^d up to 10^22 is a float64
        g *= 10.0
    lo = np.empty(n, dtype=np.int8)
    hi = np.empty(n, dtype=np.int8)
    _value_grids(values, qmax, powers, lo, hi)
    out = np.empty(n, dtype=np.int8)
    if n == 0:
        return out
    if lo.min() == lo.max() and hi.min() == hi.max():  # one grid for the whole series
        w_lo, w_hi = lo[0], hi[0]
        out[:] = NO_GRID if w_lo > w_hi else min(max(GRID_DECIMALS, w_lo), w_hi)
        return out
    lo = _window_max(lo, wmax + 1)
    hi = -_window_max(-hi, wmax + 1)
    for r in range(n):
        out[r] = NO_GRID if lo[r] > hi[r] else min(max(GRID_DECIMALS, lo[r]), hi[r])
    return out


@numba.njit(cache=True, nogil=True, inline="always")
def _grid_rows(c1b, c1a, c2b, c2a, hi_a, hi_b, lo_a, lo_b, qt, qw, inv_q, w_int, g, o_ret,
               o_max, o_min, o_avg, o_sd, o_end):  # pragma: no cover - compiled  # fmt: skip
    """One window for a run of rows; every array is a 1-D slice indexed from 0, so the loop
    vectorises. ``g``: the grid's 10^d."""
    w = float(w_int)
    c_avg = 1.0 / (w * g)
    c_var = 1.0 / (w * (w - 1.0))
    inv_g = 1.0 / g
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
        o_sd[i] = np.sqrt(float(num) * c_var) * inv_g
        o_end[i] = float(qw[i] - qt[i]) * inv_q[i]


@numba.njit(cache=True, nogil=True, error_model="numpy")  # 1/0 on off-grid rows: inf, no raise
def _grid_kernel(values, wins, out, qmax, g, row0, row1, stream):  # pragma: no cover - compiled
    """Bars mode for rows ``row0`` … ``row1`` − 1 whose windows are on the grid 1/g (g = 10^d):
    every window sum is an exact int64 difference of block-local prefix sums, so each row
    costs O(1) per window whatever W is, and its values depend only on its own window
    (bit-identical however the series is split). Other rows of ``out`` are not touched.

    ``stream``: compute the blocks into a scratch matrix of ``_STREAM_COLS`` rows (it stays in
    L2) and copy each full one to ``out`` with streaming stores (see ``STREAM_BYTES``); the
    values are the same either way.

    With S1 = Σq and S2 = Σq² over the window (q = p·10^d): mean = S1 / (W·10^d), and the
    sample variance has the exact integer numerator W·S2 − S1² (≥ 0, and 0 exactly when the
    window is constant). Return and endpoint have exact integer numerators too. Max and min
    come from a sparse table over the float64 prices themselves (exact).
    """
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
    for r0 in range(row0, row1, _GRID_BLOCK):
        m = min(_GRID_BLOCK, row1 - r0)
        dst = scratch if stream else out  # the block's rows are dst[:, c0 : c0 + m]
        c0 = (r0 - row0) % _STREAM_COLS if stream else r0
        seg = max(0, r0 - wmax)
        span = r0 + m - seg
        off = r0 - seg  # local index of row r0
        src = values[seg : seg + span]
        for i in range(span):
            q[i] = _on_grid(src[i], g, qmax)
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
                qb[j0:], q[b0 - w_int : b1 - w_int], iq[j0:], w_int, g,
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
        if stream and (c0 + m == _STREAM_COLS or r0 + m == row1):
            a = r0 + m - (c0 + m)
            for c in range(out.shape[0]):
                _stream_copy(out[c, a : r0 + m], scratch[c, : c0 + m])
    if stream:
        _store_fence()  # type: ignore[call-arg]  # typingctx: numba's


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


# -- the COPY binary codec of bqx.db ----------------------------------------------------------


def _big_endian_store(bits: int) -> Any:
    """A numba intrinsic ``store(buffer, at, value)``: the low ``bits`` of an int64 written
    big-endian at any byte offset of a uint8 array, as one byte swap and one unaligned store
    (byte-at-a-time stores made encoding the slowest step of a job's client side)."""

    @intrinsic
    def store(typingctx, buf, at, value):
        def codegen(context, builder, signature, args):
            array, offset, v = args
            data = context.make_array(signature.args[0])(context, builder, array).data
            t = ir.IntType(bits)
            word = builder.trunc(v, t) if bits < 64 else v
            ptr = builder.bitcast(builder.gep(data, [offset]), t.as_pointer())
            builder.store(builder.bswap(word), ptr, align=1)
            return context.get_dummy_value()

        return numba.types.void(buf, at, value), codegen

    return store


_be16, _be32, _be64 = (_big_endian_store(b) for b in (16, 32, 64))


@numba.njit(cache=True, nogil=True)
def _encode_rows(ts: np.ndarray, values: np.ndarray, bits: np.ndarray, out: np.ndarray) -> int:
    """Write rows (timestamp, float8 * k; NaN -> NULL) in COPY binary row format into ``out``,
    which the caller sized for them (:func:`_copy_bound`).

    ``values`` and ``bits`` (its int64 view) are (k, n): column-major, any strides, so the
    kernel's (columns × bars) output is encoded as it is, with no transposing copy.
    """
    k, n = values.shape
    nf = np.int64(k + 1)
    pos = 0
    for i in range(n):
        _be16(out, pos, nf)  # field count, then the timestamp field: length 8, int64
        _be32(out, pos + 2, np.int64(8))
        _be64(out, pos + 6, ts[i])
        pos += 14
        for j in range(k):
            if np.isnan(values[j, i]):
                _be32(out, pos, np.int64(-1))  # NULL
                pos += 4
            else:
                _be32(out, pos, np.int64(8))
                _be64(out, pos + 4, bits[j, i])
                pos += 12
    return pos


_NAN_BITS = np.array([np.nan]).view(np.int64)[0]


@numba.njit(cache=True, nogil=True)
def _decode_columns(buf, pos, nfields, ts_out, bits_out, null_out):  # pragma: no cover
    """Decode whole COPY BINARY rows (timestamp, float8 × (nfields − 1)) from ``buf[pos:]``.

    Returns (rows decoded, position after them, status): status 0 = more may follow,
    1 = trailer seen, -1 = wrong field count, -2 = NULL time, -3 = a field is not 8 bytes.
    A NULL float gets NaN bits and a 1 in ``null_out``.
    """
    end = buf.shape[0]
    cap = ts_out.shape[0]
    r = 0
    while r < cap:
        if pos + 2 > end:
            return r, pos, 0
        nf = (np.int64(buf[pos]) << 8) | np.int64(buf[pos + 1])
        if nf == 0xFFFF:
            return r, pos + 2, 1
        if nf != nfields:
            return r, pos, -1
        # the row is decoded only when all of it is in the buffer
        p = pos + 2
        for _f in range(nfields):
            if p + 4 > end:
                return r, pos, 0
            ln = (
                (np.int64(buf[p]) << 24) | (np.int64(buf[p + 1]) << 16)
                | (np.int64(buf[p + 2]) << 8) | np.int64(buf[p + 3])
            )  # fmt: skip
            p += 4
            if ln == 8:
                p += 8
            elif ln != 0xFFFFFFFF:
                return r, pos, -3
        if p > end:
            return r, pos, 0
        p = pos + 2
        for f in range(nfields):
            null = buf[p] == 0xFF
            p += 4
            if null:
                if f == 0:
                    return r, pos, -2
                bits_out[f - 1, r] = _NAN_BITS
                null_out[f - 1, r] = 1
                continue
            v = np.int64(0)
            for b in range(8):
                v = (v << 8) | np.int64(buf[p + b])
            p += 8
            if f == 0:
                ts_out[r] = v
            else:
                bits_out[f - 1, r] = v
                null_out[f - 1, r] = 0
        pos = p
        r += 1
    return r, pos, 0
