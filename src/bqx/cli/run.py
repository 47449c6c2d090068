"""The pipeline: ``bqx backfill``, ``update`` (and ``--follow``) and the ``demo`` tour."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from bqx.cli.app import (
    DatabaseOpt,
    EndOpt,
    JsonOpt,
    PairsOpt,
    PriceColOpt,
    SchemaOpt,
    SourceTableOpt,
    StartOpt,
    TimeColOpt,
    WorkersOpt,
    app,
    err_console,
    error,
    info,
    print_json,
    say,
    store_from,
    windows_option,
)
from bqx.errors import InvalidOption

WindowsOpt = Annotated[
    str, typer.Option("--windows", help="Window sizes in bars/minutes, comma separated.")
]
ModeOpt = Annotated[str, typer.Option("--mode", help="Window mode: bars or clock.")]
SinkOpt = Annotated[
    str | None,
    typer.Option(
        "--sink",
        help="A Delta Lake table for the metrics instead of the database's partitions: a local"
        " path or s3://bucket/prefix (AWS_* variables; the lake extra) [default: where the"
        " pairs were last written]. See docs/lake.md.",
    ),
]
SourceOpt = Annotated[
    str | None,
    typer.Option(
        "--source",
        help="Bars from a Parquet dataset (pair=EURUSD/… folders, or a file per pair) or a"
        " Delta table, local or s3://…, instead of the source tables (--time-column and"
        " --price-column name its columns).",
    ),
]
MaxFillOpt = Annotated[
    int,
    typer.Option("--max-fill", help="clock mode: forward-fill a price at most this many minutes."),
]


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
    sink: SinkOpt = None,
    source: SourceOpt = None,
) -> None:
    """Compute BQX metrics for every (pair, month) job; resumable, one transaction per job.

    Exit codes: 0 done, 1 a job failed or bad input, 2 usage, 3 nothing to do (no bars in range).
    """
    store = store_from(database_url, schema, source_table, time_column, price_column)
    wins = windows_option(windows)
    if dry_run:
        plan = store.plan(pairs, start, end, windows=wins, mode=mode, max_fill=max_fill,
                          force=force, source_check=source_check, sink=sink,
                          source=source)  # fmt: skip
        print_json(plan.as_dict()) if json_out else say(plan.text())
        return
    summary = store.backfill(
        pairs, start, end, windows=wins, mode=mode, max_fill=max_fill, workers=workers,
        force=force, job_timeout=job_timeout, executor=executor, scheduler=scheduler,
        source_check=source_check, progress=not json_out, sink=sink, source=source,
    )  # fmt: skip
    if json_out:
        print_json(summary.as_dict())
    else:
        say(summary.text())
        for pair, month, failure in summary.failures:
            err_console.print(f"[red]failed[/] {pair.upper()} {month}: {failure}", highlight=False)
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
    sink: SinkOpt = None,
) -> None:
    """Compute only bars newer than each pair's target holds (and late or corrected ones)."""
    store = store_from(database_url, schema, source_table, time_column, price_column)
    wins = windows_option(windows) if windows else None
    if follow is None:
        if metrics_port is not None:
            raise InvalidOption("metrics_port", metrics_port, "goes with --follow SECONDS")
        from bqx.pipeline.update import UpdateFailed

        try:
            result = store.update(pairs, recheck=recheck, windows=wins, mode=mode,
                                  max_fill=max_fill, sink=sink)  # fmt: skip
        except UpdateFailed as failed:  # the other pairs were updated: say both, exit 1
            print_json(failed.result.as_dict()) if json_out else say(failed.result.text())
            for line in failed.result.errors:
                error(line)
            raise typer.Exit(1) from None
        print_json(result.as_dict()) if json_out else say(result.text())
        return
    if json_out:
        raise InvalidOption("json", True, "goes without --follow (monitor --follow with"
                            " --metrics-port)")  # fmt: skip
    import logging

    from bqx.service.follow import stop_on_signals

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s bqx update: %(message)s")  # fmt: skip
    store.follow(follow, pairs=pairs, recheck=recheck, metrics_port=metrics_port,
                 stop=stop_on_signals(), windows=wins, mode=mode, max_fill=max_fill)  # fmt: skip


@app.command()
def demo(
    months: Annotated[
        int, typer.Option("--months", min=1, max=12, help="Months from 2024-07 (12 = the report).")
    ] = 3,
    pairs: PairsOpt = None,
    workers: WorkersOpt = None,
    out: Annotated[Path, typer.Option("--out", help="Where the report goes.")] = Path("bqx-report"),
    seed: Annotated[int, typer.Option("--seed", help="Random seed of the synthetic bars.")] = 0,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Overwrite months that hold bars bqx did not generate (without it the demo"
            " stops before writing them; or give the demo a --schema of its own).",
        ),
    ] = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """The tour: synthetic bars for 28 pairs, backfill, verify, report (embedded database)."""
    store = store_from(database_url, schema)
    # with --json the narration goes to stderr and the document alone to stdout
    narrate = info if json_out else say
    narrate(f"database: {store.db.describe()}")
    result = store.demo(months, pairs=pairs, workers=workers, out=out, seed=seed, say=narrate,
                        bqx=invocation(), replace=replace)  # fmt: skip
    if json_out:
        print_json(result.as_dict())
    if not result.ok:
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
