"""read_metrics and export give exactly the stored rows."""

from __future__ import annotations

import json
import math
import os
import shutil
from datetime import UTC, datetime
from pathlib import Path

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


def _stored_count(conn, layout, pair: str) -> int:
    q = sql.SQL("SELECT count(*) FROM {}").format(names.target(layout, pair))
    return conn.execute(q).fetchone()[0]


def test_a_reexport_leaves_the_directory_equal_to_the_table(stored, conn, layout, tmp_path):
    import polars as pl

    store = store_for(stored, layout)
    out = tmp_path / "export"
    first = store.export(out)
    assert first.files == 4 and first.removed == []
    # August of EURUSD goes (an undone ingest); the same export again removes its partition
    store.delete_bars("eurusd", "2024-08", "2024-08")
    again = store.export(out)
    assert again.removed == ["pair=EURUSD/month=2024-08"]
    assert again.as_dict()["removed"] == 1 and "removed 1 partition" in again.text()
    assert not (out / "pair=EURUSD" / "month=2024-08").exists()
    frame = pl.read_parquet(out / "**" / "*.parquet", hive_partitioning=True)
    want = _stored_count(conn, layout, "eurusd") + _stored_count(conn, layout, "usdjpy")
    assert frame.height == want  # readers see the table, not what was deleted
    # a month range covers those months only: July is not removed when only August is asked
    store.delete_bars("usdjpy", "2024-07", "2024-07")
    part = store.export(out, pairs="USDJPY", start="2024-08", end="2024-08")
    assert part.removed == [] and (out / "pair=USDJPY" / "month=2024-07" / "data.parquet").exists()
    whole = store.export(out, pairs="USDJPY")
    assert whole.removed == ["pair=USDJPY/month=2024-07"]
    # a file of the user's own in a partition folder stays, and so does its folder
    (out / "pair=EURUSD" / "month=2024-07" / "notes.txt").write_text("mine")
    store.delete_bars("eurusd", "2024-07", "2024-07")
    store.export(out, pairs="EURUSD")
    assert (out / "pair=EURUSD" / "month=2024-07" / "notes.txt").read_text() == "mine"
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*.parquet")) == [  # USDJPY's August
        "pair=USDJPY/month=2024-08/data.parquet"
    ]


def test_exports_into_one_directory_at_once_share_no_temporary_file(stored, conn, layout, tmp_path):
    import threading

    out = tmp_path / "export"
    errors: list[BaseException] = []

    def one() -> None:
        try:
            for _ in range(3):
                store_for(stored, layout).export(out)
        except BaseException as exc:  # noqa: BLE001 - the test reports any failure
            errors.append(exc)

    threads = [threading.Thread(target=one) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    assert not list(out.rglob("*.tmp"))
    dataset = ds.dataset(out, format="parquet", partitioning="hive")
    for pair in ("eurusd", "usdjpy"):
        table = dataset.to_table(filter=ds.field("pair") == pair.upper()).sort_by("ts_utc")
        _same_rows(table.drop_columns(["pair", "month"]), _plain_select(conn, layout, pair))


def test_export_columns_and_refusals(stored, conn, layout, cli_env, tmp_path):
    import subprocess
    import sys
    import warnings

    from bqx.errors import InvalidOption

    out = tmp_path / "cols"
    res = CliRunner().invoke(
        app, ["export", "--out", str(out), "--columns", "rate,agg_bqx_max", "--json"], env=cli_env
    )
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["columns"] == ["rate", "agg_bqx_max"]
    table = ds.dataset(out, format="parquet", partitioning="hive").to_table()
    assert table.column_names == ["ts_utc", "rate", "agg_bqx_max", "pair", "month"]
    assert table.num_rows == _stored_count(conn, layout, "eurusd") + _stored_count(
        conn, layout, "usdjpy"
    )
    # read_metrics takes one column as a string, not as its letters
    one = bqx.read_metrics("EURUSD", columns="rate", settings=stored)
    assert one.column_names == ["ts_utc", "rate"]
    # a reversed range, a number for a time: one error, no warning, before any SQL
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(InvalidOption, match="invalid end '2024-07-01': is before start"):
            bqx.read_metrics("EURUSD", "2024-08-01", "2024-07-01", settings=stored)
        for bad in (float("nan"), np.float64("nan"), 5):
            with pytest.raises(InvalidOption, match="a number is not a time"):
                bqx.read_metrics("EURUSD", end=bad, settings=stored)
    env = {**cli_env, "PYTHONPATH": str(Path(bqx.__file__).resolve().parents[1])}
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    home = tmp_path / "home"
    cases = [
        (["--out", str(a_file)], "invalid --out", "is a file"),
        (["--out", str(home / "exports")], "invalid --out", "inside BQX_HOME"),
        (["--out", str(out), "--start", "2024-08", "--end", "2024-07"], "invalid --end",
         "is before start 2024-08"),
        (["--out", str(tmp_path / "new"), "--columns", "rate,w99_bqx_max"], "EURUSD:",
         "'w99_bqx_max'"),
    ]  # fmt: skip
    for args, start, why in cases:
        proc = subprocess.run(
            [sys.executable, "-m", "bqx.cli", "export", *args], env=env, capture_output=True,
            text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode in (1, 2) and "Traceback" not in proc.stderr, proc.stderr
        assert proc.stderr.startswith(f"error: {start}") and why in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert a_file.read_text() == "mine" and not (tmp_path / "new").exists()
    assert not (home / "exports").exists()
