"""The ``bqx`` command line's frame: the typer app, shared options, output, errors and signals.

Commands (in the sibling modules) only parse options, call ``bqx.Store`` and print the typed
result. Errors, exit codes and signals are handled here, in one place:

- ``InvalidOption`` (a bad value) and click's usage errors: one line, exit 2;
- ``NothingToDo``: one line, exit 3;
- ``NeedsOption`` (refused unless an option asks for it): one line naming that flag, exit 1;
- any other ``BqxError`` or database error: one line, exit 1 (``BQX_DEBUG=1`` shows the
  traceback of a database error);
- Ctrl-C and SIGTERM: the work in flight is handed back, exit 130.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import warnings
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from typer._click.exceptions import (  # typer vendors click
    ClickException,
    NoArgsIsHelpError,
    UsageError,
)
from typer.core import TyperGroup

from bqx.errors import BqxError, InvalidOption, NeedsOption, NothingToDo

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_NOTHING, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_CODES = (
    "Exit codes: 0 ok (also `bqx` alone, which prints this help); 1 failed jobs, failed"
    " checks or an error (one line on stderr);"
    " 2 usage error (a bad option or value); 3 nothing to do (backfill: no source bars in"
    " the range); 130 interrupted (Ctrl-C or SIGTERM; run the"
    " same command again to resume), except `update --follow`, which stops on either with 0."
)
# commands that a second run resumes: an interruption says so
RESUMABLE = ("backfill", "update", "ingest", "generate", "demo", "init")


# the app's own options, which may also come after the command (`bqx backfill -q`)
ANYWHERE = ("-q", "--quiet", "-v", "--verbose")


def hoist_global_options(args: list[str]) -> list[str]:
    """``-q``/``-v`` given after the command, moved before it (where click looks for them).
    Nothing after ``--`` moves, nor the value of another option."""
    if "--" in args:
        cut = args.index("--")
        return hoist_global_options(args[:cut]) + args[cut:]
    first = next((i for i, a in enumerate(args) if not a.startswith("-")), len(args))
    moved = [a for a in args[first:] if a in ANYWHERE]
    if not moved:
        return args
    return [*args[:first], *moved, *(a for a in args[first:] if a not in ANYWHERE)]


class _Group(TyperGroup):
    """The top-level group: a usage error is one line on stderr (exit 2), like any bqx error;
    ``bqx`` alone prints the help (exit 0)."""

    def main(
        self, args: Any = None, *rest: Any, standalone_mode: bool = True, **kwargs: Any
    ) -> Any:
        args = hoist_global_options(list(sys.argv[1:] if args is None else args))
        if not standalone_mode:
            return super().main(args, *rest, standalone_mode=False, **kwargs)  # type: ignore[misc]
        try:
            rv = super().main(args, *rest, standalone_mode=False, **kwargs)  # type: ignore[misc]
        except NoArgsIsHelpError as exc:  # `bqx` or `bqx db` alone: the help, not an error
            sys.stdout.write(exc.ctx.get_help() + "\n" if exc.ctx else "")
            sys.exit(EXIT_OK)
        except UsageError as exc:
            where = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx else " (see --help)"
            error(f"{exc.format_message()}{where}")
            sys.exit(exc.exit_code)
        except ClickException as exc:
            error(exc.format_message())
            sys.exit(exc.exit_code)
        except typer.Abort:  # a prompt answered with Ctrl-D, or refused
            error("aborted")
            sys.exit(EXIT_FAILED)
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

# soft_wrap: one line per message whatever the width (logs, grep, `| tee`); when piped, tables
# and grids get room too instead of rich's 80 columns (COLUMNS, when set, still rules)
console = Console(soft_wrap=True)
err_console = Console(stderr=True, soft_wrap=True)
for _c in (console, err_console):
    if not _c.is_terminal and not os.environ.get("COLUMNS"):
        _c.width = 240
# --quiet / --verbose, set by the top-level callback
VERBOSITY = {"level": 0}


def error(message: str) -> None:
    """``error: message`` on stderr, one line, passwords masked."""
    from rich.text import Text

    from bqx.db.urls import mask_text

    message = mask_text(message, *_given_urls())  # no password, whatever the message holds
    # a Text, not markup: a message may hold brackets ("[default: …]", "[2024-07]")
    err_console.print(
        Text.assemble(("error:", "bold red"), " ", message), highlight=False, soft_wrap=True
    )


def info(text: str) -> None:
    """A line for the person watching (stderr): silenced by --quiet."""
    if VERBOSITY["level"] >= 0:
        err_console.print(text, highlight=False, markup=False)


def say(text: str) -> None:
    """A result line for people (stdout); --quiet keeps it."""
    console.print(text, highlight=False, markup=False, soft_wrap=True)


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    error(message)
    raise typer.Exit(code)


def confirm(yes: bool, question: str, refused: str) -> None:
    """Go on only when ``--yes`` was given or the person at the terminal says yes; without a
    terminal, ``refused`` (``not deleting without confirmation``) with the hint to give
    --yes."""
    if yes:
        return
    if not sys.stdin.isatty():
        raise BqxError(f"{refused} without confirmation: give --yes")
    if not typer.confirm(question, default=False, err=True):
        raise BqxError(f"{refused}: not confirmed")


def print_json(doc: Any) -> None:
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


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
            "--quiet",
            "-q",
            help="Only results, errors and failures: no progress, no notes (before or after"
            " the command).",
        ),
    ] = False,
    verbose: Annotated[
        bool,
        typer.Option(
            "--verbose",
            "-v",
            help="More detail: database in use, timings (before or after the command).",
        ),
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
SourceTableOpt = Annotated[
    str, typer.Option("--source-table", help="Source table pattern, e.g. 'bqx.m1_{pair}'.")
]
TimeColOpt = Annotated[str, typer.Option("--time-column", help="Source time column.")]
PriceColOpt = Annotated[str, typer.Option("--price-column", help="Source price column.")]
WorkersOpt = Annotated[
    int | None,
    typer.Option(
        "--workers", help="Workers (threads, processes or Dask tasks) [default: CPU count]."
    ),  # fmt: skip
]


def store_from(
    database_url: str | None, schema: str | None, source_table: str | None = None,
    time_column: str | None = None, price_column: str | None = None,
) -> Any:  # fmt: skip
    """The ``bqx.Store`` the options name."""
    from bqx.api import Store

    store = Store(database_url=database_url, schema=schema, source_table=source_table,
                  time_column=time_column, price_column=price_column)  # fmt: skip
    if VERBOSITY["level"] > 0:
        info(f"database: {store.db.describe()} · schema {store.layout.schema}")
    return store


def windows_option(text: str) -> tuple[int, ...]:
    """``--windows 15,30``: integers, checked like any window list."""
    from bqx.core.params import check_windows

    try:
        values = [int(w) for w in text.split(",") if w.strip()]
    except ValueError:
        raise InvalidOption("windows", text, "expected whole numbers, e.g. 15,30,45") from None
    return check_windows(values)


# -- errors, signals, exit codes ----------------------------------------------------------


def _given_urls() -> list[str]:
    """Database URLs given to this process, whose passwords no message may show."""
    urls = [os.environ.get("BQX_DATABASE_URL") or ""]
    args = sys.argv[1:]
    for i, arg in enumerate(args):
        if arg == "--database-url" and i + 1 < len(args):
            urls.append(args[i + 1])
        elif arg.startswith("--database-url="):
            urls.append(arg.split("=", 1)[1])
    return [u for u in urls if u]


def _error_line(exc: BaseException | str) -> str:
    from bqx.db.urls import mask_text

    text = exc if isinstance(exc, str) else str(exc).strip() or type(exc).__name__
    return mask_text(text, *_given_urls())


def _option_line(exc: InvalidOption) -> str:
    """An invalid value in the command line's words: ``invalid --workers 0: …``."""
    return f"invalid {exc.flag} {exc.shown}: {exc.why}"


def _say_interrupted() -> None:
    """Typer turns Ctrl-C into exit 130 before main() sees it: say what to do next here."""
    command = next((a for a in sys.argv[1:] if not a.startswith("-")), "")
    hint = ": run the same command again to resume" if command in RESUMABLE else ""
    if command == "backfill" and "--force" in sys.argv:  # the same command would redo it all
        hint = (": run `bqx backfill` without --force to finish exactly the jobs this run had"
                " left")  # fmt: skip
    err_console.print(f"interrupted{hint}", highlight=False, soft_wrap=True)


def _warning_line(message: Warning | str, category: type[Warning], *args: Any, **kw: Any) -> None:
    """A Python warning that reaches the command line: one note on stderr with --verbose,
    else nothing (a library's deprecation is no business of a person running bqx)."""
    if VERBOSITY["level"] > 0:
        from bqx.core.text import first_line

        info(f"note: {category.__name__}: {first_line(str(message))}")


def main() -> None:
    """Entry point: user errors print one line, never a traceback, never a password.

    Ctrl-C and SIGTERM (what schedulers and systemd send) stop a command the same way: the
    work in flight is handed back, and the exit code is 130.
    """
    from bqx.db.connect import is_database_error

    interrupted = False

    def on_signal(signum: int, frame: object) -> None:
        nonlocal interrupted
        interrupted = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    warnings.showwarning = _warning_line
    try:
        app()
    except InvalidOption as exc:
        error(_option_line(exc))
        sys.exit(EXIT_USAGE)
    except NothingToDo as exc:
        error(_error_line(exc))
        sys.exit(EXIT_NOTHING)
    except NeedsOption as exc:  # refused unless asked for: say how, as a flag
        error(_error_line(exc.for_command_line()))
        sys.exit(EXIT_FAILED)
    except BqxError as exc:
        error(_error_line(exc))
        sys.exit(EXIT_FAILED)
    except SystemExit as exc:
        if exc.code in (0, None) or (not interrupted and exc.code != EXIT_INTERRUPTED):
            raise  # 130 without our flag: typer's own exit for Ctrl-C
        _say_interrupted()
        sys.exit(EXIT_INTERRUPTED)
    except KeyboardInterrupt:
        _say_interrupted()
        sys.exit(EXIT_INTERRUPTED)
    except Exception as exc:
        if not is_database_error(exc) or os.environ.get("BQX_DEBUG"):
            raise
        # the server went away, refused us, or refused a statement
        error("database: " + _error_line(exc).splitlines()[0])
        sys.exit(EXIT_FAILED)
