"""bqx verify: each check passes on a clean run and fails on its planted fault."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest
from psycopg import sql

from bqx.core.months import Month
from bqx.ops.verify import verify
from bqx.store import names
from conftest import store_for

AUG = Month(2024, 8)


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


def failing(conn, layout) -> dict[str, str]:
    return {name: detail for name, (ok, detail) in checks(conn, layout).items() if not ok}


def test_clean_run_passes_every_check(conn, done):
    result = checks(conn, done)
    assert list(result) == [
        "partitions",
        "row_counts",
        "keys_and_bounds",
        "nulls",
        "recompute_sample",
        "ledger",
    ]
    assert all(ok for ok, _ in result.values()), result
    # 40 random rows per pair plus each month's first bar (its window crosses the month)
    assert "84 sampled rows (4 of them first bars of a month)" in result["recompute_sample"][1]


def test_deleted_row_fails_then_forced_redo_of_the_pair_passes(settings, conn, done):
    part = names.target_partition(done, "eurusd", AUG)
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE ts_utc = (SELECT max(ts_utc) FROM {})").format(part, part)
    )
    bad = failing(conn, done)
    assert set(bad) == {"row_counts", "ledger"}
    assert "EURUSD 2024-08" in bad["row_counts"] and "rows for" in bad["row_counts"]
    assert "EURUSD 2024-08: ledger says" in bad["ledger"]
    store_for(settings, done).backfill(pairs=["EURUSD"], force=True)
    assert failing(conn, done) == {}


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
    assert "EURUSD 2024-08: 1 row outside 2024-08" in bad["keys_and_bounds"]
    assert "EURUSD 2024-08: partition bqx_eurusd_2024m08 covers" in bad["partitions"]


def test_missing_partition(conn, done):
    conn.execute(sql.SQL("DROP TABLE {}").format(names.target_partition(done, "usdjpy", AUG)))
    bad = failing(conn, done)
    assert (
        f"USDJPY 2024-08: partition {done.schema}.bqx_usdjpy_2024m08 is missing"
        in bad["partitions"]
    )
    assert "USDJPY 2024-08: 0 rows for" in bad["row_counts"]


def test_corrupted_value_is_caught_by_recomputation(conn, done):
    conn.execute(
        sql.SQL("UPDATE {} SET w30_bqx_stdev = w30_bqx_stdev * 1.000001").format(
            names.target_partition(done, "usdjpy", AUG)
        )
    )
    bad = failing(conn, done)
    assert set(bad) == {"recompute_sample"}
    # every sampled August row is wrong in that one column, and the detail says where
    assert re.fullmatch(
        r"USDJPY 2024-08: w30_bqx_stdev wrong on (\d+) of \1 sampled rows \(first .*\)",
        bad["recompute_sample"],
    ), bad["recompute_sample"]
    # the same failure for scripts: where, which column, the recomputed and the stored value
    (check,) = [c for c in verify(conn, done, sample=40).checks if c.name == "recompute_sample"]
    (fault,) = check.failures
    assert (fault.pair, fault.month, fault.column) == ("USDJPY", "2024-08", "w30_bqx_stdev")
    assert fault.got == pytest.approx(fault.expected * 1.000001, rel=1e-12)
    assert fault.count == int(re.search(r"wrong on (\d+)", check.detail).group(1)) > 0
    assert fault.at.startswith("2024-08-")


def test_unexpected_null_is_caught(conn, done):
    conn.execute(
        sql.SQL(
            "UPDATE {} SET w45_bqx_max = NULL WHERE ts_utc = (SELECT max(ts_utc) FROM {})"
        ).format(
            names.target_partition(done, "eurusd", AUG), names.target_partition(done, "eurusd", AUG)
        )
    )
    bad = failing(conn, done)
    assert bad["nulls"] == "EURUSD 2024-08 w45: 1 unexpected NULL row"


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
    def run() -> tuple[int, dict]:
        res = subprocess.run(
            [sys.executable, "-m", "bqx.cli", "verify", "--json", "--sample", "5"],
            env=cli_env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        return res.returncode, json.loads(res.stdout)

    code, doc = run()
    assert code == 0 and doc["ok"] is True
    assert {c["name"] for c in doc["checks"]} >= {"partitions", "ledger"}
    assert all(set(c) == {"name", "ok", "detail", "failures", "counts"} for c in doc["checks"])
    counts = {c["name"]: c["counts"] for c in doc["checks"]}
    exact = sum(
        conn.execute(sql.SQL("SELECT count(*) FROM {}").format(names.target(done, p))).fetchone()[0]
        for p in ("eurusd", "usdjpy")
    )
    assert counts["row_counts"] == {"rows": exact, "source_bars": exact}  # numbers, not text
    assert counts["partitions"] == {"partitions": 4, "missing": 0}
    conn.execute(sql.SQL("DROP TABLE {}").format(names.target_partition(done, "eurusd", AUG)))
    code, doc = run()
    assert code == 1 and doc["ok"] is False
    failures = {c["name"]: c["failures"] for c in doc["checks"]}
    src_aug = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(names.source_partition(done, "eurusd", AUG))
    ).fetchone()[0]
    assert failures["partitions"] == [{
        "problem": f"EURUSD 2024-08: partition {done.schema}.bqx_eurusd_2024m08 is missing",
        "pair": "EURUSD", "month": "2024-08", "column": None, "expected": "bqx_eurusd_2024m08",
        "got": None, "at": None, "count": None,
    }]  # fmt: skip
    ((row_fault),) = failures["row_counts"]
    assert (row_fault["pair"], row_fault["month"], row_fault["column"]) == (
        "EURUSD",
        "2024-08",
        "rows",
    )
    assert (row_fault["expected"], row_fault["got"]) == (src_aug, 0)


def test_a_forced_redo_of_one_pair_does_not_hide_faults_in_another(settings, conn, done):
    conn.execute(sql.SQL("DELETE FROM {}").format(names.target_partition(done, "usdjpy", AUG)))
    store_for(settings, done).backfill(pairs=["EURUSD"], force=True)
    # the latest run covered EURUSD only; verify still checks every job the ledger holds
    bad = failing(conn, done)
    assert "USDJPY 2024-08: 0 rows for" in bad["row_counts"]
    assert "EURUSD" not in bad["row_counts"]
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
    assert "EURUSD 2024-08 w15: 1 row without full history not NULL" in bad["nulls"]
    assert "EURUSD 2024-08 w75: 1 unexpected NULL row" in bad["nulls"]
