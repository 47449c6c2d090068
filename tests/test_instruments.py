"""Instruments beyond the 28 crosses, through a real server, under one name everywhere.

Files of the kinds their users have (an exchange's minute klines, an MT5 export of an index CFD
and of a broker-suffixed cross, a HistData gold file, a futures CSV, a coin's klines) go in
with ``bqx ingest``; then backfill, verify, status, export, features and ``read_metrics``, all
through the command line. Each symbol comes back as its user wrote it, upper case; and rows of
each price grid agree with the plain two-pass reference of tests/test_metrics.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from psycopg import sql
from typer.testing import CliRunner

import bqx
from bqx import metrics
from bqx.cli import app
from bqx.store import names
from test_metrics import assert_close, reference

N = 3000  # minutes of bars per instrument: two days and a bit
START = np.datetime64("2024-07-01T00:00", "m")


def ohlc(level: float, decimals: int, seed: int, tick: float = 0.0) -> np.ndarray:
    """(N, 5) bars on the grid: open = previous close, high/low around them, a volume."""
    rng = np.random.default_rng(seed)
    step = tick or 10.0**-decimals
    close = np.round(np.round(level * np.exp(np.cumsum(rng.normal(0, 3e-4, N))) / step) * step,
                     decimals)  # fmt: skip
    opn = np.concatenate(([close[0]], close[:-1]))
    high = np.round(np.maximum(opn, close) + step * rng.integers(0, 3, N), decimals)
    low = np.round(np.minimum(opn, close) - step * rng.integers(0, 3, N), decimals)
    return np.column_stack([opn, high, low, close, rng.integers(1, 90, N).astype(float)])


def minutes(offset_hours: int = 0) -> list:
    """The bars' minutes as naive datetimes, in a file's zone (UTC + offset)."""
    t = START + np.arange(N).astype("timedelta64[m]") + np.timedelta64(offset_hours * 60, "m")
    return t.astype("datetime64[s]").tolist()


def fmt(x: float, decimals: int) -> str:
    return f"{x:.{decimals}f}"


def klines(path: Path, bars: np.ndarray) -> None:
    """Binance's minute klines: open time in ms, prices with 8 decimals, 12 columns."""
    ms = (START.astype("datetime64[ms]").astype(np.int64) + np.arange(N) * 60_000).tolist()
    lines = [
        f"{t},{','.join(fmt(v, 8) for v in row)},{t + 59_999},0.0,1,0.0,0.0,0"
        for t, row in zip(ms, bars.tolist(), strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def mt5(path: Path, bars: np.ndarray, decimals: int) -> None:
    """MetaTrader 5's "Export bars": tab-separated, server time (here UTC+3)."""
    head = "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>"
    lines = [head] + [
        f"{t:%Y.%m.%d}\t{t:%H:%M:%S}\t" + "\t".join(fmt(v, decimals) for v in row[:4])
        + f"\t{int(row[4])}\t0\t12"
        for t, row in zip(minutes(3), bars.tolist(), strict=True)
    ]  # fmt: skip
    path.write_text("\n".join(lines) + "\n")


def histdata(path: Path, bars: np.ndarray, decimals: int) -> None:
    """HistData.com generic ASCII: fixed EST (UTC-5)."""
    lines = [
        f"{t:%Y%m%d %H%M%S};" + ";".join(fmt(v, decimals) for v in row[:4]) + ";0"
        for t, row in zip(minutes(-5), bars.tolist(), strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


def iso_csv(path: Path, bars: np.ndarray, decimals: int) -> None:
    lines = ["timestamp,open,high,low,close,volume"] + [
        f"{t:%Y-%m-%dT%H:%M:%S}Z," + ",".join(fmt(v, decimals) for v in row[:4]) + f",{row[4]:g}"
        for t, row in zip(minutes(), bars.tolist(), strict=True)
    ]
    path.write_text("\n".join(lines) + "\n")


MT5_ZONE = ["--tz", "Etc/GMT-3"]  # the broker's server time, UTC+3
CSV_MAP = ["--columns", "time=timestamp"]
# symbol as the user writes it: (file, writer, level, decimals, tick, options, the kernel's grid)
CASES = {
    "BTCUSDT": ("BTCUSDT-1m-2024-07.csv", klines, 64000.0, 2, 0.0, [], 2),
    "US500": ("US500_M1_202407010300_202407030259.csv", mt5, 5500.0, 2, 0.25, MT5_ZONE, 3),
    "XAUUSD": ("DAT_ASCII_XAUUSD_M1_202407.csv", histdata, 2330.0, 3, 0.0, [], 4),
    "EURUSD.m": ("EURUSD.m_M1_202407010300_202407030259.csv", mt5, 1.07, 5, 0.0, MT5_ZONE, 5),
    "6E": ("6E_continuous_1min.csv", iso_csv, 1.0725, 5, 0.00005, CSV_MAP, 5),
    "SHIBUSDT": ("SHIBUSDT-1m-2024-07.csv", klines, 0.0000172, 8, 0.0, [], 8),
}


@pytest.fixture
def cli(cli_env):
    runner = CliRunner()

    def run(*args: str) -> dict:
        result = runner.invoke(app, [*args, "--json"], env=cli_env)
        assert result.exit_code == 0, (args, result.output)
        return json.loads(result.stdout)

    return run


def test_instruments_go_in_and_come_back_under_one_name(cli, conn, layout, settings, tmp_path):
    expected = {}
    for i, (symbol, (file, writer, level, decimals, tick, opts, _)) in enumerate(CASES.items()):
        bars = ohlc(level, decimals, seed=40 + i, tick=tick)
        path = tmp_path / file
        writer(path, bars) if writer is klines else writer(path, bars, decimals)
        doc = cli("ingest", str(path), "--pair", symbol, *opts)
        assert (doc["pair"], doc["accepted"], doc["rejected"]) == (symbol.upper(), N, 0), doc
        expected[symbol] = bars

    # stored under the stored form, each bar at its UTC instant, each price as written
    for symbol, bars in expected.items():
        rows = conn.execute(
            sql.SQL("SELECT time, open, high, low, close FROM {} ORDER BY time").format(
                names.source(layout, symbol)
            )
        ).fetchall()
        assert len(rows) == N and rows[0][0].replace(tzinfo=None) == START.item()
        assert rows[-1][0] - rows[0][0] == timedelta(minutes=N - 1)
        assert np.array_equal(np.array([r[1:] for r in rows]), bars[:, :4]), symbol

    run = cli("backfill", "--workers", "2")
    assert run["jobs_done"] == len(CASES) and run["jobs_failed"] == 0
    assert cli("verify", "--sample", "200")["ok"]
    status = cli("status")
    assert sorted(p["pair"] for p in status["pairs"]) == sorted(s.upper() for s in CASES)

    # every grid: the kernel's path, and rows against the two-pass reference
    for symbol, (*_, grid) in CASES.items():
        prices = expected[symbol][:, 3]
        assert (metrics.row_grids(prices)[100:] == grid).all(), symbol
        table = bqx.read_metrics(symbol.lower(), settings=settings)  # any case: one instrument
        assert table.num_rows == N
        times = table.column("ts_utc").to_numpy().astype("datetime64[m]")
        for r in (80, 1500, N - 1):
            lo = r - 75
            want = reference(times[lo : r + 1], prices[lo : r + 1])
            got = {c: table.column(c).to_numpy(zero_copy_only=False)[lo : r + 1] for c in want}
            last = {c: v[-1:] for c, v in got.items()}
            assert_close(last, {c: v[-1:] for c, v in want.items()}, prices[r : r + 1])

    # export: pair=SYMBOL, upper case as everywhere, and a reader finds it by that name
    out = tmp_path / "export"
    doc = cli("export", "--out", str(out))
    assert doc["pairs"] == sorted(s.upper() for s in CASES)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"pair={s.upper()}" for s in CASES)
    lazy = pl.scan_parquet(out / "**" / "*.parquet", hive_partitioning=True)
    for symbol in CASES:
        hits = lazy.filter(pl.col("pair") == symbol.upper()).select(pl.len()).collect().item()
        assert hits == N, symbol

    # features: files and the pair column under the same name
    feats = tmp_path / "features"
    manifest = cli("features", "--out", str(feats), "--pairs", "EURUSD.m,BTCUSDT")
    assert manifest["pairs"] == ["EURUSD.M", "BTCUSDT"]
    assert sorted(p.name for p in (feats / "train").iterdir()) == [
        "BTCUSDT.parquet", "EURUSD.M.parquet"
    ]  # fmt: skip
    assert set(pl.read_parquet(feats / "train" / "EURUSD.M.parquet")["pair"]) == {"EURUSD.M"}


def test_a_hostile_symbol_is_refused_before_any_sql(cli_env, conn, layout, tmp_path):
    path = tmp_path / "bars.csv"
    iso_csv(path, ohlc(1.07, 5, seed=1), 5)
    cases = [
        ["ingest", str(path), "--pair", 'EURUSD"; DROP SCHEMA bqx CASCADE; --'],
        ["backfill", "--pairs", "../../etc"],
        ["export", "--out", str(tmp_path / "x"), "--pairs", "EUR USD"],
        ["generate", "--pairs", "runs"],  # would be the ledger's bqx_runs
    ]
    for args in cases:
        res = subprocess.run([sys.executable, "-m", "bqx.cli", *args], env=cli_env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
        assert res.returncode == 1, (args, res.stderr)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: invalid pair name"), lines
    schema = conn.execute("SELECT 1 FROM pg_namespace WHERE nspname = %s", (layout.schema,))
    assert schema.fetchone() is None and not (tmp_path / "x").exists()


def test_hundreds_of_instruments_a_year_each_fit_the_servers_lock_table(store, conn, layout):
    """New tables and partitions keep their locks to the commit, and the server's lock table
    holds 64 × max_connections (6,400 here): `init` of 200 instruments × 12 months (9,600 new
    tables and indexes) and a first backfill's partitions for 300 × 11 months ran out of
    shared memory when each was one transaction. Now a transaction per pair."""
    from bqx.core.months import Month, month_range
    from bqx.core.params import Job
    from bqx.destinations.postgres import PostgresPartitions

    months = month_range(Month(2024, 1), Month(2024, 12))
    symbols = [f"I{i:03d}.X" for i in range(200)]
    assert store.init(symbols, "2024-01", "2024-12").pair_months == 200 * 12
    parts = {name for (name,) in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relispartition AND c.relkind = 'r'", (layout.schema,))}  # fmt: skip
    assert len(parts) == 2 * 200 * 12 and {"bqx_i199.x_2024m12", "m1_i199.x_2024m12"} <= parts

    params = store.params()
    jobs = [Job(f"j{i:03d}", m, 1, None) for i in range(300) for m in months[:11]]
    PostgresPartitions(layout).prepare(conn, params, jobs)
    made = conn.execute(
        "SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relispartition AND c.relkind = 'r' AND c.relname LIKE 'bqx\\_j%%'",
        (layout.schema,),
    ).fetchone()[0]
    assert made == 300 * 11
    PostgresPartitions(layout).prepare(conn, params, jobs)  # again: nothing to do, no error
    # (the schema is too big for one DROP SCHEMA … CASCADE too: its tables go a pair at a time)
    for pair in symbols:
        conn.execute(sql.SQL("DROP TABLE {}, {}").format(names.target(layout, pair),
                                                         names.source(layout, pair)))  # fmt: skip
    for i in range(300):
        conn.execute(sql.SQL("DROP TABLE {}").format(names.target(layout, f"j{i:03d}")))


def test_a_jobs_read_plans_its_own_months_not_the_whole_history(store, conn, layout):
    """A job reads its month and the W_max bars before it. With only a bound found by a
    subquery, the server planned and locked every partition before the month (240 for the
    last month of 20 years); a first look 31 days back bounds it. After a gap longer than
    that, the whole history is searched. Either way: the bars the plain statement gives."""
    from bqx.core.months import Month, month_range
    from bqx.store.bars import load_bars, read_series

    months = [*month_range(Month(2021, 1), Month(2023, 12)), Month(2024, 3)]  # a 2-month gap
    for i, month in enumerate(months):  # the last 100 minutes of each month
        t0 = np.datetime64(month.end.replace(tzinfo=None), "m") - np.timedelta64(100, "m")
        times = (t0 + np.arange(100).astype("timedelta64[m]")).astype("datetime64[us]")
        close = np.round(1.1 + 1e-5 * (np.arange(100) % 7 + i), 5)
        load_bars(conn, layout, "eurusd", times, np.column_stack([close] * 4 + [np.ones(100)]))
    params = store.params()
    every = conn.execute(
        sql.SQL("SELECT time, close FROM {} ORDER BY time").format(names.source(layout, "eurusd"))
    ).fetchall()

    def plain(month: Month) -> list:
        before = [r for r in every if r[0] < month.start][-params.lookback_bars :]
        return before + [r for r in every if month.start <= r[0] < month.end]

    for month, most_locks in ((Month(2023, 12), 12), (Month(2024, 3), None)):
        with conn.transaction(), conn.cursor() as cur:
            times, prices, _ = read_series(cur, params, "eurusd", month.start, month.end)
            locks = cur.execute(
                "SELECT count(*) FROM pg_locks WHERE pid = pg_backend_pid()"
                " AND locktype = 'relation'"
            ).fetchone()[0]
        want = plain(month)
        assert len(times) == len(want) == params.lookback_bars + 100
        assert [t.replace(tzinfo=None) for t, _ in want] == times.astype(object).tolist()
        assert [p for _, p in want] == prices.tolist()
        if most_locks is not None:  # 2023-10 to 2023-12 and their indexes, not 36 of each
            assert locks <= most_locks, locks
