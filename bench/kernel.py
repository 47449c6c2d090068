"""Metric kernel throughput: bqx.metrics against its peers, same process, same bars, one core.

    python bench/kernel.py [--bars 10313378] [--sample-bars 1000000] [--repeat 5]

All compute the 37 columns of the default windows (docs/metrics.md) in month-sized calls
(31,000 bars plus the 75-bar lookback, as the backfill calls the kernel):

- bqx.metrics on 5-decimal prices (the grid path: exact integer window sums);
- bqx.metrics on prices off the decimal grid (the scan, its fallback);
- bqx.metrics on other instruments' grids: BTC-like prices near 65,000 at 2 decimals (the grid
  10^-2) and a coin near 0.0000123 at 8 decimals (10^-8);
- pandas rolling windows; polars rolling expressions (POLARS_MAX_THREADS=1);
- bottleneck move_* functions; numbagg move_sum/move_mean/move_std (numbagg has no moving
  max/min, so that peer takes them from bottleneck).

Rounds are interleaved (each contender once per round) and each keeps its best round, timed
in CPU seconds of this one-threaded process, so a noisy neighbour slows all alike. Each peer's
columns are checked against a plain two-pass reference (the tolerances of docs/metrics.md);
the table reports its worst error/tolerance. Then bqx computes the whole series in one call
against the same series in month-sized calls: as the backfill makes them (each month's output
used and dropped: it stays in cache), and like for like, each month's output copied into one
whole-series array. The memory floors are timed alone in the same rounds: the OS zeroing a
fresh array of the output's size, its first touch, and writing it once where memory was used
before.
Writes bench/results/kernel.json and bench/results/kernel.md.
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import platform
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

# one core, as the kernel target is stated
os.environ.setdefault("NUMBA_NUM_THREADS", "1")
os.environ.setdefault("POLARS_MAX_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import bottleneck as bn  # noqa: E402
import numbagg  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import polars as pl  # noqa: E402
from numpy.lib.stride_tricks import sliding_window_view  # noqa: E402

from bqx.metrics import DEFAULT_WINDOWS, compute_matrix, lookback_bars, metric_columns  # noqa: E402

RESULTS = Path(__file__).parent / "results"
JOB = 31_000  # bars in a pair-month, about
IDLE = 3.0  # seconds memory stays free before "idle_first_touch" (page reporting waits 2 s)
WINDOWS = DEFAULT_WINDOWS
WMAX = max(WINDOWS)
COLUMNS = metric_columns(WINDOWS)
DIMENSIONLESS = ("return", "endpoint", "range", "volatility")

# -- peers: the same 37 columns, as exactly as each library allows ---------------------------


def _assemble(p: np.ndarray, per_window: dict[int, dict[str, np.ndarray]]) -> dict:
    """Return, endpoint and the aggregates from each window's sum/max/min/mean/std."""
    out: dict[str, np.ndarray] = {}
    n = len(p)
    for w, st in per_window.items():
        out[f"w{w}_bqx_return"] = st["sum"] / p - w
        out[f"w{w}_bqx_max"] = st["max"]
        out[f"w{w}_bqx_min"] = st["min"]
        out[f"w{w}_bqx_avg"] = st["mean"]
        out[f"w{w}_bqx_stdev"] = st["std"]
        end = np.full(n, np.nan)
        end[w:] = p[:-w] / p[w:] - 1.0
        out[f"w{w}_bqx_endpoint"] = end
    for k in ("return", "max", "min", "avg", "stdev"):
        out[f"agg_bqx_{k}"] = out[f"w{WMAX}_bqx_{k}"]
    out["agg_bqx_range"] = (out[f"w{WMAX}_bqx_max"] - out[f"w{WMAX}_bqx_min"]) / p
    out["agg_bqx_volatility"] = out[f"w{WMAX}_bqx_stdev"] / p
    return out


def _prev(p: np.ndarray) -> np.ndarray:
    """The series shifted one bar: windows end at t−1."""
    prev = np.empty_like(p)
    prev[0] = np.nan
    prev[1:] = p[:-1]
    return prev


def pandas_metrics(p: np.ndarray) -> dict:
    prev = pd.Series(_prev(p))
    stats = {}
    for w in WINDOWS:
        roll = prev.rolling(w)
        stats[w] = {"sum": roll.sum().to_numpy(), "max": roll.max().to_numpy(),
                    "min": roll.min().to_numpy(), "mean": roll.mean().to_numpy(),
                    "std": roll.std().to_numpy()}  # fmt: skip
    return _assemble(p, stats)


def polars_metrics(p: np.ndarray) -> dict:
    prev = pl.col("p").shift(1)
    exprs = []
    for w in WINDOWS:
        exprs += [prev.rolling_sum(w).alias(f"sum{w}"), prev.rolling_max(w).alias(f"max{w}"),
                  prev.rolling_min(w).alias(f"min{w}"), prev.rolling_mean(w).alias(f"mean{w}"),
                  prev.rolling_std(w, ddof=1).alias(f"std{w}")]  # fmt: skip
    df = pl.DataFrame({"p": p}).select(exprs)
    stats = {
        w: {k: df[f"{k}{w}"].to_numpy() for k in ("sum", "max", "min", "mean", "std")}
        for w in WINDOWS
    }
    return _assemble(p, stats)


def bottleneck_metrics(p: np.ndarray) -> dict:
    prev = _prev(p)
    stats = {
        w: {"sum": bn.move_sum(prev, w), "max": bn.move_max(prev, w), "min": bn.move_min(prev, w),
            "mean": bn.move_mean(prev, w), "std": bn.move_std(prev, w, ddof=1)}
        for w in WINDOWS
    }  # fmt: skip
    return _assemble(p, stats)


def numbagg_metrics(p: np.ndarray) -> dict:
    prev = _prev(p)
    stats = {
        w: {"sum": numbagg.move_sum(prev, window=w), "mean": numbagg.move_mean(prev, window=w),
            "std": numbagg.move_std(prev, window=w),  # n − 1 by default
            "max": bn.move_max(prev, w), "min": bn.move_min(prev, w)}  # none in numbagg
        for w in WINDOWS
    }  # fmt: skip
    return _assemble(p, stats)


def reference(p: np.ndarray) -> dict:
    """Plain two-pass float64 evaluation of the formulas, vectorised over rows."""
    n = len(p)
    per_window = {}
    for w in WINDOWS:
        win = sliding_window_view(p[:-1], w)  # row i: p[i .. i+w-1], the window of bar i+w
        mean = win.sum(axis=1) / w
        var = ((win - mean[:, None]) ** 2).sum(axis=1) / (w - 1)
        st = {}
        for k, v in (("sum", win.sum(axis=1)), ("max", win.max(axis=1)),
                     ("min", win.min(axis=1)), ("mean", mean), ("std", np.sqrt(var))):  # fmt: skip
            full = np.full(n, np.nan)
            full[w:] = v
            st[k] = full
        st["sum"][w:] = ((win - p[w:, None]) / p[w:, None]).sum(axis=1) * p[w:] + w * p[w:]
        per_window[w] = st
    out = _assemble(p, per_window)
    for w in WINDOWS:  # the return exactly as the formula reads: Σ (p_{t−i} − p_t)/p_t
        win = sliding_window_view(p[:-1], w)
        r = np.full(n, np.nan)
        r[w:] = ((win - p[w:, None]) / p[w:, None]).sum(axis=1)
        out[f"w{w}_bqx_return"] = r
    out["agg_bqx_return"] = out[f"w{WMAX}_bqx_return"]
    return out


def worst_error(got: dict, ref: dict, p: np.ndarray) -> float:
    """Largest |got − ref| / tolerance over all columns (≤ 1 meets docs/metrics.md)."""
    worst = 0.0
    for col in COLUMNS:
        want, have = ref[col], np.asarray(got[col])
        if not np.array_equal(np.isnan(want), np.isnan(have)):
            return float("inf")
        ok = ~np.isnan(want)
        scale = 1.0 if col.endswith(DIMENSIONLESS) else p[ok]
        tol = 1e-9 * np.abs(want[ok]) + 1e-12 * scale
        worst = max(worst, float(np.max(np.abs(have[ok] - want[ok]) / tol)))
    return worst


def bqx_matrix(times: np.ndarray, p: np.ndarray) -> dict:
    return dict(zip(COLUMNS, compute_matrix(times, p), strict=True))


# -- timing ------------------------------------------------------------------------------


def month_calls(fn: Callable, times: np.ndarray, p: np.ndarray) -> Callable[[], None]:
    """Month-sized calls over the whole of ``p``, each with its lookback."""
    lb = lookback_bars(WINDOWS)

    def run() -> None:
        for lo in range(0, len(p), JOB):
            a = max(0, lo - lb)
            fn(times[a : lo + JOB], p[a : lo + JOB])

    return run


def month_calls_copied(
    times: np.ndarray, p: np.ndarray, whole: Callable[[], np.ndarray]
) -> Callable[[], None]:
    """Month-sized calls, each month's output copied into one whole-series array: what a caller
    who wants the whole series from month-sized calls does."""
    lb = lookback_bars(WINDOWS)

    def run() -> None:
        out = whole()
        for lo in range(0, len(p), JOB):
            a = max(0, lo - lb)
            month = compute_matrix(times[a : lo + JOB], p[a : lo + JOB])
            out[:, lo : lo + JOB] = month[:, lo - a :]

    return run


def os_zeroing(nbytes: int) -> Callable[[], None]:
    """Fresh anonymous memory of ``nbytes``, huge pages as numpy asks for them, faulted in by the
    kernel in one call (``MADV_POPULATE_WRITE``, Linux ≥ 5.14): the OS zeroing it, alone."""

    def run() -> None:
        m = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        m.madvise(mmap.MADV_HUGEPAGE)
        m.madvise(getattr(mmap, "MADV_POPULATE_WRITE", 23))
        m.close()

    return run


def interleaved(contenders: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Best seconds of each contender over ``rounds`` rounds, one run of each per round."""
    best = dict.fromkeys(contenders, float("inf"))
    for _ in range(rounds):
        for name, fn in contenders.items():
            t0 = time.process_time()  # CPU time: a busy neighbour's share is not counted
            fn()
            best[name] = min(best[name], time.process_time() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bars", type=int, default=10_313_378)
    ap.add_argument("--sample-bars", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n = args.bars
    times = np.datetime64("2024-07-01T00:00", "m") + np.arange(n).astype("timedelta64[m]")
    walk = 1.08 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
    prices = np.round(walk, 5)  # pips: the grid path
    off_grid = walk  # raw floats: the scan
    m = min(args.sample_bars, n)
    ts, ps, po = times[:m], prices[:m], off_grid[:m]
    others = {  # name: prices on another instrument's grid (docs/metrics.md, "Price grids")
        "bqx (grid 10^-2: BTC-like, 65,000 at 2 decimals)": np.round(walk[:m] * 60185.0, 2),
        "bqx (grid 10^-8: a coin, 0.0000123 at 8 decimals)": np.round(walk[:m] * 1.14e-5, 8),
    }

    grid, scan = "bqx (grid path)", "bqx (scan, prices off the grid)"
    peers: dict[str, Callable] = {
        grid: lambda t, p: bqx_matrix(t, p),
        "pandas rolling": lambda t, p: pandas_metrics(p),
        "polars rolling": lambda t, p: polars_metrics(p),
        "bottleneck move_*": lambda t, p: bottleneck_metrics(p),
        "numbagg move_* (max/min: bottleneck)": lambda t, p: numbagg_metrics(p),
    }
    calls = {name: month_calls(fn, ts, ps) for name, fn in peers.items()}
    calls[scan] = month_calls(bqx_matrix, ts, po)
    for name, p_other in others.items():
        calls[name] = month_calls(bqx_matrix, ts, p_other)
    for fn in peers.values():  # compile, load caches, warm up
        fn(ts[:5000], ps[:5000])
    for p_warm in (po, *others.values()):
        bqx_matrix(ts[:5000], p_warm[:5000])

    # accuracy of every contender on the first month
    k = min(JOB, m)
    ref_on = reference(ps[:k])
    errors = {name: worst_error(fn(ts[:k], ps[:k]), ref_on, ps[:k]) for name, fn in peers.items()}
    errors[scan] = worst_error(bqx_matrix(ts[:k], po[:k]), reference(po[:k]), po[:k])
    for name, p_other in others.items():
        q = p_other[:k]
        errors[name] = worst_error(bqx_matrix(ts[:k], q), reference(q), q)

    best = interleaved(calls, args.repeat)
    rate = {name: m / s for name, s in best.items()}
    peer_names = [nm for nm in rate if not nm.startswith("bqx")]
    fastest = max(peer_names, key=rate.get)

    # one big call against month-sized calls over the same series, interleaved
    # (fresh memory costs its first touch, page faults and zeroing by the OS: timed alone too).
    # Memory left free for a few seconds may be handed back to a VM's host (virtio-balloon free
    # page reporting), which makes its next first touch far dearer: timed apart, after IDLE
    # seconds asleep (not CPU time); the fresh-memory rows after it reuse what it freed.
    shape = (len(COLUMNS), n)
    reused = np.zeros(shape)
    copied_into = np.zeros(shape)
    whole = interleaved(
        {"months": month_calls(lambda t, p: compute_matrix(t, p), times, prices),
         "whole_into": lambda: compute_matrix(times, prices, out=reused),
         "months_copied": month_calls_copied(times, prices, lambda: copied_into),
         "idle_first_touch": lambda: (time.sleep(IDLE), np.empty(shape).fill(0.0)),
         "whole": lambda: compute_matrix(times, prices),
         "months_copied_fresh": month_calls_copied(times, prices, lambda: np.empty(shape)),
         "fresh_memory": lambda: np.empty(shape).fill(0.0),
         "os_zeroing": os_zeroing(reused.nbytes),
         "write_used_memory": lambda: reused.fill(0.0)},
        args.repeat,  # fresh 3 GB allocations are noisy: the OS sometimes compacts memory first
    )  # fmt: skip
    ns = {k: v / n * 1e9 for k, v in whole.items()}  # ns per bar

    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_used": 1,
                    "python": platform.python_version(), "numpy": np.__version__,
                    "pandas": pd.__version__, "polars": pl.__version__,
                    "bottleneck": bn.__version__, "numbagg": numbagg.__version__},
        "columns": len(COLUMNS),
        "sample_bars": m,
        "month_calls_bars_per_s": rate,
        "worst_error_over_tolerance": errors,
        "fastest_peer": fastest,
        "ratio_vs_fastest_peer": rate[grid] / rate[fastest],
        "ratio_scan_vs_fastest_peer": rate[scan] / rate[fastest],
        "bars": n,
        "bqx_month_calls_bars_per_s": n / whole["months"],
        "bqx_one_call_bars_per_s": n / whole["whole"],
        "one_call_vs_month_calls": whole["months"] / whole["whole"],
        "bqx_one_call_reused_out_bars_per_s": n / whole["whole_into"],
        "one_call_reused_out_vs_month_calls": whole["months"] / whole["whole_into"],
        "bqx_month_calls_copied_bars_per_s": n / whole["months_copied"],
        "bqx_month_calls_copied_fresh_bars_per_s": n / whole["months_copied_fresh"],
        "one_call_vs_month_calls_copied": whole["months_copied_fresh"] / whole["whole"],
        "one_call_reused_out_vs_month_calls_copied": whole["months_copied"] / whole["whole_into"],
        "first_touch_of_output_s": whole["fresh_memory"],
        "first_touch_after_idle_s": whole["idle_first_touch"],
        "os_zeroing_of_output_s": whole["os_zeroing"],
        "writing_output_to_used_memory_s": whole["write_used_memory"],
        "kernel_one_call_s": whole["whole_into"],
        "ns_per_bar": ns,
        "targets": {"ratio_vs_fastest_peer": 2, "one_call_vs_month_calls": 1},
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"Kernel, {len(COLUMNS)} columns, one core, {m:,} bars in month-sized calls"
        f" ({JOB:,} bars + {lookback_bars(WINDOWS)} lookback), best of {args.repeat}"
        " interleaved rounds:",
        "",
        "| contender | bars/s | bqx grid path / it | worst error / tolerance |",
        "|---|---:|---:|---:|",
    ]
    for name, r in sorted(rate.items(), key=lambda kv: -kv[1]):
        md.append(f"| {name} | {r:,.0f} | {rate[grid] / r:.2f}× |"
                  f" {errors[name]:.2g} |")  # fmt: skip
    md += [
        "",
        f"**bqx / fastest peer ({fastest}): {result['ratio_vs_fastest_peer']:.2f}×** (target ≥ 2×);"
        f" the scan alone: {result['ratio_scan_vs_fastest_peer']:.2f}×.",
        "",
        f"| bqx, the whole series ({n:,} bars) | bars/s | CPU-s | ns/bar |",
        "|---|---:|---:|---:|",
    ]
    for key, label in (
        ("months", "month-sized calls (each output used and dropped)"),
        ("months_copied", "month-sized calls, each copied into one whole-series array used before"),
        ("months_copied_fresh", "month-sized calls, each copied into one fresh whole-series array"),
        ("whole_into", "one call into an array used before (`out=`)"),
        ("whole", "one call into fresh memory"),
    ):
        md.append(f"| {label} | {n / whole[key]:,.0f} | {whole[key]:.3f} | {ns[key]:.1f} |")
    md += [
        "",
        f"**One call / month-sized calls: {result['one_call_vs_month_calls']:.2f} into fresh"
        f" memory, {result['one_call_reused_out_vs_month_calls']:.2f} into memory used before**;"
        " like for like (month outputs copied into one array):"
        f" {result['one_call_vs_month_calls_copied']:.2f} fresh,"
        f" {result['one_call_reused_out_vs_month_calls_copied']:.2f} used before.",
        "",
        f"Memory alone, a {len(COLUMNS)} × {n:,} float64 array ({reused.nbytes / 2**30:.2f} GiB):",
        "",
        "| memory alone | CPU-s | ns/bar |",
        "|---|---:|---:|",
    ]
    for key, label in (
        ("os_zeroing", "OS zeroing fresh pages (mmap + MADV_POPULATE_WRITE, huge pages)"),
        ("fresh_memory", "first touch of a fresh array (np.empty + fill)"),
        ("idle_first_touch", f"the same, the memory having been free {IDLE:.0f} s before"),
        ("write_used_memory", "writing it once where memory was used before (fill)"),
    ):
        md.append(f"| {label} | {whole[key]:.3f} | {ns[key]:.1f} |")
    md += [
        "",
        f"Kernel alone (one call into memory used before): {whole['whole_into']:.3f} CPU-s.",
    ]
    (RESULTS / "kernel.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
