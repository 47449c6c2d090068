"""Planning against a real PostgreSQL: parameters that change results, the dry run, planning
zero jobs, and bad input refused in preflight before anything is created."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import numpy as np
import psycopg
import pytest
from psycopg import sql

from bqx import metrics
from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.params import Params
from bqx.errors import BqxError, NothingToDo
from bqx.pipeline.plan import plan_backfill, preflight
from bqx.store import names
from conftest import store_for

OCT, NOV = Month(2024, 10), Month(2024, 11)
WINDOWS = (15, 30, 45, 60, 75)


@pytest.fixture
def bars(make_bars):
    """EURUSD from 2024-10-29 to 2024-11-01 22:00: two short months."""
    return make_bars("eurusd", "2024-10-29", 4 * 1440, seed=11, level=1.08)


def objects(conn: psycopg.Connection, schema: str) -> set[str]:
    return {
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s",
            (schema,),
        )
    }


def run_ids(conn: psycopg.Connection, layout: Layout) -> list[int]:
    return [r[0] for r in conn.execute(sql.SQL("SELECT run_id FROM {} ORDER BY 1").format(
        names.table(layout, "bqx_runs")))]  # fmt: skip


def cli(cli_env: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bqx.cli", *args], env=cli_env, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip


def params(layout: Layout, mode: str = "bars", max_fill: int = 5) -> Params:
    return Params.build(layout, WINDOWS, mode, max_fill)


# -- parameters that change results -------------------------------------------------------


def test_other_parameters_are_refused_and_force_recomputes_the_whole_pair(
    settings, layout, conn, bars
):
    times, ohlcv = bars
    store_for(settings, layout).backfill(workers=1)
    runs = run_ids(conn, layout)
    stamp = sql.SQL("SELECT max(created_at) FROM {}").format(names.target(layout, "eurusd"))
    written = conn.execute(stamp).fetchone()[0]

    with pytest.raises(
        BqxError,
        match=r"bqx_eurusd holds results computed with mode=bars, not "
        r"mode=clock as asked: add --force to recompute every month of EURUSD",
    ):
        store_for(settings, layout).backfill(mode="clock", workers=1)  # fmt: skip
    with pytest.raises(BqxError, match=r"with max_fill=5, not max_fill=9 as asked"):
        store_for(settings, layout).backfill(max_fill=9, workers=1)
    assert run_ids(conn, layout) == runs  # refused before any run was recorded
    assert conn.execute(stamp).fetchone()[0] == written  # and nothing was rewritten

    # --force with a one-month range still recomputes every month of the pair
    forced = store_for(settings, layout).backfill(
        mode="clock", workers=1, force=True, start=NOV, end=NOV
    )
    assert (forced.jobs_done, forced.jobs_total) == (2, 2)
    ref = metrics.compute(times, ohlcv[:, 3], windows=WINDOWS, mode="clock")
    got = [
        r[0]
        for r in conn.execute(
            sql.SQL("SELECT w15_bqx_max FROM {} ORDER BY ts_utc").format(
                names.target(layout, "eurusd")
            )
        )
    ]
    np.testing.assert_allclose(np.array(got, dtype=float), ref["w15_bqx_max"], rtol=0)

    # now the table holds clock-mode results: a plain run is refused the other way round,
    # also when the parameters are only known from the ledger's runs
    conn.execute(sql.SQL("DELETE FROM {}").format(names.table(layout, "bqx_targets")))
    with pytest.raises(BqxError, match=r"computed with mode=clock, not mode=bars as asked"):
        store_for(settings, layout).backfill(workers=1)


# -- the dry run --------------------------------------------------------------------------


def test_dry_run_shows_every_reason_and_writes_nothing(settings, layout, conn, bars, cli_env):
    before = objects(conn, layout.schema)
    plan = plan_backfill(conn, params(layout))
    assert [(j.month, j.action, j.reason) for j in plan.jobs] == [
        (OCT, "do", "new"), (NOV, "do", "new")
    ]  # fmt: skip
    res = cli(cli_env, "backfill", "--dry-run", "--json")
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert (doc["jobs_todo"], doc["jobs_skipped"], doc["reasons"]) == (2, 0, {"new": 2})
    assert objects(conn, layout.schema) == before  # no ledger, no target, no partition

    store_for(settings, layout).backfill(workers=1)
    runs = run_ids(conn, layout)
    jobs = names.table(layout, "bqx_jobs")
    plan = plan_backfill(conn, params(layout))
    assert {j.reason for j in plan.jobs} == {"done, unchanged"} and not plan.todo

    # a bar in the middle of October changes: October only (November's lookback is unaffected)
    conn.execute(
        sql.SQL("UPDATE {} SET close = close + 0.0001 WHERE time = '2024-10-30 12:00+00'").format(
            names.source(layout, "eurusd")
        )
    )
    conn.execute(sql.SQL("UPDATE {} SET status = 'failed' WHERE month = %s").format(jobs),
                 (NOV.first_day,))  # fmt: skip
    why = {j.month: (j.action, j.reason) for j in plan_backfill(conn, params(layout)).jobs}
    assert why == {OCT: ("do", "source changed"), NOV: ("do", "failed before")}
    forced = plan_backfill(conn, params(layout), force=True)
    assert {j.reason for j in forced.jobs} == {"forced"}

    conn.execute(
        sql.SQL("UPDATE {} SET status = 'running', worker = 'elsewhere:1', heartbeat_at = now(),"
                " param_hash = 'other' WHERE month = %s").format(jobs), (NOV.first_day,)
    )  # fmt: skip
    conn.execute(sql.SQL("UPDATE {} SET param_hash = 'other' WHERE month = %s").format(jobs),
                 (OCT.first_day,))  # fmt: skip
    why = {j.month: j.reason for j in plan_backfill(conn, params(layout)).jobs}
    assert why == {OCT: "parameters changed", NOV: "running elsewhere"}
    assert run_ids(conn, layout) == runs  # the dry runs recorded nothing


# -- planning zero jobs -------------------------------------------------------------------


def test_a_range_without_bars_plans_nothing_says_why_and_records_no_run(
    settings, layout, conn, bars, cli_env
):
    store_for(settings, layout).backfill(workers=1)
    runs = run_ids(conn, layout)
    with pytest.raises(NothingToDo, match=r"no source bars for EURUSD from 2030-01 on"):
        store_for(settings, layout).backfill(start=Month(2030, 1))
    res = cli(cli_env, "backfill", "--start", "2030-01", "--end", "2030-03")
    assert res.returncode == 3
    assert "nothing to do: no source bars for EURUSD from 2030-01 to 2030-03" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    assert run_ids(conn, layout) == runs  # the real latest run stays the latest


# -- bad input, refused before anything is created ----------------------------------------


def test_too_many_or_too_large_windows_are_refused_before_any_ddl(
    settings, layout, conn, bars, cli_env
):
    before = objects(conn, layout.schema)
    many = ",".join(str(w) for w in range(2, 302))
    res = cli(cli_env, "backfill", "--windows", many)
    assert res.returncode == 2  # a bad option value is a usage error
    assert "300 windows need 1810 columns, more than PostgreSQL's 1600 per table" in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.stderr
    with pytest.raises(BqxError, match=r"window 10,000,000 is larger than the maximum 10,080"):
        store_for(settings, layout).backfill(windows=(15, 10_000_000))
    assert objects(conn, layout.schema) == before


@pytest.mark.parametrize("bad", ["NULL", "'infinity'", "'-infinity'"])
def test_a_bad_time_in_a_users_table_is_named_in_preflight(settings, conn, schema_name, bad):
    layout = Layout(schema=schema_name, source_table="own_{pair}", time_column="ts",
                    price_column="px")  # fmt: skip
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema_name)))
    table = names.source(layout, "eurusd")
    conn.execute(sql.SQL("CREATE TABLE {} (ts timestamptz, px float8)").format(table))
    conn.execute(
        sql.SQL("INSERT INTO {} SELECT t, 1.08 FROM generate_series('2024-10-01'::timestamptz,"
                " '2024-10-02', '1 minute') t").format(table)
    )  # fmt: skip
    value = None if bad == "NULL" else bad.strip("'")
    conn.execute(sql.SQL("INSERT INTO {} VALUES (%s::timestamptz, 1.09)").format(table), (value,))
    before = objects(conn, schema_name)
    shown = "NULL" if bad == "NULL" else bad
    with pytest.raises(BqxError) as err:
        store_for(settings, layout).backfill(workers=1)
    assert str(err.value) == (
        f"source table {schema_name}.own_eurusd (pair EURUSD) has 1 bar(s) whose ts is {shown}:"
        " every bar needs a finite time; delete or fix them"
    )
    assert objects(conn, schema_name) == before


def test_a_locked_source_table_gives_a_message_and_ctrl_c_interrupts_planning(
    settings, layout, conn, make_bars, pg_url, cli_env
):
    make_bars("eurusd", "2024-10-29", 2 * 1440, seed=1)
    make_bars("usdjpy", "2024-10-29", 2 * 1440, seed=2, level=150.0)
    with psycopg.connect(pg_url) as locker:
        locker.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(
            names.source(layout, "eurusd")))  # fmt: skip
        pid = locker.info.backend_pid
        t0 = time.monotonic()
        with pytest.raises(BqxError) as err:
            preflight(
                conn, params(layout), ["eurusd"], None, None, lock_timeout=1.0,
                source_check="exact",
            )  # fmt: skip
        assert time.monotonic() - t0 < 8
        assert str(err.value).startswith(
            f"source table {layout.schema}.m1_eurusd is locked by another session (pid {pid});"
            " waited 1s"
        )
        # the CLI plans two pairs at once; Ctrl-C while a scan waits on the lock ends it now
        proc = subprocess.Popen(
            [sys.executable, "-m", "bqx.cli", "backfill", "--workers", "1", "--source-check",
             "exact"], env=cli_env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        waiting = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
        deadline = time.monotonic() + 60
        while conn.execute(waiting).fetchone()[0] == 0:
            assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
            time.sleep(0.1)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=30)
        assert time.monotonic() - t0 < 5  # not the 10 s lock timeout
        assert proc.returncode != 0
        assert conn.execute(waiting).fetchone()[0] == 0  # its queries were cancelled


def test_a_month_plus_n_is_n_steps_of_next_or_prev():
    """``Month.plus`` against stepping one month at a time, across year ends both ways."""
    for start in (Month(2024, 1), Month(2024, 7), Month(2023, 12)):
        ahead = behind = start
        for n in range(0, 40):
            assert start.plus(n) == ahead and start.plus(-n) == behind, (start, n)
            ahead, behind = ahead.next(), behind.prev()
    with pytest.raises(BqxError, match="invalid month"):
        Month(2999, 12).plus(1)
