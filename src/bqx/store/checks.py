"""The queries behind ``bqx verify``'s checks: NULL counts, samples, a row's plain history.

These read the source straight (no kernel, no COPY codec), so that a bug in the production
path cannot hide itself from the checks.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from datetime import date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from bqx.core.layout import Layout
from bqx.store import names

WINDOW_STATS = ("return", "max", "min", "avg", "stdev", "endpoint")
AGG_STATS = ("return", "max", "min", "avg", "stdev", "range", "volatility")


def _groups(windows: list[int]) -> dict[int, list[str]]:
    """The columns that are NULL together: a window's six, the aggregates with the largest."""
    groups = {w: [f"w{w}_bqx_{s}" for s in WINDOW_STATS] for w in windows}
    groups[windows[-1]] += [f"agg_bqx_{s}" for s in AGG_STATS]
    return groups


def null_counts(
    conn: psycopg.Connection, layout: Layout, pair: str, params: dict[str, Any]
) -> list[tuple[date, list[int]]]:
    """Per month: for each window, (rows NULL where the window is full, rows not NULL where
    it is not).

    Where a window is full is derived from the source in SQL, independently of the kernel:
    in ``bars`` mode after the pair's first W bars; in ``clock`` mode when t−W is not before
    the first bar and no minute of t−W … t−1 falls in a hole (a stretch more than
    ``max_fill`` minutes after the last bar).
    """
    windows = sorted(int(w) for w in params["windows"])
    bars_mode = params.get("mode", "bars") == "bars"
    src, tc = names.source(layout, pair), names.time(layout)
    exprs: list[sql.Composable] = []
    args: list[Any] = []
    if bars_mode:
        firsts = [r[0] for r in conn.execute(
            sql.SQL("SELECT {t} FROM {s} ORDER BY {t} LIMIT %s").format(t=tc, s=src),
            (windows[-1] + 1,),
        )]  # fmt: skip
        source: sql.Composable = sql.SQL("")
    else:
        source = sql.SQL(
            " LEFT JOIN (SELECT t, min(t) OVER () AS first, max(CASE WHEN gap > %s"
            " THEN t - interval '1 minute' END) OVER (ORDER BY t) AS last_hole"
            " FROM (SELECT {t}::timestamptz AS t, {t} - lag({t}) OVER (ORDER BY {t}) AS gap"
            " FROM {s}) g) h ON h.t = x.{ts}"
        ).format(t=tc, s=src, ts=names.TS)
    for w, cols in _groups(windows).items():
        any_null = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(names.column(c))
                                        for c in cols)  # fmt: skip
        all_null = sql.SQL(" AND ").join(sql.SQL("{} IS NULL").format(names.column(c))
                                         for c in cols)  # fmt: skip
        if bars_mode:
            # full exactly from the pair's (w+1)-th bar of history on
            cut = firsts[w] if len(firsts) > w else None
            full: sql.Composable = (
                sql.SQL("x.{} >= %s").format(names.TS) if cut is not None else sql.SQL("false")
            )
            args += [cut] * 2 if cut is not None else []
        else:
            full = sql.SQL(
                "(h.t IS NOT NULL AND h.t - %s >= h.first"
                " AND (h.last_hole IS NULL OR h.last_hole < h.t - %s))"
            )
            args += [timedelta(minutes=w)] * 4
        exprs += [
            sql.SQL("count(*) FILTER (WHERE {f} AND ({a}))").format(f=full, a=any_null),
            sql.SQL("count(*) FILTER (WHERE NOT {f} AND NOT ({a}))").format(f=full, a=all_null),
        ]
    if not bars_mode:  # the join's parameter comes after the counts'
        args.append(timedelta(minutes=int(params.get("max_fill", 5)) + 1))
    query = sql.SQL(
        "SELECT date_trunc('month', x.{ts} AT TIME ZONE 'UTC')::date, {e}"
        " FROM {target} x{source} GROUP BY 1 ORDER BY 1"
    ).format(
        e=sql.SQL(", ").join(exprs), target=names.target(layout, pair), source=source,
        ts=names.TS,
    )  # fmt: skip
    return [(m, [int(c) for c in counts]) for m, *counts in conn.execute(query, args)]


def sample_times(
    conn: psycopg.Connection, layout: Layout, pair: str, sample: int, rng: random.Random,
    seed: int,
) -> tuple[list[datetime], list[datetime]]:  # fmt: skip
    """(``sample`` random row times, each month's first row time not among them).

    A repeatable Bernoulli sample over all partitions, about 3× too large, then cut to size at
    random (a LIMIT would keep the first partition's rows only). Each month's first bar is
    added: its window reaches into the month before, where a month-by-month computation goes
    wrong first.
    """
    target = names.target(layout, pair)
    row = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(target)).fetchone()
    n = int(row[0]) if row else 0
    if n == 0:
        return [], []
    percent = min(100.0, 100.0 * 3 * sample / n)
    drawn = [r[0] for r in conn.execute(
        sql.SQL("SELECT {ts} FROM {t} TABLESAMPLE BERNOULLI (%s) REPEATABLE (%s)").format(
            ts=names.TS, t=target
        ),
        (percent, seed + rng.randrange(1 << 30)),
    )]  # fmt: skip
    picked = rng.sample(drawn, min(sample, len(drawn)))
    starts = [r[0] for r in conn.execute(
        sql.SQL("SELECT min({ts}) FROM {t} GROUP BY date_trunc('month', {ts}"
                " AT TIME ZONE 'UTC')").format(ts=names.TS, t=target)
    )]  # fmt: skip
    return picked, sorted(set(starts) - set(picked))


def rows_at(
    conn: psycopg.Connection, layout: Layout, pair: str, cols: Sequence[str],
    times: Sequence[datetime],
) -> list[tuple[Any, ...]]:  # fmt: skip
    """(ts_utc, rate, *cols) of the target rows at ``times``."""
    return conn.execute(
        sql.SQL("SELECT {ts}, {rate}, {cols} FROM {t} WHERE {ts} = ANY(%s)").format(
            ts=names.TS,
            rate=names.RATE,
            cols=names.columns(list(cols)),
            t=names.target(layout, pair),
        ),  # fmt: skip
        (list(times),),
    ).fetchall()


def bars_up_to(
    conn: psycopg.Connection, layout: Layout, pair: str, t: datetime, count: int
) -> list[float]:
    """The prices of the ``count`` bars at or before ``t``, oldest first."""
    rows = conn.execute(
        sql.SQL("SELECT {p}::float8 FROM {s} WHERE {t} <= %s ORDER BY {t} DESC LIMIT %s").format(
            p=names.price(layout), s=names.source(layout, pair), t=names.time(layout)
        ),
        (t, count),
    ).fetchall()
    return [r[0] for r in reversed(rows)]


def bars_between(
    conn: psycopg.Connection, layout: Layout, pair: str, lo: datetime, hi: datetime
) -> list[tuple[datetime, float]]:
    """(time, price) of the bars with ``lo <= time <= hi``, in time order."""
    return [(t, p) for t, p in conn.execute(
        sql.SQL("SELECT {t}, {p}::float8 FROM {s} WHERE {t} >= %s AND {t} <= %s ORDER BY {t}")
        .format(p=names.price(layout), s=names.source(layout, pair), t=names.time(layout)),
        (lo, hi),
    )]  # fmt: skip
