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
    executor: Annotated[str, typer.Option("--executor", help="local (processes).")] = "local",
    source_table: SourceTableOpt = "m1_{pair}",
    time_column: TimeColOpt = "time",
    price_column: PriceColOpt = "close",
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compute BQX metrics for every (pair, month) job; resumable, one transaction per job."""
    from bqx.backfill import backfill as run_backfill
    from bqx.schema import parse_pairs

    if executor != "local":
        raise BqxError(f"executor {executor!r} is not available yet: use --executor local")
    settings = settings_from(database_url, schema)
    summary = run_backfill(
        settings, _layout(settings, source_table, time_column, price_column),
        pairs=parse_pairs(pairs), start=_month(start), end=_month(end),
        windows=_windows(windows), mode=mode, max_fill=max_fill, workers=workers,
        force=force, job_timeout=job_timeout, progress=not json_out,
    )  # fmt: skip
    _print_run(summary, json_out)
    if summary.jobs_failed:
        raise typer.Exit(1)


@app.command()
def demo(
    months: Annotated[
        int, typer.Option("--months", min=1, max=12, help="Months from 2024-07 (12 = the report).")
    ] = 1,
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
        say=lambda text: console.print(text, highlight=False),
    )  # fmt: skip
    if result.run.jobs_failed or result.verify_ok is False:
        raise typer.Exit(1)


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

# -- status / verify / report -------------------------------------------------------------
# (section: operate)


if __name__ == "__main__":  # pragma: no cover
    main()
