"""Reading what was done: ``bqx status``, ``runs``, ``verify`` and ``report``."""

from __future__ import annotations

import contextlib
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from bqx.cli.app import (
    DatabaseOpt,
    JsonOpt,
    SchemaOpt,
    WorkersOpt,
    app,
    console,
    err_console,
    error,
    info,
    print_json,
    say,
    store_from,
)
from bqx.errors import BqxError


@app.command()
def status(
    watch: Annotated[
        bool,
        typer.Option(
            "--watch", help="Refresh until Ctrl-C (live on a terminal, a line per refresh if not)."
        ),
    ] = False,
    until_done: Annotated[
        bool,
        typer.Option(
            "--until-done",
            help="Watch until the run ends: exit 0 if all its jobs are done, 1 if not (failed,"
            " interrupted, or stalled with its driver gone).",
        ),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", min=0.05, help="Seconds between refreshes.")
    ] = 1.5,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Progress of the latest backfill with jobs, from the ledger: jobs, rows, rate, ETA,
    mode and windows, workers, errors."""
    from bqx.cli.render import status_view

    store = store_from(database_url, schema)
    if json_out or not (watch or until_done):
        doc = store.status()
        print_json(doc.as_dict()) if json_out else console.print(status_view(doc))
        return
    code = _watch(store, interval, until_done)
    if code:
        raise typer.Exit(code)


def _watch(store: Any, interval: float, until_done: bool) -> int | None:
    """Refresh until Ctrl-C (or the run's end): a live view on a terminal, a line per refresh
    otherwise (`| tee`, CI logs). A lost database shows a notice until it is back."""
    from rich.live import Live

    from bqx.cli.render import status_view

    live_view = console.is_terminal and not console.quiet
    live_ctx = Live(Text("reading the ledger…"), console=console, auto_refresh=False) \
        if live_view else contextlib.nullcontext()  # fmt: skip
    try:
        with live_ctx as live:
            for doc in store.watch_status(interval):
                if isinstance(doc, BqxError):
                    view: Any = Text(f"database unreachable, retrying: {doc}", style="red")
                else:
                    view = status_view(doc) if live_view else doc.line(_now())
                if live is not None:
                    live.update(view, refresh=True)
                else:
                    # plain lines: one per refresh, flushed at once for `| tee` and CI logs
                    out = err_console if isinstance(view, Text) else console
                    out.print(view, highlight=False, markup=False)
                    sys.stdout.flush()
                if until_done and not isinstance(doc, BqxError):
                    code = doc.ended()
                    if code is not None:
                        return code
    except KeyboardInterrupt:
        pass
    return None


def _now() -> str:
    return datetime.now().strftime("%H:%M:%S")


@app.command()
def runs(
    limit: Annotated[int, typer.Option("--limit", min=1, help="How many runs, newest first.")] = 20,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """The latest runs: id, command, start, duration, jobs, rows, status."""
    result = store_from(database_url, schema).runs(limit)
    print_json(result.as_dict()) if json_out else say(result.text())


SampleOpt = Annotated[
    int, typer.Option("--sample", min=0, help="Rows per pair recomputed from the source (≥ 0).")
]
SCOPE_HELP = (
    "Only this run's jobs [default: every job in the ledger, with the latest run that did work]."
)
RunOpt = Annotated[int | None, typer.Option("--run", min=1, help=SCOPE_HELP)]


@app.command()
def verify(
    full: Annotated[
        bool, typer.Option("--full", help="Check every month, not only those changed since.")
    ] = False,
    sample: SampleOpt = 50,
    run: RunOpt = None,
    workers: WorkersOpt = None,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Recompute every stored value from the bars and compare it bit for bit; check
    partitions, keys and the ledger; check the kernel against plain formulas on a sample.

    Only months written or changed since they last passed are read again (--full: every
    month). Scope: every job in the ledger and every stored month of its pairs, unless --run
    names one run (the same rule as `bqx report`). Exit 0 only when every check passes;
    nothing to check is not a pass (exit 1). A failure names pair, month, time and column,
    and the command that repairs it.
    """
    from bqx.progress import StepProgress

    store = store_from(database_url, schema)
    steps = StepProgress("verify")
    t0 = time.monotonic()
    try:
        result = store.verify(full=full, sample=sample, run=run, workers=workers,
                              progress=steps)  # fmt: skip
    finally:
        steps.close()
    if json_out:
        print_json(result.as_dict())
    elif result.nothing_to_check:
        error(f"nothing to check: {result.nothing_to_check}")
    else:
        for ok, line in result.lines():
            mark, rest = line.split(" ", 1)
            text = Text.assemble((mark, "green" if ok else "bold red"), f" {rest}")
            # --quiet keeps the failures (on stderr), drops the passes
            (console if not console.quiet or ok else err_console).print(text, highlight=False)
        say(f"{result.summary()} in {time.monotonic() - t0:.1f} s")
        if result.repair:
            err_console.print(Text.assemble(("to repair:", "bold"), " ", result.repair),
                              highlight=False, soft_wrap=True)  # fmt: skip
        if result.note:
            info(result.note)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def report(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for report.md and report.html.")
    ] = Path("bqx-report"),
    run: RunOpt = None,
    sample: SampleOpt = 20,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The completion report (Markdown and self-contained HTML with charts) from the ledger.

    Scope: every job in the ledger, with the latest run that planned jobs for the run's own
    figures, unless --run names one run (the same rule as `bqx verify`). Exit 0 when the
    report is written, whatever it says; its status line says COMPLETE only when the run
    ended and every job of the scope is done and verified.
    """
    from bqx.progress import StepProgress

    store = store_from(database_url, schema)
    steps = StepProgress("report")
    try:
        result = store.report(out, run=run, sample=sample, progress=steps)
    finally:
        steps.close()
    if json_out:
        print_json(result.as_dict())
        return
    say(result.text())
    if not result.complete:
        info(f"the report says {result.headline['status']}: {result.headline['why']}")
