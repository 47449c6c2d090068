"""What exists in the database, read from the catalog: tables, columns, partitions, keys.

These reads take no lock on user tables, so planning and status never wait behind a writer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime

import psycopg
from psycopg import sql

from bqx.core.layout import Layout, target_columns
from bqx.core.months import Month
from bqx.core.symbols import is_pair
from bqx.errors import BqxError
from bqx.metrics import normalize_windows
from bqx.store import names

_TIME_TYPES = ("timestamp with time zone", "timestamp without time zone")
_NUMERIC_PREFIXES = ("double precision", "real", "numeric", "integer", "bigint", "smallint")


def table_columns(conn: psycopg.Connection, schema: str, table: str) -> dict[str, str] | None:
    """Column name -> type of a table, or None if the table does not exist."""
    rows = conn.execute(
        "SELECT a.attname, format_type(a.atttypid, a.atttypmod)"
        " FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = %s AND a.attnum > 0 AND NOT a.attisdropped"
        " ORDER BY a.attnum",
        (schema, table),
    ).fetchall()
    return {name: typ for name, typ in rows} if rows else None


def exists(conn: psycopg.Connection, ident: sql.Identifier) -> bool:
    """Whether the table (or other relation) named by ``ident`` exists."""
    row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (names.as_text(ident),)).fetchone()
    return bool(row and row[0])


def has_source(conn: psycopg.Connection, layout: Layout, pair: str) -> bool:
    return table_columns(conn, *layout.source_name(pair)) is not None


def has_target(conn: psycopg.Connection, layout: Layout, pair: str) -> bool:
    return table_columns(conn, layout.schema, layout.target_name(pair)) is not None


def _pairs_by_pattern(conn: psycopg.Connection, schema: str, prefix: str, suffix: str) -> list[str]:
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relkind IN ('r', 'p', 'v', 'm', 'f')"
        " AND NOT c.relispartition",
        (schema,),
    ).fetchall()
    pairs = []
    for (name,) in rows:
        if name.startswith(prefix) and name.endswith(suffix):
            core = name[len(prefix) : len(name) - len(suffix)]
            if is_pair(core):
                pairs.append(core)
    return sorted(pairs)


def source_pairs(conn: psycopg.Connection, layout: Layout) -> list[str]:
    """Pairs that have a source table matching the pattern (partitions excluded)."""
    return _pairs_by_pattern(conn, layout.source_schema(), *layout.source_affixes())


def target_pairs(conn: psycopg.Connection, layout: Layout) -> list[str]:
    """Pairs that have a metrics table ``bqx_{pair}`` in the schema."""
    return _pairs_by_pattern(conn, layout.schema, "bqx_", "")


def check_source(conn: psycopg.Connection, layout: Layout, pair: str) -> None:
    """Refuse a missing source table, or one without a usable time and price column."""
    schema, table = layout.source_name(pair)
    cols = table_columns(conn, schema, table)
    if cols is None:
        raise BqxError(
            f"source table {schema}.{table} does not exist for pair {pair.upper()} "
            "(load bars with `bqx generate` or `bqx ingest`, or set --source-table)"
        )
    for col, ok, kind in (
        (layout.time_column, lambda t: t in _TIME_TYPES, "a timestamp"),
        (layout.price_column, lambda t: t.startswith(_NUMERIC_PREFIXES), "numeric"),
    ):
        if col not in cols:
            raise BqxError(f"source table {schema}.{table} has no column {col!r}")
        if not ok(cols[col]):
            raise BqxError(f"column {col!r} of {schema}.{table} is {cols[col]}, not {kind}")


def check_target_columns(
    conn: psycopg.Connection, layout: Layout, pair: str, windows: Sequence[int]
) -> None:
    """Refuse to write into a target whose columns don't match the configured windows."""
    have = table_columns(conn, layout.schema, layout.target_name(pair))
    if have is None:
        return
    want = target_columns(normalize_windows(windows))
    missing = [c for c in want if c not in have]
    extra = [c for c in have if c not in want]
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing {', '.join(missing)}")
        if extra:
            parts.append(f"unexpected {', '.join(extra)}")
        raise BqxError(
            f"target table {layout.schema}.{layout.target_name(pair)} does not match windows "
            f"{','.join(map(str, normalize_windows(windows)))}: {'; '.join(parts)}"
            " (use the windows it was created with, or drop the table)"
        )


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


def target_partitions(conn: psycopg.Connection, layout: Layout, pairs: Sequence[str]) -> set[str]:
    """Names of the pairs' target tables and of their attached partitions (one catalog query)."""
    tables = [layout.target_name(p) for p in pairs]
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s) AND c.relkind = 'p'"
        " UNION ALL SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
        " WHERE n.nspname = %s AND p.relname = ANY(%s)",
        (layout.schema, tables, layout.schema, tables),
    ).fetchall()
    return {name for (name,) in rows}


def partition_states(
    conn: psycopg.Connection, layout: Layout, keys: Sequence[tuple[str, Month]]
) -> dict[tuple[str, Month], str]:
    """'ok', 'missing' or 'empty' per (pair, month) target partition.

    One catalog query gives each attached partition's size and the server's count of live
    rows: a partition that is not there is missing, one of size 0 (dropped and recreated, or
    truncated) is empty, and only one whose statistics count no live rows (emptied by DELETE,
    or statistics reset) is probed with EXISTS. All probes go in one query.
    """
    if not keys:
        return {}
    tables = sorted({layout.target_name(p) for p, _ in keys})
    rows = conn.execute(
        "SELECT c.relname, pg_relation_size(c.oid), pg_stat_get_live_tuples(c.oid)"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
        " WHERE n.nspname = %s AND p.relname = ANY(%s)",
        (layout.schema, tables),
    ).fetchall()
    have = {name: (size, live) for name, size, live in rows}
    out: dict[tuple[str, Month], str] = {}
    probe = []
    for key in keys:
        size, live = have.get(layout.target_partition_name(*key), (None, None))
        if size is None:
            out[key] = "missing"
        elif size == 0:
            out[key] = "empty"
        elif live:
            out[key] = "ok"
        else:
            probe.append(key)
    for i in range(0, len(probe), 500):
        chunk = probe[i : i + 500]
        q = sql.SQL("SELECT ARRAY[{}]").format(
            sql.SQL(", ").join(
                sql.SQL("EXISTS (SELECT 1 FROM {})").format(names.target_partition(layout, *k))
                for k in chunk
            )
        )
        row = conn.execute(q).fetchone()
        for k, nonempty in zip(chunk, row[0] if row else [], strict=True):
            out[k] = "ok" if nonempty else "empty"
    return out


def attached_partitions(
    conn: psycopg.Connection, layout: Layout
) -> dict[str, tuple[datetime, datetime]]:
    """Attached partitions of bqx targets in the schema: name -> (from, to)."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_inherits i ON i.inhrelid = c.oid"
        " JOIN pg_class parent ON parent.oid = i.inhparent"
        " WHERE n.nspname = %s AND parent.relname LIKE 'bqx\\_%%' AND c.relkind = 'r'",
        (layout.schema,),
    ).fetchall()
    out = {}
    for name, bound in rows:
        # FOR VALUES FROM ('2024-07-01 00:00:00+00') TO ('2024-08-01 00:00:00+00')
        parts = bound.split("'")
        if len(parts) >= 4:
            out[name] = (datetime.fromisoformat(parts[1]), datetime.fromisoformat(parts[3]))
    return out


def tables_with_primary_key(conn: psycopg.Connection, schema: str) -> set[str]:
    """Every table (and partition) of ``schema`` that has a primary key: one catalog query."""
    rows = conn.execute(
        "SELECT c.relname FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND i.indisprimary",
        (schema,),
    ).fetchall()
    return {r[0] for r in rows}


@contextmanager
def lock_timeout(conn: psycopg.Connection, seconds: float) -> Iterator[None]:
    """Statements on ``conn`` wait at most ``seconds`` for a lock."""
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(seconds * 1000)}ms")))
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("RESET lock_timeout")


def lock_holders(conn: psycopg.Connection, ident: sql.Identifier) -> list[int]:
    """Backends holding an exclusive lock on a table or one of its partitions."""
    with contextlib.suppress(psycopg.Error):
        return [
            int(pid)
            for (pid,) in conn.execute(
                "SELECT DISTINCT l.pid FROM pg_locks l WHERE l.granted"
                " AND l.pid <> pg_backend_pid() AND l.mode = 'AccessExclusiveLock'"
                " AND l.relation IN (SELECT to_regclass(%s)"
                " UNION ALL SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass(%s))"
                " ORDER BY 1",
                (names.as_text(ident),) * 2,
            )
        ]
    return []
