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
