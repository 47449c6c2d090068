"""Synthetic bars: market-like, triangular, forex week, pip precision, reproducible, stored."""

from __future__ import annotations

import numpy as np
import pytest
from psycopg import sql

from bqx.core.months import Month
from bqx.core.symbols import REPORT_PAIRS
from bqx.db import resolve_url
from bqx.sources.generate import pip_digits, synth_bars
from bqx.store import names
from conftest import store_for

JULY = Month(2024, 7)


@pytest.fixture(scope="module")
def july() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    return {p: (t, o) for p, t, o in synth_bars(REPORT_PAIRS, JULY, JULY, seed=0)}


def test_28_pairs_with_about_30700_bars_a_month(july):
    assert sorted(july) == sorted(REPORT_PAIRS) and len(july) == 28
    counts = [len(t) for t, _ in july.values()]
    assert all(31_500 <= c <= 33_200 for c in counts)  # July has more open minutes than most
    # the report's average month: 10,313,378 / 336 = 30,694 bars; a 12-month run lands there
    year = sum(len(t) for _, t, _ in synth_bars(["eurusd"], JULY, Month(2025, 6)))
    assert 12 * 30_000 <= year <= 12 * 31_400


def test_only_the_forex_week(july):
    times, _ = july["eurusd"]
    minutes = times.astype("datetime64[m]").astype(np.int64)
    minute_of_week = (minutes + 3 * 1440) % (7 * 1440)  # Monday 00:00 = 0
    closed = (minute_of_week >= 4 * 1440 + 22 * 60) & (minute_of_week < 6 * 1440 + 22 * 60)
    assert not closed.any()
    weekday = (times.astype("datetime64[D]").astype(np.int64) + 3) % 7
    assert not (weekday == 5).any()  # no Saturday at all
    assert (np.diff(times) > np.timedelta64(0)).all()  # sorted, unique
    gaps = np.diff(minutes)
    assert 0.005 < (gaps == 2).mean() < 0.05  # a few percent of minutes missing


def test_triangles_agree(july):
    eurusd, usdjpy, eurjpy = (july[p] for p in ("eurusd", "usdjpy", "eurjpy"))
    common = np.intersect1d(np.intersect1d(eurusd[0], usdjpy[0]), eurjpy[0])
    assert len(common) > 25_000

    def close_at(pair):
        t, o = pair
        return o[np.searchsorted(t, common), 3]

    implied = close_at(eurusd) * close_at(usdjpy)
    rel = np.abs(implied / close_at(eurjpy) - 1)
    assert rel.max() < 2e-5  # pip rounding only


def test_levels_and_volatility_like_mid_2024(july):
    first = {p: o[0, 3] for p, (_, o) in july.items()}
    assert first["eurusd"] == pytest.approx(1.075, rel=0.01)
    assert first["usdjpy"] == pytest.approx(160.5, rel=0.01)
    assert first["gbpusd"] == pytest.approx(1.27, rel=0.01)
    for pair, (_, o) in july.items():
        r = np.diff(np.log(o[:, 3]))
        assert 3e-5 < r.std() < 3e-4, pair


def test_pip_precision_and_ohlc_consistent(july):
    for pair, (_, o) in july.items():
        scaled = o[:, :4] * 10.0 ** pip_digits(pair)
        assert np.abs(scaled - np.round(scaled)).max() < 1e-6, pair
        opn, high, low, close, vol = o.T
        assert (low <= np.minimum(opn, close)).all() and (np.maximum(opn, close) <= high).all()
        assert (low > 0).all() and (vol >= 1).all()


def test_reproducible_and_subset_consistent(july):
    again = dict((p, (t, o)) for p, t, o in synth_bars(["usdjpy", "eurusd"], JULY, JULY, seed=0))
    for pair in ("usdjpy", "eurusd"):
        assert np.array_equal(again[pair][0], july[pair][0])
        assert np.array_equal(again[pair][1], july[pair][1])
    other = next(synth_bars(["eurusd"], JULY, JULY, seed=1))
    assert not np.array_equal(other[2][:, 3][:1000], july["eurusd"][1][:1000, 3])


def test_stored_exactly(settings, layout, conn):
    summary = store_for(settings, layout).generate(
        ["EURUSD", "usdjpy"], JULY, Month(2024, 8), workers=2
    )
    expected = {p: (t, o) for p, t, o in synth_bars(["eurusd", "usdjpy"], JULY, Month(2024, 8))}
    assert summary.bars == sum(len(t) for t, _ in expected.values())
    assert summary.months == ["2024-07", "2024-08"]
    for pair, (times, ohlcv) in expected.items():
        for month in (JULY, Month(2024, 8)):
            part = names.source_partition(layout, pair, month)
            n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(part)).fetchone()[0]
            in_month = (times >= np.datetime64(month.start.replace(tzinfo=None))) & (
                times < np.datetime64(month.end.replace(tzinfo=None))
            )
            assert n == in_month.sum()
        rows = conn.execute(
            sql.SQL(
                "SELECT time, open, high, low, close, volume FROM {} ORDER BY time LIMIT 3"
            ).format(names.source(layout, pair))
        ).fetchall()
        for row, t, o in zip(rows, times[:3], ohlcv[:3], strict=True):
            assert np.datetime64(row[0].replace(tzinfo=None), "us") == t
            assert list(row[1:]) == o.tolist()
    # generating July again replaces July with the same bars and leaves August
    august = names.source_partition(layout, "eurusd", Month(2024, 8))
    count = sql.SQL("SELECT count(*) FROM {}")
    n_aug = conn.execute(count.format(august)).fetchone()[0]
    store_for(settings, layout).generate(["eurusd"], JULY, JULY)
    _, july_only, _ = next(synth_bars(["eurusd"], JULY, JULY))
    assert conn.execute(count.format(names.source_partition(layout, "eurusd", JULY))).fetchone()[
        0
    ] == len(july_only)
    assert conn.execute(count.format(august)).fetchone()[0] == n_aug


def test_a_month_is_the_same_whatever_range_is_generated(settings, pg_url, conn):
    """Same seed and month, same bars: 2024-07..08 and 2024-07..09 in two schemas agree on July
    and August, and months join without a jump beyond a minute's move."""
    from bqx.config import load_settings
    from bqx.core.layout import Layout

    other = Layout(schema=settings.schema_name + "_b")
    try:
        store_for(settings, Layout(settings.schema_name)).generate(
            ["eurusd"], JULY, Month(2024, 8), seed=3
        )
        store_for(
            load_settings(database_url=pg_url, schema_name=other.schema, home=settings.home), other
        ).generate(["eurusd"], JULY, Month(2024, 9), seed=3)
        q = "SELECT time, open, high, low, close, volume FROM {} ORDER BY time"
        for month in (JULY, Month(2024, 8)):
            a = conn.execute(
                sql.SQL(q).format(
                    names.source_partition(Layout(settings.schema_name), "eurusd", month)
                )
            ).fetchall()
            b = conn.execute(
                sql.SQL(q).format(names.source_partition(other, "eurusd", month))
            ).fetchall()
            assert len(a) > 30_000 and a == b, month
        rows = conn.execute(sql.SQL(q).format(names.source(other, "eurusd"))).fetchall()
    finally:
        conn.execute(
            sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(sql.Identifier(other.schema))
        )
    times = np.array([r[0].replace(tzinfo=None) for r in rows], dtype="datetime64[us]")
    close = np.array([r[4] for r in rows])
    opn = np.array([r[1] for r in rows])
    moves = np.abs(np.diff(np.log(close)))
    typical = np.quantile(moves, 0.999)
    for boundary in ("2024-08-01", "2024-09-01"):
        i = int(np.searchsorted(times, np.datetime64(boundary)))
        # the month's first bar is no bigger a move than the 0.1 % largest minute moves
        assert abs(np.log(close[i] / close[i - 1])) <= typical * 1.5, boundary
    # and across the whole range, a bar opens where the previous bar closed, unless a minute
    # was missing in between (no month boundary breaks the chain)
    step = np.diff(times) == np.timedelta64(1, "m")
    assert (opn[1:][step] == close[:-1][step]).all()


def test_an_unknown_currency_is_refused_before_anything_is_created(settings, layout, conn):
    from bqx.errors import BqxError

    for pair in ("ABCDEF", "EUREUR"):
        with pytest.raises(BqxError, match=f"cannot generate {pair}"):
            store_for(settings, layout).generate([pair], Month(2024, 7), Month(2024, 7))
    found = conn.execute(
        "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (layout.schema,)
    ).fetchone()[0]
    assert found == 0


def source_versions(conn, layout) -> list[tuple]:
    q = sql.SQL("SELECT source_table, month, version FROM {} ORDER BY 1, 2").format(
        sql.Identifier(layout.schema, "bqx_source_versions")
    )
    return conn.execute(q).fetchall()


def test_generate_refuses_months_holding_bars_it_did_not_generate(
    settings, layout, conn, tmp_path, bqx
):
    """Real bars are never overwritten by synthetic ones without being asked: the months are
    named with their bars, nothing is written; --replace overwrites them."""
    from bqx.errors import NeedsOption
    from bqx.sources.ingest import ingest_files
    from test_ingest import stored

    real = tmp_path / "DAT_ASCII_AUDUSD_M1_202407.csv"
    real.write_text("".join(f"20240702 {h:02d}{m:02d}00;0.6601;0.6602;0.6600;0.6601;0\n"
                            for h in range(10, 14) for m in range(50)))  # fmt: skip
    assert ingest_files(resolve_url(settings), layout, [real], "AUDUSD").inserted == 200
    store = store_for(settings, layout)
    store.generate(["audusd"], Month(2024, 8), Month(2024, 8))  # generate's own month
    before = stored(conn, layout, "audusd")
    args = ["generate", "--pairs", "AUDUSD", "--start", "2024-06", "--end", "2024-08"]
    res = bqx(args)
    assert res.returncode == 1 and res.stdout == ""
    assert res.stderr == (
        "error: not generating over bars bqx did not generate (ingested, or changed since):"
        " AUDUSD 2024-07 (200 bars); nothing was written (--replace overwrites them)\n"
    )
    assert stored(conn, layout, "audusd") == before  # June not written either
    # a month generate wrote, then changed by an ingest, is no longer its own
    extra = tmp_path / "DAT_ASCII_AUDUSD_M1_202408.csv"
    extra.write_text("20240801 120000;0.66;0.67;0.65;0.66;0\n")
    ingest_files(resolve_url(settings), layout, [extra], "AUDUSD", allow_mismatch=True)
    with pytest.raises(NeedsOption, match=r"AUDUSD 2024-07 \(200 bars\), AUDUSD 2024-08 \("
                                          r"[\d,]+ bars\); nothing was written \(replace=True"
                                          r" overwrites them\)"):  # fmt: skip
        store.generate(["audusd"], Month(2024, 7), Month(2024, 8))
    assert "--replace" in " ".join(bqx(["generate", "--help"]).stdout.split())
    res = bqx(["demo", "--months", "1", "--pairs", "AUDUSD", "--out", str(tmp_path / "r")])
    assert res.returncode == 1 and "AUDUSD 2024-07 (200 bars)" in res.stderr
    assert "(--replace overwrites them)" in res.stderr and not (tmp_path / "r").exists()
    res = bqx([*args, "--replace"])
    assert res.returncode == 0, res.stderr
    assert "replaced bars bqx had not generated: AUDUSD 2024-07, AUDUSD 2024-08" in res.stdout
    _, times, ohlcv = next(synth_bars(["audusd"], Month(2024, 6), Month(2024, 8)))
    rows = stored(conn, layout, "audusd")
    assert [np.datetime64(r[0].replace(tzinfo=None), "us") for r in rows] == list(times)
    assert [list(r[1:]) for r in rows] == ohlcv.tolist()
    again = store.generate(["audusd"], Month(2024, 6), Month(2024, 8))  # its own now
    assert (again.unchanged, again.replaced) == (3, [])


def test_a_rerun_of_generate_changes_nothing_and_backfill_redoes_nothing(settings, layout, conn):
    store = store_for(settings, layout)
    first = store.generate(["eurusd", "usdjpy"], JULY, Month(2024, 8), seed=2, workers=2)
    assert store.backfill(workers=1).jobs_done == 4
    versions = source_versions(conn, layout)
    xmins = conn.execute(sql.SQL("SELECT xmin::text FROM {} ORDER BY time").format(
        names.source(layout, "eurusd"))).fetchall()  # fmt: skip
    again = store.generate(["eurusd", "usdjpy"], JULY, Month(2024, 8), seed=2, workers=2)
    assert source_versions(conn, layout) == versions
    assert conn.execute(sql.SQL("SELECT xmin::text FROM {} ORDER BY time").format(
        names.source(layout, "eurusd"))).fetchall() == xmins  # fmt: skip
    redo = store.backfill(workers=1)
    assert (redo.jobs_done, redo.jobs_skipped) == (0, 4)
    assert (again.unchanged, again.bars) == (4, first.bars)
    assert "4 pair-months already held these bars: left as they were" in again.text()
    # another seed gives other bars: those months change, and backfill redoes them
    other = store.generate(["eurusd"], Month(2024, 8), Month(2024, 8), seed=3)
    assert source_versions(conn, layout) != versions and other.unchanged == 0
    assert store.backfill(workers=1).jobs_done == 1
