"""Exact after any change: whatever happens to the bars or the stored metrics, and however
``update``, resume and plain SQL interleave, a plain ``bqx backfill`` (or ``bqx update``) leaves
every stored row equal to a forced recompute from the bars as they are.

The reference is the whole series computed in one call of ``bqx.metrics.compute``, which
tests/test_metrics.py checks against a plain two-pass evaluation of the formulas.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

import numpy as np
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from bqx import metrics
from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.store import names
from bqx.store.bars import load_bars
from conftest import random_walk_bars, store_for, wait_for

JUL, AUG, SEP, OCT, NOV = (Month(2024, m) for m in (7, 8, 9, 10, 11))
COLS = metrics.metric_columns()


def stored(conn: psycopg.Connection, layout: Layout, pair: str) -> tuple[np.ndarray, dict]:
    """The target's rows: times and every value column (NULL as NaN)."""
    cols = ["rate", *COLS]
    rows = conn.execute(
        sql.SQL("SELECT ts_utc, {} FROM {} ORDER BY ts_utc").format(
            sql.SQL(", ").join(sql.SQL("{}::float8").format(sql.Identifier(c)) for c in cols),
            names.target(layout, pair),
        )
    ).fetchall()
    times = np.array([r[0].replace(tzinfo=None) for r in rows], dtype="datetime64[us]")
    values = np.array([[np.nan if v is None else v for v in r[1:]] for r in rows], dtype=float)
    return times, {c: values[:, i] if len(rows) else np.empty(0) for i, c in enumerate(cols)}


def assert_exact(conn: psycopg.Connection, layout: Layout, pair: str = "eurusd") -> None:
    """The stored rows are, bit for bit, the whole series recomputed from the bars now."""
    src = conn.execute(
        sql.SQL("SELECT time, close FROM {} ORDER BY time").format(names.source(layout, pair))
    ).fetchall()
    times = np.array([t.replace(tzinfo=None) for t, _ in src], dtype="datetime64[us]")
    prices = np.array([p for _, p in src], dtype=float)
    want = metrics.compute(times, prices)
    got_times, got = stored(conn, layout, pair)
    np.testing.assert_array_equal(got_times, times, err_msg="row times")
    np.testing.assert_array_equal(got["rate"], prices, err_msg="rate")
    for c in COLS:
        np.testing.assert_array_equal(got[c], want[c], err_msg=c)


def reasons(store) -> dict[Month, str]:
    return {j.month: j.reason for j in store.plan().jobs if j.action == "do"}


def count(conn: psycopg.Connection, table: sql.Composable) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()[0]


@pytest.fixture
def three_months(make_bars):
    """EURUSD from the middle of July to the middle of October 2024."""
    return make_bars("eurusd", "2024-07-20", 80 * 1440, seed=21)


# -- bars that go ---------------------------------------------------------------------------


def test_a_source_month_emptied_by_truncate_loses_its_metrics(settings, layout, conn, three_months):
    store = store_for(settings, layout)
    store.backfill(workers=2)
    conn.execute(sql.SQL("TRUNCATE {}").format(names.source_partition(layout, "eurusd", SEP)))
    # before anything runs, status does not call the pair current
    (pair,) = store.status().pairs
    assert not pair.current and "without bars" in (pair.note or "")
    assert reasons(store) == {SEP: "source changed", OCT: "source changed"}
    run = store.backfill(workers=2)
    assert (run.jobs_done, run.jobs_failed) == (2, 0)
    assert count(conn, names.target_partition(layout, "eurusd", SEP)) == 0
    assert_exact(conn, layout)
    assert reasons(store) == {}  # and it stays done
    (pair,) = store.status().pairs
    assert pair.current
    assert store.verify(sample=3).ok


def test_a_dropped_source_partition_takes_its_metrics_along(settings, layout, conn, three_months):
    store = store_for(settings, layout)
    store.backfill(workers=2)
    conn.execute(sql.SQL("DROP TABLE {}").format(names.source_partition(layout, "eurusd", AUG)))
    assert reasons(store) == {AUG: "source changed", SEP: "source changed"}
    store.update()
    assert count(conn, names.target_partition(layout, "eurusd", AUG)) == 0
    assert_exact(conn, layout)
    assert reasons(store) == {}


# -- bars that change -----------------------------------------------------------------------


def test_update_brings_an_old_correction_up_to_date(settings, layout, conn, three_months):
    """A bar corrected by plain SQL seven weeks before the newest bar, far beyond --recheck."""
    store = store_for(settings, layout)
    store.backfill(workers=2)
    conn.execute(
        sql.SQL("UPDATE {} SET close = close + 0.0007 WHERE time = '2024-08-20 10:00+00'").format(
            names.source(layout, "eurusd")
        )
    )
    result = store.update(recheck="1h")
    (pu,) = result.pairs
    assert pu.months == ["2024-08"] and pu.changed_rows == 76  # the bar and the 75 after it
    assert_exact(conn, layout)
    assert reasons(store) == {}  # a later backfill has nothing to redo
    assert store.verify(sample=3).ok


def test_update_never_masks_an_older_change(settings, layout, conn, three_months):
    """An old correction, then the month's newest bar changed, then update: the whole month is
    brought up to date, not just its tail; the same across months and for a late bar."""
    store = store_for(settings, layout)
    store.backfill(workers=2)
    src = names.source(layout, "eurusd")
    upd = "UPDATE {} SET close = close + 0.0004 WHERE time = %s"
    newest = conn.execute(sql.SQL("SELECT max(time) FROM {}").format(src)).fetchone()[0]
    conn.execute(sql.SQL(upd).format(src), (datetime(2024, 9, 3, 12, tzinfo=UTC),))
    conn.execute(sql.SQL(upd).format(src), (datetime(2024, 8, 30, 20, 58, tzinfo=UTC),))
    conn.execute(sql.SQL(upd).format(src), (newest,))
    store.update()
    assert_exact(conn, layout)
    assert reasons(store) == {}
    # a late bar (inserted where a minute was missing) in an old month
    missing = conn.execute(
        sql.SQL(
            "SELECT t FROM generate_series('2024-08-05 00:00+00'::timestamptz,"
            " '2024-08-05 23:59+00', '1 minute') t WHERE NOT EXISTS (SELECT 1 FROM {} WHERE"
            " time = t) LIMIT 1"
        ).format(src)
    ).fetchone()[0]
    conn.execute(sql.SQL("INSERT INTO {} VALUES (%s, 1.1, 1.1, 1.1, 1.1, 1)").format(src),
                 (missing,))  # fmt: skip
    store.update()
    assert_exact(conn, layout)
    assert reasons(store) == {}


def test_the_change_triggers_use_utc_months(settings, layout, conn, three_months):
    """A session in Tokyo updates the bar of 2024-08-31 16:00 UTC (September 1 in Tokyo):
    August changed, not September."""
    store = store_for(settings, layout)
    store.backfill(workers=2)
    with psycopg.connect(store.url(), autocommit=True) as tokyo:
        tokyo.execute("SET TimeZone = 'Asia/Tokyo'")
        tokyo.execute(
            sql.SQL("UPDATE {} SET close = close + 0.001 WHERE time = %s").format(
                names.source(layout, "eurusd")
            ),
            (datetime(2024, 8, 30, 16, 0, tzinfo=UTC),),
        )
    assert reasons(store) == {AUG: "source changed"}
    store.backfill(workers=2)
    assert_exact(conn, layout)


# -- metrics written by others --------------------------------------------------------------


@pytest.mark.parametrize("tamper", ["delete", "update", "insert", "truncate"])
def test_metric_rows_changed_by_others_are_redone_by_a_plain_backfill(
    settings, layout, conn, three_months, tamper
):
    store = store_for(settings, layout)
    store.backfill(workers=2)
    part = names.target_partition(layout, "eurusd", AUG)
    statement = {
        "delete": "DELETE FROM {} WHERE ts_utc = '2024-08-12 09:00+00'",
        "update": "UPDATE {} SET w60_bqx_avg = w60_bqx_avg + 1e-12 WHERE ts_utc ="
                  " '2024-08-12 09:00+00'",
        "insert": "INSERT INTO {} (ts_utc, rate) VALUES ('2024-08-31 23:59:30+00', 1)",
        "truncate": "TRUNCATE {}",
    }[tamper]  # fmt: skip
    conn.execute(sql.SQL(statement).format(part))
    why = reasons(store)
    assert set(why) == {AUG}, why
    run = store.backfill(workers=2)
    assert run.jobs_done == 1
    assert_exact(conn, layout)
    assert reasons(store) == {}


# -- writes that slip past the triggers -----------------------------------------------------


def _published(conn: psycopg.Connection, part: sql.Composable, before: int) -> bool:
    """Whether the server publishes more updated tuples of ``part`` than ``before``."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    row = conn.execute(
        "SELECT pg_stat_get_tuples_updated(to_regclass(%s))", (names.as_text(part),)
    ).fetchone()
    return row[0] > before


def _updated(conn: psycopg.Connection, part: sql.Composable) -> int:
    conn.execute("SELECT pg_stat_clear_snapshot()")
    return conn.execute(
        "SELECT pg_stat_get_tuples_updated(to_regclass(%s))", (names.as_text(part),)
    ).fetchone()[0]


@pytest.mark.parametrize("bypass", ["triggers disabled", "replica role"])
def test_writes_past_the_triggers_are_seen_by_a_plain_backfill(
    settings, layout, conn, three_months, bypass
):
    store = store_for(settings, layout)
    store.backfill(workers=2)
    assert reasons(store) == {}
    parent, part = names.source(layout, "eurusd"), names.source_partition(layout, "eurusd", AUG)
    before = _updated(conn, part)
    with psycopg.connect(store.url()) as writer:  # one transaction, then the session ends
        if bypass == "triggers disabled":
            for t in (parent, part):
                writer.execute(sql.SQL("ALTER TABLE {} DISABLE TRIGGER USER").format(t))
        else:
            writer.execute("SET session_replication_role = replica")
        writer.execute(
            sql.SQL(
                "UPDATE {} SET close = close + 0.0003 WHERE time >= '2024-08-14 10:00+00'"
                " AND time < '2024-08-14 11:00+00'"
            ).format(parent)  # fmt: skip
        )
        if bypass == "triggers disabled":
            for t in (parent, part):
                writer.execute(sql.SQL("ALTER TABLE {} ENABLE TRIGGER USER").format(t))
    # the server publishes a session's counters when it ends (at the latest a second after a
    # transaction): what a resume compares with
    wait_for(lambda: _published(conn, part, before), 10, "the writer's counters")
    assert reasons(store) == {AUG: "source changed"}
    run = store.backfill(workers=2)
    assert run.jobs_done == 1  # August only: the hour is far from September's lookback
    assert_exact(conn, layout)
    assert reasons(store) == {}  # and a month found unchanged by its hash is skipped from then


def test_a_month_hashed_after_a_statistics_reset_is_skipped_when_unchanged(
    settings, layout, conn, three_months
):
    store = store_for(settings, layout)
    store.backfill(workers=2)
    conn.execute("SELECT pg_stat_reset()")  # every counter of this database back to zero
    plan = store.plan()
    assert {j.action for j in plan.jobs} == {"skip"}  # hashed, unchanged
    run = store.backfill(workers=2)
    assert run.jobs_done == 0 and run.jobs_skipped == len(plan.jobs)


# -- any sequence ---------------------------------------------------------------------------

OPERATIONS = st.sampled_from(
    ["correct", "correct_tail", "late", "delete", "truncate", "append", "update", "backfill",
     "tamper", "bypass"]
)  # fmt: skip


@settings(max_examples=12, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops=st.lists(st.tuples(OPERATIONS, st.integers(0, 10_000)), min_size=1, max_size=6))
def test_any_sequence_ends_equal_to_a_forced_recompute(pg_url, tmp_path_factory, ops):
    from bqx.config import load_settings

    schema = f"t_{uuid.uuid4().hex[:10]}"
    home = tmp_path_factory.mktemp("home")
    settings_ = load_settings(database_url=pg_url, schema_name=schema, home=home)
    layout = Layout(schema)
    store = store_for(settings_, layout)
    with psycopg.connect(pg_url, autocommit=True) as conn:
        try:
            times, ohlcv = random_walk_bars("2024-07-27", 12 * 1440, seed=len(ops), missing=0.2)
            load_bars(conn, layout, "eurusd", times, ohlcv, mode="replace")
            store.backfill(workers=1)
            for op, k in ops:
                _apply(conn, store, layout, op, k)
            store.backfill(workers=1)
            assert_exact(conn, layout)
            assert reasons(store) == {}
        finally:
            conn.execute(sql.SQL("DROP SCHEMA IF EXISTS {} CASCADE").format(
                sql.Identifier(schema)))  # fmt: skip


def _apply(conn: psycopg.Connection, store, layout: Layout, op: str, k: int) -> None:
    """One change, at a place chosen by ``k``."""
    src = names.source(layout, "eurusd")
    rows = conn.execute(sql.SQL("SELECT time FROM {} ORDER BY time").format(src)).fetchall()
    if not rows and op not in ("append", "update", "backfill"):
        return
    at = rows[k % len(rows)][0] if rows else None
    if op == "correct":
        conn.execute(sql.SQL("UPDATE {} SET close = close * 1.0002 WHERE time = %s").format(src),
                     (at,))  # fmt: skip
    elif op == "correct_tail":  # near the end of July: August's lookback
        conn.execute(sql.SQL("UPDATE {} SET close = close * 0.9998 WHERE time >= '2024-07-31"
                             " 23:00+00' AND time < '2024-08-01'").format(src))  # fmt: skip
    elif op == "late":
        conn.execute(sql.SQL("INSERT INTO {} SELECT time + interval '30 seconds', open, high,"
                             " low, close, volume FROM {} WHERE time = %s"
                             " ON CONFLICT DO NOTHING").format(src, src), (at,))  # fmt: skip
    elif op == "delete":
        conn.execute(sql.SQL("DELETE FROM {} WHERE time = %s").format(src), (at,))
    elif op == "truncate":
        month = Month.of(at)
        conn.execute(sql.SQL("TRUNCATE {}").format(names.source_partition(layout, "eurusd",
                                                                          month)))  # fmt: skip
    elif op == "append":
        newest = rows[-1][0] if rows else datetime(2024, 8, 7, tzinfo=UTC)
        conn.execute(sql.SQL("INSERT INTO {} SELECT %s + n * interval '1 minute', 1.08, 1.08,"
                             " 1.08, 1.08 + n * 1e-5, 1 FROM generate_series(1, 30) n").format(src),
                     (newest,))  # fmt: skip
    elif op == "update":
        store.update()
    elif op == "backfill":
        store.backfill(workers=1)
    elif op == "tamper" and conn.execute("SELECT to_regclass(%s)", (
            names.as_text(names.target(layout, "eurusd")),)).fetchone()[0]:  # fmt: skip
        conn.execute(sql.SQL("DELETE FROM {} WHERE ts_utc = %s").format(
            names.target(layout, "eurusd")), (at,))  # fmt: skip
    elif op == "bypass":
        with conn.transaction():
            conn.execute("SET LOCAL session_replication_role = replica")
            conn.execute(sql.SQL("UPDATE {} SET close = close * 1.0003 WHERE time = %s").format(
                src), (at,))  # fmt: skip
        part = names.source_partition(layout, "eurusd", Month.of(at))
        # the counters move once this session's statistics are published (within a second)
        conn.execute("SELECT pg_stat_force_next_flush()")
        conn.execute("SELECT 1")
        wait_for(lambda: _updated(conn, part) > 0, 10, "published counters")
