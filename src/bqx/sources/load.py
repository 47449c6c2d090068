"""Store minute bars in ``m1_{pair}``: one transaction per month, through binary COPY.

Both the synthetic generator and the file ingester end here, so there is one way bars enter
the database. ``replace`` swaps a whole month (generate); ``merge`` upserts through a staging
table (ingest: re-loading a file changes nothing, overlapping files merge).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Literal

import numpy as np
import psycopg
from psycopg import sql

from bqx.db import copy_in
from bqx.errors import BqxError
from bqx.schema import (
    LEDGER_JOBS,
    SOURCE_COLUMNS,
    Layout,
    Month,
    create_source_table,
    ensure_source_partition,
    record_source_version,
    table_columns,
    validate_pair,
)


@dataclass
class LoadResult:
    """What a load did, per month and in total."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    months: dict[str, int] = field(default_factory=dict)


def _lock(cur: psycopg.Cursor | psycopg.Connection, key: str) -> None:
    cur.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))


def lock_source_month(
    cur: psycopg.Cursor | psycopg.Connection, layout: Layout, pair: str, month: Month
) -> None:
    """Inside a transaction: wait for, then hold until commit, the write lock of a pair's month.

    Every writer of source bars (ingest, generate, delete-bars) takes it before touching a
    month, one month per transaction or in month order, so two writers never deadlock and
    never race on an empty month (two plain COPYs into it would collide on the key).
    """
    _lock(cur, source_month_key(layout, pair, month))


def source_month_key(layout: Layout, pair: str, month: Month) -> str:
    """The text whose ``hashtextextended`` is the advisory lock key of a pair's month."""
    schema, table = layout.source_name(pair)
    return f"bqx source {schema}.{table} {month}"


def ensure_source(
    conn: psycopg.Connection, layout: Layout, pair: str, months: Iterable[Month] = ()
) -> None:
    """Create a pair's source table and month partitions, serialised between writers.

    Concurrent ``CREATE TABLE IF NOT EXISTS`` of one table can fail on the catalog's unique
    index, so the DDL runs under a per-table advisory lock. ``conn`` must not be in a
    transaction.
    """
    schema, table = layout.source_name(pair)
    with conn.transaction():
        _lock(conn, f"bqx source {schema}.{table} ddl")
        create_source_table(conn, layout, pair)
        for month in months:
            ensure_source_partition(conn, layout, pair, month)


def check_nullable(conn: psycopg.Connection, layout: Layout, pair: str, columns: list[str]) -> None:
    """Refuse NULLs for ``columns`` in a source table that declares them NOT NULL.

    Tables created by older bqx versions have open, high and low NOT NULL; a close-only file
    cannot go there. The table is not altered behind the user's back: the message gives the
    statement that allows it.
    """
    schema, table = layout.source_name(pair)
    rows = conn.execute(
        "SELECT a.attname FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
        " AND c.relname = %s AND a.attname = ANY(%s) AND a.attnotnull AND NOT a.attisdropped",
        (schema, table, columns),
    ).fetchall()
    strict = [c for c in columns if (c,) in rows]
    if strict:
        alter = ", ".join(f"ALTER COLUMN {c} DROP NOT NULL" for c in strict)
        raise BqxError(
            f"source table {schema}.{table} requires {', '.join(strict)} (NOT NULL) but the input"
            f" has no {'/'.join(strict)} column: allow NULLs with"
            f" `ALTER TABLE {schema}.{table} {alter}` (see docs/ingest.md), or map the columns"
            " with --columns"
        )


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
) -> LoadResult:
    """Store bars: ``times`` sorted unique datetime64 UTC, ``ohlcv`` (n, 5), NaN volume = NULL.

    Each month is its own transaction: an interruption leaves earlier months stored and the
    interrupted month as it was. ``conn`` must not be inside a transaction.
    """
    ohlcv = np.asarray(ohlcv, dtype=np.float64)
    if ohlcv.shape != (len(times), 5):
        raise ValueError(f"ohlcv must be shape ({len(times)}, 5), got {ohlcv.shape}")
    ensure_source(conn, layout, pair)
    result = LoadResult()
    cols = list(SOURCE_COLUMNS)
    cols[0] = layout.time_column
    for month, sl in month_slices(np.asarray(times)):
        n = sl.stop - sl.start
        with conn.transaction(), conn.cursor() as cur:
            lock_source_month(cur, layout, pair, month)
            ensure_source_partition(conn, layout, pair, month)
            part = layout.source_partition(pair, month)
            if mode == "replace":
                cur.execute(sql.SQL("TRUNCATE {}").format(part))
                copy_in(cur, part, cols, times[sl], ohlcv[sl])
                result.inserted += n
            elif cur.execute(
                sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(part)
            ).fetchone()[0]:
                copy_in(cur, part, cols, times[sl], ohlcv[sl])  # an empty month: no conflicts
                result.inserted += n
            else:
                ins, upd = _merge(cur, layout, part, cols, times[sl], ohlcv[sl])
                result.inserted += ins
                result.updated += upd
                result.unchanged += n - ins - upd
            cur.execute("SELECT pg_notify('bqx_bars', %s)", (pair,))  # wakes `bqx update --follow`
            record_source_version(cur, layout, pair, month)  # same transaction as the bars
        result.months[str(month)] = n
    return result


def _merge(
    cur: psycopg.Cursor,
    layout: Layout,
    part: sql.Identifier,
    cols: list[str],
    times: np.ndarray,
    ohlcv: np.ndarray,
) -> tuple[int, int]:
    """Upsert through a temp staging table; rows whose values are unchanged are not rewritten."""
    cur.execute(
        sql.SQL(
            "CREATE TEMP TABLE IF NOT EXISTS bqx_stage_m1 (LIKE {} INCLUDING DEFAULTS)"
            " ON COMMIT DELETE ROWS"
        ).format(part)
    )
    stage = sql.Identifier("bqx_stage_m1")
    copy_in(cur, stage, cols, times, ohlcv)
    idents = [sql.Identifier(c) for c in cols]
    t = idents[0]
    others = idents[1:]
    cur.execute(
        sql.SQL(
            "WITH up AS ("
            " INSERT INTO {part} AS d ({cols}) SELECT {cols} FROM {stage}"
            " ON CONFLICT ({t}) DO UPDATE SET {sets}"
            " WHERE ({dcols}) IS DISTINCT FROM ({ecols})"
            " RETURNING (xmax = 0) AS inserted)"
            " SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM up"
        ).format(
            part=part,
            cols=sql.SQL(", ").join(idents),
            stage=stage,
            t=t,
            sets=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=c) for c in others),
            dcols=sql.SQL(", ").join(sql.SQL("d.{}").format(c) for c in others),
            ecols=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(c) for c in others),
        )
    )
    inserted, updated = cur.fetchone()
    return int(inserted), int(updated)


# -- undoing an ingest ---------------------------------------------------------------------


def parse_bound(text: str, option: str, *, end: bool = False) -> datetime:
    """A range bound: ISO 8601 time (UTC unless it has an offset) or a month ``YYYY-MM``.

    A month as an end bound means the end of that month, so ``--start 2024-07 --end 2024-08``
    covers July and August.
    """
    text = text.strip()
    if re.fullmatch(r"\d{4}-\d{1,2}", text):
        month = Month.parse(text)
        return month.end if end else month.start
    try:
        t = datetime.fromisoformat(text.replace("z", "Z").replace("Z", "+00:00"))
    except ValueError:
        raise BqxError(
            f"invalid {option} {text!r}: give a time such as 2024-07-01T00:00 (UTC unless it"
            " has an offset) or a month such as 2024-07"
        ) from None
    return t.replace(tzinfo=UTC) if t.tzinfo is None else t.astimezone(UTC)


def bars_in_range(
    conn: psycopg.Connection, layout: Layout, pair: str, start: datetime, end: datetime
) -> dict[str, int]:
    """Bars per month (``YYYY-MM`` -> count) of a pair with ``start <= time < end``."""
    schema, table = layout.source_name(pair)
    if table_columns(conn, schema, table) is None:
        return {}
    rows = conn.execute(
        sql.SQL(
            "SELECT to_char({t} AT TIME ZONE 'UTC', 'YYYY-MM'), count(*) FROM {src}"
            " WHERE {t} >= %s AND {t} < %s GROUP BY 1 ORDER BY 1"
        ).format(t=layout.time, src=layout.source(pair)),
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


def delete_bars(
    conn: psycopg.Connection, layout: Layout, pair: str, start: datetime, end: datetime
) -> DeleteResult:
    """Delete a pair's bars with ``start <= time < end`` in one transaction.

    The months' write locks are taken in month order first. The metrics of the deleted bars
    go too; a month left without bars also loses its ledger job, so nothing reports it as
    done. Months that keep bars have a new source signature and the next backfill redoes them
    (and the month after, whose lookback reads them). ``conn`` must not be in a transaction.
    """
    pair = validate_pair(pair)
    result = DeleteResult()
    schema, table = layout.source_name(pair)
    if table_columns(conn, schema, table) is None:
        return result
    with conn.transaction(), conn.cursor() as cur:
        for m in bars_in_range(conn, layout, pair, start, end):
            lock_source_month(cur, layout, pair, Month.parse(m))
        rows = cur.execute(
            sql.SQL(
                "WITH gone AS (DELETE FROM {src} WHERE {t} >= %s AND {t} < %s RETURNING {t})"
                " SELECT to_char({t} AT TIME ZONE 'UTC', 'YYYY-MM'), count(*) FROM gone"
                " GROUP BY 1 ORDER BY 1"
            ).format(t=layout.time, src=layout.source(pair)),
            (start, end),
        ).fetchall()
        result.months = {m: int(n) for m, n in rows}
        for m in result.months:
            month = Month.parse(m)
            left = cur.execute(
                sql.SQL("SELECT EXISTS (SELECT 1 FROM {src} WHERE {t} >= %s AND {t} < %s)").format(
                    t=layout.time, src=layout.source(pair)
                ),
                (month.start, month.end),
            ).fetchone()[0]
            if not left:
                result.emptied.append(m)
        if table_columns(conn, layout.schema, layout.target_name(pair)) is not None:
            cur.execute(
                sql.SQL("DELETE FROM {} WHERE ts_utc >= %s AND ts_utc < %s").format(
                    layout.target(pair)
                ),
                (start, end),
            )
            result.metric_rows = cur.rowcount
        if result.emptied and table_columns(conn, layout.schema, LEDGER_JOBS) is not None:
            cur.execute(
                sql.SQL("DELETE FROM {} WHERE pair = %s AND month = ANY(%s)").format(
                    layout.table(LEDGER_JOBS)
                ),
                (pair, [Month.parse(m).first_day for m in result.emptied]),
            )
    return result
