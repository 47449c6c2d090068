"""What changed in the source: per-month versions kept by triggers, and job signatures.

When bqx writes a month of bars it gives the month a new version (the writing transaction's
id) in the same transaction, and statement triggers on the source table and its partitions do
the same for writes by plain SQL. A resume then compares versions instead of hashing every bar
(``--source-check auto``, docs/guarantees.md); a month whose triggers are missing or disabled,
and any source bqx does not write, is hashed bar by bar instead.

A job's signature covers every bar it reads: its month and the lookback before it (the W_max
bars before the month in ``bars`` mode, the lookback minutes in ``clock`` mode), so a corrected
bar at the end of August changes September's signature too.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import psycopg
from psycopg import sql

from bqx.core.layout import Layout
from bqx.core.months import Month, in_range
from bqx.core.params import Job, Params
from bqx.errors import BqxError
from bqx.store import names
from bqx.store.ddl import lock_key

SOURCE_VERSIONS = "bqx_source_versions"

_SOURCE_VERSIONS_DDL = """
CREATE TABLE IF NOT EXISTS {versions} (
    source_table text NOT NULL,
    month        date NOT NULL,
    version      bigint NOT NULL,
    bars         bigint NOT NULL,
    changed_at   timestamptz NOT NULL,
    PRIMARY KEY (source_table, month)
);
-- A new version for one month: the row is locked first, so the bar count, taken by a later
-- statement (a fresh snapshot under READ COMMITTED), includes every write committed before.
CREATE OR REPLACE FUNCTION {bump}(sch text, src text, m date) RETURNS void
LANGUAGE plpgsql AS $f$
DECLARE
    part text := src || '_' || to_char(m, 'YYYY"m"MM');
BEGIN
    IF to_regclass(format('%I.%I', sch, part)) IS NULL THEN
        RETURN;
    END IF;
    EXECUTE format('INSERT INTO %I.bqx_source_versions VALUES ($1, $2, 0, 0, clock_timestamp())'
                   ' ON CONFLICT DO NOTHING', sch) USING src, m;
    EXECUTE format('SELECT 1 FROM %I.bqx_source_versions WHERE source_table = $1 AND month = $2'
                   ' FOR UPDATE', sch) USING src, m;
    EXECUTE format('UPDATE %1$I.bqx_source_versions SET version ='
                   ' pg_current_xact_id()::text::bigint, bars = (SELECT count(*) FROM %1$I.%2$I),'
                   ' changed_at = clock_timestamp() WHERE source_table = $1 AND month = $2',
                   sch, part) USING src, m;
END
$f$;
-- Fired once per statement that writes a source table or one of its month partitions, by
-- whoever writes it (bqx, or plain SQL): the months touched get a new version, in the same
-- transaction as the change. Arguments: source table, time column[, month of a partition].
CREATE OR REPLACE FUNCTION {func}() RETURNS trigger LANGUAGE plpgsql AS $f$
DECLARE
    src text := TG_ARGV[0];
    m date;
    months date[];
BEGIN
    IF TG_NARGS > 2 THEN
        months := ARRAY[TG_ARGV[2]::date];
    ELSIF TG_OP = 'TRUNCATE' THEN
        EXECUTE format('SELECT array_agg(month) FROM %I.bqx_source_versions'
                       ' WHERE source_table = $1', TG_TABLE_SCHEMA) INTO months USING src;
    ELSIF TG_OP = 'INSERT' THEN
        EXECUTE format('SELECT array_agg(DISTINCT date_trunc(''month'', %I)::date)'
                       ' FROM new_rows', TG_ARGV[1]) INTO months;
    ELSIF TG_OP = 'DELETE' THEN
        EXECUTE format('SELECT array_agg(DISTINCT date_trunc(''month'', %I)::date)'
                       ' FROM old_rows', TG_ARGV[1]) INTO months;
    ELSE
        EXECUTE format('SELECT array_agg(DISTINCT k) FROM (SELECT date_trunc(''month'', %1$I)'
                       '::date AS k FROM new_rows UNION ALL SELECT date_trunc(''month'', %1$I)'
                       '::date FROM old_rows) x', TG_ARGV[1]) INTO months;
    END IF;
    FOREACH m IN ARRAY coalesce(months, '{{}}'::date[]) LOOP
        CONTINUE WHEN m IS NULL;
        PERFORM {bump}(TG_TABLE_SCHEMA, src, m);
    END LOOP;
    RETURN NULL;
END
$f$;
"""

BUMP_FUNCTION = "bqx_bump_source_version"
SOURCE_TRIGGER = "bqx_version"  # on each month partition; the parent's end in _ins/_upd/_del/_trunc
PARENT_TRIGGERS = {
    "ins": "AFTER INSERT ON {t} REFERENCING NEW TABLE AS new_rows",
    "upd": "AFTER UPDATE ON {t} REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows",
    "del": "AFTER DELETE ON {t} REFERENCING OLD TABLE AS old_rows",
    "trunc": "AFTER TRUNCATE ON {t}",
}


def record_source_version(cur: psycopg.Cursor, layout: Layout, pair: str, month: Month) -> None:
    """Inside the transaction that wrote a month of source bars: give that month a new version.

    The version (the writing transaction's id) and the month's bar count commit or roll back
    with the bars, so a resume compares versions instead of hashing every bar
    (``--source-check auto``, docs/guarantees.md). The first call also installs statement
    triggers on the source table and the month's partition, so later writes by plain SQL
    (UPDATE, INSERT, DELETE, TRUNCATE, COPY) bump the version too.
    """
    schema, table = layout.source_name(pair)
    versions = names.in_schema(schema, SOURCE_VERSIONS)
    parent, part = names.source(layout, pair), names.source_partition(layout, pair, month)
    bump = names.in_schema(schema, BUMP_FUNCTION)
    have = cur.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND to_regproc(%s) IS NOT NULL, (SELECT count(*)"
        " FROM pg_trigger WHERE tgrelid IN (to_regclass(%s), to_regclass(%s))"
        " AND tgname LIKE 'bqx\\_version%%')",
        (versions.as_string(cur), bump.as_string(cur), parent.as_string(cur),
         part.as_string(cur)),
    ).fetchone()  # fmt: skip
    assert have is not None  # an aggregate: always one row
    if not have[0] or have[1] < 1 + len(PARENT_TRIGGERS):
        # concurrent first loads (generate's threads) would race on CREATE … IF NOT EXISTS
        lock_key(cur, names.as_text(versions))
        func = names.in_schema(schema, "bqx_source_changed")
        cur.execute(sql.SQL(_SOURCE_VERSIONS_DDL).format(versions=versions, func=func, bump=bump))
        args = [sql.Literal(table), sql.Literal(layout.time_column)]
        for suffix, when in PARENT_TRIGGERS.items():
            cur.execute(
                sql.SQL("CREATE OR REPLACE TRIGGER {name} " + when + " FOR EACH STATEMENT"
                        " EXECUTE FUNCTION {func}({args})").format(
                    name=names.bare(f"{SOURCE_TRIGGER}_{suffix}"), t=parent, func=func,
                    args=sql.SQL(", ").join(args),
                )
            )  # fmt: skip
        cur.execute(
            sql.SQL(
                "CREATE OR REPLACE TRIGGER {name} AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE"
                " ON {t} FOR EACH STATEMENT EXECUTE FUNCTION {func}({args})"
            ).format(
                name=names.bare(SOURCE_TRIGGER), t=part, func=func,
                args=sql.SQL(", ").join([*args, sql.Literal(str(month.first_day))]),
            )
        )  # fmt: skip
    cur.execute(
        sql.SQL("SELECT {}(%s, %s, %s)").format(bump),
        (schema, table, month.first_day),
    )


def _bad_time_message(layout: Layout, pair: str, value: str | None, count: int) -> str:
    schema, table = layout.source_name(pair)
    what = "NULL" if value is None else repr(value)
    return (
        f"source table {schema}.{table} (pair {pair.upper()}) has {count:,} bar(s) whose "
        f"{layout.time_column} is {what}: every bar needs a finite time; delete or fix them"
    )


def _lookback_sql(params: Params, pair: str) -> sql.Composable:
    """Per month ``m.k``: count and hash of exactly the bars before it that a job reads."""
    layout = params.layout
    h = sql.SQL("hashfloat8(date_part('epoch', {t})) # hashfloat8({p}::float8)").format(
        t=names.time(layout), p=names.price(layout)
    )
    if params.mode == "bars":  # the W_max bars before the month, however long ago
        return sql.SQL(
            "SELECT count(*) AS n, sum({h})::text AS h FROM (SELECT {t}, {p} FROM {src}"
            " WHERE {t} < m.k ORDER BY {t} DESC LIMIT {k}) lb"
        ).format(
            h=h, t=names.time(layout), p=names.price(layout), src=names.source(layout, pair),
            k=sql.Literal(params.lookback_bars),
        )  # fmt: skip
    return sql.SQL(
        "SELECT count(*) AS n, sum({h})::text AS h FROM {src}"
        " WHERE {t} >= m.k - make_interval(mins => {mins}) AND {t} < m.k"
    ).format(
        h=h, t=names.time(layout), src=names.source(layout, pair),
        mins=sql.Literal(params.lookback_minutes),
    )  # fmt: skip


def _source_months(
    conn: psycopg.Connection, params: Params, pair: str, start: Month | None, end: Month | None,
    vers: dict[Month, tuple[int, int, str, int]] | None = None,
) -> list[Job]:  # fmt: skip
    """Per month with bars: exact count and a signature of every bar its job reads.

    The signature covers the month's own bars and its lookback (the W_max bars before the
    month in ``bars`` mode, the lookback minutes in ``clock`` mode), so a corrected bar at the
    end of August changes September's signature too.
    """
    layout = params.layout
    cond = []
    args: list[Any] = []
    if start is not None:
        cond.append(sql.SQL("{} >= %s").format(names.time(layout)))
        args.append(start.start)
    if end is not None:
        cond.append(sql.SQL("{} < %s").format(names.time(layout)))
        args.append(end.end)
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(cond) if cond else sql.SQL("")
    # an integer sum of per-bar hashes (binding each price to its time) is exact and
    # order-independent, so the signature is deterministic and changes when any bar does
    lookback = _lookback_sql(params, pair)
    q = sql.SQL(
        "WITH m AS (SELECT date_trunc('month', {t}) AS k, count(*) AS n, min({t})::text AS lo,"
        " max({t})::text AS hi,"
        " sum(hashfloat8(date_part('epoch', {t})) # hashfloat8({p}::float8))::text AS h"
        " FROM {src}{where} GROUP BY 1)"
        " SELECT CASE WHEN isfinite(m.k) THEN m.k::date END, m.k::text, m.n, m.lo, m.hi, m.h,"
        " lb.n, lb.h FROM m LEFT JOIN LATERAL ({lookback}) lb ON isfinite(m.k)"
        " ORDER BY m.k"
    ).format(
        t=names.time(layout), p=names.price(layout), src=names.source(layout, pair), where=where,
        lookback=lookback,
    )  # fmt: skip
    jobs = []
    for first_day, key, count, lo, hi, total, lb_n, lb_h in conn.execute(q, args):
        if first_day is None:  # a NULL or infinite time: no month owns it
            raise BqxError(_bad_time_message(layout, pair, key, int(count)))
        sig = hashlib.sha256(f"{count}|{lo}|{hi}|{total}|{lb_n}|{lb_h}".encode()).hexdigest()[:16]
        month = Month.of(first_day)
        # the versions seen too (read before this scan), so a later auto resume can skip it
        ver = _version_sig(vers.get(month), month, f"{lb_n}|{lb_h}") if vers else None
        jobs.append(Job(pair, month, int(count), sig, ver))
    return jobs


# -- source versions ----------------------------------------------------------------------


def _source_versions(
    conn: psycopg.Connection, layout: Layout, pair: str
) -> dict[Month, tuple[int, int, str, int]] | None:
    """Month -> (version, bars, changed_at, partition relfilenode) of a bqx-written source.

    A month's version is trusted only while the statement triggers that keep it current are
    in place and enabled, on the table and on the month's partition; an untrusted month gets
    version -1 (its jobs are hashed exactly). Only attached partitions count. None when the
    source is not a bqx-partitioned table with recorded versions.
    """
    schema, table = layout.source_name(pair)
    versions = names.in_schema(schema, SOURCE_VERSIONS).as_string(conn)
    row = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND has_table_privilege(to_regclass(%s), 'SELECT')",
        (versions, versions),
    ).fetchone()
    readable = bool(row and row[0])
    if not readable:  # not written by bqx, or a role that may not read it: hash the bars
        return None
    parts = conn.execute(
        "SELECT c.relname, c.relfilenode,"
        " (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = c.oid AND t.tgname = %s"
        "  AND t.tgenabled IN ('O', 'A')),"
        " (SELECT count(*) FROM pg_trigger t WHERE t.tgrelid = i.inhparent"
        "  AND t.tgname = ANY(%s) AND t.tgenabled IN ('O', 'A'))"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " WHERE i.inhparent = to_regclass(%s)",
        (SOURCE_TRIGGER, [f"{SOURCE_TRIGGER}_{s}" for s in PARENT_TRIGGERS],
         names.as_text(names.source(layout, pair))),
    ).fetchall()  # fmt: skip
    if not parts:
        return None
    rows = {
        Month.of(m): (int(v), int(b), str(at))
        for m, v, b, at in conn.execute(
            sql.SQL(
                "SELECT month, version, bars, changed_at::text FROM {} WHERE source_table = %s"
            ).format(names.in_schema(schema, SOURCE_VERSIONS)),
            (table,),
        )
    }
    out: dict[Month, tuple[int, int, str, int]] = {}
    for name, filenode, own_guard, parent_guard in parts:
        if not name.startswith(f"{table}_"):
            return None  # partitions not made by bqx: no trustworthy month mapping
        try:
            month = Month.parse(name[len(table) + 1 :])
        except BqxError:
            return None
        if month in rows and own_guard == 1 and parent_guard == len(PARENT_TRIGGERS):
            out[month] = (*rows[month], int(filenode))
        else:
            out[month] = (-1, -1, "", int(filenode))  # unguarded or never versioned: unknown
    return out


def _version_sig(own: tuple[int, int, str, int] | None, month: Month, lookback: str) -> str | None:
    """A signature from the month's version and the exact hash of its lookback bars; None when
    the month's version is unknown (then only the exact signature can decide)."""
    if own is None or own[0] < 0:
        return None
    return "v" + hashlib.sha256(f"{month}:{own}|{lookback}".encode()).hexdigest()[:15]


def _lookback_hashes(
    conn: psycopg.Connection, params: Params, pair: str, months: Sequence[Month]
) -> dict[Month, str]:
    """Per month, count and hash of exactly the lookback bars its job reads: at most W_max bars
    (or minutes) each, found through the time index, in one query per pair."""
    if not months:
        return {}
    q = sql.SQL(
        "SELECT m.k, lb.n, lb.h FROM unnest(%s::timestamptz[]) AS m(k)"
        " LEFT JOIN LATERAL ({}) lb ON true"
    ).format(_lookback_sql(params, pair))
    return {Month.of(k): f"{n}|{h}" for k, n, h in conn.execute(q, ([m.start for m in months],))}


def source_jobs(
    conn: psycopg.Connection, params: Params, pair: str, start: Month | None, end: Month | None,
    source_check: str,
) -> list[Job]:  # fmt: skip
    """A pair's jobs (months with bars) with their signatures, as ``source_check`` asks.

    ``auto``: a month whose version is trusted is identified by that version plus an exact
    hash of its lookback bars (a few dozen per job), so no month is read in full; other
    months are hashed in full. Versions are read before any bar is hashed: a write in between
    only makes the next resume redo the month, never skip it.
    """
    vers = _source_versions(conn, params.layout, pair)

    if source_check == "exact" or vers is None:
        return _source_months(conn, params, pair, start, end, vers)
    trusted = [
        m for m in sorted(vers) if in_range(m, start, end) and vers[m][0] >= 0 and vers[m][1] > 0
    ]
    lookback = _lookback_hashes(conn, params, pair, trusted)
    jobs = []
    for month in sorted(m for m in vers if in_range(m, start, end)):
        if month in lookback:
            ver = _version_sig(vers[month], month, lookback[month])
            jobs.append(Job(pair, month, vers[month][1], None, ver))
        elif vers[month][0] < 0:  # a month bqx did not write, or whose guard is off: hash it
            jobs.extend(_source_months(conn, params, pair, month, month, vers))
    return jobs


def forget_source(cur: psycopg.Cursor, layout: Layout, pair: str) -> None:
    """Inside the caller's transaction: drop the versions kept for a pair's source table (the
    table itself is being dropped)."""
    schema, table = layout.source_name(pair)
    versions = names.in_schema(schema, SOURCE_VERSIONS)
    found = cur.execute("SELECT to_regclass(%s)", (names.as_text(versions),)).fetchone()
    if found is not None and found[0] is not None:
        cur.execute(sql.SQL("DELETE FROM {} WHERE source_table = %s").format(versions), (table,))
