"""``bqx update``: the cost of a no-op, and the latency of ``--follow 1`` on 28 pairs.

    python bench/update.py [--pairs 28] [--months 12] [--rounds 40]

1. Data: ``bqx generate`` bars for the first N of the report's pairs from 2024-07, backfilled,
   in the embedded server under BQX_HOME (default /tmp/bqx-bench-update), with
   ``track_commit_timestamp`` on so that latencies are read from the server's own commit times.
2. No-op: ``bqx update`` as a whole process (interpreter start, imports, connect, look-ups)
   when nothing is new, and one no-op poll inside a running updater.
3. Latency: ``bqx update --follow 1`` runs as its own process while new bars arrive, one bar
   per pair committed on its own, in rounds at random intervals of 0.5–1.5 s. For each bar:
   commit time of its metric row minus commit time of the bar. Two ways in:
   - plain ``INSERT`` into ``m1_{pair}`` (a source bqx does not own: found by polling);
   - bqx's own load path (``load_bars``, as ``bqx ingest``), whose NOTIFY wakes the follower.

Writes bench/results/update.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from datetime import UTC, datetime, timedelta
from pathlib import Path

os.environ.setdefault("BQX_HOME", "/tmp/bqx-bench-update")
os.environ.pop("BQX_DATABASE_URL", None)

import numpy as np  # noqa: E402
import psycopg  # noqa: E402
from psycopg import sql  # noqa: E402

from bqx.config import load_settings  # noqa: E402
from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.symbols import REPORT_PAIRS
from bqx.db import connect, embedded, resolve_url  # noqa: E402
from bqx.pipeline.update import Updater  # noqa: E402
from bqx.store import names
from bqx.store.bars import load_bars  # noqa: E402
from bqx.store.ddl import ensure_source_partition  # noqa: E402
from common import store_for  # noqa: E402

RESULTS = Path(__file__).parent / "results"
SCHEMA = "bench_update"
SRC = str(Path(__file__).resolve().parent.parent / "src")


def _env(url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    env.update(BQX_DATABASE_URL=url, BQX_SCHEMA=SCHEMA, PYTHONPATH=SRC)
    return env


def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def prepare(settings, layout: Layout, pairs: list[str], months: int) -> None:
    server = embedded(settings)
    url = server.start()
    with psycopg.connect(url, autocommit=True) as c:
        on = c.execute("SHOW track_commit_timestamp").fetchone()[0] == "on"
        if not on:
            c.execute("ALTER SYSTEM SET track_commit_timestamp = on")
    if not on:
        server.stop()
        server.start()
    with connect(url, autocommit=True) as c:
        have = c.execute(
            "SELECT count(*) FROM pg_tables WHERE schemaname = %s AND tablename LIKE 'bqx\\_%%'",
            (SCHEMA,),
        ).fetchone()[0]
    if have >= len(pairs) * months:  # reuse the data of an earlier run
        return
    with connect(url, autocommit=True) as c:
        c.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(SCHEMA)))
    start = Month(2024, 7)
    end = start.plus(months - 1)
    t0 = time.monotonic()
    store_for(settings, layout).generate(pairs, start, end, seed=1, workers=2)
    print(f"generated in {time.monotonic() - t0:.0f} s", flush=True)
    t0 = time.monotonic()
    store_for(settings, layout).backfill(workers=2)
    print(f"backfilled in {time.monotonic() - t0:.0f} s", flush=True)


def noop(url: str, layout: Layout, repeats: int) -> dict[str, float]:
    whole, cpu = [], []
    for _ in range(repeats):
        t0 = time.monotonic()
        r0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [sys.executable, "-m", "bqx.cli", "update", "--json"], env=_env(url),
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        whole.append(time.monotonic() - t0)
        r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu.append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        assert json.loads(out.stdout)["rows"] == 0, out.stdout
    imports = []
    for _ in range(repeats):
        t0 = time.monotonic()
        subprocess.run([sys.executable, "-c", "import bqx.cli, bqx.backfill.update"],
                       env=_env(url), check=True)  # fmt: skip
        imports.append(time.monotonic() - t0)
    up = Updater(url, layout)
    up.poll()
    polls = []
    for _ in range(repeats * 4):
        t0 = time.monotonic()
        assert up.poll().rows == 0
        polls.append(time.monotonic() - t0)
    up.close()
    return {
        "process_median_s": statistics.median(whole), "process_max_s": max(whole),
        "process_cpu_median_s": statistics.median(cpu),
        "imports_median_s": statistics.median(imports),
        "poll_median_s": statistics.median(polls), "poll_max_s": max(polls),
    }  # fmt: skip


def _last_bars(conn: psycopg.Connection, layout: Layout, pairs: list[str]) -> dict:
    out = {}
    for pair in pairs:
        t, close = conn.execute(
            sql.SQL("SELECT time, close FROM {} ORDER BY time DESC LIMIT 1").format(
                names.source(layout, pair)
            )
        ).fetchone()
        out[pair] = [t, close]
    return out


def _wait_ready(port: int, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as r:
                for line in r.read().decode().splitlines():
                    if line.startswith("bqx_last_poll_timestamp_seconds") and float(
                        line.split()[1]
                    ):
                        return
        except OSError:
            pass
        time.sleep(0.2)
    raise RuntimeError("the follower did not start")


def latency(url: str, layout: Layout, pairs: list[str], rounds: int, way: str) -> list[float]:
    """Seconds from a bar's commit to its metric row's commit, for every bar of every round."""
    rng = random.Random(7)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    follower = subprocess.Popen(
        [sys.executable, "-m", "bqx.cli", "update", "--follow", "1", "--metrics-port", str(port)],
        env=_env(url), stderr=subprocess.DEVNULL,
    )  # fmt: skip
    sent: dict[str, list[datetime]] = {p: [] for p in pairs}
    try:
        with connect(url, autocommit=True) as conn:
            last = _last_bars(conn, layout, pairs)
            for pair, (t, _) in last.items():  # the new bars may open a month
                ensure_source_partition(conn, layout, pair, Month.of(t).next())
            _wait_ready(port)  # started, kernels loaded, first poll done
            for _ in range(rounds):
                time.sleep(rng.uniform(0.5, 1.5))
                for pair in pairs:
                    t, close = last[pair]
                    t = t + timedelta(minutes=1)
                    close = round(close * (1 + rng.gauss(0, 1e-4)), 5)
                    if way == "insert":
                        conn.execute(
                            sql.SQL(
                                "INSERT INTO {} (time, open, high, low, close, volume)"
                                " VALUES (%s, %s, %s, %s, %s, 1)"
                            ).format(names.source(layout, pair)),
                            (t, close, close, close, close),
                        )
                    else:
                        times = np.array([t.replace(tzinfo=None)], dtype="datetime64[us]")
                        load_bars(conn, layout, pair, times, np.array([[close] * 4 + [1.0]]))
                    last[pair] = [t, close]
                    sent[pair].append(t)
            deadline = time.monotonic() + 30
            q = sql.SQL(" UNION ALL ").join(
                sql.SQL(
                    "SELECT extract(epoch FROM pg_xact_commit_timestamp(d.xmin)"
                    " - pg_xact_commit_timestamp(s.xmin))::float8 FROM {src} s"
                    " JOIN {tgt} d ON d.ts_utc = s.time WHERE s.time = ANY(%s)"
                ).format(src=names.source(layout, p), tgt=names.target(layout, p))
                for p in pairs
            )
            while True:
                got = [r[0] for r in conn.execute(q, [sent[p] for p in pairs]).fetchall()]
                if len(got) == rounds * len(pairs) or time.monotonic() > deadline:
                    return got
                time.sleep(0.5)
    finally:
        follower.terminate()
        follower.wait(timeout=30)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=28)
    ap.add_argument("--months", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    settings = load_settings(schema_name=SCHEMA)
    layout = Layout(SCHEMA)
    pairs = list(REPORT_PAIRS[: args.pairs])
    prepare(settings, layout, pairs, args.months)
    url = resolve_url(settings)
    with connect(url, autocommit=True) as c:
        rows = sum(
            c.execute(
                sql.SQL("SELECT count(*) FROM {}").format(names.target(layout, p))
            ).fetchone()[0]
            for p in pairs
        )
    res: dict = {
        "pairs": len(pairs),
        "months": args.months,
        "target_rows": rows,
        "cpus": os.cpu_count(),
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    res["load"] = " ".join(f"{x:.1f}" for x in os.getloadavg())
    res["noop"] = noop(url, layout, args.repeats)
    print("no-op:", res["noop"], flush=True)
    for way in ("insert", "ingest"):
        lat = latency(url, layout, pairs, args.rounds, way)
        res[way] = {
            "bars": len(lat),
            "sent": args.rounds * len(pairs),
            "p50_s": _pct(lat, 50),
            "p99_s": _pct(lat, 99),
            "max_s": max(lat),
        }
        print(way, res[way], flush=True)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "update.json").write_text(json.dumps(res, indent=2) + "\n")
    n = res["noop"]

    def lat_row(name: str, r: dict) -> str:
        cells = [f"{r['bars']}/{r['sent']}", *(f"{r[k]:.2f}" for k in ("p50_s", "p99_s", "max_s"))]
        return f"| {name} | " + " | ".join(cells) + " |"

    poll_row = (
        f"| one no-op poll of {res['pairs']} pairs in a running updater"
        f" | {n['poll_median_s']:.4f} | {n['poll_max_s']:.4f} |"
    )
    md = f"""# bqx update

{res["pairs"]} pairs × {res["months"]} months stored ({rows:,} target rows), embedded PostgreSQL
on the same machine, {res["cpus"]} CPUs shared with other work (load average
{res["load"]}); `python bench/update.py`.

## No-op (nothing new)

| what | median s | max s |
|---|---:|---:|
| `bqx update` as a whole process | {n["process_median_s"]:.2f} | {n["process_max_s"]:.2f} |
| its CPU time (user + sys; load does not inflate it) | {n["process_cpu_median_s"]:.2f} | |
| interpreter start and imports alone | {n["imports_median_s"]:.2f} | |
{poll_row}

## `bqx update --follow 1`: bar committed → its metric row committed

The follower is started and has done its first poll before the first bar. One bar per pair
per round, each its own commit, {args.rounds} rounds at random 0.5–1.5 s intervals; times are
the server's commit timestamps.

| bars arrive through | bars | p50 s | p99 s | max s |
|---|---:|---:|---:|---:|
{lat_row("plain INSERT (polled every 1 s)", res["insert"])}
{lat_row("bqx's load path (NOTIFY wakes the follower)", res["ingest"])}

Target: p99 within 2 s of the bar; a no-op `update` in about a second as a whole process.
"""
    (RESULTS / "update.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
