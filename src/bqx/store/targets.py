"""Metric rows in the database's target tables: written a month at a time, and read back.

A month is replaced whole (``TRUNCATE`` + ``COPY … FREEZE`` in the caller's transaction) or
upserted from a time on (staged through COPY; rows whose values did not change are not
rewritten). Reads go through binary COPY straight into numpy columns.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from bqx.core.layout import TARGET_RATE, TARGET_TIME, Layout
from bqx.core.months import Month
from bqx.core.params import Params
from bqx.db.copy import copy_in_columns, copy_out_columns
from bqx.store import names
from bqx.store.catalog import table_columns
from bqx.store.upsert import stage_table, upsert


def replace_month(
    cur: psycopg.Cursor, layout: Layout, params: Params, pair: str, month: Month,
    times: np.ndarray, matrix: np.ndarray,
) -> int:  # fmt: skip
    """Inside the caller's transaction: the month's partition holds exactly these rows.

    ``matrix`` is (1 + metric columns) × rows: the rate, then the metric columns. Truncated in
    this transaction, the partition takes ``COPY … FREEZE`` (docs/performance.md).
    """
    part = names.target_partition(layout, pair, month)
    cur.execute(sql.SQL("TRUNCATE {}").format(part))
    cols = [TARGET_TIME, TARGET_RATE, *params.columns]
    return copy_in_columns(cur, part, cols, times, matrix, freeze=True)


def upsert_range(
    cur: psycopg.Cursor, layout: Layout, params: Params, pair: str, month: Month, lo: datetime,
    times: np.ndarray, matrix: np.ndarray,
) -> tuple[int, int, int]:  # fmt: skip
    """Inside the caller's transaction: the month's rows at or after ``lo`` become these rows
    (``matrix`` as for ``replace_month``). Unchanged rows are not rewritten (their
    ``created_at`` stays); rows whose bar is gone are deleted. Returns (inserted, updated,
    deleted)."""
    part = names.target_partition(layout, pair, month)
    cols = [TARGET_TIME, TARGET_RATE, *params.columns]
    keep = (times >= np.datetime64(month.start.replace(tzinfo=None))) & (
        times < np.datetime64(month.end.replace(tzinfo=None))
    )
    stage = stage_table(cur, _stage_name(cols), columns=cols)
    inserted, updated = upsert(cur, part, stage, cols, times[keep], matrix[:, keep].T,
                               touch="created_at")  # fmt: skip
    deleted = cur.execute(
        sql.SQL(
            "DELETE FROM {part} d WHERE d.{ts} >= %s"
            " AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.{ts} = d.{ts})"
        ).format(part=part, stage=stage, ts=names.TS),
        (lo,),
    ).rowcount
    return inserted, updated, int(deleted)


def _stage_name(cols: Sequence[str]) -> str:
    """One staging table per column set (windows), so pairs computed alike share it."""
    import hashlib

    return "bqx_stage_" + hashlib.sha256(",".join(cols).encode()).hexdigest()[:12]


def count_month(cur: psycopg.Cursor, layout: Layout, pair: str, month: Month) -> int:
    row = cur.execute(
        sql.SQL("SELECT count(*) FROM {}").format(names.target_partition(layout, pair, month))
    ).fetchone()
    return int(row[0]) if row else 0


def newest(conn: psycopg.Connection, layout: Layout, pair: str) -> datetime | None:
    """The newest metric row's time (an index look-up), None when there is none."""
    row = conn.execute(
        sql.SQL("SELECT max({ts}) FROM {t}").format(ts=names.TS, t=names.target(layout, pair))
    ).fetchone()
    return row[0] if row else None


def first_difference(
    conn: psycopg.Connection, params: Params, pair: str, since: datetime,
    until: datetime | None = None,
) -> datetime | None:  # fmt: skip
    """The earliest time in [since, until) where source and target disagree: a bar without a
    row (new or late), a row without a bar (removed), or a price different from the row's
    rate."""
    layout = params.layout
    row = conn.execute(
        sql.SQL(
            "SELECT min(coalesce(s.t, d.{ts})) FROM"
            " (SELECT {t}::timestamptz AS t, {p}::float8 AS p FROM {src} WHERE {t} >= %s"
            "  AND (%s::timestamptz IS NULL OR {t} < %s)) s"
            " FULL JOIN (SELECT {ts}, {rate} FROM {tgt} WHERE {ts} >= %s"
            "  AND (%s::timestamptz IS NULL OR {ts} < %s)) d ON d.{ts} = s.t"
            " WHERE s.t IS NULL OR d.{ts} IS NULL OR s.p IS DISTINCT FROM d.{rate}"
        ).format(
            t=names.time(layout),
            p=names.price(layout),
            src=names.source(layout, pair),
            tgt=names.target(layout, pair),
            ts=names.TS,
            rate=names.RATE,
        ),  # fmt: skip
        (since, until, until, since, until, until),
    ).fetchone()
    return row[0] if row else None


def month_counts(conn: psycopg.Connection, layout: Layout, pair: str) -> dict[Month, int]:
    """Exact rows per month of a pair's target (``count(*)``)."""
    q = sql.SQL("SELECT date_trunc('month', {ts})::date, count(*) FROM {t} GROUP BY 1").format(
        ts=names.TS, t=names.target(layout, pair)
    )
    return {Month.of(m): int(n) for m, n in conn.execute(q)}


def time_bounds(
    conn: psycopg.Connection, layout: Layout, pair: str, lo: Any = None, hi: Any = None
) -> tuple[datetime | None, datetime | None]:
    """(first, newest) metric row time, within [lo, hi) when given."""
    row = conn.execute(
        sql.SQL(
            "SELECT min({ts}), max({ts}) FROM {t} WHERE (%s::timestamptz IS NULL OR {ts} >= %s)"
            " AND (%s::timestamptz IS NULL OR {ts} < %s)"
        ).format(ts=names.TS, t=names.target(layout, pair)),
        (lo, lo, hi, hi),
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def float_columns(conn: psycopg.Connection, layout: Layout, pair: str) -> list[str] | None:
    """The float columns of a pair's target table in table order (``rate`` then the metrics),
    None when there is no such table."""
    cols = table_columns(conn, layout.schema, layout.target_name(pair))
    if cols is None:
        return None
    return [c for c, typ in cols.items() if typ == "double precision"]


def read_columns(
    conn: psycopg.Connection, layout: Layout, pair: str, columns: Sequence[str],
    start: Any = None, end: Any = None, *, ordered: bool = True,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:  # fmt: skip
    """Rows with ``start <= ts_utc < end`` (either may be None): (times, values, nulls), in
    time order. ``ordered=False`` reads the table in storage order (a plain scan, no index)
    and sorts here only when the rows came out of order: cheaper for a whole month."""
    where, args = [], []
    if start is not None:
        where.append(sql.SQL("{} >= %s").format(names.TS))
        args.append(start)
    if end is not None:
        where.append(sql.SQL("{} < %s").format(names.TS))
        args.append(end)
    # naive datetimes are sent as timestamp; ts_utc is timestamptz and the session is in UTC
    order = sql.SQL(" ORDER BY {}").format(names.TS) if ordered else sql.SQL("")
    query = sql.SQL("SELECT {ts}{cols} FROM {t}{where}{order}").format(
        order=order,
        ts=names.TS,
        cols=sql.SQL("").join(sql.SQL(", {}::float8").format(names.column(c)) for c in columns),
        t=names.target(layout, pair),
        where=sql.SQL(" WHERE ") + sql.SQL(" AND ").join(where) if where else sql.SQL(""),
    )
    with conn.cursor() as cur:
        times, values, nulls = copy_out_columns(cur, query, args, len(columns))
    if not ordered and len(times) > 1 and not (times[1:] >= times[:-1]).all():
        idx = np.argsort(times, kind="stable")
        times, values, nulls = times[idx], values[:, idx], nulls[:, idx]
    return times, values, nulls


def check_queries(layout: Layout, pairs: Sequence[str]) -> list[tuple[str, str]]:
    """SQL a reader can run to check the targets, with what each shows (quoted as bqx runs
    it)."""
    if not pairs:
        return []
    total = sql.SQL("SELECT sum(n) AS total_rows FROM (\n  {}\n) t;").format(
        sql.SQL("\n  UNION ALL ").join(
            sql.SQL("SELECT count(*) AS n FROM {}").format(names.target(layout, p)) for p in pairs
        )
    )
    per_month = sql.SQL(
        "SELECT date_trunc('month', {ts}) AS month, count(*) FROM {} GROUP BY 1 ORDER BY 1;"
    ).format(names.target(layout, pairs[0]), ts=names.TS)
    parts = sql.SQL(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i"
        " JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = {} AND c.relname LIKE 'bqx\\_%' ORDER BY 1;"
    ).format(sql.Literal(layout.schema))
    return [
        ("exact rows over every pair of the run (count(*), not pg_stat estimates)",
         total.as_string(None)),
        ("exact rows per month of one pair", per_month.as_string(None)),
        ("partitions in the catalog with their bounds", parts.as_string(None)),
    ]  # fmt: skip


def lake_check_queries(sink: str) -> list[tuple[str, str]]:
    """SQL a reader can run with DuckDB (its delta extension) over a Delta sink."""
    where = "'" + sink.replace("'", "''") + "'"
    return [
        ("rows per pair and month in the Delta table (DuckDB: INSTALL delta; LOAD delta;)",
         "SELECT pair, month, count(*) FROM delta_scan(" + where + ")"  # noqa: S608 - quoted
         " GROUP BY ALL ORDER BY ALL;"),
    ]  # fmt: skip
