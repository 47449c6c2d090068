"""Store minute bars in ``m1_{pair}``: one transaction per month, through binary COPY.

Both the synthetic generator and the file ingester end here, so there is one way bars enter
the database. ``replace`` swaps a whole month (generate); ``merge`` upserts through a staging
table (ingest: re-loading a file changes nothing, overlapping files merge).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import psycopg
from psycopg import sql

from bqx.db import copy_in
from bqx.schema import (
    SOURCE_COLUMNS,
    Layout,
    Month,
    create_source_table,
    ensure_source_partition,
    record_source_version,
)


@dataclass
class LoadResult:
    """What a load did, per month and in total."""

    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    months: dict[str, int] = field(default_factory=dict)


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
    with conn.transaction():
        create_source_table(conn, layout, pair)
    result = LoadResult()
    cols = list(SOURCE_COLUMNS)
    cols[0] = layout.time_column
    for month, sl in month_slices(np.asarray(times)):
        n = sl.stop - sl.start
        with conn.transaction(), conn.cursor() as cur:
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
