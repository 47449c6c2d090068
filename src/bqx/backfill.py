"""The backfill: plan (pair, month) jobs, run them on workers, record everything in the ledger.

A job reads its month's bars plus the lookback before it (binary COPY out), computes the
metrics (``bqx.metrics``), and in ONE transaction truncates the month's target partition,
COPYs the new rows in and marks the job done. A worker killed at any instant therefore leaves
the month as it was. Jobs are claimed with ``FOR UPDATE SKIP LOCKED`` in the ledger, so any
number of workers, and of concurrent backfills, never process the same job at once.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import date
from typing import Any

import numpy as np
import psycopg
import tenacity
from psycopg import errors as pgerrors
from psycopg import sql

from bqx import metrics
from bqx.config import Settings
from bqx.db import (
    connect,
    copy_in,
    copy_out_series,
    current_user,
    pool,
    resolve_url,
    worker_id,
)
from bqx.errors import BqxError
from bqx.schema import (
    LEDGER_ATTEMPTS,
    LEDGER_JOBS,
    LEDGER_RUNS,
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

HEARTBEAT_INTERVAL_S = 2.0
STALE_AFTER_S = 30.0  # a running job whose heartbeat is older than this belongs to a dead worker
FORMULA_VERSION = 1  # bump when metric definitions change, so resume recomputes
MAX_TRANSIENT_RETRIES = 5
MODES = ("bars", "clock")

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
        try:
            wins = metrics.normalize_windows(windows)
        except ValueError as exc:
            raise BqxError(f"invalid --windows: {exc}") from None
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

    @property
    def hash(self) -> str:
        doc = {**asdict(self), "formula_version": FORMULA_VERSION}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    pair: str
    month: Month
    source_bars: int
    source_sig: str


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


def _source_months(
    conn: psycopg.Connection, layout: Layout, pair: str, start: Month | None, end: Month | None
) -> list[Job]:
    """Per month with bars: exact count and a signature that changes when the bars change."""
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
    q = sql.SQL(
        "SELECT date_trunc('month', {t})::date, count(*), min({t})::text, max({t})::text,"
        " sum(hashfloat8(date_part('epoch', {t})) # hashfloat8({p}::float8))::text"
        " FROM {src}{where} GROUP BY 1 ORDER BY 1"
    ).format(t=layout.time, p=layout.price, src=layout.source(pair), where=where)
    jobs = []
    for first_day, count, lo, hi, total in conn.execute(q, args):
        sig = hashlib.sha256(f"{count}|{lo}|{hi}|{total}".encode()).hexdigest()[:16]
        jobs.append(Job(pair, Month.of(first_day), int(count), sig))
    return jobs


def _plan_jobs(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str], start: Month | None,
    end: Month | None, url: str | None,
) -> list[Job]:  # fmt: skip
    """Every (pair, month) with bars; the per-pair scans run two at a time when a URL is given."""
    if url is None or len(pairs) < 2:
        return [job for pair in pairs for job in _source_months(conn, layout, pair, start, end)]
    with pool(url, 2) as conns:

        def scan(pair: str) -> list[Job]:
            with conns.connection() as conn:
                return _source_months(conn, layout, pair, start, end)

        with ThreadPoolExecutor(max_workers=2) as threads:
            return [job for jobs in threads.map(scan, pairs) for job in jobs]


def preflight(
    conn: psycopg.Connection,
    params: Params,
    pairs: Sequence[str] | None,
    start: Month | None,
    end: Month | None,
    url: str | None = None,
) -> list[Job]:
    """Check everything a run needs, then create targets, partitions and the ledger.

    Every check happens before anything is written, so a configuration error leaves the
    database untouched and stops the run in its first second.
    """
    layout = params.layout
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
    jobs = _plan_jobs(conn, layout, pairs, start, end, url)
    with conn.transaction():
        create_ledger(conn, layout)
        for pair in pairs:
            create_target_table(conn, layout, pair, params.windows)
        for job in jobs:
            ensure_target_partition(conn, layout, job.pair, job.month)
    return jobs


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


def worker_is_dead(worker: str | None) -> bool:
    """True when ``host:pid`` names a process on this host that no longer exists.

    Lets a restart take over a dead local worker's job at once instead of waiting for its
    heartbeat to go stale; workers on other hosts are judged by their heartbeat alone.
    """
    if not worker or ":" not in worker:
        return False
    host, pid = worker.rsplit(":", 1)
    if host != worker_id().rsplit(":", 1)[0] or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    try:  # a killed process nobody has reaped yet is a zombie: dead too
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return False


# -- the ledger ---------------------------------------------------------------------------


class Ledger:
    """SQL against bqx_runs / bqx_jobs / bqx_attempts, in one place."""

    def __init__(self, layout: Layout) -> None:
        self.runs = layout.table(LEDGER_RUNS)
        self.jobs = layout.table(LEDGER_JOBS)
        self.attempts = layout.table(LEDGER_ATTEMPTS)

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(runs=self.runs, jobs=self.jobs, attempts=self.attempts)

    def start_run(
        self, conn: psycopg.Connection, params: Params, doc: dict[str, Any], workers: int,
        executor: str,
    ) -> int:  # fmt: skip
        row = conn.execute(
            self._q(
                "INSERT INTO {runs} (command, params, param_hash, workers, executor, run_by, host)"
                " VALUES ('backfill', %s, %s, %s, %s, %s, %s) RETURNING run_id"
            ),
            (json.dumps(doc), params.hash, workers, executor, current_user(),
             worker_id().rsplit(":", 1)[0]),
        ).fetchone()  # fmt: skip
        return int(row[0])

    def plan(
        self, conn: psycopg.Connection, run_id: int, params: Params, jobs: Sequence[Job],
        force: bool,
    ) -> tuple[list[Job], list[Job]]:  # fmt: skip
        """Mark the jobs to do as pending; return (to_do, skipped)."""
        todo, skipped = [], []
        with conn.transaction():
            existing = {
                (p, Month.of(m)): (status, h, sig, stale or worker_is_dead(worker))
                for p, m, status, h, sig, worker, stale in conn.execute(
                    self._q(
                        "SELECT pair, month, status, param_hash, source_sig, worker,"
                        " heartbeat_at < now() - make_interval(secs => %s) FROM {jobs}"
                        " WHERE pair = ANY(%s) FOR UPDATE"
                    ),
                    (STALE_AFTER_S, sorted({j.pair for j in jobs})),
                )
            }
            for job in jobs:
                status, h, sig, stale = existing.get((job.pair, job.month), (None,) * 4)
                if status == "done" and h == params.hash and sig == job.source_sig and not force:
                    skipped.append(job)
                    continue
                todo.append(job)
                if status == "running" and not stale:
                    continue  # another live worker has it; ours wait or take it over when stale
                conn.execute(
                    self._q(
                        "INSERT INTO {jobs} (pair, month, status, run_id, param_hash, source_bars,"
                        " source_sig, attempts, updated_at)"
                        " VALUES (%s, %s, 'pending', %s, %s, %s, %s, 0, now())"
                        " ON CONFLICT (pair, month) DO UPDATE SET status = 'pending',"
                        " run_id = EXCLUDED.run_id, param_hash = EXCLUDED.param_hash,"
                        " source_bars = EXCLUDED.source_bars, source_sig = EXCLUDED.source_sig,"
                        " attempts = 0, last_error = NULL, worker = NULL, updated_at = now()"
                    ),
                    (job.pair, job.month.first_day, run_id, params.hash, job.source_bars,
                     job.source_sig),
                )  # fmt: skip
            conn.execute(
                self._q("UPDATE {runs} SET jobs_total = %s, jobs_skipped = %s WHERE run_id = %s"),
                (len(jobs), len(skipped), run_id),
            )
        return todo, skipped

    def claim(
        self, conn: psycopg.Connection, keys: Sequence[tuple[str, date]], run_id: int, worker: str
    ) -> tuple[str, Month, int] | None:
        """Take one claimable job among ``keys`` (pending, or running with a stale heartbeat)."""
        pairs = [k[0] for k in keys]
        months = [k[1] for k in keys]
        with conn.transaction():
            row = conn.execute(
                self._q(
                    "UPDATE {jobs} j SET status = 'running', run_id = %s, worker = %s,"
                    " backend_pid = pg_backend_pid(),"
                    " started_at = now(), heartbeat_at = now(), attempts = j.attempts + 1,"
                    " updated_at = now()"
                    " WHERE (j.pair, j.month) = (SELECT pair, month FROM {jobs}"
                    "  WHERE (pair, month) IN (SELECT * FROM unnest(%s::text[], %s::date[]))"
                    "  AND (status = 'pending' OR (status = 'running'"
                    "       AND heartbeat_at < now() - make_interval(secs => %s)))"
                    "  ORDER BY month, pair LIMIT 1 FOR UPDATE SKIP LOCKED)"
                    " RETURNING pair, month, attempts"
                ),
                (run_id, worker, pairs, months, STALE_AFTER_S),
            ).fetchone()
        if row is None:
            return None
        return row[0], Month.of(row[1]), int(row[2])

    def heartbeat(self, conn: psycopg.Connection, pair: str, month: Month, worker: str) -> None:
        conn.execute(
            self._q(
                "UPDATE {jobs} SET heartbeat_at = now() WHERE pair = %s AND month = %s"
                " AND worker = %s AND status = 'running'"
            ),
            (pair, month.first_day, worker),
        )

    def lock_own(self, cur: psycopg.Cursor, pair: str, month: Month, worker: str) -> bool:
        """Inside the write transaction: lock the job row; False if another worker took it over."""
        row = cur.execute(
            self._q("SELECT worker, status FROM {jobs} WHERE pair = %s AND month = %s FOR UPDATE"),
            (pair, month.first_day),
        ).fetchone()
        return row is not None and row[0] == worker and row[1] == "running"

    def finish(
        self, cur: psycopg.Cursor, run_id: int, pair: str, month: Month, worker: str,
        status: str, attempt: int, started: float, source_bars: int | None,
        rows: int | None, error: str | None, params_hash: str | None = None,
    ) -> None:  # fmt: skip
        """Record an attempt's end: done|failed, or retried (the job stays running)."""
        duration = time.time() - started
        if status != "retried":
            cur.execute(
                self._q(
                    "UPDATE {jobs} SET status = %s, rows_written = %s, source_bars ="
                    " coalesce(%s, source_bars), finished_at = now(), duration_s = %s,"
                    " last_error = %s, param_hash = coalesce(%s, param_hash), updated_at = now()"
                    " WHERE pair = %s AND month = %s"
                ),
                (status, rows, source_bars, duration, error, params_hash, pair,
                 month.first_day),
            )  # fmt: skip
        cur.execute(
            self._q(
                "INSERT INTO {attempts} (run_id, pair, month, attempt, status, worker, started_at,"
                " finished_at, duration_s, source_bars, rows_written, error)"
                " VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s), now(), %s, %s, %s, %s)"
            ),
            (run_id, pair, month.first_day, attempt, status, worker, started, duration,
             source_bars, rows, error),
        )  # fmt: skip

    def release(
        self, conn: psycopg.Connection, keys: Sequence[tuple[str, date]], workers: Sequence[str],
        status: str, error: str | None,
    ) -> int:  # fmt: skip
        """Set jobs that ``workers`` hold as running back to ``status`` (pending or failed)."""
        if not workers:
            return 0
        cur = conn.execute(
            self._q(
                "UPDATE {jobs} SET status = %s, last_error = coalesce(%s, last_error),"
                " worker = NULL, updated_at = now()"
                " WHERE status = 'running' AND worker = ANY(%s)"
                " AND (pair, month) IN (SELECT * FROM unnest(%s::text[], %s::date[]))"
            ),
            (status, error, list(workers), [k[0] for k in keys], [k[1] for k in keys]),
        )
        return cur.rowcount

    def progress(
        self, conn: psycopg.Connection, keys: Sequence[tuple[str, date]]
    ) -> dict[str, Any]:
        rows = conn.execute(
            self._q(
                "SELECT status, status = 'running' AND heartbeat_at < now() - make_interval("
                " secs => %s), count(*), coalesce(sum(rows_written), 0),"
                " coalesce(sum(source_bars), 0) FROM {jobs}"
                " WHERE (pair, month) IN (SELECT * FROM unnest(%s::text[], %s::date[]))"
                " GROUP BY 1, 2"
            ),
            (STALE_AFTER_S, [k[0] for k in keys], [k[1] for k in keys]),
        ).fetchall()
        out: dict[str, Any] = {s: 0 for s in ("pending", "running", "done", "failed", "stale")}
        out["rows"] = 0
        out["bars_left"] = 0
        for status, stale, count, rows_written, bars in rows:
            out[status] += int(count)
            out["stale"] += int(count) if stale else 0
            if status == "done":
                out["rows"] = int(rows_written)
            elif status != "failed":
                out["bars_left"] += int(bars)
        return out

    def late(
        self, conn: psycopg.Connection, keys: Sequence[tuple[str, date]], timeout_s: float
    ) -> list[tuple[str, date, str]]:
        """(pair, month, worker) of running jobs among ``keys`` older than ``timeout_s``."""
        return conn.execute(
            self._q(
                "SELECT pair, month, worker FROM {jobs} WHERE status = 'running'"
                " AND started_at < now() - make_interval(secs => %s)"
                " AND (pair, month) IN (SELECT * FROM unnest(%s::text[], %s::date[]))"
            ),
            (timeout_s, [k[0] for k in keys], [k[1] for k in keys]),
        ).fetchall()

    def end_run(self, conn: psycopg.Connection, run_id: int, status: str) -> RunSummary:
        row = conn.execute(
            self._q(
                "WITH a AS (SELECT DISTINCT ON (pair, month) pair, month, status, rows_written"
                "  FROM {attempts} WHERE run_id = %s AND status <> 'retried'"
                "  ORDER BY pair, month, attempt_id DESC)"
                " UPDATE {runs} r SET ended_at = now(), status = CASE WHEN %s = 'done' AND"
                "  EXISTS (SELECT 1 FROM a WHERE a.status = 'failed') THEN 'failed' ELSE %s END,"
                " jobs_done = (SELECT count(*) FROM a WHERE a.status = 'done'),"
                " jobs_failed = (SELECT count(*) FROM a WHERE a.status = 'failed'),"
                " rows_written = (SELECT coalesce(sum(rows_written), 0) FROM a"
                "  WHERE a.status = 'done')"
                " WHERE run_id = %s RETURNING jobs_total, jobs_done, jobs_failed, jobs_skipped,"
                " rows_written, extract(epoch FROM ended_at - started_at), status"
            ),
            (run_id, status, status, run_id),
        ).fetchone()
        failures = conn.execute(
            self._q(
                "SELECT pair, month::text, last_error FROM {jobs} WHERE run_id = %s"
                " AND status = 'failed' ORDER BY pair, month"
            ),
            (run_id,),
        ).fetchall()
        total, done, failed, skipped, rows, dur, final = row
        return RunSummary(
            run_id, int(total), int(done), int(failed), int(skipped), int(rows), float(dur),
            final, [(p, m[:7], e or "") for p, m, e in failures],
        )  # fmt: skip


# -- one job ------------------------------------------------------------------------------


class _Heartbeat(threading.Thread):
    """Keeps the current job's heartbeat fresh on a connection of its own."""

    def __init__(self, url: str, ledger: Ledger, worker: str) -> None:
        super().__init__(daemon=True, name="bqx-heartbeat")
        self.url, self.ledger, self.worker = url, ledger, worker
        self.current: tuple[str, Month] | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        conn: psycopg.Connection | None = None
        while not self.stop.wait(HEARTBEAT_INTERVAL_S):
            job = self.current
            if job is None:
                continue
            try:
                if conn is None or conn.closed:
                    conn = connect(self.url, autocommit=True)
                self.ledger.heartbeat(conn, job[0], job[1], self.worker)
            except (psycopg.Error, BqxError):
                conn = None  # server away: the job's own retry logic deals with it
        if conn is not None:
            conn.close()


def read_series(
    cur: psycopg.Cursor, params: Params, pair: str, month: Month
) -> tuple[np.ndarray, np.ndarray]:
    """The month's bars plus the lookback its first bars need (crossing month boundaries)."""
    layout = params.layout
    src, t, p = layout.source(pair), layout.time, layout.price
    if params.mode == "bars":
        # the W_max bars before the month, however long ago they were
        row = cur.execute(
            sql.SQL(
                "SELECT {t} FROM {src} WHERE {t} < %s ORDER BY {t} DESC OFFSET %s LIMIT 1"
            ).format(t=t, src=src),
            (month.start, metrics.lookback_bars(params.windows) - 1),
        ).fetchone()
        lo = row[0] if row is not None else None
    else:
        lo = (
            month.start
            - np.timedelta64(metrics.lookback_minutes(params.windows, params.max_fill), "m").item()
        )
    q = sql.SQL("SELECT {t}, {p}::float8 FROM {src} WHERE {t} >= %s AND {t} < %s ORDER BY {t}")
    args: list[Any] = [month.start, month.end]
    if lo is not None:
        args[0] = lo
    else:
        q = sql.SQL("SELECT {t}, {p}::float8 FROM {src} WHERE {t} < %s ORDER BY {t}")
        args = [month.end]
    return copy_out_series(cur, q.format(t=t, p=p, src=src), args)


def compute_month(
    params: Params, month: Month, times: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Metrics for the rows inside ``month``: (times, matrix [rate, *metric columns])."""
    cols = metrics.compute(
        times, prices, windows=params.windows, mode=params.mode, max_fill=params.max_fill
    )
    first = int(np.searchsorted(times, np.datetime64(month.start.replace(tzinfo=None), "us")))
    out = np.empty((len(times) - first, 1 + len(params.columns)), dtype=np.float64)
    out[:, 0] = prices[first:]
    for j, name in enumerate(params.columns, start=1):
        out[:, j] = cols[name][first:]
    return times[first:], out


class _Permanent(Exception):
    """A job error that retrying will not fix."""


_TRANSIENT = (
    psycopg.OperationalError,
    pgerrors.SerializationFailure,
    pgerrors.DeadlockDetected,
    pgerrors.AdminShutdown,
    pgerrors.CannotConnectNow,
)


def _is_transient(exc: BaseException) -> bool:
    return isinstance(exc, _TRANSIENT) and not isinstance(exc, pgerrors.QueryCanceled)


class JobRunner:
    """Runs claimed jobs for one worker: read, compute, atomically replace, record."""

    def __init__(self, url: str, params: Params, run_id: int) -> None:
        self.url, self.params, self.run_id = url, params, run_id
        self.ledger = Ledger(params.layout)
        self.worker = worker_id()
        self.conn: psycopg.Connection | None = None
        self.heart = _Heartbeat(url, self.ledger, self.worker)
        self.heart.start()

    def _connection(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.conn = connect(self.url)
        return self.conn

    def close(self) -> None:
        self.heart.stop.set()
        if self.conn is not None:
            self.conn.close()

    def claim(self, keys: Sequence[tuple[str, date]]) -> tuple[str, Month, int] | None:
        return self.ledger.claim(self._connection(), keys, self.run_id, self.worker)

    def run(self, pair: str, month: Month, attempt: int) -> int:
        """Process one claimed job, retrying transient errors; returns rows written (-1: failed)."""
        self.heart.current = (pair, month)
        started = time.time()
        try:
            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception(_is_transient),
                stop=tenacity.stop_after_attempt(MAX_TRANSIENT_RETRIES),
                wait=tenacity.wait_exponential(multiplier=0.5, max=8),
                before_sleep=lambda rs: self._note_retry(pair, month, attempt, started, rs),
                reraise=True,
            )
            for try_ in retrying:
                with try_:
                    return self._attempt(pair, month, attempt, started)
        except Exception as exc:  # a permanent error fails this job; the others go on
            self._fail(pair, month, attempt, started, _describe(exc, pair, month))
            return -1
        finally:
            self.heart.current = None
        return -1  # pragma: no cover - tenacity always returns or raises

    def _attempt(self, pair: str, month: Month, attempt: int, started: float) -> int:
        conn = self._connection()
        with conn.cursor() as cur:
            times, prices = read_series(cur, self.params, pair, month)
        conn.commit()
        try:
            out_times, matrix = compute_month(self.params, month, times, prices)
        except ValueError as exc:
            raise _Permanent(f"bad source bars: {exc}") from None
        cols = ["ts_utc", "rate", *self.params.columns]
        part = self.params.layout.target_partition(pair, month)
        with conn.transaction(), conn.cursor() as cur:
            if not self.ledger.lock_own(cur, pair, month, self.worker):
                raise _Permanent("job was taken over by another worker")
            cur.execute(sql.SQL("TRUNCATE {}").format(part))
            rows = copy_in(cur, part, cols, out_times, matrix)
            self.ledger.finish(
                cur, self.run_id, pair, month, self.worker, "done", attempt, started,
                len(out_times), rows, None, self.params.hash,
            )  # fmt: skip
        return rows

    def _note_retry(
        self, pair: str, month: Month, attempt: int, started: float, rs: tenacity.RetryCallState
    ) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        with contextlib.suppress(Exception):
            conn = self._connection()
            conn.rollback()
            with conn.transaction(), conn.cursor() as cur:
                self.ledger.finish(
                    cur, self.run_id, pair, month, self.worker, "retried", attempt, started,
                    None, None, f"transient, retrying: {_describe(exc, pair, month)}",
                )  # fmt: skip

    def _fail(self, pair: str, month: Month, attempt: int, started: float, error: str) -> None:
        with contextlib.suppress(Exception):
            if self.conn is not None and not self.conn.closed:
                self.conn.rollback()
            conn = self._connection()
            with conn.transaction(), conn.cursor() as cur:
                self.ledger.finish(
                    cur, self.run_id, pair, month, self.worker, "failed", attempt, started,
                    None, None, error,
                )  # fmt: skip


def _describe(exc: BaseException | None, pair: str, month: Month) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    if isinstance(exc, _Permanent):  # our own wording needs no class name
        return f"{pair.upper()} {month}: {text}"
    return f"{pair.upper()} {month}: {type(exc).__name__}: {text}"


# -- local worker processes ---------------------------------------------------------------


def _die_with_parent() -> None:
    """Linux: the kernel kills this worker when the parent dies, so none is ever orphaned."""
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def worker_main(url: str, params: Params, run_id: int, keys: list[tuple[str, date]]) -> None:
    """A worker process: claim and run jobs among ``keys`` until none is claimable."""
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C and stops us
    runner = JobRunner(url, params, run_id)
    try:
        while True:
            job = runner.claim(keys)
            if job is None:
                return
            runner.run(*job)
    finally:
        runner.close()


@dataclass
class _Proc:
    process: subprocess.Popen[bytes]
    worker: str = ""


class LocalExecutor:
    """N worker processes on this machine (``python -m bqx._worker``), watched by the parent.

    Workers are fresh interpreters fed their arguments on stdin, rather than multiprocessing
    children, so that a caller's ``__main__`` is never re-imported and nothing is inherited.
    """

    name = "local"

    def __init__(self, workers: int) -> None:
        self.workers = max(1, workers)
        self.procs: list[_Proc] = []

    def spawn(self, url: str, params: Params, run_id: int, keys: list[tuple[str, date]]) -> None:
        p = subprocess.Popen(
            [sys.executable, "-m", "bqx._worker"], stdin=subprocess.PIPE, close_fds=True
        )
        assert p.stdin is not None
        p.stdin.write(pickle.dumps((url, params, run_id, keys)))
        p.stdin.close()
        host = worker_id().rsplit(":", 1)[0]
        self.procs.append(_Proc(p, f"{host}:{p.pid}"))

    def reap(self) -> list[_Proc]:
        """Remove finished processes; return those that died abnormally."""
        dead = [pr for pr in self.procs if pr.process.poll() is not None]
        self.procs = [pr for pr in self.procs if pr.process.poll() is None]
        return [pr for pr in dead if pr.process.returncode != 0]

    def kill(self, worker: str) -> None:
        """Kill a worker (its job timed out); it is then no longer watched."""
        for pr in [p for p in self.procs if p.worker == worker]:
            pr.process.kill()
            pr.process.wait(timeout=10)
            self.procs.remove(pr)

    def shutdown(self) -> list[str]:
        """Stop every worker (terminate, then kill); returns their worker ids."""
        ids = [pr.worker for pr in self.procs]
        for pr in self.procs:
            if pr.process.poll() is None:
                pr.process.terminate()
        deadline = time.monotonic() + 5
        for pr in self.procs:
            try:
                pr.process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pr.process.kill()
                pr.process.wait(timeout=10)
        self.procs = []
        return ids


# -- the run ------------------------------------------------------------------------------

ProgressFn = Callable[[dict[str, Any]], None]


def backfill(
    settings: Settings,
    layout: Layout,
    *,
    pairs: Sequence[str] | None = None,
    start: Month | None = None,
    end: Month | None = None,
    windows: Sequence[int] = metrics.DEFAULT_WINDOWS,
    mode: str = "bars",
    max_fill: int = 5,
    workers: int | None = None,
    force: bool = False,
    job_timeout: float = 600.0,
    max_attempts: int = 3,
    progress: bool | ProgressFn = False,
) -> RunSummary:
    """Plan (pair, month) jobs and run them on local worker processes. See SPEC 3.1."""
    params = Params.build(layout, windows, mode, max_fill)
    workers = workers or os.cpu_count() or 1
    url = resolve_url(settings)
    with connect(url, autocommit=True) as conn:
        jobs = preflight(conn, params, pairs, start, end, url)
        ledger = Ledger(layout)
        doc = {
            "pairs": sorted({j.pair for j in jobs}),
            "months": sorted({str(j.month) for j in jobs}),
            "jobs": [[j.pair, str(j.month)] for j in jobs],
            "windows": list(params.windows), "mode": params.mode, "max_fill": params.max_fill,
            "schema": layout.schema, "source_table": layout.source_table,
            "time_column": layout.time_column, "price_column": layout.price_column,
            "workers": workers, "executor": LocalExecutor.name, "force": force,
            "job_timeout": job_timeout,
        }  # fmt: skip
        run_id = ledger.start_run(conn, params, doc, workers, LocalExecutor.name)
        todo, _skipped = ledger.plan(conn, run_id, params, jobs, force)
        keys = [(j.pair, j.month.first_day) for j in todo]
        reporter = _make_reporter(progress, len(jobs), len(jobs) - len(todo))
        status = "interrupted"
        executor = LocalExecutor(min(workers, max(1, len(todo))))
        try:
            if todo:
                _drive(conn, ledger, executor, url, params, run_id, keys, job_timeout,
                       max_attempts, reporter)  # fmt: skip
            status = "done"
        except KeyboardInterrupt:
            ids = executor.shutdown()
            ledger.release(conn, keys, ids, "pending", "interrupted by the user")
            raise
        finally:
            executor.shutdown()
            reporter(None)
            summary = ledger.end_run(conn, run_id, status)
    return summary


def _drive(
    conn: psycopg.Connection, ledger: Ledger, executor: LocalExecutor, url: str, params: Params,
    run_id: int, keys: list[tuple[str, date]], job_timeout: float, max_attempts: int,
    reporter: ProgressFn,
) -> None:  # fmt: skip
    """Start workers, watch them and the ledger until every planned job is done or failed."""
    for _ in range(executor.workers):
        executor.spawn(url, params, run_id, keys)
    started = time.monotonic()
    while True:
        time.sleep(0.25)
        for pr in executor.reap():  # a worker died mid-job (killed, crashed)
            error = f"worker {pr.worker} died (exit code {pr.process.returncode})"
            _abandon(conn, ledger, pr.worker, error, max_attempts)
        for pair, month, worker in ledger.late(conn, keys, job_timeout):
            if worker in {pr.worker for pr in executor.procs}:
                executor.kill(worker)  # its transaction dies with it: the month stays as it was
                error = f"{pair.upper()} {str(month)[:7]}: timed out after {job_timeout:g}s"
                _abandon(conn, ledger, worker, error, max_attempts)
        state = ledger.progress(conn, keys)
        state["elapsed"] = time.monotonic() - started
        reporter(state)
        if state["pending"] == 0 and state["running"] == 0:
            return
        claimable = state["pending"] + state["stale"]
        if claimable and len(executor.procs) < executor.workers:
            executor.spawn(url, params, run_id, keys)  # replace a dead or finished worker


def _abandon(
    conn: psycopg.Connection, ledger: Ledger, worker: str, error: str, max_attempts: int
) -> None:
    """The job a dead or killed worker held goes back to pending, or fails once out of tries.

    Its database session is ended first: a session waiting on a lock does not notice that
    its client is gone, and would keep the job's row locked.
    """
    conn.execute(
        ledger._q(
            "SELECT pg_terminate_backend(backend_pid) FROM {jobs} WHERE status = 'running'"
            " AND worker = %s AND backend_pid IS NOT NULL AND backend_pid <> pg_backend_pid()"
        ),
        (worker,),
    )
    with conn.transaction():
        conn.execute(
            ledger._q(
                "WITH j AS (UPDATE {jobs} SET status = CASE WHEN attempts >= %s THEN 'failed'"
                "  ELSE 'pending' END, last_error = %s, worker = NULL, updated_at = now(),"
                "  finished_at = now(), duration_s = extract(epoch FROM now() - started_at)"
                "  WHERE status = 'running' AND worker = %s"
                "  RETURNING run_id, pair, month, attempts, status, started_at)"
                " INSERT INTO {attempts} (run_id, pair, month, attempt, status, worker,"
                " started_at, finished_at, duration_s, error)"
                " SELECT run_id, pair, month, attempts,"
                " CASE WHEN status = 'failed' THEN 'failed' ELSE 'retried' END, %s, started_at,"
                " now(), extract(epoch FROM now() - started_at), %s FROM j"
            ),
            (max_attempts, error, worker, worker, error),
        )


# -- progress -----------------------------------------------------------------------------


def _make_reporter(progress: bool | ProgressFn, total: int, skipped: int) -> ProgressFn:
    if callable(progress):
        return progress
    if not progress:
        return lambda state: None
    from bqx.progress import BackfillProgress

    return BackfillProgress(total, skipped)
