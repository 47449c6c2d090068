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
from bqx.sources.columns import FOLD_GIVEN_ONCE, FOLD_OUT_OF_ORDER
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
            "2024.10.27,03:30,1.26,1.27,1.25,1.26,10\n"  # happens twice, given once: which?
            "2024.10.27,04:30,1.26,1.27,1.25,1.26,10\n",  # EET again
        )
    assert sniff(f) == "metatrader"
    s = ingest_files(resolve_url(settings), layout, [f], "GBPUSD", tz="Europe/Athens")
    assert [r[0] for r in stored(conn, layout, "gbpusd")] == [
        utc(2024, 3, 31, 0, 59),
        utc(2024, 3, 31, 1, 0),
        utc(2024, 10, 27, 2, 30),
    ]
    assert rejects_of(s.rejects_file) == [
        (2, "local time does not exist (daylight-saving gap)"),
        (4, FOLD_GIVEN_ONCE),
    ]


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
    read = ingest_mod.Spill.read

    def poisoned(self, month):
        times, ohlcv, dups = read(self, month)
        if month == "2024-08":
            ohlcv = ohlcv.copy()
            ohlcv[-1, 3] = float("nan")  # NaN goes to PostgreSQL as NULL
        return times, ohlcv, dups

    monkeypatch.setattr(ingest_mod.Spill, "read", poisoned)
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


def test_a_fifo_or_a_missing_file_is_named_for_what_it_is(tmp_path, cli_env, bqx, conn, layout):
    fifo = tmp_path / "bars.csv"
    os.mkfifo(fifo)
    link = tmp_path / "gone.csv"
    link.symlink_to(tmp_path / "nowhere.csv")
    for path, message in [
        (fifo, f"{fifo}: is a named pipe (FIFO), not a regular file: save its contents"),
        (link, f"{link}: is a broken symbolic link, not a regular file"),
        (tmp_path / "nosuch.csv", f"{tmp_path / 'nosuch.csv'}: no such file"),
    ]:
        one_line_error(bqx(["ingest", str(path), "--pair", "EURUSD"], cli_env), message)
    assert not schema_exists(conn, layout)


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


# a Dukascopy export: a bar that traded, then the flat zero-volume filler of a closed market
FILLER = (
    "Gmt time,Open,High,Low,Close,Volume\n"
    "05.07.2024 21:59:00.000,1.08,1.09,1.07,1.08,12.5\n"
    "06.07.2024 00:00:00.000,1.08,1.08,1.08,1.08,0\n"
    "06.07.2024 00:01:00.000,1.08,1.08,1.08,1.08,0\n"
)


def test_drop_flat_zero_volume_bars(settings, layout, conn, tmp_path):
    f = tmp_path / "EURUSD_Candlestick_1_M_BID.csv"
    f.write_text(FILLER + "06.07.2024 00:02:00.000,1.08,1.08,1.08,1.08,3\n")  # flat but traded
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


# -- ticks, the repeated autumn hour, --drop-flat again ------------------------------------


def dukascopy_bars(times: list[datetime], price: float = 1.08) -> str:
    """A Dukascopy candle export (``Gmt time,Open,High,Low,Close,Volume``) of these times."""
    rows = [f"{t:%d.%m.%Y %H:%M:%S}.{t.microsecond // 1000:03d},{price},{price + 0.001},"
            f"{price - 0.001},{price},1" for t in times]  # fmt: skip
    return "Gmt time,Open,High,Low,Close,Volume\n" + "\n".join(rows) + "\n"


def minute_bars_of(ticks: list[tuple[datetime, int, float]]) -> list[tuple]:
    """The minute bars of (time, line, price) ticks, computed plainly: first and last by time,
    then by line; volume the number of ticks."""
    minutes: dict[datetime, list[tuple[datetime, int, float]]] = {}
    for t, line, p in ticks:
        minutes.setdefault(t.replace(second=0, microsecond=0), []).append((t, line, p))
    bars = []
    for m, group in sorted(minutes.items()):
        group.sort()
        prices = [p for _, _, p in group]
        bars.append((m, group[0][2], max(prices), min(prices), group[-1][2], float(len(group))))
    return bars


def test_ticks_are_rejected_as_bars_and_aggregated_into_minute_bars_when_asked(
    settings, layout, conn, tmp_path, cli_env, bqx, monkeypatch
):
    url = resolve_url(settings)
    # 400 lines a quarter of a minute apart, given as minute bars: only the whole minutes are bars
    quarter = [datetime(2024, 7, 1, 9, 0) + timedelta(seconds=15 * i) for i in range(400)]
    f = tmp_path / "EURUSD_Candlestick_1_M_BID.csv"
    f.write_text(dukascopy_bars(quarter))
    s = ingest_files(url, layout, [f], "EURUSD")
    assert (s.accepted, s.inserted, s.rejected) == (100, 100, 300)
    assert rejects_of(s.rejects_file)[:3] == [
        (3, "not a minute bar: the time is 15 s past the minute (a tick?)"),
        (4, "not a minute bar: the time is 30 s past the minute (a tick?)"),
        (5, "not a minute bar: the time is 45 s past the minute (a tick?)"),
    ]
    assert "300 lines rejected for a time off the minute, as a tick file's" in s.text()
    # nothing but ticks: refused, and the command line says how to aggregate them
    off = tmp_path / "GBPUSD_ticks_as_bars.csv"
    off.write_text(dukascopy_bars([t for t in quarter if t.second][:30], 1.27))
    res = bqx(["ingest", str(off), "--pair", "GBPUSD"])
    one_line_error(res, "30 lines with a time off the minute, as a tick file's"
                        " (--ticks aggregates ticks into minute bars)")  # fmt: skip
    assert "gbpusd" not in " ".join(r[0] for r in conn.execute(
        "SELECT tablename FROM pg_tables WHERE schemaname = %s", (layout.schema,)))  # fmt: skip

    # a Dukascopy tick export: refused as bars (one line), aggregated when asked
    monkeypatch.setattr(formats, "BLOCK_BYTES", 600)  # ticks of one minute in several blocks
    rng = random.Random(7)
    ticks = []  # (time, bid, ask, the line's text)
    t = datetime(2024, 7, 31, 23, 57, 10, 5000)
    for _ in range(300):
        t += timedelta(milliseconds=rng.choice([0, 7, 150, 900, 2500]))  # some at the same ms
        bid = round(1.08 + rng.randint(-40, 40) * 1e-5, 5)
        ask = round(bid + rng.randint(0, 3) * 1e-5, 5)
        stamp = f"{t:%d.%m.%Y %H:%M:%S}.{t.microsecond // 1000:03d}"
        ticks.append((t.replace(microsecond=t.microsecond // 1000 * 1000), bid, ask,
                      f"{stamp},{ask},{bid},1.5,2.25"))  # fmt: skip
    for i, (ask, bid) in ((99, (1.0799, 1.0801)), (199, (-1.0, 1.08))):  # crossed; no price
        tt, _, _, text = ticks[i]
        ticks[i] = (tt, bid, ask, f"{text.split(',')[0]},{ask},{bid},1,1")
    ticks[150:150] = [ticks.pop(160)]  # a line out of order: first/last go by time, not line
    lines = ["Gmt time,Ask,Bid,AskVolume,BidVolume", *(text for *_, text in ticks)]
    tick_file = tmp_path / "EURUSD_Ticks_31.07.2024-01.08.2024.csv"
    tick_file.write_text("\n".join(lines) + "\n")
    res = bqx(["ingest", str(tick_file), "--pair", "EURUSD"])
    one_line_error(res, "EURUSD_Ticks_31.07.2024-01.08.2024.csv: its columns (Gmt time, Ask, Bid,"
                        " AskVolume, BidVolume) are a tick file's, not minute bars' (--ticks"
                        " aggregates ticks into minute bars)")  # fmt: skip
    before = stored(conn, layout, "eurusd")
    s = ingest_files(url, layout, [tick_file], "EURUSD", mapping=Mapping.parse(None, ticks="auto"))
    good = [(tt, n, (b + a) / 2) for n, (tt, b, a, _) in enumerate(ticks, 2) if n not in (101, 201)]
    want = minute_bars_of(good)
    assert [(r[0].replace(tzinfo=None), *r[1:]) for r in stored(conn, layout, "eurusd")
            if r[0] not in {b[0] for b in before}] == want  # fmt: skip
    assert (s.ticks, s.accepted, s.inserted, s.duplicates) == (298, len(want), len(want), 0)
    assert set(s.months) == {"2024-07", "2024-08"}
    assert rejects_of(s.rejects_file) == [
        (101, "bid 1.0801 > ask 1.0799"),
        (201, "ask is -1.0: must be finite and > 0"),
    ]
    assert s.line().startswith(f"EURUSD: {len(want)} bars read (from 298 ticks): {len(want)} new")
    again = ingest_files(
        url, layout, [tick_file], "EURUSD", mapping=Mapping.parse(None, ticks="auto")
    )
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, len(want))

    # time,price,size (trades) through the command line: the last price, mapped columns
    trades = tmp_path / "trades.csv"
    trades.write_text(
        "ts,last,size\n"
        "2024-07-02T10:00:59.900Z,1.2702,3\n"
        "2024-07-02T10:00:00.250Z,1.2700,1\n"
        "2024-07-02T10:00:30Z,1.2710,5\n"
        "2024-07-02T10:01:00Z,1.2690,2\n"
    )
    res = bqx(["ingest", str(trades), "--pair", "GBPUSD", "--ticks", "--columns",
               "time=ts,price=last", "--json"])  # fmt: skip
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["ticks"], doc["accepted"], doc["inserted"]) == (4, 2, 2)
    assert stored(conn, layout, "gbpusd") == [
        (utc(2024, 7, 2, 10, 0), 1.27, 1.271, 1.27, 1.2702, 3.0),
        (utc(2024, 7, 2, 10, 1), 1.269, 1.269, 1.269, 1.269, 1.0),
    ]
    # bid and ask in Parquet, priced by the bid; a price the file lacks is one line
    quotes = tmp_path / "quotes.parquet"
    pq.write_table(pa.table({
        "time": pa.array([datetime(2024, 7, 3, 0, 0, 1), datetime(2024, 7, 3, 0, 0, 2)],
                         pa.timestamp("ms")),
        "bid": [1.1, 1.2], "ask": [1.3, 1.4],
    }), quotes)  # fmt: skip
    ingest_files(url, layout, [quotes], "AUDUSD", mapping=Mapping.parse(None, ticks="bid"),
                 allow_mismatch=True)  # fmt: skip
    assert stored(conn, layout, "audusd") == [(utc(2024, 7, 3), 1.1, 1.2, 1.1, 1.2, 2.0)]
    with pytest.raises(BqxError, match=r"quotes.parquet: no price column for ticks priced by last"):
        ingest_files(url, layout, [quotes], "AUDUSD", mapping=Mapping.parse(None, ticks="last"))
    res = bqx(["ingest", str(trades), "--pair", "GBPUSD", "--tick-price", "bid"])
    assert res.returncode == 2 and "invalid --tick-price 'bid'" in res.stderr


def test_hourly_bars_given_as_minute_bars_get_a_warning(settings, layout, tmp_path):
    hourly = tmp_path / "EURUSD_Candlestick_1_H_BID.csv"
    hourly.write_text(
        dukascopy_bars([datetime(2024, 7, 1) + timedelta(hours=h) for h in range(48)])
    )
    s = ingest_files(resolve_url(settings), layout, [hourly], "EURUSD")
    assert s.accepted == 48 and s.warnings == [
        f"{hourly}: its bars are 1 hour apart (median spacing), not a minute apart: bqx stores"
        " each as a minute bar, and the metrics' windows count bars"
    ]
    assert f"warning: {hourly}: its bars are 1 hour apart" in s.text()
    minutes = tmp_path / "minutes.csv"  # minute bars with gaps: no warning
    minutes.write_text(dukascopy_bars([datetime(2024, 7, 2) + timedelta(minutes=m)
                                       for m in range(0, 300) if m % 3]))  # fmt: skip
    assert ingest_files(resolve_url(settings), layout, [minutes], "EURUSD").warnings == []


def mt4_hours(day: str, hours: list[tuple[int, float]]) -> str:
    """MT4 lines, a bar a minute, for each (local hour, price) in the order given."""
    return "".join(f"{day},{h:02d}:{m:02d},{p},{p + 0.001},{p - 0.001},{p},1\n"
                   for h, p in hours for m in range(60))  # fmt: skip


def test_a_repeated_local_hour_maps_to_both_instants_in_file_order(
    settings, layout, conn, tmp_path
):
    """Europe/Athens goes from EEST (UTC+3) back to EET (UTC+2) at 04:00 on 27 October 2024:
    03:00-03:59 happens twice. In a file in time order the first 03:xx hour is 00:xx UTC and
    the second 01:xx UTC; nothing is a duplicate, no hour is lost."""
    url = resolve_url(settings)
    f = tmp_path / "GBPUSD1.csv"
    f.write_text(mt4_hours("2024.10.27", [(2, 1.1), (3, 1.2), (3, 1.3), (4, 1.4)]))
    s = ingest_files(url, layout, [f], "GBPUSD", tz="Europe/Athens")
    assert (s.accepted, s.inserted, s.duplicates, s.rejected) == (240, 240, 0, 0)
    rows = stored(conn, layout, "gbpusd")
    first = {utc(2024, 10, 26, 23, 0): 1.1, utc(2024, 10, 27, 0, 0): 1.2,
             utc(2024, 10, 27, 1, 0): 1.3, utc(2024, 10, 27, 2, 0): 1.4}  # fmt: skip
    assert [r[0] for r in rows] == [t + timedelta(minutes=m) for t in first for m in range(60)]
    assert all(r[4] == first[r[0].replace(minute=0)] for r in rows)
    # the same as naive Parquet timestamps, minutes missing in both hours
    local = [datetime(2024, 10, 27, h, m) for h in (3, 3) for m in range(0, 60, 7)]
    pq.write_table(pa.table({"time": local, "close": [2.0] * 9 + [2.5] * 9}),
                   tmp_path / "naive.parquet")  # fmt: skip
    ingest_files(url, layout, [tmp_path / "naive.parquet"], "EURGBP", tz="Europe/Athens")
    assert [(r[0], r[4]) for r in stored(conn, layout, "eurgbp")] == [
        (utc(2024, 10, 27, h, m), c) for h, c in ((0, 2.0), (1, 2.5)) for m in range(0, 60, 7)
    ]
    # out of order, the file cannot tell which hour a 03:xx line is: those lines are rejected
    lines = f.read_text().splitlines(keepends=True)
    shuffled = tmp_path / "shuffled.csv"
    shuffled.write_text("".join(lines[60:] + lines[:60]))  # the 02:xx hour moved to the end
    s = ingest_files(url, layout, [shuffled], "USDCHF", tz="Europe/Athens")
    assert (s.accepted, s.rejected, s.duplicates) == (120, 120, 0)
    assert set(rejects_of(s.rejects_file)) == {(n, FOLD_OUT_OF_ORDER) for n in range(1, 121)}
    assert [r[0] for r in stored(conn, layout, "usdchf")] == [
        t + timedelta(minutes=m)
        for t in (utc(2024, 10, 26, 23), utc(2024, 10, 27, 2))
        for m in range(60)
    ]


def test_a_reingest_with_drop_flat_removes_the_filler_an_earlier_ingest_stored(
    settings, layout, conn, tmp_path
):
    url = resolve_url(settings)
    f = tmp_path / "EURUSD_Candlestick_1_M_BID.csv"
    f.write_text(FILLER + "01.08.2024 00:00:00.000,1.08,1.08,1.08,1.08,0\n")  # filler only
    assert ingest_files(url, layout, [f], "EURUSD").inserted == 4  # filler stored
    conn.execute(  # a real bar where the file has filler: not the file's to remove
        sql.SQL("UPDATE {} SET volume = 3 WHERE time = %s").format(names.source(layout, "eurusd")),
        (utc(2024, 7, 6, 0, 1),),
    )
    s = ingest_files(url, layout, [f], "EURUSD", drop_flat=True)
    assert (s.accepted, s.dropped_flat, s.removed_flat, s.unchanged) == (1, 3, 2, 1)
    assert [(r[0], r[5]) for r in stored(conn, layout, "eurusd")] == [
        (utc(2024, 7, 5, 21, 59), 12.5),
        (utc(2024, 7, 6, 0, 1), 3.0),
    ]
    assert "3 flat zero-volume bars dropped, 2 of them removed from the stored bars too" in s.line()
    assert s.as_dict()["removed_flat"] == 2
    again = ingest_files(url, layout, [f], "EURUSD", drop_flat=True)
    assert (again.dropped_flat, again.removed_flat) == (3, 0)
    assert "; 3 flat zero-volume bars dropped (" in again.line() and "removed" not in again.line()
