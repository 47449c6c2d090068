"""The synthetic universe of ``bqx generate --instruments N``: mixed kinds, each on its own grid
and in its own hours, deterministic by seed, months joining exactly."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter

import numpy as np
import pytest
from psycopg import sql

from bqx import metrics
from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.symbols import REPORT_PAIRS, is_pair
from bqx.sources.universe import (
    HOURS,
    Instrument,
    find,
    instrument_bars,
    open_minutes,
    symbol_of,
    universe,
)
from bqx.store import names

JULY, AUGUST = Month(2024, 7), Month(2024, 8)


def kind(item: Instrument | str) -> str:
    return "forex" if isinstance(item, str) else item.kind


def test_any_n_is_a_mix_and_a_prefix_of_a_larger_n():
    six = universe(6)
    assert [kind(i) for i in six] == ["forex", "metal", "index", "crypto", "future", "stock"]
    big = universe(500, seed=3)
    symbols = [symbol_of(i) for i in big]
    assert len(set(symbols)) == 500 and all(is_pair(s) for s in symbols)
    assert [symbol_of(i) for i in universe(60, seed=3)] == symbols[:60]
    counts = Counter(kind(i) for i in big)
    assert counts["forex"] == 28 and min(counts.values()) == 28 and len(counts) == 6
    assert {s for s in symbols if kind(find(s, 3) or s) == "forex"} == set(REPORT_PAIRS)
    assert symbols[:6] == ["eurusd", "xauusd", "us500", "btcusdt", "6e", "s001.us"]
    # numbered instruments are a function of the seed
    assert find("alt001usdt", 3) == find("alt001usdt", 3) != find("alt001usdt", 4)


@pytest.mark.parametrize(
    "symbol,grid",
    [("xauusd", 4), ("us500", 3), ("ger40", 3), ("jpn225", 2), ("btcusdt", 2), ("ethbtc", 5),
     ("shibusdt", 8), ("pepeusdt", 10), ("6e", 5), ("6j", 7), ("s001.us", 5),
     ("zn", -1)],  # 110.015625: 1/64 needs 6 decimals, 1.1e8 on 10^-6 is too large: the scan
)  # fmt: skip
def test_bars_lie_on_the_instruments_grid_and_the_kernel_uses_it(symbol, grid):
    inst = find(symbol)
    assert inst is not None
    times, ohlcv = instrument_bars(inst, JULY, seed=0)
    assert len(times) > 5000
    prices = ohlcv[:, :4]
    ticks = prices / inst.step
    assert np.allclose(ticks, np.round(ticks), rtol=0, atol=1e-6)  # multiples of the tick
    assert np.array_equal(prices, np.round(prices, inst.decimals))  # written with its decimals
    o, h, lo, c = prices.T
    assert (lo > 0).all() and (lo <= np.minimum(o, c)).all() and (h >= np.maximum(o, c)).all()
    assert (metrics.row_grids(ohlcv[:, 3])[100:] == grid).all()


@pytest.mark.parametrize("hours", sorted(HOURS))
def test_bars_only_in_the_hours_of_their_kind(hours):
    inst = next(i for i in universe(60) if not isinstance(i, str) and i.hours == hours)
    times, _ = instrument_bars(inst, JULY, seed=0)
    assert set(times.astype("datetime64[m]").tolist()) <= set(open_minutes(hours, JULY).tolist())
    weekday = ((times.astype("datetime64[D]").astype(np.int64) + 3) % 7).tolist()  # Monday 0
    assert (5 in weekday) == (hours == "crypto")  # Saturday: crypto only
    share = len(times) / len(open_minutes(hours, JULY))
    assert 1 - 2 * inst.missing < share <= 1


def test_months_join_exactly_and_depend_only_on_seed_symbol_and_month():
    inst = find("btcusdt")
    assert inst is not None
    t7, o7 = instrument_bars(inst, JULY, seed=5)
    t8, o8 = instrument_bars(inst, AUGUST, seed=5)
    # (crypto trades every minute: the last of July and the first of August are both there)
    assert t7[-1] == np.datetime64("2024-07-31T23:59") and t8[0] == np.datetime64("2024-08-01")
    assert o8[0, 0] == o7[-1, 3]
    again = instrument_bars(inst, JULY, seed=5)
    assert np.array_equal(again[0], t7) and np.array_equal(again[1], o7)
    other = instrument_bars(inst, JULY, seed=6)
    assert not np.array_equal(other[1][:, 3], o7[:, 3])
    # correlated within a kind: BTC and ETH share the crypto factor
    t_eth, o_eth = instrument_bars(find("ethusdt"), JULY, seed=5)  # type: ignore[arg-type]
    both = np.intersect1d(t7, t_eth)
    btc = o7[np.searchsorted(t7, both), 3]
    eth = o_eth[np.searchsorted(t_eth, both), 3]
    assert np.corrcoef(np.diff(np.log(btc)), np.diff(np.log(eth)))[0, 1] > 0.2


def test_generate_instruments_stores_them_under_their_symbols(cli_env, conn, schema_name):
    cmd = [sys.executable, "-m", "bqx.cli", "generate", "--start", "2024-07", "--json"]
    res = subprocess.run([*cmd, "--instruments", "6"], env=cli_env, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["pairs"] == ["EURUSD", "XAUUSD", "US500", "BTCUSDT", "6E", "S001.US"]
    tables = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind = 'p' ORDER BY 1",
        (schema_name,),
    ).fetchall()
    assert [t for (t,) in tables] == sorted(
        f"m1_{s}" for s in ("eurusd", "xauusd", "us500", "btcusdt", "6e", "s001.us")
    )
    table = names.source(Layout(schema=schema_name), "S001.US")  # "schema"."m1_s001.us"
    n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()[0]
    want = len(instrument_bars(find("s001.us"), JULY, seed=0)[0])  # type: ignore[arg-type]
    assert n == want and doc["bars"] > 6 * 8000
    both = subprocess.run([*cmd, "--instruments", "6", "--pairs", "EURUSD"], env=cli_env,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert both.returncode == 2 and "Traceback" not in both.stderr
    assert both.stderr.strip() == (
        "error: invalid --instruments 6: give pairs or instruments, not both"
    ), both.stderr
