"""The run: preflight, plan, hand the jobs to an executor, watch them and the ledger."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from datetime import date
from typing import Any

import psycopg

from bqx import metrics
from bqx.backfill.executors import Executor, make_executor
from bqx.backfill.ledger import Ledger
from bqx.backfill.plan import Params, RunSummary, preflight
from bqx.config import Settings
from bqx.db import connect, resolve_url
from bqx.schema import Layout, Month

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
    executor: str = "local",
    scheduler: str | None = None,
    source_check: str = "auto",
) -> RunSummary:
    """Plan (pair, month) jobs and run them on workers: local processes, or a Dask cluster."""
    params = Params.build(layout, windows, mode, max_fill)
    workers = workers or os.cpu_count() or 1
    url = resolve_url(settings)
    with connect(url, autocommit=True) as conn:
        jobs = preflight(conn, params, pairs, start, end, url, force=force,
                         source_check=source_check)  # fmt: skip
        ledger = Ledger(layout)
        doc = {
            "pairs": sorted({j.pair for j in jobs}),
            "months": sorted({str(j.month) for j in jobs}),
            "jobs": [[j.pair, str(j.month)] for j in jobs],
            "windows": list(params.windows), "mode": params.mode, "max_fill": params.max_fill,
            "schema": layout.schema, "source_table": layout.source_table,
            "time_column": layout.time_column, "price_column": layout.price_column,
            "workers": workers, "executor": executor, "force": force,
            "job_timeout": job_timeout, "source_check": source_check,
        }  # fmt: skip
        run_id = ledger.start_run(conn, params, doc, workers, executor)
        todo, _skipped = ledger.plan(conn, run_id, params, jobs, force)
        keys = [(j.pair, j.month.first_day) for j in todo]
        reporter = _make_reporter(progress, len(jobs), len(jobs) - len(todo))
        status = "interrupted"
        runner = make_executor(executor, min(workers, max(1, len(todo))), scheduler)
        try:
            if todo:
                _drive(conn, ledger, runner, url, params, run_id, keys, job_timeout,
                       max_attempts, reporter)  # fmt: skip
            status = "done"
        except KeyboardInterrupt:
            ids = runner.shutdown()
            ledger.release(conn, keys, ids, "pending", "interrupted by the user")
            raise
        finally:
            runner.shutdown()
            reporter(None)
            summary = ledger.end_run(conn, run_id, status)
    return summary


def _drive(
    conn: psycopg.Connection, ledger: Ledger, executor: Executor, url: str, params: Params,
    run_id: int, keys: list[tuple[str, date]], job_timeout: float, max_attempts: int,
    reporter: ProgressFn,
) -> None:  # fmt: skip
    """Start workers, watch them and the ledger until every planned job is done or failed."""
    for _ in range(executor.workers):
        executor.spawn(url, params, run_id, keys)
    started = time.monotonic()
    while True:
        time.sleep(0.25)
        for worker, error in executor.reap():  # a worker died mid-job (killed, crashed)
            _abandon(conn, ledger, worker, error, max_attempts)
        for pair, month, worker in ledger.late(conn, keys, job_timeout):
            if worker in executor.live():
                executor.kill(worker)  # its transaction dies with it: the month stays as it was
                error = f"{pair.upper()} {str(month)[:7]}: timed out after {job_timeout:g}s"
                _abandon(conn, ledger, worker, error, max_attempts)
        state = ledger.progress(conn, keys)
        state["elapsed"] = time.monotonic() - started
        reporter(state)
        if state["pending"] == 0 and state["running"] == 0:
            return
        claimable = state["pending"] + state["stale"]
        if claimable and len(executor.live()) < executor.workers:
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

