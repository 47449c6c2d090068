"""Features and the baseline on the demo data: the figures docs/ml.md and docs/database.md quote.

    python bench/baseline.py [--home DIR] [--months 3]

In a scratch BQX_HOME (a temporary directory unless ``--home``): generate the 28 synthetic
pairs of ``bqx demo`` from 2024-07 (3 months by default), backfill, ``bqx features`` (its
defaults) and ``bqx baseline --json --out``, each run and timed as a whole process with its
peak RSS; then the disk each part takes (bars, metrics, WAL, the server's whole directory,
the feature files). Writes bench/results/baseline.md, baseline.json (the baseline's own
document), baseline_run.json (the rest) and baseline_predicted_vs_actual.png.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"


def run(args: list[str], env: dict[str, str]) -> dict[str, Any]:
    """``bqx ARGS`` as a process: wall seconds, peak RSS (MB) and its stdout."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "bqx.cli", *args], env=env,
                            stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"bqx {' '.join(args)} exited {proc.returncode}")
    return {"args": args, "seconds": round(time.monotonic() - t0, 1),
            "peak_rss_mb": round(usage.ru_maxrss / 1024), "stdout": out}  # fmt: skip


def du(path: Path) -> int:
    """Bytes on disk under ``path`` (as ``du -s`` counts them)."""
    res = subprocess.run(["du", "-sb", str(path)], capture_output=True, text=True, check=True)
    return int(res.stdout.split()[0])


def sizes(home: Path) -> dict[str, Any]:
    """Bytes of the bars, the metrics, the whole database, WAL and the server's directory."""
    from bqx.config import load_settings
    from bqx.db import connect

    part = (
        "SELECT coalesce(sum(pg_total_relation_size(c.oid)), 0), coalesce(sum(c.reltuples), 0)"
        " FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = 'bqx' AND c.relkind = 'r' AND c.relname ~ %s"
    )
    with connect(load_settings(home=home), autocommit=True) as conn:
        conn.execute("ANALYZE")
        bars_b, bars_n = map(int, conn.execute(part, ("^m1_.+_[0-9]{4}m[0-9]{2}$",)).fetchone())
        met_b, met_n = map(int, conn.execute(part, ("^bqx_.+_[0-9]{4}m[0-9]{2}$",)).fetchone())
        db = conn.execute("SELECT pg_database_size(current_database())").fetchone()[0]
        conn.execute("CHECKPOINT")
    data = home / "pg" / "data"
    return {
        "bars_bytes": int(bars_b), "bars": int(bars_n),
        "bytes_per_bar": round(bars_b / max(bars_n, 1)),
        "metrics_bytes": int(met_b), "metric_rows": int(met_n),
        "bytes_per_metric_row": round(met_b / max(met_n, 1)),
        "database_bytes": int(db), "wal_bytes": du(data / "pg_wal"),
        "server_dir_bytes": du(home / "pg"),
    }  # fmt: skip


def gb(n: int) -> str:
    return f"{n / 1e9:.2f} GB"


def write(doc: dict[str, Any], baseline: dict[str, Any]) -> None:
    """bench/results/baseline.md from the run's figures (``--render`` redoes only this)."""
    from bqx.core.text import plural
    from bqx.ml.baseline import markdown

    steps, disk, feat = doc["steps"], doc["disk"], doc["features"]
    splits = feat["splits"]
    drop = feat["rows_dropped"]
    sel = baseline["selection"]
    gbm = sel["lightgbm"]["params"]
    lines = [
        "# Features and baseline on the demo data",
        "",
        f"Measured {doc['date']} by `python bench/baseline.py` (load average {doc['load']}"
        f" on a {os.cpu_count()}-CPU machine shared with other work), in a scratch `BQX_HOME`:",
        "",
        "| step | wall | peak RSS |",
        "|---|---:|---:|",
        *(
            f"| `bqx {' '.join(s['args'])}` | {s['seconds']:,} s | {s['peak_rss_mb']:,} MB |"
            for s in steps
        ),  # fmt: skip
        "",
        f"`bqx features`: {feat['rows']:,} rows × {len(feat['features'])} features,"
        f" {len(feat['pairs'])} pairs, embargo {feat['embargo_bars']} bars;"
        f" {gb(doc['feature_bytes'])} of Parquet.",
        "",
        "| split | from | to | rows |",
        "|---|---|---|---:|",
        *(f"| {k} | {v['start']} | {v['end']} | {v['rows']:,} |" for k, v in splits.items()),
        "",
        f"Dropped: {drop['incomplete_features']:,} rows with short history,"
        f" {drop['no_target']:,} without a target (the last {feat['horizon']} per pair),"
        f" {drop['embargo']:,} in the embargo.",
        "",
        f"`bqx baseline`: trained on {baseline['rows']['train']:,} rows (every k-th training"
        f" row), chosen on {baseline['rows']['validation']:,}, tested on"
        f" {baseline['rows']['test']:,}. Chosen on validation: ridge α ="
        f" {sel['ridge']['params']['alpha']:g}; LightGBM {gbm['num_leaves']} leaves,"
        f" early-stopped at {plural(gbm['n_estimators'], 'tree')}. The"
        ' synthetic prices are correlated random walks, so "nothing beats the baselines" is'
        " the right answer.",
        "",
        'Disk (docs/database.md, "Disk space"): '
        f"{disk['bars']:,} bars take {gb(disk['bars_bytes'])} ({disk['bytes_per_bar']} bytes a"
        f" bar), {disk['metric_rows']:,} metric rows {gb(disk['metrics_bytes'])}"
        f" ({disk['bytes_per_metric_row']} bytes a row); the database {gb(disk['database_bytes'])},"
        f" WAL {gb(disk['wal_bytes'])}, the server's whole directory"
        f" {gb(disk['server_dir_bytes'])}.",
        "",
        "---",
        "",
        markdown(baseline).replace("# Baseline:", "## Baseline:", 1),
        "![predicted vs actual on test](baseline_predicted_vs_actual.png)",
        "",
    ]
    (RESULTS / "baseline.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", help="BQX_HOME to use (default: a temporary directory)")
    ap.add_argument("--months", type=int, default=3)
    ap.add_argument("--render", action="store_true",
                    help="only write baseline.md again from the last run's JSON files")  # fmt: skip
    args = ap.parse_args()
    if args.render:
        write(json.loads((RESULTS / "baseline_run.json").read_text()),
              json.loads((RESULTS / "baseline.json").read_text()))  # fmt: skip
        return
    scratch = Path(tempfile.mkdtemp(prefix="bqx-bench-baseline-"))
    home = Path(args.home) if args.home else scratch / "home"
    work = scratch / "work"  # outside BQX_HOME: bqx writes no output there
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BQX_"))}
    env["BQX_HOME"] = os.environ["BQX_HOME"] = str(home)
    end = f"2024-{6 + args.months:02d}" if args.months <= 6 else f"2025-{args.months - 6:02d}"
    try:
        steps = [
            run(["generate", "--start", "2024-07", "--end", end, "--workers", "2"], env),
            run(["backfill", "--workers", "2"], env),
            run(["features", "--out", str(work / "feat"), "--json"], env),
            run(
                [
                    "baseline",
                    "--features",
                    str(work / "feat"),
                    "--out",
                    str(work / "base"),
                    "--json",
                ],
                env,
            ),  # fmt: skip
        ]
        features, baseline = json.loads(steps[2]["stdout"]), json.loads(steps[3]["stdout"])
        features["rows"] = sum(s["rows"] for s in features["splits"].values())
        for s in steps:
            del s["stdout"]
            s["args"] = [a.replace(f"{work}/", "") for a in s["args"]]  # no scratch path
        doc = {
            "date": datetime.now(UTC).strftime("%Y-%m-%d"), "load": round(os.getloadavg()[0], 1),
            "months": args.months, "steps": steps, "features": features,
            "feature_bytes": du(work / "feat"), "disk": sizes(home),
        }  # fmt: skip
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "baseline.json").write_text(json.dumps(baseline, indent=2) + "\n")
        (RESULTS / "baseline_run.json").write_text(json.dumps(doc, indent=2) + "\n")
        shutil.copy(work / "base" / "predicted_vs_actual.png",
                    RESULTS / "baseline_predicted_vs_actual.png")  # fmt: skip
        write(doc, baseline)
        print(json.dumps(doc["disk"], indent=2))
    finally:
        if not args.home:  # the scratch server and its data go, whatever happened
            subprocess.run([sys.executable, "-m", "bqx.cli", "db", "destroy", "--yes"],
                           env=env, check=False, capture_output=True)  # fmt: skip
        shutil.rmtree(scratch, ignore_errors=True)


if __name__ == "__main__":
    main()
