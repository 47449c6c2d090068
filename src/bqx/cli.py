"""The ``bqx`` command line: parse options, call the library, print. No work is done here."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from typer._click.exceptions import ClickException, UsageError  # typer vendors click
from typer.core import TyperGroup

from bqx.config import Settings, load_settings
from bqx.errors import BqxError
from bqx.progress import plural

EXIT_CODES = (
    "Exit codes: 0 ok; 1 failed jobs, failed checks or an error (one line on stderr);"
    " 2 usage error (a bad option or value); 130 interrupted (Ctrl-C or SIGTERM; run the"
    " same command again to resume)."
)


class _Group(TyperGroup):
    """The top-level group: a usage error is one line on stderr (exit 2), like any bqx error."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        if not standalone_mode:
            return super().main(*args, standalone_mode=False, **kwargs)
        try:
            rv = super().main(*args, standalone_mode=False, **kwargs)
        except UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else " (see --help)"
            _error(f"{exc.format_message()}{where}")
            sys.exit(exc.exit_code)
        except ClickException as exc:
            _error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:  # a prompt answered with Ctrl-D, or refused
            _error("aborted")
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)

    def format_commands(self, ctx: Any, formatter: Any) -> None:
        """The command list with each command's whole first sentence (click cuts at 45)."""
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.get_command(ctx, name)
            if cmd is not None and not cmd.hidden:
                rows.append((name, cmd.get_short_help_str(limit=300)))
        if rows:
            with formatter.section("Commands"):
                formatter.write_dl(rows)


app = typer.Typer(
    cls=_Group,
    help="Backward-looking BQX metrics for forex minute bars, backfilled into PostgreSQL.",
    epilog=EXIT_CODES,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    # plain help: rich markup would eat "[default: …]" in help texts, and a flag has no type
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
    add_completion=True,
)
db_app = typer.Typer(help="Manage the embedded PostgreSQL server.", no_args_is_help=True)
app.add_typer(db_app, name="db")

# soft_wrap: one line per message whatever the width (logs, grep, `| tee`); when piped, tables
# and grids get room too instead of rich's 80 columns (COLUMNS, when set, still rules)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
for _c in (console, err_console):
    if not _c.is_terminal and not os.environ.get("COLUMNS"):
        _c.width = 240
# --quiet / --verbose, set by the top-level callback
VERBOSITY = {"level": 0}


def _error(message: str) -> None:
    from rich.text import Text

    # a Text, not markup: a message may hold brackets ("[default: …]", "[2024-07]")
    err_console.print(Text.assemble(("error:", "bold red"), " ", message), highlight=False)


def info(text: str) -> None:
    """A line for the person watching (stderr): silenced by --quiet."""
    if VERBOSITY["level"] >= 0:
        err_console.print(text, highlight=False, markup=False)


def _version(value: bool) -> None:
    if value:
        from bqx import __version__

        sys.stdout.write(f"bqx {__version__}\n")
        raise typer.Exit()


@app.callback()
def _options(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Print the version."
        ),
    ] = False,
    quiet: Annotated[
        bool,
        typer.Option(
            "--quiet", "-q", help="Only results, errors and failures: no progress, no notes."
        ),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="More detail: database in use, timings.")
    ] = False,
) -> None:
    """Backward-looking BQX metrics for forex minute bars, backfilled into PostgreSQL."""
    from bqx import progress

    VERBOSITY["level"] = -1 if quiet else 1 if verbose else 0
    progress.configure(quiet=quiet, verbose=verbose)
    console.quiet = quiet  # results printed for people; --json documents still print


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
    str | None,
    typer.Option("--schema", help="Schema for all bqx objects [env BQX_SCHEMA; default: bqx]."),
]
PairsOpt = Annotated[
    str | None, typer.Option("--pairs", help="Comma list of pairs, e.g. EURUSD,GBPUSD.")
]
StartOpt = Annotated[str | None, typer.Option("--start", help="First month, YYYY-MM.")]
EndOpt = Annotated[str | None, typer.Option("--end", help="Last month, YYYY-MM (inclusive).")]
JsonOpt = Annotated[bool, typer.Option("--json", help="One JSON document on stdout.")]


def settings_from(database_url: str | None, schema: str | None) -> Settings:
    settings = load_settings(database_url=database_url, schema_name=schema)
    if VERBOSITY["level"] > 0:
        from bqx.db import describe_target

        info(f"database: {describe_target(settings)} · schema {settings.schema_name}")
    return settings


def fail(message: str, code: int = 1) -> NoReturn:
    _error(message)
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
GenerateWorkersOpt = Annotated[
    int | None, typer.Option("--workers", help="Worker processes [default: 1].")
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
    json_out: JsonOpt = False,
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
    if json_out:
        print_json({"pair_months": n, "schema": layout.schema})
        return
    console.print(f"ready: {plural(n, 'pair-month')} in schema {layout.schema}", highlight=False)


@app.command()
def generate(
    pairs: PairsOpt = None,
    start: Annotated[str, typer.Option("--start", help="First month, YYYY-MM.")] = "2024-07",
    end: Annotated[str | None, typer.Option("--end", help="Last month [default: --start].")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (reproducible).")] = 0,
    workers: GenerateWorkersOpt = None,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Synthetic minute bars for 28 crosses of 8 correlated currencies into m1_{pair}."""
    from bqx.schema import REPORT_PAIRS, Layout, parse_pairs
    from bqx.sources.generate import generate as run_generate

    settings = settings_from(database_url, schema)
    summary = run_generate(
        settings, Layout(settings.schema_name), parse_pairs(pairs) or list(REPORT_PAIRS),
        _month(start), _month(end or start), seed=seed, workers=workers or 1,
    )  # fmt: skip
    if json_out:
        print_json({"bars": summary.bars, "pairs": [p.upper() for p in summary.pairs],
                    "months": [str(m) for m in summary.months],
                    "seconds": summary.seconds, "bars_per_s": summary.bars_per_s})  # fmt: skip
        return
    console.print(
        f"generated {plural(summary.bars, 'bar')} for {plural(len(summary.pairs), 'pair')} in "
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
) -> None:
    """Compute BQX metrics for every (pair, month) job; resumable, one transaction per job."""
    from bqx.backfill import backfill as run_backfill
    from bqx.schema import parse_pairs

    settings = settings_from(database_url, schema)
    summary = run_backfill(
        settings, _layout(settings, source_table, time_column, price_column),
        pairs=parse_pairs(pairs), start=_month(start), end=_month(end),
        windows=_windows(windows), mode=mode, max_fill=max_fill, workers=workers,
        force=force, job_timeout=job_timeout, progress=not json_out, executor=executor,
        scheduler=scheduler,
    )  # fmt: skip
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
    json_out: JsonOpt = False,
) -> None:
    """The tour: synthetic bars for 28 pairs, backfill, verify, report (embedded database)."""
    from bqx.db import describe_target
    from bqx.demo import run_demo
    from bqx.schema import parse_pairs

    settings = settings_from(database_url, schema)
    # with --json the narration goes to stderr and the document alone to stdout
    narrate = info if json_out else (lambda text: console.print(text, highlight=False))
    narrate(f"database: {describe_target(settings)}")
    result = run_demo(
        settings, months=months, pairs=parse_pairs(pairs), workers=workers, out=out, seed=seed,
        say=narrate, bqx=invocation(),
    )  # fmt: skip
    if json_out:
        print_json(result.as_dict())
    if result.run.jobs_failed or result.verify_ok is False:
        raise typer.Exit(1)


def invocation(
    argv0: str | None = None, executable: str | None = None, cwd: Path | None = None,
    which: Any = None,
) -> str:  # fmt: skip
    """How the user can run bqx again, as a shell command: ``bqx`` when that is on PATH,
    else the path they ran (``.venv/bin/bqx`` after ``make demo``), else ``python -m bqx.cli``.
    """
    import shlex
    import shutil

    argv0 = argv0 if argv0 is not None else sys.argv[0]
    executable = executable or sys.executable
    cwd = cwd or Path.cwd()
    which = which or shutil.which
    path = Path(argv0)
    if path.name in ("cli.py", "__main__.py", "-m", "-c", "") or path.suffix == ".py":
        return f"{shlex.quote(executable)} -m bqx.cli"
    on_path = which("bqx")
    if on_path and os.path.realpath(on_path) == os.path.realpath(cwd / path):
        return "bqx"
    if not path.is_absolute() and "/" in argv0:
        return shlex.quote(argv0)  # typed relative to this directory: works as typed
    try:
        return shlex.quote(str(Path(os.path.realpath(cwd / path)).relative_to(cwd.resolve())))
    except ValueError:
        return shlex.quote(str(path))


def _print_run(summary, json_out: bool) -> None:
    from dataclasses import asdict

    if json_out:
        doc = {**asdict(summary), "rows_per_s": summary.rows_per_s}
        doc["failures"] = [
            {"pair": p.upper(), "month": str(m), "error": e} for p, m, e in summary.failures
        ]
        print_json(doc)
        return
    console.print(
        f"run {summary.run_id}: {plural(summary.jobs_done, 'job')} done,"
        f" {summary.jobs_skipped} skipped, {summary.jobs_failed} failed of {summary.jobs_total}"
        f" · {plural(summary.rows_written, 'row')} in {summary.duration_s:.1f}s"
        f" ({summary.rows_per_s:,.0f} rows/s)",
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


def _status_line(doc: dict) -> str:
    """One line per refresh for logs (``status --watch`` when not on a terminal)."""
    from datetime import datetime

    from bqx.progress import format_eta

    now = datetime.now().strftime("%H:%M:%S")
    jobs, run = doc["jobs"], doc["run"]
    if run is None:
        return f"{now} no backfill run recorded yet"
    eta = "finished" if run["status"] != "running" else f"ETA {format_eta(doc['eta_s'])}"
    return (
        f"{now} run {run['run_id']} {run['status']} · jobs {jobs['done']}/{jobs['total']} done,"
        f" {jobs['running']} running, {jobs['failed']} failed, {jobs['pending']} pending ·"
        f" {plural(doc['rows'], 'row')} · {doc['rows_per_s']:,.0f} rows/s · {eta}"
        + (f" · {len(doc['stale'])} stale" if doc["stale"] else "")
    )


def _run_ended(doc: dict) -> int | None:
    """For --until-done: None while the run goes on; else the exit code (0 done, 1 not)."""
    run, jobs = doc["run"], doc["jobs"]
    if run is not None and run.get("stalled"):
        return 1  # marked running, yet its driver is gone: it will not end by itself
    if run is None or run["status"] == "running":
        return None
    ok = run["status"] == "done" and jobs["failed"] == 0 and jobs["done"] == jobs["total"]
    return 0 if ok else 1


def _render_status(doc: dict) -> Any:
    from rich.console import Group
    from rich.markup import escape
    from rich.table import Table

    from bqx.progress import format_eta
    from bqx.status import describe_parameters

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
        f" · {plural(run['workers'] or 0, run['executor'] + ' worker')} on {run['host']}"
    )
    if run.get("mode"):
        head.add_row(escape(describe_parameters(run)))
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
    import time as _time

    from rich.live import Live

    from bqx.db import connect
    from bqx.schema import Layout
    from bqx.status import status as read_status

    settings = settings_from(database_url, schema)
    layout = Layout(settings.schema_name)
    watch = watch or until_done
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
    import contextlib

    import psycopg
    from rich.text import Text

    live_view = console.is_terminal and not console.quiet
    code: int | None = None
    conn: Any = connect(settings, autocommit=True)  # a bad configuration fails here, at once
    try:
        with (
            Live(Text("reading the ledger…"), console=console, auto_refresh=False)
            if live_view
            else contextlib.nullcontext()
        ) as live:
            while True:
                doc = None
                try:
                    if conn is None or conn.closed:
                        conn = connect(settings, autocommit=True)
                    doc = read_status(conn, layout)
                    view: Any = _render_status(doc) if live_view else _status_line(doc)
                except (psycopg.OperationalError, BqxError) as exc:
                    if conn is not None:
                        conn.close()
                    conn = None
                    first = (str(exc).strip() or "error").splitlines()[0]
                    view = Text(f"database unreachable, retrying: {first}", style="red")
                if live is not None:
                    live.update(view, refresh=True)
                else:
                    # plain lines: one per refresh, flushed at once for `| tee` and CI logs
                    err = isinstance(view, Text)
                    (err_console if err else console).print(view, highlight=False, markup=False)
                    sys.stdout.flush()
                if until_done and doc is not None:
                    code = _run_ended(doc)
                    if code is not None:
                        break
                _time.sleep(interval)
    except KeyboardInterrupt:
        pass
    finally:
        if conn is not None:
            conn.close()
    if code:
        raise typer.Exit(code)


SampleOpt = Annotated[
    int, typer.Option("--sample", min=0, help="Rows per pair recomputed from the source (≥ 0).")
]
SCOPE_HELP = (
    "Only this run's jobs [default: every job in the ledger, with the latest run that planned"
    " jobs]."
)
RunOpt = Annotated[int | None, typer.Option("--run", min=1, help=SCOPE_HELP)]


@app.command()
def verify(
    sample: SampleOpt = 50,
    run: RunOpt = None,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Exact checks: partitions, row counts, keys, NULLs, recomputed samples, ledger.

    Scope: every job in the ledger, unless --run names one run (the same rule as `bqx
    report`). Exit 0 only when every check passes; nothing to check is not a pass (exit 1).
    """
    import time as _time

    from rich.text import Text

    from bqx.db import connect
    from bqx.progress import StepProgress
    from bqx.schema import Layout
    from bqx.verify import verify as run_verify

    settings = settings_from(database_url, schema)
    steps = StepProgress("verify")
    t0 = _time.monotonic()
    try:
        with connect(settings, autocommit=True) as conn:
            result = run_verify(
                conn, Layout(settings.schema_name), sample=sample, run_id=run, progress=steps
            )
    finally:
        steps.close()
    if json_out:
        print_json(result.as_dict())
    elif result.nothing_to_check:
        _error(f"nothing to check: {result.nothing_to_check}")
    else:
        for c in result.checks:
            mark = ("PASS", "green") if c.ok else ("FAIL", "bold red")
            line = Text.assemble(mark, f" {c.name}: {c.detail}")
            # --quiet keeps the failures (on stderr), drops the passes
            (console if not console.quiet or c.ok else err_console).print(line, highlight=False)
        if VERBOSITY["level"] > 0:
            info(f"verified {plural(result.jobs, 'job')} in {_time.monotonic() - t0:.1f} s")
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
    from bqx.db import connect
    from bqx.progress import StepProgress
    from bqx.report import check_out_dir, write_report
    from bqx.schema import Layout

    settings = settings_from(database_url, schema)
    check_out_dir(out)  # before any work: a bad --out is one line, and nothing is written
    steps = StepProgress("report")
    try:
        with connect(settings, autocommit=True) as conn:
            md, html, data = write_report(
                conn, Layout(settings.schema_name), out, run_id=run, sample=sample,
                progress=steps,
            )  # fmt: skip
    finally:
        steps.close()
    if json_out:
        print_json({"markdown": str(md), "html": str(html), **data.headline()})
        return
    console.print(f"report: {md}\n        {html}", highlight=False)
    if data.headline()["status"] != "COMPLETE":
        info(f"the report says {data.headline()['status']}: {data.headline()['why']}")


if __name__ == "__main__":  # pragma: no cover
    main()
