"""Upsert through a staging table: COPY the rows in, then one ``INSERT … ON CONFLICT``.

Rows whose values are unchanged are not rewritten, so a re-load changes nothing and keeps
each row's ``created_at`` (for metrics) as it was.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import psycopg
from psycopg import sql

from bqx.db.copy import copy_in
from bqx.store import names


def stage_table(
    cur: psycopg.Cursor, name: str, like: sql.Composable | None = None,
    columns: Sequence[str] | None = None,
) -> sql.Identifier:  # fmt: skip
    """A session temp table emptied at commit: shaped like ``like``, or ``columns[0]``
    timestamptz and the rest float8."""
    ident = names.bare(name)
    if like is not None:
        body = sql.SQL("(LIKE {} INCLUDING DEFAULTS)").format(like)
    else:
        assert columns is not None
        defs = [sql.SQL("{} timestamptz NOT NULL").format(names.column(columns[0]))]
        defs += [sql.SQL("{} float8").format(names.column(c)) for c in columns[1:]]
        body = sql.SQL("({})").format(sql.SQL(", ").join(defs))
    cur.execute(
        sql.SQL("CREATE TEMP TABLE IF NOT EXISTS {} {} ON COMMIT DELETE ROWS").format(ident, body)
    )
    return ident


def upsert(
    cur: psycopg.Cursor, table: sql.Composable, stage: sql.Identifier, cols: Sequence[str],
    times: np.ndarray, values: np.ndarray, *, touch: str | None = None,
) -> tuple[int, int]:  # fmt: skip
    """COPY rows into ``stage``, then insert them into ``table`` keyed on ``cols[0]``; a row
    whose other values differ is updated (``touch``, a timestamp column, is set to now()).
    Returns (inserted, updated)."""
    copy_in(cur, stage, cols, times, values)
    idents = [names.column(c) for c in cols]
    others = idents[1:]
    sets = [sql.SQL("{c} = EXCLUDED.{c}").format(c=c) for c in others]
    if touch is not None:
        sets.append(sql.SQL("{} = now()").format(names.column(touch)))
    cur.execute(
        sql.SQL(
            "WITH up AS (INSERT INTO {table} AS d ({cols}) SELECT {cols} FROM {stage}"
            " ON CONFLICT ({key}) DO UPDATE SET {sets}"
            " WHERE ({dcols}) IS DISTINCT FROM ({ecols}) RETURNING d.xmax = 0 AS inserted)"
            " SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)"
            " FROM up"
        ).format(
            table=table,
            cols=sql.SQL(", ").join(idents),
            stage=stage,
            key=idents[0],
            sets=sql.SQL(", ").join(sets),
            dcols=sql.SQL(", ").join(sql.SQL("d.{}").format(c) for c in others),
            ecols=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(c) for c in others),
        )  # fmt: skip
    )
    row = cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1])
