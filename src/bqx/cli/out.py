"""Data out: ``bqx export``, ``features`` and ``baseline`` (docs/ml.md)."""

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
    print_json,
    say,
    store_from,
)


@app.command()
def export(
    out: Annotated[Path, typer.Option("--out", help="Directory for pair=…/month=… Parquet.")],
    pairs: PairsOpt = None,
    start: StartOpt = None,
    end: EndOpt = None,
    columns: Annotated[
        str | None,
        typer.Option(
            "--columns",
            help="Comma list of metric columns, e.g. rate,w60_bqx_return [default: all].",
            show_default=False,
        ),
    ] = None,
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
    bars: Annotated[
        bool,
        typer.Option(
            "--bars",
            help="The source bars instead (pair=EURUSD/month=…/data.parquet: time, open, high,"
            " low, close, volume), in the shape `backfill --source` reads.",
        ),
    ] = False,
    source_table: SourceTableOpt = "m1_{pair}",
) -> None:
    """The stored metrics as Parquet, Hive-partitioned by pair and month, one month at a time.

    Afterwards the directory holds exactly the table's rows for the pairs and months exported:
    a partition whose rows are gone from the table (deleted bars, a dropped pair) is removed.
    Metrics kept in a Delta sink (`backfill --sink`) are read from it.
    """
    from bqx.progress import RateProgress

    store = store_from(database_url, schema, source_table)
    progress = RateProgress("export")
    try:
        summary = store.export(
            out,
            pairs=pairs,
            start=start,
            end=end,
            columns=columns,
            progress=progress,
            bars=bars,
        )
    finally:
        progress.close()
    print_json(summary.as_dict()) if json_out else say(summary.text())


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
    source_table: SourceTableOpt = "m1_{pair}",
    json_out: JsonOpt = False,
    database_url: DatabaseOpt = None,
    schema: SchemaOpt = None,
) -> None:
    """ML features per bar, a target h bars ahead, chronological splits with an embargo."""
    from bqx.progress import RateProgress

    store = store_from(database_url, schema, source_table)
    progress = RateProgress("features")
    try:
        summary = store.features(out, pairs=pairs, start=start, end=end, target=target,
                                 horizon=horizon, split=split, progress=progress)  # fmt: skip
    finally:
        progress.close()
    print_json(summary.manifest) if json_out else say(summary.text())


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
    from bqx.api import baseline as run_baseline
    from bqx.progress import RateProgress

    progress = RateProgress("baseline")
    try:
        result = run_baseline(features_dir, out=out, seed=seed, trees=trees, progress=progress)
    finally:
        progress.close()
    print_json(result.as_dict()) if json_out else say(result.text())
