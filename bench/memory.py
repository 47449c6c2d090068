"""Peak memory of a backfill worker for 1, 3 and 12 months: it must stay flat.

    python bench/memory.py [--pairs 2] [--months 1,3,12]

Each measurement is a fresh process that runs ``bqx backfill --force --workers 1`` over the
first N months, once per local executor: with ``--executor local`` it reads the peak resident
set of the (reaped) worker process (``getrusage(RUSAGE_CHILDREN).ru_maxrss``); with
``--executor threads`` (the default) the worker is a thread of the process itself, so the peak
is the whole process's (``RUSAGE_SELF``), driver included. A worker holds one (pair, month)
job at a time, so its peak should not grow with the number of months. Data: ``bqx generate``
bars in the embedded server under BQX_HOME (default /tmp/bqx-bench), schema ``bench_memory``.
Writes bench/results/memory.json and bench/results/memory.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path

os.environ.setdefault("BQX_HOME", "/tmp/bqx-bench")
os.environ.pop("BQX_DATABASE_URL", None)

RESULTS = Path(__file__).parent / "results"
SCHEMA = "bench_memory"
EXECUTORS = ("threads", "local")
WHAT = {"threads": "the whole process, driver included", "local": "the worker process"}

_CHILD = """
import json, resource, sys
from bqx import Store
from bqx.core.months import Month
from bqx.core.symbols import REPORT_PAIRS
n_pairs, n_months = int(sys.argv[1]), int(sys.argv[2])
end = Month(2024, 7).plus(n_months - 1)
run = Store(schema=sys.argv[3]).backfill(
    list(REPORT_PAIRS[:n_pairs]), Month(2024, 7), end, workers=1, force=True,
    executor=sys.argv[4])
who = resource.RUSAGE_CHILDREN if sys.argv[4] == "local" else resource.RUSAGE_SELF
peak_kib = resource.getrusage(who).ru_maxrss  # the worker's peak (a thread: the process's)
print(json.dumps({"rows": run.rows_written, "jobs": run.jobs_done, "peak_mib": peak_kib / 1024}))
"""


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2)
    ap.add_argument("--months", default="1,3,12")
    args = ap.parse_args()
    months = sorted(int(m) for m in args.months.split(","))

    from bqx.config import load_settings
    from bqx.core.layout import Layout
    from bqx.core.months import Month
    from bqx.core.symbols import REPORT_PAIRS
    from common import store_for

    end = Month(2024, 7).plus(months[-1] - 1)
    store_for(load_settings(schema_name=SCHEMA), Layout(SCHEMA)).generate(
        list(REPORT_PAIRS[: args.pairs]), Month(2024, 7), end, workers=1
    )

    rows = []
    for executor in EXECUTORS:
        for m in months:
            out = subprocess.run(
                [sys.executable, "-c", _CHILD, str(args.pairs), str(m), SCHEMA, executor],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            got = json.loads(out.stdout.strip().splitlines()[-1])
            got["months"], got["executor"] = m, executor
            rows.append(got)
            print(f"{executor}, {m:>2} months: {got['rows']:,} rows,"
                  f" peak {got['peak_mib']:.0f} MiB")  # fmt: skip
    per_executor = [[r for r in rows if r["executor"] == ex] for ex in EXECUTORS]
    growth = max(runs[-1]["peak_mib"] / runs[0]["peak_mib"] for runs in per_executor)
    result = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "pairs": args.pairs,
        "runs": rows,
        "peak_growth_first_to_last": growth,
        "target": "flat (growth ≤ 1.1)",
    }
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.json").write_text(json.dumps(result, indent=2) + "\n")
    md = [
        f"Peak resident memory of one backfill worker ({args.pairs} pairs, --workers 1, --force):",
        "",
        "| executor | months | jobs | rows | peak RSS (MiB) |",
        "|---|---:|---:|---:|---:|",
        *(
            f"| {r['executor']} ({WHAT[r['executor']]}) | {r['months']} | {r['jobs']} |"
            f" {r['rows']:,} | {r['peak_mib']:.0f} |"
            for r in rows
        ),  # fmt: skip
        "",
        f"**{months[-1]} months / {months[0]} month: at most {growth:.2f}×** (flat: one job at"
        " a time).",
    ]
    (RESULTS / "memory.md").write_text("\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
