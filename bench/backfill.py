"""End-to-end backfill against its peers on the same server, in one session.

    python bench/backfill.py [--pairs 28] [--months 3] [--workers 2] [--sql-jobs 4]

1. ``bqx backfill --force``: read bars, compute, write, commit, ledger — rows/s.
2. Bare binary COPY of the very same output rows (computed beforehand, outside the clock) into
   the same partitions, TRUNCATE + COPY + COMMIT per job, with the same number of connections:
   the ceiling the backfill is held against (target: backfill ≥ 70 % of it).
3. An in-database ``INSERT … SELECT`` computing the same columns with SQL window functions, on
   a few jobs with the same number of connections (target: bqx ≥ 5× it).

Data: ``bqx generate`` bars for the first N of the report's pairs from 2024-07, in the embedded
server under BQX_HOME (default /tmp/bqx-bench). Writes bench/results/backfill.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("BQX_HOME", "/tmp/bqx-bench")
os.environ.pop("BQX_DATABASE_URL", None)

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bqx.backfill import Params, backfill, compute_month, read_series  # noqa: E402
from bqx.config import load_settings  # noqa: E402
from bqx.db import connect, copy_in, resolve_url  # noqa: E402
from bqx.metrics import DEFAULT_WINDOWS, metric_columns  # noqa: E402
from bqx.schema import REPORT_PAIRS, Layout, Month, month_range  # noqa: E402
from bqx.sources.generate import generate  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCHEMA = "bench_backfill"


def sql_window_insert(layout: Layout, pair: str, month: Month) -> sql.Composed:
    """The same 37 columns as one INSERT … SELECT with window functions (the usual SQL way),
    into the job's partition."""
    src, t, p = layout.source(pair), layout.time, layout.price
    exprs, windows = [], []
    for w in DEFAULT_WINDOWS:
        win = sql.Identifier(f"w{w}")
        windows.append(sql.SQL("{} AS (ORDER BY {} ROWS BETWEEN {} PRECEDING AND 1 PRECEDING)")
                       .format(win, t, sql.Literal(w)))  # fmt: skip
        full = sql.SQL("count(*) OVER {} = {}").format(win, sql.Literal(w))
        for stat in (
            sql.SQL("(sum(close) OVER {w} - {n} * close) / close"),
            sql.SQL("max(close) OVER {w}"), sql.SQL("min(close) OVER {w}"),
            sql.SQL("avg(close) OVER {w}"), sql.SQL("stddev_samp(close) OVER {w}"),
            sql.SQL("(first_value(close) OVER {w} - close) / close"),
        ):  # fmt: skip
            exprs.append(sql.SQL("CASE WHEN {} THEN {} END").format(
                full, stat.format(w=win, n=sql.Literal(w))))  # fmt: skip
    big = len(DEFAULT_WINDOWS) - 1
    exprs += [exprs[6 * big + k] for k in range(5)]
    exprs.append(sql.SQL("({} - {}) / close").format(exprs[6 * big + 1], exprs[6 * big + 2]))
    exprs.append(sql.SQL("{} / close").format(exprs[6 * big + 4]))
    return sql.SQL(
        "INSERT INTO {part} ({cols}) SELECT time, close, {exprs} FROM ("
        " SELECT {t} AS time, {p}::float8 AS close FROM {src}"
        " WHERE {t} >= %s::timestamptz - interval '7 days' AND {t} < %s) s"
        " WHERE time >= %s WINDOW {windows}"
    ).format(
        exprs=sql.SQL(", ").join(exprs), t=t, p=p, src=src,
        windows=sql.SQL(", ").join(windows), part=layout.target_partition(pair, month),
        cols=sql.SQL(", ").join(map(sql.Identifier, ["ts_utc", "rate", *metric_columns()])),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=28)
    ap.add_argument("--months", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--sql-jobs", type=int, default=4)
    args = ap.parse_args()

    settings = load_settings(schema_name=SCHEMA)
    layout = Layout(SCHEMA)
    pairs = list(REPORT_PAIRS[: args.pairs])
    end = Month(2024, 7)
    for _ in range(args.months - 1):
        end = end.next()
    months = month_range(Month(2024, 7), end)
    url = resolve_url(settings)
    gen = generate(settings, layout, pairs, months[0], months[-1], workers=2)
    print(f"data: {gen.bars:,} bars, {len(pairs)} pairs × {len(months)} months")
    with psycopg.connect(url, autocommit=True) as conn:  # keep autovacuum out of the timings
        conn.execute("VACUUM (ANALYZE)")

    # 1. the backfill, end to end
    backfill(settings, layout, workers=args.workers)  # create targets; warm caches
    run = backfill(settings, layout, workers=args.workers, force=True)
    print(f"bqx backfill: {run.rows_written:,} rows in {run.duration_s:.1f}s = "
          f"{run.rows_per_s:,.0f} rows/s")  # fmt: skip

    # 2. bare COPY of the same rows: computed first, then only TRUNCATE + COPY + COMMIT timed
    params = Params.build(layout, DEFAULT_WINDOWS, "bars", 5)
    cols = ["ts_utc", "rate", *params.columns]
    jobs = [(p, m) for p in pairs for m in months]
    payloads = {}
    with connect(url) as conn, conn.cursor() as cur:
        for pair, month in jobs:
            times, prices = read_series(cur, params, pair, month)
            payloads[(pair, month)] = compute_month(params, month, times, prices)
        conn.commit()
    queue = list(jobs)
    lock = threading.Lock()

    def copier() -> int:
        rows = 0
        with connect(url) as conn:
            while True:
                with lock:
                    if not queue:
                        return rows
                    pair, month = queue.pop()
                out_times, matrix = payloads[(pair, month)]
                part = layout.target_partition(pair, month)
                with conn.transaction(), conn.cursor() as cur:
                    cur.execute(sql.SQL("TRUNCATE {}").format(part))
                    rows += copy_in(cur, part, cols, out_times, matrix)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        copied = sum(pool.map(lambda _: copier(), range(args.workers)))
    copy_s = time.perf_counter() - t0
    copy_rate = copied / copy_s
    print(f"bare binary COPY: {copied:,} rows in {copy_s:.1f}s = {copy_rate:,.0f} rows/s")
    payloads.clear()

    # 3. INSERT … SELECT with SQL window functions, on a few jobs, into the same partitions
    #    and the same way (TRUNCATE + INSERT in one transaction)
    sql_jobs = jobs[: args.sql_jobs]

    def sql_job(job: tuple[str, Month]) -> int:
        pair, month = job
        with psycopg.connect(url) as conn, conn.transaction():
            conn.execute(sql.SQL("TRUNCATE {}").format(layout.target_partition(pair, month)))
            cur = conn.execute(sql_window_insert(layout, pair, month),
                               (month.start, month.end, month.start))  # fmt: skip
            return cur.rowcount

    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.workers) as pool:
        sql_rows = sum(pool.map(sql_job, sql_jobs))
    sql_s = time.perf_counter() - t0
    sql_rate = sql_rows / sql_s
    print(f"INSERT … SELECT with window functions: {sql_rows:,} rows in {sql_s:.1f}s ="
          f" {sql_rate:,.0f} rows/s")  # fmt: skip

    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "workers": args.workers,
        "pairs": len(pairs), "months": len(months), "rows": run.rows_written,
        "backfill_rows_per_s": run.rows_per_s, "backfill_s": run.duration_s,
        "bare_copy_rows_per_s": copy_rate, "sql_window_rows_per_s": sql_rate,
        "backfill_vs_copy": run.rows_per_s / copy_rate,
        "backfill_vs_sql_window": run.rows_per_s / sql_rate,
        "targets": {"backfill_vs_copy": 0.7, "backfill_vs_sql_window": 5},
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backfill.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"| {run.rows_written:,} rows, {args.workers} workers/connections | rows/s | ratio |",
        "|---|---:|---:|",
        f"| bqx backfill (read, compute, write, commit, ledger) | {run.rows_per_s:,.0f} | 1 |",
        f"| bare binary COPY of the same rows | {copy_rate:,.0f} |"
        f" bqx = {result['backfill_vs_copy']:.0%} of it |",
        f"| INSERT … SELECT with SQL window functions | {sql_rate:,.0f} |"
        f" bqx = {result['backfill_vs_sql_window']:.1f}× it |",
    ]
    (RESULTS / "backfill.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
