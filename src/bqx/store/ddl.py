"""Schema, source and target tables, and their monthly partitions; all idempotent.

DDL in a schema is serialised by an advisory lock: ``CREATE … IF NOT EXISTS`` is not safe
against itself (two first runs at once can both find a table missing, and one then fails on
a duplicate catalog key).
"""

from __future__ import annotations

from collections.abc import Sequence

import psycopg
from psycopg import sql

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.errors import BqxError
from bqx.metrics import metric_columns
from bqx.store import names


def lock_schema_ddl(conn: psycopg.Connection, layout: Layout) -> None:
    """Serialise bqx's DDL in a schema until the transaction ends."""
    conn.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (f"bqx-ddl:{layout.schema}",)
    )


def lock_key(conn: psycopg.Connection | psycopg.Cursor, key: str) -> None:
    """Inside a transaction: wait for, then hold until commit, the advisory lock of ``key``."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (key,))


def create_schema(conn: psycopg.Connection, schema: str) -> None:
    # only when missing: even with IF NOT EXISTS, CREATE SCHEMA needs CREATE on the database,
    # which a least-privilege role lacks (docs/privileges.md)
    found = "SELECT 1 FROM pg_namespace WHERE nspname = %s"
    if conn.execute(found, (schema,)).fetchone() is None:
        conn.execute(sql.SQL("CREATE SCHEMA IF NOT EXISTS {}").format(names.bare(schema)))


def create_source_table(conn: psycopg.Connection, layout: Layout, pair: str) -> None:
    """``m1_{pair}``: minute bars, range-partitioned by month on the time column."""
    create_schema(conn, layout.source_name(pair)[0])
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} ("
            " {time} timestamptz NOT NULL PRIMARY KEY,"
            # open, high and low may be NULL: close-only sources (docs/ingest.md)
            " open double precision, high double precision,"
            " low double precision, close double precision NOT NULL,"
            " volume double precision"
            ") PARTITION BY RANGE ({time})"
        ).format(t=names.source(layout, pair), time=names.time(layout))
    )


def create_target_table(
    conn: psycopg.Connection, layout: Layout, pair: str, windows: Sequence[int]
) -> None:
    """``bqx_{pair}``: one row per source bar, PK ``ts_utc`` (also its only time index)."""
    create_schema(conn, layout.schema)
    metric_defs = sql.SQL(", ").join(
        sql.SQL("{} double precision").format(names.column(c)) for c in metric_columns(windows)
    )
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {t} ("
            " {ts} timestamptz NOT NULL,"
            " {rate} double precision NOT NULL,"
            " created_at timestamptz NOT NULL DEFAULT now(),"
            " {metrics},"
            " PRIMARY KEY ({ts})"
            ") PARTITION BY RANGE ({ts})"
        ).format(t=names.target(layout, pair), metrics=metric_defs, ts=names.TS, rate=names.RATE)
    )


def _ensure_partition(
    conn: psycopg.Connection, parent: sql.Identifier, part: sql.Identifier, month: Month
) -> None:
    conn.execute(
        sql.SQL(
            "CREATE TABLE IF NOT EXISTS {part} PARTITION OF {parent}"
            " FOR VALUES FROM ({lo}) TO ({hi})"
        ).format(
            part=part,
            parent=parent,
            lo=sql.Literal(month.start.isoformat()),
            hi=sql.Literal(month.end.isoformat()),
        )  # fmt: skip
    )


def ensure_source_partition(
    conn: psycopg.Connection, layout: Layout, pair: str, month: Month
) -> None:
    _ensure_partition(
        conn, names.source(layout, pair), names.source_partition(layout, pair, month), month
    )


def ensure_target_partition(
    conn: psycopg.Connection, layout: Layout, pair: str, month: Month
) -> None:
    _ensure_partition(
        conn, names.target(layout, pair), names.target_partition(layout, pair, month), month
    )


def ensure_source(
    conn: psycopg.Connection, layout: Layout, pair: str, months: Sequence[Month] = ()
) -> None:
    """Create a pair's source table and month partitions, serialised between writers.

    Concurrent ``CREATE TABLE IF NOT EXISTS`` of one table can fail on the catalog's unique
    index, so the DDL runs under a per-table advisory lock. ``conn`` must not be in a
    transaction.
    """
    schema, table = layout.source_name(pair)
    with conn.transaction():
        lock_key(conn, f"bqx source {schema}.{table} ddl")
        create_source_table(conn, layout, pair)
        for month in months:
            ensure_source_partition(conn, layout, pair, month)


def pair_tables(conn: psycopg.Connection, layout: Layout, pair: str) -> dict[str, tuple[int, int]]:
    """A pair's source and target tables that exist: name -> (partitions, bytes on disk)."""
    out: dict[str, tuple[int, int]] = {}
    for ident in (names.source(layout, pair), names.target(layout, pair)):
        row = conn.execute(
            "SELECT to_regclass(%s) IS NOT NULL, (SELECT count(*) FROM pg_inherits"
            "  WHERE inhparent = to_regclass(%s)), coalesce((SELECT sum(pg_total_relation_size"
            "  (inhrelid)) FROM pg_inherits WHERE inhparent = to_regclass(%s)), 0)"
            " + coalesce(pg_total_relation_size(to_regclass(%s)), 0)",
            (names.as_text(ident),) * 4,
        ).fetchone()
        if row is not None and row[0]:
            out[names.as_text(ident)] = (int(row[1]), int(row[2]))
    return out


def drop_pair_tables(cur: psycopg.Cursor, layout: Layout, pair: str) -> list[str]:
    """Inside the caller's transaction: drop a pair's source and target tables, their monthly
    partitions and triggers with them; the names dropped. Waits at most 10 s for a session
    that reads or writes them."""
    cur.execute("SET LOCAL lock_timeout = '10s'")
    dropped = []
    for ident in (names.source(layout, pair), names.target(layout, pair)):
        found = cur.execute("SELECT to_regclass(%s)", (names.as_text(ident),)).fetchone()
        if found is None or found[0] is None:
            continue
        try:
            cur.execute(sql.SQL("DROP TABLE {}").format(ident))
        except psycopg.errors.LockNotAvailable:
            raise BqxError(
                f"{names.as_text(ident)} is in use by another session (a reader or a writer):"
                " nothing dropped; try again when it ends"
            ) from None
        except psycopg.errors.DependentObjectsStillExist as exc:
            detail = (exc.diag.message_detail or "").splitlines()
            raise BqxError(
                f"{names.as_text(ident)}: other objects depend on it"
                f" ({detail[0] if detail else exc.diag.message_primary}): nothing dropped"
            ) from None
        dropped.append(names.as_text(ident))
    return dropped
