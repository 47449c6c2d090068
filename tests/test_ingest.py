"""bqx ingest: each format loads exactly, bad lines are quarantined with reasons, loads merge."""

from __future__ import annotations

import csv
import gzip
import json
import random
import subprocess
import sys
import zipfile
from datetime import UTC, datetime, timedelta

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
    s = ingest_files(settings, layout, [f], "EURUSD")
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
    s = ingest_files(settings, layout, [f], "EURUSD")
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
    monkeypatch.setattr(ingest_mod, "BLOCK_BYTES", 700)
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
    s = ingest_files(settings, layout, [f], "EURUSD", fmt="histdata")
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
        sql.SQL("SELECT time, xmin::text FROM {} ORDER BY time").format(layout.source("eurusd"))
    ).fetchall()
    again = ingest_files(settings, layout, [f], "EURUSD")
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, len(kept))
    assert (
        conn.execute(
            sql.SQL("SELECT time, xmin::text FROM {} ORDER BY time").format(layout.source("eurusd"))
        ).fetchall()
        == xmins
    )


def test_reingest_changes_nothing_and_overlapping_files_merge(settings, layout, conn, tmp_path):
    a = tmp_path / "a.csv"
    a.write_text("20240701 000000;1.1;1.2;1.0;1.15;1\n20240701 000100;1.1;1.2;1.0;1.15;2\n")
    ingest_files(settings, layout, [a], "EURUSD")
    before = stored(conn, layout, "eurusd")
    again = ingest_files(settings, layout, [a], "EURUSD")
    assert (again.inserted, again.updated, again.unchanged) == (0, 0, 2)
    assert stored(conn, layout, "eurusd") == before
    b = tmp_path / "b.csv.gz"
    with gzip.open(b, "wt") as f:
        f.write("20240701 000100;1.1;1.2;1.0;1.16;2\n20240701 000200;1.1;1.2;1.0;1.17;3\n")
    merged = ingest_files(settings, layout, [b], "EURUSD")
    assert (merged.inserted, merged.updated, merged.unchanged) == (1, 1, 0)
    assert [r[4] for r in stored(conn, layout, "eurusd")] == [1.15, 1.16, 1.17]
    # two overlapping files in one call: the later file's bar wins and counts as a duplicate
    both = ingest_files(settings, layout, [b, a], "EURUSD")
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
    s = ingest_files(settings, layout, [f], "eurusd", fmt="auto")
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
    ingest_files(settings, layout, [local], "GBPUSD")
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
    s = ingest_files(settings, layout, [f], "GBPUSD", tz="Europe/Athens")
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
    ingest_files(settings, layout, [f], "EURUSD", tz="Etc/GMT-2")  # POSIX sign: UTC+2
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
    s = ingest_files(settings, layout, [f], "AUDUSD", fmt="csv", mapping=mapping)
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
    ingest_files(settings, layout, [g], "USDCAD", mapping=Mapping.parse("time=when", "%d/%m/%Y %H:%M"),
                 tz="America/New_York")  # fmt: skip
    assert stored(conn, layout, "usdcad") == [(utc(2024, 7, 2, 0, 0), 1.1, 1.2, 1.0, 1.15, 3.0)]

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
    with pytest.raises(KeyboardInterrupt):  # (prices far apart on purpose: no level check)
        ingest_files(settings, layout, [new], "EURUSD", allow_mismatch=True)
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
        ingest_files(settings, layout, [newer], "EURUSD", allow_mismatch=True)
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
        ([good], "EURUS", "auto", {}, r"invalid pair name 'EURUS'"),
        ([good], "EURUSD", "excel", {}, r"unknown --format 'excel'"),
        ([good, tmp_path / "missing.csv"], "EURUSD", "auto", {}, r"missing.csv: no such file"),
        ([good, tmp_path], "EURUSD", "auto", {}, r"is a directory"),
        ([good, broken], "EURUSD", "auto", {}, r"broken.csv.gz: cannot read"),
        ([good], "EURUSD", "auto", {"tz": "Mars/Olympus"}, r"unknown time zone"),
        ([mapped, unmapped], "EURUSD", "auto", {"mapping": Mapping.parse("time=Stamp")},
         r"unmapped.csv: no column 'Stamp' for time"),
    ]  # fmt: skip
    for files, pair, fmt, kw, message in cases:
        with pytest.raises(BqxError, match=message):
            ingest_files(settings, layout, files, pair, fmt=fmt, **kw)
    exists = conn.execute("SELECT count(*) FROM pg_namespace WHERE nspname = %s", (layout.schema,))
    assert exists.fetchone()[0] == 0  # nothing was created
    assert not list(tmp_path.glob("*.rejects.csv"))  # no rejects file either
    with pytest.raises(BqxError, match=r"cannot write rejects file"):
        ingest_files(settings, layout, [good], "EURUSD", rejects_path=tmp_path / "no" / "r.csv")
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
    assert "1 bars accepted (0 new, 0 changed, 1 unchanged), 1 rejected, 1 duplicates" in out
    assert str(tmp_path / "r.csv") in res.stdout.replace("\n", "")
    assert "histdata (detected)" in " ".join(res.stderr.split())  # says which format it chose
    assert rejects_of(tmp_path / "r.csv") == [(3, "wrong number of fields")]
