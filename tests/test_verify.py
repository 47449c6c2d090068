"""bqx verify: each check passes on a clean run and fails on its planted fault."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from psycopg import sql

from bqx.backfill import backfill
from bqx.schema import Month
from bqx.verify import verify

AUG = Month(2024, 8)


@pytest.fixture
def done(settings, layout, make_bars):
    """EURUSD and USDJPY, July and August 2024, backfilled."""
    make_bars("eurusd", "2024-07-01", 62 * 1440, seed=1, level=1.08)
    make_bars("usdjpy", "2024-07-01", 62 * 1440, seed=2, level=160.0)
    backfill(settings, layout, workers=2)
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
    assert "80 sampled rows" in result["recompute_sample"][1]


def test_deleted_row_fails_then_forced_redo_of_the_pair_passes(settings, conn, done):
    part = done.target_partition("eurusd", AUG)
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE ts_utc = (SELECT max(ts_utc) FROM {})").format(part, part)
    )
    bad = failing(conn, done)
    assert set(bad) == {"row_counts", "ledger"}
    assert "EURUSD 2024-08" in bad["row_counts"] and "rows for" in bad["row_counts"]
    assert "EURUSD 2024-08: ledger says" in bad["ledger"]
    backfill(settings, done, pairs=["EURUSD"], force=True)
    assert failing(conn, done) == {}


def test_row_outside_its_month(conn, done):
    target, part = done.target("eurusd"), done.target_partition("eurusd", AUG)
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
    assert "EURUSD 2024-08: 1 rows outside 2024-08" in bad["keys_and_bounds"]
    assert "EURUSD 2024-08: partition bqx_eurusd_2024m08 covers" in bad["partitions"]


def test_missing_partition(conn, done):
    conn.execute(sql.SQL("DROP TABLE {}").format(done.target_partition("usdjpy", AUG)))
    bad = failing(conn, done)
    assert (
        f"USDJPY 2024-08: partition {done.schema}.bqx_usdjpy_2024m08 is missing"
        in bad["partitions"]
    )
    assert "USDJPY 2024-08: 0 rows for" in bad["row_counts"]


def test_corrupted_value_is_caught_by_recomputation(conn, done):
    conn.execute(
        sql.SQL("UPDATE {} SET w30_bqx_stdev = w30_bqx_stdev * 1.000001").format(
            done.target_partition("usdjpy", AUG)
        )
    )
    bad = failing(conn, done)
    assert set(bad) == {"recompute_sample"}
    assert "USDJPY 2024-08" in bad["recompute_sample"]
    assert "w30_bqx_stdev" in bad["recompute_sample"]


def test_unexpected_null_is_caught(conn, done):
    conn.execute(
        sql.SQL(
            "UPDATE {} SET w45_bqx_max = NULL WHERE ts_utc = (SELECT max(ts_utc) FROM {})"
        ).format(done.target_partition("eurusd", AUG), done.target_partition("eurusd", AUG))
    )
    bad = failing(conn, done)
    assert "EURUSD w45: 1 unexpected NULL rows" in bad["nulls"]


def test_job_left_running_by_a_dead_worker(conn, done):
    conn.execute(
        sql.SQL(
            "UPDATE {} SET status = 'running', worker = 'elsewhere:4242',"
            " heartbeat_at = now() - interval '1 hour' WHERE pair = 'usdjpy' AND month = %s"
        ).format(done.table("bqx_jobs")),
        (AUG.first_day,),
    )
    bad = failing(conn, done)
    assert set(bad) == {"ledger"}
    assert bad["ledger"] == "USDJPY 2024-08: job is running"


def test_ledger_count_that_disagrees_with_the_table(conn, done):
    conn.execute(
        sql.SQL("UPDATE {} SET rows_written = rows_written + 1 WHERE pair = 'eurusd'").format(
            done.table("bqx_jobs")
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
    assert all(set(c) == {"name", "ok", "detail"} for c in doc["checks"])
    conn.execute(sql.SQL("DROP TABLE {}").format(done.target_partition("eurusd", AUG)))
    code, doc = run()
    assert code == 1 and doc["ok"] is False
