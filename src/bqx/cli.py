"""The ``bqx`` command line: parse options, call the library, print. No work is done here."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console

from bqx.config import Settings, load_settings
from bqx.errors import BqxError

app = typer.Typer(
    help="Backward-looking BQX metrics for forex minute bars, backfilled into PostgreSQL.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
db_app = typer.Typer(help="Manage the embedded PostgreSQL server.", no_args_is_help=True)
app.add_typer(db_app, name="db")

console = Console()
err_console = Console(stderr=True)

# -- shared options -----------------------------------------------------------------------

DatabaseOpt = Annotated[
    str | None,
    typer.Option(
        "--database-url",
        help="PostgreSQL URL (default: BQX_DATABASE_URL, libpq PG* variables, else embedded).",
        show_default=False,
    ),
]
SchemaOpt = Annotated[
    str | None, typer.Option("--schema", help="Schema for all bqx objects [env BQX_SCHEMA; bqx].")
]
PairsOpt = Annotated[
    str | None, typer.Option("--pairs", help="Comma list of pairs, e.g. EURUSD,GBPUSD.")
]
StartOpt = Annotated[str | None, typer.Option("--start", help="First month, YYYY-MM.")]
EndOpt = Annotated[str | None, typer.Option("--end", help="Last month, YYYY-MM (inclusive).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def settings_from(database_url: str | None, schema: str | None) -> Settings:
    return load_settings(database_url=database_url, schema_name=schema)


def fail(message: str, code: int = 1) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def main() -> None:
    """Entry point: user errors print one line, never a traceback."""
    try:
        app()
    except BqxError as exc:
        err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
        sys.exit(1)
    except KeyboardInterrupt:
        # the backfill has already stopped its workers and handed their jobs back
        err_console.print("interrupted: run the same command again to resume", highlight=False)
        sys.exit(130)


# -- db -----------------------------------------------------------------------------------
# (section: db — owned by the lead)


@db_app.command("start")
def db_start() -> None:
    """Start the embedded PostgreSQL (initialising it on first use)."""
    from bqx.db import embedded, mask_url

    settings = load_settings()
    url = embedded(settings).start()
    console.print(f"embedded PostgreSQL running: {mask_url(url)}", highlight=False)


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL."""
    from bqx.db import embedded

    stopped = embedded(load_settings()).stop()
    console.print("stopped" if stopped else "not running")


@db_app.command("status")
def db_status(json_out: JsonOpt = False) -> None:
    """Say which database bqx uses and whether the embedded server runs."""
    from bqx.db import describe_target, embedded

    settings = load_settings()
    server = embedded(settings)
    doc = {
        "database": describe_target(settings),
        "embedded": settings.uses_embedded(),
        "running": server.is_running() if settings.uses_embedded() else None,
        "datadir": str(server.datadir) if settings.uses_embedded() else None,
    }
    if json_out:
        print_json(doc)
        return
    console.print(f"database: {doc['database']}", highlight=False)
    if doc["embedded"]:
        console.print(f"embedded server: {'running' if doc['running'] else 'stopped'}")


@db_app.command("url")
def db_url(
    show_password: Annotated[
        bool, typer.Option("--show-password", help="Print the password too (for scripts).")
    ] = False,
) -> None:
    """Print the database URL in use (password masked unless --show-password)."""
    from bqx.db import mask_url, resolve_url

    url = resolve_url(load_settings())
    if not url:
        fail("no URL: the server is given by libpq PG* environment variables")
    sys.stdout.write((url if show_password else mask_url(url)) + "\n")


# -- init / generate / backfill / demo ---------------------------------------------------
# (section: lead)

WindowsOpt = Annotated[
    str, typer.Option("--windows", help="Window sizes in bars/minutes, comma separated.")
]
ModeOpt = Annotated[str, typer.Option("--mode", help="Window mode: bars or clock.")]
MaxFillOpt = Annotated[
    int,
    typer.Option("--max-fill", help="clock mode: forward-fill a price at most this many minutes."),
]
SourceTableOpt = Annotated[
    str, typer.Option("--source-table", help="Source table pattern, e.g. 'bqx.m1_{pair}'.")
]
TimeColOpt = Annotated[str, typer.Option("--time-column", help="Source time column.")]
PriceColOpt = Annotated[str, typer.Option("--price-column", help="Source price column.")]
WorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Worker processes [default: CPU count].")
]


def _windows(text: str) -> tuple[int, ...]:
    from bqx.metrics import normalize_windows

    try:
        return normalize_windows([int(w) for w in text.split(",") if w.strip()])
    except ValueError as exc:
        raise BqxError(f"invalid --windows {text!r}: {exc}") from None


def _layout(settings: Settings, source_table: str, time_column: str, price_column: str):
    from bqx.schema import Layout

    return Layout(settings.schema_name, source_table, time_column, price_column)


def _month(text: str | None):
    from bqx.schema import Month

    return Month.parse(text) if text else None


@app.command()
def init(
    pairs: PairsOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    windows: WindowsOpt = "15,30,45,60,75",
    source_table: SourceTableOpt = "m1_{pair}",
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Create schema, source and target tables, monthly partitions and the ledger (idempotent)."""
    from bqx.backfill import init as init_tables
    from bqx.db import connect
    from bqx.schema import REPORT_PAIRS, month_range, parse_pairs

    settings = settings_from(database_url, schema)
    if not start or not end:
        raise BqxError("init needs --start and --end (months, YYYY-MM)")
    layout = _layout(settings, source_table, "time", "close")
    months = month_range(_month(start), _month(end))
    with connect(settings, autocommit=True) as conn:
        n = init_tables(
            conn, layout, parse_pairs(pairs) or list(REPORT_PAIRS), months, _windows(windows)
        )
    console.print(f"ready: {n} pair-months in schema {layout.schema}", highlight=False)


@app.command()
def generate(
    pairs: PairsOpt = None,
    start: Annotated[str, typer.Option("--start", help="First month, YYYY-MM.")] = "2024-07",
    end: Annotated[str | None, typer.Option("--end", help="Last month [default: --start].")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (reproducible).")] = 0,
    workers: WorkersOpt = None,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Synthetic minute bars for 28 crosses of 8 correlated currencies into m1_{pair}."""
    from bqx.schema import REPORT_PAIRS, Layout, parse_pairs
    from bqx.sources.generate import generate as run_generate

    settings = settings_from(database_url, schema)
    summary = run_generate(
        settings, Layout(settings.schema_name), parse_pairs(pairs) or list(REPORT_PAIRS),
        _month(start), _month(end or start), seed=seed, workers=workers or 1,
    )  # fmt: skip
    console.print(
        f"generated {summary.bars:,} bars for {len(summary.pairs)} pairs in "
        f"{summary.seconds:.1f}s ({summary.bars_per_s:,.0f} bars/s)",
        highlight=False,
    )


@app.command()
def backfill(
    pairs: PairsOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    workers: WorkersOpt = None,
    force: Annotated[bool, typer.Option("--force", help="Redo jobs already done.")] = False,
    windows: WindowsOpt = "15,30,45,60,75",
    mode: ModeOpt = "bars",
    max_fill: MaxFillOpt = 5,
    job_timeout: Annotated[
        float, typer.Option("--job-timeout", help="Seconds before a job is stopped and retried.")
    ] = 600.0,
    executor: Annotated[
        str, typer.Option("--executor", help="local (processes) or dask (a Dask cluster).")
    ] = "local",
    scheduler: Annotated[
        str | None,
        typer.Option("--scheduler", help="Dask scheduler address (default: a local cluster)."),
    ] = None,
    source_table: SourceTableOpt = "m1_{pair}",
    time_column: TimeColOpt = "time",
    price_column: PriceColOpt = "close",
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
    json_out: JsonOpt = False,
    source_check: Annotated[
        str,
        typer.Option(
            "--source-check",
            help="How resume tells that a job's source bars changed: auto (the versions bqx"
            " keeps on the tables it writes, guarded by triggers; other tables are hashed) or"
            " exact (hash every bar each job reads). See docs/guarantees.md.",
        ),
    ] = "auto",
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Show the jobs to do and to skip, and why; write nothing."),
    ] = False,
) -> None:
    """Compute BQX metrics for every (pair, month) job; resumable, one transaction per job.

    Exit codes: 0 done, 1 a job failed or bad input, 2 nothing to do (no source bars in range).
    """
    from bqx.backfill import NothingToPlan
    from bqx.backfill import backfill as run_backfill
    from bqx.schema import parse_pairs

    settings = settings_from(database_url, schema)
    layout = _layout(settings, source_table, time_column, price_column)
    try:
        if dry_run:
            _print_plan(
                settings, layout, parse_pairs(pairs), _month(start), _month(end),
                _windows(windows), mode, max_fill, force, source_check, json_out,
            )  # fmt: skip
            return
        summary = run_backfill(
            settings, layout,
            pairs=parse_pairs(pairs), start=_month(start), end=_month(end),
            windows=_windows(windows), mode=mode, max_fill=max_fill, workers=workers,
            force=force, job_timeout=job_timeout, progress=not json_out, executor=executor,
            scheduler=scheduler, source_check=source_check,
        )  # fmt: skip
    except NothingToPlan as exc:
        fail(str(exc), NothingToPlan.exit_code)
    _print_run(summary, json_out)
    if summary.jobs_failed:
        raise typer.Exit(1)


@app.command()
def demo(
    months: Annotated[
        int, typer.Option("--months", min=1, max=12, help="Months from 2024-07 (12 = the report).")
    ] = 3,
    pairs: PairsOpt = None,
    workers: WorkersOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Where the report goes.")] = Path("bqx-report"),
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the synthetic bars.")] = 0,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """The tour: synthetic bars for 28 pairs, backfill, verify, report (embedded database)."""
    from bqx.db import describe_target
    from bqx.demo import run_demo
    from bqx.schema import parse_pairs

    settings = settings_from(database_url, schema)
    console.print(f"database: {describe_target(settings)}", highlight=False)
    result = run_demo(
        settings, months=months, pairs=parse_pairs(pairs), workers=workers, out=out, seed=seed,
        say=lambda text: console.print(text, highlight=False, soft_wrap=True),
    )  # fmt: skip
    if result.run.jobs_failed or result.verify_ok is False:
        raise typer.Exit(1)


def _print_plan(settings, layout, pairs, start, end, windows, mode, max_fill, force,
                source_check, json_out) -> None:  # fmt: skip
    from bqx.backfill import Params, plan_backfill
    from bqx.db import connect

    params = Params.build(layout, windows, mode, max_fill)
    with connect(settings, autocommit=True) as conn:
        plan = plan_backfill(conn, params, pairs, start, end, force=force,
                             source_check=source_check)  # fmt: skip
    if json_out:
        print_json(plan.to_dict())
        return
    for job in plan.jobs:
        console.print(
            f"{job.action:4} {job.pair.upper()} {job.month}  {job.reason}", highlight=False
        )
    doc = plan.to_dict()
    reasons = ", ".join(f"{n} {r}" for r, n in sorted(doc["reasons"].items()))
    console.print(
        f"dry run: {doc['jobs_todo']} of {doc['jobs_total']} jobs to do, {doc['jobs_skipped']}"
        f" to skip ({reasons}); nothing was written",
        highlight=False,
    )


def _print_run(summary, json_out: bool) -> None:
    from dataclasses import asdict

    if json_out:
        print_json({**asdict(summary), "rows_per_s": summary.rows_per_s})
        return
    console.print(
        f"run {summary.run_id}: {summary.jobs_done} jobs done, {summary.jobs_skipped} skipped,"
        f" {summary.jobs_failed} failed of {summary.jobs_total} · {summary.rows_written:,} rows"
        f" in {summary.duration_s:.1f}s ({summary.rows_per_s:,.0f} rows/s)",
        highlight=False,
    )
    for pair, month, error in summary.failures:
        err_console.print(f"[red]failed[/] {pair.upper()} {month}: {error}", highlight=False)


# -- ingest -------------------------------------------------------------------------------
# (section: ingest)


@app.command()
def ingest(
    files: Annotated[
        list[Path], typer.Argument(help="Bar files (.csv, .txt, .gz, .zip, .parquet).")
    ],
    pair: Annotated[str, typer.Option("--pair", help="The pair these bars are, e.g. EURUSD.")],
    fmt: Annotated[
        str, typer.Option("--format", help="auto|histdata|dukascopy|metatrader|csv|parquet.")
    ] = "auto",
    tz: Annotated[
        str | None,
        typer.Option(
            "--tz", help="Time zone of naive times (MetaTrader server time, CSV), e.g. EET."
        ),
    ] = None,
    columns: Annotated[
        str | None,
        typer.Option("--columns", help="csv/parquet column mapping: time=Date,close=Last,volume="),
    ] = None,
    time_format: Annotated[
        str | None, typer.Option("--time-format", help="csv/parquet strptime format of the time.")
    ] = None,
    rejects: Annotated[
        Path | None,
        typer.Option("--rejects", help="Rejects file [default: FIRST_FILE.rejects.csv]."),
    ] = None,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Load minute-bar files into m1_{pair}; bad rows go to a rejects file with line and reason."""
    from bqx.schema import Layout
    from bqx.sources.ingest import Mapping, ingest_files

    settings = settings_from(database_url, schema)
    say = None if json_out else (lambda text: err_console.print(text, highlight=False))
    summary = ingest_files(
        settings, Layout(settings.schema_name), files, pair, fmt=fmt, tz=tz,
        mapping=Mapping.parse(columns, time_format), rejects_path=rejects, progress=say,
    )  # fmt: skip
    if json_out:
        print_json(summary.as_dict())
        return
    console.print(
        f"{summary.pair.upper()}: {summary.accepted:,} bars accepted ({summary.inserted:,} new,"
        f" {summary.updated:,} changed, {summary.unchanged:,} unchanged),"
        f" {summary.rejected:,} rejected, {summary.duplicates:,} duplicates"
        f" in {summary.seconds:.1f}s",
        highlight=False,
        soft_wrap=True,  # one line, for people and for grep
    )
    if summary.rejects_file:
        console.print(
            f"rejected rows with line and reason: {summary.rejects_file}",
            highlight=False,
            soft_wrap=True,
        )


# -- status / verify / report -------------------------------------------------------------
# (section: operate)


def _render_status(doc: dict) -> Any:
    from rich.console import Group
    from rich.table import Table

    from bqx.progress import format_eta

    jobs, run = doc["jobs"], doc["run"]
    head = Table.grid(padding=(0, 2))
    if run is None:
        head.add_row("no backfill run recorded yet")
        return head
    color = {"done": "green", "running": "cyan"}.get(run["status"], "red")
    start = run["started_at"][:19].replace("T", " ")
    when = f"started {start} UTC"
    if run["ended_at"]:
        end = run["ended_at"][:19].replace("T", " ")
        when += f", ended {end[11:] if end[:10] == start[:10] else end}"
    head.add_row(
        f"run {run['run_id']} [bold {color}]{run['status']}[/] · {when} ({run['elapsed_s']:.1f} s)"
        f" · {run['workers']} {run['executor']} workers on {run['host']}"
    )
    head.add_row(
        f"jobs {jobs['done']}/{jobs['total']} done · {jobs['running']} running ·"
        f" [{'red' if jobs['failed'] else 'default'}]{jobs['failed']} failed[/] ·"
        f" {jobs['pending']} pending ({run['skipped']} skipped as already done)"
    )
    eta = "finished" if run["status"] != "running" else f"ETA {format_eta(doc['eta_s'])}"
    head.add_row(
        f"rows {doc['rows']:,} · {doc['rows_per_s']:,.0f} rows/s · {eta}"
        + (f" · [red]{len(doc['stale'])} stale[/]" if doc["stale"] else "")
    )
    ledger = doc.get("ledger") or {}
    if ledger and ledger["total"] != jobs["total"]:  # the run covered part of the ledger
        head.add_row(
            f"whole ledger: {ledger['done']}/{ledger['total']} jobs done · {ledger['running']}"
            f" running · {ledger['failed']} failed · {ledger['pending']} pending ·"
            f" {ledger['rows']:,} rows"
        )
    if run.get("stalled"):
        head.add_row(
            f"[bold red]no activity for {run['last_activity_s']:.0f} s[/]: the backfill driving"
            " this run seems gone; rerun `bqx backfill` to resume"
        )
    pairs = Table(title="per pair", show_edge=False)
    for col in ("pair", "months", "rows", "running", "failed"):
        pairs.add_column(col, justify="left" if col == "pair" else "right")
    for p in doc["pairs"]:
        pairs.add_row(p["pair"].upper(), f"{p['months_done']}/{p['months_planned']}",
                      f"{p['rows']:,}", str(p["running"]), str(p["failed"]))  # fmt: skip
    parts: list[Any] = [head, pairs]
    if doc["running"]:
        running = Table(title="running jobs", show_edge=False)
        for col in ("pair", "month", "worker", "running s", "heartbeat age s", "stale"):
            running.add_column(col)
        for j in doc["running"]:
            stale = "[red]STALE[/]" if j["stale"] else ""
            running.add_row(j["pair"].upper(), j["month"], j["worker"] or "",
                            f"{j['running_s']}", f"{j['heartbeat_age_s']}", stale)  # fmt: skip
        parts.append(running)
    if doc["errors"]:
        errors = Table(title="last errors", show_edge=False)
        for col in ("at", "pair", "month", "outcome"):
            errors.add_column(col, no_wrap=True)
        errors.add_column("error", overflow="fold")
        for e in doc["errors"]:
            errors.add_row(e["at"].replace("T", " ")[:19], e["pair"].upper(), e["month"],
                           e["status"], e["error"])  # fmt: skip
        parts.append(errors)
    return Group(*parts)


@app.command()
def status(
    watch: Annotated[bool, typer.Option("--watch", help="Refresh live until Ctrl-C.")] = False,
    interval: Annotated[float, typer.Option("--interval", help="Seconds between refreshes.")] = 1.5,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Progress of the latest backfill from the ledger: jobs, rows, rate, ETA, workers, errors."""
    import time as _time

    from rich.live import Live

    from bqx.db import connect
    from bqx.schema import Layout
    from bqx.status import status as read_status

    settings = settings_from(database_url, schema)
    layout = Layout(settings.schema_name)
    if json_out or not watch:
        with connect(settings, autocommit=True) as conn:
            doc = read_status(conn, layout)
        if json_out:
            print_json(doc)
        else:
            console.print(_render_status(doc))
        return
    # --watch keeps one connection; when it is lost (server restart, network) a notice is
    # shown and the connection reopened instead of ending the watch
    import psycopg
    from rich.text import Text

    conn: Any = connect(settings, autocommit=True)  # a bad configuration fails here, at once
    try:
        with Live(Text("reading the ledger…"), console=console, auto_refresh=False) as live:
            while True:
                try:
                    if conn is None or conn.closed:
                        conn = connect(settings, autocommit=True)
                    view = _render_status(read_status(conn, layout))
                except (psycopg.OperationalError, BqxError) as exc:
                    if conn is not None:
                        conn.close()
                    conn = None
                    first = (str(exc).strip() or "error").splitlines()[0]
                    view = Text(f"database unreachable, retrying: {first}", style="red")
                live.update(view, refresh=True)
                _time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if conn is not None:
            conn.close()


SampleOpt = Annotated[int, typer.Option("--sample", help="Rows per pair recomputed from source.")]


@app.command()
def verify(
    sample: SampleOpt = 50,
    run: Annotated[int | None, typer.Option("--run", help="Run id [default: latest].")] = None,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Exact checks: partitions, row counts, keys, NULLs, recomputed samples, ledger."""
    from bqx.db import connect
    from bqx.schema import Layout
    from bqx.verify import verify as run_verify

    settings = settings_from(database_url, schema)
    with connect(settings, autocommit=True) as conn:
        result = run_verify(conn, Layout(settings.schema_name), sample=sample, run_id=run)
    if json_out:
        print_json(result.as_dict())
    else:
        for c in result.checks:
            mark = "[green]PASS[/]" if c.ok else "[bold red]FAIL[/]"
            console.print(f"{mark} {c.name}: {c.detail}", highlight=False, soft_wrap=True)
    if not result.ok:
        raise typer.Exit(1)


@app.command()
def report(
    out: Annotated[
        Path, typer.Option("--out", help="Directory for report.md and report.html.")
    ] = Path("bqx-report"),
    run: Annotated[int | None, typer.Option("--run", help="Run id [default: latest].")] = None,
    sample: SampleOpt = 20,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """The completion report (Markdown and self-contained HTML with charts) from the ledger."""
    from bqx.db import connect
    from bqx.report import write_report
    from bqx.schema import Layout

    settings = settings_from(database_url, schema)
    with connect(settings, autocommit=True) as conn:
        md, html, _ = write_report(
            conn, Layout(settings.schema_name), out, run_id=run, sample=sample
        )
    console.print(f"report: {md}\n        {html}", highlight=False)


if __name__ == "__main__":  # pragma: no cover
    main()
