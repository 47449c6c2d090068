"""The queries behind ``bqx verify``'s plain-formula sample: stored rows, a row's history.

These read the source straight (no kernel, no COPY codec), so that a bug in the production
path cannot hide itself from the checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from bqx.core.layout import Layout
from bqx.store import names


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


def histories_by_count(
    conn: psycopg.Connection, layout: Layout, pair: str, times: Sequence[datetime], count: int
) -> dict[datetime, list[float]]:
    """For each of ``times``: the prices of the ``count`` bars at or before it, oldest first
    (one query for all of them)."""
    if not times:
        return {}
    rows = conn.execute(
        sql.SQL(
            "SELECT k.t, array(SELECT {p}::float8 FROM {s} WHERE {t} <= k.t ORDER BY {t} DESC"
            " LIMIT %s) FROM unnest(%s::timestamptz[]) AS k(t)"
        ).format(p=names.price(layout), s=names.source(layout, pair), t=names.time(layout)),
        (count, list(times)),
    ).fetchall()
    return {t: list(reversed(prices)) for t, prices in rows}


def histories_by_span(
    conn: psycopg.Connection, layout: Layout, pair: str, times: Sequence[datetime],
    minutes: int,
) -> dict[datetime, list[tuple[datetime, float]]]:  # fmt: skip
    """For each of ``times``: (time, price) of the bars from ``minutes`` before it up to it,
    in time order (one query for all of them)."""
    if not times:
        return {}
    rows = conn.execute(
        sql.SQL(
            "SELECT k.t, array(SELECT {t} FROM {s} WHERE {t} >= k.t - make_interval(mins => %s)"
            " AND {t} <= k.t ORDER BY {t}), array(SELECT {p}::float8 FROM {s} WHERE {t} >="
            " k.t - make_interval(mins => %s) AND {t} <= k.t ORDER BY {t})"
            " FROM unnest(%s::timestamptz[]) AS k(t)"
        ).format(p=names.price(layout), s=names.source(layout, pair), t=names.time(layout)),
        (minutes, minutes, list(times)),
    ).fetchall()
    return {t: list(zip(ts, ps, strict=True)) for t, ts, ps in rows}
