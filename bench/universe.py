"""Hundreds of instruments against the report's 28 pairs: what each command costs at scale.

    python bench/universe.py [--instruments 500] [--start 2024-07] [--end 2024-09]
                             [--workers 2] [--repeat 3] [--only 28|N]

Two universes, each in its own schema of one embedded server (BQX_HOME, default
/tmp/bqx-universe-bench): the 28 crosses (``bqx generate``) and N instruments of mixed kinds
(``bqx generate --instruments N``), over the same months. For each, as whole processes:

1. ``generate`` the bars (skipped when the schema already holds them);
2. ``backfill --force`` (every job computed), then ``backfill`` again with nothing to do (a
   no-op resume);
3. ``status --json``, ``verify --json`` and ``report``; these and the no-op resume in
   ``--repeat`` rounds, the universes alternating within each round (a busy neighbour slows
   both alike), the median kept;
4. the catalog: relations in the schema, rows of pg_class and pg_attribute they add, and the
   database's size.

Writes bench/results/universe.json and universe.md (the table the README shows).

``--sparse 28x12,28x120,500x12`` instead measures what grows with the catalog rather than the
rows: N instruments × M months (ending 2024-12) with ``--bars`` bars each (loaded directly),
each in its own schema; the same commands, rounds interleaved across the shapes. Writes
bench/results/universe_sparse.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("BQX_HOME", "/tmp/bqx-universe-bench")
os.environ.pop("BQX_DATABASE_URL", None)

from bqx.config import load_settings  # noqa: E402
from bqx.db import connect  # noqa: E402
from common import run  # noqa: E402

RESULTS = Path(__file__).parent / "results"
CLI = [sys.executable, "-m", "bqx.cli"]


def bqx(args: list[str]) -> tuple[float, str, float]:
    """(wall seconds, stdout, CPU seconds) of one bqx command as a whole process."""
    return run([*CLI, *args])


def timed(args: list[str], repeat: int) -> dict:
    runs = [bqx(args) for _ in range(repeat)]
    return {
        "median_s": statistics.median(r[0] for r in runs), "min_s": min(r[0] for r in runs),
        "cpu_median_s": statistics.median(r[2] for r in runs), "runs_s": [r[0] for r in runs],
        "last": runs[-1][1],
    }  # fmt: skip


def catalog(schema: str) -> dict:
    """Relations bqx made in the schema and what they cost the catalog."""
    with connect(load_settings(schema_name=schema), autocommit=True) as conn:
        kinds = dict(
            conn.execute(
                "SELECT c.relkind, count(*) FROM pg_class c"
                " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s GROUP BY 1",
                (schema,),
            ).fetchall()
        )
        attributes = conn.execute(
            "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s",
            (schema,),
        ).fetchone()[0]
        size = conn.execute(
            "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
            " AND c.relkind IN ('r', 'm')",
            (schema,),
        ).fetchone()[0]
        catalog_size = conn.execute(
            "SELECT sum(pg_total_relation_size(c.oid)) FROM pg_class c"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'pg_catalog'"
        ).fetchone()[0]
    return {
        "tables": kinds.get("r", 0), "partitioned": kinds.get("p", 0),
        "indexes": kinds.get("i", 0) + kinds.get("I", 0), "relations": sum(kinds.values()),
        "pg_attribute_rows": attributes, "data_bytes": int(size),
        "pg_catalog_bytes": int(catalog_size),
    }  # fmt: skip


def setup(name: str, gen: list[str], scope: list[str], a: argparse.Namespace) -> dict:
    """Bars (generated unless the schema holds them) and a backfill that computes every job."""
    schema = f"bench_universe_{name}"
    common = ["--schema", schema]
    out: dict = {"schema": schema}
    if not catalog(schema)["partitioned"]:
        out["generate_s"], doc, _ = bqx(["generate", *gen, *scope, *common, "--json",
                                         "--workers", str(a.workers)])  # fmt: skip
        out["generate"] = json.loads(doc)
    wall, doc, cpu = bqx(["backfill", *scope, *common, "--workers", str(a.workers), "--force",
                          "--json"])  # fmt: skip
    first = json.loads(doc)
    assert first["jobs_failed"] == 0, first
    out["backfill"] = {"wall_s": wall, "cpu_s": cpu, "jobs": first["jobs_total"],
                       "jobs_done": first["jobs_done"], "rows": first["rows_written"]}  # fmt: skip
    return out


def commands(schema: str, scope: list[str], out: str) -> dict[str, list[str]]:
    common = ["--schema", schema]
    return {
        "resume": ["backfill", *scope, *common, "--json"],
        "status": ["status", *common, "--json"],
        "verify": ["verify", *common, "--json"],
        "report": ["report", *common, "--out", out],
    }


def check(name: str, stdout: str, jobs: int) -> None:
    """The commands did what they say: a resume skips every job, verify passes."""
    if name == "resume":
        doc = json.loads(stdout)
        assert doc["jobs_skipped"] == jobs and doc["jobs_done"] == 0, doc
    elif name == "verify":
        assert json.loads(stdout)["ok"], stdout[:2000]


def interleaved(universes: dict[str, dict], scope: list[str], repeat: int) -> None:
    """Each command of each universe once per round, universes alternating, so a neighbour's
    load falls on both alike; the median of the rounds is kept."""
    with tempfile.TemporaryDirectory() as tmp:
        cmds = {k: commands(u["schema"], scope, f"{tmp}/{k}") for k, u in universes.items()}
        walls: dict[str, dict[str, list]] = {k: {} for k in universes}
        for _ in range(repeat):
            for name in ("resume", "status", "verify", "report"):
                for k, u in universes.items():
                    wall, stdout, cpu = bqx(cmds[k][name])
                    check(name, stdout, u["backfill"]["jobs"])
                    walls[k].setdefault(name, []).append((wall, cpu))
    for k, u in universes.items():
        for name, runs in walls[k].items():
            u[name] = {
                "median_s": statistics.median(w for w, _ in runs), "min_s": min(w for w, _ in runs),
                "cpu_median_s": statistics.median(c for _, c in runs),
                "runs_s": [w for w, _ in runs],
            }  # fmt: skip
        u["catalog"] = catalog(u["schema"])


def _row(label: str, key, u28: dict, big: dict) -> str:
    x, y = key(u28), key(big)
    ratio = f"{y / x:.1f}×" if x else ""
    return f"| {label} | {x:,.2f} | {y:,.2f} | {ratio} |"


def table(result: dict) -> list[str]:
    u28, big = result["universes"]["28"], result["universes"][str(result["instruments"])]
    n = result["instruments"]
    jobs28, jobsn = u28["backfill"]["jobs"], big["backfill"]["jobs"]
    md = [
        f"| seconds (whole process) | 28 pairs ({jobs28:,} jobs, {u28['backfill']['rows']:,}"
        f" rows) | {n} instruments ({jobsn:,} jobs, {big['backfill']['rows']:,} rows) | ratio |",
        "|---|---:|---:|---:|",
    ]
    if "generate_s" in u28 and "generate_s" in big:
        md.append(_row("generate", lambda u: u["generate_s"], u28, big))
    md += [
        _row("`backfill --force` (every job)", lambda u: u["backfill"]["wall_s"], u28, big),
        _row("no-op resume (`backfill` again)", lambda u: u["resume"]["median_s"], u28, big),
        _row("`status --json`", lambda u: u["status"]["median_s"], u28, big),
        _row("`verify --json`", lambda u: u["verify"]["median_s"], u28, big),
        _row("`report`", lambda u: u["report"]["median_s"], u28, big),
    ]
    cat28, catn = u28["catalog"], big["catalog"]
    md += [
        "",
        "| catalog | 28 pairs | " + f"{n} instruments |",
        "|---|---:|---:|",
        f"| tables (partitions and ledger) | {cat28['tables']:,} | {catn['tables']:,} |",
        f"| partitioned parents | {cat28['partitioned']:,} | {catn['partitioned']:,} |",
        f"| indexes | {cat28['indexes']:,} | {catn['indexes']:,} |",
        f"| pg_attribute rows | {cat28['pg_attribute_rows']:,} | {catn['pg_attribute_rows']:,} |",
        f"| data (GB) | {cat28['data_bytes'] / 1e9:.2f} | {catn['data_bytes'] / 1e9:.2f} |",
    ]
    return md


def sparse_setup(n: int, months: int, bars: int, a: argparse.Namespace) -> dict:
    """N instruments × M months ending 2024-12, ``bars`` bars at the start of each month."""
    import numpy as np

    from bqx.core.layout import Layout
    from bqx.core.months import Month, month_range
    from bqx.sources.universe import symbol_of, universe
    from bqx.store.bars import load_bars

    schema = f"bench_sparse_{n}x{months}"
    span = month_range(Month(1900, 1), Month(2024, 12))[-months:]
    out: dict = {"schema": schema, "instruments": n, "months": months, "bars": bars,
                 "first": str(span[0]), "last": str(span[-1])}  # fmt: skip
    if catalog(schema)["tables"] < 2 * n * months:  # not all loaded yet (again: the same bars)
        layout = Layout(schema)
        rng = np.random.default_rng(n * 1000 + months)
        with connect(load_settings(schema_name=schema), autocommit=True) as conn:
            for symbol in (symbol_of(i) for i in universe(n)):
                for month in span:
                    t0 = np.datetime64(month.start.replace(tzinfo=None), "m")
                    times = (t0 + np.arange(bars).astype("timedelta64[m]")).astype("M8[us]")
                    close = np.round(1.1 + np.cumsum(rng.integers(-3, 4, bars)) * 1e-5, 5)
                    ohlcv = np.column_stack([close, close, close, close, np.ones(bars)])
                    load_bars(conn, layout, symbol, times, ohlcv, mode="replace")
    scope = ["--start", str(span[0]), "--end", str(span[-1]), "--schema", schema]
    wall, doc, cpu = bqx(["backfill", *scope, "--workers", str(a.workers), "--force", "--json"])
    first_run = json.loads(doc)
    assert first_run["jobs_failed"] == 0, first_run
    out["backfill"] = {"wall_s": wall, "cpu_s": cpu, "jobs": first_run["jobs_total"],
                       "rows": first_run["rows_written"]}  # fmt: skip
    out["scope"] = ["--start", str(span[0]), "--end", str(span[-1])]
    return out


def sparse(a: argparse.Namespace) -> None:
    shapes = [tuple(int(x) for x in item.split("x")) for item in a.sparse.split(",")]
    found = {f"{n}x{m}": sparse_setup(n, m, a.bars, a) for n, m in shapes}
    # every shape's own months: interleaved rounds need one scope per shape
    with tempfile.TemporaryDirectory() as tmp:
        walls: dict[str, dict[str, list]] = {k: {} for k in found}
        for _ in range(a.repeat):
            for name in ("resume", "status", "verify", "report"):
                for k, u in found.items():
                    cmd = commands(u["schema"], u["scope"], f"{tmp}/{k}")[name]
                    wall, stdout, _ = bqx(cmd)
                    check(name, stdout, u["backfill"]["jobs"])
                    walls[k].setdefault(name, []).append(wall)
    for k, u in found.items():
        for name, runs in walls[k].items():
            u[name] = {"median_s": statistics.median(runs), "runs_s": runs}
        u["catalog"] = catalog(u["schema"])
    RESULTS.mkdir(exist_ok=True)
    doc = {"when": datetime.now(UTC).isoformat(timespec="seconds"), "bars_per_month": a.bars,
           "workers": a.workers, "repeat": a.repeat, "shapes": found}  # fmt: skip
    (RESULTS / "universe_sparse.json").write_text(json.dumps(doc, indent=2) + "\n")
    head = (
        "| seconds (whole process) | "
        + " | ".join(
            f"{u['instruments']} × {u['months']} months ({u['backfill']['jobs']:,} jobs)"
            for u in found.values()
        )
        + " |"
    )
    md = [f"Catalog-bound costs: {a.bars} bars per instrument-month, {a.workers} workers;"
          f" median of {a.repeat} interleaved rounds:", "", head,
          "|---|" + "---:|" * len(found)]  # fmt: skip
    rows = {"`backfill --force`": lambda u: u["backfill"]["wall_s"],
            "no-op resume": lambda u: u["resume"]["median_s"],
            "`status --json`": lambda u: u["status"]["median_s"],
            "`verify --json`": lambda u: u["verify"]["median_s"],
            "`report`": lambda u: u["report"]["median_s"]}  # fmt: skip
    for label, key in rows.items():
        md.append(f"| {label} | " + " | ".join(f"{key(u):,.2f}" for u in found.values()) + " |")
    md.append(
        "| relations (tables + indexes) | "
        + " | ".join(f"{u['catalog']['relations']:,}" for u in found.values())
        + " |"
    )
    (RESULTS / "universe_sparse.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--instruments", type=int, default=500)
    ap.add_argument("--start", default="2024-07")
    ap.add_argument("--end", default="2024-09")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", choices=["28", "N"], default=None)
    ap.add_argument("--sparse", default=None, help="shapes NxM, e.g. 28x12,28x120,500x12")
    ap.add_argument("--bars", type=int, default=20, help="bars per instrument-month (--sparse)")
    a = ap.parse_args()
    if a.sparse:
        sparse(a)
        return
    scope = ["--start", a.start, "--end", a.end]
    path = RESULTS / "universe.json"
    result: dict = {"universes": {}}
    big = str(a.instruments)
    if a.only != "N":
        result["universes"]["28"] = setup("28", [], scope, a)
    if a.only != "28":
        result["universes"][big] = setup(big, ["--instruments", big], scope, a)
    interleaved(result["universes"], scope, a.repeat)
    with connect(load_settings(), autocommit=True) as conn:
        server = conn.execute("SHOW server_version").fetchone()[0]
        locks = conn.execute("SHOW max_locks_per_transaction").fetchone()[0]
    result.update({
        "when": datetime.now(UTC).isoformat(timespec="seconds"), "instruments": a.instruments,
        "months": [a.start, a.end], "workers": a.workers, "repeat": a.repeat,
        "server": server, "max_locks_per_transaction": locks, "cpus": os.cpu_count(),
        "load_average_at_end": os.getloadavg()[0],
    })  # fmt: skip
    RESULTS.mkdir(exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    if "28" in result["universes"] and str(a.instruments) in result["universes"]:
        md = [f"Universe scale, {a.start}..{a.end}, embedded PostgreSQL {server},"
              f" {os.cpu_count()} CPUs, {a.workers} workers; median of {a.repeat}:", "",
              *table(result)]  # fmt: skip
        (RESULTS / "universe.md").write_text("\n".join(md) + "\n")
        print("\n".join(md))


if __name__ == "__main__":
    main()
