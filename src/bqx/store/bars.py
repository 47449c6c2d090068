"""Source bars: stored (one transaction per month, through binary COPY), read, deleted.

Every writer of bars (generate, ingest, delete-bars) takes a month's advisory write lock
before touching it, one month per transaction or in month order, so two writers never
deadlock and never race on an empty month. Each write gives the month a new source version
in the same transaction (``bqx.store.versions``), and wakes ``bqx update --follow``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

import numpy as np
import psycopg
from psycopg import sql

from bqx.core.layout import SOURCE_COLUMNS, Layout
from bqx.core.months import Month
from bqx.core.params import Params
from bqx.db.copy import copy_in, copy_out_columns, select_series_with
from bqx.store import names
from bqx.store.catalog import has_source, has_target
from bqx.store.ddl import ensure_source, ensure_source_partition, lock_key
from bqx.store.upsert import stage_table, upsert
from bqx.store.versions import (
    LOOKBACK_FIRST,
    bar_hash,
    exact_signature,
    publish_counters,
    record_source_version,
)

CHANNEL = "bqx_bars"  # bqx's own loads NOTIFY here (payload: the pair) when they commit bars


@dataclass
class LoadResult:
    """What a load did, per month and in total."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    removed_flat: int = 0  # stored flat zero-volume bars removed (``flat``)
    months: dict[str, int] = field(default_factory=dict)


def source_month_key(layout: Layout, pair: str, month: Month) -> str:
    """The text whose ``hashtextextended`` is the advisory lock key of a pair's month."""
    schema, table = layout.source_name(pair)
    return f"bqx source {schema}.{table} {month}"


def lock_source_month(
    cur: psycopg.Cursor | psycopg.Connection, layout: Layout, pair: str, month: Month
) -> None:
    """Inside a transaction: wait for, then hold until commit, the write lock of a pair's month."""
    lock_key(cur, source_month_key(layout, pair, month))


def month_slices(times: np.ndarray) -> list[tuple[Month, slice]]:
    """Split sorted datetime64 times into per-month slices."""
    if len(times) == 0:
        return []
    months = times.astype("datetime64[M]")
    bounds = np.flatnonzero(months[1:] != months[:-1]) + 1
    starts = np.concatenate(([0], bounds))
    ends = np.concatenate((bounds, [len(times)]))
    out = []
    for lo, hi in zip(starts, ends, strict=True):
        y, m = str(months[lo]).split("-")
        out.append((Month(int(y), int(m)), slice(int(lo), int(hi))))
    return out


def load_bars(
    conn: psycopg.Connection,
    layout: Layout,
    pair: str,
    times: np.ndarray,
    ohlcv: np.ndarray,
    *,
    mode: Literal["replace", "merge"] = "merge",
    flat: np.ndarray | None = None,
) -> LoadResult:
    """Store bars: ``times`` sorted unique datetime64 UTC, ``ohlcv`` (n, 5), NaN volume = NULL.

    ``replace`` swaps each month whole (generate); ``merge`` upserts (ingest: re-loading a
    file changes nothing, overlapping files merge). ``flat``: times (datetime64) of flat
    zero-volume bars the input left out (``--drop-flat``); a stored bar at such a time that is
    flat with zero volume too, the same filler loaded earlier, is removed. Each month is its
    own transaction: an interruption leaves earlier months stored and the interrupted month as
    it was. ``conn`` must not be inside a transaction.
    """
    ohlcv = np.asarray(ohlcv, dtype=np.float64)
    if ohlcv.shape != (len(times), 5):
        raise ValueError(f"ohlcv must be shape ({len(times)}, 5), got {ohlcv.shape}")
    ensure_source(conn, layout, pair)
    result = LoadResult()
    times = np.asarray(times)
    flat = np.empty(0, "datetime64[us]") if flat is None else np.sort(np.asarray(flat))
    bars, filler = dict(month_slices(times)), dict(month_slices(flat))
    for month in sorted({*bars, *filler}):
        sl, fl = bars.get(month, slice(0, 0)), filler.get(month, slice(0, 0))
        with conn.transaction(), conn.cursor() as cur:
            lock_source_month(cur, layout, pair, month)
            removed = _remove_flat(cur, layout, pair, flat[fl]) if fl.stop > fl.start else 0
            if sl.stop > sl.start:
                write_month(cur, layout, pair, month, times[sl], ohlcv[sl], mode, result)
            elif removed:
                bars_written(cur, layout, pair, month)
        result.removed_flat += removed
        if sl.stop > sl.start:
            result.months[str(month)] = sl.stop - sl.start
    publish_counters(conn)
    return result


def write_month(
    cur: psycopg.Cursor, layout: Layout, pair: str, month: Month, times: np.ndarray,
    ohlcv: np.ndarray, mode: Literal["replace", "merge"], result: LoadResult,
) -> None:  # fmt: skip
    """Inside the transaction holding the month's write lock: store its bars, counted in
    ``result``, and give the month a new version."""
    n = len(times)
    cols = [layout.time_column, *SOURCE_COLUMNS[1:]]
    ensure_source_partition(cur.connection, layout, pair, month)
    part = names.source_partition(layout, pair, month)
    if mode == "replace":
        cur.execute(sql.SQL("TRUNCATE {}").format(part))
        copy_in(cur, part, cols, times, ohlcv)
        result.inserted += n
    elif not _has_rows(cur, part):
        copy_in(cur, part, cols, times, ohlcv)  # an empty month: no conflicts
        result.inserted += n
    else:
        stage = stage_table(cur, "bqx_stage_m1", like=part)
        ins, upd = upsert(cur, part, stage, cols, times, ohlcv)
        result.inserted += ins
        result.updated += upd
        result.unchanged += n - ins - upd
    bars_written(cur, layout, pair, month)


def bars_written(cur: psycopg.Cursor, layout: Layout, pair: str, month: Month) -> None:
    """In the transaction that wrote a month's bars: a new version for it (same transaction
    as the bars), and a wake-up for ``update --follow``."""
    cur.execute("SELECT pg_notify(%s, %s)", (CHANNEL, pair))
    record_source_version(cur, layout, pair, month)


def _remove_flat(cur: psycopg.Cursor, layout: Layout, pair: str, times: np.ndarray) -> int:
    """Delete the stored bars at ``times`` that are flat with zero volume; how many."""
    cur.execute(
        sql.SQL(
            "DELETE FROM {src} WHERE {t} = ANY(%s::timestamptz[]) AND open = high AND high = low"
            " AND low = close AND volume = 0"
        ).format(src=names.source(layout, pair), t=names.time(layout)),
        ([t.replace(tzinfo=UTC) for t in times.astype("datetime64[us]").tolist()],),
    )
    return cur.rowcount


def listen_for_bars(conn: psycopg.Connection) -> None:
    """Be woken (``conn.notifies()``) when bqx commits bars; the payload is the pair."""
    conn.execute(sql.SQL("LISTEN {}").format(names.bare(CHANNEL)))


def _has_rows(cur: psycopg.Cursor, table: sql.Composable) -> bool:
    row = cur.execute(sql.SQL("SELECT EXISTS (SELECT 1 FROM {})").format(table)).fetchone()
    return bool(row and row[0])


# -- reading ------------------------------------------------------------------------------


def read_series(
    cur: psycopg.Cursor, params: Params, pair: str, since: datetime, until: datetime,
    *, signed: bool = True,
) -> tuple[np.ndarray, np.ndarray, str | None]:  # fmt: skip
    """Bars in [since, until) plus the lookback the first of them needs, crossing month
    boundaries: in bars mode the first bar read is found by a subquery (the W_max-th bar
    before ``since``, however long ago; all of them if fewer). Also the exact signature of
    every bar read (``versions.exact_signature``), from the same scan.

    Bars mode looks ``LOOKBACK_FIRST`` back first: without a constant lower bound the server
    plans, and locks, every partition before ``since`` (240 for the last month of 20 years).
    Only when that finds fewer than W_max bars before ``since`` (the start of the history, or
    a longer gap) is the unbounded statement run; both give the same bars."""
    h, at = bar_hash(sql.SQL("s.t"), sql.SQL("s.p")), sql.Literal(since)
    # not signed: a reader that only computes (verify) spends no server time on the hash
    extra = None if not signed else sql.SQL(
        "count(*) FILTER (WHERE s.t >= {at}), (sum({h}) FILTER (WHERE s.t >= {at}))::text,"
        " count(*) FILTER (WHERE s.t < {at}), (sum({h}) FILTER (WHERE s.t < {at}))::text"
    ).format(h=h, at=at)  # fmt: skip
    if params.mode == "bars":
        floor = since - LOOKBACK_FIRST
        times, prices, parts = _read_bars_mode(cur, params, pair, since, until, floor, extra)
        if int((times < np.datetime64(_naive_utc(since), "us")).sum()) < params.lookback_bars:
            times, prices, parts = _read_bars_mode(cur, params, pair, since, until, None, extra)
    else:
        layout = params.layout
        src, t, p = names.source(layout, pair), names.time(layout), names.price(layout)
        lo = since - timedelta(minutes=params.lookback_minutes)
        q = sql.SQL("SELECT {t}::timestamptz, {p}::float8 FROM {src} WHERE {t} >= %s AND {t} < %s")
        times, prices, parts = select_series_with(cur, q.format(t=t, p=p, src=src), [lo, until],
                                                  extra)  # fmt: skip
    return times, prices, exact_signature(*parts) if signed else None


def _naive_utc(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(tzinfo=None) if t.tzinfo is not None else t


def _read_bars_mode(
    cur: psycopg.Cursor, params: Params, pair: str, since: datetime, until: datetime,
    floor: datetime | None, extra: sql.Composable | None,
) -> tuple[np.ndarray, np.ndarray, tuple[Any, ...]]:  # fmt: skip
    """Bars in [since, until) and the W_max before ``since``, none older than ``floor``."""
    layout = params.layout
    src, t, p = names.source(layout, pair), names.time(layout), names.price(layout)
    bound = sql.SQL("") if floor is None else sql.SQL(" AND {t} >= %s").format(t=t)
    q = sql.SQL(
        "SELECT {t}::timestamptz, {p}::float8 FROM {src} WHERE {t} < %s{bound}"
        " AND {t} >= coalesce((SELECT {t} FROM {src} WHERE {t} < %s{bound}"
        " ORDER BY {t} DESC OFFSET %s LIMIT 1), '-infinity')"
    ).format(t=t, p=p, src=src, bound=bound)
    floors = [] if floor is None else [floor]
    args = [until, *floors, since, *floors, params.lookback_bars - 1]
    return select_series_with(cur, q, args, extra)


def null_bar_message(cur: psycopg.Cursor, params: Params, pair: str, until: datetime) -> str:
    """Find a bar with a NULL time or price among those before ``until``, and name it."""
    layout = params.layout
    t, p, src = names.time(layout), names.price(layout), names.source(layout, pair)
    row = cur.execute(
        sql.SQL(
            "SELECT {t}::text, {p}::text FROM {src} WHERE ({t} IS NULL OR {p} IS NULL)"
            " AND ({t} IS NULL OR {t} < %s) ORDER BY {t} DESC NULLS FIRST LIMIT 1"
        ).format(t=t, p=p, src=src),
        (until,),
    ).fetchone()
    shown = names.as_text(src)
    if row is None:
        return f"{pair.upper()}: the source bars could not be read (unexpected COPY stream)"
    if row[0] is None:
        return f"bad source bar: {pair.upper()} has a bar with a NULL time in {shown}"
    return f"bad source bar: {pair.upper()} at {row[0]} has a NULL price in {shown}"


def bar_bounds(
    conn: psycopg.Connection, layout: Layout, pair: str
) -> tuple[datetime | None, datetime | None]:
    """(first, newest) bar time of a pair: index look-ups, no scan."""
    row = conn.execute(
        sql.SQL("SELECT min({t})::timestamptz, max({t})::timestamptz FROM {src}").format(
            t=names.time(layout), src=names.source(layout, pair)
        )
    ).fetchone()
    return (row[0], row[1]) if row else (None, None)


def newest_bar(conn: psycopg.Connection, layout: Layout, pair: str) -> datetime | None:
    """The newest bar's time of a pair: one index look-up in its newest partition."""
    row = conn.execute(
        sql.SQL("SELECT max({t})::timestamptz FROM {src}").format(
            t=names.time(layout), src=names.source(layout, pair)
        )
    ).fetchone()
    return row[0] if row else None


def level_near(conn: psycopg.Connection, layout: Layout, pair: str, month: Month) -> float | None:
    """The median close of a few thousand bars near ``month`` (None when there are none).

    A level, not a statistic: read off the time index, so a month costs a millisecond.
    """
    if not has_source(conn, layout, pair):
        return None
    row = conn.execute(
        sql.SQL(
            "SELECT percentile_cont(0.5) WITHIN GROUP (ORDER BY c) FROM"
            " (SELECT {c} AS c FROM {src} WHERE {t} >= %s AND {t} < %s LIMIT 2000) s"
        ).format(src=names.source(layout, pair), c=names.column("close"), t=names.time(layout)),
        (month.start - timedelta(days=31), month.end + timedelta(days=31)),
    ).fetchone()
    if row is None or row[0] is None or row[0] <= 0:
        return None
    return float(row[0])


def read_hlv(
    conn: psycopg.Connection, layout: Layout, pair: str, lo: Any, hi: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(times, [high, low, volume]) of the source bars in [lo, hi), NaN where NULL."""
    return _read_columns(conn, layout, pair, lo, hi, ("high", "low", "volume"))


def read_ohlcv(
    conn: psycopg.Connection, layout: Layout, pair: str, lo: Any, hi: Any
) -> tuple[np.ndarray, np.ndarray]:
    """(times, [open, high, low, close, volume]) of the source bars in [lo, hi), NaN where
    NULL (``bqx export --bars``)."""
    return _read_columns(conn, layout, pair, lo, hi, ("open", "high", "low", "close", "volume"))


def _read_columns(
    conn: psycopg.Connection, layout: Layout, pair: str, lo: Any, hi: Any,
    columns: Sequence[str],
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    q = sql.SQL("SELECT {t}, {cols} FROM {src} WHERE {t} >= %s AND {t} < %s ORDER BY {t}").format(
        t=names.time(layout),
        cols=sql.SQL(", ").join(sql.SQL("{}::float8").format(names.column(c)) for c in columns),
        src=names.source(layout, pair),
    )
    with conn.cursor() as cur:
        times, values, _ = copy_out_columns(cur, q, [lo, hi], len(columns))
    return times, values


def month_counts(conn: psycopg.Connection, layout: Layout, pair: str) -> dict[Month, int]:
    """Exact bars per month of a pair (``count(*)``)."""
    q = sql.SQL("SELECT date_trunc('month', {t})::date, count(*) FROM {src} GROUP BY 1").format(
        t=names.time(layout), src=names.source(layout, pair)
    )
    return {Month.of(m): int(n) for m, n in conn.execute(q)}


# -- deleting -----------------------------------------------------------------------------


def bars_in_range(
    conn: psycopg.Connection, layout: Layout, pair: str, start: datetime, end: datetime
) -> dict[str, int]:
    """Bars per month (``YYYY-MM`` -> count) of a pair with ``start <= time < end``."""
    if not has_source(conn, layout, pair):
        return {}
    rows = conn.execute(
        sql.SQL(
            "SELECT to_char({t} AT TIME ZONE 'UTC', 'YYYY-MM'), count(*) FROM {src}"
            " WHERE {t} >= %s AND {t} < %s GROUP BY 1 ORDER BY 1"
        ).format(t=names.time(layout), src=names.source(layout, pair)),
        (start, end),
    ).fetchall()
    return {m: int(n) for m, n in rows}


@dataclass
class DeleteResult:
    """What ``delete_bars`` removed."""

    months: dict[str, int] = field(default_factory=dict)  # bars deleted per month
    emptied: list[str] = field(default_factory=list)  # months left without any bar
    metric_rows: int = 0  # target rows of the deleted bars

    @property
    def bars(self) -> int:
        return sum(self.months.values())

    def as_dict(self) -> dict[str, Any]:
        return {"deleted": self.bars, "months": self.months, "emptied_months": self.emptied,
                "metric_rows": self.metric_rows}  # fmt: skip

    def text(self) -> str:
        rows = f" and {self.metric_rows:,} metric rows" if self.metric_rows else ""
        return (
            f"deleted {self.bars:,} bars{rows}; run `bqx backfill` to redo the months they touched"
        )


def delete_bars(
    cur: psycopg.Cursor, layout: Layout, pair: str, start: datetime, end: datetime
) -> DeleteResult:
    """Inside the caller's transaction: delete a pair's bars with ``start <= time < end``, and
    the metric rows of those bars. The months' write locks are taken in month order first."""
    result = DeleteResult()
    conn = cur.connection
    t, src = names.time(layout), names.source(layout, pair)
    for m in bars_in_range(conn, layout, pair, start, end):
        lock_source_month(cur, layout, pair, Month.parse(m))
    rows = cur.execute(
        sql.SQL(
            "WITH gone AS (DELETE FROM {src} WHERE {t} >= %s AND {t} < %s RETURNING {t})"
            " SELECT to_char({t} AT TIME ZONE 'UTC', 'YYYY-MM'), count(*) FROM gone"
            " GROUP BY 1 ORDER BY 1"
        ).format(t=t, src=src),
        (start, end),
    ).fetchall()
    result.months = {m: int(n) for m, n in rows}
    for m in result.months:
        month = Month.parse(m)
        left = cur.execute(
            sql.SQL("SELECT EXISTS (SELECT 1 FROM {src} WHERE {t} >= %s AND {t} < %s)").format(
                t=t, src=src
            ),
            (month.start, month.end),
        ).fetchone()
        if not (left and left[0]):
            result.emptied.append(m)
    if has_target(conn, layout, pair):
        cur.execute(
            sql.SQL("DELETE FROM {} WHERE {ts} >= %s AND {ts} < %s").format(
                names.target(layout, pair), ts=names.TS
            ),
            (start, end),
        )
        result.metric_rows = cur.rowcount
    return result
