"""Metrics out: rows/s of read_metrics and export beside a plain pandas.read_sql.

    python bench/export.py [--pairs EURUSD,USDJPY,GBPUSD,AUDUSD] [--repeat 2] [--prepare]

Against the database of BQX_HOME (default /tmp/bqx-h6-bench): ``--prepare`` first generates
28 pairs × 3 months (2024-07..09) and backfills them, as ``bqx demo`` does. For the chosen
pairs (all their months) it times, in turn and ``--repeat`` times each:

- ``bqx.read_metrics(pair)`` -> pyarrow.Table (binary COPY decoded by numba);
- ``bqx.read_metrics(pair).to_pandas()`` -> a pandas DataFrame, to compare like with like;
- ``pandas.read_sql("SELECT ts_utc, rate, <37 metrics> … ORDER BY ts_utc", psycopg conn)``;
- ``bqx export`` of the same pairs to Parquet (read + zstd Parquet write, month by month).

The best of the repeats is reported (the machine is shared). Writes bench/results/export.json
and export.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from datetime import UTC, datetime
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def prepare(env: dict[str, str]) -> None:
    cli = [sys.executable, "-m", "bqx.cli"]
    months = ["--start", "2024-07", "--end", "2024-09"]
    subprocess.run([*cli, "generate", *months], env=env, check=True)
    subprocess.run([*cli, "backfill", "--workers", "2"], env=env, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", default="EURUSD,USDJPY,GBPUSD,AUDUSD")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--prepare", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("BQX_HOME", "/tmp/bqx-h6-bench")
    if args.prepare:
        prepare(dict(os.environ))

    import pandas as pd
    from psycopg import sql

    import bqx
    from bqx.config import load_settings
    from bqx.core.layout import Layout, target_columns
    from bqx.core.symbols import parse_pairs
    from bqx.db import connect
    from bqx.store import names
    from common import store_for

    load_before = os.getloadavg()[0]
    settings = load_settings()
    layout = Layout(settings.schema_name)
    pairs = parse_pairs(args.pairs)
    cols = [c for c in target_columns() if c != "created_at"]
    timings: dict[str, list[float]] = {"read_metrics": [], "read_metrics_to_pandas": [],
                                       "pandas_read_sql": [], "export": []}  # fmt: skip
    rows = 0
    bqx.read_metrics(pairs[0], "2024-07-01", "2024-07-02", settings=settings)  # numba warm-up
    out = Path(tempfile.mkdtemp(prefix="bqx-export-bench-"))
    try:
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            rows = sum(bqx.read_metrics(p, settings=settings).num_rows for p in pairs)
            timings["read_metrics"].append(time.perf_counter() - t0)

            t0 = time.perf_counter()
            frames = [bqx.read_metrics(p, settings=settings).to_pandas() for p in pairs]
            timings["read_metrics_to_pandas"].append(time.perf_counter() - t0)
            assert sum(len(f) for f in frames) == rows
            del frames

            t0 = time.perf_counter()
            with connect(settings) as conn, warnings.catch_warnings():
                warnings.simplefilter("ignore", UserWarning)  # "only SQLAlchemy is tested"
                n = 0
                for p in pairs:
                    q = sql.SQL("SELECT {} FROM {} ORDER BY ts_utc").format(
                        sql.SQL(", ").join(map(sql.Identifier, cols)), names.target(layout, p)
                    )
                    n += len(pd.read_sql(q.as_string(conn), conn))
            timings["pandas_read_sql"].append(time.perf_counter() - t0)
            assert n == rows

            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            summary = store_for(settings).export(out, pairs=pairs)
            timings["export"].append(time.perf_counter() - t0)
            assert summary.rows == rows
        parquet_mb = sum(f.stat().st_size for f in out.rglob("*.parquet")) / 1e6
    finally:
        shutil.rmtree(out, ignore_errors=True)

    best = {k: min(v) for k, v in timings.items()}
    doc = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "pairs": pairs, "rows": rows, "columns": len(cols), "repeat": args.repeat,
        "seconds": best, "rows_per_s": {k: rows / v for k, v in best.items()},
        "all_seconds": timings, "parquet_mb": round(parquet_mb, 1), "cpus": os.cpu_count(),
        "load_average": [load_before, os.getloadavg()[0]],
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "export.json").write_text(json.dumps(doc, indent=2) + "\n")
    base = doc["rows_per_s"]["pandas_read_sql"]
    names = {
        "read_metrics": "`bqx.read_metrics` → pyarrow.Table",
        "read_metrics_to_pandas": "`bqx.read_metrics(…).to_pandas()`",
        "pandas_read_sql": "`pandas.read_sql` (psycopg connection)",
        "export": "`bqx export` → Parquet (zstd, pair=…/month=…)",
    }
    lines = [
        f"# Metrics out: {rows:,} rows × {len(cols)} columns"
        f" ({', '.join(p.upper() for p in pairs)}, 2024-07..09)",
        "",
        f"| path | seconds (best of {args.repeat}) | rows/s | × pandas.read_sql |",
        "|---|---:|---:|---:|",
    ]
    for k, label in names.items():
        r = doc["rows_per_s"][k]
        lines.append(f"| {label} | {best[k]:.2f} | {r:,.0f} | {r / base:.1f} |")
    lines += [
        "",
        f"Parquet written: {parquet_mb:.1f} MB. Machine: {os.cpu_count()} CPUs shared with other"
        f" jobs (1-minute load average {load_before:.1f} at the start,"
        f" {os.getloadavg()[0]:.1f} at the end), embedded PostgreSQL on the same machine."
        " Absolute rows/s move with the load; the ratios are the measure."
        " Run `python bench/export.py`.",
        "",
    ]
    (RESULTS / "export.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
