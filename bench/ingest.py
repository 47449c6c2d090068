"""Ingest throughput and memory: HistData files of 1 M and 5 M lines into PostgreSQL.

    python bench/ingest.py [--lines 1000000 5000000]

Each size is ingested in a fresh process (so its peak RSS is its own) into a fresh schema of
the embedded server under BQX_HOME (default /tmp/bqx-bench), then ingested again (the
idempotent re-load: every bar merged and found unchanged). Reports lines/s end to end (read,
parse, validate, spill, merge into partitions, commit) and the process's peak resident memory,
which should not grow with the file's size. Writes bench/results/ingest.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def write_histdata(path: Path, lines: int, seed: int = 0) -> None:
    """A HistData generic ASCII M1 file: consecutive minutes from 2015-01-01 (EST)."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2015-01-01T00:00", "m")
    with open(path, "w") as f:
        for lo in range(0, lines, 500_000):
            n = min(500_000, lines - lo)
            t = (start + np.arange(lo, lo + n).astype("timedelta64[m]")).astype(datetime)
            c = np.round(1.1 * np.exp(np.cumsum(rng.normal(0, 1e-4, n))), 5)
            f.write("".join(
                f"{x:%Y%m%d %H%M%S};{p:.5f};{p + 0.0001:.5f};{p - 0.0001:.5f};{p:.5f};0\n"
                for x, p in zip(t, c, strict=True)
            ))  # fmt: skip


def child(path: str, schema: str) -> None:
    from bqx.config import load_settings
    from bqx.core.layout import Layout
    from bqx.db import resolve_url
    from bqx.sources.ingest import ingest_files

    settings = load_settings(schema_name=schema)
    t0 = time.perf_counter()
    s = ingest_files(resolve_url(settings), Layout(schema), [path], "EURUSD")
    dt = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    lines = s.accepted + s.rejected + s.duplicates
    print(json.dumps({"lines": lines, "seconds": dt, "peak_rss_mb": peak_kb / 1024,
                      "accepted": s.accepted, "rejected": s.rejected}))  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lines", type=int, nargs="+", default=[1_000_000, 5_000_000])
    ap.add_argument("--child", nargs=2, metavar=("FILE", "SCHEMA"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    env = {**os.environ, "BQX_HOME": os.environ.get("BQX_HOME", "/tmp/bqx-bench")}
    env.pop("BQX_DATABASE_URL", None)
    work = Path(env["BQX_HOME"]) / "ingest-bench"
    work.mkdir(parents=True, exist_ok=True)
    runs = []
    for n in args.lines:
        path = work / f"DAT_ASCII_EURUSD_M1_{n}.csv"
        if not path.exists():
            write_histdata(path, n)
        schema = f"bench_ingest_{n}"
        subprocess.run([sys.executable, "-m", "bqx.cli", "db", "start"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        drop = f"DROP SCHEMA IF EXISTS {schema} CASCADE"  # noqa: S608 - a fixed bench name
        url = subprocess.run(
            [sys.executable, "-m", "bqx.cli", "db", "url", "--show-password"],
            env=env, check=True, capture_output=True, text=True,
        ).stdout.strip()  # fmt: skip
        import psycopg

        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(drop)
        run, again = (
            json.loads(subprocess.run(
                [sys.executable, __file__, "--child", str(path), schema], env=env, check=True,
                capture_output=True, text=True,
            ).stdout.strip().splitlines()[-1])
            for _ in range(2)
        )  # fmt: skip
        run["lines_per_s"] = run["lines"] / run["seconds"]
        run["file_mb"] = path.stat().st_size / 2**20
        run["reingest_seconds"] = again["seconds"]
        run["reingest_lines_per_s"] = again["lines"] / again["seconds"]
        run["reingest_peak_rss_mb"] = again["peak_rss_mb"]
        runs.append(run)
        print(
            f"{n:>10,} lines: {run['lines_per_s']:,.0f} lines/s, peak RSS"
            f" {run['peak_rss_mb']:.0f} MB; re-ingest {run['reingest_lines_per_s']:,.0f} lines/s"
        )
    result = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "runs": runs,
              "target_lines_per_s": 500_000}  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "ingest.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        "| HistData lines | file MB | seconds | lines/s | peak RSS MB |"
        " re-ingest s | re-ingest lines/s | re-ingest peak RSS MB |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    md += [f"| {r['lines']:,} | {r['file_mb']:.0f} | {r['seconds']:.1f} | {r['lines_per_s']:,.0f} |"
           f" {r['peak_rss_mb']:.0f} | {r['reingest_seconds']:.1f} |"
           f" {r['reingest_lines_per_s']:,.0f} | {r['reingest_peak_rss_mb']:.0f} |"
           for r in runs]  # fmt: skip
    md.append(f"\nTarget: ≥ {result['target_lines_per_s']:,} lines/s end to end;"
              f" {os.cpu_count()} CPUs; embedded PostgreSQL on the same machine.")  # fmt: skip
    (RESULTS / "ingest.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
