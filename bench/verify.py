"""`bqx verify --full` against the bare read of the same tables, and what each command costs as
the store grows, all in one session.

    python bench/verify.py [--pairs 28] [--start 2020-07] [--end 2025-06] [--workers 2]
                           [--repeat 3] [--skip-force]

1. The store: ``bqx generate`` and ``bqx backfill`` of ``--pairs`` × ``--start..--end``
   (skipped when the scratch database already holds it), in schema ``bqx``.
2. The bare read: a binary COPY of every stored metric row (every column) to nowhere, the
   months spread over ``--workers`` connections, as the peer of ``verify --full`` (which also
   reads each month's bars, recomputes it with the kernel and compares every value).
3. ``bqx verify --full --workers N`` as a whole process; then plain ``bqx verify`` after
   nothing changed (it reads what moved: nothing).
4. The commands table at this size: ``backfill --force`` (once, unless ``--skip-force``), a
   no-op ``backfill``, ``backfill --dry-run --json``, ``status --json``, a no-op ``update``,
   plain ``verify`` and ``report``, as whole processes (median of ``--repeat``).
5. How the cheap commands grow with the number of jobs: the same commands on a store of 28
   pairs × 12 months (336 jobs) in schema ``small``, and on one of 28 pairs × 240 months with
   100 bars a month (6,720 jobs of little data: it measures the per-job costs, not reading
   bars) in schema ``wide``.

Data in the embedded server under BQX_HOME (default: a directory under the system's temp).
Writes bench/results/verify.json and verify.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("BQX_HOME", str(Path(tempfile.gettempdir()) / "bqx-verify-bench"))
os.environ.pop("BQX_DATABASE_URL", None)
os.environ.pop("BQX_SCHEMA", None)

import numpy as np  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bqx.config import load_settings  # noqa: E402
from bqx.core.layout import Layout  # noqa: E402
from bqx.core.months import Month  # noqa: E402
from bqx.core.symbols import REPORT_PAIRS  # noqa: E402
from bqx.db import connect  # noqa: E402
from bqx.db.connect import database_ref  # noqa: E402
from bqx.metrics import metric_columns  # noqa: E402
from bqx.store import names  # noqa: E402
from bqx.store.bars import load_bars  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "bqx.cli"]


def run(args: list[str], schema: str, ok: tuple[int, ...] = (0,)) -> tuple[float, str]:
    """(wall seconds, stdout) of a whole process."""
    env = {**os.environ, "BQX_SCHEMA": schema}
    t0 = time.perf_counter()
    res = subprocess.run(args, capture_output=True, text=True, timeout=7200, env=env)
    dt = time.perf_counter() - t0
    if res.returncode not in ok:
        raise SystemExit(f"{' '.join(args)} failed ({res.returncode}): {res.stderr.strip()}")
    return dt, res.stdout.strip()


def timed(args: list[str], schema: str, repeat: int, ok: tuple[int, ...] = (0,)) -> dict:
    wall = [run(args, schema, ok)[0] for _ in range(repeat)]
    return {"median_s": statistics.median(wall), "min_s": min(wall), "runs": wall}


def months_of(conn: psycopg.Connection, layout: Layout) -> list[tuple[str, Month]]:
    rows = conn.execute(
        sql.SQL("SELECT pair, month FROM {} WHERE status = 'done' ORDER BY 1, 2").format(
            names.table(layout, "bqx_jobs")
        )
    ).fetchall()
    return [(p, Month.of(m)) for p, m in rows]


def bare_read(settings, layout: Layout, workers: int) -> dict:
    """Every stored metric row, every column, through binary COPY to nowhere, the months
    spread over ``workers`` connections: the floor any check that reads every value pays."""
    cols = ["ts_utc", "rate", *metric_columns()]
    with connect(settings, autocommit=True) as conn:
        jobs = months_of(conn, layout)
    ref = database_ref(settings)

    def read(chunk: list[tuple[str, Month]]) -> tuple[int, int]:
        rows = nbytes = 0
        with connect(ref, autocommit=True) as conn, conn.cursor() as cur:
            for pair, month in chunk:
                q = sql.SQL("COPY (SELECT {} FROM {} WHERE ts_utc >= %s AND ts_utc < %s) TO"
                            " STDOUT (FORMAT BINARY)").format(
                    sql.SQL(", ").join(map(sql.Identifier, cols)), names.target(layout, pair)
                )  # fmt: skip
                with cur.copy(q, (month.start, month.end)) as copy:
                    for block in copy:
                        rows += 1
                        nbytes += len(block)
        return rows, nbytes

    chunks = [jobs[i::workers] for i in range(workers)]
    t0 = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        got = list(pool.map(read, chunks))
    dt = time.perf_counter() - t0
    rows = sum(r for r, _ in got)  # COPY messages: one per row (and the trailer)
    return {"seconds": dt, "months": len(jobs), "copy_messages": rows,
            "bytes": sum(b for _, b in got), "workers": workers}  # fmt: skip


def wide_store(settings, schema: str, pairs: list[str], months: int, bars: int) -> None:
    """``months`` months of ``bars`` bars each per pair, ending 2024-06: many jobs, little
    data (the per-job costs)."""
    layout = Layout(schema)
    first = Month(2024, 6)
    for _ in range(months - 1):
        first = first.prev()
    rng = np.random.default_rng(7)
    with connect(settings, autocommit=True) as conn:
        for pair in pairs:
            ts, px = [], []
            m = first
            for _ in range(months):
                start = np.datetime64(m.start.replace(tzinfo=None), "m") + np.timedelta64(
                    2 * 1440, "m"
                )  # the 3rd of the month, clear of weekends' edges being irrelevant here
                ts.append(start + np.arange(bars).astype("timedelta64[m]"))
                px.append(1.1 * np.exp(np.cumsum(rng.normal(0, 1e-4, bars))))
                m = m.next()
            times = np.concatenate(ts).astype("datetime64[us]")
            close = np.round(np.concatenate(px), 5)
            ohlcv = np.column_stack([close, close, close, close, np.ones_like(close)])
            load_bars(conn, layout, pair, times, ohlcv, mode="replace")


def commands(schema: str, repeat: int, scratch: Path) -> dict:
    out_dir = scratch / f"report-{schema}"
    return {
        "no-op backfill": timed([*CLI, "backfill", "--json"], schema, repeat),
        "backfill --dry-run --json": timed(
            [*CLI, "backfill", "--dry-run", "--json"], schema, repeat
        ),  # fmt: skip
        "status --json": timed([*CLI, "status", "--json"], schema, repeat),
        "no-op update": timed([*CLI, "update", "--json"], schema, repeat),
        "verify (nothing changed)": timed([*CLI, "verify", "--json"], schema, repeat),
        "report": timed([*CLI, "report", "--out", str(out_dir)], schema, repeat),
    }


def jobs_in(settings, schema: str) -> tuple[int, int]:
    with connect(settings, autocommit=True) as conn:
        row = conn.execute(
            sql.SQL(
                "SELECT count(*), coalesce(sum(rows_written), 0) FROM {} WHERE status = 'done'"
            ).format(names.table(Layout(schema), "bqx_jobs"))  # fmt: skip
        ).fetchone()
    return int(row[0]), int(row[1])


def has_jobs(settings, schema: str) -> bool:
    with connect(settings, autocommit=True) as conn:
        row = conn.execute("SELECT to_regclass(%s)", (f"{schema}.bqx_jobs",)).fetchone()
    return row[0] is not None and jobs_in(settings, schema)[0] > 0


def write(
    a: argparse.Namespace,
    jobs: int,
    rows: int,
    setup: dict,
    bare: dict,
    bare2: dict,
    full: tuple[float, str],
    full_doc: dict,
    plain: dict,
    table: dict,
    scales: dict,
) -> None:
    """bench/results/verify.json and verify.md (again as each part is measured)."""
    read_s = min(bare["seconds"], bare2["seconds"])
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "pairs": a.pairs,
        "months": f"{a.start}..{a.end}", "jobs": jobs, "rows": rows, "workers": a.workers,
        "setup": setup, "bare_read": [bare, bare2], "verify_full_s": full[0],
        "verify_full_ratio": full[0] / read_s, "verify_plain": plain,
        "values_checked": next(c["counts"] for c in full_doc["checks"] if c["name"] == "values"),
        "commands": table, "scales": scales,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "verify.json").write_text(json.dumps(out, indent=2) + "\n")
    lines = [
        f"# verify and the commands at {a.pairs} pairs × {a.start}..{a.end}",
        "",
        f"{jobs:,} jobs, {rows:,} rows, {a.workers} workers, one session on a 2-core machine"
        " shared with other work. Whole processes, wall time.",
        "",
        "| what | seconds | vs the bare read |",
        "|---|---:|---:|",
        f"| bare binary COPY of every metric row, every column, to nowhere ({a.workers}"
        f" connections; best of 2) | {read_s:.1f} | 1.00 |",
        f"| `bqx verify --full --workers {a.workers}` (reads bars and metrics, recomputes,"
        f" compares every value bit for bit) | {full[0]:.1f} | {full[0] / read_s:.2f} |",
        f"| `bqx verify` after nothing changed (median of {a.repeat}) |"
        f" {plain['median_s']:.2f} | |",
        "",
        f"## The commands at this size (median of {a.repeat})",
        "",
        "| command | median s | min s |",
        "|---|---:|---:|",
        *(f"| `bqx {k}` | {v['median_s']:.2f} | {v['min_s']:.2f} |" for k, v in table.items()),
        "",
    ]
    if scales:
        names_ = list(next(iter(scales.values()))["commands"])
        lines += [
            "## How the cheap commands grow with the jobs",
            "",
            "`wide` holds 100 bars a month: it measures what each job costs to plan, list,"
            " check and report, not reading bars.",
            "",
            "| command | " + " | ".join(f"{s['jobs']:,} jobs ({k})" for k, s in scales.items())
            + " |",
            "|---|" + "---:|" * len(scales),
            *(
                f"| `bqx {c}` | " + " | ".join(
                    f"{s['commands'][c]['median_s']:.2f}" for s in scales.values()) + " |"
                for c in names_
            ),
            "",
        ]  # fmt: skip
    (RESULTS / "verify.md").write_text("\n".join(lines))
    print("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=28)
    ap.add_argument("--start", default="2020-07")
    ap.add_argument("--end", default="2025-06")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--skip-force", action="store_true")
    ap.add_argument("--skip-scales", action="store_true")
    ap.add_argument(
        "--keep",
        action="store_true",
        help="keep the big store when measuring the smaller ones (needs the disk"
        " for both: about 480 bytes per bar)",
    )
    ap.add_argument(
        "--scales-only",
        action="store_true",
        help="keep the big store's figures from bench/results/verify.json and measure only how"
        " the cheap commands grow (336 and 6,720 jobs)",
    )
    a = ap.parse_args()
    pairs = [p.upper() for p in REPORT_PAIRS[: a.pairs]]
    settings = load_settings()
    scratch = Path(os.environ["BQX_HOME"])
    w = str(a.workers)
    setup: dict = {}
    big = "bqx"
    if a.scales_only:
        prev = json.loads((RESULTS / "verify.json").read_text())
        full_doc = {"checks": [{"name": "values", "counts": prev["values_checked"]}]}
        big_scale = {"jobs": prev["jobs"], "rows": prev["rows"], "commands": prev["commands"]}
        scales = measure_scales(settings, a, pairs, scratch, big_scale)
        write(a, prev["jobs"], prev["rows"], prev["setup"], *prev["bare_read"],
              (prev["verify_full_s"], ""), full_doc, prev["verify_plain"], prev["commands"],
              scales)  # fmt: skip
        return
    if not has_jobs(settings, big):
        setup["generate_s"] = run([*CLI, "generate", "--pairs", ",".join(pairs), "--start",
                                   a.start, "--end", a.end, "--workers", w], big)[0]  # fmt: skip
        setup["first_backfill_s"] = run([*CLI, "backfill", "--workers", w], big)[0]
    jobs, rows = jobs_in(settings, big)
    print(f"store: {jobs} jobs, {rows:,} rows", flush=True)

    bare = bare_read(settings, Layout(big), a.workers)
    print(f"bare read: {bare['seconds']:.1f} s", flush=True)
    full = run([*CLI, "verify", "--full", "--workers", w, "--json"], big)
    full_doc = json.loads(full[1])
    assert full_doc["ok"], [c["detail"] for c in full_doc["checks"] if not c["ok"]]
    print(f"verify --full: {full[0]:.1f} s", flush=True)
    bare2 = bare_read(settings, Layout(big), a.workers)  # again, after: the cache is as warm
    plain = timed([*CLI, "verify", "--json"], big, a.repeat)
    table = commands(big, a.repeat, scratch)
    if not a.skip_force:
        table["backfill --force"] = timed([*CLI, "backfill", "--force", "--workers", w], big, 1)
    scales: dict = {}
    big_scale = {"jobs": jobs, "rows": rows, "commands": table}
    write(a, jobs, rows, setup, bare, bare2, full, full_doc, plain, table, {})
    if not a.skip_scales and not a.keep:  # the disk holds one big store at a time
        for pair in pairs:  # a pair at a time: one DROP SCHEMA would need a lock per partition
            run([*CLI, "drop", "--pair", pair, "--yes"], big)
        with connect(settings, autocommit=True) as conn:
            conn.execute("CHECKPOINT")
    if not a.skip_scales:
        scales = measure_scales(settings, a, pairs, scratch, big_scale)
    write(a, jobs, rows, setup, bare, bare2, full, full_doc, plain, table, scales)


def measure_scales(
    settings, a: argparse.Namespace, pairs: list[str], scratch: Path, big_scale: dict
) -> dict:
    """The cheap commands at 336 jobs (28 pairs x 12 months) and 6,720 (x 240 months of 100
    bars), beside the big store's."""
    w = str(a.workers)
    small = "small"
    if not has_jobs(settings, small):
        run([*CLI, "generate", "--pairs", ",".join(pairs), "--start", "2024-07", "--end",
             "2025-06", "--workers", w], small)  # fmt: skip
        run([*CLI, "backfill", "--workers", w], small)
    wide = "wide"
    if not has_jobs(settings, wide):
        wide_store(settings, wide, [p.lower() for p in pairs], 240, 100)
        run([*CLI, "backfill", "--workers", w], wide)
    scales: dict = {}
    for schema in (small, "bqx", wide):
        if schema == "bqx":
            scales[schema] = big_scale
            continue
        n, r = jobs_in(settings, schema)
        scales[schema] = {"jobs": n, "rows": r,
                          "commands": commands(schema, a.repeat, scratch)}  # fmt: skip
    return scales


if __name__ == "__main__":
    main()
