"""Backfill into PostgreSQL, a local Delta table and an S3 protocol server, side by side.

    python bench/lake.py [--pairs 6] [--months 12] [--workers 2] [--rounds 2]

The same bars (``bqx generate``, the first N of the report's pairs from 2024-07, in the
embedded server under BQX_HOME, default /tmp/bqx-bench-lake; generated once and reused), in
one session, interleaved over ``--rounds`` rounds (each destination keeps its best round):

1. ``backfill --force`` into the database's partitions (schema ``bench_lake_pg``);
2. ``backfill --force --sink DIR``: a local Delta table, emptied before each round;
3. ``backfill --force --sink s3://…``: the same on moto's S3 server on 127.0.0.1 (a real
   HTTP server in this process: every commit and file goes through the S3 protocol).

Per run the CPU-seconds of the server (its processes) and of this process (bqx's worker
threads, delta-rs's threads and, for S3, moto's server) are taken too; after the database's
run its metric tables are vacuumed, and that CPU counted, as autovacuum would do it moments
later (it would otherwise land in the next run's figures). ``rows / (CPU-s / cores)`` is the
rate the run would reach with the cores to itself: on a machine shared with other work (the
load average is recorded) it is the comparison that holds.

Each is the whole call: plan, read bars, compute, write, commit, ledger. Then, per
destination: bytes per bar (PostgreSQL: the target partitions with their index and TOAST;
Delta: every data and log file of the table) and rows/s reading one pair-year back into
Arrow (``Store.read_metrics`` for each; for Delta also ``DeltaTable.to_pyarrow_table`` and
``polars.scan_delta``). Writes bench/results/lake.json and lake.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import time
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("BQX_HOME", "/tmp/bqx-bench-lake")
os.environ.pop("BQX_DATABASE_URL", None)

import psycopg  # noqa: E402

from backfill import client_cpu_s, server_cpu_s  # noqa: E402
from bqx.api import Store  # noqa: E402
from bqx.config import load_settings  # noqa: E402
from bqx.core.months import Month, month_range  # noqa: E402
from bqx.core.symbols import REPORT_PAIRS  # noqa: E402
from bqx.core.uris import LakeURI  # noqa: E402
from bqx.db import embedded, resolve_url  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
BARS = "bench_lake"  # the schema holding the bars every destination reads
SCRATCH = Path(os.environ["BQX_HOME"]) / "lake"


def s3_server() -> tuple[object, str]:
    """moto's S3 server on a free loopback port, with a bucket; (server, endpoint)."""
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{port}"
    os.environ.update(AWS_ENDPOINT_URL=url, AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_REGION="us-east-1")  # fmt: skip
    import boto3

    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bqx-bench")
    return server, url


def pg_bytes(url: str, schema: str) -> int:
    """The metric partitions of a schema with their index and TOAST."""
    with psycopg.connect(url) as conn:
        row = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
            " AND c.relkind = 'r' AND c.relname LIKE 'bqx\\_%%\\_%%m%%'",
            (schema,),
        ).fetchone()
    return int(row[0]) if row else 0


def vacuum(url: str, schema: str) -> float:
    """VACUUM the metric tables of a schema (what autovacuum would do to freshly loaded
    partitions a little later); the server CPU-seconds it took."""
    datadir = embedded(load_settings(schema_name=schema)).datadir
    s0 = server_cpu_s(datadir)
    with psycopg.connect(url, autocommit=True) as conn:
        tables = [
            r[0]
            for r in conn.execute(
                "SELECT format('%%I.%%I', n.nspname, c.relname) FROM pg_class c JOIN pg_namespace n"
                " ON n.oid = c.relnamespace WHERE n.nspname = %s AND c.relkind = 'p'",
                (schema,),
            )
        ]
        for table in tables:
            conn.execute(f"VACUUM {table}")  # noqa: S608 - names from the catalog, quoted
    return server_cpu_s(datadir) - s0


def lake_bytes(uri: str) -> int:
    """Every file of a Delta table (data and log) on the disk or the S3 server."""
    import pyarrow.fs as pafs

    fs, root = LakeURI.parse(uri).filesystem()
    infos = fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
    return sum(i.size for i in infos if i.type == pafs.FileType.File)


def clear(uri: str) -> None:
    import pyarrow.fs as pafs

    fs, root = LakeURI.parse(uri).filesystem()
    if fs.get_file_info(root).type != pafs.FileType.NotFound:
        fs.delete_dir_contents(root, missing_dir_ok=True)


def timed(fn):  # noqa: ANN001, ANN201 - a tiny helper
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def read_back(store: Store, sink: str | None, pair: str, first: Month, last: Month) -> dict:
    """rows/s of one pair-year read into Arrow, best of three."""
    lo, hi = first.start, last.end
    out: dict[str, float] = {}
    readers = {"read_metrics": lambda: store.read_metrics(pair, lo, hi)}
    if sink is not None:
        import deltalake
        import polars as pl

        lake = LakeURI.parse(sink)
        opts = lake.storage_options()
        filt = [("pair", "=", pair.upper())]
        readers["deltalake to_pyarrow_table"] = lambda: deltalake.DeltaTable(
            lake.uri, storage_options=opts).to_pyarrow_table(filters=filt)  # fmt: skip
        readers["polars scan_delta"] = lambda: pl.scan_delta(
            lake.uri, storage_options=opts or None).filter(
            pl.col("pair") == pair.upper()).collect().to_arrow()  # fmt: skip
    for name, fn in readers.items():
        best = float("inf")
        rows = 0
        for _ in range(3):
            table, s = timed(fn)
            rows, best = table.num_rows, min(best, s)
        out[name] = rows / best
        out[name + " rows"] = rows
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=6)
    ap.add_argument("--months", type=int, default=12)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    pairs = list(REPORT_PAIRS[: args.pairs])
    first = Month(2024, 7)
    last = first.plus(args.months - 1)
    months = month_range(first, last)
    settings = load_settings(schema_name=BARS)
    url = resolve_url(settings)
    with psycopg.connect(url) as conn:
        have = conn.execute("SELECT to_regclass(%s)", (f"{BARS}.m1_{pairs[-1]}",)).fetchone()[0]
    bars_store = Store(settings)
    if have is None:
        gen = bars_store.generate(pairs, first, last, workers=2)
        print(f"data: {gen.bars:,} bars, {len(pairs)} pairs × {len(months)} months")
    datadir = embedded(settings).datadir
    server, endpoint = s3_server()
    source = f"{BARS}.m1_{{pair}}"
    local = str(SCRATCH / "metrics")
    remote = "s3://bqx-bench/metrics"
    dests = {
        "PostgreSQL partitions": ("bench_lake_pg", None),
        "Delta, local disk": ("bench_lake_delta", local),
        "Delta, S3 server (moto)": ("bench_lake_s3", remote),
    }
    stores = {k: Store(settings, schema=s, source_table=source) for k, (s, _) in dests.items()}
    results: dict[str, dict] = {k: {"seconds": float("inf")} for k in dests}
    try:
        for rnd in range(args.rounds):
            for label, (_schema, sink) in dests.items():
                if sink is not None:
                    clear(sink)
                s0, c0 = server_cpu_s(datadir), client_cpu_s()
                run = stores[label].backfill(pairs, first, last, workers=args.workers,
                                             force=True, sink=sink)  # fmt: skip
                server_s, client_s = server_cpu_s(datadir) - s0, client_cpu_s() - c0
                if sink is None:  # the vacuum the database owes its new rows, counted now
                    server_s += vacuum(url, _schema)  # rather than in the next round's figures
                assert run.jobs_failed == 0, run.failures
                print(f"round {rnd + 1} {label}: {run.rows_written:,} rows in"
                      f" {run.duration_s:.1f}s = {run.rows_per_s:,.0f} rows/s (server"
                      f" {server_s:.1f}, client {client_s:.1f} CPU-s)")  # fmt: skip
                r = results[label]
                if run.duration_s < r["seconds"]:
                    cpu = server_s + client_s
                    r.update(
                        seconds=run.duration_s,
                        rows=run.rows_written,
                        rows_per_s=run.rows_per_s,
                        server_cpu_s=server_s,
                        client_cpu_s=client_s,
                        cpu_floor_rows_per_s=run.rows_written / (cpu / (os.cpu_count() or 1)),
                    )
                    # fmt: skip
        for label, (schema, sink) in dests.items():
            r = results[label]
            size = pg_bytes(url, schema) if sink is None else lake_bytes(sink)
            r["bytes"] = size
            r["bytes_per_bar"] = size / r["rows"]
            r["read"] = read_back(stores[label], sink, pairs[0], first, last)
    finally:
        server.stop()  # type: ignore[attr-defined]

    pg = results["PostgreSQL partitions"]
    out = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "pairs": len(pairs),
        "months": len(months), "workers": args.workers, "rounds": args.rounds,
        "cpus": os.cpu_count(), "load_avg": os.getloadavg()[0], "destinations": results,
        "ratios": {
            label: {"backfill": r["rows_per_s"] / pg["rows_per_s"],
                    "bytes_per_bar": r["bytes_per_bar"] / pg["bytes_per_bar"],
                    "read": r["read"]["read_metrics"] / pg["read"]["read_metrics"],
                    "cpu_floor": r["cpu_floor_rows_per_s"] / pg["cpu_floor_rows_per_s"]}
            for label, r in results.items()
        },
    }  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "lake.json").write_text(json.dumps(out, indent=2) + "\n")
    md = [
        f"{pg['rows']:,} metric rows ({len(pairs)} pairs × {len(months)} months of `bqx generate`"
        f" bars), `backfill --force --workers {args.workers}`, best of {args.rounds} rounds;"
        f" embedded PostgreSQL, {os.cpu_count()} CPUs, load average {out['load_avg']:.1f} at"
        " the end. The S3 server is moto in this process (HTTP on 127.0.0.1).",
        "",
        "| destination | backfill rows/s | × PostgreSQL | bytes per bar | × PostgreSQL |"
        " read one pair-year (rows/s, `read_metrics`) | × PostgreSQL | server + client CPU-s |"
        " rows/s on idle cores (rows ÷ CPU-s per core) | × PostgreSQL |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for label, r in results.items():
        q = out["ratios"][label]
        md.append(
            f"| {label} | {r['rows_per_s']:,.0f} | {q['backfill']:.2f} | {r['bytes_per_bar']:.1f}"
            f" | {q['bytes_per_bar']:.2f} | {r['read']['read_metrics']:,.0f} | {q['read']:.2f} |"
            f" {r['server_cpu_s']:.1f} + {r['client_cpu_s']:.1f} |"
            f" {r['cpu_floor_rows_per_s']:,.0f} | {q['cpu_floor']:.2f} |"
        )
    md += ["", "Other readers of the same pair-year (rows/s):", ""]
    for label, r in results.items():
        for name, v in r["read"].items():
            if name != "read_metrics" and not name.endswith(" rows"):
                md.append(f"- {label}, {name}: {v:,.0f}")
    (RESULTS / "lake.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    shutil.rmtree(SCRATCH, ignore_errors=True)
    del endpoint


if __name__ == "__main__":
    main()
