"""bqx status: progress read from the ledger, while a backfill runs elsewhere and after."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

from bqx.ops.status import status
from bqx.store import names


def test_no_run_yet_gives_zeros(conn, layout):
    doc = status(conn, layout).as_dict()
    assert doc["jobs"] == {"total": 0, "done": 0, "running": 0, "failed": 0, "pending": 0}
    assert doc["run"] is None and doc["rows"] == 0


def test_status_follows_a_backfill_in_another_process(conn, layout, make_bars, cli_env):
    for i, pair in enumerate(("eurusd", "usdjpy", "gbpusd")):
        make_bars(pair, "2024-07-01", 92 * 1440, seed=i, missing=0.0)
    proc = subprocess.Popen(
        [sys.executable, "-m", "bqx.cli", "backfill", "--workers", "1"],
        env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    seen = []
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        seen.append(status(conn, layout).as_dict())
        time.sleep(0.05)
    assert proc.wait(timeout=60) == 0
    during = [d for d in seen if d["run"] is not None and d["run"]["status"] == "running"]
    assert during, "never saw the run in progress"
    # jobs moved from pending to done, and an ETA was given while work remained
    assert any(d["jobs"]["pending"] > 0 for d in during)
    assert any(0 < d["jobs"]["done"] < d["jobs"]["total"] for d in during)
    assert any(d["eta_s"] is not None and d["eta_s"] > 0 and d["jobs"]["pending"] for d in during)
    dones = [d["jobs"]["done"] for d in during]
    assert dones == sorted(dones)  # never goes backwards
    assert all(d["jobs"]["total"] == 9 for d in during)
    res = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "status", "--json"],
        env=cli_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    final = json.loads(res.stdout)
    assert final["jobs"] == {"total": 9, "done": 9, "running": 0, "failed": 0, "pending": 0}
    assert final["eta_s"] == 0 and final["rows"] == 3 * 92 * 1440 - final_weekend_minutes(
        conn, layout
    )
    assert final["rows_per_s"] > 0
    assert final["ledger"] == {"total": 9, "done": 9, "running": 0, "failed": 0, "pending": 0,
                               "rows": final["rows"]}  # fmt: skip
    assert {p["pair"]: (p["months_done"], p["months_planned"]) for p in final["pairs"]} == {
        "EURUSD": (3, 3),
        "GBPUSD": (3, 3),
        "USDJPY": (3, 3),
    }  # one pair case in every JSON document: upper, as ingest prints it
    assert final["run"]["mode"] == "bars" and final["run"]["windows"] == [15, 30, 45, 60, 75]


def final_weekend_minutes(conn, layout) -> int:
    """Minutes the source does not have (the forex weekend), counted from the source itself."""
    have = sum(
        conn.execute(f"SELECT count(*) FROM {layout.schema}.m1_{p}").fetchone()[0]  # noqa: S608
        for p in ("eurusd", "usdjpy", "gbpusd")
    )
    return 3 * 92 * 1440 - have


def test_stale_running_job_is_flagged(conn, layout, make_bars, settings, cli_env):
    from psycopg import sql

    from conftest import store_for

    make_bars("eurusd", "2024-07-01", 3 * 1440, seed=1)
    store_for(settings, layout).backfill(workers=1)
    conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'running', worker = 'otherhost:1',"
            " heartbeat_at = now() - interval '5 minutes', started_at = now() - interval '6 minutes',"
            " finished_at = NULL"
        ).format(names.table(layout, "bqx_jobs"))
    )
    doc = status(conn, layout).as_dict()
    assert doc["jobs"]["running"] == 1 and len(doc["stale"]) == 1
    job = doc["stale"][0]
    assert job["pair"] == "EURUSD" and job["worker"] == "otherhost:1"
    assert job["heartbeat_age_s"] >= 299
    assert doc["run"]["stalled"] is False  # the run itself ended
    # a run still marked running whose only job went silent: its driver is gone
    conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'running', ended_at = NULL,"
            " started_at = now() - interval '10 minutes'"
        ).format(names.table(layout, "bqx_runs"))
    )
    doc = status(conn, layout).as_dict()
    assert doc["run"]["stalled"] is True and doc["run"]["last_activity_s"] >= 299
    res = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "status"],
        env=cli_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 0
    assert "STALE" in res.stdout and "otherhost:1" in res.stdout and "no activity" in res.stdout


def test_watch_refreshes_until_interrupted(cli_env):
    """`status --watch` keeps reading the ledger until Ctrl-C, then exits cleanly."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "bqx.cli", "status", "--watch", "--interval", "0.2"],
        env=cli_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    first = proc.stdout.readline()  # the watch is running (a line per refresh when piped)
    time.sleep(0.5)
    assert proc.poll() is None  # still watching
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err
    assert "no backfill run recorded yet" in first and "no backfill run recorded yet" in out


def test_status_covers_the_whole_store_and_says_which_pairs_are_current(
    conn, layout, make_bars, settings
):
    """After a run for one pair, every pair the ledger holds is listed; a pair is current only
    when a plain backfill would have nothing to do, and the note says what to run."""
    from psycopg import sql

    from conftest import store_for

    make_bars("eurusd", "2024-07-20", 20 * 1440, seed=1)
    make_bars("usdjpy", "2024-07-20", 20 * 1440, seed=2, level=160.0)
    store = store_for(settings, layout)
    store.backfill(workers=1)
    store.backfill(pairs=["EURUSD"], force=True, workers=1)  # the latest run: one pair
    doc = store.status()
    assert [p.pair for p in doc.pairs] == ["EURUSD", "USDJPY"]
    assert all(p.current and p.outstanding == 0 and p.note is None for p in doc.pairs)
    # a bar corrected by SQL in July: USDJPY is no longer current, EURUSD still is
    conn.execute(sql.SQL("UPDATE {} SET close = close * 1.0001 WHERE time = (SELECT min(time)"
                         " FROM {})").format(names.source(layout, "usdjpy"),
                                             names.source(layout, "usdjpy")))  # fmt: skip
    pairs = {p.pair: p for p in store.status().pairs}
    assert pairs["EURUSD"].current and not pairs["USDJPY"].current
    assert pairs["USDJPY"].outstanding == 1
    assert pairs["USDJPY"].note == "1 month to do (source changed): run `bqx backfill`"
    as_json = store.status().as_dict()["pairs"]
    assert {p["pair"]: p["current"] for p in as_json} == {"EURUSD": True, "USDJPY": False}
    store.backfill(workers=1)
    assert all(p.current for p in store.status().pairs)
