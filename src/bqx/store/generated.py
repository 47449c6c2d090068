"""Which source months hold exactly the bars ``bqx generate`` wrote.

When generate writes a month it records, in the same transaction, the seed, a digest of the
bars and the month's source version right after the write (``bqx_generated_months`` in the
source schema). A month is still generate's own while its version is that one: any later
write (an ingest, ``delete-bars``, plain SQL) gives it a new version (``bqx.store.versions``).
So generate can refuse months holding bars it did not write, and leave untouched a month that
already holds the bars it would write, at the cost of a few queries per pair.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import psycopg
from psycopg import sql

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.store import names
from bqx.store.bars import LoadResult, bars_in_range, lock_source_month, write_month
from bqx.store.catalog import has_source
from bqx.store.ddl import lock_key
from bqx.store.versions import SOURCE_VERSIONS, month_versions, publish_counters

GENERATED = "bqx_generated_months"

_DDL = """
CREATE TABLE IF NOT EXISTS {t} (
    source_table text NOT NULL,
    month        date NOT NULL,
    seed         bigint NOT NULL,
    digest       text NOT NULL,          -- of the bars written
    version      bigint NOT NULL,        -- the month's source version right after the write
    generated_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source_table, month)
)
"""


@dataclass(frozen=True)
class MonthState:
    """A source month as generate finds it."""

    bars: bool  # holds bars
    digest: str | None  # of the bars generate wrote, while the month is as it left it

    @property
    def foreign(self) -> bool:
        """Holds bars that generate did not write (or that changed since)."""
        return self.bars and self.digest is None


def month_states(
    conn: psycopg.Connection, layout: Layout, pair: str, months: Sequence[Month]
) -> dict[Month, MonthState]:
    """Each month's state: a query for its bars (through the time index), the records and
    the versions, per pair."""
    if not has_source(conn, layout, pair):
        return {m: MonthState(False, None) for m in months}
    rows = conn.execute(
        sql.SQL(
            "SELECT b.lo, EXISTS (SELECT 1 FROM {src} WHERE {t} >= b.lo AND {t} < b.hi)"
            " FROM unnest(%s::timestamptz[], %s::timestamptz[]) AS b(lo, hi)"
        ).format(src=names.source(layout, pair), t=names.time(layout)),
        ([m.start for m in months], [m.end for m in months]),
    ).fetchall()
    has_bars = {Month.of(lo): bool(found) for lo, found in rows}
    records = _records(conn, layout, pair)
    versions = month_versions(conn, layout, pair)
    out = {}
    for m in months:
        digest, version = records.get(m, (None, None))
        current = versions.get(m, -1)
        ours = digest is not None and current >= 0 and version == current
        out[m] = MonthState(has_bars[m], digest if ours else None)
    return out


def _records(conn: psycopg.Connection, layout: Layout, pair: str) -> dict[Month, tuple[str, int]]:
    schema, table = layout.source_name(pair)
    ident = names.in_schema(schema, GENERATED)
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (ident.as_string(conn),)).fetchone()
    if not (row and row[0]):
        return {}
    q = sql.SQL("SELECT month, digest, version FROM {} WHERE source_table = %s").format(ident)
    return {Month.of(m): (d, int(v)) for m, d, v in conn.execute(q, (table,))}


def foreign_bars(
    conn: psycopg.Connection, layout: Layout, pair: str, months: Sequence[Month]
) -> dict[Month, int]:
    """Months holding bars that generate did not write, with their bar counts."""
    states = month_states(conn, layout, pair, months)
    out = {}
    for m in months:
        if states[m].foreign:
            out[m] = sum(bars_in_range(conn, layout, pair, m.start, m.end).values())
    return out


def store_generated_month(
    conn: psycopg.Connection, layout: Layout, pair: str, month: Month, times: np.ndarray,
    ohlcv: np.ndarray, *, seed: int, digest: str, replace: bool,
) -> str:  # fmt: skip
    """Write a month of generated bars in one transaction under the month's write lock:
    ``unchanged`` when the month already holds exactly these bars as generate left them
    (nothing written, no new version), ``written``, or ``replaced`` (bars generate did not
    write were overwritten, as ``replace`` allows); ``foreign`` (nothing written) when such
    bars arrived since the caller checked and ``replace`` is not given."""
    with conn.transaction(), conn.cursor() as cur:
        lock_source_month(cur, layout, pair, month)
        state = month_states(conn, layout, pair, [month])[month]
        if state.digest == digest:
            return "unchanged"
        if state.foreign and not replace:
            return "foreign"
        write_month(cur, layout, pair, month, times, ohlcv, "replace", LoadResult())
        _record(cur, layout, pair, month, seed, digest)
    publish_counters(conn)
    return "replaced" if state.foreign else "written"


def _record(
    cur: psycopg.Cursor, layout: Layout, pair: str, month: Month, seed: int, digest: str
) -> None:
    """In the writing transaction, after the month's new version: remember what was written."""
    schema, table = layout.source_name(pair)
    ident = names.in_schema(schema, GENERATED)
    row = cur.execute("SELECT to_regclass(%s) IS NOT NULL", (ident.as_string(cur),)).fetchone()
    if not (row and row[0]):
        lock_key(cur, names.as_text(ident))  # concurrent first writes would race on CREATE
        cur.execute(sql.SQL(_DDL).format(t=ident))
    cur.execute(
        sql.SQL(
            "INSERT INTO {t} (source_table, month, seed, digest, version)"
            " SELECT %s, %s, %s, %s, version FROM {v} WHERE source_table = %s AND month = %s"
            " ON CONFLICT (source_table, month) DO UPDATE SET seed = EXCLUDED.seed,"
            " digest = EXCLUDED.digest, version = EXCLUDED.version, generated_at = now()"
        ).format(t=ident, v=names.in_schema(schema, SOURCE_VERSIONS)),
        (table, month.first_day, seed, digest, table, month.first_day),
    )
