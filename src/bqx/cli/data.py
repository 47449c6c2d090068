"""Data in: ``bqx init``, ``generate``, ``ingest`` and ``delete-bars``."""

from __future__ import annotations

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
    confirm,
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
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Overwrite months that hold bars bqx did not generate (ingested, or changed"
            " since). Without it such a month stops the command before anything is written.",
        ),
    ] = False,
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
    universe of N instruments of mixed kinds (--instruments).

    A month that holds bars bqx did not generate (ingested ones) is refused, naming the months
    and their bars, unless --replace; a month that already holds the same bars is left as it
    is. See docs/ingest.md.
    """
    summary = store_from(database_url, schema).generate(
        pairs, start, end or start, seed=seed, workers=1 if workers is None else workers,
        replace=replace, instruments=instruments,
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
    ticks: Annotated[
        bool,
        typer.Option(
            "--ticks",
            help="The files hold ticks (Dukascopy tick exports, CSV or Parquet with"
            " time,price or time,bid,ask): aggregate them into minute bars (open, high, low,"
            " close; volume = number of ticks). Without it a time off the minute is rejected.",
        ),
    ] = False,
    tick_price: Annotated[
        str,
        typer.Option(
            "--tick-price",
            help="With --ticks, a tick's price: mid ((bid+ask)/2), bid, ask, last (the price"
            " column), or auto (mid when the file has bid and ask, else last).",
        ),
    ] = "auto",
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Load minute-bar files into m1_{pair}; bad rows go to a rejects file with line and reason.

    Formats, ticks, time zones and the rejects file: docs/ingest.md. Undo with `bqx
    delete-bars`.
    """
    progress = None if json_out else (lambda text: err_console.print(text, highlight=False))
    summary = store_from(database_url, schema).ingest(
        files, pair, fmt=fmt, tz=tz, columns=columns, time_format=time_format, rejects=rejects,
        allow_mismatch=allow_mismatch, drop_flat=drop_flat, ticks=ticks, tick_price=tick_price,
        progress=progress,
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
    confirm(yes, "Delete them?", "not deleting")
    result = store.delete_bars(pair, start, end)
    if json_out:
        print_json({"pair": plan.pair.upper(), **result.as_dict()})
    else:
        say(f"{plan.pair.upper()}: {result.text()}")


@app.command("drop")
def drop(
    pair: Annotated[str, typer.Option("--pair", help="The pair to drop, e.g. EURUSD.")],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Drop without asking.")] = False,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """Drop a pair: its bar and metric tables (every month) and its ledger jobs, in one
    transaction.

    Says what it will drop and asks (or give --yes); refused while a run holds the pair's
    jobs. To remove only some bars, use `bqx delete-bars`.
    """
    store = store_from(database_url, schema)
    plan = store.pair_to_drop(pair)
    if not plan.empty:
        err_console.print(plan.text(), highlight=False, soft_wrap=True)
        confirm(yes, "Drop them?", "not dropping")
        plan = store.drop_pair(pair)
    print_json(plan.as_dict()) if json_out else say(plan.text())
