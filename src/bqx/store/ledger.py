"""The ledger: every run, job and attempt, and the parameters each target was computed with.

The only module that reads or writes ``bqx_runs``, ``bqx_jobs``, ``bqx_attempts`` and
``bqx_targets``. Jobs are claimed with ``FOR UPDATE SKIP LOCKED``, so any number of workers,
and of concurrent runs, never process the same job at once; a job's write transaction locks
its ledger row, which is also what keeps an ``update`` and a backfill of one month apart.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any

import psycopg
from psycopg import sql

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.params import Job, Params, RunSummary
from bqx.db.connect import current_user, worker_id
from bqx.errors import BqxError
from bqx.store import names
from bqx.store.ddl import create_schema, lock_schema_ddl

RUNS = "bqx_runs"
JOBS = "bqx_jobs"
ATTEMPTS = "bqx_attempts"
TARGETS = "bqx_targets"
VERIFICATIONS = "bqx_verifications"

HEARTBEAT_INTERVAL_S = 2.0
STALE_AFTER_S = 30.0  # a running job whose heartbeat is older than this belongs to a dead worker

_DDL = """
CREATE TABLE IF NOT EXISTS {runs} (
    run_id      bigserial PRIMARY KEY,
    command     text NOT NULL,
    params      jsonb NOT NULL,
    param_hash  text NOT NULL,
    started_at  timestamptz NOT NULL DEFAULT now(),
    ended_at    timestamptz,
    status      text NOT NULL DEFAULT 'running'
                CHECK (status IN ('running', 'done', 'failed', 'interrupted')),
    jobs_total  integer NOT NULL DEFAULT 0,
    jobs_done   integer NOT NULL DEFAULT 0,
    jobs_failed integer NOT NULL DEFAULT 0,
    jobs_skipped integer NOT NULL DEFAULT 0,
    rows_written bigint NOT NULL DEFAULT 0,
    workers     integer,
    executor    text,
    run_by      text NOT NULL,
    host        text NOT NULL
);
CREATE TABLE IF NOT EXISTS {jobs} (
    pair         text NOT NULL,
    month        date NOT NULL,
    status       text NOT NULL DEFAULT 'pending'
                 CHECK (status IN ('pending', 'running', 'done', 'failed')),
    run_id       bigint REFERENCES {runs} (run_id),
    param_hash   text,
    source_bars  bigint,
    source_sig   text,
    rows_written bigint,
    attempts     integer NOT NULL DEFAULT 0,
    started_at   timestamptz,
    finished_at  timestamptz,
    duration_s   double precision,
    worker       text,
    heartbeat_at timestamptz,
    last_error   text,
    updated_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (pair, month)
);
CREATE TABLE IF NOT EXISTS {attempts} (
    attempt_id   bigserial PRIMARY KEY,
    run_id       bigint REFERENCES {runs} (run_id),
    pair         text NOT NULL,
    month        date NOT NULL,
    attempt      integer NOT NULL,
    status       text NOT NULL CHECK (status IN ('done', 'failed', 'retried')),
    worker       text,
    started_at   timestamptz NOT NULL,
    finished_at  timestamptz NOT NULL,
    duration_s   double precision NOT NULL,
    source_bars  bigint,
    rows_written bigint,
    error        text
);
CREATE INDEX IF NOT EXISTS {attempts_run_idx} ON {attempts} (run_id, finished_at);
-- the worker's database session, so a stuck job's session can be ended with its worker
ALTER TABLE {jobs} ADD COLUMN IF NOT EXISTS backend_pid integer;
-- the run's driver process and its liveness: a run whose driver died is marked interrupted
ALTER TABLE {runs} ADD COLUMN IF NOT EXISTS pid integer;
ALTER TABLE {runs} ADD COLUMN IF NOT EXISTS heartbeat_at timestamptz;
-- the source versions a done job was computed from (resume with --source-check auto)
ALTER TABLE {jobs} ADD COLUMN IF NOT EXISTS source_ver text;
-- the parameters each target table's rows were computed with, so a run with other ones is
-- refused instead of silently replacing them month by month
CREATE TABLE IF NOT EXISTS {targets} (
    target_table text PRIMARY KEY,
    params       jsonb NOT NULL,
    param_hash   text NOT NULL,
    run_id       bigint,
    updated_at   timestamptz NOT NULL DEFAULT now()
);
-- what a done job read and wrote: its source partition's write counters before it read, and
-- the version its write gave the month's metrics (so a write by anyone else shows)
ALTER TABLE {jobs} ADD COLUMN IF NOT EXISTS source_stats text;
ALTER TABLE {jobs} ADD COLUMN IF NOT EXISTS target_ver bigint;
-- each month's last verification: what it saw of its bars and metrics, and what it found
CREATE TABLE IF NOT EXISTS {verifications} (
    pair          text NOT NULL,
    month         date NOT NULL,
    verified_at   timestamptz NOT NULL DEFAULT now(),
    ok            boolean NOT NULL,
    param_hash    text,
    source_sig    text,
    source_stats  text,
    target_ver    bigint,
    target_stats  text,
    rows          bigint,
    bars          bigint,
    faults        jsonb,
    PRIMARY KEY (pair, month)
);
"""

# the newest column of each ledger table: when all are there, the ledger needs no DDL
_NEWEST = (
    (RUNS, "heartbeat_at"), (RUNS, "pid"), (JOBS, "source_ver"), (JOBS, "backend_pid"),
    (JOBS, "source_stats"), (JOBS, "target_ver"), (ATTEMPTS, "error"), (TARGETS, "params"),
    (VERIFICATIONS, "target_stats"),
)  # fmt: skip


@dataclass(frozen=True)
class LedgerRow:
    """What the resume rule needs of a job's ledger row."""

    status: str
    param_hash: str | None = None
    source_sig: str | None = None  # the exact signature of the bars it read
    source_ver: str | None = None  # the version signature it was planned with
    stale: bool = False  # running, but its worker is gone
    source_stats: str | None = None  # its source partition's write counters before it read
    target_ver: int | None = None  # the version its write gave the month's metrics


@dataclass(frozen=True)
class MonthSeen:
    """What a verification saw of a month before reading it: the parameters, the version (or
    exact signature) and write counters of its bars, and the version and write counters of its
    metrics. A month whose state is the same as at its last passed verification, with nothing
    unknown, is unchanged since."""

    param_hash: str | None
    source_sig: str | None
    source_stats: str | None
    target_ver: int | None
    target_stats: str | None

    @property
    def known(self) -> bool:
        return None not in (self.param_hash, self.source_sig, self.target_ver, self.target_stats)


@dataclass(frozen=True)
class Verified:
    """A month's last verification."""

    ok: bool
    seen: MonthSeen
    rows: int | None
    verified_at: datetime


@dataclass(frozen=True)
class Written:
    """What a done job read and wrote, as the ledger keeps it for later resumes."""

    source_sig: str | None = None  # the exact signature of the bars it read
    source_stats: str | None = None  # its source partition's write counters before it read
    target_ver: int | None = None  # the version its write gave the month's metrics


JobKey = tuple[str, Month]
Decide = Callable[[Job, LedgerRow | None], tuple[bool, str]]


def worker_is_dead(worker: str | None) -> bool:
    """True when ``host:pid`` (or ``host:pid#n``, a thread of it) names a process on this
    host that no longer exists.

    Lets a restart take over a dead local worker's job at once instead of waiting for its
    heartbeat to go stale; workers on other hosts are judged by their heartbeat alone.
    """
    if not worker or ":" not in worker:
        return False
    host, pid = worker.rsplit(":", 1)
    pid = pid.split("#", 1)[0]
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


_RUN_LISTS = ("jobs", "pairs", "months")  # a run document's lists, as long as the run is big


def _doc(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else json.loads(value)


def _keys(keys: Sequence[tuple[str, date]]) -> tuple[list[str], list[date]]:
    return [k[0] for k in keys], [k[1] for k in keys]


@dataclass
class RunRecord:
    """A row of ``bqx_runs``, its parameters decoded."""

    run_id: int
    command: str
    params: dict[str, Any]
    param_hash: str
    started_at: datetime
    ended_at: datetime | None
    status: str
    jobs_total: int
    jobs_done: int
    jobs_failed: int
    jobs_skipped: int
    rows_written: int
    workers: int | None
    executor: str | None
    run_by: str
    host: str
    elapsed_s: float

    @property
    def planned(self) -> list[tuple[str, date]]:
        """The (pair, first day of month) jobs the run planned."""
        return [(p, Month.parse(m).first_day) for p, m in self.params.get("jobs", [])]


@dataclass
class JobRecord:
    """A row of ``bqx_jobs`` as status and verify read it."""

    pair: str
    month: date
    status: str
    rows_written: int | None
    source_bars: int | None
    worker: str | None
    heartbeat_age_s: float | None
    running_s: float | None
    attempts: int
    last_error: str | None

    @property
    def stale(self) -> bool:
        age = self.heartbeat_age_s
        return (age is not None and age > STALE_AFTER_S) or worker_is_dead(self.worker)


class Ledger:
    """SQL against the ledger tables of one schema, in one place."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._last_beat = 0.0
        self.runs = names.table(layout, RUNS)
        self.jobs = names.table(layout, JOBS)
        self.attempts = names.table(layout, ATTEMPTS)
        self.targets = names.table(layout, TARGETS)
        self.verifications = names.table(layout, VERIFICATIONS)

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(
            runs=self.runs, jobs=self.jobs, attempts=self.attempts, targets=self.targets,
            verifications=self.verifications,
        )  # fmt: skip

    # -- the tables ----------------------------------------------------------------------

    @staticmethod
    def _table_exists(conn: psycopg.Connection, table: sql.Identifier) -> bool:
        row = conn.execute("SELECT to_regclass(%s) IS NOT NULL", (names.as_text(table),)).fetchone()
        return bool(row and row[0])

    def exists(self, conn: psycopg.Connection) -> bool:
        """Whether the ledger has been created in this schema (a catalog read)."""
        return self._table_exists(conn, self.runs)

    def has_jobs_table(self, conn: psycopg.Connection) -> bool:
        return self._table_exists(conn, self.jobs)

    def is_current(self, conn: psycopg.Connection) -> bool:
        """True when every ledger table and column exists (a catalog read, no lock taken)."""
        row = conn.execute(
            "SELECT count(*) FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = %s"
            " AND NOT a.attisdropped AND (c.relname, a.attname) IN"
            " (SELECT * FROM unnest(%s::text[], %s::text[]))",
            (self.layout.schema, [t for t, _ in _NEWEST], [c for _, c in _NEWEST]),
        ).fetchone()
        return row is not None and int(row[0]) == len(_NEWEST)

    def create(self, conn: psycopg.Connection) -> None:
        """The ledger tables, only when something is missing: ``ALTER TABLE … ADD COLUMN IF
        NOT EXISTS`` takes an exclusive lock even when the column exists, which would deadlock
        with an ``update`` or another run writing the ledger."""
        if self.is_current(conn):
            return
        lock_schema_ddl(conn, self.layout)
        create_schema(conn, self.layout.schema)
        conn.execute(
            sql.SQL(_DDL).format(
                runs=self.runs,
                jobs=self.jobs,
                attempts=self.attempts,
                targets=self.targets,
                verifications=self.verifications,
                attempts_run_idx=names.bare(f"{ATTEMPTS}_run_idx"),
            )  # fmt: skip
        )

    # -- runs ----------------------------------------------------------------------------

    def start_run(
        self, conn: psycopg.Connection, command: str, params: Params, doc: dict[str, Any],
        workers: int, executor: str, jobs_total: int = 0,
    ) -> int:  # fmt: skip
        row = conn.execute(
            self._q(
                "INSERT INTO {runs} (command, params, param_hash, workers, executor, run_by, host,"
                " pid, heartbeat_at, jobs_total) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, now(), %s)"
                " RETURNING run_id"
            ),
            (command, json.dumps(doc), params.hash, workers, executor, current_user(),
             worker_id().rsplit(":", 1)[0], os.getpid(), jobs_total),
        ).fetchone()  # fmt: skip
        assert row is not None
        return int(row[0])

    def beat_run(self, conn: psycopg.Connection, run_id: int) -> None:
        """The driver is alive (at most one write every HEARTBEAT_INTERVAL_S)."""
        now = time.monotonic()
        if now - self._last_beat < HEARTBEAT_INTERVAL_S:
            return
        conn.execute(self._q("UPDATE {runs} SET heartbeat_at = now() WHERE run_id = %s"), (run_id,))
        self._last_beat = now

    def mark_orphaned_runs(self, conn: psycopg.Connection) -> list[int]:
        """Runs left ``running`` by a driver that died (killed, crashed, host lost) become
        ``interrupted``: their driver process is gone on this host, or their heartbeat (or, in
        ledgers without one, their start) is older than STALE_AFTER_S with no live job."""
        here = worker_id().rsplit(":", 1)[0]
        candidates = conn.execute(
            self._q(
                "SELECT run_id, host, pid, coalesce(heartbeat_at, started_at)"
                " < now() - make_interval(secs => %s) AND NOT EXISTS (SELECT 1 FROM {jobs} j"
                "  WHERE j.run_id = r.run_id AND j.status = 'running'"
                "  AND j.heartbeat_at >= now() - make_interval(secs => %s))"
                " FROM {runs} r WHERE status = 'running'"
            ),
            (STALE_AFTER_S, STALE_AFTER_S),
        ).fetchall()
        dead = [
            run_id for run_id, host, pid, stale in candidates
            if stale or (host == here and pid is not None and worker_is_dead(f"{host}:{pid}"))
        ]  # fmt: skip
        for run_id in dead:
            self.end_run(conn, run_id, "interrupted")
        return dead

    def end_run(self, conn: psycopg.Connection, run_id: int, status: str) -> RunSummary:
        """Close a run: its totals from its attempts, ``failed`` if any job failed."""
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
        assert row is not None
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

    def latest_run(
        self, conn: psycopg.Connection, run_id: int | None = None, *, include_empty: bool = False,
        worked: bool = False,
    ) -> RunRecord | None:  # fmt: skip
        """``run_id``'s run, else the latest run with jobs (or any, with ``include_empty``;
        with ``worked``, the latest that ran a job or is running, else the latest with jobs).

        A run that planned no job (a range without source bars) has nothing to show, check or
        report, and must not hide the real latest run; a resume that found nothing to do must
        not hide the run that did the work.
        """
        if not self.exists(conn):
            return None
        if worked and run_id is None:
            row = conn.execute(
                self._q(
                    "SELECT max(r.run_id) FROM {runs} r WHERE r.status = 'running' OR EXISTS"
                    " (SELECT 1 FROM {attempts} a WHERE a.run_id = r.run_id)"
                )
            ).fetchone()
            if row is not None and row[0] is not None:
                run_id = int(row[0])
        cur = conn.execute(
            self._q(
                "SELECT run_id, command, params, param_hash, started_at, ended_at, status,"
                " jobs_total, jobs_done, jobs_failed, jobs_skipped, rows_written, workers,"
                " executor, run_by, host,"
                " extract(epoch FROM coalesce(ended_at, now()) - started_at)::float8"
                " FROM {runs} WHERE (%s::bigint IS NULL OR run_id = %s) AND (%s::bigint IS NOT"
                "  NULL OR %s OR jobs_total > 0"
                "  OR coalesce(jsonb_array_length(CASE WHEN jsonb_typeof(params->'jobs') ="
                "   'array' THEN params->'jobs' END), 0) > 0)"
                " ORDER BY run_id DESC LIMIT 1"
            ),
            (run_id, run_id, run_id, include_empty),
        )
        row = cur.fetchone()
        if row is None:
            return None
        return _run_record(row)

    def recent_runs(self, conn: psycopg.Connection, limit: int = 20) -> list[RunRecord]:
        """The latest runs, newest first."""
        if not self.exists(conn):
            return []
        rows = conn.execute(
            self._q(
                "SELECT run_id, command, params, param_hash, started_at, ended_at, status,"
                " jobs_total, jobs_done, jobs_failed, jobs_skipped, rows_written, workers,"
                " executor, run_by, host,"
                " extract(epoch FROM coalesce(ended_at, now()) - started_at)::float8"
                " FROM {runs} ORDER BY run_id DESC LIMIT %s"
            ),
            (limit,),
        ).fetchall()
        return [_run_record(r) for r in rows]

    # -- planning ------------------------------------------------------------------------

    def read_jobs(
        self, conn: psycopg.Connection, pairs: Sequence[str], *, lock: bool = False
    ) -> dict[JobKey, LedgerRow]:
        """(pair, month) -> ledger row of the pairs' jobs; ``lock`` takes them FOR UPDATE
        (inside the caller's transaction). Columns that a ledger made by an older bqx lacks
        read as NULL (a dry run does not upgrade it)."""
        if not self.has_jobs_table(conn):
            return {}
        optional = ("source_ver", "source_stats", "target_ver")
        have = {
            name for (name,) in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = to_regclass(%s)"
                " AND attname = ANY(%s) AND NOT attisdropped",
                (names.as_text(self.jobs), list(optional)),
            )
        }  # fmt: skip
        cols = [names.column(c) if c in have else sql.NULL for c in optional]
        query = sql.SQL(
            "SELECT pair, month, status, param_hash, source_sig, {cols}, worker,"
            " heartbeat_at < now() - make_interval(secs => %s) FROM {jobs} WHERE pair = ANY(%s)"
            "{lock}"
        ).format(
            cols=sql.SQL(", ").join(cols), jobs=self.jobs,
            lock=sql.SQL(" FOR UPDATE" if lock else ""),
        )  # fmt: skip
        return {
            (p, Month.of(m)): LedgerRow(
                status, h, sig, ver, bool(stale) or worker_is_dead(worker), stats,
                None if tver is None else int(tver),
            )
            for p, m, status, h, sig, ver, stats, tver, worker, stale in conn.execute(
                query, (STALE_AFTER_S, sorted(set(pairs)))
            )
        }  # fmt: skip

    def observe(
        self, conn: psycopg.Connection, seen: Sequence[tuple[str, Month, str | None, int | None]]
    ) -> None:
        """Record, for done jobs found unchanged, their source's write counters and their
        metrics' version as they are now (a no-op resume after a bar-by-bar check, or the first
        one after an upgrade): later resumes compare with these."""
        for pair, month, stats, tver in seen:
            conn.execute(
                self._q(
                    "UPDATE {jobs} SET source_stats = coalesce(%s, source_stats),"
                    " target_ver = coalesce(%s, target_ver) WHERE pair = %s AND month = %s"
                    " AND status = 'done'"
                ),
                (stats, tver, pair, month.first_day),
            )

    def plan(
        self, conn: psycopg.Connection, run_id: int, params: Params, jobs: Sequence[Job],
        decide: Decide,
    ) -> tuple[list[Job], list[Job], dict[JobKey, str]]:  # fmt: skip
        """Mark the jobs ``decide`` wants done as pending, in one transaction; return (to do,
        skipped, why per job). A job running in a live worker elsewhere is left to it."""
        pairs = sorted({j.pair for j in jobs})
        todo, skipped, reasons = [], [], {}
        with conn.transaction():
            existing = self.read_jobs(conn, pairs, lock=True)
            for job in jobs:
                key = (job.pair, job.month)
                do, reason = decide(job, existing.get(key))
                reasons[key] = reason
                if not do:
                    skipped.append(job)
                    continue
                todo.append(job)
                if reason == "running elsewhere":
                    continue  # another live worker has it; ours wait or take it over when stale
                self._pending(conn, run_id, params, job)
            conn.execute(
                self._q("UPDATE {runs} SET jobs_total = %s, jobs_skipped = %s WHERE run_id = %s"),
                (len(jobs), len(skipped), run_id),
            )
            self.record_params(conn, run_id, params, pairs)
        return todo, skipped, reasons

    def _pending(self, conn: psycopg.Connection, run_id: int, params: Params, job: Job) -> None:
        conn.execute(
            self._q(
                "INSERT INTO {jobs} (pair, month, status, run_id, param_hash, source_bars,"
                " source_sig, source_ver, attempts, updated_at)"
                " VALUES (%s, %s, 'pending', %s, %s, %s, %s, %s, 0, now())"
                " ON CONFLICT (pair, month) DO UPDATE SET status = 'pending',"
                " run_id = EXCLUDED.run_id, param_hash = EXCLUDED.param_hash,"
                " source_bars = EXCLUDED.source_bars, source_sig = EXCLUDED.source_sig,"
                " source_ver = EXCLUDED.source_ver, attempts = 0, last_error = NULL,"
                " worker = NULL, updated_at = now()"
            ),
            (job.pair, job.month.first_day, run_id, params.hash, job.source_bars,
             job.source_sig, job.source_ver),
        )  # fmt: skip

    def record_params(
        self, conn: psycopg.Connection, run_id: int, params: Params, pairs: Sequence[str]
    ) -> None:
        """Remember the parameters each target table is computed with (``bqx_targets``)."""
        for pair in pairs:
            conn.execute(
                self._q(
                    "INSERT INTO {targets} AS t (target_table, params, param_hash, run_id)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (target_table) DO UPDATE SET"
                    " params = EXCLUDED.params, param_hash = EXCLUDED.param_hash,"
                    " run_id = EXCLUDED.run_id, updated_at = now()"
                    " WHERE t.param_hash IS DISTINCT FROM EXCLUDED.param_hash"
                ),
                (self.layout.target_name(pair), json.dumps(params.target_doc(pair)), params.hash,
                 run_id),
            )  # fmt: skip

    def recorded_params(
        self, conn: psycopg.Connection, pairs: Sequence[str]
    ) -> dict[str, dict[str, Any]]:
        """Per pair, the parameters its target's rows were computed with (absent: unknown)."""
        out: dict[str, dict[str, Any]] = {}
        if not self.exists(conn):
            return out
        if self._table_exists(conn, self.targets):
            for target, doc in conn.execute(self._q("SELECT target_table, params FROM {targets}")):
                out[target] = _doc(doc)
        # targets written before parameters were recorded: the run of their latest done job
        # (asked only for those: a run's document lists all its jobs, 40 KB at 1,500)
        older = [p for p in pairs if self.layout.target_name(p) not in out]
        for pair, doc in conn.execute(
            self._q(
                "SELECT DISTINCT ON (j.pair) j.pair, r.params FROM {jobs} j JOIN {runs} r"
                " ON r.param_hash = j.param_hash WHERE j.status = 'done' AND j.pair = ANY(%s)"
                " ORDER BY j.pair, j.finished_at DESC NULLS LAST, r.run_id DESC"
            ),
            (older,),
        ) if older else ():  # fmt: skip
            target = self.layout.target_name(pair)
            if target not in out:
                out[target] = _legacy_target_doc(_doc(doc), pair, self.layout)
        return {
            p: out[self.layout.target_name(p)] for p in pairs if self.layout.target_name(p) in out
        }

    def pair_params(self, conn: psycopg.Connection) -> dict[str, dict[str, Any]]:
        """Per pair, the parameters of the latest run that wrote one of its months."""
        if not self.has_jobs_table(conn):
            return {}
        latest = conn.execute(
            self._q(
                "SELECT DISTINCT ON (pair) pair, run_id FROM {jobs} WHERE run_id IS NOT NULL"
                " ORDER BY pair, run_id DESC"
            )
        ).fetchall()
        # each run's document once, without its lists of jobs, pairs and months: a run of N
        # pairs lists every one of its jobs, and reading it once per pair cost O(N × jobs)
        runs = {
            run_id: _doc(doc)
            for run_id, doc in conn.execute(
                self._q("SELECT run_id, params - %s::text[] FROM {runs} WHERE run_id = ANY(%s)"),
                (list(_RUN_LISTS), sorted({r for _, r in latest})),
            )
        }
        return {pair: runs[r] for pair, r in latest if r in runs}

    # -- a job's life --------------------------------------------------------------------

    def claim(
        self, conn: psycopg.Connection, keys: Sequence[tuple[str, date]], run_id: int, worker: str
    ) -> tuple[str, Month, int] | None:
        """Take one claimable job among ``keys`` (pending, or running with a stale heartbeat)."""
        pairs, months = _keys(keys)
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
        written: Written | None = None,
    ) -> None:  # fmt: skip
        """Record an attempt's end: done|failed, or retried (the job stays running); a done
        job also records what it read and wrote (``written``)."""
        duration = time.time() - started
        w = written or Written()
        if status != "retried":
            cur.execute(
                self._q(
                    "UPDATE {jobs} SET status = %s, rows_written = %s, source_bars ="
                    " coalesce(%s, source_bars), finished_at = now(), duration_s = %s,"
                    " last_error = %s, param_hash = coalesce(%s, param_hash),"
                    " source_sig = coalesce(%s, source_sig), source_stats = %s,"
                    " target_ver = %s, updated_at = now() WHERE pair = %s AND month = %s"
                ),
                (status, rows, source_bars, duration, error, params_hash, w.source_sig,
                 w.source_stats, w.target_ver, pair, month.first_day),
            )  # fmt: skip
        self._attempt(cur, run_id, pair, month, attempt, status, worker, started, source_bars,
                      rows, error)  # fmt: skip

    def _attempt(
        self, cur: psycopg.Cursor, run_id: int, pair: str, month: Month, attempt: int,
        status: str, worker: str, started: float, source_bars: int | None, rows: int | None,
        error: str | None,
    ) -> None:  # fmt: skip
        cur.execute(
            self._q(
                "INSERT INTO {attempts} (run_id, pair, month, attempt, status, worker, started_at,"
                " finished_at, duration_s, source_bars, rows_written, error)"
                " VALUES (%s, %s, %s, %s, %s, %s, to_timestamp(%s), now(), %s, %s, %s, %s)"
            ),
            (run_id, pair, month.first_day, attempt, status, worker, started,
             time.time() - started, source_bars, rows, error),
        )  # fmt: skip

    def end_sessions(self, conn: psycopg.Connection, workers: Sequence[str]) -> None:
        """End the database sessions of running jobs held by ``workers`` (already stopped).

        A session waiting on a lock does not notice that its client is gone, and would keep
        its job row locked: releasing or abandoning the job would then wait for ever.
        """
        if workers:
            conn.execute(
                self._q(
                    "SELECT pg_terminate_backend(backend_pid) FROM {jobs} WHERE status = 'running'"
                    " AND worker = ANY(%s) AND backend_pid IS NOT NULL"
                    " AND backend_pid <> pg_backend_pid()"
                ),
                (list(workers),),
            )

    def release(
        self, conn: psycopg.Connection, keys: Sequence[tuple[str, date]], workers: Sequence[str],
        status: str, error: str | None,
    ) -> int:  # fmt: skip
        """Set jobs that ``workers`` hold as running back to ``status`` (pending or failed)."""
        if not workers:
            return 0
        pairs, months = _keys(keys)
        cur = conn.execute(
            self._q(
                "UPDATE {jobs} SET status = %s, last_error = coalesce(%s, last_error),"
                " worker = NULL, updated_at = now()"
                " WHERE status = 'running' AND worker = ANY(%s)"
                " AND (pair, month) IN (SELECT * FROM unnest(%s::text[], %s::date[]))"
            ),
            (status, error, list(workers), pairs, months),
        )
        return cur.rowcount

    def abandon(self, conn: psycopg.Connection, worker: str, error: str, max_attempts: int) -> None:
        """The job a dead or killed worker held goes back to pending, or fails once out of
        tries; the attempt is recorded. Its session is ended first (see ``end_sessions``)."""
        self.end_sessions(conn, [worker])
        with conn.transaction():
            conn.execute(
                self._q(
                    "WITH j AS (UPDATE {jobs} SET status = CASE WHEN attempts >= %s THEN"
                    "  'failed' ELSE 'pending' END, last_error = %s, worker = NULL,"
                    "  updated_at = now(), finished_at = now(),"
                    "  duration_s = extract(epoch FROM now() - started_at)"
                    "  WHERE status = 'running' AND worker = %s"
                    "  RETURNING run_id, pair, month, attempts, status, started_at)"
                    " INSERT INTO {attempts} (run_id, pair, month, attempt, status, worker,"
                    " started_at, finished_at, duration_s, error)"
                    " SELECT run_id, pair, month, attempts,"
                    " CASE WHEN status = 'failed' THEN 'failed' ELSE 'retried' END, %s,"
                    " started_at, now(), extract(epoch FROM now() - started_at), %s FROM j"
                ),
                (max_attempts, error, worker, worker, error),
            )

    def progress(
        self, conn: psycopg.Connection, keys: Sequence[tuple[str, date]]
    ) -> dict[str, Any]:
        """Counts per status of ``keys``, rows written, and source bars of unfinished jobs."""
        pairs, months = _keys(keys)
        rows = conn.execute(
            self._q(
                "SELECT status, status = 'running' AND heartbeat_at < now() - make_interval("
                " secs => %s), count(*), coalesce(sum(rows_written), 0),"
                " coalesce(sum(source_bars), 0) FROM {jobs}"
                " WHERE (pair, month) IN (SELECT * FROM unnest(%s::text[], %s::date[]))"
                " GROUP BY 1, 2"
            ),
            (STALE_AFTER_S, pairs, months),
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
        pairs, months = _keys(keys)
        rows = conn.execute(
            self._q(
                "SELECT pair, month, worker FROM {jobs} WHERE status = 'running'"
                " AND started_at < now() - make_interval(secs => %s)"
                " AND (pair, month) IN (SELECT * FROM unnest(%s::text[], %s::date[]))"
            ),
            (timeout_s, pairs, months),
        ).fetchall()
        return [(p, m, w) for p, m, w in rows]

    # -- an update's month ---------------------------------------------------------------

    def lock_month(
        self, cur: psycopg.Cursor, run_id: int, pair: str, month: Month, param_hash: str
    ) -> tuple[str, str | None, bool]:
        """Lock (creating it if needed) the month's job row: the lock a backfill write takes.

        Returns (status, worker, stale). The row is always touched, so a concurrent
        repeatable-read writer of the month fails to serialize and retries.
        """
        row = cur.execute(
            self._q(
                "INSERT INTO {jobs} AS j (pair, month, status, run_id, param_hash, attempts,"
                " updated_at) VALUES (%s, %s, 'pending', %s, %s, 0, now())"
                " ON CONFLICT (pair, month) DO UPDATE SET updated_at = now()"
                " RETURNING j.status, j.worker,"
                " coalesce(j.heartbeat_at < now() - make_interval(secs => %s), true)"
            ),
            (pair, month.first_day, run_id, param_hash, STALE_AFTER_S),
        ).fetchone()
        assert row is not None
        return row[0], row[1], bool(row[2])

    def record_month(
        self, cur: psycopg.Cursor, run_id: int, job: Job, *, params: Params, rows_total: int,
        rows_written: int, started: float, written: Written,
    ) -> None:  # fmt: skip
        """After an update brought a month up to date: the job row says done, with what was
        read and written; the attempt, how many rows changed."""
        cur.execute(
            self._q(
                "UPDATE {jobs} SET status = 'done', run_id = %s, param_hash = %s,"
                " source_bars = %s, source_sig = %s, source_ver = %s, source_stats = %s,"
                " target_ver = %s, rows_written = %s, attempts = greatest(attempts, 1),"
                " started_at = coalesce(started_at, to_timestamp(%s)), finished_at = now(),"
                " duration_s = %s, worker = NULL, backend_pid = NULL, last_error = NULL,"
                " updated_at = now() WHERE pair = %s AND month = %s"
            ),
            (run_id, params.hash, job.source_bars, written.source_sig, job.source_ver,
             written.source_stats, written.target_ver, rows_total, started,
             time.time() - started, job.pair, job.month.first_day),
        )  # fmt: skip
        self._attempt(cur, run_id, job.pair, job.month, 1, "done", worker_id(), started,
                      job.source_bars, rows_written, None)  # fmt: skip

    def record_failure(
        self, conn: psycopg.Connection, run_id: int, pair: str, month: Month, started: float,
        error: str,
    ) -> None:  # fmt: skip
        """A failed attempt (an update's month, or a pair it could not plan: then the month it
        failed in), so that status shows the error; the job row, if any, stays as it was."""
        with conn.transaction(), conn.cursor() as cur:
            self._attempt(cur, run_id, pair, month, 1, "failed", worker_id(), started, None,
                          None, error)  # fmt: skip

    def forget_months(self, cur: psycopg.Cursor, pair: str, months: Sequence[Month]) -> None:
        """Drop the job rows of months left without any bar, so nothing reports them done."""
        if months and self.has_jobs_table(cur.connection):
            cur.execute(
                self._q("DELETE FROM {jobs} WHERE pair = %s AND month = ANY(%s)"),
                (pair, [m.first_day for m in months]),
            )

    # -- dropping a pair ----------------------------------------------------------------

    def pair_jobs(self, conn: psycopg.Connection, pair: str) -> dict[str, int]:
        """A pair's ledger jobs per status (empty when it has none)."""
        if not self.has_jobs_table(conn):
            return {}
        rows = conn.execute(
            self._q("SELECT status, count(*) FROM {jobs} WHERE pair = %s GROUP BY 1"), (pair,)
        ).fetchall()
        return {st: int(n) for st, n in rows}

    def hold_pair(self, cur: psycopg.Cursor, pair: str) -> None:
        """Inside a transaction: lock a pair's job rows, refusing (``BqxError``) when a run
        holds one: a worker writing it (its row locked) or a live running job."""
        if not self.has_jobs_table(cur.connection):
            return
        try:
            rows = cur.execute(
                self._q(
                    "SELECT to_char(month, 'YYYY-MM'), status, worker, run_id,"
                    " coalesce(heartbeat_at < now() - make_interval(secs => %s), true)"
                    " FROM {jobs} WHERE pair = %s ORDER BY month FOR UPDATE NOWAIT"
                ),
                (STALE_AFTER_S, pair),
            ).fetchall()
        except psycopg.errors.LockNotAvailable:
            raise BqxError(
                f"{pair.upper()}: a run is writing its jobs right now: nothing dropped; wait"
                " for it to end (`bqx status`) or stop it, then drop"
            ) from None
        live = [r for r in rows if r[1] == "running" and not r[4] and not worker_is_dead(r[2])]
        if live:
            month, _, worker, run_id, _ = live[0]
            raise BqxError(
                f"{pair.upper()}: run {run_id} holds {len(live)} of its jobs ({month} on"
                f" {worker}{' …' if len(live) > 1 else ''}): nothing dropped; wait for it to"
                " end (`bqx status`) or stop it, then drop"
            )

    def forget_pair(self, cur: psycopg.Cursor, pair: str) -> int:
        """Inside the caller's transaction: delete a pair's jobs, attempts, recorded target
        parameters and verifications; the number of jobs deleted. Runs stay (they may cover
        other pairs)."""
        if not self.has_jobs_table(cur.connection):
            return 0
        cur.execute(self._q("DELETE FROM {jobs} WHERE pair = %s"), (pair,))
        jobs = cur.rowcount
        if self._table_exists(cur.connection, self.attempts):
            cur.execute(self._q("DELETE FROM {attempts} WHERE pair = %s"), (pair,))
        if self._table_exists(cur.connection, self.targets):
            cur.execute(
                self._q("DELETE FROM {targets} WHERE target_table = %s"),
                (self.layout.target_name(pair),),
            )
        if self._table_exists(cur.connection, self.verifications):
            cur.execute(self._q("DELETE FROM {verifications} WHERE pair = %s"), (pair,))
        return jobs

    # -- what status, verify and report read ---------------------------------------------

    def totals(self, conn: psycopg.Connection) -> dict[str, int]:
        """Jobs per status over the whole ledger, and the rows of the done ones."""
        out = {"total": 0, "done": 0, "running": 0, "failed": 0, "pending": 0, "rows": 0}
        for st, n, rows in conn.execute(
            self._q(
                "SELECT status, count(*), coalesce(sum(rows_written) FILTER"
                " (WHERE status = 'done'), 0) FROM {jobs} GROUP BY status"
            )
        ):
            out[st] = int(n)
            out["total"] += int(n)
            out["rows"] += int(rows)
        return out

    def job_records(
        self, conn: psycopg.Connection, keys: Sequence[tuple[str, date]] | None = None
    ) -> list[JobRecord]:
        """Job rows of ``keys`` (pending for those the ledger does not hold), or of every job."""
        cols = sql.SQL(
            "coalesce(j.status, 'pending'), j.rows_written, j.source_bars, j.worker,"
            " extract(epoch FROM now() - j.heartbeat_at)::float8,"
            " extract(epoch FROM now() - j.started_at)::float8, coalesce(j.attempts, 0),"
            " j.last_error"
        )
        if keys is None:
            if not self.has_jobs_table(conn):
                return []
            every = sql.SQL("SELECT j.pair, j.month, {cols} FROM {jobs} j ORDER BY 1, 2")
            return [JobRecord(*r) for r in conn.execute(every.format(cols=cols, jobs=self.jobs))]
        pairs, months = _keys(keys)
        query = sql.SQL(
            "SELECT k.pair, k.month, {cols} FROM unnest(%s::text[], %s::date[])"
            " AS k(pair, month) LEFT JOIN {jobs} j ON j.pair = k.pair AND j.month = k.month"
            " ORDER BY k.pair, k.month"
        ).format(cols=cols, jobs=self.jobs)
        return [JobRecord(*r) for r in conn.execute(query, (pairs, months))]

    def job_keys(self, conn: psycopg.Connection) -> list[tuple[str, date]]:
        """Every (pair, month) the ledger holds."""
        if not self.has_jobs_table(conn):
            return []
        return [(p, m) for p, m in conn.execute(self._q("SELECT pair, month FROM {jobs}"))]

    def job_runs(self, conn: psycopg.Connection) -> list[tuple[str, date, int | None]]:
        """(pair, month, run that last planned or ran it) of every job the ledger holds."""
        if not self.has_jobs_table(conn):
            return []
        return [
            (p, m, r) for p, m, r in conn.execute(self._q("SELECT pair, month, run_id FROM {jobs}"))
        ]

    def statuses(self, conn: psycopg.Connection) -> dict[tuple[str, str], str]:
        """(pair, ``YYYY-MM``) -> job status, over the whole ledger."""
        return {
            (p, str(Month.of(m))): s
            for p, m, s in conn.execute(self._q("SELECT pair, month, status FROM {jobs}"))
        }

    def rows_written_by(self, conn: psycopg.Connection, run_id: int) -> int:
        row = conn.execute(
            self._q(
                "SELECT coalesce(sum(rows_written), 0) FROM {attempts}"
                " WHERE run_id = %s AND status = 'done'"
            ),
            (run_id,),
        ).fetchone()
        return int(row[0]) if row else 0

    def last_activity_s(
        self, conn: psycopg.Connection, run_id: int, since: datetime
    ) -> float | None:
        """Seconds since any job of the run last showed life (claim, heartbeat, finish)."""
        row = conn.execute(
            self._q(
                "SELECT extract(epoch FROM now() - greatest(max(started_at), max(heartbeat_at),"
                " max(finished_at), %s::timestamptz))::float8 FROM {jobs} WHERE run_id = %s"
            ),
            (since, run_id),
        ).fetchone()
        return None if row is None or row[0] is None else float(row[0])

    # -- verifications -------------------------------------------------------------------

    def verified(self, conn: psycopg.Connection, pairs: Sequence[str]) -> dict[JobKey, Verified]:
        """(pair, month) -> its last verification, for the pairs' months."""
        if not self._table_exists(conn, self.verifications):
            return {}
        return {
            (p, Month.of(m)): Verified(ok, MonthSeen(h, sig, st, tv, ts), rows, at)
            for p, m, ok, h, sig, st, tv, ts, rows, at in conn.execute(
                self._q(
                    "SELECT pair, month, ok, param_hash, source_sig, source_stats, target_ver,"
                    " target_stats, rows, verified_at FROM {verifications} WHERE pair = ANY(%s)"
                ),
                (sorted(set(pairs)),),
            )
        }

    def record_verifications(
        self, conn: psycopg.Connection,
        checked: Sequence[tuple[str, Month, bool, MonthSeen, int, int, list[str]]],
    ) -> None:  # fmt: skip
        """Record months just verified: (pair, month, ok, what was seen, rows, bars, faults)."""
        if not checked:
            return
        with conn.transaction(), conn.cursor() as cur:
            cur.executemany(
                self._q(
                    "INSERT INTO {verifications} (pair, month, ok, param_hash, source_sig,"
                    " source_stats, target_ver, target_stats, rows, bars, faults)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)"
                    " ON CONFLICT (pair, month) DO UPDATE SET verified_at = now(),"
                    " ok = excluded.ok, param_hash = excluded.param_hash,"
                    " source_sig = excluded.source_sig, source_stats = excluded.source_stats,"
                    " target_ver = excluded.target_ver, target_stats = excluded.target_stats,"
                    " rows = excluded.rows, bars = excluded.bars, faults = excluded.faults"
                ),
                [
                    (
                        p,
                        m.first_day,
                        ok,
                        s.param_hash,
                        s.source_sig,
                        s.source_stats,
                        s.target_ver,
                        s.target_stats,
                        rows,
                        n,
                        json.dumps(faults),
                    )
                    for p, m, ok, s, rows, n, faults in checked
                ],  # fmt: skip
            )

    def verification_times(
        self, conn: psycopg.Connection
    ) -> dict[tuple[str, str], tuple[str, bool]]:
        """(pair, ``YYYY-MM``) -> (when it was last verified, ISO, and whether it passed)."""
        if not self._table_exists(conn, self.verifications):
            return {}
        return {
            (p, str(Month.of(m))): (at.isoformat(timespec="seconds"), bool(ok))
            for p, m, at, ok in conn.execute(
                self._q("SELECT pair, month, verified_at, ok FROM {verifications}")
            )
        }

    def recent_errors(self, conn: psycopg.Connection, limit: int) -> list[dict[str, Any]]:
        """The latest attempts that recorded an error, newest first."""
        return [
            {"pair": p.upper(), "month": str(Month.of(m)), "status": s, "error": e,
             "at": f.isoformat(timespec="seconds")}
            for p, m, s, e, f in conn.execute(
                self._q(
                    "SELECT pair, month, status, error, finished_at FROM {attempts}"
                    " WHERE error IS NOT NULL ORDER BY finished_at DESC, attempt_id DESC LIMIT %s"
                ),
                (limit,),
            )
        ]  # fmt: skip

    def attempts_of(self, conn: psycopg.Connection, run_id: int) -> list[dict[str, Any]]:
        """Every attempt of a run, in the order they finished."""
        cur = conn.execute(
            self._q(
                "SELECT pair, month, attempt, status, worker, started_at, finished_at,"
                " duration_s, source_bars, rows_written, error FROM {attempts}"
                " WHERE run_id = %s ORDER BY finished_at"
            ),
            (run_id,),
        )
        cols = [d.name for d in cur.description or []]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def earlier_failures(
        self, conn: psycopg.Connection, run_id: int, keys: Sequence[tuple[str, date]],
        limit: int = 50,
    ) -> list[dict[str, Any]]:  # fmt: skip
        """Failed and retried attempts of runs before ``run_id`` on the jobs ``keys``, newest
        first: what the jobs of a report went through before."""
        if not keys or not self._table_exists(conn, self.attempts):
            return []
        pairs, months = _keys(keys)
        cur = conn.execute(
            self._q(
                "SELECT a.run_id, a.pair, a.month, a.attempt, a.status, a.finished_at, a.error"
                " FROM {attempts} a JOIN unnest(%s::text[], %s::date[]) k(pair, month)"
                " ON k.pair = a.pair AND k.month = a.month"
                " WHERE a.run_id < %s AND (a.status <> 'done' OR a.attempt > 1)"
                " ORDER BY a.finished_at DESC NULLS LAST LIMIT %s"
            ),
            (pairs, months, run_id, limit),
        )
        cols = [d.name for d in cur.description or []]
        return [dict(zip(cols, r, strict=True)) for r in cur.fetchall()]

    def check_queries(self, run_id: int) -> list[tuple[str, str]]:
        """SQL a reader can run against the ledger, with what each shows."""
        return [
            ("jobs by status in the ledger",
             self._q("SELECT status, count(*), sum(rows_written) FROM {jobs}"
                     " GROUP BY status;").as_string(None)),
            ("attempts of this run",
             sql.SQL("SELECT status, count(*) FROM {} WHERE run_id = {} GROUP BY status;")
             .format(self.attempts, sql.Literal(int(run_id))).as_string(None)),
        ]  # fmt: skip


def _run_record(row: Any) -> RunRecord:
    """A RunRecord from the runs query's row (its columns in the dataclass's order)."""
    values = list(row)
    values[2] = _doc(values[2])
    return RunRecord(**dict(zip(RunRecord.__dataclass_fields__, values, strict=True)))


def _legacy_target_doc(doc: dict[str, Any], pair: str, layout: Layout) -> dict[str, Any]:
    """A target's parameters from the run document of an older bqx, which kept no per-target
    record."""
    lay = Layout(doc.get("schema", layout.schema), doc.get("source_table", "m1_{pair}"),
                 doc.get("time_column", "time"), doc.get("price_column", "close"))  # fmt: skip
    schema, table = lay.source_name(pair)
    return {
        "windows": doc.get("windows"), "mode": doc.get("mode"), "max_fill": doc.get("max_fill"),
        "source": f"{schema}.{table}", "time_column": lay.time_column,
        "price_column": lay.price_column,
    }  # fmt: skip
