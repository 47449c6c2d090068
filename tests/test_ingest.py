"""bqx ingest: each format loads exactly, bad lines are quarantined with reasons, loads merge."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys
import zipfile
from datetime import UTC, datetime

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from bqx.errors import BqxError
from bqx.sources import ingest as ingest_mod
from bqx.sources.ingest import Mapping, ingest_files, sniff


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def stored(conn, layout, pair: str) -> list[tuple]:
    return conn.execute(
        sql.SQL("SELECT time, open, high, low, close, volume FROM {} ORDER BY time").format(
            layout.source(pair)
        )
    ).fetchall()


def rejects_of(path) -> list[tuple[int, str]]:
    with open(path) as f:
        return [(int(r["line"]), r["reason"]) for r in csv.DictReader(f)]


HISTDATA = """\
20240310 023000;1.08500;1.08510;1.08490;1.08505;0
20240731 233000;1.09000;1.09010;1.08990;1.09005;0
20240731 232900;1.08900;1.08910;1.08890;1.08905;0
this is not a bar
20240731 233100;1.09100;1.09110;1.09090;x;0

20240731 233200;1.09200;1.09100;1.09300;1.09200;0
20240731 233300;1.09300;1.09310;1.09290;-1;0
20240731 233400;1.09400;1.09410;1.09390;1.09500;0
20240731 233000;1.09001;1.09011;1.08991;1.09006;0
19600101 000000;1.1;1.1;1.1;1.1;0
2024073 23350;1.1;1.1;1.1;1.1;0
20240731 233600;nan;1.1;1.1;1.1;0
"""


def test_histdata_exact_bars_times_and_rejects(settings, layout, conn, tmp_path):
    f = tmp_path / "DAT_ASCII_EURUSD_M1_2024.csv"
    f.write_text(HISTDATA)
    assert sniff(f) == "histdata"
    s = ingest_files(settings, layout, [f], "EURUSD")
    # EST is UTC-5 all year: no daylight-saving shift in March; July 31 23:30 EST is August 1
    assert stored(conn, layout, "eurusd") == [
        (utc(2024, 3, 10, 7, 30), 1.085, 1.0851, 1.0849, 1.08505, 0.0),
        (utc(2024, 8, 1, 4, 29), 1.089, 1.0891, 1.0889, 1.08905, 0.0),
        (utc(2024, 8, 1, 4, 30), 1.09001, 1.09011, 1.08991, 1.09006, 0.0),  # the later line wins
    ]
    assert (s.accepted, s.rejected, s.duplicates) == (3, 8, 1)
    assert s.months == {"2024-03": 1, "2024-08": 2}
    assert rejects_of(s.rejects_file) == [
        (4, "wrong number of fields"),
        (5, "unparseable close"),
        (7, "high 1.091 < low 1.093"),
        (8, "close is -1.0: must be finite and > 0"),
        (9, "close 1.095 outside [low, high]"),
        (11, "time out of range"),
        (12, "unparseable time"),
        (13, "open is nan: must be finite and > 0"),
    ]


def test_reingest_changes_nothing_and_overlapping_files_merge(settings, layout, conn, tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("20240701 000000;1.1;1.2;1.0;1.15;1\n20240701 000100;1.1;1.2;1.0;1.15;2\n")
    ingest_files(settings, layout, [a], "EURUSD")
    before = stored(conn, layout, "eurusd")
    xmins = conn.execute(
        sql.SQL("SELECT xmin::text FROM {}").format(layout.source("eurusd"))
    ).fetchall()
    again = ingest_files(settings, layout, [a], "EURUSD")
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
    assert stored(conn, layout, "eurusd") == before
    assert (
        conn.execute(
            sql.SQL("SELECT xmin::text FROM {}").format(layout.source("eurusd"))
        ).fetchall()
        == xmins
    )
    b = tmp_path / "b.csv.gz"
    with gzip.open(b, "wt") as f:
        f.write("20240701 000100;1.1;1.2;1.0;1.16;2\n20240701 000200;1.1;1.2;1.0;1.17;3\n")
    merged = ingest_files(settings, layout, [b], "EURUSD")
    assert (merged.inserted, merged.updated, merged.unchanged) == (1, 1, 0)
    assert [r[4] for r in stored(conn, layout, "eurusd")] == [1.15, 1.16, 1.17]


def test_dukascopy_gz(settings, layout, conn, tmp_path):
    f = tmp_path / "EURUSD_Candlestick_1_M_BID_01.07.2024-31.07.2024.csv.gz"
    with gzip.open(f, "wt") as g:
        g.write(
            "Gmt time,Open,High,Low,Close,Volume\n"
            "01.07.2024 00:01:00.000,1.07120,1.07130,1.07110,1.07125,123.45\n"
            "01.07.2024 00:00:00.000,1.07100,1.07120,1.07090,1.07120,99.1\n"
            "31.06.2024 00:00:00.000,1.07100,1.07120,1.07090,1.07120,99.1\n"
            "01.07.2024 00:02:00.000,1.07120,1.07130,1.07110,1.07125,-5\n"
        )
    assert sniff(f) == "dukascopy"
    s = ingest_files(settings, layout, [f], "eurusd", fmt="auto")
    assert stored(conn, layout, "eurusd") == [
        (utc(2024, 7, 1, 0, 0), 1.071, 1.0712, 1.0709, 1.0712, 99.1),
        (utc(2024, 7, 1, 0, 1), 1.0712, 1.0713, 1.0711, 1.07125, 123.45),
    ]
    assert rejects_of(s.rejects_file) == [
        (4, "unparseable time"),
        (5, "volume is -5.0: must be ≥ 0"),
    ]


def test_metatrader_zip_with_server_time_zone_across_dst(settings, layout, conn, tmp_path):
    f = tmp_path / "GBPUSD1.zip"
    with zipfile.ZipFile(f, "w") as z:
        z.writestr("readme.txt", "MetaTrader export")
        z.writestr(
            "GBPUSD1.csv",
            "2024.03.31,02:59,1.26,1.27,1.25,1.26,10\n"  # EET, UTC+2
            "2024.03.31,03:30,1.26,1.27,1.25,1.26,10\n"  # does not exist: clocks jump 03:00 -> 04:00
            "2024.03.31,04:00,1.26,1.27,1.25,1.26,10\n"  # EEST, UTC+3
            "2024.10.27,03:30,1.26,1.27,1.25,1.26,10\n"  # happens twice: the earlier (EEST) is taken
            "2024.10.27,04:30,1.26,1.27,1.25,1.26,10\n",  # EET again
        )
    assert sniff(f) == "metatrader"
    s = ingest_files(settings, layout, [f], "GBPUSD", tz="Europe/Athens")
    assert [r[0] for r in stored(conn, layout, "gbpusd")] == [
        utc(2024, 3, 31, 0, 59),
        utc(2024, 3, 31, 1, 0),
        utc(2024, 10, 27, 0, 30),
        utc(2024, 10, 27, 2, 30),
    ]
    assert rejects_of(s.rejects_file) == [(2, "local time does not exist (daylight-saving gap)")]


def test_generic_csv_and_parquet_with_a_column_mapping(settings, layout, conn, tmp_path):
    f = tmp_path / "bars.csv"
    f.write_text(
        "Date,O,H,L,Last\n2024-07-01T00:00:00Z,1.1,1.2,1.0,1.15\n2024-07-01 00:01,1.1,1.2,1.0,1.16\n"
    )
    mapping = Mapping.parse("time=Date,open=O,high=H,low=L,close=Last,volume=")
    s = ingest_files(settings, layout, [f], "AUDUSD", fmt="csv", mapping=mapping)
    assert s.accepted == 2 and s.rejected == 0
    assert stored(conn, layout, "audusd") == [
        (utc(2024, 7, 1, 0, 0), 1.1, 1.2, 1.0, 1.15, None),
        (utc(2024, 7, 1, 0, 1), 1.1, 1.2, 1.0, 1.16, None),
    ]
    p = tmp_path / "bars.parquet"
    table = pa.table({
        "ts": pa.array([datetime(2024, 7, 2, 0, 0), datetime(2024, 7, 2, 0, 1)], pa.timestamp("ms")),
        "open": [1.1, 1.1], "high": [1.2, 1.2], "low": [1.0, 1.3], "close": [1.15, 1.16],
        "volume": [5.0, 6.0],
    })  # fmt: skip
    pq.write_table(table, p)
    s = ingest_files(settings, layout, [p], "AUDUSD", mapping=Mapping.parse("time=ts"))
    assert (s.accepted, s.rejected) == (1, 1)
    assert rejects_of(s.rejects_file) == [(2, "high 1.2 < low 1.3")]
    assert stored(conn, layout, "audusd")[-1] == (utc(2024, 7, 2, 0, 0), 1.1, 1.2, 1.0, 1.15, 5.0)
    with pytest.raises(BqxError, match=r"no column 'Stamp' for time"):
        ingest_files(
            settings, layout, [f], "AUDUSD", fmt="csv", mapping=Mapping.parse("time=Stamp")
        )


def test_interrupted_ingest_keeps_earlier_months_and_the_interrupted_one(
    settings, layout, conn, tmp_path, monkeypatch
):
    old = tmp_path / "old.csv"
    old.write_text("20240801 000000;2.1;2.2;2.0;2.15;0\n")
    ingest_files(settings, layout, [old], "EURUSD")
    august_before = stored(conn, layout, "eurusd")
    new = tmp_path / "new.csv"
    new.write_text("20240701 000000;1.1;1.2;1.0;1.15;0\n20240801 000000;3.1;3.2;3.0;3.15;0\n")
    real = ingest_mod.load_bars

    def failing_second_month(conn, layout, pair, times, *args, **kwargs):
        if str(times[0]).startswith("2024-08"):
            raise KeyboardInterrupt  # the user pressed Ctrl-C while August was loading
        return real(conn, layout, pair, times, *args, **kwargs)

    monkeypatch.setattr(ingest_mod, "load_bars", failing_second_month)
    with pytest.raises(KeyboardInterrupt):
        ingest_files(settings, layout, [new], "EURUSD")
    rows = stored(conn, layout, "eurusd")
    assert rows[0] == (utc(2024, 7, 1, 5, 0), 1.1, 1.2, 1.0, 1.15, 0.0)  # July stored
    assert rows[1:] == august_before  # August as it was


def test_bad_invocations_fail_clearly_and_write_nothing(settings, layout, conn, tmp_path, cli_env):
    good = tmp_path / "good.csv"
    good.write_text("20240701 000000;1.1;1.2;1.0;1.15;0\n")
    junk = tmp_path / "junk.txt"
    junk.write_text("12345 hello\n")
    cases = [
        ([tmp_path / "missing.csv"], "EURUSD", "auto", r"missing.csv: no such file"),
        ([junk], "EURUSD", "auto", r"junk.txt: unknown format"),
        ([good], "EURUS", "auto", r"invalid pair name 'EURUS'"),
        ([good], "EURUSD", "excel", r"unknown --format 'excel'"),
        ([good, tmp_path / "missing.csv"], "EURUSD", "auto", r"missing.csv: no such file"),
    ]
    for files, pair, fmt, message in cases:
        with pytest.raises(BqxError, match=message):
            ingest_files(settings, layout, files, pair, fmt=fmt)
    exists = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (layout.schema,))
    assert exists.fetchone()[0] == 0  # nothing was created
    res = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "ingest", str(junk), "--pair", "EURUSD"],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert res.stderr.count("\n") == 1 and "unknown format" in res.stderr


def test_cli_json_summary(tmp_path, cli_env):
    f = tmp_path / "h.csv"
    f.write_text("20240701 000000;1.1;1.2;1.0;1.15;0\n20240701 000000;1.1;1.2;1.0;1.15;0\nbad\n")
    res = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "ingest", str(f), "--pair", "EURUSD", "--json"],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["accepted"], doc["rejected"], doc["duplicates"]) == (1, 1, 1)
    assert doc["rejects_file"] == str(f) + ".rejects.csv"
