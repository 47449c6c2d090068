"""Resume against a real PostgreSQL: a job's source signature covers its lookback, a done job
whose partition went missing or empty is redone, and the auto (version) check agrees with the
exact one.

The bars straddle 2024-10/2024-11 (a Thursday night, so the clock-mode lookback of November
reads October's last minutes), a few days only.
"""

from __future__ import annotations

import numpy as np
import psycopg
import pytest
from psycopg import sql

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.params import Params
from bqx.pipeline.plan import plan_backfill
from bqx.store import names
from bqx.store.bars import load_bars
from bqx.store.ddl import ensure_source_partition
from conftest import store_for

OCT, NOV = Month(2024, 10), Month(2024, 11)


@pytest.fixture
def bars(make_bars):
    """EURUSD from 2024-10-29 to 2024-11-01 22:00 (Friday close): two short months."""
    return make_bars("eurusd", "2024-10-29", 4 * 1440, seed=7, level=1.08)


def month_rows(conn: psycopg.Connection, layout: Layout, month: Month) -> np.ndarray:
    """The target rows of one month, [rate, metric columns...], ordered by time; NULL -> NaN."""
    cols = [
        r[0]
        for r in conn.execute(
            "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s) AND attnum > 0"
            " AND attname LIKE 'w%%' ORDER BY attnum",
            (names.target(layout, "eurusd").as_string(conn),),
        )
    ]
    rows = conn.execute(
        sql.SQL(
            "SELECT rate, {} FROM {} WHERE ts_utc >= %s AND ts_utc < %s ORDER BY ts_utc"
        ).format(sql.SQL(", ").join(map(sql.Identifier, cols)), names.target(layout, "eurusd")),
        (month.start, month.end),
    ).fetchall()
    return np.array([[np.nan if v is None else v for v in r] for r in rows], dtype=np.float64)


def w75_avg_first_november_bar(conn: psycopg.Connection, layout: Layout) -> tuple[float, float]:
    """(stored w75_bqx_avg of November's first bar, mean of the 75 closes before it)."""
    stored = conn.execute(
        sql.SQL("SELECT w75_bqx_avg FROM {} WHERE ts_utc >= %s ORDER BY ts_utc LIMIT 1").format(
            names.target(layout, "eurusd")
        ),
        (NOV.start,),
    ).fetchone()[0]
    closes = [
        r[0]
        for r in conn.execute(
            sql.SQL("SELECT close FROM {} WHERE time < %s ORDER BY time DESC LIMIT 75").format(
                names.source(layout, "eurusd")
            ),
            (NOV.start,),
        )
    ]
    return stored, sum(closes) / len(closes)


def change_late_october_bar(conn: psycopg.Connection, layout: Layout, how: str) -> None:
    """Raise the 6th-last October close by 1%: inside November's 75-bar and 80-minute lookback."""
    t, o, h, lo, c, v = conn.execute(
        sql.SQL(
            "SELECT time, open, high, low, close, volume FROM {} WHERE time < %s"
            " ORDER BY time DESC OFFSET 5 LIMIT 1"
        ).format(names.source(layout, "eurusd")),
        (NOV.start,),
    ).fetchone()
    assert (NOV.start - t).total_seconds() < 75 * 60
    if how == "update":  # plain SQL behind bqx's back
        conn.execute(
            sql.SQL(
                "UPDATE {} SET close = close * 1.01, high = high * 1.01 WHERE time = %s"
            ).format(names.source(layout, "eurusd")),
            (t,),
        )
    else:  # the path of `bqx ingest`: a one-bar merge
        times = np.array([np.datetime64(t.replace(tzinfo=None), "us")])
        load_bars(conn, layout, "eurusd", times, np.array([[o, h * 1.01, lo, c * 1.01, v]]))


@pytest.mark.parametrize(
    "mode,how,check",
    [
        ("bars", "update", "exact"),
        ("clock", "ingest", "exact"),
        ("clock", "update", "auto"),
    ],
)
def test_a_corrected_lookback_bar_redoes_the_next_month(
    settings, layout, conn, bars, mode, how, check
):
    first = store_for(settings, layout).backfill(mode=mode, workers=1, source_check=check)
    assert first.jobs_done == 2
    before = month_rows(conn, layout, NOV)
    change_late_october_bar(conn, layout, how)

    resumed = store_for(settings, layout).backfill(mode=mode, workers=1, source_check=check)
    assert (resumed.jobs_done, resumed.jobs_skipped) == (2, 0)  # October and November
    after = month_rows(conn, layout, NOV)
    assert not np.array_equal(before, after, equal_nan=True)  # November's first rows moved
    if mode == "bars":
        stored, expected = w75_avg_first_november_bar(conn, layout)
        assert stored == pytest.approx(expected, rel=1e-12)

    forced = store_for(settings, layout).backfill(
        mode=mode, workers=1, force=True, source_check=check
    )
    assert forced.jobs_done == 2
    assert np.array_equal(month_rows(conn, layout, NOV), after, equal_nan=True)


@pytest.mark.parametrize("fault", ["drop", "truncate"])
def test_a_done_job_whose_partition_is_gone_or_empty_is_redone(settings, layout, conn, bars, fault):
    store_for(settings, layout).backfill(workers=1)
    good = month_rows(conn, layout, OCT)
    part = names.target_partition(layout, "eurusd", OCT)
    verb = "DROP TABLE" if fault == "drop" else "TRUNCATE"
    conn.execute(sql.SQL(verb + " {}").format(part))

    plan = plan_backfill(conn, Params.build(layout, (15, 30, 45, 60, 75), "bars", 5))
    why = {(j.pair, j.month): (j.action, j.reason) for j in plan.jobs}
    reason = "partition missing" if fault == "drop" else "partition empty"
    assert why == {("eurusd", OCT): ("do", reason), ("eurusd", NOV): ("skip", "done, unchanged")}

    resumed = store_for(settings, layout).backfill(workers=1)
    assert (resumed.jobs_done, resumed.jobs_skipped) == (1, 1)
    assert np.array_equal(month_rows(conn, layout, OCT), good, equal_nan=True)


def test_auto_check_agrees_with_exact_and_sees_every_bqx_write(settings, layout, conn, bars):
    store_for(settings, layout).backfill(workers=1)  # exact: records the versions it saw as well
    noop = store_for(settings, layout).backfill(workers=1, source_check="auto")
    assert (noop.jobs_done, noop.jobs_skipped) == (0, 2)
    # a new bar appended to November through bqx: only November is redone
    t = np.array([np.datetime64("2024-11-01T21:59", "us")])
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE time = %s").format(names.source(layout, "eurusd")),
        ("2024-11-01 21:59+00",),
    )
    load_bars(conn, layout, "eurusd", t, np.array([[1.1, 1.1, 1.1, 1.1, 1.0]]))
    resumed = store_for(settings, layout).backfill(workers=1, source_check="auto")
    assert (resumed.jobs_done, resumed.jobs_skipped) == (1, 1)
    assert month_rows(conn, layout, NOV)[-1, 0] == 1.1
    # a source partition bqx did not write (no version): hashed exactly, so still planned
    ensure_source_partition(conn, layout, "eurusd", Month(2024, 12))
    conn.execute(
        sql.SQL("INSERT INTO {} VALUES ('2024-12-02 10:00+00', 1.2, 1.2, 1.2, 1.2, 1)").format(
            names.source(layout, "eurusd")
        )
    )
    dec = store_for(settings, layout).backfill(workers=1, source_check="auto")
    assert (dec.jobs_done, dec.jobs_skipped) == (1, 2)


def _count(conn, table) -> int:
    return conn.execute(sql.SQL("SELECT count(*) FROM {}").format(table)).fetchone()[0]


def test_auto_check_uses_versions_and_sees_plain_sql_writes(settings, layout, conn, bars):
    store_for(settings, layout).backfill(workers=1)
    jobs = names.table(layout, "bqx_jobs")
    recorded = conn.execute(
        sql.SQL(
            "SELECT bool_and(source_ver IS NOT NULL AND source_sig IS NOT NULL"
            " AND source_stats IS NOT NULL AND target_ver IS NOT NULL) FROM {}"
        ).format(jobs)
    ).fetchone()[0]
    assert recorded  # planned from versions; each job recorded what it read and wrote

    def changed() -> set[Month]:
        plan = plan_backfill(conn, Params.build(layout, (15, 30, 45, 60, 75), "bars", 5))
        return {j.month for j in plan.jobs if j.reason == "source changed"}

    assert changed() == set()
    src = names.source(layout, "eurusd")
    conn.execute(
        sql.SQL("UPDATE {} SET close = close * 1.001 WHERE time = '2024-11-01 12:00+00'").format(
            src
        )
    )  # through the parent table
    assert changed() == {NOV}
    conn.execute(
        sql.SQL("DELETE FROM {} WHERE time = '2024-10-30 12:00+00'").format(
            names.source_partition(layout, "eurusd", OCT)
        )
    )  # straight into a partition (November is still changed from the UPDATE)
    assert changed() == {OCT, NOV}
    assert store_for(settings, layout).backfill(workers=1).jobs_done == 2
    assert changed() == set()
    conn.execute(
        sql.SQL("INSERT INTO {} VALUES ('2024-10-30 12:00+00', 1, 1, 1, 1, 1)").format(src)
    )  # far from November's lookback (its last 75 bars of October): October only
    assert changed() == {OCT}
    conn.execute(sql.SQL("TRUNCATE {}").format(names.source_partition(layout, "eurusd", NOV)))
    plan = plan_backfill(conn, Params.build(layout, (15, 30, 45, 60, 75), "bars", 5))
    # a month left without bars is planned too: its stored metrics must go
    assert [(j.month, j.reason) for j in plan.jobs] == [
        (OCT, "source changed"),
        (NOV, "source changed"),
    ]
    assert store_for(settings, layout).backfill(workers=1).jobs_done == 2
    assert _count(conn, names.target_partition(layout, "eurusd", NOV)) == 0
    # with a trigger disabled, that month is hashed exactly instead: unchanged, skipped; a
    # write made meanwhile is seen by the hash
    conn.execute(
        sql.SQL("ALTER TABLE {} DISABLE TRIGGER bqx_version").format(
            names.source_partition(layout, "eurusd", OCT)
        )
    )
    assert changed() == set()
    conn.execute(
        sql.SQL("UPDATE {} SET close = close * 1.001 WHERE time = '2024-10-30 13:00+00'").format(
            names.source_partition(layout, "eurusd", OCT)
        )
    )
    assert changed() == {OCT}
