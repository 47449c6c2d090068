"""Backfill rows/s by executor on the same data: threads, processes, Dask LocalClusters, a cluster.

    python bench/scaling.py [--pairs 8] [--months 2] [--scheduler tcp://HOST:PORT]

Every run is ``backfill --force`` over the same bars in the embedded server under BQX_HOME
(default /tmp/bqx-scaling): 1 and 2 worker threads, 1 and 2 worker processes, a LocalCluster
of 1 and of 2 Dask workers that bqx starts (its start-up counted), and with ``--scheduler`` an
existing cluster started with Dask's own commands (docs/scaling.md shows them). Two rates per
run:

- end to end: rows / the run's duration in the ledger (includes starting workers or a cluster);
- in jobs: rows / (last job end - first job start), the rate once workers are running.

Writes bench/results/scaling.json and the table of .md (an existing-cluster row is merged into
them); docs/scaling.md has the commands that started the existing cluster.
"""

from __future__ import annotations

import argparse
import json
import os
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("BQX_HOME", "/tmp/bqx-scaling")
os.environ.pop("BQX_DATABASE_URL", None)

import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bqx.config import load_settings  # noqa: E402
from bqx.core.layout import Layout
from bqx.core.months import (
    Month,
    month_range,  # noqa: E402
)
from bqx.core.symbols import REPORT_PAIRS
from bqx.db import resolve_url  # noqa: E402
from bqx.store import names
from common import store_for  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCHEMA = "bench_scaling"


def in_jobs_rate(url: str, layout: Layout, run_id: int) -> float:
    """Rows per second between the first job's start and the last job's end."""
    with psycopg.connect(url) as conn:
        rows, span = conn.execute(
            sql.SQL(
                "SELECT sum(rows_written), extract(epoch FROM max(finished_at) - min(started_at))"
                " FROM {} WHERE run_id = %s AND status = 'done'"
            ).format(names.table(layout, "bqx_attempts")),
            (run_id,),
        ).fetchone()
    return float(rows) / float(span) if span else 0.0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--months", type=int, default=2)
    ap.add_argument("--scheduler", help="also run on this existing Dask cluster")
    ap.add_argument("--only-scheduler", action="store_true", help="only the --scheduler run")
    args = ap.parse_args()

    settings = load_settings(schema_name=SCHEMA)
    layout = Layout(SCHEMA)
    pairs = list(REPORT_PAIRS[: args.pairs])
    end = Month(2024, 7).plus(args.months - 1)
    months = month_range(Month(2024, 7), end)
    url = resolve_url(settings)
    with psycopg.connect(url) as conn:
        have = conn.execute("SELECT to_regclass(%s)", (f"{SCHEMA}.m1_{pairs[-1]}",)).fetchone()[0]
    if have is None:
        gen = store_for(settings, layout).generate(pairs, months[0], months[-1], workers=2)
        print(f"data: {gen.bars:,} bars, {len(pairs)} pairs × {len(months)} months")
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute("VACUUM (ANALYZE)")
        store_for(settings, layout).backfill(workers=2)  # targets created, caches warm

    runs: list[tuple[str, dict]] = []
    if not args.only_scheduler:
        runs += [
            ("threads (default), 1 worker", {"workers": 1, "executor": "threads"}),
            ("threads (default), 2 workers", {"workers": 2, "executor": "threads"}),
            ("local processes, 1 worker", {"workers": 1, "executor": "local"}),
            ("local processes, 2 workers", {"workers": 2, "executor": "local"}),
            ("LocalCluster, 1 Dask worker", {"workers": 1, "executor": "dask"}),
            ("LocalCluster, 2 Dask workers", {"workers": 2, "executor": "dask"}),
        ]
    if args.scheduler:
        runs.append(("existing cluster (dask scheduler + 2 dask workers)",
                     {"workers": 2, "executor": "dask", "scheduler": args.scheduler}))  # fmt: skip
    out = json.loads((RESULTS / "scaling.json").read_text()) if args.only_scheduler else {}
    rows_by_run = out.get("runs", {})
    for label, kw in runs:
        run = store_for(settings, layout).backfill(force=True, **kw)
        assert run.jobs_failed == 0, run.failures
        rate = in_jobs_rate(url, layout, run.run_id)
        rows_by_run[label] = {
            "rows": run.rows_written, "seconds": run.duration_s,
            "rows_per_s": run.rows_per_s, "in_jobs_rows_per_s": rate,
        }  # fmt: skip
        print(f"{label}: {run.rows_written:,} rows in {run.duration_s:.1f}s ="
              f" {run.rows_per_s:,.0f} rows/s end to end, {rate:,.0f} rows/s in jobs")  # fmt: skip

    out.update(
        when=datetime.now(UTC).isoformat(timespec="seconds"), pairs=len(pairs),
        months=len(months), cpus=os.cpu_count(), load_avg=os.getloadavg()[0], runs=rows_by_run,
    )  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(out, indent=2) + "\n")
    first = next(iter(rows_by_run.values()))
    md = [
        f"{first['rows']:,} rows ({len(pairs)} pairs × {len(months)} months), embedded PostgreSQL,"
        f" {os.cpu_count()} CPUs, load average {out['load_avg']:.1f} at the end.",
        "",
        "| executor | seconds | rows/s end to end | rows/s in jobs |",
        "|---|---:|---:|---:|",
    ]
    for label, r in rows_by_run.items():
        md.append(f"| {label} | {r['seconds']:.1f} | {r['rows_per_s']:,.0f} |"
                  f" {r['in_jobs_rows_per_s']:,.0f} |")  # fmt: skip
    (RESULTS / "scaling.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
