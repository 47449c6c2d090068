"""``bqx demo``: the one-command tour — synthetic bars for 28 pairs, backfill, verify, report."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bqx.backfill import RunSummary, backfill
from bqx.config import Settings
from bqx.db import connect
from bqx.report import write_report
from bqx.schema import REPORT_PAIRS, Layout, Month
from bqx.sources.generate import generate
from bqx.verify import verify

DEMO_START = Month(2024, 7)  # the report's first month


@dataclass
class DemoResult:
    bars: int
    generate_s: float
    run: RunSummary
    verify_ok: bool | None = None
    verify: Any = None
    report_dir: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


def run_demo(
    settings: Settings,
    *,
    months: int = 3,
    pairs: Sequence[str] | None = None,
    workers: int | None = None,
    out: Path = Path("bqx-report"),
    seed: int = 0,
    say: Callable[[str], None] = print,
    progress: bool = True,
) -> DemoResult:
    """Generate ``months`` months from 2024-07 for ``pairs`` (default the report's 28), backfill,
    verify and write the report into ``out``."""
    layout = Layout(settings.schema_name)
    pairs = list(pairs or REPORT_PAIRS)
    end = DEMO_START
    for _ in range(months - 1):
        end = end.next()
    say(f"1/4 generating {len(pairs)} pairs × {months} month(s) of bars ({DEMO_START}..{end})")
    t0 = time.monotonic()
    gen = generate(settings, layout, pairs, DEMO_START, end, seed=seed, workers=workers or 2)
    gen_s = time.monotonic() - t0
    say(f"    {gen.bars:,} bars in {gen_s:.1f}s")
    say("2/4 backfilling BQX metrics")
    run = backfill(
        settings, layout, pairs=pairs, start=DEMO_START, end=end, workers=workers,
        progress=progress,
    )  # fmt: skip
    result = DemoResult(gen.bars, gen_s, run)
    say(
        f"    run {run.run_id}: {run.jobs_done} jobs done, {run.jobs_skipped} skipped,"
        f" {run.jobs_failed} failed · {run.rows_written:,} rows in {run.duration_s:.1f}s"
        f" ({run.rows_per_s:,.0f} rows/s)"
    )
    with connect(settings, autocommit=True) as conn:
        say("3/4 verifying (exact counts, keys, NULLs, recomputed samples, ledger)")
        check = verify(conn, layout, sample=20)
        result.verify_ok, result.verify = check.ok, check
        for c in check.checks:
            say(f"    {'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}")
        say("4/4 writing the completion report")
        md, html, _ = write_report(conn, layout, out, verification=check)
    result.report_dir = out
    say(f"    {md}\n    {html}  (open it in a browser)")
    say(
        "next: `bqx status`, `bqx verify`, `bqx report --out DIR`, or psql"
        ' "$(bqx db url --show-password)"'
    )
    return result
