"""``bqx update``: incremental upserts that equal a full recompute (real PostgreSQL)."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime

import numpy as np
import psycopg
import pytest
from psycopg import sql

from bqx import metrics
from bqx.core.layout import Layout
from bqx.db import EmbeddedServer, resolve_url
from bqx.errors import BqxError
from bqx.ops.report import write_report
from bqx.ops.status import status
from bqx.ops.verify import verify
from bqx.pipeline.update import Updater, parse_duration
from bqx.store import names
from bqx.store.bars import load_bars
from conftest import random_walk_bars, store_for

COLS = metrics.metric_columns()


def _bars(start: str, minutes: int, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    return random_walk_bars(start, minutes, seed=seed, missing=0.05)


def _target(conn: psycopg.Connection, layout: Layout, pair: str) -> dict[str, np.ndarray]:
    """Every target row: ts (datetime64), created_at, xmin, and the value columns as float64."""
    cols = ["rate", *COLS]
    rows = conn.execute(
        sql.SQL("SELECT ts_utc, created_at, xmin::text, {} FROM {} ORDER BY ts_utc").format(
            sql.SQL(", ").join(map(sql.Identifier, cols)), names.target(layout, pair)
        )
    ).fetchall()
    out = {
        "ts": np.array([r[0].replace(tzinfo=None) for r in rows], dtype="datetime64[us]"),
        "created_at": np.array([r[1] for r in rows], dtype=object),
        "xmin": np.array([r[2] for r in rows], dtype=object),
    }
    for j, c in enumerate(cols):
        out[c] = np.array([np.nan if r[3 + j] is None else r[3 + j] for r in rows], dtype=float)
    return out


def _source(conn: psycopg.Connection, layout: Layout, pair: str) -> tuple[np.ndarray, np.ndarray]:
    rows = conn.execute(
        sql.SQL("SELECT time, close FROM {} ORDER BY time").format(names.source(layout, pair))
    ).fetchall()
    times = np.array([r[0].replace(tzinfo=None) for r in rows], dtype="datetime64[us]")
    return times, np.array([r[1] for r in rows], dtype=float)


def _assert_equals_whole_series(
    conn: psycopg.Connection, layout: Layout, pair: str, mode: str = "bars"
) -> dict[str, np.ndarray]:
    """The target holds exactly one row per source bar, each equal bit for bit to computing
    the whole series in one go, and its avg/return agree with a plain loop."""
    times, prices = _source(conn, layout, pair)
    got = _target(conn, layout, pair)
    np.testing.assert_array_equal(got["ts"], times)
    np.testing.assert_array_equal(got["rate"], prices)
    want = metrics.compute(times, prices, mode=mode)
    for c in COLS:
        np.testing.assert_array_equal(got[c], want[c], err_msg=c)  # NaN == NaN here
    if mode == "bars":  # an independent two-pass evaluation of two columns, every 97th row
        for i in range(15, len(prices), 97):
            window = prices[i - 15 : i]
            assert abs(got["w15_bqx_avg"][i] - window.mean()) <= 1e-9 * window.mean()
            ref = float(np.sum((window - prices[i]) / prices[i]))
            assert abs(got["w15_bqx_return"][i] - ref) <= 1e-9 * abs(ref) + 1e-12
    return got


def _runs(conn: psycopg.Connection, layout: Layout) -> list[tuple]:
    return conn.execute(
        sql.SQL("SELECT run_id, command, status, rows_written FROM {} ORDER BY run_id").format(
            names.table(layout, "bqx_runs")
        )
    ).fetchall()


def _jobs(conn: psycopg.Connection, layout: Layout, pair: str) -> dict[str, tuple]:
    rows = conn.execute(
        sql.SQL(
            "SELECT month::text, status, rows_written, source_bars FROM {} WHERE pair = %s"
        ).format(names.table(layout, "bqx_jobs")),
        (pair,),
    ).fetchall()
    return {m[:7]: (s, r, b) for m, s, r, b in rows}


def _updater(settings, layout: Layout, **kw) -> Updater:
    return Updater(resolve_url(settings), layout, **kw)


def _poll(settings, layout: Layout, **kw):
    up = _updater(settings, layout, **kw)
    try:
        return up.poll()
    finally:
        up.close()


# -- new bars -----------------------------------------------------------------------------


def test_new_bars_into_a_new_month_after_a_backfill(settings, layout, conn, tmp_path):
    times, ohlcv = _bars("2024-06-27", 6 * 1440)  # to 2024-07-02
    cut = int(np.searchsorted(times, np.datetime64("2024-07-01T00:00")))
    load_bars(conn, layout, "eurusd", times[:cut], ohlcv[:cut])
    store_for(settings, layout).backfill(workers=1)
    load_bars(conn, layout, "eurusd", times[cut:], ohlcv[cut:])

    result = store_for(settings, layout).update()

    (pu,) = result.pairs
    assert pu.new_rows == len(times) - cut > 0 and pu.changed_rows == 0 and pu.months == ["2024-07"]
    assert pu.lag_s == 0.0
    _assert_equals_whole_series(conn, layout, "eurusd")
    jobs = _jobs(conn, layout, "eurusd")
    assert jobs["2024-07"] == ("done", len(times) - cut, len(times) - cut)
    assert _runs(conn, layout)[-1][1:] == ("update", "done", len(times) - cut)
    check = verify(conn, layout, sample=20)
    assert check.ok, [c for c in check.checks if not c.ok]
    md, _, _ = write_report(conn, layout, tmp_path / "report", sample=5)
    text = md.read_text()
    assert "update" in text and f"{len(times) - cut:,}" in text


@pytest.mark.parametrize("mode", ["bars", "clock"])
def test_new_bars_into_a_partly_filled_month_touch_only_new_rows(settings, layout, conn, mode):
    times, ohlcv = _bars("2024-07-03", 3 * 1440)
    cut = len(times) - 200
    load_bars(conn, layout, "gbpusd", times[:cut], ohlcv[:cut])
    first = _poll(settings, layout, mode=mode)  # nothing computed yet: the whole history
    assert first.rows == cut and _runs(conn, layout)[-1][1] == "update"
    before = _target(conn, layout, "gbpusd")
    load_bars(conn, layout, "gbpusd", times[cut:], ohlcv[cut:])

    second = _poll(settings, layout)  # the mode now comes from the ledger

    assert (second.pairs[0].new_rows, second.pairs[0].changed_rows) == (200, 0)
    after = _assert_equals_whole_series(conn, layout, "gbpusd", mode)
    # the rows that were there are not rewritten: same tuple (xmin) and created_at
    np.testing.assert_array_equal(after["xmin"][:cut], before["xmin"])
    np.testing.assert_array_equal(after["created_at"][:cut], before["created_at"])
    assert _jobs(conn, layout, "gbpusd")["2024-07"] == ("done", len(times), len(times))
    assert verify(conn, layout, sample=10).ok


def test_nothing_new_writes_nothing(settings, layout, conn):
    times, ohlcv = _bars("2024-07-01", 2 * 1440)
    load_bars(conn, layout, "eurusd", times, ohlcv)
    load_bars(conn, layout, "usdjpy", times, ohlcv * 150)
    _poll(settings, layout)
    runs, before = _runs(conn, layout), _target(conn, layout, "usdjpy")

    again = store_for(settings, layout).update()

    assert again.rows == 0 and again.run_ids == []
    assert [p.lag_s for p in again.pairs] == [0.0, 0.0]
    assert _runs(conn, layout) == runs  # no run recorded, nothing written
    after = _target(conn, layout, "usdjpy")
    np.testing.assert_array_equal(after["xmin"], before["xmin"])
    np.testing.assert_array_equal(after["created_at"], before["created_at"])


# -- late and corrected bars --------------------------------------------------------------


def test_late_and_corrected_bars_of_any_age_are_brought_up_to_date(settings, layout, conn):
    times, ohlcv = _bars("2024-07-01", 3 * 1440)
    late = len(times) - 300  # a bar that arrives after the ones around it
    keep = np.ones(len(times), bool)
    keep[late] = False
    load_bars(conn, layout, "eurusd", times[keep], ohlcv[keep])
    _poll(settings, layout)
    before = _target(conn, layout, "eurusd")

    fixed = ohlcv.copy()
    fixed[late - 500, 3] += 0.0005  # a corrected close, inside the last day
    old = 100  # and one far older than --recheck: the source's versions say it changed too
    fixed[old, 3] += 0.0005
    load_bars(conn, layout, "eurusd", times, fixed)

    result = store_for(settings, layout).update(recheck=("1d"))

    (pu,) = result.pairs
    assert pu.new_rows == 1
    after = _target(conn, layout, "eurusd")
    assert after["rate"][old] == fixed[old, 3]
    # from the first corrected bar on, rows are recomputed; those whose values did not change
    # are not rewritten: only the corrected bars, the late one and the windows holding them
    idx = {t: i for i, t in enumerate(after["ts"])}
    fix_at = idx[times[late - 500]]
    assert after["rate"][fix_at] == fixed[late - 500, 3]
    assert pu.changed_rows == 2 * (1 + 75) + 75  # two corrected bars, the late one's 75 after
    assert after["xmin"][fix_at + 76] == before["xmin"][fix_at + 76]
    assert after["xmin"][old - 1] == before["xmin"][old - 1]  # before it: untouched
    # every row equals the whole series computed from the source
    times_now, prices_now = _source(conn, layout, "eurusd")
    want = metrics.compute(times_now, prices_now)
    for c in COLS:
        np.testing.assert_array_equal(after[c], want[c], err_msg=c)


def test_update_equals_a_forced_recompute(settings, layout, conn):
    times, ohlcv = _bars("2024-06-28", 5 * 1440, seed=11)
    n = len(times)
    drop = [n - 900]  # a late bar
    keep = np.ones(n, bool)
    keep[drop] = False
    keep[n - 150 :] = False  # new bars to come
    load_bars(conn, layout, "audnzd", times[keep], ohlcv[keep])
    store_for(settings, layout).backfill(workers=1)
    fixed = ohlcv.copy()
    fixed[n - 600, 3] *= 1.001  # a corrected price
    load_bars(conn, layout, "audnzd", times, fixed)
    gone = times[n - 700].astype(datetime).replace(tzinfo=UTC)  # a bar the feed withdrew
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE time = %s").format(names.source(layout, "audnzd")), (gone,)
    )

    result = store_for(settings, layout).update()
    assert result.pairs[0].deleted_rows == 1 and result.pairs[0].new_rows == 151
    got = _assert_equals_whole_series(conn, layout, "audnzd")

    store_for(settings, layout).backfill(workers=1, force=True)
    forced = _target(conn, layout, "audnzd")
    np.testing.assert_array_equal(got["ts"], forced["ts"])
    for c in ["rate", *COLS]:  # every column but created_at, bit for bit
        assert got[c].tobytes() == forced[c].tobytes(), c
    assert verify(conn, layout, sample=20).ok


def test_bars_loaded_between_planning_and_writing_are_in_the_same_write(
    settings, layout, conn, monkeypatch
):
    """An update finds where a month first differs in its write's own snapshot: bars that
    land after planning are computed with it, not recorded done without their rows (a
    follower restarted under load showed this)."""
    import bqx.pipeline.update as update_module

    times, ohlcv = _bars("2024-07-01", 900, seed=5)
    cut = len(times) - 120
    load_bars(conn, layout, "usdjpy", times[:cut], ohlcv[:cut])
    store_for(settings, layout).backfill(workers=1)
    src = names.source(layout, "usdjpy")  # a new source version, no bar differs
    conn.execute(sql.SQL("UPDATE {} SET close = close WHERE time = (SELECT max(time) FROM {})")
                 .format(src, src))  # fmt: skip
    real = update_module.upsert_month

    def bars_arrive_first(*args, **kw):
        load_bars(conn, layout, "usdjpy", times[cut:], ohlcv[cut:])  # another connection
        return real(*args, **kw)

    monkeypatch.setattr(update_module, "upsert_month", bars_arrive_first)
    result = _poll(settings, layout)

    assert result.pairs[0].new_rows == len(times) - cut and not result.pairs[0].error
    _assert_equals_whole_series(conn, layout, "usdjpy")
    monkeypatch.setattr(update_module, "upsert_month", real)
    assert _poll(settings, layout).rows == 0  # recorded with what it computed: nothing left


# -- ledger, status, options --------------------------------------------------------------


def test_status_shows_newest_bar_metric_and_lag(settings, layout, conn):
    times, ohlcv = _bars("2024-07-01", 1440)
    load_bars(conn, layout, "eurusd", times[:-60], ohlcv[:-60])
    _poll(settings, layout)
    load_bars(conn, layout, "eurusd", times[-60:], ohlcv[-60:])
    (p,) = status(conn, layout).as_dict()["pairs"]
    assert p["lag_s"] == (times[-1] - times[-61]) / np.timedelta64(1, "s") > 0
    assert p["newest_bar"].startswith(str(times[-1].astype("datetime64[s]")))
    store_for(settings, layout).update()
    (p,) = status(conn, layout).as_dict()["pairs"]
    assert p["lag_s"] == 0.0 and p["newest_metric"] == p["newest_bar"]


def test_a_pair_left_behind_shows_its_lag_in_hours_and_minutes(settings, layout, conn):
    times, ohlcv = _bars("2024-07-01", 1440)
    load_bars(conn, layout, "eurusd", times[:-90], ohlcv[:-90])
    _poll(settings, layout)
    load_bars(conn, layout, "eurusd", times[-90:], ohlcv[-90:])
    src = names.source(layout, "eurusd")
    conn.execute(sql.SQL("UPDATE {} SET close = 'NaN' WHERE time = %s").format(src),
                 (times[-90].astype(datetime).replace(tzinfo=UTC),))  # fmt: skip

    result = _poll(settings, layout)

    assert result.pairs[0].error and "bad source bar" in result.pairs[0].error
    minutes = int((times[-1] - times[-91]) / np.timedelta64(1, "m"))
    assert minutes >= 90 and result.lag_max_s == minutes * 60
    shown = f"lag max {minutes // 60} h {minutes % 60:02d} m"
    assert shown in result.text(), result.text()


def test_options_that_contradict_the_recorded_parameters_are_refused(settings, layout, conn):
    times, ohlcv = _bars("2024-07-01", 600)
    load_bars(conn, layout, "eurusd", times[:-10], ohlcv[:-10])
    _poll(settings, layout, windows=(15, 30))
    load_bars(conn, layout, "eurusd", times, ohlcv)
    with pytest.raises(BqxError, match="EURUSD was computed with mode bars, not clock"):
        store_for(settings, layout).update(mode="clock")
    with pytest.raises(BqxError, match="does not exist for pair GBPUSD"):
        store_for(settings, layout).update(pairs=["gbpusd"])
    with pytest.raises(BqxError, match="invalid recheck"):
        parse_duration("one day")
    assert store_for(settings, layout).update().rows == 10  # windows 15,30 from the ledger


def test_cli_json_and_one_line_errors(cli_env, conn, layout):
    times, ohlcv = _bars("2024-07-01", 400)
    load_bars(conn, layout, "eurusd", times, ohlcv)
    cmd = [sys.executable, "-m", "bqx.cli", "update"]
    out = subprocess.run([*cmd, "--json"], env=cli_env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    assert doc["rows"] == len(times)
    (p,) = doc["pairs"]
    assert set(p) >= {"pair", "new_rows", "newest_bar", "newest_metric", "lag_s"}
    assert p["new_rows"] == len(times) and p["lag_s"] == 0.0
    assert p["pair"] == "EURUSD"  # the one case a person or a script sees
    bad = subprocess.run([*cmd, "--recheck", "soon"], env=cli_env, capture_output=True, text=True)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr  # a usage error
    assert bad.stderr.strip().count("\n") == 0 and "--recheck" in bad.stderr


# -- working beside the rest --------------------------------------------------------------


def test_updates_beside_a_forced_backfill_lose_nothing_and_verify_passes(settings, layout, conn):
    times, ohlcv = _bars("2024-06-29", 3 * 1440, seed=5)
    load_bars(conn, layout, "eurusd", times[:-400], ohlcv[:-400])
    store_for(settings, layout).backfill(workers=1)
    load_bars(conn, layout, "eurusd", times, ohlcv)  # 400 new bars
    errors: list[BaseException] = []

    def updates() -> None:
        try:
            for _ in range(4):
                store_for(settings, layout).update()
        except BaseException as exc:  # noqa: BLE001 - reported by the assert below
            errors.append(exc)

    threads = [threading.Thread(target=updates) for _ in range(2)]  # two updates at once
    for t in threads:
        t.start()
    summary = store_for(settings, layout).backfill(workers=2, force=True)
    for t in threads:
        t.join(timeout=120)
    assert not errors and summary.jobs_failed == 0
    store_for(settings, layout).update()  # whatever a busy month left behind
    _assert_equals_whole_series(conn, layout, "eurusd")
    check = verify(conn, layout, sample=20)
    assert check.ok, [c for c in check.checks if not c.ok]
    assert {s for s, _, _ in _jobs(conn, layout, "eurusd").values()} == {"done"}


# -- --follow -----------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for(predicate, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.1)


@pytest.mark.db  # starts a server of its own
def test_follow_catches_up_across_a_database_restart_and_stops_on_sigterm(tmp_path, schema_name):
    server = EmbeddedServer(tmp_path / "own")  # its own server: this test restarts it
    url = server.start()
    layout = Layout(schema=schema_name)
    times, ohlcv = _bars("2024-07-01", 1500)
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BQX_"))}
    env.update(BQX_DATABASE_URL=url, BQX_SCHEMA=schema_name, BQX_HOME=str(tmp_path / "home"))
    proc = None
    try:
        with psycopg.connect(url, autocommit=True) as c:
            load_bars(c, layout, "eurusd", times[:1000], ohlcv[:1000])
        proc = subprocess.Popen(
            [sys.executable, "-m", "bqx.cli", "update", "--follow", "0.3",
             "--metrics-port", str(port)],
            env=env, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip

        def rows() -> int:
            try:
                with psycopg.connect(url, connect_timeout=2) as c:
                    return c.execute(
                        sql.SQL("SELECT count(*) FROM {}").format(names.target(layout, "eurusd"))
                    ).fetchone()[0]
            except psycopg.Error:
                return -1

        _wait_for(lambda: rows() == 1000)
        for k in range(1000, 1200, 50):  # bars arriving while it follows
            with psycopg.connect(url, autocommit=True) as c:
                load_bars(c, layout, "eurusd", times[k : k + 50], ohlcv[k : k + 50])
            time.sleep(0.1)
        _wait_for(lambda: rows() == 1200)
        server.stop()
        time.sleep(1.5)  # it polls into a dead server, logs, backs off
        server.start()
        with psycopg.connect(url, autocommit=True) as c:
            load_bars(c, layout, "eurusd", times[1200:], ohlcv[1200:])
        _wait_for(lambda: rows() == len(times), timeout=60)

        def scrape() -> str:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
                return r.read().decode()

        # the counters move just after the commit that the row count above already sees
        written = f'bqx_rows_written_total{{pair="EURUSD"}} {float(len(times))}'
        with contextlib.suppress(AssertionError):
            _wait_for(lambda: written in scrape(), timeout=10)
        text = scrape()
        assert 'bqx_target_lag_seconds{pair="EURUSD"} 0.0' in text
        assert f'bqx_rows_written_total{{pair="EURUSD"}} {float(len(times))}' in text
        errors = [ln for ln in text.splitlines() if ln.startswith("bqx_update_errors_total")]
        assert float(errors[0].split()[1]) >= 1
        assert "bqx_last_poll_timestamp_seconds" in text

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
        log = proc.stderr.read()
        assert "database error, retrying" in log and "Traceback" not in log
        assert sum("nothing new" in ln for ln in log.splitlines()) <= 1  # at most one a minute
        with psycopg.connect(url) as c:
            _assert_equals_whole_series(c, layout, "eurusd")
            assert verify(c, layout, sample=10).ok
        # nothing of it is left running: no session, no listener on the metrics port
        with pytest.raises(OSError):
            urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        server.destroy()


def test_follow_wakes_on_notify_and_stops_with_its_event(settings, layout, conn):

    times, ohlcv = _bars("2024-07-01", 800)
    load_bars(conn, layout, "eurusd", times[:700], ohlcv[:700])
    stop = threading.Event()
    polls: list[tuple[float, int]] = []
    t = threading.Thread(
        target=store_for(settings, layout).follow, args=(30.0,),  # a long poll interval: NOTIFY wakes it
        kwargs={"stop": stop, "on_poll": lambda r: polls.append((time.monotonic(), r.rows))},
    )  # fmt: skip
    t.start()
    try:
        _wait_for(lambda: bool(polls))
        sent = time.monotonic()
        load_bars(conn, layout, "eurusd", times[700:], ohlcv[700:])  # commits, then NOTIFY
        _wait_for(lambda: sum(r for _, r in polls) == len(times), timeout=10)
        assert polls[-1][0] - sent < 10  # woken, not waiting out the 30 s interval
    finally:
        stop.set()
        t.join(timeout=10)
    assert not t.is_alive()
    _assert_equals_whole_series(conn, layout, "eurusd")


def test_follow_refuses_a_bad_interval_or_port(settings, layout):
    from conftest import store_for

    with pytest.raises(BqxError, match="invalid follow 0"):
        store_for(settings, layout).follow(0)
    with pytest.raises(BqxError, match="invalid metrics port 70000"):
        store_for(settings, layout).follow(1, metrics_port=70000)
