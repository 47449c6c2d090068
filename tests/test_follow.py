"""``bqx update --follow`` as a service: one pair's trouble (its table dropped, a bad bar) is
that pair's alone, reported in the log, in Prometheus and in ``status``, and retried each
poll; a follower killed inside its write leaves no run ``running``. Real server, real
processes."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import psycopg
import pytest
from psycopg import sql

from bqx.store import names
from bqx.store.bars import load_bars
from conftest import random_walk_bars, store_for, wait_for

pytestmark = pytest.mark.db


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _follower(cli_env: dict, *args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "bqx.cli", "update", "--follow", "0.3", *args],
        env=cli_env, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    return proc.stderr.read() if proc.stderr else ""


def _rows(conn: psycopg.Connection, layout, pair: str) -> int:
    return conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(names.target(layout, pair))
    ).fetchone()[0]


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def _pair_errors(text: str, pair: str) -> float:
    m = re.search(rf'bqx_pair_errors_total\{{pair="{pair}"\}} ([\d.]+)', text, re.IGNORECASE)
    return float(m.group(1)) if m else 0.0


def test_one_pairs_trouble_leaves_the_others_current_and_survives_a_restart(
    settings, layout, conn, cli_env
):
    bars = {p: random_walk_bars("2024-07-01", 900, seed=i) for i, p in
            enumerate(("eurusd", "gbpusd", "usdjpy"))}  # fmt: skip
    for pair, (times, ohlcv) in bars.items():
        load_bars(conn, layout, pair, times[:600], ohlcv[:600])
    store = store_for(settings, layout)
    store.backfill(workers=1)
    conn.execute(sql.SQL("DROP TABLE {}").format(names.source(layout, "gbpusd")))
    src = names.source(layout, "usdjpy")
    conn.execute(sql.SQL("UPDATE {} SET close = 'NaN' WHERE time = (SELECT max(time) FROM {})")
                 .format(src, src))  # fmt: skip
    port = _port()
    proc = _follower(cli_env, "--metrics-port", str(port))
    try:
        times, ohlcv = bars["eurusd"]
        load_bars(conn, layout, "eurusd", times[600:750], ohlcv[600:750])
        wait_for(lambda: _rows(conn, layout, "eurusd") == 750, 60, "EURUSD kept current")
        wait_for(lambda: _pair_errors(_scrape(port), "gbpusd") >= 2, 30, "GBPUSD errors")
        text = _scrape(port)
        assert _pair_errors(text, "usdjpy") >= 2 and _pair_errors(text, "eurusd") == 0
        assert proc.poll() is None  # still following
    finally:
        log = _stop(proc)
    assert proc.returncode == 0, log
    assert re.search(r"GBPUSD: .*(does not exist|m1_gbpusd).* \(the other pairs go on", log), log
    assert re.search(r"USDJPY: .*bad source bar.*\(the other pairs go on", log), log
    assert "Traceback" not in log
    # status says which pair is in trouble
    errors = {e["pair"]: e["error"] for e in store.status().errors}
    assert {"GBPUSD", "USDJPY"} <= set(errors)
    # a restart under systemd does not refuse the healthy pairs
    port = _port()
    proc = _follower(cli_env, "--metrics-port", str(port))
    try:
        load_bars(conn, layout, "eurusd", times[750:], ohlcv[750:])
        wait_for(lambda: _rows(conn, layout, "eurusd") == len(times), 60, "EURUSD, restarted")
        # mended only once this follower has failed on it (else it may never see it bad)
        wait_for(lambda: _pair_errors(_scrape(port), "usdjpy") >= 1, 30, "USDJPY failing")
        # the bad bar mended: the pair is brought up to date by the next poll
        good = bars["usdjpy"][1][599, 3]
        conn.execute(sql.SQL("UPDATE {} SET close = %s WHERE close = 'NaN'").format(src), (good,))
        load_bars(conn, layout, "usdjpy", *(a[600:] for a in bars["usdjpy"]))
        n = len(bars["usdjpy"][0])
        wait_for(lambda: _rows(conn, layout, "usdjpy") == n, 60, "USDJPY mended")
    finally:
        log = _stop(proc)
    assert proc.returncode == 0 and "USDJPY: brought up to date again" in log, log


def test_a_follower_killed_inside_its_write_leaves_no_run_running(
    settings, layout, conn, cli_env, pg_url
):
    times, ohlcv = random_walk_bars("2024-07-01", 900, seed=5)
    load_bars(conn, layout, "eurusd", times[:600], ohlcv[:600])
    store = store_for(settings, layout)
    store.backfill(workers=1)
    runs = names.table(layout, "bqx_runs")
    jobs = names.table(layout, "bqx_jobs")
    proc = _follower(cli_env)
    with psycopg.connect(pg_url) as holder:  # holds the month's ledger row: the write waits
        holder.execute(sql.SQL("SELECT 1 FROM {} WHERE pair = 'eurusd' FOR UPDATE").format(jobs))
        load_bars(conn, layout, "eurusd", times[600:], ohlcv[600:])

        def update_running() -> bool:
            return (
                conn.execute(
                    sql.SQL(
                        "SELECT count(*) FROM {} WHERE command = 'update' AND status = 'running'"
                    ).format(runs)
                ).fetchone()[0]
                == 1
            )

        wait_for(update_running, 60, "the follower's run, open")
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        holder.rollback()
    time.sleep(0.5)
    store.update()  # the next update (or backfill) closes the dead follower's run
    (status,) = conn.execute(
        sql.SQL("SELECT status FROM {} WHERE command = 'update' ORDER BY run_id LIMIT 1").format(
            runs
        )
    ).fetchone()
    assert status == "interrupted"
    bars = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(
        names.source(layout, "eurusd"))).fetchone()[0]  # fmt: skip
    assert _rows(conn, layout, "eurusd") == bars
    assert store.verify(sample=3).ok
