"""Data in: ``bqx init``, ``generate``, ``ingest`` and ``delete-bars``."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from bqx.cli.app import (
    DatabaseOpt,
    EndOpt,
    JsonOpt,
    PairsOpt,
    SchemaOpt,
    SourceTableOpt,
    StartOpt,
    app,
    err_console,
    print_json,
    say,
    store_from,
    windows_option,
)
from bqx.errors import BqxError


@app.command()
def init(
    pairs: PairsOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    windows: Annotated[
        str, typer.Option("--windows", help="Window sizes in bars/minutes, comma separated.")
    ] = "15,30,45,60,75",
    source_table: SourceTableOpt = "m1_{pair}",
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Create schema, source and target tables, monthly partitions and the ledger (idempotent)."""
    if not start or not end:
        raise BqxError("init needs --start and --end (months, YYYY-MM)")
    store = store_from(database_url, schema, source_table)
    result = store.init(pairs, start, end, windows=windows_option(windows))
    print_json(result.as_dict()) if json_out else say(result.text())


@app.command()
def generate(
    pairs: PairsOpt = None,
    start: Annotated[str, typer.Option("--start", help="First month, YYYY-MM.")] = "2024-07",
    end: Annotated[str | None, typer.Option("--end", help="Last month (default: --start).")] = None,
    seed: Annotated[int, typer.Option("--seed", help="Random seed (reproducible).")] = 0,
    workers: Annotated[
        int | None, typer.Option("--workers", help="Loading threads [default: 1].")
    ] = None,
    instruments: Annotated[
        int | None,
        typer.Option(
            "--instruments",
            help="N instruments of mixed kinds (forex, metals, indices, crypto, futures,"
            " stocks), each with its own level, grid, volatility and hours; instead of --pairs.",
        ),
    ] = None,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Synthetic minute bars into m1_{pair}: the 28 crosses of 8 correlated currencies, or a
    universe of N instruments of mixed kinds (--instruments)."""
    summary = store_from(database_url, schema).generate(
        pairs, start, end or start, seed=seed, workers=1 if workers is None else workers,
        instruments=instruments,
    )  # fmt: skip
    print_json(summary.as_dict()) if json_out else say(summary.text())


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
    progress = None if json_out else (lambda text: err_console.print(text, highlight=False))
    summary = store_from(database_url, schema).ingest(
        files, pair, fmt=fmt, tz=tz, columns=columns, time_format=time_format, rejects=rejects,
        allow_mismatch=allow_mismatch, drop_flat=drop_flat, progress=progress,
    )  # fmt: skip
    print_json(summary.as_dict()) if json_out else say(summary.text())


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
    store = store_from(database_url, schema)
    plan = store.bars_to_delete(pair, start, end)
    if not plan.bars:
        if json_out:
            print_json({"pair": plan.pair.upper(), "deleted": 0, "months": {}})
        else:
            say(plan.text())
        return
    err_console.print(plan.text(), highlight=False, soft_wrap=True)
    if not yes:
        if not sys.stdin.isatty():
            raise BqxError("not deleting without confirmation: give --yes")
        if not typer.confirm("Delete them?", default=False, err=True):
            raise BqxError("nothing deleted")
    result = store.delete_bars(pair, start, end)
    if json_out:
        print_json({"pair": plan.pair.upper(), **result.as_dict()})
    else:
        say(f"{plan.pair.upper()}: {result.text()}")
