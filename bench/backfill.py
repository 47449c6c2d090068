"""End-to-end backfill against the bare loads of the same rows into the same server.

    python bench/backfill.py [--pairs 28] [--months 3] [--workers 2] [--rounds 2] [--sql-jobs 4]

Contenders, each timed as a whole on the same server, interleaved over ``--rounds`` rounds
(each keeps its best round):

1. ``bqx backfill --force``: plan, read bars, compute, write, commit, ledger; the whole call.
2. Bare binary COPY FROM STDIN of exactly the rows bqx wrote, into the partitions emptied
   beforehand (tables created earlier: the COPY writes WAL), one and two streams.
3. Per partition TRUNCATE + binary COPY FROM STDIN in one transaction, two streams (under
   ``wal_level=minimal`` the COPY then skips WAL, as bqx's own write does).
4. Per partition TRUNCATE + binary COPY FROM a server-side file in one transaction, two
   streams: no client at all, the strongest bare load.
5. An in-database ``INSERT … SELECT`` computing the same columns with SQL window functions, on
   ``--sql-jobs`` jobs (target: bqx ≥ 8× it).

"The rows bqx wrote" are dumped by the server (``COPY partition TO file``) after a first
backfill, outside the clock. For every contender the CPU-seconds of the server (all its
processes) and of the client (bqx's worker processes, or this process for the peers) are
measured too, so the table shows where the two cores go. Data: ``bqx generate`` bars for the
first N of the report's pairs from 2024-07, in the embedded server under BQX_HOME (default
/tmp/bqx-bench; generated once and reused). Writes bench/results/backfill.json and .md.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("BQX_HOME", "/tmp/bqx-bench")
os.environ.pop("BQX_DATABASE_URL", None)

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bqx.api import Store  # noqa: E402
from bqx.config import load_settings  # noqa: E402
from bqx.core.layout import Layout
from bqx.core.months import (
    Month,
    month_range,  # noqa: E402
)
from bqx.core.params import Params
from bqx.core.symbols import REPORT_PAIRS
from bqx.db import connect, embedded, resolve_url  # noqa: E402
from bqx.metrics import DEFAULT_WINDOWS, metric_columns  # noqa: E402
from bqx.pipeline.plan import preflight  # noqa: E402
from bqx.store import names
from bqx.store.versions import SOURCE_VERSIONS
from common import store_for  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCHEMA = "bench_backfill"
DEFAULT_EXECUTOR = inspect.signature(Store.backfill).parameters["executor"].default
COLS = ["ts_utc", "rate", *metric_columns()]
TICK = os.sysconf("SC_CLK_TCK")


def sql_window_insert(layout: Layout, pair: str, month: Month) -> sql.Composed:
    """The same 37 columns as one INSERT … SELECT with window functions (the usual SQL way),
    into the job's partition."""
    src, t, p = names.source(layout, pair), names.time(layout), names.price(layout)
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
        windows=sql.SQL(", ").join(windows), part=names.target_partition(layout, pair, month),
        cols=sql.SQL(", ").join(map(sql.Identifier, COLS)),
    )  # fmt: skip


# -- CPU accounting ------------------------------------------------------------------------


def server_cpu_s(datadir: Path) -> float:
    """CPU-seconds used so far by the server: its live processes plus its reaped backends."""
    postmaster = int((datadir / "postmaster.pid").read_text().split()[0])
    total = 0.0
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(fields[1])
        if pid == postmaster:
            total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        elif ppid == postmaster:
            total += int(fields[11]) + int(fields[12])
    return total / TICK


def client_cpu_s() -> float:
    """CPU-seconds of this process and of its reaped children (bqx's worker processes)."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def measured(fn: Callable[[], int], datadir: Path) -> dict[str, float]:
    time.sleep(0.5)  # let the server reap backends of connections just closed
    s0, c0, t0 = server_cpu_s(datadir), client_cpu_s(), time.perf_counter()
    rows = fn()
    wall = time.perf_counter() - t0
    return {
        "rows": rows, "s": wall, "rows_per_s": rows / wall,
        "server_cpu_s": server_cpu_s(datadir) - s0, "client_cpu_s": client_cpu_s() - c0,
    }  # fmt: skip


# -- the bare loads ----------------------------------------------------------------------


def parallel(jobs: list, streams: int, one: Callable[[psycopg.Connection, object], int],
             url: str) -> int:  # fmt: skip
    """Run ``one(conn, job)`` for every job on ``streams`` connections; total rows."""
    queue, lock = list(jobs), threading.Lock()

    def stream() -> int:
        rows = 0
        with connect(url) as conn:
            while True:
                with lock:
                    if not queue:
                        return rows
                    job = queue.pop()
                rows += one(conn, job)

    with ThreadPoolExecutor(streams) as pool:
        return sum(pool.map(lambda _: stream(), range(streams)))


def copy_stdin(cur: psycopg.Cursor, part: sql.Composable, path: Path) -> int:
    stmt = sql.SQL("COPY {} ({}) FROM STDIN (FORMAT BINARY)").format(
        part, sql.SQL(", ").join(map(sql.Identifier, COLS))
    )
    with cur.copy(stmt) as copy, open(path, "rb") as f:
        while block := f.read(1 << 20):
            copy.write(block)
    return cur.rowcount


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=28)
    ap.add_argument("--months", type=int, default=3)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sql-jobs", type=int, default=4)
    ap.add_argument("--baseline-src", help="also time the bqx under this src/ (CLI process)")
    args = ap.parse_args()

    settings = load_settings(schema_name=SCHEMA)
    layout = Layout(SCHEMA)
    pairs = list(REPORT_PAIRS[: args.pairs])
    end = Month(2024, 7).plus(args.months - 1)
    months = month_range(Month(2024, 7), end)
    url = resolve_url(settings)
    server = embedded(settings)
    have = _data_present(url, layout, pairs, months)
    if not have:
        with psycopg.connect(url, autocommit=True) as conn:  # the bench's own schema only
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
        gen = store_for(settings, layout).generate(pairs, months[0], months[-1], workers=2)
        print(f"data: {gen.bars:,} bars, {len(pairs)} pairs × {len(months)} months")
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM (ANALYZE)")
        # autovacuum would visit what one contender loaded while the next one is timed:
        # off for the bench (its work is measured explicitly, as first read and VACUUM)
        conn.execute("ALTER SYSTEM SET autovacuum = off")
        conn.execute("SELECT pg_reload_conf()")
    try:
        _bench(args, settings, layout, pairs, months, url, server)
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("ALTER SYSTEM RESET autovacuum")
            conn.execute("SELECT pg_reload_conf()")


def _bench(args, settings, layout, pairs, months, url, server) -> None:
    jobs = [(p, m) for p in pairs for m in months]

    # a first backfill creates the targets; then the server dumps the rows bqx wrote
    store_for(settings, layout).backfill(pairs=pairs, start=months[0], end=months[-1],
             workers=args.workers, force=True)  # fmt: skip
    dump = Path(settings.home_dir) / "bench-copy"
    shutil.rmtree(dump, ignore_errors=True)
    dump.mkdir(parents=True)
    if os.geteuid() == 0:  # the server runs as its own user: it writes, we read
        shutil.chown(dump, "bqx_postgres", "bqx_postgres")
    files = {}
    total_rows = 0
    with psycopg.connect(url, autocommit=True) as conn:
        for pair, month in jobs:
            total_rows += conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
                names.target_partition(layout, pair, month))).fetchone()[0]  # fmt: skip
            files[(pair, month)] = path = dump / f"{pair}_{month.suffix}.bin"
            conn.execute(sql.SQL("COPY {} ({}) TO {} (FORMAT BINARY)").format(
                names.target_partition(layout, pair, month),
                sql.SQL(", ").join(map(sql.Identifier, COLS)), sql.Literal(str(path))))  # fmt: skip

    def run_bqx(executor: str = DEFAULT_EXECUTOR) -> int:
        return store_for(settings, layout).backfill(pairs=pairs, start=months[0], end=months[-1],
                        workers=args.workers, force=True,
                        executor=executor).rows_written  # fmt: skip

    def run_cli(src: str) -> Callable[[], int]:
        """``bqx backfill --force`` as a whole process, with the bqx found under ``src``."""
        env = dict(os.environ, PYTHONPATH=src, BQX_SCHEMA=SCHEMA)
        cmd = [sys.executable, "-m", "bqx.cli", "backfill", "--force", "--json",
               "--pairs", ",".join(pairs), "--start", str(months[0])[:7],
               "--end", str(months[-1])[:7], "--workers", str(args.workers)]  # fmt: skip

        def run() -> int:
            subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, check=True)
            return total_rows

        return run

    def empty_all() -> None:  # outside the clock: the next COPY goes into existing tables
        with psycopg.connect(url, autocommit=True) as conn:
            for pair, month in jobs:
                part = names.target_partition(layout, pair, month)
                conn.execute(sql.SQL("TRUNCATE {}").format(part))
            conn.execute("CHECKPOINT")

    def into_existing(conn: psycopg.Connection, job) -> int:
        with conn.transaction(), conn.cursor() as cur:
            return copy_stdin(cur, names.target_partition(layout, *job), files[job])

    def truncate_stdin(conn: psycopg.Connection, job) -> int:
        part = names.target_partition(layout, *job)
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("TRUNCATE {}").format(part))
            return copy_stdin(cur, part, files[job])

    def truncate_file(conn: psycopg.Connection, job, freeze: bool = False) -> int:
        part = names.target_partition(layout, *job)
        with conn.transaction(), conn.cursor() as cur:
            cur.execute(sql.SQL("TRUNCATE {}").format(part))
            cur.execute(sql.SQL("COPY {} ({}) FROM {} ({})").format(
                part, sql.SQL(", ").join(map(sql.Identifier, COLS)),
                sql.Literal(str(files[job])),
                sql.SQL("FORMAT BINARY, FREEZE" if freeze else "FORMAT BINARY")))  # fmt: skip
            return cur.rowcount

    def read_then_vacuum() -> dict[str, float]:
        """What a load leaves to do: the first full read (hint bits) and a VACUUM."""
        out = {}
        time.sleep(0.5)  # let the server reap backends of connections just closed
        with psycopg.connect(url, autocommit=True) as conn:
            for what, stmt in (("first_read", "SELECT count(*), sum(rate) FROM {}"),
                               ("vacuum", "VACUUM {}")):  # fmt: skip
                s0, t0 = server_cpu_s(server.datadir), time.perf_counter()
                for job in jobs:
                    conn.execute(sql.SQL(stmt).format(names.target_partition(layout, *job)))
                out[f"{what}_s"] = time.perf_counter() - t0
                out[f"{what}_server_cpu_s"] = server_cpu_s(server.datadir) - s0
        return out

    n = args.workers  # streams of the bare loads, workers of bqx
    contenders: dict[str, tuple[Callable[[], None] | None, Callable[[], int]]] = {
        "COPY into existing tables, 1 stream": (
            empty_all, lambda: parallel(jobs, 1, into_existing, url)),
        f"COPY into existing tables, {n} streams": (
            empty_all, lambda: parallel(jobs, n, into_existing, url)),
        f"TRUNCATE + COPY FROM STDIN per partition, {n} streams": (
            None, lambda: parallel(jobs, n, truncate_stdin, url)),
        f"TRUNCATE + COPY FROM server file per partition, {n} streams": (
            None, lambda: parallel(jobs, n, truncate_file, url)),
        f"TRUNCATE + COPY FREEZE FROM server file per partition, {n} streams": (
            None, lambda: parallel(jobs, n, lambda c, j: truncate_file(c, j, True), url)),
        **{f"bqx backfill --force --executor {ex}": (None, lambda ex=ex: run_bqx(ex))
           for ex in ("local", "threads") if ex != DEFAULT_EXECUTOR},
        "bqx backfill --force": (None, run_bqx),  # last: leaves the targets as bqx wrote them
    }  # fmt: skip
    if args.baseline_src:  # an earlier bqx, as a whole process, and this one the same way
        contenders[f"bqx before ({args.baseline_src}), CLI process"] = (
            None,
            run_cli(args.baseline_src),
        )
        contenders["bqx backfill --force, CLI process"] = (
            None,
            run_cli(str(Path(__file__).resolve().parent.parent / "src")),
        )
        contenders["bqx backfill --force"] = contenders.pop("bqx backfill --force")
    best: dict[str, dict[str, float]] = {}
    for rnd in range(args.rounds):
        for name, (prepare, fn) in contenders.items():
            if prepare is not None:
                prepare()
            with psycopg.connect(url, autocommit=True) as conn:
                conn.execute("CHECKPOINT")  # each starts from the same clean state
            m = measured(fn, server.datadir)
            print(f"round {rnd + 1}: {name}: {m['rows']:,} rows in {m['s']:.2f}s ="
                  f" {m['rows_per_s']:,.0f} rows/s (server {m['server_cpu_s']:.1f} CPU-s,"
                  f" client {m['client_cpu_s']:.1f} CPU-s)", flush=True)  # fmt: skip
            if "server file" in name or name.startswith("bqx backfill --force"):
                m.update(read_then_vacuum())
                print(f"  then: first read {m['first_read_s']:.2f}s, vacuum {m['vacuum_s']:.2f}s")
            if name not in best or m["s"] < best[name]["s"]:
                best[name] = m
    shutil.rmtree(dump, ignore_errors=True)

    # in-database INSERT … SELECT with SQL window functions, on a few jobs
    sql_jobs = jobs[: args.sql_jobs]

    def sql_job(job: tuple[str, Month]) -> int:
        pair, month = job
        with psycopg.connect(url) as conn, conn.transaction():
            conn.execute(sql.SQL("TRUNCATE {}").format(names.target_partition(layout, pair, month)))
            cur = conn.execute(sql_window_insert(layout, pair, month),
                               (month.start, month.end, month.start))  # fmt: skip
            return cur.rowcount

    def sql_all() -> int:
        with ThreadPoolExecutor(args.workers) as pool:
            return sum(pool.map(sql_job, sql_jobs))

    sql_m = measured(sql_all, server.datadir)

    # what bqx's planning alone costs (checks, partitions, source signatures of every month)
    params = Params.build(layout, DEFAULT_WINDOWS, "bars", 5)
    with connect(url, autocommit=True) as conn:
        plan_m = measured(
            lambda: len(preflight(conn, params, pairs, months[0], months[-1], url)), server.datadir
        )
    run_bqx()  # the targets as bqx writes them again

    bqx = best["bqx backfill --force"]  # as a user runs it: the default executor
    peers = {k: v for k, v in best.items() if not k.startswith("bqx")}
    strongest = max(peers, key=lambda k: peers[k]["rows_per_s"])
    ratio = bqx["rows_per_s"] / peers[strongest]["rows_per_s"]
    cores = os.cpu_count() or 1
    # the floor: bqx's measured CPU-seconds (server + client) spread over every core
    floor_s = (bqx["server_cpu_s"] + bqx["client_cpu_s"]) / cores
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "workers": args.workers,
        "pairs": len(pairs), "months": len(months), "rounds": args.rounds, "cores": cores,
        "contenders": best, "sql_window": sql_m, "planning": plan_m, "strongest_peer": strongest,
        "backfill_vs_strongest": ratio,
        "backfill_vs_sql_window": bqx["rows_per_s"] / sql_m["rows_per_s"],
        "bqx_cpu_floor_s": floor_s,
        "targets": {"backfill_vs_strongest": 0.85, "backfill_vs_sql_window": 8},
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "backfill.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"{bqx['rows']:,} rows ({len(pairs)} pairs × {len(months)} months), {args.workers}"
        f" workers/streams, {cores} cores, best of {args.rounds} interleaved rounds:",
        "",
        "| contender | s | rows/s | bqx / it | server CPU-s | client CPU-s |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, m in sorted(best.items(), key=lambda kv: -kv[1]["rows_per_s"]):
        md.append(f"| {name} | {m['s']:.2f} | {m['rows_per_s']:,.0f} |"
                  f" {bqx['rows_per_s'] / m['rows_per_s']:.2f} | {m['server_cpu_s']:.1f} |"
                  f" {m['client_cpu_s']:.1f} |")  # fmt: skip
    md.append(f"| INSERT … SELECT with SQL window functions ({len(sql_jobs)} jobs) |"
              f" {sql_m['s']:.2f} | {sql_m['rows_per_s']:,.0f} |"
              f" {result['backfill_vs_sql_window']:.1f} | {sql_m['server_cpu_s']:.1f} |"
              f" {sql_m['client_cpu_s']:.1f} |")  # fmt: skip
    md.append(f"| of bqx: planning alone (checks, partitions, source signatures) |"
              f" {plan_m['s']:.2f} | | | {plan_m['server_cpu_s']:.1f} |"
              f" {plan_m['client_cpu_s']:.1f} |")  # fmt: skip
    md += [
        "",
        "What a load leaves to do afterwards (all target partitions, one connection):",
        "",
        "| after | first full read s (server CPU-s) | VACUUM s (server CPU-s) |",
        "|---|---:|---:|",
        *(
            f"| {name} | {m['first_read_s']:.2f} ({m['first_read_server_cpu_s']:.1f}) |"
            f" {m['vacuum_s']:.2f} ({m['vacuum_server_cpu_s']:.1f}) |"
            for name, m in best.items()
            if "first_read_s" in m
        ),
    ]
    md += [
        "",
        f"**bqx = {ratio:.2f} of the strongest bare load ({strongest})** (target ≥ 0.85;"
        f" `bqx backfill --force` runs the default executor, {DEFAULT_EXECUTOR}).",
        f"bqx's own CPU-seconds, server {bqx['server_cpu_s']:.1f} + client"
        f" {bqx['client_cpu_s']:.1f}, spread over {cores} cores: a floor of {floor_s:.2f} s"
        f" ({bqx['rows'] / floor_s:,.0f} rows/s) for this work on this machine.",
    ]
    (RESULTS / "backfill.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def _data_present(url: str, layout: Layout, pairs: list[str], months: list[Month]) -> bool:
    """Whether every pair's source holds bars in the first and the last month (generated
    before: the generator is seeded, so the data would be the same), written by a bqx that
    records source versions (else planning would hash every bar, as for a foreign table)."""
    with psycopg.connect(url, autocommit=True) as conn:
        versions = sql.Identifier(layout.schema, SOURCE_VERSIONS).as_string(conn)
        if conn.execute("SELECT to_regclass(%s)", (versions,)).fetchone()[0] is None:
            return False
        for pair in pairs:
            for month in (months[0], months[-1]):
                try:
                    row = conn.execute(
                        sql.SQL("SELECT EXISTS (SELECT 1 FROM {} WHERE {} >= %s AND {} < %s)")
                        .format(names.source(layout, pair), names.time(layout), names.time(layout)),
                        (month.start, month.end),
                    ).fetchone()  # fmt: skip
                except psycopg.errors.UndefinedTable:
                    return False
                if not row[0]:
                    return False
    return True


if __name__ == "__main__":
    main()
