"""read_metrics and export give exactly the stored rows."""

from __future__ import annotations

import json
import math
import os
import shutil
from datetime import UTC, datetime

import numpy as np
import pyarrow as pa
import pyarrow.dataset as ds
import pytest
from psycopg import sql
from typer.testing import CliRunner

import bqx
from bqx.cli import app
from bqx.core.layout import target_columns
from bqx.errors import BqxError
from bqx.store import names
from conftest import store_for


def _plain_select(conn, layout, pair) -> list[tuple]:
    cols = [c for c in target_columns() if c != "created_at"]
    q = sql.SQL("SELECT {} FROM {} ORDER BY ts_utc").format(
        sql.SQL(", ").join(map(sql.Identifier, cols)), names.target(layout, pair)
    )
    return conn.execute(q).fetchall()


def _same_rows(table: pa.Table, rows: list[tuple]) -> None:
    assert table.num_rows == len(rows)
    got = table.to_pylist()  # Arrow -> Python only here, in the test, to compare with psycopg
    names = table.column_names
    for g, want in zip(got, rows, strict=True):
        for name, w in zip(names, want, strict=True):
            v = g[name]
            if w is None:
                assert v is None, name
            else:
                assert v == w, (name, v, w)  # bit-exact floats, identical instants


@pytest.fixture
def stored(settings, layout, make_bars):
    make_bars("eurusd", "2024-07-30", 4 * 1440, seed=1)  # crosses into August
    make_bars("usdjpy", "2024-07-31", 2 * 1440, seed=2, level=160.0)
    store_for(settings, layout).backfill(workers=1)
    return settings


def test_read_metrics_gives_exactly_the_stored_rows(stored, conn, layout) -> None:
    table = bqx.read_metrics("EURUSD", settings=stored)
    assert table.column_names == [c for c in target_columns() if c != "created_at"]
    assert table.schema.field("ts_utc").type == pa.timestamp("us", tz="UTC")
    assert table.column("w75_bqx_return").null_count == 75  # NULL stays NULL, not NaN
    _same_rows(table, _plain_select(conn, layout, "eurusd"))

    start, end = datetime(2024, 7, 31, 12, tzinfo=UTC), "2024-08-01T06:30"
    part = bqx.read_metrics("eurusd", start, end, ["agg_bqx_max", "rate"], settings=stored)
    assert part.column_names == ["ts_utc", "agg_bqx_max", "rate"]
    rows = conn.execute(
        sql.SQL(
            "SELECT ts_utc, agg_bqx_max, rate FROM {} WHERE ts_utc >= %s AND ts_utc < %s"
            " ORDER BY ts_utc"
        ).format(names.target(layout, "eurusd")),
        (start, datetime(2024, 8, 1, 6, 30, tzinfo=UTC)),
    ).fetchall()
    assert len(rows) > 100
    _same_rows(part, rows)

    frame = part.to_pandas()
    assert str(frame["ts_utc"].dt.tz) == "UTC" and math.isclose(frame["rate"].iloc[0], rows[0][2])
    import polars as pl

    assert pl.from_arrow(part).shape == (len(rows), 3)
    # and what it cannot serve is refused, naming the culprit
    with pytest.raises(BqxError, match="unknown metric column.*'w99_bqx_max'"):
        bqx.read_metrics("eurusd", columns=["w99_bqx_max"], settings=stored)
    with pytest.raises(BqxError, match="GBPUSD: no metrics table"):
        bqx.read_metrics("gbpusd", settings=stored)
    with pytest.raises(BqxError, match="invalid pair"):
        bqx.read_metrics("eur'; drop", settings=stored)
    with pytest.raises(BqxError, match="invalid start"):
        bqx.read_metrics("eurusd", start="last tuesday", settings=stored)


def test_export_writes_every_stored_row_partitioned(stored, conn, layout, cli_env, tmp_path):
    out = tmp_path / "export"
    result = CliRunner().invoke(app, ["export", "--out", str(out), "--json"], env=cli_env)
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["pairs"] == ["EURUSD", "USDJPY"] and doc["files"] == 4
    folders = sorted(str(p.relative_to(out).parent) for p in out.rglob("*.parquet"))
    assert folders == [
        "pair=EURUSD/month=2024-07", "pair=EURUSD/month=2024-08",
        "pair=USDJPY/month=2024-07", "pair=USDJPY/month=2024-08",
    ]  # fmt: skip
    # the name the README and every JSON document show is the one a reader filters on
    import polars as pl

    lazy = pl.scan_parquet(out / "**" / "*.parquet", hive_partitioning=True)
    hits = lazy.filter(pl.col("pair") == "EURUSD").select(pl.len()).collect().item()
    assert hits == len(_plain_select(conn, layout, "eurusd"))
    dataset = ds.dataset(out, format="parquet", partitioning="hive")
    for pair in ("eurusd", "usdjpy"):
        table = dataset.to_table(filter=ds.field("pair") == pair.upper()).sort_by("ts_utc")
        months = set(table.column("month").to_pylist())
        assert months == {"2024-07", "2024-08"}
        metrics = table.drop_columns(["pair", "month"])
        rows = _plain_select(conn, layout, pair)
        assert doc["rows"] >= len(rows)
        _same_rows(metrics, rows)
    # a month range exports those months only, and a rerun replaces files in place
    from bqx.core.months import Month

    again = store_for(stored).export(
        out, pairs=["EURUSD"], start=Month(2024, 8), end=Month(2024, 8)
    )
    assert again.files == 1 and again.pairs == ["EURUSD"]
    assert len(list(out.rglob("*.parquet"))) == 4 and not list(out.rglob("*.tmp"))
    # a folder an older bqx wrote lower case is folded into the upper-case one, never kept
    # beside it (a reader would see every row twice): renamed, or its months moved over
    os.rename(out / "pair=USDJPY", out / "pair=usdjpy")
    shutil.copytree(out / "pair=EURUSD", out / "pair=eurusd")
    shutil.rmtree(out / "pair=EURUSD" / "month=2024-07")  # July only under the old name
    store_for(stored).export(out, start=Month(2024, 8), end=Month(2024, 8))
    folders = sorted(str(p.relative_to(out).parent) for p in out.rglob("*.parquet"))
    assert folders == [
        "pair=EURUSD/month=2024-07", "pair=EURUSD/month=2024-08",
        "pair=USDJPY/month=2024-07", "pair=USDJPY/month=2024-08",
    ]  # fmt: skip
    n_aug = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE ts_utc >= '2024-08-01'").format(
            names.target(layout, "eurusd")
        )
    ).fetchone()[0]
    assert again.rows == n_aug


def test_copy_decoder_handles_nulls_and_many_columns(conn) -> None:
    from bqx.db.copy import copy_out_columns

    q = sql.SQL(
        "SELECT timestamptz '2024-01-01' + make_interval(mins => g),"
        " CASE WHEN g % 3 = 0 THEN NULL ELSE g * 0.5 END::float8, 'NaN'::float8, -g::float8"
        " FROM generate_series(1, 20000) g ORDER BY 1"
    )
    with conn.cursor() as cur:
        times, values, nulls = copy_out_columns(cur, q, None, 3, chunk_bytes=4096)
    g = np.arange(1, 20001)
    want_t = np.datetime64("2024-01-01T00:00", "us") + g.astype("timedelta64[m]")
    np.testing.assert_array_equal(times, want_t)
    np.testing.assert_array_equal(nulls[0], g % 3 == 0)
    np.testing.assert_array_equal(values[0][g % 3 != 0], (g * 0.5)[g % 3 != 0])
    assert np.isnan(values[1]).all() and not nulls[1].any()  # a stored NaN is not a NULL
    np.testing.assert_array_equal(values[2], -g.astype(float))
