"""The job ledger: SQL against bqx_runs / bqx_jobs / bqx_attempts, in one place.

Jobs are claimed with ``FOR UPDATE SKIP LOCKED``, so any number of workers, and of concurrent
backfills, never process the same job at once.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from datetime import date
from typing import Any

import psycopg
from psycopg import sql

from bqx.backfill.plan import Job, Params, RunSummary, partition_states, target_params
from bqx.db import current_user, worker_id
from bqx.schema import LEDGER_ATTEMPTS, LEDGER_JOBS, LEDGER_RUNS, LEDGER_TARGETS, Layout, Month

HEARTBEAT_INTERVAL_S = 2.0
STALE_AFTER_S = 30.0  # a running job whose heartbeat is older than this belongs to a dead worker


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


# -- resume decisions ---------------------------------------------------------------------

SKIP_REASON = "done, unchanged"
RUNNING_ELSEWHERE = "running elsewhere"
_FOR_UPDATE = {True: " FOR UPDATE", False: ""}
_READ_JOBS = (
    "SELECT pair, month, status, param_hash, source_sig, source_ver, worker,"
    " heartbeat_at < now() - make_interval(secs => %s) FROM {jobs} WHERE pair = ANY(%s)"
)
LedgerRow = tuple[str, str | None, str | None, str | None, bool]


def _same_source(job: Job, sig: str | None, ver: str | None) -> bool:
    """The exact signature decides when the plan computed one; else the version signature."""
    if job.source_sig is not None:
        return sig == job.source_sig
    return job.source_ver is not None and ver == job.source_ver


def decide(
    job: Job, row: LedgerRow | None, param_hash: str, partition: str = "ok", force: bool = False
) -> tuple[bool, str]:
    """(to do?, why) for a planned job given its ledger row and its target partition's state."""
    if row is None:
        return True, "new"
    status, h, sig, ver, stale = row
    if status == "running" and not stale:
        return True, RUNNING_ELSEWHERE
    if force:
        return True, "forced"
    if status == "failed":
        return True, "failed before"
    if status != "done":
        return True, "not finished before"
    if h != param_hash:
        return True, "parameters changed"
    if not _same_source(job, sig, ver):
        return True, "source changed"
    if partition != "ok":
        return True, f"partition {partition}"
    return False, SKIP_REASON


# -- the ledger ---------------------------------------------------------------------------


class Ledger:
    """SQL against bqx_runs / bqx_jobs / bqx_attempts, in one place."""

    def __init__(self, layout: Layout) -> None:
        self._last_beat = 0.0
        self.runs = layout.table(LEDGER_RUNS)
        self.jobs = layout.table(LEDGER_JOBS)
        self.attempts = layout.table(LEDGER_ATTEMPTS)
        self.targets = layout.table(LEDGER_TARGETS)

    def _q(self, text: str) -> sql.Composed:
        return sql.SQL(text).format(
            runs=self.runs, jobs=self.jobs, attempts=self.attempts, targets=self.targets
        )

    def start_run(
        self, conn: psycopg.Connection, params: Params, doc: dict[str, Any], workers: int,
        executor: str,
    ) -> int:  # fmt: skip
        row = conn.execute(
            self._q(
                "INSERT INTO {runs} (command, params, param_hash, workers, executor, run_by, host,"
                " pid, heartbeat_at) VALUES ('backfill', %s, %s, %s, %s, %s, %s, %s, now())"
                " RETURNING run_id"
            ),
            (json.dumps(doc), params.hash, workers, executor, current_user(),
             worker_id().rsplit(":", 1)[0], os.getpid()),
        ).fetchone()  # fmt: skip
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

    def read_jobs(
        self,
        conn: psycopg.Connection,
        pairs: Sequence[str],
        *,
        lock: bool = False,
        has_ver: bool = True,
    ) -> dict[tuple[str, Month], tuple[str, str | None, str | None, str | None, bool]]:
        """(pair, month) -> (status, param_hash, source_sig, source_ver, stale) of the pairs'
        ledger rows; ``lock`` takes them FOR UPDATE (inside the caller's transaction).
        ``has_ver=False`` reads a ledger made before ``source_ver`` existed (a dry run does
        not upgrade it)."""
        query = _READ_JOBS if has_ver else _READ_JOBS.replace("source_ver", "NULL")
        return {
            (p, Month.of(m)): (status, h, sig, ver, bool(stale) or worker_is_dead(worker))
            for p, m, status, h, sig, ver, worker, stale in conn.execute(
                self._q(query + _FOR_UPDATE[lock]),
                (STALE_AFTER_S, sorted(set(pairs))),
            )
        }

    def plan(
        self, conn: psycopg.Connection, run_id: int, params: Params, jobs: Sequence[Job],
        force: bool,
    ) -> tuple[list[Job], list[Job]]:  # fmt: skip
        """Mark the jobs to do as pending; return (to_do, skipped).

        A done job is skipped only when its parameters and source signature are unchanged and
        its target partition still holds rows. Why each job is done or skipped is left in
        ``self.reasons``.
        """
        pairs = sorted({j.pair for j in jobs})
        before = self.read_jobs(conn, pairs)
        maybe_skip = [
            (j.pair, j.month) for j in jobs
            if not force and decide(j, before.get((j.pair, j.month)), params.hash, "ok")[1]
            == SKIP_REASON
        ]  # fmt: skip
        # probed outside the transaction: each probe's lock is released at once
        parts = partition_states(conn, params.layout, maybe_skip)
        todo, skipped = [], []
        self.reasons: dict[tuple[str, Month], str] = {}
        with conn.transaction():
            existing = self.read_jobs(conn, pairs, lock=True)
            for job in jobs:
                key = (job.pair, job.month)
                row = existing.get(key)
                do, reason = decide(job, row, params.hash, parts.get(key, "ok"), force)
                self.reasons[key] = reason
                if not do:
                    skipped.append(job)
                    continue
                todo.append(job)
                if reason == RUNNING_ELSEWHERE:
                    continue  # another live worker has it; ours wait or take it over when stale
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
            conn.execute(
                self._q("UPDATE {runs} SET jobs_total = %s, jobs_skipped = %s WHERE run_id = %s"),
                (len(jobs), len(skipped), run_id),
            )
            self.record_params(conn, run_id, params, pairs)
        return todo, skipped

    def record_params(
        self, conn: psycopg.Connection, run_id: int, params: Params, pairs: Sequence[str]
    ) -> None:
        """Remember the parameters each target table is computed with (``bqx_targets``)."""
        layout = params.layout
        for pair in pairs:
            doc = target_params(params, pair)
            conn.execute(
                self._q(
                    "INSERT INTO {targets} AS t (target_table, params, param_hash, run_id)"
                    " VALUES (%s, %s, %s, %s) ON CONFLICT (target_table) DO UPDATE SET"
                    " params = EXCLUDED.params, param_hash = EXCLUDED.param_hash,"
                    " run_id = EXCLUDED.run_id, updated_at = now()"
                    " WHERE t.param_hash IS DISTINCT FROM EXCLUDED.param_hash"
                ),
                (layout.target_name(pair), json.dumps(doc), params.hash, run_id),
            )

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
