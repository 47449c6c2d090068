"""Backfill into a real PostgreSQL: exact row counts, values, lookback, resume, atomicity."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import psycopg
import pytest
from psycopg import sql

from bqx import metrics
from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.db import connect
from bqx.errors import BqxError
from bqx.store import names
from conftest import alive, held_run, random_walk_bars, store_for, wait_for

WINDOWS = (15, 30, 45, 60, 75)
COLS = metrics.metric_columns(WINDOWS)


def month_counts(conn: psycopg.Connection, table: sql.Composable, col: str) -> dict[str, int]:
    q = sql.SQL(
        "SELECT to_char(date_trunc('month', {c}), 'YYYY-MM'), count(*) FROM {t} GROUP BY 1"
    ).format(c=sql.Identifier(col), t=table)
    return {m: n for m, n in conn.execute(q)}


def target_rows(
    conn: psycopg.Connection, layout: Layout, pair: str
) -> tuple[np.ndarray, np.ndarray]:
    """(ts_utc as datetime64[us], matrix [rate, metric columns]) ordered by time; NULL -> NaN."""
    q = sql.SQL("SELECT ts_utc, rate, {cols} FROM {t} ORDER BY ts_utc").format(
        cols=sql.SQL(", ").join(map(sql.Identifier, COLS)), t=names.target(layout, pair)
    )
    rows = conn.execute(q).fetchall()
    ts = np.array([r[0].replace(tzinfo=None) for r in rows], dtype="datetime64[us]")
    vals = np.array([[np.nan if v is None else v for v in r[1:]] for r in rows], dtype=np.float64)
    return ts, vals


@pytest.fixture
def two_pairs(make_bars):
    """EURUSD and USDJPY, July–September 2024 (three months, weekend gaps, missing minutes)."""
    minutes = 92 * 1440
    eur = make_bars("eurusd", "2024-07-01", minutes, seed=1, level=1.08)
    jpy = make_bars("usdjpy", "2024-07-01", minutes, seed=2, level=160.0)
    return {"eurusd": eur, "usdjpy": jpy}


@pytest.mark.parametrize("executor", ["local", "threads"])
def test_rows_per_month_equal_source_bars_and_values_match_metrics(
    settings, layout, conn, two_pairs, executor
):
    summary = store_for(settings, layout).backfill(workers=2, executor=executor)
    assert summary.status == "done"
    assert (summary.jobs_total, summary.jobs_done, summary.jobs_failed) == (6, 6, 0)
    total = 0
    for pair, (times, ohlcv) in two_pairs.items():
        src = month_counts(conn, names.source(layout, pair), "time")
        tgt = month_counts(conn, names.target(layout, pair), "ts_utc")
        assert tgt == src and len(src) == 3
        total += sum(src.values())
        # the whole series computed in one go equals the month-by-month backfill
        ref = metrics.compute(times, ohlcv[:, 3], windows=WINDOWS)
        ts, vals = target_rows(conn, layout, pair)
        assert np.array_equal(ts, times)
        assert np.array_equal(vals[:, 0], ohlcv[:, 3])
        for j, col in enumerate(COLS, start=1):
            np.testing.assert_allclose(vals[:, j], ref[col], rtol=1e-12, atol=0, err_msg=col)
    assert summary.rows_written == total
    ledger = conn.execute(
        sql.SQL("SELECT sum(rows_written), count(*) FILTER (WHERE status = 'done') FROM {}").format(
            names.table(layout, "bqx_jobs")
        )
    ).fetchone()
    assert (int(ledger[0]), ledger[1]) == (total, 6)


def test_first_bars_of_a_month_use_the_previous_month(settings, layout, conn, two_pairs):
    store_for(settings, layout).backfill(pairs=["EURUSD"], workers=1)
    times, ohlcv = two_pairs["eurusd"]
    first_aug = int(np.searchsorted(times, np.datetime64("2024-08-01", "us")))
    row = conn.execute(
        sql.SQL("SELECT w75_bqx_avg, w15_bqx_endpoint FROM {} WHERE ts_utc = %s").format(
            names.target(layout, "eurusd")
        ),
        (times[first_aug].item(),),
    ).fetchone()
    # computed by hand from the 75 July bars before the first August bar
    prev = ohlcv[first_aug - 75 : first_aug, 3]
    p_t = ohlcv[first_aug, 3]
    assert row[0] == pytest.approx(prev.mean(), rel=1e-12)
    assert row[1] == pytest.approx((ohlcv[first_aug - 15, 3] - p_t) / p_t, rel=1e-9, abs=1e-15)


def test_months_split_differently_give_the_same_values(settings, layout, conn, two_pairs):
    # one month at a time, in reverse order, then compare with a single full run elsewhere
    for m in ("2024-09", "2024-08", "2024-07"):
        store_for(settings, layout).backfill(
            pairs=["usdjpy"], start=Month.parse(m), end=Month.parse(m)
        )
    split = target_rows(conn, layout, "usdjpy")
    conn.execute(sql.SQL("TRUNCATE {}").format(names.target(layout, "usdjpy")))
    store_for(settings, layout).backfill(pairs=["usdjpy"], force=True, workers=2)
    whole = target_rows(conn, layout, "usdjpy")
    assert np.array_equal(split[0], whole[0])
    assert np.array_equal(split[1], whole[1], equal_nan=True)


def test_second_run_is_a_noop_and_force_rewrites_same_values(settings, layout, conn, two_pairs):
    first = store_for(settings, layout).backfill(workers=2)
    before = target_rows(conn, layout, "eurusd")
    created = conn.execute(
        sql.SQL("SELECT max(created_at) FROM {}").format(names.target(layout, "eurusd"))
    ).fetchone()[0]
    second = store_for(settings, layout).backfill(workers=2)
    assert (second.jobs_skipped, second.jobs_done, second.rows_written) == (6, 0, 0)
    assert (
        conn.execute(
            sql.SQL("SELECT max(created_at) FROM {}").format(names.target(layout, "eurusd"))
        ).fetchone()[0]
        == created
    )  # nothing was rewritten
    forced = store_for(settings, layout).backfill(workers=2, force=True)
    assert (forced.jobs_done, forced.rows_written) == (6, first.rows_written)
    after = target_rows(conn, layout, "eurusd")
    assert np.array_equal(before[0], after[0])
    assert np.array_equal(before[1], after[1], equal_nan=True)  # deterministic, bit for bit


def test_changed_source_month_is_redone_on_resume(settings, layout, conn, two_pairs):
    store_for(settings, layout).backfill(pairs=["eurusd"])
    part = names.source_partition(layout, "eurusd", Month(2024, 8))
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE time = (SELECT min(time) FROM {})").format(part, part)
    )
    again = store_for(settings, layout).backfill(pairs=["eurusd"])
    assert (again.jobs_done, again.jobs_skipped) == (1, 2)
    assert month_counts(conn, names.target(layout, "eurusd"), "ts_utc") == month_counts(
        conn, names.source(layout, "eurusd"), "time"
    )


def test_worker_killed_mid_job_leaves_month_intact_and_next_run_completes(
    settings, layout, conn, two_pairs, cli_env, pg_url
):
    store_for(settings, layout).backfill(pairs=["eurusd"])
    before = target_rows(conn, layout, "eurusd")
    stamps = conn.execute(
        sql.SQL("SELECT min(created_at), max(created_at), count(*) FROM {}").format(
            names.target(layout, "eurusd")
        )
    ).fetchone()
    # Block the job's final ledger insert: the worker then sits inside its write transaction,
    # after TRUNCATE and COPY, until it is killed.
    blocker = psycopg.connect(pg_url)
    blocker.execute(
        sql.SQL("LOCK TABLE {} IN SHARE MODE").format(names.table(layout, "bqx_attempts"))
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "bqx.cli", "backfill", "--pairs", "EURUSD", "--force",
         "--workers", "1", "--executor", "local"],
        env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        jobs = names.table(layout, "bqx_jobs")

        def blocked_worker() -> int | None:
            row = conn.execute(
                sql.SQL(
                    "SELECT j.worker FROM {} j JOIN pg_stat_activity a ON a.wait_event_type ="
                    " 'Lock' AND a.query ILIKE %s WHERE j.status = 'running'"
                ).format(jobs),
                ("%INSERT INTO%bqx_attempts%",),
            ).fetchone()
            return int(row[0].rsplit(":", 1)[1]) if row else None

        wait_for(lambda: blocked_worker() is not None, what="the worker to block mid-job")
        worker_pid = blocked_worker()
        os.kill(proc.pid, signal.SIGKILL)  # the whole backfill dies, as in a machine crash
        os.kill(worker_pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        blocker.rollback()
        blocker.close()
        if proc.poll() is None:
            proc.kill()
    wait_for(
        lambda: (
            conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE query ILIKE %s AND state <> 'idle'"
                " AND pid <> pg_backend_pid()",
                ("%INSERT INTO%bqx_attempts%",),
            ).fetchone()[0]
            == 0
        ),
        what="the killed worker's transaction to end",
    )
    after = target_rows(conn, layout, "eurusd")
    assert np.array_equal(before[0], after[0])
    assert np.array_equal(before[1], after[1], equal_nan=True)
    assert (
        conn.execute(
            sql.SQL("SELECT min(created_at), max(created_at), count(*) FROM {}").format(
                names.target(layout, "eurusd")
            )
        ).fetchone()
        == stamps
    )  # the old rows, not a rewrite
    status = conn.execute(
        sql.SQL("SELECT status FROM {} WHERE pair = 'eurusd' AND month = '2024-07-01'").format(jobs)
    ).fetchone()[0]
    assert status == "running"  # left behind by the dead worker
    # the next run takes the dead worker's job over and completes everything
    rerun = store_for(settings, layout).backfill(pairs=["eurusd"])
    assert rerun.jobs_failed == 0 and rerun.jobs_done >= 1
    assert month_counts(conn, names.target(layout, "eurusd"), "ts_utc") == month_counts(
        conn, names.source(layout, "eurusd"), "time"
    )
    states = conn.execute(sql.SQL("SELECT DISTINCT status FROM {}").format(jobs)).fetchall()
    assert states == [("done",)]


def _schema_objects(conn: psycopg.Connection, schema: str) -> list[str]:
    return [
        r[0]
        for r in conn.execute(
            "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s ORDER BY 1",
            (schema,),
        )
    ]


def test_invalid_pair_fails_fast_and_writes_nothing(settings, layout, conn, two_pairs):
    before = _schema_objects(conn, layout.schema)
    with pytest.raises(BqxError, match=r"invalid pair name 'EUR/USD'"):
        store_for(settings, layout).backfill(pairs=["EUR/USD"])
    assert _schema_objects(conn, layout.schema) == before


def test_missing_source_table_fails_fast_and_writes_nothing(settings, layout, conn, two_pairs):
    before = _schema_objects(conn, layout.schema)
    t0 = time.monotonic()
    with pytest.raises(BqxError, match=r"source table .*m1_gbpusd does not exist"):
        store_for(settings, layout).backfill(pairs=["EURUSD", "GBPUSD"])
    assert time.monotonic() - t0 < 10
    assert _schema_objects(conn, layout.schema) == before  # no ledger, no target, no partition


def test_column_mismatch_fails_fast_and_writes_nothing(settings, layout, conn, two_pairs):
    store_for(settings, layout).backfill(pairs=["eurusd"], windows=(15, 30))
    runs = names.table(layout, "bqx_runs")
    n_runs = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(runs)).fetchone()[0]
    before = _schema_objects(conn, layout.schema)
    with pytest.raises(BqxError) as err:
        store_for(settings, layout).backfill(pairs=["eurusd", "usdjpy"])
    msg = str(err.value)
    assert "bqx_eurusd does not match windows 15,30,45,60,75" in msg
    assert "missing w45_bqx_return" in msg
    assert conn.execute(sql.SQL("SELECT count(*) FROM {}").format(runs)).fetchone()[0] == n_runs
    assert _schema_objects(conn, layout.schema) == before  # usdjpy's target was not created


def test_cli_reports_config_errors_on_one_line(cli_env):
    res = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "backfill", "--pairs", "EURUSD,X Y"],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    assert "invalid pair name 'X Y'" in res.stderr
    assert "Traceback" not in res.stderr


def test_naive_numeric_source_like_the_report_works(settings, conn, schema_name):
    """An existing table with `timestamp without time zone` and numeric(10,5) prices."""
    times, ohlcv = random_walk_bars("2024-07-01", 5000, seed=3)
    conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(sql.Identifier(schema_name)))
    table = sql.Identifier(schema_name, "legacy_eurusd")
    conn.execute(
        sql.SQL("CREATE TABLE {} (ts timestamp PRIMARY KEY, rate numeric(10,5))").format(table)
    )
    with conn.cursor().copy(sql.SQL("COPY {} (ts, rate) FROM STDIN").format(table)) as cp:
        for t, p in zip(times.tolist(), ohlcv[:, 3].tolist(), strict=True):
            cp.write_row((t, f"{p:.5f}"))
    layout = Layout(schema=schema_name, source_table="legacy_{pair}", time_column="ts",
                    price_column="rate")  # fmt: skip
    summary = store_for(settings, layout).backfill(workers=1)
    assert (summary.jobs_done, summary.rows_written) == (1, len(times))
    ts, vals = target_rows(conn, layout, "eurusd")
    assert np.array_equal(ts, times)  # naive timestamps were read as UTC
    ref = metrics.compute(times, ohlcv[:, 3], windows=WINDOWS)
    np.testing.assert_allclose(
        vals[:, 1 + COLS.index("w60_bqx_avg")], ref["w60_bqx_avg"], rtol=1e-12
    )


def test_a_bad_source_month_fails_that_job_and_the_others_go_on(settings, layout, conn, two_pairs):
    # a non-positive price mid-August: that job fails with its message, the rest complete
    part = names.source_partition(layout, "eurusd", Month(2024, 8))
    conn.execute(
        sql.SQL(
            "UPDATE {} SET close = -1 WHERE time = (SELECT time FROM {} ORDER BY time"
            " OFFSET 1000 LIMIT 1)"
        ).format(part, part)
    )
    summary = store_for(settings, layout).backfill(pairs=["eurusd"], workers=2)
    assert (summary.jobs_done, summary.jobs_failed, summary.status) == (2, 1, "failed")
    ((pair, month, error),) = summary.failures
    assert (pair, month) == ("eurusd", "2024-08")
    assert "EURUSD 2024-08" in error and "must be finite and > 0" in error
    done = {
        m.strftime("%Y-%m")
        for (m,) in conn.execute(
            sql.SQL("SELECT month FROM {} WHERE status = 'done'").format(
                names.table(layout, "bqx_jobs")
            )
        )
    }
    assert done == {"2024-07", "2024-09"}


def test_connection_error_names_the_database_without_password(tmp_path):
    from bqx.config import load_settings

    bad = load_settings(database_url="postgresql://bob:s3cret@127.0.0.1:1/nowhere")
    with pytest.raises(BqxError) as err:
        connect(bad)
    assert "s3cret" not in str(err.value)
    assert "bob:****@127.0.0.1:1/nowhere" in str(err.value)


@pytest.mark.parametrize("executor", ["local", "threads"])
def test_ctrl_c_stops_every_worker_and_the_next_run_resumes(
    settings, layout, conn, two_pairs, cli_env, pg_url, executor
):
    # hold the workers inside their first jobs, then press Ctrl-C
    store_for(settings, layout).backfill(pairs=["eurusd"], start=Month(2024, 7), end=Month(2024, 7))
    args = ["--workers", "2", "--executor", executor]
    with held_run(pg_url, layout, conn, cli_env, args) as (proc, workers):
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    jobs = names.table(layout, "bqx_jobs")
    assert "Traceback" not in proc.stderr.read()
    for pid in workers:  # no orphan: every worker is gone (or a zombie nobody waits for)
        assert not alive(pid)
    run = conn.execute(
        sql.SQL("SELECT status FROM {} ORDER BY run_id DESC LIMIT 1").format(
            names.table(layout, "bqx_runs")
        )
    ).fetchone()[0]
    assert run == "interrupted"
    left = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE status = 'running'").format(jobs))
    assert left.fetchone()[0] == 0  # handed back as pending, not left for a heartbeat to expire
    resumed = store_for(settings, layout).backfill()
    assert resumed.jobs_failed == 0 and resumed.jobs_skipped == 1 and resumed.jobs_done == 5


@pytest.mark.parametrize("executor", ["local", "threads"])
def test_job_timeout_stops_the_job_retries_then_fails_it(
    settings, layout, conn, make_bars, pg_url, executor
):
    make_bars("eurusd", "2024-07-01", 5 * 1440, seed=1)
    store_for(settings, layout).backfill(workers=1)
    before = target_rows(conn, layout, "eurusd")
    # a reader holding the partition makes the job's TRUNCATE wait: the job hangs
    blocker = psycopg.connect(pg_url)
    part = names.target_partition(layout, "eurusd", Month(2024, 7))
    blocker.execute(sql.SQL("LOCK TABLE {} IN ACCESS SHARE MODE").format(part))
    # never hold the lock past the test, whatever happens
    timer = threading.Timer(
        60, lambda: conn.execute("SELECT pg_terminate_backend(%s)", (blocker.info.backend_pid,))
    )
    timer.start()
    try:
        summary = store_for(settings, layout).backfill(workers=1, force=True, job_timeout=1.5, max_attempts=2,
                           executor=executor)  # fmt: skip
    finally:
        timer.cancel()
        blocker.rollback()
        blocker.close()
    assert (summary.jobs_failed, summary.status) == (1, "failed")
    assert "EURUSD 2024-07: timed out after 1.5s" in summary.failures[0][2]
    outcomes = conn.execute(
        sql.SQL("SELECT status, error FROM {} WHERE run_id = %s ORDER BY attempt_id").format(
            names.table(layout, "bqx_attempts")
        ),
        (summary.run_id,),
    ).fetchall()
    assert [o[0] for o in outcomes] == ["retried", "failed"]
    after = target_rows(conn, layout, "eurusd")
    assert np.array_equal(before[1], after[1], equal_nan=True)  # the month is as it was
    again = store_for(settings, layout).backfill(workers=1)
    assert (again.jobs_done, again.jobs_failed) == (1, 0)


def test_init_is_idempotent(settings, layout, conn):

    months = [Month(2024, 7), Month(2024, 8)]
    assert store_for(settings, layout).init(["EURUSD", "usdjpy"], *months).pair_months == 4
    first = _schema_objects(conn, layout.schema)
    assert store_for(settings, layout).init(["EURUSD", "usdjpy"], *months).pair_months == 4
    assert _schema_objects(conn, layout.schema) == first
    assert {"bqx_eurusd_2024m07", "m1_usdjpy_2024m08", "bqx_runs", "bqx_jobs"} <= set(first)


def test_db_url_masks_the_password(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PG", "BQX_"))}
    env["BQX_DATABASE_URL"] = "postgresql://alice:hunter2@db.example:5432/fx"
    shown = subprocess.run([sys.executable, "-m", "bqx.cli", "db", "url"], env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
    assert shown.stdout.strip() == "postgresql://alice:****@db.example:5432/fx"
    full = subprocess.run([sys.executable, "-m", "bqx.cli", "db", "url", "--show-password"],
                          env=env, capture_output=True, text=True, timeout=60)  # fmt: skip
    assert full.stdout.strip() == env["BQX_DATABASE_URL"]


def _worker_children() -> list[int]:
    """Pids of this process's children running ``bqx._worker`` (zombies excluded)."""
    pids = []
    for task in os.listdir(f"/proc/{os.getpid()}/task"):
        with open(f"/proc/{os.getpid()}/task/{task}/children") as f:
            pids += [int(p) for p in f.read().split()]
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
        except FileNotFoundError:
            continue
        if b"bqx._worker" in cmd and alive(pid):
            out.append(pid)
    return out


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("executor", ["local", "threads"])
def test_no_worker_outlives_a_run_whatever_its_plan(settings, layout, conn, two_pairs, executor):
    # a failed plan, an empty plan, fewer jobs than workers: none is left behind
    with pytest.raises(BqxError, match="does not exist"):
        store_for(settings, layout).backfill(pairs=["GBPUSD"], workers=3, executor=executor)
    assert _worker_children() == []
    with pytest.raises(BqxError, match="nothing to do"):
        store_for(settings, layout).backfill(pairs=["EURUSD"], start=Month(2030, 1), workers=3,
                 executor=executor)  # fmt: skip
    assert _worker_children() == []
    summary = store_for(settings, layout).backfill(pairs=["EURUSD"], start=Month(2024, 7),
                       end=Month(2024, 7), workers=4, executor=executor)  # fmt: skip
    assert summary.jobs_done == 1 and summary.status == "done"
    assert _worker_children() == []
    assert not [t for t in threading.enumerate() if t.name.startswith("bqx-")]
    assert month_counts(conn, names.target(layout, "eurusd"), "ts_utc") == {
        "2024-07": month_counts(conn, names.source(layout, "eurusd"), "time")["2024-07"]
    }


def test_an_interrupted_forced_run_is_finished_by_a_plain_backfill(
    settings, layout, conn, two_pairs, cli_env, pg_url
):
    """Ctrl-C in `backfill --force` says to run `bqx backfill` without --force, and that
    finishes exactly the jobs the forced run had left (none redone twice)."""
    store_for(settings, layout).backfill(workers=2)
    with held_run(pg_url, layout, conn, cli_env, ["--force", "--workers", "2"]) as (proc, _):
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 130
    jobs = names.table(layout, "bqx_jobs")
    err = proc.stderr.read()
    assert "interrupted: run `bqx backfill` without --force to finish exactly the jobs this" \
        " run had left" in err, err  # fmt: skip
    left = conn.execute(sql.SQL("SELECT count(*) FROM {} WHERE status <> 'done'").format(
        jobs)).fetchone()[0]  # fmt: skip
    total = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(jobs)).fetchone()[0]
    assert 0 < left <= total
    resumed = store_for(settings, layout).backfill(workers=2)
    assert resumed.jobs_done == left and resumed.jobs_skipped == total - left
