"""bqx ingest: each format loads exactly, bad lines are quarantined with reasons, loads merge."""

from __future__ import annotations

import csv
import gzip
import json
import os
import random
import subprocess
import sys
import threading
import time
import zipfile
from datetime import UTC, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from psycopg import sql

from bqx.core.months import Month
from bqx.db import resolve_url
from bqx.errors import BqxError
from bqx.sources import formats
from bqx.sources import ingest as ingest_mod
from bqx.sources.formats import Mapping, pairs_in_name, sniff
from bqx.sources.ingest import ingest_files
from bqx.store import names
from bqx.store.bars import lock_source_month, source_month_key


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


def stored(conn, layout, pair: str) -> list[tuple]:
    return conn.execute(
        sql.SQL("SELECT time, open, high, low, close, volume FROM {} ORDER BY time").format(
            names.source(layout, pair)
        )
    ).fetchall()


def rejects_of(path) -> list[tuple[int, str]]:
    with open(path, encoding="utf-8") as f:
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
20240731 233700;1.1;1.1;1.1;inf;0
20240731 233800;0;1.1;1.1;1.1;0
20240731 233900;1.1;1.1;1.1;1.1;0;7
20240231 000000;1.1;1.1;1.1;1.1;0
20991231 000000;1.1;1.1;1.1;1.1;0
20240731 234000;1.1;1.2;1.0;1.1;
"""


def test_histdata_exact_bars_times_and_rejects(settings, layout, conn, tmp_path):
    f = tmp_path / "DAT_ASCII_EURUSD_M1_2024.csv"
    f.write_text(HISTDATA)
    assert sniff(f) == "histdata"
    s = ingest_files(resolve_url(settings), layout, [f], "EURUSD")
    # EST is UTC-5 all year: no daylight-saving shift in March; July 31 23:30 EST is August 1
    assert stored(conn, layout, "eurusd") == [
        (utc(2024, 3, 10, 7, 30), 1.085, 1.0851, 1.0849, 1.08505, 0.0),
        (utc(2024, 8, 1, 4, 29), 1.089, 1.0891, 1.0889, 1.08905, 0.0),
        (utc(2024, 8, 1, 4, 30), 1.09001, 1.09011, 1.08991, 1.09006, 0.0),  # the later line wins
        (utc(2024, 8, 1, 4, 40), 1.1, 1.2, 1.0, 1.1, None),  # no volume: NULL
    ]
    assert (s.accepted, s.rejected, s.duplicates) == (4, 13, 1)
    assert s.months == {"2024-03": 1, "2024-08": 3}
    assert [(f.format, f.lines, f.accepted, f.rejected) for f in s.files] == [
        ("histdata", 19, 5, 13)  # 5 valid rows, one of them a duplicate; the blank line skipped
    ]
    assert rejects_of(s.rejects_file) == [
        (4, "wrong number of fields"),
        (5, "unparseable close"),
        (7, "high 1.091 < low 1.093"),
        (8, "close is -1.0: must be finite and > 0"),
        (9, "close 1.095 outside [low, high]"),
        (11, "time out of range"),
        (12, "unparseable time"),
        (13, "open is nan: must be finite and > 0"),
        (14, "close is inf: must be finite and > 0"),
        (15, "open is 0.0: must be finite and > 0"),
        (16, "wrong number of fields"),
        (17, "unparseable time"),  # February 31st
        (18, "time out of range"),  # the future
    ]
    with open(s.rejects_file, encoding="utf-8") as fh:
        first = next(csv.DictReader(fh))
    assert first == {"file": str(f), "line": "4", "reason": "wrong number of fields",
                     "text": "this is not a bar"}  # fmt: skip


def test_histdata_zip_as_shipped_with_crlf_and_bom(settings, layout, conn, tmp_path):
    f = tmp_path / "HISTDATA_COM_ASCII_EURUSD_M1202407.zip"
    with zipfile.ZipFile(f, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr("DAT_ASCII_EURUSD_M1_202407.txt", "HistData.com status report\r\ngaps: none\r\n")
        z.writestr(
            "DAT_ASCII_EURUSD_M1_202407.csv",
            "\ufeff20240630 170000;1.07100;1.07120;1.07090;1.07120;0\r\n"
            "20240630 170100;1.07120;1.07130;1.07110;1.07125;0\r\n",
        )
    assert sniff(f) == "histdata"
    s = ingest_files(resolve_url(settings), layout, [f], "EURUSD")
    assert stored(conn, layout, "eurusd") == [
        (utc(2024, 6, 30, 22, 0), 1.071, 1.0712, 1.0709, 1.0712, 0.0),
        (utc(2024, 6, 30, 22, 1), 1.0712, 1.0713, 1.0711, 1.07125, 0.0),
    ]
    assert (s.accepted, s.rejected, s.rejects_file) == (2, 0, None)


def test_big_unsorted_file_across_blocks_gives_exact_bars_lines_and_duplicates(
    settings, layout, conn, tmp_path, monkeypatch
):
    """Many small blocks (so block edges fall everywhere), shuffled lines over a month edge,
    duplicates inside the file and in a second file, and every kind of bad line."""
    monkeypatch.setattr(formats, "BLOCK_BYTES", 700)
    rng = random.Random(5)
    start = datetime(2024, 7, 31, 17, 0)  # EST: 22:00 UTC, two hours before August
    good = []
    for i in range(600):
        t = start + timedelta(minutes=i)
        p = round(1.1 + i * 1e-5, 5)
        good.append((t, (p, round(p + 1e-4, 5), round(p - 1e-4, 5), p, float(i % 7))))
    rows = good + [(t, (o, h, lo, round(c + 2e-5, 5), v)) for t, (o, h, lo, c, v) in good[::12]]
    rng.shuffle(rows)

    def line(t: datetime, v: tuple) -> str:
        return f"{t:%Y%m%d %H%M%S};" + ";".join(f"{x:.5f}" for x in v[:4]) + f";{v[4]:g}"

    bad_kinds = [
        ("garbage", "wrong number of fields"),
        ("20240731 1700;1.1;1.2;1.0;1.1;0", "unparseable time"),
        ("20240731 170000;abc;1.2;1.0;1.1;0", "unparseable open"),
        ("20240731 170000;1.1;1.0;1.2;1.1;0", "high 1.0 < low 1.2"),
        ("20240731 170000;1.1;1.2;1.0;inf;0", "close is inf: must be finite and > 0"),
        ("20240731 170000;1.1;1.2;1.0;1.1;-3", "volume is -3.0: must be finite and ≥ 0"),
        ("19690101 000000;1.1;1.2;1.0;1.1;0", "time out of range"),
        ("20240731 170000;1.1;1.2;1.0;1.1;0;0", "wrong number of fields"),
    ]
    text, expected_rejects, kept = [], [], {}
    for k, (t, v) in enumerate(rows):
        if k % 37 == 5:  # a bad line takes this row's place
            bad, reason = bad_kinds[(k // 37) % len(bad_kinds)]
            text.append(bad)
            expected_rejects.append((len(text), reason))
        elif k % 101 == 50:
            text.append("")  # blank lines are skipped, not rejected, but still counted
            continue
        else:
            text.append(line(t, v))
            kept[t] = v  # the last line with a time wins
    f = tmp_path / "unsorted.csv.gz"
    with gzip.open(f, "wt") as g:
        g.write("\n".join(text) + "\n")
    s = ingest_files(resolve_url(settings), layout, [f], "EURUSD", fmt="histdata")
    want = [(t.replace(tzinfo=UTC) + timedelta(hours=5), *v) for t, v in sorted(kept.items())]
    assert stored(conn, layout, "eurusd") == want
    assert rejects_of(s.rejects_file) == expected_rejects
    valid = len(text) - len(expected_rejects) - text.count("")
    assert (s.accepted, s.rejected, s.duplicates) == (len(kept), len(expected_rejects),
                                                       valid - len(kept))  # fmt: skip
    assert s.duplicates > 0 and set(s.months) == {"2024-07", "2024-08"}
    assert s.files[0].lines == len(text)

    # re-ingesting changes nothing, not even the rows' versions
    xmins = conn.execute(
        sql.SQL("SELECT time, xmin::text FROM {} ORDER BY time").format(
            names.source(layout, "eurusd")
        )
    ).fetchall()
    again = ingest_files(resolve_url(settings), layout, [f], "EURUSD")
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, len(kept))
    assert (
        conn.execute(
            sql.SQL("SELECT time, xmin::text FROM {} ORDER BY time").format(
                names.source(layout, "eurusd")
            )
        ).fetchall()
        == xmins
    )


def test_reingest_changes_nothing_and_overlapping_files_merge(settings, layout, conn, tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("20240701 000000;1.1;1.2;1.0;1.15;1\n20240701 000100;1.1;1.2;1.0;1.15;2\n")
    ingest_files(resolve_url(settings), layout, [a], "EURUSD")
    before = stored(conn, layout, "eurusd")
    again = ingest_files(resolve_url(settings), layout, [a], "EURUSD")
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
    assert stored(conn, layout, "eurusd") == before
    b = tmp_path / "b.csv.gz"
    with gzip.open(b, "wt") as f:
        f.write("20240701 000100;1.1;1.2;1.0;1.16;2\n20240701 000200;1.1;1.2;1.0;1.17;3\n")
    merged = ingest_files(resolve_url(settings), layout, [b], "EURUSD")
    assert (merged.inserted, merged.updated, merged.unchanged) == (1, 1, 0)
    assert [r[4] for r in stored(conn, layout, "eurusd")] == [1.15, 1.16, 1.17]
    # two overlapping files in one call: the later file's bar wins and counts as a duplicate
    both = ingest_files(resolve_url(settings), layout, [b, a], "EURUSD")
    assert (both.accepted, both.duplicates) == (3, 1)
    assert [r[4] for r in stored(conn, layout, "eurusd")] == [1.15, 1.15, 1.17]


def test_dukascopy_gmt_and_local_time_exports(settings, layout, conn, tmp_path):
    f = tmp_path / "EURUSD_Candlestick_1_M_BID_01.07.2024-31.07.2024.csv.gz"
    with gzip.open(f, "wt") as g:
        g.write(
            "Gmt time,Open,High,Low,Close,Volume\n"
            "01.07.2024 00:01:00.000,1.07120,1.07130,1.07110,1.07125,123.45\n"
            "01.07.2024 00:00:00.000,1.07100,1.07120,1.07090,1.07120,99.1\n"
            "31.06.2024 00:00:00.000,1.07100,1.07120,1.07090,1.07120,99.1\n"
            "01.07.2024 00:02:00.000,1.07120,1.07130,1.07110,1.07125,-5\n"
            "01.07.2024 00:03:00.000,1.07120,1.07130\n"
        )
    assert sniff(f) == "dukascopy"
    s = ingest_files(resolve_url(settings), layout, [f], "eurusd", fmt="auto")
    assert stored(conn, layout, "eurusd") == [
        (utc(2024, 7, 1, 0, 0), 1.071, 1.0712, 1.0709, 1.0712, 99.1),
        (utc(2024, 7, 1, 0, 1), 1.0712, 1.0713, 1.0711, 1.07125, 123.45),
    ]
    assert rejects_of(s.rejects_file) == [
        (4, "unparseable time"),
        (5, "volume is -5.0: must be finite and ≥ 0"),
        (6, "wrong number of fields"),
    ]
    local = tmp_path / "GBPUSD_local.csv"
    local.write_text(
        "Local time,Open,High,Low,Close,Volume\n"
        "01.07.2024 03:00:00.000 GMT+0300,1.26,1.27,1.25,1.26,10\n"
        "01.12.2024 02:00:00.000 GMT+0200,1.26,1.27,1.25,1.26,10\n"
    )
    assert sniff(local) == "dukascopy"
    ingest_files(resolve_url(settings), layout, [local], "GBPUSD")
    assert [r[0] for r in stored(conn, layout, "gbpusd")] == [utc(2024, 7, 1), utc(2024, 12, 1)]


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
    s = ingest_files(resolve_url(settings), layout, [f], "GBPUSD", tz="Europe/Athens")
    assert [r[0] for r in stored(conn, layout, "gbpusd")] == [
        utc(2024, 3, 31, 0, 59),
        utc(2024, 3, 31, 1, 0),
        utc(2024, 10, 27, 0, 30),
        utc(2024, 10, 27, 2, 30),
    ]
    assert rejects_of(s.rejects_file) == [(2, "local time does not exist (daylight-saving gap)")]


def test_metatrader5_tab_export_in_a_fixed_offset_zone(settings, layout, conn, tmp_path):
    f = tmp_path / "EURUSD_M1_202407.csv"
    f.write_text(
        "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>\n"
        "2024.07.01\t00:00:00\t1.07100\t1.07120\t1.07090\t1.07120\t45\t0\t2\n"
        "2024.07.01\t00:01:00\t1.07120\t1.07130\t1.07110\t1.07125\t12\t0\t2\n"
    )
    assert sniff(f) == "metatrader"
    ingest_files(resolve_url(settings), layout, [f], "EURUSD", tz="Etc/GMT-2")  # POSIX sign: UTC+2
    assert stored(conn, layout, "eurusd") == [
        (utc(2024, 6, 30, 22, 0), 1.071, 1.0712, 1.0709, 1.0712, 45.0),
        (utc(2024, 6, 30, 22, 1), 1.0712, 1.0713, 1.0711, 1.07125, 12.0),
    ]


def test_generic_csv_and_parquet_with_a_column_mapping(settings, layout, conn, tmp_path):
    f = tmp_path / "bars.csv"
    f.write_text(
        "Date,O,H,L,Last\n"
        "2024-07-01T00:00:00Z,1.1,1.2,1.0,1.15\n"
        "2024-07-01 00:01,1.1,1.2,1.0,1.16\n"
        "2024-07-01T02:02:00+02:00,1.1,1.2,1.0,1.17\n"
        "2024-07-01 00:03:00.000,1.1,1.2,1.0,\n"
    )
    mapping = Mapping.parse("time=Date,open=O,high=H,low=L,close=Last,volume=")
    s = ingest_files(resolve_url(settings), layout, [f], "AUDUSD", fmt="csv", mapping=mapping)
    assert (s.accepted, s.rejected) == (3, 1)
    assert rejects_of(s.rejects_file) == [(5, "missing close")]
    assert stored(conn, layout, "audusd") == [
        (utc(2024, 7, 1, 0, 0), 1.1, 1.2, 1.0, 1.15, None),
        (utc(2024, 7, 1, 0, 1), 1.1, 1.2, 1.0, 1.16, None),
        (utc(2024, 7, 1, 0, 2), 1.1, 1.2, 1.0, 1.17, None),
    ]
    # a strptime format and a time zone for naive local times
    g = tmp_path / "ny.csv"
    g.write_text("when;open;high;low;close;volume\n01/07/2024 20:00;1.1;1.2;1.0;1.15;3\n")
    ingest_files(resolve_url(settings), layout, [g], "USDCAD", mapping=Mapping.parse("time=when", "%d/%m/%Y %H:%M"),
                 tz="America/New_York")  # fmt: skip
    assert stored(conn, layout, "usdcad") == [(utc(2024, 7, 2, 0, 0), 1.1, 1.2, 1.0, 1.15, 3.0)]

    p = tmp_path / "bars.parquet"
    table = pa.table({
        "ts": pa.array([datetime(2024, 7, 2, 0, 0), datetime(2024, 7, 2, 0, 1)], pa.timestamp("ms")),
        "open": [1.1, 1.1], "high": [1.2, 1.2], "low": [1.0, 1.3], "close": [1.15, 1.16],
        "volume": [5.0, 6.0],
    })  # fmt: skip
    pq.write_table(table, p)
    s = ingest_files(resolve_url(settings), layout, [p], "AUDUSD", mapping=Mapping.parse("time=ts"))
    assert (s.accepted, s.rejected) == (1, 1)
    assert rejects_of(s.rejects_file) == [(2, "high 1.2 < low 1.3")]
    assert stored(conn, layout, "audusd")[-1] == (utc(2024, 7, 2, 0, 0), 1.1, 1.2, 1.0, 1.15, 5.0)


def test_interrupted_ingest_keeps_earlier_months_and_the_interrupted_one(
    settings, layout, conn, tmp_path, monkeypatch
):
    old = tmp_path / "old.csv"
    old.write_text("20240801 000000;2.1;2.2;2.0;2.15;0\n")
    ingest_files(resolve_url(settings), layout, [old], "EURUSD")
    august_before = stored(conn, layout, "eurusd")
    new = tmp_path / "new.csv"
    new.write_text("20240701 000000;1.1;1.2;1.0;1.15;0\n20240801 000000;3.1;3.2;3.0;3.15;0\n")
    real = ingest_mod.load_bars

    def failing_second_month(conn, layout, pair, times, *args, **kwargs):
        if str(times[0]).startswith("2024-08"):
            raise KeyboardInterrupt  # the user pressed Ctrl-C while August was loading
        return real(conn, layout, pair, times, *args, **kwargs)

    monkeypatch.setattr(ingest_mod, "load_bars", failing_second_month)
    with pytest.raises(KeyboardInterrupt):  # (prices far apart on purpose: no level check)
        ingest_files(resolve_url(settings), layout, [new], "EURUSD", allow_mismatch=True)
    rows = stored(conn, layout, "eurusd")
    assert rows[0] == (utc(2024, 7, 1, 5, 0), 1.1, 1.2, 1.0, 1.15, 0.0)  # July stored
    assert rows[1:] == august_before  # August as it was

    # the server failing in the middle of a month's transaction (a NULL close planted in the
    # last row, after the month's other rows were sent) leaves that month as it was
    monkeypatch.setattr(ingest_mod, "load_bars", real)
    read = ingest_mod._Spill.read

    def poisoned(self, month):
        times, ohlcv, dups = read(self, month)
        if month == "2024-08":
            ohlcv = ohlcv.copy()
            ohlcv[-1, 3] = float("nan")  # NaN goes to PostgreSQL as NULL
        return times, ohlcv, dups

    monkeypatch.setattr(ingest_mod._Spill, "read", poisoned)
    newer = tmp_path / "newer.csv"
    newer.write_text("20240801 000000;4.1;4.2;4.0;4.15;0\n20240801 000100;4.1;4.2;4.0;4.15;0\n")
    with pytest.raises(Exception, match="null value"):
        ingest_files(resolve_url(settings), layout, [newer], "EURUSD", allow_mismatch=True)
    assert stored(conn, layout, "eurusd")[1:] == august_before


def test_bad_invocations_fail_clearly_and_write_nothing(settings, layout, conn, tmp_path, cli_env):
    good = tmp_path / "good.csv"
    good.write_text("20240701 000000;1.1;1.2;1.0;1.15;0\nbad line\n")
    junk = tmp_path / "junk.txt"
    junk.write_text("12345 hello\n")
    broken = tmp_path / "broken.csv.gz"
    broken.write_bytes(b"this is not gzip")
    mapped = tmp_path / "mapped.csv"
    mapped.write_text("Stamp,open,high,low,close\n2024-07-01 00:00,1.1,1.2,1.0,1.15\nbad\n")
    unmapped = tmp_path / "unmapped.csv"
    unmapped.write_text("time,open,high,low,close\n2024-07-01 00:01,1.1,1.2,1.0,1.15\n")
    cases = [
        ([tmp_path / "missing.csv"], "EURUSD", "auto", {}, r"missing.csv: no such file"),
        ([junk], "EURUSD", "auto", {}, r"junk.txt: unknown format"),
        ([good], "EUR/US", "auto", {}, r"invalid pair name 'EUR/US'"),
        ([good], "EURUSD", "excel", {}, r"invalid format 'excel': unknown format"),
        ([good, tmp_path / "missing.csv"], "EURUSD", "auto", {}, r"missing.csv: no such file"),
        ([good, tmp_path], "EURUSD", "auto", {}, r"is a directory"),
        ([good, broken], "EURUSD", "auto", {}, r"broken.csv.gz: cannot read"),
        ([good], "EURUSD", "auto", {"tz": "Mars/Olympus"}, r"unknown time zone"),
        ([mapped, unmapped], "EURUSD", "auto", {"mapping": Mapping.parse("time=Stamp")},
         r"unmapped.csv: no column 'Stamp' for time"),
    ]  # fmt: skip
    for files, pair, fmt, kw, message in cases:
        with pytest.raises(BqxError, match=message):
            ingest_files(resolve_url(settings), layout, files, pair, fmt=fmt, **kw)
    exists = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (layout.schema,))
    assert exists.fetchone()[0] == 0  # nothing was created
    assert not list(tmp_path.glob("*.rejects.csv"))  # no rejects file either
    with pytest.raises(BqxError, match=r"cannot write rejects file"):
        ingest_files(
            resolve_url(settings), layout, [good], "EURUSD", rejects_path=tmp_path / "no" / "r.csv"
        )
    assert conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s",
                        (layout.schema,)).fetchone()[0] == 0  # fmt: skip
    for args, message in [
        ([str(junk), "--pair", "EURUSD"], "unknown format"),
        ([str(good), "--pair", "EUR/USD"], "invalid pair name"),
    ]:
        res = subprocess.run(
            [sys.executable, "-m", "bqx.cli", "ingest", *args],
            env=cli_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert res.returncode == 1 and "Traceback" not in res.stderr
        assert res.stderr.count("\n") == 1 and message in res.stderr


def test_cli_json_and_human_summaries_agree(tmp_path, cli_env):
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
    assert doc["files"][0]["format"] == "histdata"
    res = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "ingest", str(f), "--pair", "EURUSD",
         "--rejects", str(tmp_path / "r.csv")],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr
    out = " ".join(res.stdout.split())  # rich wraps long lines
    assert "EURUSD: 1 bar read: 0 new, 0 changed, 1 unchanged; 1 line rejected; 1 duplicate" in out
    assert str(tmp_path / "r.csv") in res.stdout.replace("\n", "")
    assert "histdata (detected)" in " ".join(res.stderr.split())  # says which format it chose
    assert rejects_of(tmp_path / "r.csv") == [(3, "wrong number of fields")]


# -- issue 8 and 13: wrong pair, time zones, concurrency, rejects, broken files, formats, undo ---


@pytest.fixture
def bqx(cli_env, monkeypatch, capsys):
    """Run the CLI in this process (its ``main``, as the ``bqx`` script does): fast."""
    from bqx.cli import main

    for key in list(os.environ):
        if key.startswith(("PG", "BQX_")):
            monkeypatch.delenv(key)
    for key, value in cli_env.items():
        if key.startswith("BQX_"):
            monkeypatch.setenv(key, value)

    def run(args: list[str], env: object = None) -> subprocess.CompletedProcess:
        capsys.readouterr()
        monkeypatch.setattr(sys, "argv", ["bqx", *args])
        try:
            main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
        out, err = capsys.readouterr()
        return subprocess.CompletedProcess(args, code, out, err)

    return run


def schema_exists(conn, layout) -> bool:
    q = "SELECT count(*) FROM pg_namespace WHERE nspname = %s"
    return conn.execute(q, (layout.schema,)).fetchone()[0] == 1


def one_line_error(res: subprocess.CompletedProcess, message: str) -> None:
    assert res.returncode == 1, res.stdout + res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert "Traceback" not in res.stderr and len(errors) == 1, res.stderr
    assert message in errors[0] and res.stderr.endswith(errors[0] + "\n"), res.stderr


JPY_LINE = "20240701 000000;161.100;161.200;161.000;161.150;0\n"


def test_a_file_named_for_another_pair_is_refused(settings, layout, conn, tmp_path, cli_env, bqx):
    zipped = tmp_path / "HISTDATA_COM_ASCII_USDJPY_M1202401.zip"
    with zipfile.ZipFile(zipped, "w") as z:
        z.writestr("DAT_ASCII_USDJPY_M1_202401.csv", JPY_LINE)
    names = ["DAT_ASCII_USDJPY_M1_2024.csv", "USDJPY_Candlestick_1_M_BID_01.07.2024-31.07.2024.csv",
             "USDJPY1.csv", "usd_jpy-july.csv"]  # fmt: skip
    files = [zipped]
    for name in names:
        (tmp_path / name).write_text(JPY_LINE)
        files.append(tmp_path / name)
    for f in files:
        assert pairs_in_name(f) == {"usdjpy"}, f
        with pytest.raises(BqxError, match=rf"{f.name}: the file name says USDJPY, not EURUSD"):
            ingest_files(resolve_url(settings), layout, [f], "EURUSD", fmt="histdata")
    assert not schema_exists(conn, layout) and not list(tmp_path.glob("*.rejects.csv"))
    for plain in ("bars.csv", "DAT_ASCII_EURUSD_M1_2024.csv", "ASCII_M1_2024.csv", "prices.txt"):
        assert pairs_in_name(tmp_path / plain) <= {"eurusd"}
    one_line_error(
        bqx(["ingest", str(files[1]), "--pair", "EURUSD"], cli_env), "the file name says USDJPY"
    )
    # the user insists
    s = ingest_files(resolve_url(settings), layout, [files[1]], "EURUSD", allow_mismatch=True)
    assert s.accepted == 1 and stored(conn, layout, "eurusd")[0][4] == 161.15


def test_prices_far_from_the_stored_level_are_refused(settings, layout, conn, tmp_path, make_bars):
    make_bars("eurusd", "2024-07-01", 3 * 1440, level=1.08)
    before = stored(conn, layout, "eurusd")
    jpy = tmp_path / "prices.csv"
    jpy.write_text(JPY_LINE.replace("20240701 000000", "20240702 120000") + JPY_LINE)
    with pytest.raises(BqxError, match=r"prices.csv: median close 161.15 in 2024-07 is 1[45]\d.\dx off"
                                       r" the stored EURUSD bars' level 1\.0\d"):  # fmt: skip
        ingest_files(resolve_url(settings), layout, [jpy], "EURUSD")
    assert stored(conn, layout, "eurusd") == before
    assert not list(tmp_path.glob("*.rejects.csv"))
    # a level within the factor is the same pair moving: loaded
    near = tmp_path / "near.csv"
    near.write_text("20240702 120000;1.30;1.31;1.29;1.30;0\n")  # 1.2x the stored level
    assert ingest_files(resolve_url(settings), layout, [near], "EURUSD").accepted == 1
    s = ingest_files(resolve_url(settings), layout, [jpy], "EURUSD", allow_mismatch=True)
    assert s.inserted + s.updated == 2


def test_dukascopy_local_time_export_is_stored_at_the_utc_instant(settings, layout, conn, tmp_path):
    f = tmp_path / "EURUSD_Candlestick_1_M_BID_02.12.2024-02.12.2024.csv"
    f.write_text(
        "Local time,Open,High,Low,Close,Volume\n"
        "02.12.2024 10:00:00.000 GMT+0300,1.05,1.06,1.04,1.05,10\n"
        "02.12.2024 10:01:00.000 GMT-0130,1.05,1.06,1.04,1.05,10\n"
    )
    ingest_files(resolve_url(settings), layout, [f], "EURUSD", fmt="dukascopy")
    assert [r[0] for r in stored(conn, layout, "eurusd")] == [
        utc(2024, 12, 2, 7, 0),
        utc(2024, 12, 2, 11, 31),
    ]
    naive = tmp_path / "local_no_offset.csv"
    naive.write_text("Local time,Open,High,Low,Close,Volume\n02.12.2024 10:00:00.000,1,1,1,1,0\n")
    with pytest.raises(BqxError, match=r"local_no_offset.csv: .*no GMT offset: give --tz"):
        ingest_files(resolve_url(settings), layout, [naive], "EURUSD")
    ingest_files(resolve_url(settings), layout, [naive], "GBPUSD", tz="Europe/Moscow")  # UTC+3
    # formats whose zone is fixed refuse a --tz that would shift their times a second time
    gmt = tmp_path / "gmt.csv"
    gmt.write_text("Gmt time,Open,High,Low,Close,Volume\n02.12.2024 10:00:00.000,1,1,1,1,0\n")
    with pytest.raises(BqxError, match=r"gmt.csv: a Dukascopy 'Gmt time' export is in UTC"):
        ingest_files(resolve_url(settings), layout, [gmt], "GBPUSD", tz="Europe/Moscow")
    hist = tmp_path / "hist.csv"
    hist.write_text("20240701 000000;1.1;1.2;1.0;1.15;0\n")
    with pytest.raises(BqxError, match=r"hist.csv: HistData.com times are fixed EST"):
        ingest_files(resolve_url(settings), layout, [hist], "GBPUSD", tz="America/New_York")
    assert [r[0] for r in stored(conn, layout, "gbpusd")] == [utc(2024, 12, 2, 7, 0)]


def test_metatrader_needs_tz_and_mt4_header_csv_is_read(
    settings, layout, conn, tmp_path, cli_env, bqx
):
    mt4 = tmp_path / "EURUSD1.csv"
    mt4.write_text(
        "Date,Time,Open,High,Low,Close,Volume\n"
        "2024.07.01,00:00,1.07100,1.07120,1.07090,1.07120,45\n"
        "2024.07.01,00:01,1.07120,1.07130,1.07110,1.07125,12\n"
    )
    assert sniff(mt4) == "metatrader"
    message = ("MetaTrader times are in the broker's server time: give --tz (e.g. --tz Etc/GMT-2,"
               " or --tz UTC)")  # fmt: skip
    with pytest.raises(BqxError, match=r"EURUSD1.csv: MetaTrader times .* give --tz"):
        ingest_files(resolve_url(settings), layout, [mt4], "EURUSD")
    one_line_error(bqx(["ingest", str(mt4), "--pair", "EURUSD"], cli_env), message)
    assert not schema_exists(conn, layout)
    ingest_files(resolve_url(settings), layout, [mt4], "EURUSD", tz="UTC")
    assert stored(conn, layout, "eurusd") == [
        (utc(2024, 7, 1, 0, 0), 1.071, 1.0712, 1.0709, 1.0712, 45.0),
        (utc(2024, 7, 1, 0, 1), 1.0712, 1.0713, 1.0711, 1.07125, 12.0),
    ]
    mt5 = tmp_path / "GBPUSD_M1.csv"  # MT5's default export: tab separated, <...> headers
    mt5.write_text(
        "<DATE>\t<TIME>\t<OPEN>\t<HIGH>\t<LOW>\t<CLOSE>\t<TICKVOL>\t<VOL>\t<SPREAD>\n"
        "2024.07.01\t02:00:00\t1.26\t1.27\t1.25\t1.26\t7\t0\t2\n"
    )
    assert sniff(mt5) == "metatrader"
    ingest_files(resolve_url(settings), layout, [mt5], "GBPUSD", tz="Etc/GMT-2")
    assert stored(conn, layout, "gbpusd") == [(utc(2024, 7, 1, 0, 0), 1.26, 1.27, 1.25, 1.26, 7.0)]


def test_generic_csv_iso_times_with_offsets_are_utc(settings, layout, conn, tmp_path):
    f = tmp_path / "iso.csv"
    f.write_text(
        "time,open,high,low,close\n"
        "2024-07-01T10:00:00+02:00,1.1,1.2,1.0,1.1\n"
        "2024-07-01T10:01:00Z,1.1,1.2,1.0,1.1\n"
        "2024-07-01T10:02:00.000000-0400,1.1,1.2,1.0,1.1\n"
        "2024-07-01T15:33+05:30,1.1,1.2,1.0,1.1\n"
        "2024-07-01 23:04:00+01,1.1,1.2,1.0,1.1\n"
    )
    s = ingest_files(
        resolve_url(settings), layout, [f], "EURUSD", tz="America/New_York"
    )  # offsets win
    assert s.rejected == 0
    assert [r[0] for r in stored(conn, layout, "eurusd")] == [
        utc(2024, 7, 1, 8, 0), utc(2024, 7, 1, 10, 1), utc(2024, 7, 1, 10, 3),
        utc(2024, 7, 1, 14, 2), utc(2024, 7, 1, 22, 4),  # Z is UTC even with --tz
    ]  # fmt: skip


def test_two_concurrent_ingests_into_one_empty_month_both_succeed(settings, layout, conn, tmp_path):
    """Both writers wait on July's lock, then run at once: the plain COPY into an empty month
    would collide on the key; with the per-month lock the second merges."""
    a, b = tmp_path / "a.csv", tmp_path / "b.csv"
    a.write_text("20240701 000000;1.1;1.2;1.0;1.11;0\n20240801 000000;1.1;1.2;1.0;1.12;0\n"
                 "20240701 000100;1.1;1.2;1.0;1.13;0\n")  # fmt: skip
    b.write_text("20240701 000100;1.1;1.2;1.0;1.13;0\n20240801 000100;1.1;1.2;1.0;1.14;0\n"
                 "20240701 000200;1.1;1.2;1.0;1.15;0\n")  # fmt: skip
    results: dict[str, object] = {}

    def run(f):
        try:
            results[f.name] = ingest_files(resolve_url(settings), layout, [f], "EURUSD")
        except BaseException as exc:  # noqa: BLE001 - reported below
            results[f.name] = exc

    key = source_month_key(layout, "eurusd", Month(2024, 7))
    waiting = sql.SQL(
        "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND NOT granted"
        " AND ((classid::bigint << 32) | objid::bigint) = hashtextextended({}, 0)"
    ).format(sql.Literal(key))
    with conn.transaction():
        lock_source_month(conn, layout, "eurusd", Month(2024, 7))
        threads = [threading.Thread(target=run, args=(f,)) for f in (a, b)]
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while conn.execute(waiting).fetchone()[0] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert conn.execute(waiting).fetchone()[0] == 2  # both at July's door
    for t in threads:
        t.join(60)
    for name, r in results.items():
        assert not isinstance(r, BaseException), (name, r)
    assert sorted(r.inserted for r in results.values()) == [2, 3]  # the later merges
    assert [(r[0], r[4]) for r in stored(conn, layout, "eurusd")] == [
        (utc(2024, 7, 1, 5, 0), 1.11), (utc(2024, 7, 1, 5, 1), 1.13),
        (utc(2024, 7, 1, 5, 2), 1.15), (utc(2024, 8, 1, 5, 0), 1.12),
        (utc(2024, 8, 1, 5, 1), 1.14),
    ]  # fmt: skip


def test_rejects_path_checked_first_and_stale_file_never_left(
    settings, layout, conn, tmp_path, cli_env, bqx
):
    f = tmp_path / "in.csv"
    text = "20240701 000000;1.1;1.2;1.0;1.15;0\nbad line\n"
    f.write_text(text)
    other = tmp_path / "notes.txt"
    other.write_text("my notes\n")
    for path, message in [
        (f, r"--rejects .*in.csv is an input file"),
        (tmp_path, r"is a directory"),
        (tmp_path / "nodir" / "r.csv", r"cannot write rejects file .*no such directory"),
        (other / "r.csv", r"cannot write rejects file"),
        (other, r"notes.txt exists and is not a bqx rejects file"),
    ]:
        with pytest.raises(BqxError, match=message):
            ingest_files(resolve_url(settings), layout, [f], "EURUSD", rejects_path=path)
    assert f.read_text() == text and other.read_text() == "my notes\n"
    assert not schema_exists(conn, layout)
    one_line_error(bqx(["ingest", str(f), "--pair", "EURUSD", "--rejects", str(f)], cli_env),
                   "is an input file")  # fmt: skip
    assert f.read_text() == text
    # an earlier run's rejects file of the same name is overwritten, and the output says so
    default = tmp_path / "in.csv.rejects.csv"
    default.write_text("file,line,reason,text\nold.csv,9,old reason,x\n")
    s = ingest_files(resolve_url(settings), layout, [f], "EURUSD")
    assert s.rejects_replaced and s.rejects_file == str(default)
    assert rejects_of(default) == [(2, "wrong number of fields")]
    res = bqx(["ingest", str(f), "--pair", "EURUSD"], cli_env)
    assert res.returncode == 0 and "replaces the file of an earlier run" in " ".join(
        res.stdout.split()
    )
    # nothing rejected now: the stale file goes, and the output says so
    f.write_text("20240701 000000;1.1;1.2;1.0;1.15;0\n")
    res = bqx(["ingest", str(f), "--pair", "EURUSD", "--json"], cli_env)
    doc = json.loads(res.stdout)
    assert doc["stale_rejects_removed"] == str(default) and doc["rejects_file"] is None
    assert not default.exists()


def test_broken_files_give_one_line_and_change_nothing(
    settings, layout, conn, tmp_path, cli_env, bqx
):
    good = "20240701 000000;1.1;1.2;1.0;1.15;0\n"
    text_gz, text_zip = tmp_path / "text.csv.gz", tmp_path / "text.zip"
    text_gz.write_text(good)
    text_zip.write_text(good)
    data = gzip.compress(
        "".join(f"20240701 {h:02d}{m:02d}00;1.1;1.2;1.0;1.15;0\n" for h in range(24)
                for m in range(60)).encode() * 40
    )  # fmt: skip
    truncated = tmp_path / "truncated.csv.gz"
    truncated.write_bytes(data[: len(data) * 2 // 3])
    for f, message in [
        (text_gz, "text.csv.gz: cannot read: Not a gzipped file"),
        (text_zip, "text.zip: cannot read: File is not a zip file"),
        (truncated, "truncated.csv.gz: cannot read: Compressed file ended"),
    ]:
        one_line_error(
            bqx(["ingest", str(f), "--pair", "EURUSD", "--format", "histdata"], cli_env), message
        )
        with pytest.raises(BqxError, match=message):
            ingest_files(resolve_url(settings), layout, [f], "EURUSD", fmt="histdata")
    assert not schema_exists(conn, layout) and not list(tmp_path.glob("*.rejects.csv"))
    # a 10 MB line, a 100 kB line and an invalid UTF-8 byte: those lines are rejected
    f = tmp_path / "DAT_ASCII_EURUSD_M1_2024.csv"
    with open(f, "wb") as out:
        out.write(good.encode())
        out.write(b"20240701 000100;1.1;1.2;1.0;" + b"9" * 10_000_000 + b";0\n")
        out.write(good.replace("000000", "000200").encode())
        out.write(b"x" * 100_000 + b"\n")
        out.write(b"20240701 000300;1.1;1.2;1.0;1.15;\xff\n")
        out.write(good.replace("000000", "000400").encode())
    s = ingest_files(resolve_url(settings), layout, [f], "EURUSD")
    assert [r[0].minute for r in stored(conn, layout, "eurusd")] == [0, 2, 4]
    assert rejects_of(s.rejects_file) == [
        (2, "line too long (10,000,030 bytes; a bar is under 65,536)"),
        (4, "line too long (100,000 bytes; a bar is under 65,536)"),
        (5, "not UTF-8 (byte 0xff at column 34)"),
    ]
    # every line rejected: exit non-zero, rejects written, nothing stored
    bad = tmp_path / "all_bad.csv"
    bad.write_text("20240701 000000;1.1;1.0;1.2;1.15;0\n20240701 000100;x;1.2;1.0;1.15;0\n")
    res = bqx(["ingest", str(bad), "--pair", "GBPUSD", "--format", "histdata"], cli_env)
    one_line_error(res, "every bar was rejected (2 lines), nothing stored")
    assert len(rejects_of(tmp_path / "all_bad.csv.rejects.csv")) == 2
    assert (
        conn.execute("SELECT to_regclass(%s)", (f"{layout.schema}.m1_gbpusd",)).fetchone()[0]
        is None
    )


def test_close_only_sources_store_null_and_validate_present_columns(
    settings, layout, conn, tmp_path, cli_env, bqx
):
    p = tmp_path / "bars.parquet"
    pq.write_table(pa.table({
        "ts": pa.array([datetime(2024, 7, 2, 0, m) for m in range(3)], pa.timestamp("us")),
        "last": [1.15, -1.0, 1.16],
    }), p)  # fmt: skip
    res = bqx(
        ["ingest", str(p), "--pair", "AUDUSD", "--columns", "time=ts,close=last", "--json"], cli_env
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["accepted"], doc["rejected"]) == (2, 1)
    assert stored(conn, layout, "audusd") == [
        (utc(2024, 7, 2, 0, 0), None, None, None, 1.15, None),
        (utc(2024, 7, 2, 0, 2), None, None, None, 1.16, None),
    ]
    with open(doc["rejects_file"], encoding="utf-8") as fh:
        row = next(csv.DictReader(fh))
    assert (row["line"], row["reason"]) == ("2", "close is -1.0: must be finite and > 0")
    assert row["text"] == "ts=2024-07-02 00:01:00,last=-1.0"  # the row's values, by column
    # only the columns present are checked: close against high, there is no low
    c = tmp_path / "hc.csv"
    c.write_text("time,high,close\n2024-07-03 00:00,1.2,1.1\n2024-07-03 00:01,1.2,1.3\n")
    s = ingest_files(resolve_url(settings), layout, [c], "AUDUSD")
    assert rejects_of(s.rejects_file) == [(3, "close 1.3 outside [low, high]")]
    assert stored(conn, layout, "audusd")[-1] == (utc(2024, 7, 3), None, 1.2, None, 1.1, None)
    # a column the user maps by name must exist
    with pytest.raises(BqxError, match=r"no column 'O' for open"):
        ingest_files(resolve_url(settings), layout, [c], "AUDUSD", mapping=Mapping.parse("open=O"))
    # a table made with NOT NULL open/high/low (older bqx): a clear error, nothing written
    conn.execute(sql.SQL(
        "CREATE TABLE {} (time timestamptz PRIMARY KEY, open float8 NOT NULL,"
        " high float8 NOT NULL, low float8 NOT NULL, close float8 NOT NULL, volume float8)"
        " PARTITION BY RANGE (time)").format(names.source(layout, "nzdusd")))  # fmt: skip
    with pytest.raises(BqxError, match=r"m1_nzdusd requires open, low \(NOT NULL\).*ALTER TABLE"):
        ingest_files(resolve_url(settings), layout, [c], "NZDUSD")
    assert stored(conn, layout, "nzdusd") == []


def test_drop_flat_zero_volume_bars(settings, layout, conn, tmp_path):
    f = tmp_path / "EURUSD_Candlestick_1_M_BID.csv"
    f.write_text(
        "Gmt time,Open,High,Low,Close,Volume\n"
        "05.07.2024 21:59:00.000,1.08,1.09,1.07,1.08,12.5\n"
        "06.07.2024 00:00:00.000,1.08,1.08,1.08,1.08,0\n"
        "06.07.2024 00:01:00.000,1.08,1.08,1.08,1.08,0\n"
        "06.07.2024 00:02:00.000,1.08,1.08,1.08,1.08,3\n"  # flat but traded: kept
    )
    s = ingest_files(resolve_url(settings), layout, [f], "EURUSD", drop_flat=True)
    assert (s.accepted, s.dropped_flat) == (2, 2)
    assert [r[0] for r in stored(conn, layout, "eurusd")] == [
        utc(2024, 7, 5, 21, 59),
        utc(2024, 7, 6, 0, 2),
    ]
    assert "2 flat zero-volume bars dropped" in s.line()
    assert (
        ingest_files(resolve_url(settings), layout, [f], "EURUSD").inserted == 2
    )  # without the option


def test_delete_bars_says_what_asks_and_the_backfill_redoes(
    settings, layout, conn, tmp_path, cli_env, bqx, make_bars
):
    from bqx.core.months import parse_bound
    from conftest import store_for

    assert parse_bound("2024-07-01T02:00+02:00", "--start") == utc(2024, 7, 1)
    assert parse_bound("2024-07-01 00:00Z", "--start") == utc(2024, 7, 1)
    assert parse_bound("2024-07", "--start") == utc(2024, 7, 1)
    assert parse_bound("2024-07", "--end", end=True) == utc(2024, 8, 1)
    with pytest.raises(BqxError, match=r"invalid --end 'soon'"):
        parse_bound("soon", "--end", end=True)
    make_bars("eurusd", "2024-07-29", 6 * 1440)  # 29 July .. 3 August
    n_july = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
        names.source_partition(layout, "eurusd", Month(2024, 7)))).fetchone()[0]  # fmt: skip
    first = store_for(settings, layout).backfill(workers=1)
    assert first.jobs_done == 2
    args = ["delete-bars", "--pair", "EURUSD", "--start", "2024-07-31T12:00", "--end", "2024-08"]
    res = subprocess.run([sys.executable, "-m", "bqx.cli", *args], env=cli_env,
                         capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)  # fmt: skip
    one_line_error_lines = res.stderr.splitlines()
    assert res.returncode == 1 and "give --yes" in one_line_error_lines[-1]
    in_july = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE time >= %s").format(
        names.source_partition(layout, "eurusd", Month(2024, 7))), (utc(2024, 7, 31, 12),)).fetchone()[0]  # fmt: skip
    n_aug = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
        names.source_partition(layout, "eurusd", Month(2024, 8)))).fetchone()[0]  # fmt: skip
    plan = " ".join(one_line_error_lines[0].split())
    assert plan == (f"EURUSD: will delete {in_july + n_aug:,} bars from 2024-07-31 12:00 to"
                    f" 2024-09-01 00:00 UTC (end excluded): 2024-07 ({in_july:,}),"
                    f" 2024-08 ({n_aug:,})")  # fmt: skip
    assert len(stored(conn, layout, "eurusd")) == n_july + n_aug  # nothing deleted
    res = bqx([*args, "--yes", "--json"], cli_env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["deleted"] == in_july + n_aug and doc["emptied_months"] == ["2024-08"]
    assert doc["metric_rows"] == in_july + n_aug
    assert len(stored(conn, layout, "eurusd")) == n_july - in_july
    jobs = conn.execute(sql.SQL("SELECT month::text FROM {} ORDER BY 1").format(
        names.table(layout, "bqx_jobs"))).fetchall()  # fmt: skip
    assert jobs == [("2024-07-01",)]  # August has no bars left: no job claims it is done
    again = store_for(settings, layout).backfill(workers=1)
    assert (again.jobs_done, again.jobs_skipped) == (1, 0)  # July's source changed: redone
    rows = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(names.target(layout, "eurusd")))
    assert rows.fetchone()[0] == n_july - in_july
