"""Plan and preflight: what a run's output depends on, which (pair, month) jobs exist, and
every check a run needs before anything is written."""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import psycopg
from psycopg import errors as pgerrors
from psycopg import sql

from bqx import metrics
from bqx.db import pool
from bqx.errors import BqxError
from bqx.schema import (
    LEDGER_JOBS,
    LEDGER_RUNS,
    LEDGER_TARGETS,
    PARENT_TRIGGERS,
    SOURCE_TRIGGER,
    SOURCE_VERSIONS,
    TARGET_CORE_COLUMNS,
    Layout,
    Month,
    check_target_columns,
    create_ledger,
    create_target_table,
    ensure_target_partition,
    source_pairs,
    table_columns,
    validate_pair,
)

FORMULA_VERSION = 1  # bump when metric definitions change, so resume recomputes
MODES = ("bars", "clock")
# how resume tells that a job's source is unchanged: "auto" compares the versions bqx keeps
# where its triggers guard them and hashes the bars elsewhere; "exact" always hashes
SOURCE_CHECKS = ("auto", "exact")
MAX_WINDOW = 7 * 24 * 60  # one week of minute bars
PG_MAX_COLUMNS = 1600  # PostgreSQL's limit on columns per table
PLAN_LOCK_TIMEOUT_S = 10.0  # planning waits this long for a lock, then says who holds it

_TIME_TYPES = ("timestamp with time zone", "timestamp without time zone")
_NUMERIC_PREFIXES = ("double precision", "real", "numeric", "integer", "bigint", "smallint")


# -- parameters and plan ------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """What a job's output depends on (besides its source bars); hashed into the ledger."""

    windows: tuple[int, ...] = metrics.DEFAULT_WINDOWS
    mode: str = "bars"
    max_fill: int = 5
    schema: str = "bqx"
    source_table: str = "m1_{pair}"
    time_column: str = "time"
    price_column: str = "close"

    @classmethod
    def build(cls, layout: Layout, windows: Sequence[int], mode: str, max_fill: int) -> Params:
        wins = check_windows(windows)
        if mode not in MODES:
            raise BqxError(f"invalid --mode {mode!r}: expected one of {', '.join(MODES)}")
        if max_fill < 0:
            raise BqxError(f"invalid --max-fill {max_fill}: must be ≥ 0 minutes")
        return cls(
            windows=wins, mode=mode, max_fill=int(max_fill), schema=layout.schema,
            source_table=layout.source_table, time_column=layout.time_column,
            price_column=layout.price_column,
        )  # fmt: skip

    @property
    def layout(self) -> Layout:
        return Layout(self.schema, self.source_table, self.time_column, self.price_column)

    @property
    def columns(self) -> list[str]:
        return metrics.metric_columns(self.windows)

    @cached_property  # asked once per job while planning
    def hash(self) -> str:
        doc = {**asdict(self), "formula_version": FORMULA_VERSION}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    """One (pair, month) and what its output depends on in the source.

    ``source_sig`` is the exact signature (every bar the job reads, hashed), ``source_ver``
    the signature built from the per-month versions bqx records when it writes bars; either
    may be None when unknown. Both cover the job's lookback as well as its month.
    """

    pair: str
    month: Month
    source_bars: int
    source_sig: str | None
    source_ver: str | None = None


@dataclass
class RunSummary:
    run_id: int
    jobs_total: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_skipped: int = 0
    rows_written: int = 0
    duration_s: float = 0.0
    status: str = "running"
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # pair, month, error

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.duration_s if self.duration_s > 0 else 0.0


def _check_source(conn: psycopg.Connection, layout: Layout, pair: str) -> None:
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
        t=layout.time, p=layout.price
    )
    if params.mode == "bars":  # the W_max bars before the month, however long ago
        return sql.SQL(
            "SELECT count(*) AS n, sum({h})::text AS h FROM (SELECT {t}, {p} FROM {src}"
            " WHERE {t} < m.k ORDER BY {t} DESC LIMIT {k}) lb"
        ).format(
            h=h, t=layout.time, p=layout.price, src=layout.source(pair),
            k=sql.Literal(metrics.lookback_bars(params.windows)),
        )  # fmt: skip
    return sql.SQL(
        "SELECT count(*) AS n, sum({h})::text AS h FROM {src}"
        " WHERE {t} >= m.k - make_interval(mins => {mins}) AND {t} < m.k"
    ).format(
        h=h, t=layout.time, src=layout.source(pair),
        mins=sql.Literal(metrics.lookback_minutes(params.windows, params.max_fill)),
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
        cond.append(sql.SQL("{} >= %s").format(layout.time))
        args.append(start.start)
    if end is not None:
        cond.append(sql.SQL("{} < %s").format(layout.time))
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
    ).format(t=layout.time, p=layout.price, src=layout.source(pair), where=where,
             lookback=lookback)  # fmt: skip
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
    versions = sql.Identifier(schema, SOURCE_VERSIONS).as_string(conn)
    readable = conn.execute(
        "SELECT to_regclass(%s) IS NOT NULL AND has_table_privilege(to_regclass(%s), 'SELECT')",
        (versions, versions),
    ).fetchone()[0]
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
         layout.source(pair).as_string(conn)),
    ).fetchall()  # fmt: skip
    if not parts:
        return None
    rows = {
        Month.of(m): (int(v), int(b), str(at))
        for m, v, b, at in conn.execute(
            sql.SQL(
                "SELECT month, version, bars, changed_at::text FROM {} WHERE source_table = %s"
            ).format(sql.Identifier(schema, SOURCE_VERSIONS)),
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


def _pair_jobs(
    conn: psycopg.Connection, params: Params, pair: str, start: Month | None, end: Month | None,
    source_check: str,
) -> list[Job]:  # fmt: skip
    """A pair's jobs with their signatures, as ``source_check`` asks.

    ``auto``: a month whose version is trusted is identified by that version plus an exact
    hash of its lookback bars (a few dozen per job), so no month is read in full; other
    months are hashed in full. Versions are read before any bar is hashed: a write in between
    only makes the next resume redo the month, never skip it.
    """
    vers = _source_versions(conn, params.layout, pair)

    def in_range(m: Month) -> bool:
        return (start is None or m >= start) and (end is None or m <= end)

    if source_check == "exact" or vers is None:
        return _source_months(conn, params, pair, start, end, vers)
    trusted = [m for m in sorted(vers) if in_range(m) and vers[m][0] >= 0 and vers[m][1] > 0]
    lookback = _lookback_hashes(conn, params, pair, trusted)
    jobs = []
    for month in sorted(m for m in vers if in_range(m)):
        if month in lookback:
            ver = _version_sig(vers[month], month, lookback[month])
            jobs.append(Job(pair, month, vers[month][1], None, ver))
        elif vers[month][0] < 0:  # a month bqx did not write, or whose guard is off: hash it
            jobs.extend(_source_months(conn, params, pair, month, month, vers))
    return jobs


# -- planning -----------------------------------------------------------------------------


@contextmanager
def _lock_timeout(conn: psycopg.Connection, seconds: float) -> Iterator[None]:
    """Planning waits at most ``seconds`` for a lock, then says who holds it."""
    conn.execute(sql.SQL("SET lock_timeout = {}").format(sql.Literal(f"{int(seconds * 1000)}ms")))
    try:
        yield
    finally:
        if not conn.closed and not conn.broken:
            conn.execute("RESET lock_timeout")


def _locked_message(
    conn: psycopg.Connection, layout: Layout, pair: str, seconds: float, detail: str
) -> str:
    schema, table = layout.source_name(pair)
    pids: list[int] = []
    with contextlib.suppress(psycopg.Error):
        pids = [
            int(pid)
            for (pid,) in conn.execute(
                "SELECT DISTINCT l.pid FROM pg_locks l WHERE l.granted"
                " AND l.pid <> pg_backend_pid() AND l.mode = 'AccessExclusiveLock'"
                " AND l.relation IN (SELECT to_regclass(%s)"
                " UNION ALL SELECT inhrelid FROM pg_inherits WHERE inhparent = to_regclass(%s))"
                " ORDER BY 1",
                (layout.source(pair).as_string(conn),) * 2,
            )
        ]
    who = f"pid {', '.join(map(str, pids))}" if pids else detail
    return (
        f"source table {schema}.{table} is locked by another session ({who}); waited "
        f"{seconds:g}s (try again when it is released, or end that session)"
    )


def _plan_jobs(
    conn: psycopg.Connection, params: Params, pairs: Sequence[str], start: Month | None,
    end: Month | None, url: str | None, source_check: str = "auto",
    lock_timeout: float = PLAN_LOCK_TIMEOUT_S,
) -> list[Job]:  # fmt: skip
    """Every (pair, month) with bars; the per-pair scans run two at a time when a URL is given.

    Every scan waits at most ``lock_timeout`` for a lock, and Ctrl-C cancels the queries in
    flight instead of waiting for them.
    """

    def scan(c: psycopg.Connection, pair: str) -> list[Job]:
        try:
            with _lock_timeout(c, lock_timeout):
                return _pair_jobs(c, params, pair, start, end, source_check)
        except pgerrors.LockNotAvailable as exc:
            raise BqxError(
                _locked_message(c, params.layout, pair, lock_timeout, str(exc).strip())
            ) from None

    if url is None or len(pairs) < 2:
        return [job for pair in pairs for job in scan(conn, pair)]
    busy: set[psycopg.Connection] = set()
    with pool(url, 2) as conns:

        def pooled(pair: str) -> list[Job]:
            with conns.connection() as c:
                busy.add(c)
                try:
                    return scan(c, pair)
                finally:
                    busy.discard(c)

        with ThreadPoolExecutor(max_workers=2) as threads:
            futures = [threads.submit(pooled, pair) for pair in pairs]
            try:
                return [job for f in futures for job in f.result()]
            except BaseException:  # Ctrl-C or a failed scan: stop the others now
                for f in futures:
                    f.cancel()
                for c in list(busy):
                    with contextlib.suppress(Exception):
                        c.cancel_safe()
                raise


def check_windows(windows: Sequence[int]) -> tuple[int, ...]:
    """Normalised windows, refused when too many (columns) or too large, before any DDL."""
    try:
        wins = metrics.normalize_windows(windows)
    except ValueError as exc:
        raise BqxError(f"invalid --windows: {exc}") from None
    ncols = len(TARGET_CORE_COLUMNS) + len(metrics.metric_columns(wins))
    if ncols > PG_MAX_COLUMNS:
        most = (PG_MAX_COLUMNS - len(TARGET_CORE_COLUMNS) - len(metrics.AGG_STATS)) // len(
            metrics.WINDOW_STATS
        )
        raise BqxError(
            f"invalid --windows: {len(wins)} windows need {ncols} columns, more than "
            f"PostgreSQL's {PG_MAX_COLUMNS} per table (at most {most} windows)"
        )
    if wins[-1] > MAX_WINDOW:
        raise BqxError(
            f"invalid --windows: window {wins[-1]:,} is larger than the maximum {MAX_WINDOW:,}"
            " bars (one week of minutes, docs/metrics.md)"
        )
    return wins


def target_params(params: Params, pair: str) -> dict[str, Any]:
    """The parameters a target table's rows depend on, as recorded in ``bqx_targets``."""
    schema, table = params.layout.source_name(pair)
    return {
        "windows": list(params.windows), "mode": params.mode, "max_fill": params.max_fill,
        "source": f"{schema}.{table}", "time_column": params.time_column,
        "price_column": params.price_column, "formula_version": FORMULA_VERSION,
    }  # fmt: skip


# parameters whose change is refused without --force (a new formula version just recomputes)
_REFUSED_CHANGES = ("windows", "mode", "max_fill", "source", "time_column", "price_column")


def _recorded_params(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str]
) -> dict[str, dict[str, Any]]:
    """Per pair, the parameters its target's rows were computed with (empty when unknown)."""
    out: dict[str, dict[str, Any]] = {}
    if table_columns(conn, layout.schema, LEDGER_RUNS) is None:
        return out
    if table_columns(conn, layout.schema, LEDGER_TARGETS) is not None:
        for target, doc in conn.execute(
            sql.SQL("SELECT target_table, params FROM {}").format(layout.table(LEDGER_TARGETS))
        ):
            out[target] = doc if isinstance(doc, dict) else json.loads(doc)
    # targets written before parameters were recorded: the run that did their latest done job
    for pair, doc in conn.execute(
        sql.SQL(
            "SELECT DISTINCT ON (j.pair) j.pair, r.params FROM {jobs} j JOIN {runs} r"
            " ON r.param_hash = j.param_hash WHERE j.status = 'done' AND j.pair = ANY(%s)"
            " ORDER BY j.pair, j.finished_at DESC NULLS LAST, r.run_id DESC"
        ).format(jobs=layout.table(LEDGER_JOBS), runs=layout.table(LEDGER_RUNS)),
        (list(pairs),),
    ):
        target = layout.target_name(pair)
        if target in out:
            continue
        doc = doc if isinstance(doc, dict) else json.loads(doc)
        lay = Layout(doc.get("schema", layout.schema), doc.get("source_table", "m1_{pair}"),
                     doc.get("time_column", "time"), doc.get("price_column", "close"))  # fmt: skip
        schema, table = lay.source_name(pair)
        out[target] = {
            "windows": doc.get("windows"), "mode": doc.get("mode"),
            "max_fill": doc.get("max_fill"), "source": f"{schema}.{table}",
            "time_column": lay.time_column, "price_column": lay.price_column,
        }  # fmt: skip
    return {p: out[layout.target_name(p)] for p in pairs if layout.target_name(p) in out}


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in _REFUSED_CHANGES if old.get(k) is not None and old.get(k) != new[k]]


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def changed_params(
    conn: psycopg.Connection, params: Params, pairs: Sequence[str], force: bool
) -> set[str]:
    """Pairs whose stored results were computed with other parameters.

    Without ``force`` the first such pair stops the run with one line naming the difference;
    with ``force`` those pairs are recomputed in full (every month, not just the range).
    """
    changed: dict[str, tuple[dict[str, Any], dict[str, Any], list[str]]] = {}
    for pair, old in _recorded_params(conn, params.layout, pairs).items():
        if table_columns(conn, params.layout.schema, params.layout.target_name(pair)) is None:
            continue  # the table was dropped: no stored results to protect
        new = target_params(params, pair)
        diff = _differences(old, new)
        if diff:
            changed[pair] = (old, new, diff)
    if changed and not force:
        pair, (old, new, diff) = next(iter(changed.items()))
        more = f" (and {len(changed) - 1} more pair(s))" if len(changed) > 1 else ""
        was = ", ".join(f"{k}={_show(old[k])}" for k in diff)
        now = ", ".join(f"{k}={_show(new[k])}" for k in diff)
        raise BqxError(
            f"{params.layout.schema}.{params.layout.target_name(pair)} holds results computed "
            f"with {was}, not {now} as asked{more}: add --force to recompute every month of "
            f"{pair.upper()} with the new parameters, or use another --schema "
            "(docs/guarantees.md)"
        )
    return set(changed)


class NothingToPlan(BqxError):
    """No (pair, month) has source bars in the range: nothing to run (exit code 3)."""

    exit_code = 3


def _nothing_message(pairs: Sequence[str], start: Month | None, end: Month | None) -> str:
    names = ", ".join(p.upper() for p in pairs[:5]) + (" …" if len(pairs) > 5 else "")
    span = (
        f" from {start} to {end}" if start and end
        else f" from {start} on" if start
        else f" up to {end}" if end
        else ""
    )  # fmt: skip
    return f"nothing to do: no source bars for {names}{span}; no run was recorded"


def _checked_plan(
    conn: psycopg.Connection, params: Params, pairs: Sequence[str] | None, start: Month | None,
    end: Month | None, url: str | None, force: bool, source_check: str, lock_timeout: float,
) -> tuple[list[str], list[Job], set[str]]:  # fmt: skip
    """Read-only: every check, then the jobs. Returns (pairs, jobs, pairs with new params)."""
    layout = params.layout
    if source_check not in SOURCE_CHECKS:
        raise BqxError(
            f"invalid --source-check {source_check!r}: expected one of {', '.join(SOURCE_CHECKS)}"
        )
    if start is not None and end is not None and end < start:
        raise BqxError(f"--end {end} is before --start {start}")
    if pairs is None:
        pairs = source_pairs(conn, layout)
        if not pairs:
            raise BqxError(
                f"no source tables matching {layout.source_table!r} in schema "
                f"{layout.source_name('xxxxxx')[0]!r}: load bars with `bqx generate` or "
                "`bqx ingest`, or give --pairs/--source-table"
            )
    pairs = [validate_pair(p) for p in pairs]
    for pair in pairs:
        _check_source(conn, layout, pair)
        check_target_columns(conn, layout, pair, params.windows)
    changed = changed_params(conn, params, pairs, force)
    same = [p for p in pairs if p not in changed]
    jobs = _plan_jobs(conn, params, same, start, end, url, source_check, lock_timeout)
    # new parameters for a pair (with --force): every month of it, so the table is consistent
    jobs += _plan_jobs(conn, params, sorted(changed), None, None, url, source_check, lock_timeout)
    if not jobs:
        raise NothingToPlan(_nothing_message(pairs, start, end))
    return pairs, jobs, changed


def preflight(
    conn: psycopg.Connection,
    params: Params,
    pairs: Sequence[str] | None,
    start: Month | None,
    end: Month | None,
    url: str | None = None,
    *,
    force: bool = False,
    source_check: str = "auto",
    lock_timeout: float = PLAN_LOCK_TIMEOUT_S,
) -> list[Job]:
    """Check everything a run needs, then create targets, partitions and the ledger.

    Every check happens before anything is written, so a configuration error leaves the
    database untouched and stops the run in its first second. Raises ``NothingToPlan`` when no
    (pair, month) has source bars in the range.
    """
    layout = params.layout
    pairs, jobs, _changed = _checked_plan(
        conn, params, pairs, start, end, url, force, source_check, lock_timeout
    )
    existing = _target_partitions(conn, layout, pairs)
    try:
        with _lock_timeout(conn, lock_timeout), conn.transaction():
            create_ledger(conn, layout)
            for pair in pairs:
                if layout.target_name(pair) not in existing:
                    create_target_table(conn, layout, pair, params.windows)
            for job in jobs:
                if layout.target_partition_name(job.pair, job.month) not in existing:
                    ensure_target_partition(conn, layout, job.pair, job.month)
    except pgerrors.LockNotAvailable as exc:
        raise BqxError(
            f"a ledger or target table in schema {layout.schema} is locked by another session;"
            f" waited {lock_timeout:g}s ({str(exc).strip().splitlines()[0]})"
        ) from None
    return jobs


def _target_partitions(conn: psycopg.Connection, layout: Layout, pairs: Sequence[str]) -> set[str]:
    """Names of the pairs' target tables and of their attached partitions (one catalog query)."""
    names = [layout.target_name(p) for p in pairs]
    rows = conn.execute(
        "SELECT c.relname FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
        " WHERE n.nspname = %s AND c.relname = ANY(%s) AND c.relkind = 'p'"
        " UNION ALL SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
        " WHERE n.nspname = %s AND p.relname = ANY(%s)",
        (layout.schema, names, layout.schema, names),
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
    names = sorted({layout.target_name(p) for p, _ in keys})
    rows = conn.execute(
        "SELECT c.relname, pg_relation_size(c.oid), pg_stat_get_live_tuples(c.oid)"
        " FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid"
        " JOIN pg_class p ON p.oid = i.inhparent JOIN pg_namespace n ON n.oid = p.relnamespace"
        " WHERE n.nspname = %s AND p.relname = ANY(%s)",
        (layout.schema, names),
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
                sql.SQL("EXISTS (SELECT 1 FROM {})").format(layout.target_partition(*k))
                for k in chunk
            )
        )
        for k, nonempty in zip(chunk, conn.execute(q).fetchone()[0], strict=True):
            out[k] = "ok" if nonempty else "empty"
    return out


@dataclass
class PlannedJob:
    pair: str
    month: Month
    action: str  # "do" or "skip"
    reason: str
    source_bars: int


@dataclass
class BackfillPlan:
    """What ``bqx backfill`` would do, and why, without doing any of it (``--dry-run``)."""

    jobs: list[PlannedJob]
    params: dict[str, Any]
    source_check: str

    @property
    def todo(self) -> list[PlannedJob]:
        return [j for j in self.jobs if j.action == "do"]

    @property
    def skipped(self) -> list[PlannedJob]:
        return [j for j in self.jobs if j.action == "skip"]

    def to_dict(self) -> dict[str, Any]:
        reasons: dict[str, int] = {}
        for j in self.jobs:
            reasons[j.reason] = reasons.get(j.reason, 0) + 1
        return {
            "dry_run": True, "jobs_total": len(self.jobs), "jobs_todo": len(self.todo),
            "jobs_skipped": len(self.skipped), "reasons": reasons,
            "source_check": self.source_check, "params": self.params,
            "jobs": [
                {"pair": j.pair.upper(), "month": str(j.month), "action": j.action,
                 "reason": j.reason, "source_bars": j.source_bars}
                for j in self.jobs
            ],
        }  # fmt: skip


def plan_backfill(
    conn: psycopg.Connection,
    params: Params,
    pairs: Sequence[str] | None = None,
    start: Month | None = None,
    end: Month | None = None,
    *,
    force: bool = False,
    source_check: str = "auto",
    lock_timeout: float = PLAN_LOCK_TIMEOUT_S,
) -> BackfillPlan:
    """The plan a backfill would follow, job by job with its reason; writes nothing at all
    (no run row, no table, no partition)."""
    from bqx.backfill.ledger import Ledger, decide

    layout = params.layout
    with _lock_timeout(conn, lock_timeout):
        pairs, jobs, _changed = _checked_plan(
            conn, params, pairs, start, end, None, force, source_check, lock_timeout
        )
        rows: dict[tuple[str, Month], Any] = {}
        cols = table_columns(conn, layout.schema, LEDGER_JOBS)
        if cols is not None:
            rows = Ledger(layout).read_jobs(conn, pairs, has_ver="source_ver" in cols)
        parts = partition_states(conn, layout, [(j.pair, j.month) for j in jobs])
    planned = []
    for job in jobs:
        key = (job.pair, job.month)
        do, reason = decide(job, rows.get(key), params.hash, parts[key], force)
        planned.append(PlannedJob(job.pair, job.month, "do" if do else "skip", reason,
                                  job.source_bars))  # fmt: skip
    doc = {"windows": list(params.windows), "mode": params.mode, "max_fill": params.max_fill,
           "source_table": layout.source_table, "schema": layout.schema}  # fmt: skip
    return BackfillPlan(planned, doc, source_check)


def init(
    conn: psycopg.Connection,
    layout: Layout,
    pairs: Sequence[str],
    months: Sequence[Month],
    windows: Sequence[int] = metrics.DEFAULT_WINDOWS,
) -> int:
    """``bqx init``: schema, ledger, source and target tables with their partitions. Idempotent.

    Returns the number of (pair, month) partitions ensured.
    """
    from bqx.schema import create_source_table, ensure_source_partition

    pairs = [validate_pair(p) for p in pairs]
    windows = check_windows(windows)
    for pair in pairs:
        check_target_columns(conn, layout, pair, windows)
    with conn.transaction():
        create_ledger(conn, layout)
        for pair in pairs:
            create_source_table(conn, layout, pair)
            create_target_table(conn, layout, pair, windows)
            for month in months:
                ensure_source_partition(conn, layout, pair, month)
                ensure_target_partition(conn, layout, pair, month)
    return len(pairs) * len(months)
