"""bqx verify: every value recomputed and compared bit for bit, incrementally; each check
passes on a clean run and fails on its planted fault, naming the row; the command it names
repairs it."""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys

import numpy as np
import psycopg
import pytest
from psycopg import sql

from bqx.core.months import Month
from bqx.ops.verify import verify
from bqx.store import names
from conftest import store_for, wait_for

JUL, AUG = Month(2024, 7), Month(2024, 8)
CHECKS = ["partitions", "keys", "values", "recompute_sample", "ledger"]


@pytest.fixture
def done(settings, layout, make_bars):
    """EURUSD and USDJPY, July and August 2024, backfilled."""
    make_bars("eurusd", "2024-07-01", 62 * 1440, seed=1, level=1.08)
    make_bars("usdjpy", "2024-07-01", 62 * 1440, seed=2, level=160.0)
    store_for(settings, layout).backfill(workers=2)
    return layout


def checks(conn, layout, **kw) -> dict[str, tuple[bool, str]]:
    result = verify(conn, layout, sample=40, **kw)
    assert result.ok == all(c.ok for c in result.checks)
    return {c.name: (c.ok, c.detail) for c in result.checks}


def failing(conn, layout, **kw) -> dict[str, str]:
    return {name: detail for name, (ok, detail) in checks(conn, layout, **kw).items() if not ok}


def one(conn, query: str, *args):
    return conn.execute(query, args).fetchone()[0]


def test_clean_run_passes_every_check_then_reads_nothing_again(conn, done):
    first = verify(conn, done, sample=40)
    assert [c.name for c in first.checks] == CHECKS
    assert first.ok, first.lines()
    assert (first.months_checked, first.months_unchanged) == (4, 0)
    details = {c.name: c.detail for c in first.checks}
    rows = sum(
        one(conn, sql.SQL("SELECT count(*) FROM {}").format(names.target(done, p)).as_string(conn))
        for p in ("eurusd", "usdjpy")
    )
    assert details["values"].startswith(f"{rows:,} rows of 4 months equal their recompute")
    # 40 random rows per pair plus each month's first bar (its window crosses the month)
    assert "84 sampled rows (4 of them first bars of a month)" in details["recompute_sample"]
    again = verify(conn, done, sample=40)
    assert again.ok and (again.months_checked, again.months_unchanged) == (0, 4)
    assert "checked 0 months; 4 verified before and unchanged since" == again.summary()
    full = verify(conn, done, sample=40, full=True)
    assert full.ok and (full.months_checked, full.months_unchanged) == (4, 0)


def _nudge_one_value(conn, layout) -> str:
    """Change one stored value of EURUSD 2024-08 in its last bit; return its time."""
    part = names.target_partition(layout, "eurusd", AUG)
    t, v = conn.execute(
        sql.SQL("SELECT ts_utc, w60_bqx_avg FROM {} WHERE ts_utc = '2024-08-12 09:00+00'").format(
            part
        )
    ).fetchone()
    conn.execute(
        sql.SQL("UPDATE {} SET w60_bqx_avg = %s WHERE ts_utc = %s").format(part),
        (float(np.nextafter(v, np.inf)), t),
    )
    return "2024-08-12 09:00"


TAMPERS = {
    "one value in its last bit": (_nudge_one_value, "w60_bqx_avg differs on 1 row (first"
                                  " 2024-08-12 09:00: stored "),
    "one row deleted": ("DELETE FROM {tgt} WHERE ts_utc = '2024-08-12 09:00+00'",
                        "1 row missing (bars without metrics) (first 2024-08-12 09:00)"),
    "one row without a bar": ("INSERT INTO {tgt} (ts_utc, rate) VALUES"
                              " ('2024-08-12 09:00:30+00', 1.1)",
                              "1 row with no bar behind them (first 2024-08-12 09:00:30)"),
    "a partition truncated": ("TRUNCATE {tgt}", "rows missing (bars without metrics) (first"
                              " 2024-08-01 00:00)"),
    "a source bar deleted": ("DELETE FROM {src} WHERE time = '2024-08-12 09:00+00'",
                             "1 row with no bar behind them (first 2024-08-12 09:00)"),
    "a source partition truncated": ("TRUNCATE {src}", "rows with no bar behind them (first"
                                     " 2024-08-01 00:00)"),
}  # fmt: skip


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_a_change_by_sql_to_a_verified_month_fails_plain_verify_and_the_named_command_repairs_it(
    conn, done, cli_env, tamper
):
    assert verify(conn, done, sample=3).ok  # every month verified
    change, named = TAMPERS[tamper]
    if callable(change):
        change(conn, done)
    else:
        conn.execute(sql.SQL(change).format(
            tgt=names.target_partition(done, "eurusd", AUG),
            src=names.source_partition(done, "eurusd", AUG),
        ))  # fmt: skip
    result = verify(conn, done, sample=3)
    assert not result.ok
    # only the changed month is read again (and September's, had it any: none here)
    assert (result.months_checked, result.months_unchanged) == (1, 3)
    (values,) = [c for c in result.checks if c.name == "values"]
    assert not values.ok and named in values.detail, values.detail
    assert all(f.pair == "EURUSD" and f.month == "2024-08" for f in values.failures)
    assert result.repair == "bqx backfill --pairs EURUSD --start 2024-08 --end 2024-08 --force"
    fixed = subprocess.run(
        [sys.executable, "-m", "bqx.cli", *shlex.split(result.repair)[1:]],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert fixed.returncode == 0, fixed.stderr
    after = verify(conn, done, sample=3)
    assert after.ok, after.lines()
    assert after.months_checked == 1  # the month the repair rewrote


def test_a_write_to_the_metrics_past_their_triggers_is_still_read_again(conn, done, pg_url):
    """Target triggers switched off around an UPDATE: the partition's write counters moved."""
    assert verify(conn, done, sample=3).ok
    part = names.target_partition(done, "usdjpy", JUL)
    before = one(conn, "SELECT pg_stat_get_tuples_updated(to_regclass(%s))", names.as_text(part))
    with psycopg.connect(pg_url, autocommit=True) as writer:
        writer.execute("SET session_replication_role = replica")
        writer.execute(sql.SQL("UPDATE {} SET w15_bqx_min = w15_bqx_min * 1.0000001 WHERE"
                               " ts_utc = '2024-07-17 12:00+00'").format(part))  # fmt: skip

    def published() -> bool:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        now = one(conn, "SELECT pg_stat_get_tuples_updated(to_regclass(%s))", names.as_text(part))
        return now > before

    wait_for(published, 15, "the writer's counters")
    bad = failing(conn, done)
    assert "USDJPY 2024-07: w15_bqx_min differs on 1 row (first 2024-07-17 12:00" in bad["values"]


def test_a_kernel_bug_is_caught_by_the_plain_formula_sample(settings, layout, conn, make_bars,
                                                            monkeypatch):  # fmt: skip
    """A kernel that is wrong, consistently: the stored rows equal its recompute (values
    passes), and the independent plain path says the kernel is wrong."""
    import bqx.pipeline.job as job

    real = job.compute_rows

    def off_by_a_little(params, since, times, prices):
        out_times, matrix = real(params, since, times, prices)
        col = 1 + params.columns.index("w30_bqx_stdev")
        matrix[col] *= 1.000001
        return out_times, matrix

    monkeypatch.setattr(job, "compute_rows", off_by_a_little)
    make_bars("usdjpy", "2024-07-20", 20 * 1440, seed=2, level=160.0)
    store_for(settings, layout).backfill(workers=1, executor="threads")
    result = verify(conn, layout, sample=40)
    bad = {c.name: c for c in result.checks if not c.ok}
    assert set(bad) == {"recompute_sample"}
    assert re.match(
        r"USDJPY 2024-07: w30_bqx_stdev wrong on (\d+) of \d+ sampled rows \(first .*\)",
        bad["recompute_sample"].detail,
    ), bad["recompute_sample"].detail
    fault = bad["recompute_sample"].failures[0]
    assert (fault.pair, fault.month, fault.column) == ("USDJPY", "2024-07", "w30_bqx_stdev")
    assert fault.got == pytest.approx(fault.expected * 1.000001, rel=1e-12)


def test_row_outside_its_month(conn, done):
    target, part = names.target(done, "eurusd"), names.target_partition(done, "eurusd", AUG)
    conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(target, part))
    conn.execute(
        sql.SQL("INSERT INTO {} (ts_utc, rate) VALUES ('2024-09-01 00:30+00', 1.1)").format(part)
    )
    conn.execute(
        sql.SQL(
            "ALTER TABLE {} ATTACH PARTITION {}"
            " FOR VALUES FROM ('2024-08-01 00:00+00') TO ('2024-09-02 00:00+00')"
        ).format(target, part)
    )
    bad = failing(conn, done)
    assert "EURUSD 2024-08: partition bqx_eurusd_2024m08 covers" in bad["partitions"]


def test_missing_partition(conn, done):
    conn.execute(sql.SQL("DROP TABLE {}").format(names.target_partition(done, "usdjpy", AUG)))
    bad = failing(conn, done)
    assert (
        f"USDJPY 2024-08: partition {done.schema}.bqx_usdjpy_2024m08 is missing"
        in bad["partitions"]
    )
    bars = one(conn, sql.SQL("SELECT count(*) FROM {}").format(
        names.source_partition(done, "usdjpy", AUG)).as_string(conn))  # fmt: skip
    assert f"USDJPY 2024-08: {bars:,} rows missing (bars without metrics)" in bad["values"]


def test_unexpected_null_is_caught(conn, done):
    part = names.target_partition(done, "eurusd", AUG)
    conn.execute(
        sql.SQL(
            "UPDATE {} SET w45_bqx_max = NULL WHERE ts_utc = (SELECT max(ts_utc) FROM {})"
        ).format(part, part)
    )
    bad = failing(conn, done)
    assert re.fullmatch(
        r"EURUSD 2024-08: w45_bqx_max differs on 1 row \(first 2024-08-[\d: ]+: stored None,"
        r" recomputed 1\.\d+\)", bad["values"]
    ), bad["values"]  # fmt: skip


def test_job_left_running_by_a_dead_worker(conn, done):
    conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'running', worker = 'elsewhere:4242',"
            " heartbeat_at = now() - interval '1 hour' WHERE pair = 'usdjpy' AND month = %s"
        ).format(names.table(done, "bqx_jobs")),
        (AUG.first_day,),
    )
    bad = failing(conn, done)
    assert set(bad) == {"ledger"}
    assert bad["ledger"].startswith("USDJPY 2024-08: job left running by elsewhere:4242")
    assert re.search(r"\(heartbeat 360\d s old; worker is gone\)$", bad["ledger"])


def test_ledger_count_that_disagrees_with_the_table(conn, done):
    conn.execute(
        sql.SQL("UPDATE {} SET rows_written = rows_written + 1 WHERE pair = 'eurusd'").format(
            names.table(done, "bqx_jobs")
        )
    )
    bad = failing(conn, done)
    assert set(bad) == {"ledger"}
    assert "EURUSD 2024-07: ledger says" in bad["ledger"] and "EURUSD 2024-08" in bad["ledger"]


def test_cli_json_and_exit_code(conn, done, cli_env):
    def run(*args: str) -> tuple[int, dict]:
        res = subprocess.run(
            [sys.executable, "-m", "bqx.cli", "verify", "--json", "--sample", "5", *args],
            env=cli_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return res.returncode, json.loads(res.stdout)

    code, doc = run()
    assert code == 0 and doc["ok"] is True
    assert [c["name"] for c in doc["checks"]] == CHECKS
    assert all(set(c) == {"name", "ok", "detail", "failures", "counts"} for c in doc["checks"])
    counts = {c["name"]: c["counts"] for c in doc["checks"]}
    exact = sum(
        conn.execute(sql.SQL("SELECT count(*) FROM {}").format(names.target(done, p))).fetchone()[0]
        for p in ("eurusd", "usdjpy")
    )
    assert counts["values"] == {"months": 4, "rows": exact, "faulty_months": 0,
                                "unchanged_months": 0}  # fmt: skip
    assert counts["partitions"] == {"partitions": 4, "missing": 0}
    assert (doc["months_checked"], doc["months_unchanged"], doc["full"]) == (4, 0, False)
    conn.execute(sql.SQL("DROP TABLE {}").format(names.target_partition(done, "eurusd", AUG)))
    code, doc = run()
    assert code == 1 and doc["ok"] is False
    assert doc["repair"] == "bqx backfill --pairs EURUSD --start 2024-08 --end 2024-08 --force"
    failures = {c["name"]: c["failures"] for c in doc["checks"]}
    src_aug = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(names.source_partition(done, "eurusd", AUG))
    ).fetchone()[0]
    assert failures["partitions"] == [{
        "problem": f"EURUSD 2024-08: partition {done.schema}.bqx_eurusd_2024m08 is missing",
        "pair": "EURUSD", "month": "2024-08", "column": None, "expected": "bqx_eurusd_2024m08",
        "got": None, "at": None, "count": None,
    }]  # fmt: skip
    (missing,) = failures["values"]
    assert (missing["pair"], missing["month"], missing["column"]) == ("EURUSD", "2024-08", "ts_utc")
    assert (missing["count"], missing["at"]) == (src_aug, "2024-08-01 00:00")
    code, doc = run("--full")
    assert code == 1 and doc["full"] and doc["months_checked"] == 4


def test_text_output_says_what_was_checked_and_how_to_repair(conn, done, cli_env):
    conn.execute(sql.SQL("DELETE FROM {} WHERE ts_utc = '2024-07-03 04:17+00'").format(
        names.target_partition(done, "usdjpy", JUL)))  # fmt: skip
    res = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "verify", "--sample", "5", "--workers", "2"],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert res.returncode == 1
    assert "FAIL values: USDJPY 2024-07: 1 row missing (bars without metrics) (first" \
           " 2024-07-03 04:17)" in res.stdout  # fmt: skip
    assert re.search(r"checked 4 months; 0 verified before and unchanged since in [\d.]+ s",
                     res.stdout)  # fmt: skip
    assert "to repair: bqx backfill --pairs USDJPY --start 2024-07 --end 2024-07 --force" \
        in res.stderr  # fmt: skip


def test_parallel_checks_find_what_one_connection_finds(settings, conn, done):
    for pair, month in (("eurusd", JUL), ("usdjpy", AUG)):
        conn.execute(sql.SQL("UPDATE {} SET agg_bqx_range = agg_bqx_range * 2 WHERE ts_utc ="
                             " %s").format(names.target_partition(done, pair, month)),
                     (month.start.replace(day=9, hour=3),))  # fmt: skip
    alone = verify(conn, done, sample=5, full=True)
    store = store_for(settings, done)
    together = verify(conn, done, sample=5, full=True, url=store.url(), workers=2)
    assert [f.problem for c in alone.checks for f in c.failures] == [
        f.problem for c in together.checks for f in c.failures
    ]
    assert len([f for c in together.checks for f in c.failures]) == 2


def test_a_forced_redo_of_one_pair_does_not_hide_faults_in_another(settings, conn, done):
    conn.execute(sql.SQL("DELETE FROM {}").format(names.target_partition(done, "usdjpy", AUG)))
    store_for(settings, done).backfill(pairs=["EURUSD"], force=True)
    # the latest run covered EURUSD only; verify still checks every job the ledger holds
    bad = failing(conn, done)
    assert re.search(r"USDJPY 2024-08: [\d,]+ rows missing", bad["values"])
    assert "EURUSD" not in bad["values"]
    latest = verify(conn, done, sample=5).run_id
    assert verify(conn, done, sample=5, run_id=latest).ok  # that run's own plan is fine
    store_for(settings, done).backfill(pairs=["USDJPY"], force=True)
    assert failing(conn, done) == {}


def test_clock_mode_nulls_and_recomputation(settings, layout, conn, make_bars):
    """Clock mode: NULL exactly where a window has a minute without a price (weekends, holes)."""
    make_bars("eurusd", "2024-07-22", 16 * 1440, seed=3, missing=0.05)
    store_for(settings, layout).backfill(workers=1, mode="clock", max_fill=2)
    result = checks(conn, layout)
    assert all(ok for ok, _ in result.values()), result
    nulls = conn.execute(
        sql.SQL("SELECT count(*) FROM {} WHERE w15_bqx_avg IS NULL").format(
            names.target(layout, "eurusd")
        )
    ).fetchone()[0]
    assert nulls > 15  # weekend gaps and holes, not only the start of history
    part = names.target_partition(layout, "eurusd", AUG)
    # a value where the window has a hole, and a NULL where it is full
    conn.execute(
        sql.SQL(
            "UPDATE {p} SET w15_bqx_avg = 1.0 WHERE ts_utc = (SELECT max(ts_utc) FROM {p}"
            " WHERE w15_bqx_avg IS NULL)"
        ).format(p=part)
    )
    conn.execute(
        sql.SQL(
            "UPDATE {p} SET agg_bqx_range = NULL WHERE ts_utc = (SELECT max(ts_utc) FROM {p}"
            " WHERE agg_bqx_range IS NOT NULL)"
        ).format(p=part)
    )
    bad = failing(conn, layout)
    assert re.search(r"EURUSD 2024-08: w15_bqx_avg differs on 1 row \(first [\d: -]+: stored"
                     r" 1\.0, recomputed None\)", bad["values"]), bad["values"]  # fmt: skip
    assert re.search(r"EURUSD 2024-08: agg_bqx_range differs on 1 row \(first [\d: -]+: stored"
                     r" None, recomputed [\d.e-]+\)", bad["values"]), bad["values"]  # fmt: skip


def test_delete_bars_then_verify_names_the_repair_and_a_plain_backfill_makes_it_pass(
    settings, conn, done
):
    """`bqx delete-bars` takes the bars and their metric rows; the rows after them in the
    month were computed over the deleted bars: verify says so and what repairs it."""
    store = store_for(settings, done)
    assert store.verify(sample=3).ok
    gone = store.delete_bars("EURUSD", "2024-08-12 09:00", "2024-08-12 10:00")
    assert gone.bars > 0 and gone.metric_rows == gone.bars
    result = store.verify(sample=3)
    assert not result.ok
    (values,) = [c for c in result.checks if c.name == "values"]
    assert all((f.pair, f.month) == ("EURUSD", "2024-08") for f in values.failures)
    assert "differs on" in values.detail and "(first 2024-08-12 10:00" in values.detail
    assert result.repair == "bqx backfill --pairs EURUSD --start 2024-08 --end 2024-08 --force"
    run = store.backfill()  # the plain resume sees the source changed, too
    assert run.jobs_done == 1
    assert store.verify(sample=3).ok
