"""``bqx demo``: the one-command tour — synthetic bars for 28 pairs, backfill, verify, report."""

from __future__ import annotations

import shlex
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bqx.backfill import RunSummary, backfill
from bqx.config import Settings
from bqx.db import connect
from bqx.progress import plural
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
    report_files: list[Path] = field(default_factory=list)
    next_steps: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        """The ``bqx demo --json`` document."""
        from dataclasses import asdict

        run = asdict(self.run)
        run["rows_per_s"] = self.run.rows_per_s
        run["failures"] = [
            {"pair": p.upper(), "month": str(m), "error": e} for p, m, e in self.run.failures
        ]
        return {
            "ok": not self.run.jobs_failed and self.verify_ok is not False,
            "bars": self.bars, "generate_s": round(self.generate_s, 3), "run": run,
            "verify": self.verify.as_dict() if self.verify is not None else None,
            "report": {"dir": str(self.report_dir), "files": [str(f) for f in self.report_files]},
            "next": self.next_steps,
        }  # fmt: skip


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
    bqx: str = "bqx",
) -> DemoResult:
    """Generate ``months`` months from 2024-07 for ``pairs`` (default the report's 28), backfill,
    verify and write the report into ``out``. ``bqx`` is how the user runs bqx (the next steps
    are printed with it, so that they run as printed)."""
    layout = Layout(settings.schema_name)
    pairs = list(pairs or REPORT_PAIRS)
    end = DEMO_START
    for _ in range(months - 1):
        end = end.next()
    say(
        f"1/4 generating {plural(len(pairs), 'pair')} × {plural(months, 'month')} of bars"
        f" ({DEMO_START}..{end})"
    )
    t0 = time.monotonic()
    gen = generate(settings, layout, pairs, DEMO_START, end, seed=seed, workers=workers or 2)
    gen_s = time.monotonic() - t0
    say(f"    {plural(gen.bars, 'bar')} in {gen_s:.1f}s")
    say("2/4 backfilling BQX metrics")
    run = backfill(
        settings, layout, pairs=pairs, start=DEMO_START, end=end, workers=workers,
        progress=progress,
    )  # fmt: skip
    result = DemoResult(gen.bars, gen_s, run)
    say(
        f"    run {run.run_id}: {plural(run.jobs_done, 'job')} done, {run.jobs_skipped} skipped,"
        f" {run.jobs_failed} failed · {plural(run.rows_written, 'row')} in"
        f" {run.duration_s:.1f}s ({run.rows_per_s:,.0f} rows/s)"
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
    result.report_files = [md, html]
    say(f"    {md}\n    {html}  (open it in a browser)")
    result.next_steps = [
        f"{bqx} status", f"{bqx} verify", f"{bqx} report --out {shlex.quote(str(out))}",
        f'psql "$({bqx} db url --show-password)"',
    ]  # fmt: skip
    say("next steps, to run as printed:")
    for step in result.next_steps:
        say(f"    {step}")
    return result
