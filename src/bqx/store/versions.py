"""What changed, and when: per-month versions kept by triggers, and job signatures.

**Versions.** Every statement that writes a month of a tracked table — bqx's own loads and
jobs, or anyone's plain SQL — gives that month a new version (the writing transaction's id) in
the same transaction, through statement triggers on the table and its month partitions. Source
bars are tracked in ``bqx_source_versions`` (with the month's bar count), metric rows in
``bqx_target_versions``. The trigger functions run in UTC, so the month of a row is its UTC
month whatever the writer's session time zone.

**Write counters.** Writes can slip past triggers (triggers disabled, ``session_replication_role
= replica``, logical replication, ``pg_restore --disable-triggers``). The server's cumulative
write counters of each partition (tuples inserted, updated, deleted, and its file node) move
anyway, so a job records them, and a plan that finds them moved without a new version checks
that month bar by bar before trusting it.

**Signatures.** A job's exact signature covers every bar it reads: its month and the lookback
before it (the W_max bars before the month in ``bars`` mode, the lookback minutes in ``clock``
mode), as the count and the exact integer sum of per-bar hashes of each part; a job computes it
while it reads, and the plan computes the same from the table. The version signature stands in
for it where versions are trusted: the month's version plus the exact hash of its lookback (a
few dozen bars), so a no-op resume reads no month in full. See docs/guarantees.md.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg
from psycopg import sql

from bqx.core.layout import TARGET_TIME, Layout
from bqx.core.months import Month, in_range
from bqx.core.params import Job, Params
from bqx.errors import BqxError
from bqx.store import names
from bqx.store.ddl import lock_key

SOURCE_VERSIONS = "bqx_source_versions"
TARGET_VERSIONS = "bqx_target_versions"
BUMP_FUNCTION = "bqx_bump_version"
CHANGED_FUNCTION = "bqx_month_changed"
TRIGGER = "bqx_version"  # on each month partition; the parent's end in _ins/_upd/_del/_trunc
PARENT_TRIGGERS = {
    "ins": "AFTER INSERT ON {t} REFERENCING NEW TABLE AS new_rows",
    "upd": "AFTER UPDATE ON {t} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "del": "AFTER DELETE ON {t} REFERENCING OLD TABLE AS old_rows",
    "trunc": "AFTER TRUNCATE ON {t}",
}

_VERSIONS_DDL = """
CREATE TABLE IF NOT EXISTS {versions} (
    {key}        text NOT NULL,
    month        date NOT NULL,
    version      bigint NOT NULL,
    bars         bigint NOT NULL,
    changed_at   timestamptz NOT NULL,
    PRIMARY KEY ({key}, month)
)
"""

# The functions run with TimeZone UTC: date_trunc('month', t) of a timestamptz is then its UTC
# month, whatever the session that wrote the rows has set.
_FUNCTIONS_DDL = """
-- A new version for one month: the row is locked first, so the bar count, taken by a later
-- statement (a fresh snapshot under READ COMMITTED), includes every write committed before.
CREATE OR REPLACE FUNCTION {bump}(sch text, vt text, keycol text, tbl text, m date,
                                  counted boolean) RETURNS void
LANGUAGE plpgsql SET TimeZone TO 'UTC' AS $f$
DECLARE
    part text := tbl || '_' || to_char(m, 'YYYY"m"MM');
BEGIN
    IF to_regclass(format('%I.%I', sch, part)) IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('INSERT INTO %I.%I VALUES ($1, $2, 0, 0, clock_timestamp())'
                   ' ON CONFLICT DO NOTHING', sch, vt) USING tbl, m;
    EXECUTE format('SELECT 1 FROM %I.%I WHERE %I = $1 AND month = $2 FOR UPDATE',
                   sch, vt, keycol) USING tbl, m;
    IF counted THEN
        EXECUTE format('UPDATE %1$I.%2$I SET version = pg_current_xact_id()::text::bigint,'
                       ' bars = (SELECT count(*) FROM %1$I.%4$I), changed_at = clock_timestamp()'
                       ' WHERE %3$I = $1 AND month = $2', sch, vt, keycol, part) USING tbl, m;
    ELSE
        EXECUTE format('UPDATE %1$I.%2$I SET version = pg_current_xact_id()::text::bigint,'
                       ' changed_at = clock_timestamp() WHERE %3$I = $1 AND month = $2',
                       sch, vt, keycol) USING tbl, m;
    END IF;
END
$f$;
-- Fired once per statement that writes a tracked table or one of its month partitions, by
-- whoever writes it (bqx, or plain SQL): the months touched get a new version, in the same
-- transaction as the change. Arguments: versions table, its key column, the table, its time
-- column, whether to count rows[, the month of a partition].
CREATE OR REPLACE FUNCTION {changed}() RETURNS trigger
LANGUAGE plpgsql SET TimeZone TO 'UTC' AS $f$
DECLARE
    vt text := TG_ARGV[0];
    keycol text := TG_ARGV[1];
    tbl text := TG_ARGV[2];
    tcol text := TG_ARGV[3];
    m date;
    months date[];
BEGIN
    IF TG_NARGS > 5 THEN
        months := ARRAY[TG_ARGV[5]::date];
    ELSIF TG_OP = 'TRUNCATE' THEN
        EXECUTE format('SELECT array_agg(month) FROM %I.%I WHERE %I = $1',
                       TG_TABLE_SCHEMA, vt, keycol) INTO months USING tbl;
    ELSIF TG_OP = 'INSERT' THEN
        EXECUTE format('SELECT array_agg(DISTINCT date_trunc(''month'', %I)::date)'
                       ' FROM new_rows', tcol) INTO months;
    ELSIF TG_OP = 'DELETE' THEN
        EXECUTE format('SELECT array_agg(DISTINCT date_trunc(''month'', %I)::date)'
                       ' FROM old_rows', tcol) INTO months;
    ELSE
        EXECUTE format('SELECT array_agg(DISTINCT k) FROM (SELECT date_trunc(''month'', %1$I)'
                       '::date AS k FROM new_rows UNION ALL SELECT date_trunc(''month'', %1$I)'
                       '::date FROM old_rows) x', tcol) INTO months;
    END IF;
    FOREACH m IN ARRAY coalesce(months, '{{}}'::date[]) LOOP
        CONTINUE WHEN m IS NULL;
        PERFORM {bump}(TG_TABLE_SCHEMA, vt, keycol, tbl, m, TG_ARGV[4]::boolean);
    END LOOP;
    RETURN NULL;
END
$f$;
"""


@dataclass(frozen=True)
class Tracked:
    """A kind of table whose months are versioned: source bars, or metric rows."""

    versions: str  # the versions table
    key: str  # its column naming the tracked table
    counted: bool  # whether a version also records the month's row count

    def table(self, schema: str) -> sql.Identifier:
        return names.in_schema(schema, self.versions)


SOURCE = Tracked(SOURCE_VERSIONS, "source_table", True)
TARGET = Tracked(TARGET_VERSIONS, "target_table", False)


# -- installing and bumping ---------------------------------------------------------------


def _guarded(
    cur: psycopg.Cursor, kind: Tracked, schema: str, parent: sql.Identifier,
    part: sql.Identifier,
) -> bool:  # fmt: skip
    """Whether the versions table, the functions and the triggers on the table and the
    partition are in place (and the triggers call bqx's current function)."""
    row = cur.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND to_regproc(%s) IS NOT NULL, (SELECT count(*)"
        " FROM pg_trigger WHERE tgrelid IN (to_regclass(%s), to_regclass(%s))"
        " AND tgname LIKE 'bqx\\_version%%' AND tgfoid = to_regproc(%s))",
        (names.as_text(kind.table(schema)), names.as_text(_func(schema, CHANGED_FUNCTION)),
         names.as_text(parent), names.as_text(part),
         names.as_text(_func(schema, CHANGED_FUNCTION))),
    ).fetchone()  # fmt: skip
    assert row is not None  # an aggregate: always one row
    return bool(row[0]) and int(row[1]) == 1 + len(PARENT_TRIGGERS)


def _func(schema: str, name: str) -> sql.Identifier:
    return names.in_schema(schema, name)


def install(
    cur: psycopg.Cursor, kind: Tracked, schema: str, table: str, time_column: str,
    month: Month,
) -> None:  # fmt: skip
    """Inside the caller's transaction: the versions table, the functions, and the statement
    triggers on ``table`` and its partition of ``month``, only when something is missing."""
    parent = names.in_schema(schema, table)
    part = names.in_schema(schema, f"{table}_{month.suffix}")
    if _guarded(cur, kind, schema, parent, part):
        return
    # concurrent first writes (generate's threads) would race on CREATE … IF NOT EXISTS
    lock_key(cur, names.as_text(kind.table(schema)))
    bump, changed = _func(schema, BUMP_FUNCTION), _func(schema, CHANGED_FUNCTION)
    cur.execute(sql.SQL(_VERSIONS_DDL).format(versions=kind.table(schema),
                                              key=names.column(kind.key)))  # fmt: skip
    # only when missing: replacing needs the functions' owner, and sources and targets share
    # them in a schema where several roles may write (docs/privileges.md)
    row = cur.execute(
        "SELECT to_regproc(%s) IS NULL OR to_regproc(%s) IS NULL",
        (names.as_text(bump), names.as_text(changed)),
    ).fetchone()
    if row and row[0]:
        cur.execute(sql.SQL(_FUNCTIONS_DDL).format(bump=bump, changed=changed))
    args = [sql.Literal(v) for v in (kind.versions, kind.key, table, time_column, kind.counted)]
    for suffix, when in PARENT_TRIGGERS.items():
        cur.execute(
            sql.SQL("CREATE OR REPLACE TRIGGER {name} " + when + " FOR EACH STATEMENT"
                    " EXECUTE FUNCTION {func}({args})").format(
                name=names.bare(f"{TRIGGER}_{suffix}"), t=parent, func=changed,
                args=sql.SQL(", ").join(args),
            )
        )  # fmt: skip
    cur.execute(
        sql.SQL(
            "CREATE OR REPLACE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
            " ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {func}({args})"
        ).format(
            name=names.bare(TRIGGER), t=part, func=changed,
            args=sql.SQL(", ").join([*args, sql.Literal(str(month.first_day))]),
        )
    )  # fmt: skip


def bump(cur: psycopg.Cursor, kind: Tracked, schema: str, table: str, month: Month) -> None:
    """Inside the transaction that wrote the month: give it a new version."""
    cur.execute(
        sql.SQL("SELECT {}(%s, %s, %s, %s, %s, %s)").format(_func(schema, BUMP_FUNCTION)),
        (schema, kind.versions, kind.key, table, month.first_day, kind.counted),
    )


def record_source_version(cur: psycopg.Cursor, layout: Layout, pair: str, month: Month) -> None:
    """Inside the transaction that wrote a month of source bars: give that month a new version.

    The version (the writing transaction's id) and the month's bar count commit or roll back
    with the bars, so a resume compares versions instead of hashing every bar
    (``--source-check auto``, docs/guarantees.md). The first call also installs the statement
    triggers on the source table and the month's partition, so later writes by plain SQL
    (UPDATE, INSERT, DELETE, TRUNCATE, COPY) bump the version too.
    """
    schema, table = layout.source_name(pair)
    install(cur, SOURCE, schema, table, layout.time_column, month)
    bump(cur, SOURCE, schema, table, month)


def install_target(cur: psycopg.Cursor, layout: Layout, pair: str, month: Month) -> None:
    """The statement triggers that version a pair's metric months (any writer's writes)."""
    install(cur, TARGET, layout.schema, layout.target_name(pair), TARGET_TIME, month)


def unguarded_targets(
    conn: psycopg.Connection, layout: Layout, keys: Sequence[tuple[str, Month]]
) -> list[tuple[str, Month]]:
    """The (pair, month) target partitions among ``keys`` whose triggers are not in place
    (one catalog query)."""
    if not keys:
        return []
    parts = {layout.target_partition_name(p, m): (p, m) for p, m in keys}
    changed = names.as_text(_func(layout.schema, CHANGED_FUNCTION))
    rows = conn.execute(
        "SELECT c.relname,"
        " (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = %s"
        "  AND t.tgfoid = to_regproc(%s)),"
        " (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = i.inhparent"
        "  AND t.tgname = ANY(%s) AND t.tgfoid = to_regproc(%s))"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s)",
        (TRIGGER, changed, [f"{TRIGGER}_{s}" for s in PARENT_TRIGGERS], changed,
         layout.schema, list(parts)),
    ).fetchall()  # fmt: skip
    guarded = {name for name, own, parent in rows if own == 1 and parent == len(PARENT_TRIGGERS)}
    return [key for name, key in parts.items() if name not in guarded]


def target_version(cur: psycopg.Cursor, layout: Layout, pair: str, month: Month) -> int | None:
    """The month's metric version as this transaction sees it (its own write's, after one)."""
    if not _readable(cur.connection, TARGET.table(layout.schema)):
        return None
    row = cur.execute(
        sql.SQL("SELECT version FROM {} WHERE target_table = %s AND month = %s").format(
            TARGET.table(layout.schema)
        ),
        (layout.target_name(pair), month.first_day),
    ).fetchone()
    return None if row is None else int(row[0])


def target_versions(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str]
) -> dict[tuple[str, Month], int]:
    """(pair, month) -> metric version of the pairs' months that have one (one query)."""
    if not pairs or not _readable(conn, TARGET.table(layout.schema)):
        return {}
    by_table = {layout.target_name(p): p for p in pairs}
    rows = conn.execute(
        sql.SQL("SELECT target_table, month, version FROM {} WHERE target_table = ANY(%s)").format(
            TARGET.table(layout.schema)
        ),
        (list(by_table),),
    )
    return {(by_table[t], Month.of(m)): int(v) for t, m, v in rows}


def _readable(conn: psycopg.Connection, table: sql.Identifier) -> bool:
    name = names.as_text(table)
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND has_table_privilege(to_regclass(%s), 'SELECT')",
        (name, name),
    ).fetchone()
    return bool(row and row[0])


# -- write counters -----------------------------------------------------------------------

_STATS = sql.SQL(
    "c.relfilenode::text || ':' || pg_stat_get_tuples_inserted(c.oid) || ':'"
    " || pg_stat_get_tuples_updated(c.oid) || ':' || pg_stat_get_tuples_deleted(c.oid)"
)


def publish_counters(conn: psycopg.Connection) -> None:
    """Have the server publish this session's write counters as soon as it is idle (they are
    otherwise held up to 10 s), so bqx's own writes never look like writes past the triggers
    to a plan that follows at once. Outside any transaction; PostgreSQL 15 and later."""
    if conn.info.server_version >= 150000:
        conn.execute("SELECT pg_stat_force_next_flush()")


def partition_stats(cur: psycopg.Cursor, layout: Layout, pair: str, month: Month) -> str | None:
    """The source month partition's write counters now (None when there is no partition).

    Read before the job reads its bars: a write after this shows as moved counters, and one
    before it is in the bars the job read (docs/guarantees.md)."""
    part = names.as_text(names.source_partition(layout, pair, month))
    cur.execute("SELECT pg_stat_clear_snapshot()")  # counters as published now, not cached
    row = cur.execute(
        sql.SQL("SELECT {} FROM pg_class c WHERE c.oid = to_regclass(%s)").format(_STATS), (part,)
    ).fetchone()
    return None if row is None else str(row[0])


def target_counters(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str]
) -> dict[tuple[str, Month], str]:
    """(pair, month) -> write counters of each attached metric partition of the pairs (one
    catalog query): a write past the target's triggers still moves them."""
    if not pairs:
        return {}
    by_table = {layout.target_name(p): p for p in pairs}
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute(
        sql.SQL(
            "SELECT p.relname, c.relname, {} FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent"
            " JOIN pg_namespace n ON n.oid = p.relnamespace"
            " WHERE n.nspname = %s AND p.relname = ANY(%s)"
        ).format(_STATS),
        (layout.schema, list(by_table)),
    ).fetchall()
    out = {}
    for parent, name, stats in rows:
        with contextlib.suppress(BqxError):  # a partition not named by bqx: not a month
            out[(by_table[parent], Month.parse(name[len(parent) + 1 :]))] = str(stats)
    return out


# -- signatures ---------------------------------------------------------------------------

# an integer sum of per-bar hashes (binding each price to its time) is exact and order-free,
# so a signature is deterministic and changes when any bar does
_BAR_HASH = "hashfloat8(date_part('epoch', {t})) # hashfloat8({p}::float8)"


def bar_hash(t: sql.Composable, p: sql.Composable) -> sql.Composable:
    """The per-bar hash that signatures sum, over a time and a price expression."""
    return sql.SQL(_BAR_HASH).format(t=t, p=p)


def exact_signature(n: Any, h: Any, lb_n: Any, lb_h: Any) -> str:
    """The exact signature of a job's read: its month's bar count and hash sum, its lookback's.

    The same whether the plan computes it from the table or the job while it reads."""
    text = f"{int(n or 0)}|{h or 0}|{int(lb_n or 0)}|{lb_h or 0}"
    return hashlib.sha256(text.encode()).hexdigest()[:16]


# where a job looks for its lookback bars first: the W_max bars before a month lie in the days
# before it, and a lower bound lets the server prune to those partitions
LOOKBACK_FIRST = timedelta(days=31)


def _lookback_sql(params: Params, pair: str, bounded: bool = False) -> sql.Composable:
    """Per month ``m.k``: count and hash of exactly the bars before it that a job reads
    (``bounded``: only those of the ``LOOKBACK_FIRST`` before it, the same bars whenever they
    are W_max or more)."""
    layout = params.layout
    t, p, src = names.time(layout), names.price(layout), names.source(layout, pair)
    h = bar_hash(t, p)
    if params.mode == "bars":  # the W_max bars before the month, however long ago
        floor = sql.SQL(" AND {t} >= m.k - {d}::interval").format(
            t=t, d=sql.Literal(f"{LOOKBACK_FIRST.days} days")
        ) if bounded else sql.SQL("")  # fmt: skip
        return sql.SQL(
            "SELECT count(*) AS n, sum({h})::text AS h FROM (SELECT {t}, {p} FROM {src}"
            " WHERE {t} < m.k{floor} ORDER BY {t} DESC LIMIT {k}) lb"
        ).format(h=h, t=t, p=p, src=src, floor=floor, k=sql.Literal(params.lookback_bars))
    return sql.SQL(
        "SELECT count(*) AS n, sum({h})::text AS h FROM {src}"
        " WHERE {t} >= m.k - make_interval(mins => {mins}) AND {t} < m.k"
    ).format(h=h, t=t, src=src, mins=sql.Literal(params.lookback_minutes))


def _bad_time_message(layout: Layout, pair: str, value: str | None, count: int) -> str:
    schema, table = layout.source_name(pair)
    what = "NULL" if value is None else repr(value)
    return (
        f"source table {schema}.{table} (pair {pair.upper()}) has {count:,} bar(s) whose "
        f"{layout.time_column} is {what}: every bar needs a finite time; delete or fix them"
    )


def _range_condition(
    layout: Layout, start: Month | None, end: Month | None
) -> tuple[sql.Composable, list[Any]]:
    cond: list[sql.Composable] = []
    args: list[Any] = []
    if start is not None:
        cond.append(sql.SQL("{} >= %s").format(names.time(layout)))
        args.append(start.start)
    if end is not None:
        cond.append(sql.SQL("{} < %s").format(names.time(layout)))
        args.append(end.end)
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(cond) if cond else sql.SQL("")
    return where, args


def exact_jobs(
    conn: psycopg.Connection, params: Params, pair: str, start: Month | None, end: Month | None,
    vers: dict[Month, Version] | None = None,
) -> list[Job]:  # fmt: skip
    """Per month with bars: its exact count and the exact signature of every bar its job reads
    (one scan of the range, plus each month's lookback through the time index)."""
    layout = params.layout
    where, args = _range_condition(layout, start, end)
    q = sql.SQL(
        "WITH m AS (SELECT date_trunc('month', {t}) AS k, count(*) AS n, sum({h})::text AS h"
        " FROM {src}{where} GROUP BY 1)"
        " SELECT CASE WHEN isfinite(m.k) THEN m.k::date END, m.k::text, m.n, m.h, lb.n, lb.h"
        " FROM m LEFT JOIN LATERAL ({lookback}) lb ON isfinite(m.k) ORDER BY m.k"
    ).format(
        t=names.time(layout), h=bar_hash(names.time(layout), names.price(layout)),
        src=names.source(layout, pair), where=where, lookback=_lookback_sql(params, pair),
    )  # fmt: skip
    jobs = []
    for first_day, key, count, total, lb_n, lb_h in conn.execute(q, args):
        if first_day is None:  # a NULL or infinite time: no month owns it
            raise BqxError(_bad_time_message(layout, pair, key, int(count)))
        month = Month.of(first_day)
        own = vers.get(month) if vers else None
        # the versions seen too (read before this scan), so a later auto resume can skip it
        ver = own.signature(month, f"{lb_n}|{lb_h}") if own else None
        jobs.append(Job(pair, month, int(count), exact_signature(count, total, lb_n, lb_h), ver,
                        own.stats if own else None))  # fmt: skip
    return jobs


# -- source versions ----------------------------------------------------------------------


@dataclass(frozen=True)
class Version:
    """A source month as its triggers and the server's counters describe it."""

    version: int  # -1: not trusted (no guard, or never versioned)
    bars: int
    changed_at: str
    stats: str  # write counters of its partition: file node, inserted, updated, deleted

    @property
    def trusted(self) -> bool:
        return self.version >= 0

    def signature(self, month: Month, lookback: str) -> str | None:
        """The month's version and the exact hash of its lookback bars; None when the version
        is unknown (then only the exact signature can decide)."""
        if not self.trusted:
            return None
        own = (self.version, self.bars, self.changed_at)
        return "v" + hashlib.sha256(f"{month}:{own}|{lookback}".encode()).hexdigest()[:15]


def _source_versions(
    conn: psycopg.Connection, layout: Layout, pair: str
) -> dict[Month, Version] | None:
    """Month -> its version and counters, for a bqx-written source.

    A month's version is trusted only while the statement triggers that keep it current are in
    place and enabled, on the table and on the month's partition, and call bqx's current
    function; an untrusted month gets version -1 (its jobs are hashed exactly). Only attached
    partitions count. None when the source is not a bqx-partitioned table with recorded
    versions.
    """
    schema, table = layout.source_name(pair)
    if not _readable(conn, SOURCE.table(schema)):  # not written by bqx, or a role that may
        return None  # not read it: hash the bars
    changed = names.as_text(_func(schema, CHANGED_FUNCTION))
    parts = conn.execute(
        sql.SQL(
            "SELECT c.relname, {stats},"
            " (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = %s"
            "  AND t.tgenabled IN ('O', 'A') AND t.tgfoid = to_regproc(%s)),"
            " (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = i.inhparent AND t.tgname ="
            "  ANY(%s) AND t.tgenabled IN ('O', 'A') AND t.tgfoid = to_regproc(%s))"
            " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = to_regclass(%s)"
        ).format(stats=_STATS),
        (TRIGGER, changed, [f"{TRIGGER}_{s}" for s in PARENT_TRIGGERS], changed,
         names.as_text(names.source(layout, pair))),
    ).fetchall()  # fmt: skip
    if not parts:
        return None
    rows = {
        Month.of(m): (int(v), int(b), str(at))
        for m, v, b, at in conn.execute(
            sql.SQL(
                "SELECT month, version, bars, changed_at::text FROM {} WHERE source_table = %s"
            ).format(SOURCE.table(schema)),
            (table,),
        )
    }
    out: dict[Month, Version] = {}
    for name, stats, own_guard, parent_guard in parts:
        if not name.startswith(f"{table}_"):
            return None  # partitions not made by bqx: no trustworthy month mapping
        try:
            month = Month.parse(name[len(table) + 1 :])
        except BqxError:
            return None
        guarded = own_guard == 1 and parent_guard == len(PARENT_TRIGGERS)
        if month in rows and guarded:
            out[month] = Version(*rows[month], str(stats))
        else:  # unguarded or never versioned: unknown
            out[month] = Version(-1, -1, "", str(stats))
    return out


def versioned(conn: psycopg.Connection, layout: Layout, pair: str) -> bool:
    """Whether the pair's source is a bqx-versioned table (its changes are known cheaply)."""
    return _source_versions(conn, layout, pair) is not None


def _lookback_hashes(
    conn: psycopg.Connection, params: Params, pair: str, months: Sequence[Month]
) -> dict[Month, tuple[int, str | None]]:
    """Per month, count and hash of exactly the lookback bars its job reads: at most W_max bars
    (or minutes) each, found through the time index, in one query per pair."""
    if not months:
        return {}

    def hashes(which: Sequence[Month], bounded: bool) -> dict[Month, tuple[int, str | None]]:
        q = sql.SQL(
            "SELECT m.k, lb.n, lb.h FROM unnest(%s::timestamptz[]) AS m(k)"
            " LEFT JOIN LATERAL ({}) lb ON true"
        ).format(_lookback_sql(params, pair, bounded))
        rows = conn.execute(q, ([m.start for m in which],))
        return {Month.of(k): (int(n), h) for k, n, h in rows}

    if params.mode != "bars":
        return hashes(months, False)
    # the days before each month first: with no lower bound the server scans an index of
    # every earlier partition for each month (quadratic in the months of a history)
    out = hashes(months, True)
    short = [m for m in months if out[m][0] < params.lookback_bars]
    if short:  # the start of the history, or a gap longer than LOOKBACK_FIRST
        out.update(hashes(short, False))
    return out


def source_jobs(
    conn: psycopg.Connection, params: Params, pair: str, start: Month | None, end: Month | None,
    source_check: str,
) -> list[Job]:  # fmt: skip
    """A pair's jobs with their signatures, as ``source_check`` asks: every month with bars,
    and (with versions) every versioned month left without bars, whose stored metrics must go.

    ``auto``: a month whose version is trusted is identified by that version plus an exact
    hash of its lookback bars (a few dozen per job), so no month is read in full; other
    months are hashed in full. Versions are read before any bar is hashed: a write in between
    only makes the next resume redo the month, never skip it.
    """
    vers = _source_versions(conn, params.layout, pair)
    return _jobs_of(conn, params, pair, start, end, source_check, vers)


def versioned_jobs(conn: psycopg.Connection, params: Params, pair: str) -> list[Job] | None:
    """``source_jobs`` of every month, ``auto``, when the source is versioned by bqx; None when
    it is not (only hashing every bar could tell what changed)."""
    vers = _source_versions(conn, params.layout, pair)
    return None if vers is None else _jobs_of(conn, params, pair, None, None, "auto", vers)


def _jobs_of(
    conn: psycopg.Connection, params: Params, pair: str, start: Month | None, end: Month | None,
    source_check: str, vers: dict[Month, Version] | None,
) -> list[Job]:  # fmt: skip
    if source_check == "exact" or vers is None:
        jobs = exact_jobs(conn, params, pair, start, end, vers)
        if vers is not None:  # versioned months that lost every bar: their metrics must go
            have = {j.month for j in jobs}
            jobs += [
                Job(pair, m, 0, exact_signature(0, 0, *_lookback_of(conn, params, pair, m)),
                    None, v.stats)
                for m, v in sorted(vers.items())
                if m not in have and in_range(m, start, end) and v.bars == 0
            ]  # fmt: skip
        return sorted(jobs, key=lambda j: j.month)
    months = [m for m in sorted(vers) if in_range(m, start, end)]
    lookback = _lookback_hashes(conn, params, pair, [m for m in months if vers[m].trusted])
    jobs = []
    for month in months:
        own = vers[month]
        if own.trusted:
            ver = own.signature(month, "{}|{}".format(*lookback[month]))
            jobs.append(Job(pair, month, own.bars, None, ver, own.stats))
        else:  # a month bqx did not write, or whose guard is off: hash it
            jobs.extend(exact_jobs(conn, params, pair, month, month, vers))
    return jobs


def _lookback_of(
    conn: psycopg.Connection, params: Params, pair: str, month: Month
) -> tuple[int, str | None]:
    return _lookback_hashes(conn, params, pair, [month])[month]


def check_exactly(conn: psycopg.Connection, params: Params, job: Job) -> Job:
    """The job with its exact signature, for a month whose counters moved without a version:
    its bars read in full (one month)."""
    exact = exact_jobs(conn, params, job.pair, job.month, job.month)
    if exact:
        sig = exact[0].source_sig
    else:  # no bar left in the month
        sig = exact_signature(0, 0, *_lookback_of(conn, params, job.pair, job.month))
    return Job(job.pair, job.month, job.source_bars, sig, job.source_ver, job.source_stats)


def month_versions(conn: psycopg.Connection, layout: Layout, pair: str) -> dict[Month, int]:
    """Each month's current source version, -1 where it cannot be trusted (its triggers are
    missing or disabled): for a writer that must know whether a month changed since it wrote
    it (``bqx generate``). Empty when the source has no recorded versions."""
    return {m: v.version for m, v in (_source_versions(conn, layout, pair) or {}).items()}


def forget_source(cur: psycopg.Cursor, layout: Layout, pair: str) -> None:
    """Inside the caller's transaction: drop the versions kept for a pair's source and metric
    tables (the tables themselves are being dropped)."""
    schema, table = layout.source_name(pair)
    for kind, owner, name in ((SOURCE, schema, table),
                              (TARGET, layout.schema, layout.target_name(pair))):  # fmt: skip
        versions = kind.table(owner)
        found = cur.execute("SELECT to_regclass(%s)", (names.as_text(versions),)).fetchone()
        if found is not None and found[0] is not None:
            cur.execute(
                sql.SQL("DELETE FROM {} WHERE {} = %s").format(versions, names.column(kind.key)),
                (name,),
            )
