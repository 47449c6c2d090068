"""The ``bqx`` command line: parse options, call the library, print. No work is done here."""

from __future__ import annotations

import json
import os
import signal
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
    " 2 usage error (a bad option or value); 3 nothing to do (backfill: no source bars in"
    " the range); 130 interrupted (Ctrl-C or SIGTERM; run the"
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

    from bqx.db import mask_text

    message = mask_text(message, *_given_urls())  # no password, whatever the message holds
    # a Text, not markup: a message may hold brackets ("[default: …]", "[2024-07]")
    err_console.print(
        Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True
    )


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


def _given_urls() -> list[str]:
    """Database URLs given to this process, whose passwords no message may show."""
    import os

    urls = [os.environ.get("BQX_DATABASE_URL") or ""]
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--database-url" and i + 1 < len(args):
            urls.append(args[i + 1])
        elif arg.startswith("--database-url="):
            urls.append(arg.split("=", 1)[1])
    return [u for u in urls if u]


def _error_line(exc: BaseException) -> str:
    from bqx.db import mask_text

    return mask_text(str(exc).strip() or type(exc).__name__, *_given_urls())


RESUMABLE = ("backfill", "update", "ingest", "generate", "demo", "init")


def main() -> None:
    """Entry point: user errors print one line, never a traceback, never a password
    (``BQX_DEBUG=1`` shows the traceback of a database error).

    Ctrl-C and SIGTERM (what schedulers and systemd send) stop a command the same way: the
    work in flight is handed back, and the exit code is 130.
    """
    import os

    import psycopg

    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        app()
    except BqxError as exc:
        _error(_error_line(exc))
        sys.exit(1)
    except psycopg.Error as exc:  # the server went away, refused us, or refused a statement
        if os.environ.get("BQX_DEBUG"):
            raise
        _error("database: " + _error_line(exc).splitlines()[0])
        sys.exit(1)
    except SystemExit as exc:
        if exc.code in (0, None) or (not interrupted and exc.code != 130):
            raise  # 130 without our flag: typer's own exit for Ctrl-C
        _say_interrupted()
        sys.exit(130)
    except KeyboardInterrupt:
        _say_interrupted()
        sys.exit(130)


def _say_interrupted() -> None:
    """Typer turns Ctrl-C into exit 130 before main() sees it: say what to do next here."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    hint = ": run the same command again to resume" if command in RESUMABLE else ""
    err_console.print(f"interrupted{hint}", highlight=False, soft_wrap=True)


# -- db -----------------------------------------------------------------------------------
# (section: db)


def _url_is_set(settings: Settings) -> str | None:
    """How the user named another database, or None when bqx uses its embedded server."""
    if settings.database_url is not None:
        return "a database URL is set (BQX_DATABASE_URL or --database-url)"
    if settings.uses_libpq_env():
        return "libpq PG* variables name the database"
    return None


@db_app.command("start")
def db_start(database_url: DatabaseOpt = None) -> None:
    """Start the embedded PostgreSQL (initialising it on first use)."""
    from bqx.db import describe_target, embedded

    settings = settings_from(database_url, None)
    other = _url_is_set(settings)
    if other:
        console.print(
            f"{other}: bqx uses {describe_target(settings)}; no embedded server started",
            highlight=False, soft_wrap=True,
        )  # fmt: skip
        return
    server = embedded(settings)
    server.start()
    console.print(f"embedded PostgreSQL running: {server.url}", highlight=False, soft_wrap=True)


@db_app.command("stop")
def db_stop() -> None:
    """Stop the embedded PostgreSQL (read-only commands won't start it again)."""
    from bqx.db import embedded

    stopped = embedded(load_settings()).stop()
    console.print("stopped" if stopped else "not running")


@db_app.command("status")
def db_status(json_out: JsonOpt = False, database_url: DatabaseOpt = None) -> None:
    """Say which database bqx uses and whether it answers; exit 1 if it doesn't."""
    from bqx.db import describe_target, embedded, server_version

    settings = settings_from(database_url, None)
    server = embedded(settings)
    uses_embedded = settings.uses_embedded()
    doc: dict[str, Any] = {
        "database": describe_target(settings),
        "embedded": uses_embedded,
        "running": server.is_running() if uses_embedded else None,
        "datadir": str(server.datadir) if uses_embedded else None,
        "reachable": False,
        "server_version": None,
        "error": None,
    }
    if doc["running"] is not False:
        try:
            doc["server_version"] = server_version(settings)
            doc["reachable"] = True
        except BqxError as exc:
            doc["error"] = _error_line(exc)
    elif not server.exists():
        doc["error"] = "no embedded server yet: `bqx db start` creates it"
    elif server.stop_marker.exists():
        doc["error"] = "embedded server stopped by `bqx db stop`: start it with `bqx db start`"
    else:
        doc["error"] = "embedded server not running: start it with `bqx db start`"
    if json_out:
        print_json(doc)
    else:
        console.print(f"database: {doc['database']}", highlight=False, soft_wrap=True)
        if uses_embedded:
            console.print(f"embedded server: {'running' if doc['running'] else 'stopped'}")
        if doc["reachable"]:
            console.print(f"reachable: PostgreSQL {doc['server_version']}", highlight=False)
        else:
            err_console.print(f"[bold red]unreachable:[/] {doc['error']}", highlight=False,
                              soft_wrap=True)  # fmt: skip
    if not doc["reachable"]:
        raise typer.Exit(1)


@db_app.command("url")
def db_url(
    show_password: Annotated[
        bool, typer.Option("--show-password", help="Print the password too (for scripts).")
    ] = False,
    database_url: DatabaseOpt = None,
) -> None:
    """Print the database URL in use (password masked unless --show-password).

    The embedded server's URL names its password file instead of carrying the password.
    """
    from bqx.db import embedded, mask_url, resolve_url

    settings = settings_from(database_url, None)
    url = resolve_url(settings, start=False)
    if not url:
        fail("no URL: the server is given by libpq PG* environment variables")
    if show_password and settings.uses_embedded():
        url = embedded(settings).url_with_password()
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
    end: Annotated[str | None, typer.Option("--end", help="Last month (default: --start).")] = None,
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
                    "months": [str(m) for m in summary.months], "seed": seed,
                    "seconds": summary.seconds, "bars_per_s": summary.bars_per_s})  # fmt: skip
        return
    months = summary.months[0] + (f"..{summary.months[-1]}" if len(summary.months) > 1 else "")
    console.print(
        f"generated {plural(summary.bars, 'bar')} for {plural(len(summary.pairs), 'pair')},"
        f" {months} (seed {seed}; a month's bars depend only on the seed) in"
        f" {summary.seconds:.1f}s ({summary.bars_per_s:,.0f} bars/s)",
        highlight=False,
        soft_wrap=True,
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
        str,
        typer.Option(
            "--executor",
            help="threads (worker threads of this process), local (a worker process each:"
            " isolated, about a CPU-second to start) or dask (a Dask cluster).",
        ),
    ] = "threads",
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

    Exit codes: 0 done, 1 a job failed or bad input, 2 usage, 3 nothing to do (no bars in range).
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
def update(
    pairs: PairsOpt = None,
    recheck: Annotated[
        str,
        typer.Option(
            "--recheck",
            help="Horizon before the newest metric row where late and corrected bars are"
            " looked for: seconds, or 30m, 6h, 1d.",
        ),
    ] = "1d",
    follow: Annotated[
        float | None,
        typer.Option(
            "--follow",
            help="Keep the targets current: update, wait SECONDS (or until bqx's own ingest"
            " commits bars), repeat; SIGTERM or Ctrl-C stops it.",
        ),
    ] = None,
    metrics_port: Annotated[
        int | None,
        typer.Option("--metrics-port", help="With --follow: Prometheus metrics on 127.0.0.1."),
    ] = None,
    windows: Annotated[
        str | None, typer.Option("--windows", help="Windows [default: as last computed].")
    ] = None,
    mode: Annotated[str | None, typer.Option("--mode", help="bars or clock [as last].")] = None,
    max_fill: Annotated[
        int | None, typer.Option("--max-fill", help="clock mode fill [as last].")
    ] = None,
    source_table: SourceTableOpt = "m1_{pair}",
    time_column: TimeColOpt = "time",
    price_column: PriceColOpt = "close",
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Compute only bars newer than each pair's target holds (and late or corrected ones)."""
    from bqx.backfill.update import follow as run_follow
    from bqx.backfill.update import parse_duration, stop_on_signals
    from bqx.backfill.update import update as run_update
    from bqx.schema import parse_pairs

    settings = settings_from(database_url, schema)
    layout = _layout(settings, source_table, time_column, price_column)
    recheck_s = parse_duration(recheck)
    if follow is None:
        if metrics_port is not None:
            raise BqxError("--metrics-port goes with --follow SECONDS")
        result = run_update(
            settings, layout, pairs=parse_pairs(pairs), recheck_s=recheck_s,
            windows=_windows(windows) if windows else None, mode=mode, max_fill=max_fill,
        )  # fmt: skip
        if json_out:
            print_json({"rows": result.rows, "pairs": [p.as_dict() for p in result.pairs],
                        "run_ids": result.run_ids})  # fmt: skip
            return
        for p in result.pairs:
            if p.written or p.busy:
                busy = f" ({', '.join(p.busy)} left to a running backfill)" if p.busy else ""
                console.print(f"{p.pair.upper()}: +{p.new_rows:,} new, {p.changed_rows:,}"
                              f" changed, {p.deleted_rows:,} removed{busy}",
                              highlight=False)  # fmt: skip
        lag = max((p.lag_s or 0 for p in result.pairs), default=0)
        console.print(f"{result.rows:,} rows written for {len(result.pairs)} pairs in"
                      f" {result.seconds:.2f}s · lag max {lag:.0f} s", highlight=False)  # fmt: skip
        return
    if json_out:
        raise BqxError("--json goes without --follow (monitor --follow with --metrics-port)")
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s bqx update: %(message)s")  # fmt: skip
    run_follow(
        settings, layout, follow, pairs=parse_pairs(pairs), recheck_s=recheck_s,
        metrics_port=metrics_port, stop=stop_on_signals(),
        windows=_windows(windows) if windows else None, mode=mode, max_fill=max_fill,
    )  # fmt: skip


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
        typer.Option("--rejects", help="Rejects file (default: FIRST_FILE.rejects.csv)."),
    ] = None,
    allow_mismatch: Annotated[
        bool,
        typer.Option(
            "--allow-mismatch",
            help="Load even if the file name names another pair or the prices are far from"
            " the pair's stored bars.",
        ),
    ] = False,
    drop_flat: Annotated[
        bool,
        typer.Option(
            "--drop-flat",
            help="Leave out flat zero-volume bars (Dukascopy's filler when the market is shut).",
        ),
    ] = False,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Load minute-bar files into m1_{pair}; bad rows go to a rejects file with line and reason.

    Formats, time zones and the rejects file: docs/ingest.md. Undo with `bqx delete-bars`.
    """
    from bqx.schema import Layout
    from bqx.sources.formats import Mapping
    from bqx.sources.ingest import ingest_files

    settings = settings_from(database_url, schema)
    say = None if json_out else (lambda text: err_console.print(text, highlight=False))
    summary = ingest_files(
        settings, Layout(settings.schema_name), files, pair, fmt=fmt, tz=tz,
        mapping=Mapping.parse(columns, time_format), rejects_path=rejects, progress=say,
        allow_mismatch=allow_mismatch, drop_flat=drop_flat,
    )  # fmt: skip
    if json_out:
        print_json(summary.as_dict())
        return
    # one line each, for people and for grep
    console.print(summary.line(), highlight=False, soft_wrap=True)
    if summary.rejects_file:
        again = " (replaces the file of an earlier run)" if summary.rejects_replaced else ""
        console.print(
            f"rejected rows with line and reason: {summary.rejects_file}{again}",
            highlight=False,
            soft_wrap=True,
        )
    if summary.stale_rejects_removed:
        console.print(
            f"removed the rejects file of an earlier run: {summary.stale_rejects_removed}"
            " (nothing rejected now)",
            highlight=False,
            soft_wrap=True,
        )


@app.command("delete-bars")
def delete_bars(
    pair: Annotated[str, typer.Option("--pair", help="The pair whose bars go, e.g. EURUSD.")],
    start: Annotated[
        str,
        typer.Option(
            "--start", help="First bar time (ISO 8601, UTC unless an offset) or month YYYY-MM."
        ),
    ],
    end: Annotated[
        str,
        typer.Option(
            "--end", help="End time, exclusive, or month YYYY-MM (inclusive: to its end)."
        ),
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Delete without asking.")] = False,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Undo an ingest: delete a pair's bars in a time range, in one transaction.

    Says what it will delete and asks (or give --yes). The metrics of those bars go too; the
    next `bqx backfill` redoes the months whose bars changed. See docs/ingest.md.
    """
    from bqx.db import connect
    from bqx.schema import Layout, validate_pair
    from bqx.sources.load import bars_in_range, parse_bound
    from bqx.sources.load import delete_bars as run_delete

    settings = settings_from(database_url, schema)
    pair = validate_pair(pair)
    lo, hi = parse_bound(start, "--start"), parse_bound(end, "--end", end=True)
    if hi <= lo:
        raise BqxError(f"--end {end} is not after --start {start}")
    layout = Layout(settings.schema_name)
    span = f"{lo:%Y-%m-%d %H:%M} to {hi:%Y-%m-%d %H:%M} UTC (end excluded)"
    with connect(settings, autocommit=True) as conn:
        plan = bars_in_range(conn, layout, pair, lo, hi)
        total = sum(plan.values())
        if not total:
            if json_out:
                print_json({"pair": pair.upper(), "deleted": 0, "months": {}})
            else:
                console.print(f"{pair.upper()}: no bars from {span}: nothing to delete")
            return
        months = ", ".join(f"{m} ({n:,})" for m, n in plan.items())
        err_console.print(
            f"{pair.upper()}: will delete {total:,} bars from {span}: {months}",
            highlight=False,
            soft_wrap=True,
        )
        if not yes:
            if not sys.stdin.isatty():
                raise BqxError("not deleting without confirmation: give --yes")
            if not typer.confirm("Delete them?", default=False, err=True):
                raise BqxError("nothing deleted")
        result = run_delete(conn, layout, pair, lo, hi)
    if json_out:
        doc = {"pair": pair.upper(), "deleted": result.bars, "months": result.months,
               "emptied_months": result.emptied, "metric_rows": result.metric_rows}  # fmt: skip
        print_json(doc)
        return
    console.print(
        f"{pair.upper()}: deleted {result.bars:,} bars"
        + (f" and {result.metric_rows:,} metric rows" if result.metric_rows else "")
        + "; run `bqx backfill` to redo the months they touched",
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


WORKER_KIND = {"threads": "worker thread", "local": "worker process", "dask": "Dask worker"}


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
        f" · {plural(run['workers'] or 0, WORKER_KIND.get(run['executor'], 'worker'))}"
        f" on {run['host']}"
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
    for col in ("pair", "months", "rows", "running", "failed", "newest bar", "newest metric",
                "lag s"):  # fmt: skip
        pairs.add_column(col, justify="left" if col == "pair" else "right")
    for p in doc["pairs"]:
        when = [(p.get(k) or "")[:16].replace("T", " ") for k in ("newest_bar", "newest_metric")]
        lag = "" if p.get("lag_s") is None else f"{p['lag_s']:,.0f}"
        pairs.add_row(p["pair"].upper(), f"{p['months_done']}/{p['months_planned']}",
                      f"{p['rows']:,}", str(p["running"]), str(p["failed"]), *when,
                      lag)  # fmt: skip
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
        with connect(settings, autocommit=True, start=False) as conn:
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
    # a bad configuration, or an embedded server the user stopped, fails here at once
    conn: Any = connect(settings, autocommit=True, start=False)
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
                        conn = connect(settings, autocommit=True, start=False)
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
        with connect(settings, autocommit=True, start=False) as conn:
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
        with connect(settings, autocommit=True, start=False) as conn:
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


# -- export / features / baseline ---------------------------------------------------------
# (section: h6-ml — docs/ml.md)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="Directory for pair=…/month=… Parquet.")],
    pairs: PairsOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """The stored metrics as Parquet, Hive-partitioned by pair and month, one month at a time."""
    from bqx.export import export as run_export
    from bqx.schema import parse_pairs

    settings = settings_from(database_url, schema)
    summary = run_export(
        settings, out, pairs=parse_pairs(pairs), start=_month(start), end=_month(end)
    )
    if json_out:
        print_json(summary.as_dict())
        return
    console.print(
        f"exported {summary.rows:,} rows of {len(summary.pairs)} pairs in {summary.files} files"
        f" to {summary.out} in {summary.seconds:.1f}s ({summary.rows_per_s:,.0f} rows/s)",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def features(
    out: Annotated[Path, typer.Option("--out", help="Directory for the Parquet files.")],
    pairs: PairsOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    target: Annotated[
        str, typer.Option("--target", help="BQX column to predict, h bars ahead.")
    ] = "w60_bqx_return",
    horizon: Annotated[int, typer.Option("--horizon", help="Bars ahead (h).")] = 60,
    split: Annotated[
        str, typer.Option("--split", help="train,validation,test fractions (chronological).")
    ] = "0.7,0.15,0.15",
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """ML features per bar, a target h bars ahead, chronological splits with an embargo."""
    from bqx.ml.features import write_features
    from bqx.schema import parse_pairs

    settings = settings_from(database_url, schema)
    summary = write_features(
        settings, out, pairs=parse_pairs(pairs), start=_month(start), end=_month(end),
        target=target, horizon=horizon, split=split,
    )  # fmt: skip
    if json_out:
        print_json(summary.manifest)
        return
    sp = summary.manifest["splits"]
    console.print(
        f"{summary.rows:,} rows of {len(summary.pairs)} pairs,"
        f" {len(summary.manifest['features'])} features, target {target} +{horizon} bars:"
        + "".join(f" {k} {v['rows']:,}" for k, v in sp.items())
        + f" (embargo {summary.manifest['embargo_bars']} bars) in {summary.seconds:.1f}s"
        f" -> {summary.out}/manifest.json",
        highlight=False,
        soft_wrap=True,
    )


@app.command()
def baseline(
    features_dir: Annotated[
        Path, typer.Option("--features", help="A `bqx features --out` directory.")
    ],
    out: Annotated[
        Path | None, typer.Option("--out", help="Write baseline.md/.json and a plot here.")
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the random baseline.")] = 0,
    trees: Annotated[int, typer.Option("--trees", help="Most boosting rounds.")] = 300,
    json_out: JsonOpt = False,
) -> None:
    """Ridge and LightGBM against a random and a mean baseline, with a significance test."""
    from bqx.ml.baseline import markdown, run_baseline, write_outputs

    doc, arrays = run_baseline(features_dir, seed=seed, trees=trees)
    if out is not None:
        write_outputs(doc, arrays, out)
    if json_out:
        print_json(doc)
    else:
        console.print(markdown(doc), highlight=False, soft_wrap=True, markup=False)


if __name__ == "__main__":  # pragma: no cover
    main()
