"""Metric kernel throughput: bqx.metrics against pandas rolling windows, same process, one core.

    python bench/kernel.py [--bars 10313378] [--pandas-bars 1000000]

Computes all 37 columns (default windows) for a random walk of the report's size (10,313,378
bars), in jobs of one month (~31,000 bars + lookback, as the backfill calls it) and whole;
pandas computes the same 37 columns with rolling windows on a sample, and its rate is compared.
Writes bench/results/kernel.json and bench/results/kernel.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("NUMBA_NUM_THREADS", "1")  # one core, as the kernel target is stated

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from bqx.metrics import DEFAULT_WINDOWS, compute, compute_matrix, lookback_bars  # noqa: E402

RESULTS = Path(__file__).parent / "results"
JOB = 31_000  # bars in a pair-month, about


def pandas_metrics(prices: np.ndarray, windows=DEFAULT_WINDOWS) -> dict[str, np.ndarray]:
    """The same 37 columns with pandas rolling windows (the usual way to write this)."""
    s = pd.Series(prices)
    prev = s.shift(1)  # windows end at t-1
    out = {}
    for w in windows:
        roll = prev.rolling(w)
        total = roll.sum()
        out[f"w{w}_bqx_return"] = (total - w * s) / s
        out[f"w{w}_bqx_max"] = roll.max()
        out[f"w{w}_bqx_min"] = roll.min()
        out[f"w{w}_bqx_avg"] = roll.mean()
        out[f"w{w}_bqx_stdev"] = roll.std()
        out[f"w{w}_bqx_endpoint"] = (s.shift(w) - s) / s
    w = max(windows)
    for k in ("return", "max", "min", "avg", "stdev"):
        out[f"agg_bqx_{k}"] = out[f"w{w}_bqx_{k}"]
    out["agg_bqx_range"] = (out[f"w{w}_bqx_max"] - out[f"w{w}_bqx_min"]) / s
    out["agg_bqx_volatility"] = out[f"w{w}_bqx_stdev"] / s
    return {k: v.to_numpy() for k, v in out.items()}


def best_of(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bars", type=int, default=10_313_378)
    ap.add_argument("--pandas-bars", type=int, default=1_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    n = args.bars
    times = np.datetime64("2024-07-01T00:00", "m") + np.arange(n).astype("timedelta64[m]")
    prices = np.round(1.08 * np.exp(np.cumsum(rng.normal(0, 1e-4, n))), 5)
    compute(times[:2000], prices[:2000])  # compile / load the numba cache

    lb = lookback_bars(DEFAULT_WINDOWS)

    def jobs() -> None:
        for lo in range(0, n, JOB):
            a = max(0, lo - lb)
            compute_matrix(times[a : lo + JOB], prices[a : lo + JOB])

    t_jobs = best_of(jobs, args.repeat)
    t_whole = best_of(lambda: compute(times, prices), args.repeat)

    m = min(args.pandas_bars, n)
    t_bqx_sample = best_of(lambda: compute(times[:m], prices[:m]), args.repeat)
    t_pandas = best_of(lambda: pandas_metrics(prices[:m]), args.repeat)

    def pandas_jobs() -> None:  # the same month-sized calls, as a backfill would make them
        for lo in range(0, m, JOB):
            pandas_metrics(prices[max(0, lo - lb) : lo + JOB])

    t_pandas_jobs = best_of(pandas_jobs, args.repeat)

    def bqx_jobs_sample() -> None:
        for lo in range(0, m, JOB):
            compute_matrix(times[max(0, lo - lb) : lo + JOB], prices[max(0, lo - lb) : lo + JOB])

    t_bqx_jobs_sample = best_of(bqx_jobs_sample, args.repeat)
    # the two agree on the sample (pandas' rolling sums drift a little, hence the tolerance)
    ours, theirs = compute(times[:m], prices[:m]), pandas_metrics(prices[:m])
    worst = max(
        float(np.nanmax(np.abs(ours[c] - theirs[c]) / (np.abs(ours[c]) + 1e-12))) for c in ours
    )

    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"cpu": platform.processor() or platform.machine(), "cores_used": 1,
                    "python": platform.python_version(), "numpy": np.__version__,
                    "pandas": pd.__version__},
        "bars": n,
        "columns": 37,
        "bqx_jobs_bars_per_s": n / t_jobs,
        "bqx_whole_bars_per_s": n / t_whole,
        "pandas_sample_bars": m,
        "bqx_sample_bars_per_s": m / t_bqx_sample,
        "pandas_bars_per_s": m / t_pandas,
        "ratio_vs_pandas": (m / t_bqx_sample) / (m / t_pandas),
        "pandas_jobs_bars_per_s": m / t_pandas_jobs,
        "bqx_jobs_sample_bars_per_s": m / t_bqx_jobs_sample,
        "ratio_vs_pandas_jobs": t_pandas_jobs / t_bqx_jobs_sample,
        "max_relative_difference_vs_pandas": worst,
        "targets": {"bars_per_s": 10_000_000, "ratio_vs_pandas": 8},
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "kernel.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "| kernel, 37 columns, one core | bars/s |",
        "|---|---:|",
        f"| bqx, {n:,} bars in month-sized jobs | {result['bqx_jobs_bars_per_s']:,.0f} |",
        f"| bqx, {n:,} bars in one call | {result['bqx_whole_bars_per_s']:,.0f} |",
        f"| bqx, {m:,} bars | {result['bqx_sample_bars_per_s']:,.0f} |",
        f"| pandas rolling, {m:,} bars | {result['pandas_bars_per_s']:,.0f} |",
        f"| **ratio bqx / pandas, one call each** | **{result['ratio_vs_pandas']:.1f}×** |",
        f"| bqx, {m:,} bars in month-sized calls | {result['bqx_jobs_sample_bars_per_s']:,.0f} |",
        f"| pandas rolling, {m:,} bars in month-sized calls |"
        f" {result['pandas_jobs_bars_per_s']:,.0f} |",
        f"| **ratio bqx / pandas, month-sized calls** |"
        f" **{result['ratio_vs_pandas_jobs']:.1f}×** |",
    ]
    (RESULTS / "kernel.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
