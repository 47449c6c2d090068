"""Faults a run must survive and end cleanly: SIGTERM, a killed driver, the database going away,
bad bars in the source, absurd options. Each leaves a true ledger and nothing running."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from datetime import UTC
from pathlib import Path

import numpy as np
import psycopg
import pytest
from psycopg import sql

from bqx.core.layout import Layout
from bqx.db import EmbeddedServer
from bqx.store import names
from conftest import alive, held_run, random_walk_bars, store_for, wait_for


def _count(conn: psycopg.Connection, query: str, table: sql.Composable) -> int:
    return conn.execute(sql.SQL(query).format(table)).fetchone()[0]


@pytest.fixture
def eurusd(make_bars):
    """EURUSD July–August 2024."""
    return make_bars("eurusd", "2024-07-01", 62 * 1440, seed=3)


def test_sigterm_stops_like_ctrl_c_and_records_the_run_as_interrupted(
    settings, layout, conn, eurusd, cli_env, pg_url
):
    store_for(settings, layout).backfill(workers=1)  # creates the ledger the blocker locks
    with held_run(pg_url, layout, conn, cli_env, ["--workers", "2", "--force"]) as (proc, workers):
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 130
    err = proc.stderr.read()
    assert "Traceback" not in err
    # a forced run (the held run is one): a plain backfill finishes what it had left
    assert "interrupted: run `bqx backfill` without --force to finish exactly the jobs" in err
    wait_for(lambda: not any(alive(p) for p in workers), 10, "workers to exit")
    run_status = conn.execute(
        sql.SQL("SELECT status, ended_at IS NOT NULL FROM {} ORDER BY run_id DESC LIMIT 1").format(
            names.table(layout, "bqx_runs")
        )
    ).fetchone()
    assert run_status == ("interrupted", True)
    jobs = names.table(layout, "bqx_jobs")
    assert _count(conn, "SELECT count(*) FROM {} WHERE status = 'running'", jobs) == 0


@pytest.mark.parametrize("executor", ["local", "threads"])
def test_killed_driver_leaves_no_worker_and_next_run_marks_its_run_interrupted(
    settings, layout, conn, eurusd, cli_env, pg_url, executor
):
    store_for(settings, layout).backfill(workers=1)
    args = ["--workers", "2", "--force", "--executor", executor]
    with held_run(pg_url, layout, conn, cli_env, args) as (proc, workers):
        proc.kill()  # SIGKILL: no handler runs, the run row stays 'running'
        proc.wait(timeout=10)
    wait_for(lambda: not any(alive(p) for p in workers), 10, "workers to die with the driver")
    runs = names.table(layout, "bqx_runs")
    orphan = conn.execute(
        sql.SQL("SELECT run_id, status FROM {} ORDER BY run_id DESC LIMIT 1").format(runs)
    ).fetchone()
    assert orphan[1] == "running"
    summary = store_for(settings, layout).backfill(workers=2)
    assert summary.status == "done" and summary.jobs_failed == 0
    status = conn.execute(
        sql.SQL("SELECT status FROM {} WHERE run_id = %s").format(runs), (orphan[0],)
    ).fetchone()[0]
    assert status == "interrupted"
    # the months the dead run held were redone: every source bar has its row
    assert _count(conn, "SELECT count(*) FROM {}", names.target(layout, "eurusd")) == len(eurusd[0])


@pytest.mark.db  # starts a server of its own
def test_database_gone_mid_run_gives_one_line_and_the_next_run_resumes(tmp_path: Path):
    """A server of its own, stopped under a running backfill, then started again."""
    server = EmbeddedServer(tmp_path / "home")
    url = server.start()
    layout = Layout(schema="outage")
    try:
        from bqx.db import connect
        from bqx.store.bars import load_bars

        times, ohlcv = random_walk_bars("2024-07-01", 62 * 1440, seed=5)
        with connect(url, autocommit=True) as conn:
            load_bars(conn, layout, "eurusd", times, ohlcv, mode="replace")
        script = textwrap.dedent(
            f"""
            import bqx
            import sys
            from bqx.errors import BqxError
            try:
                bqx.Store(database_url={url!r}, schema="outage").backfill(
                    workers=1, job_timeout=120, reconnect_within_s=3, force=True)
            except BqxError as exc:
                print("error:", exc, file=sys.stderr)
                sys.exit(1)
            """
        )
        blocker = psycopg.connect(url)
        with connect(url, autocommit=True) as conn:
            store_for(load_settings_for(url), layout).backfill(workers=1)
        blocker.execute(
            sql.SQL("LOCK TABLE {} IN SHARE MODE").format(names.table(layout, "bqx_attempts"))
        )
        proc = subprocess.Popen(
            [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True, env={**os.environ, "BQX_HOME": str(tmp_path / "other")},
        )  # fmt: skip
        with connect(url, autocommit=True) as conn:
            wait_for(
                lambda: _count(
                    conn, "SELECT count(*) FROM {} WHERE status = 'running'",
                    names.table(layout, "bqx_jobs"),
                ) == 1,
                what="a running job",
            )  # fmt: skip
        blocker.close()
        server.stop()  # the database goes away under the run
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 1
        assert "Traceback" not in err
        lines = [ln for ln in err.splitlines() if ln.strip()]
        assert len(lines) == 1 and "lost the database" in lines[0], err
        server.start()
        summary = store_for(load_settings_for(url), layout).backfill(workers=1, force=True)
        assert summary.status == "done"
        with connect(url, autocommit=True) as conn:
            statuses = [
                s for (s,) in conn.execute(
                    sql.SQL("SELECT status FROM {} ORDER BY run_id").format(
                        names.table(layout, "bqx_runs")
                    )
                )
            ]  # fmt: skip
            assert statuses == ["done", "interrupted", "done"]
            rows = _count(conn, "SELECT count(*) FROM {}", names.target(layout, "eurusd"))
        assert rows == len(times)
    finally:
        server.stop()


def load_settings_for(url: str):
    from bqx.config import load_settings

    return load_settings(database_url=url)


def test_a_bad_lookback_bar_is_named_by_pair_time_value_and_its_own_month(
    settings, layout, conn, make_bars
):
    times, _ = make_bars("eurusd", "2024-07-20", 50 * 1440, seed=4)  # into September
    aug = times[(times >= np.datetime64("2024-08-01")) & (times < np.datetime64("2024-09-01"))]
    bad = aug[-3]  # August's own bar, and inside September's lookback
    conn.execute(
        sql.SQL("UPDATE {} SET close = 0 WHERE time = %s").format(names.source(layout, "eurusd")),
        (bad.item().replace(tzinfo=UTC),),
    )
    summary = store_for(settings, layout).backfill(workers=1, max_attempts=1)
    failed = {month: error for pair, month, error in summary.failures}
    assert sorted(failed) == ["2024-08", "2024-09"]  # July's job does not read that bar
    when = str(bad.astype("datetime64[s]")).replace("T", " ")
    for error in failed.values():
        assert "EURUSD" in error and when in error and "(month 2024-08)" in error, error
        assert "0.0" in error and "prices[" not in error


@pytest.mark.parametrize(
    "args, culprit",
    [
        (["--workers", "0"], "--workers"),
        (["--workers", "-1"], "--workers"),
        (["--job-timeout", "nan"], "--job-timeout"),
        (["--job-timeout", "0"], "--job-timeout"),
        (["--job-timeout", "-5"], "--job-timeout"),
        (["--executor", "bogus"], "--executor"),
        (["--scheduler", "tcp://127.0.0.1:1"], "--scheduler"),
    ],
)
def test_absurd_run_options_give_one_line_and_create_nothing(
    cli_env, conn, schema_name, args, culprit
):
    res = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "backfill", "--pairs", "EURUSD", *args],
        env=cli_env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert res.returncode == 2  # a bad option value: a usage error
    assert "Traceback" not in res.stderr
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and culprit in lines[0], res.stderr
    exists = conn.execute(
        "SELECT count(*) FROM pg_namespace WHERE nspname = %s", (schema_name,)
    ).fetchone()[0]
    assert exists == 0


def test_two_backfills_at_once_never_run_a_job_twice_at_the_same_time(
    settings, layout, conn, make_bars, cli_env
):
    make_bars("eurusd", "2024-07-15", 40 * 1440, seed=6)
    make_bars("gbpusd", "2024-07-15", 40 * 1440, seed=7, level=1.27)
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "bqx.cli", "backfill", "--workers", "2", "--json"],
            env=cli_env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for _ in range(2)
    ]
    for proc in procs:
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    # each job's done attempts never overlap in time, and every bar has exactly one row
    overlaps = conn.execute(
        sql.SQL(
            "SELECT count(*) FROM {a} x JOIN {a} y ON x.pair = y.pair AND x.month = y.month"
            " AND x.attempt_id < y.attempt_id AND x.status = 'done' AND y.status = 'done'"
            " AND tstzrange(x.started_at, x.finished_at) && tstzrange(y.started_at, y.finished_at)"
        ).format(a=names.table(layout, "bqx_attempts"))
    ).fetchone()[0]
    assert overlaps == 0
    for pair in ("eurusd", "gbpusd"):
        rows, distinct = conn.execute(
            sql.SQL("SELECT count(*), count(DISTINCT ts_utc) FROM {}").format(
                names.target(layout, pair)
            )
        ).fetchone()
        source = _count(conn, "SELECT count(*) FROM {}", names.source(layout, pair))
        assert rows == distinct == source
    assert (
        _count(
            conn, "SELECT count(*) FROM {} WHERE status <> 'done'", names.table(layout, "bqx_jobs")
        )
        == 0
    )


def test_a_thread_worker_id_names_its_process_for_a_takeover():
    from bqx.db import worker_id
    from bqx.store.ledger import worker_is_dead

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    host = worker_id().rsplit(":", 1)[0]
    assert worker_is_dead(f"{host}:{gone.pid}#2")  # a thread of a process that is gone
    assert not worker_is_dead(f"{worker_id()}#2")  # a thread of this live process
    assert not worker_is_dead(f"elsewhere:{gone.pid}#2")  # another host: the heartbeat judges
