"""A no-op resume as a whole process: ``bqx backfill`` with every job done and nothing changed.

    python bench/noop.py [--pairs 28] [--start 2024-07] [--end 2025-06] [--repeat 5]

1. ``bqx generate`` the bars (skipped when the scratch database already holds them) and a
   first ``bqx backfill`` so every (pair, month) job is done.
2. Wall time of whole ``bqx backfill`` processes that find nothing to do, with
   ``--source-check exact`` (hashes every bar each job reads) and ``--source-check auto`` (the
   default: compares the per-month versions that bqx's triggers keep). Median of ``--repeat``.
3. Python start-up alone (``python -c 'import bqx.cli'``) and ``bqx --help``, the floor.
4. Still correct: one bar among the last 75 of a month is changed through ``load_bars`` (the
   path of ``bqx ingest``); the auto resume must redo that month and the next.

Data in the embedded server under BQX_HOME (default /tmp/bqx-noop-bench).
Writes bench/results/noop.json and noop.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("BQX_HOME", "/tmp/bqx-noop-bench")
os.environ.pop("BQX_DATABASE_URL", None)

import numpy as np  # noqa: E402
from psycopg import sql  # noqa: E402

from bqx.config import load_settings  # noqa: E402
from bqx.core.layout import Layout
from bqx.core.months import Month  # noqa: E402
from bqx.core.params import Params
from bqx.core.symbols import REPORT_PAIRS
from bqx.db import connect  # noqa: E402
from bqx.metrics import DEFAULT_WINDOWS  # noqa: E402
from bqx.pipeline.plan import plan_backfill  # noqa: E402
from bqx.store import names
from bqx.store.bars import load_bars  # noqa: E402
from common import run  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "bqx.cli"]


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + sys) a process on this machine has used (the server's backend)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def planning_cpu(settings, layout: Layout, pairs: list[str], start: Month, end: Month,
                 check: str, repeat: int) -> dict:  # fmt: skip
    """Client and server CPU seconds of planning alone (a dry run on one connection)."""
    params = Params.build(layout, DEFAULT_WINDOWS, "bars", 5)
    client, server = [], []
    with connect(settings, autocommit=True) as conn:
        pid = conn.info.backend_pid
        for _ in range(repeat):
            c0, s0 = time.process_time(), _proc_cpu(pid)
            plan = plan_backfill(conn, params, pairs, start, end, source_check=check)
            client.append(time.process_time() - c0)
            server.append(_proc_cpu(pid) - s0)
            assert not plan.todo, plan.to_dict()["reasons"]
    return {"client_cpu_s": statistics.median(client), "server_cpu_s": statistics.median(server)}


def timed(args: list[str], repeat: int) -> dict:
    runs = [run(args) for _ in range(repeat)]
    wall = [r[0] for r in runs]
    cpu = [r[2] for r in runs]
    return {"median_s": statistics.median(wall), "min_s": min(wall),
            "cpu_median_s": statistics.median(cpu), "runs": wall}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=28)
    ap.add_argument("--start", default="2024-07")
    ap.add_argument("--end", default="2025-06")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    a = ap.parse_args()
    pairs = ",".join(p.upper() for p in REPORT_PAIRS[: a.pairs])
    scope = ["--pairs", pairs, "--start", a.start, "--end", a.end]
    settings = load_settings()
    layout = Layout(settings.schema_name)

    with connect(settings, autocommit=True) as conn:
        have = conn.execute(
            "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname LIKE 'm1\\_______' AND c.relkind = 'p'",
            (layout.schema,),
        ).fetchone()[0]
    setup: dict = {}
    if have < a.pairs:
        setup["generate_s"] = run([*CLI, "generate", *scope, "--workers", str(a.workers)])[0]
    setup["first_backfill_s"], first, _ = run([*CLI, "backfill", *scope, "--workers",
                                               str(a.workers), "--json"])  # fmt: skip
    setup["first_backfill"] = json.loads(first)

    noop = {
        check: timed([*CLI, "backfill", *scope, "--source-check", check, "--json"], a.repeat)
        for check in ("auto", "exact")
    }
    planning = {
        check: planning_cpu(settings, layout, list(REPORT_PAIRS[: a.pairs]),
                            Month.parse(a.start), Month.parse(a.end), check, a.repeat)
        for check in ("auto", "exact")
    }  # fmt: skip
    floor = {
        "import bqx.cli": timed([sys.executable, "-c", "import bqx.cli"], a.repeat),
        "bqx --help": timed([*CLI, "--help"], a.repeat),
    }
    doc = run([*CLI, "backfill", *scope, "--source-check", "auto", "--json"])[1]
    assert json.loads(doc)["jobs_done"] == 0, doc

    # one bar among the last 75 of the first month changes, through the ingest path
    pair, month = REPORT_PAIRS[0], Month.parse(a.start)
    with connect(settings, autocommit=True) as conn:
        t, o, h, lo, c, v = conn.execute(
            sql.SQL(
                "SELECT time, open, high, low, close, volume FROM {} WHERE time < %s"
                " ORDER BY time DESC OFFSET 10 LIMIT 1"
            ).format(names.source(layout, pair)),
            (month.end,),
        ).fetchone()
        times = np.array([np.datetime64(t.replace(tzinfo=None), "us")])
        load_bars(conn, layout, pair, times, np.array([[o, h * 1.001, lo, c * 1.001, v]]))
    doc = run([*CLI, "backfill", *scope, "--source-check", "auto", "--json"])[1]
    redo = json.loads(doc)
    correct = {"changed_bar": str(t), "pair": pair, "jobs_done": redo["jobs_done"]}
    with connect(settings, autocommit=True) as conn:  # put the bar back, recompute
        load_bars(conn, layout, pair, times, np.array([[o, h, lo, c, v]]))
    run([*CLI, "backfill", *scope, "--source-check", "auto", "--json"])

    jobs = setup["first_backfill"]["jobs_total"]
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "pairs": a.pairs,
        "months": f"{a.start}..{a.end}", "jobs": jobs, "setup": setup, "noop": noop,
        "floor": floor, "planning": planning, "auto_after_one_bar_changed": correct,
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "noop.json").write_text(json.dumps(out, indent=2) + "\n")
    with connect(settings, autocommit=True) as conn:
        bars = conn.execute(
            sql.SQL("SELECT sum(rows_written) FROM {} WHERE status = 'done'").format(
                names.table(layout, "bqx_jobs")
            )
        ).fetchone()[0]
    lines = [
        f"No-op resume, whole `bqx backfill` process, {a.pairs} pairs × {a.start}..{a.end} "
        f"({jobs} jobs done, {bars:,} rows; median of {a.repeat}, 2-core machine shared "
        "with other work)",
        "",
        "| command | wall median s | wall min s | CPU median s (user + sys) |",
        "|---|---:|---:|---:|",
    ]
    for check, r in noop.items():
        lines.append(
            f"| `bqx backfill --source-check {check}` (nothing to do) | {r['median_s']:.2f} |"
            f" {r['min_s']:.2f} | {r['cpu_median_s']:.2f} |"
        )
    for name, r in floor.items():
        lines.append(f"| floor: `{name}` | {r['median_s']:.2f} | {r['min_s']:.2f} |"
                     f" {r['cpu_median_s']:.2f} |")  # fmt: skip
    lines += [
        "",
        "Planning alone (a dry run on one connection, median), CPU seconds, client and server:",
        "",
        "| `--source-check` | client CPU s | server CPU s |",
        "|---|---:|---:|",
        *(
            f"| {c} | {r['client_cpu_s']:.2f} | {r['server_cpu_s']:.2f} |"
            for c, r in planning.items()
        ),
        "",
        "On this machine (2 cores, load average 20-30 from other work during the run) wall time"
        " is CPU time stretched by the load; the CPU columns are the stable figures.",
        "",
        f"After one bar among the last 75 of {pair.upper()} {a.start} was changed through "
        f"`load_bars` (the ingest path), the default (auto) resume redid {correct['jobs_done']} "
        "jobs (that month and the next, whose lookback reads the bar).",
        "",
    ]
    (RESULTS / "noop.md").write_text("\n".join(lines))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
