"""Instrument symbols: one grammar, safe SQL names, the same name everywhere, file names matched.

No database here: the grammar, the names bqx builds from a symbol, and the reading of file
names and exchange kline files. The symbols' way through a real server is in
tests/test_instruments.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bqx.core.layout import NAME_BYTES, Layout
from bqx.core.months import Month
from bqx.core.symbols import (
    MAX_SYMBOL,
    REPORT_PAIRS,
    RESERVED,
    display,
    is_pair,
    parse_pairs,
    validate_pair,
)
from bqx.errors import BqxError
from bqx.sources.formats import (
    Mapping,
    name_mismatch,
    read_blocks,
    reading_plan,
    sniff,
    symbol_core,
)
from bqx.store import names

# what brokers, exchanges and the report call instruments
GOOD = ["EURUSD", "XAUUSD", "EURUSD.m", "EURUSDm", "US500", "GER40", "XBRUSD", "BTCUSDT",
        "ETHBTC", "6E", "ESZ4", "US500.cash", "EURUSD_i", "EURUSD-ecn", "BTC-27DEC24-100000-C",
        "1000SHIBUSDT", "7203", "X", "A" * MAX_SYMBOL]  # fmt: skip
HOSTILE = ["", " ", "EUR/USD", "EUR USD", "eur'; DROP TABLE bqx.bqx_runs; --", 'EUR"USD', "..",
           ".m", "EURUSD.", "-EURUSD", "_x", "A" * (MAX_SYMBOL + 1), "ЕURUSD", "\u212aRW",
           "{pair}", "eur\nusd", "eur%usd", "eur*", "../etc", "runs", "JOBS", "Targets",
           "source_versions", "eurusd_2024m07", "ES_2024", "eurusd\x00"]  # fmt: skip


@pytest.mark.parametrize("name", GOOD)
def test_instruments_as_brokers_name_them_are_symbols(name):
    stored = validate_pair(name)
    assert stored == name.lower() and is_pair(stored)
    assert validate_pair(f"  {name.upper()} ") == stored  # case-insensitive, spaces trimmed
    assert display(stored) == name.upper()  # the one name a person or a reader sees


def test_the_report_pairs_are_symbols():
    assert all(is_pair(p) for p in REPORT_PAIRS) and len(REPORT_PAIRS) == 28


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_names_are_refused_with_one_line(name):
    with pytest.raises(BqxError, match=r"^invalid pair name ") as err:
        validate_pair(name)
    text = str(err.value)
    assert "\n" not in text and len(text) < 300, text
    assert not name.isascii() or not is_pair(name.lower())


def test_parse_pairs_keeps_order_and_one_name_per_instrument():
    assert parse_pairs("EURUSD.m, eurusd.M,US500,BTCUSDT") == ["eurusd.m", "us500", "btcusdt"]
    with pytest.raises(BqxError, match=r"invalid pair name 'EUR/USD'"):
        parse_pairs(["EURUSD", "EUR/USD"])


def test_reserved_words_are_the_tables_bqx_keeps_beside_the_targets():
    """A symbol's target ``bqx_{symbol}`` may never be one of bqx's own tables."""
    from bqx.store import generated, ledger, versions

    own = {ledger.RUNS, ledger.JOBS, ledger.ATTEMPTS, ledger.TARGETS, ledger.VERIFICATIONS,
           versions.SOURCE_VERSIONS, versions.TARGET_VERSIONS, generated.GENERATED}  # fmt: skip
    assert {f"bqx_{w}" for w in RESERVED} == own


def test_no_table_bqx_keeps_is_taken_for_a_pair(store, conn, layout):
    """Every table a generate, backfill and verify leave in the schema: only the pair's own
    metrics table reads as a pair (a new ledger table must join RESERVED)."""
    from bqx.store import catalog

    store.generate(["EURUSD"], "2024-07", "2024-07")
    store.backfill(workers=1)
    assert store.verify().ok
    assert catalog.target_pairs(conn, layout) == ["eurusd"]
    assert catalog.source_pairs(conn, layout) == ["eurusd"]
    tables = {r[0] for r in conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p') AND NOT c.relispartition",
        (layout.schema,),
    )}  # fmt: skip
    assert {t for t in tables if t.startswith("bqx_")} == {"bqx_eurusd"} | {
        f"bqx_{w}" for w in RESERVED
    }


def test_every_name_built_from_the_longest_symbol_fits_postgres():
    layout = Layout(schema="bqx")
    longest = "b" * MAX_SYMBOL
    month = Month(2024, 7)
    built = [
        layout.target_name(longest),
        layout.target_partition_name(longest, month),
        *layout.source_name(longest),
        layout.source_partition_name(longest, month)[1],
    ]
    assert max(len(n.encode()) for n in built) <= NAME_BYTES
    # a custom source pattern whose affixes leave no room is refused, in one line, by name
    wide = Layout(source_table="bars_from_the_old_system_{pair}_minute")
    assert wide.source_name("eurusd.m")[1] == "bars_from_the_old_system_eurusd.m_minute"
    with pytest.raises(BqxError, match=r"symbol B{32} is too long for the source table pattern"):
        wide.source_name(longest)


def test_sql_names_are_quoted_identifiers():
    layout = Layout(schema="bqx")
    assert names.target(layout, "EURUSD.m").as_string(None) == '"bqx"."bqx_eurusd.m"'
    assert (
        names.target_partition(layout, "btc-27dec24-100000-c", Month(2024, 7)).as_string(None)
        == '"bqx"."bqx_btc-27dec24-100000-c_2024m07"'
    )
    assert names.source(layout, "6E").as_string(None) == '"bqx"."m1_6e"'


# -- file names --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "file,symbol",
    [
        ("EURUSD.m_M1_202401020000_202401312359.csv", "EURUSD.m"),  # MT5 export, suffix kept
        ("EURUSD.m_M1_202401020000_202401312359.csv", "EURUSD"),  # ... or given without it
        ("DAT_ASCII_EURUSD_M1_2024.csv", "EURUSD.m"),  # HistData, a broker's name given
        ("EURUSDm_M1_202401020000_202401312359.csv", "EURUSDm"),
        ("EURUSDm1.csv", "EURUSD"),  # MT4, suffix and timeframe
        ("US500_M1_202401020000_202401312359.csv", "US500"),
        ("US500_M1_202401020000_202401312359.csv", "US500.cash"),
        ("HISTDATA_COM_ASCII_XAUUSD_M1202401.zip", "XAUUSD"),
        ("BTCUSDT-1m-2024-01.csv", "BTCUSDT"),
        ("ETHBTC-1m-2024-01-15.csv", "ETHBTC"),
        ("6E_continuous_1min.csv", "6E"),  # says nothing we can read: not refused
        ("bars.csv", "GER40"),
    ],
)
def test_a_file_name_with_a_broker_suffix_fits_the_symbol(tmp_path, file, symbol):
    path = tmp_path / file
    path.write_text("")
    assert name_mismatch(path, validate_pair(symbol)) == set()


@pytest.mark.parametrize(
    "file,symbol,said",
    [
        ("EURUSD.m_M1_202401020000_202401312359.csv", "GBPUSD", {"eurusd", "eurusd.m"}),
        ("GBPUSDm_M1_202401020000_202401312359.csv", "EURUSDm", {"gbpusd", "gbpusdm"}),
        ("US500_M1_202401020000_202401312359.csv", "GER40", {"us500"}),
        ("ETHUSDT-1m-2024-01.csv", "BTCUSDT", {"ethusdt"}),
        ("DAT_ASCII_XAUUSD_M1_2024.csv", "XAGUSD", {"xauusd"}),
    ],
)
def test_a_file_named_for_another_instrument_is_told(tmp_path, file, symbol, said):
    path = tmp_path / file
    path.write_text("")
    assert name_mismatch(path, validate_pair(symbol)) == said


def test_symbol_core_strips_a_brokers_decoration_only():
    cores = {s: symbol_core(validate_pair(s)) for s in
             ("EURUSD.m", "EURUSDm", "EURUSD_i", "EURUSD-ecn", "EURUSDpro", "US500.cash",
              "BTCUSDT", "EURUSDT", "6E", "ESZ4", "XAUUSD")}  # fmt: skip
    assert cores == {
        "EURUSD.m": "eurusd", "EURUSDm": "eurusd", "EURUSD_i": "eurusd", "EURUSD-ecn": "eurusd",
        "EURUSDpro": "eurusd", "US500.cash": "us500", "BTCUSDT": "btcusdt", "EURUSDT": "eurusdt",
        "6E": "6e",
        "ESZ4": "esz4", "XAUUSD": "xauusd",
    }  # fmt: skip


# -- exchange kline files ----------------------------------------------------------------------

KLINES = (
    "1704067200000,42283.58000000,42298.62000000,42261.02000000,42298.61000000,35.92724000,"
    "1704067259999,1519032.99558810,1325,19.22130000,812790.94016950,0\n"
    "1704067260000,42298.62000000,42320.00000000,42298.61000000,42319.99000000,21.37000000,"
    "1704067319999,904291.92000000,1030,11.00000000,465397.50000000,0\n"
    # Binance spot files since 2025 count microseconds
    "1735689600000000,93576.00000000,93610.93000000,93537.50000000,93610.93000000,8.21827000,"
    "1735689659999999,768978.59,1940,3.49,326603.90,0\n"
    "1735689660000000,93610.93,93500.00,93652.00,93649.99,1.0,1735689719999999,1.0,1,1.0,1.0,0\n"
    "17356897x0000000,1,1,1,1,1,1,1,1,1,1,0\n"
)


def _read(path: Path, kind: str) -> tuple[np.ndarray, np.ndarray, list]:
    plan = reading_plan(path, kind, Mapping(), None)
    blocks = list(read_blocks(path, plan, None, Mapping()))
    times = np.concatenate([b.times for b in blocks])
    ohlcv = np.concatenate([b.ohlcv for b in blocks])
    return times, ohlcv, [r for b in blocks for r in b.rejects]


@pytest.mark.parametrize("header", [False, True])
def test_exchange_klines_are_read_at_their_utc_instant(tmp_path, header):
    path = tmp_path / "BTCUSDT-1m-2024-01.csv"
    head = "open_time,open,high,low,close,volume,close_time,quote_volume,count,"
    head += "taker_buy_volume,taker_buy_quote_volume,ignore\n"
    path.write_text((head if header else "") + KLINES)
    assert sniff(path) == "klines"
    times, ohlcv, rejects = _read(path, "klines")
    assert times.astype("datetime64[us]").tolist() == [
        np.datetime64("2024-01-01T00:00").astype("datetime64[us]").item(),
        np.datetime64("2024-01-01T00:01").astype("datetime64[us]").item(),
        np.datetime64("2025-01-01T00:00").astype("datetime64[us]").item(),
    ]
    assert ohlcv[0].tolist() == [42283.58, 42298.62, 42261.02, 42298.61, 35.92724]
    first = 2 if header else 1
    assert [(line, why) for line, why, _ in rejects] == [
        (first + 3, "high 93500.0 < low 93652.0"),
        (first + 4, "unparseable time"),
    ]
