"""The run: preflight, plan, hand the jobs to an executor, watch them and the ledger."""

from __future__ import annotations

import contextlib
import math
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import date
from typing import Any

import psycopg

from bqx import metrics
from bqx.backfill.executors import Executor, check_executor, make_executor
from bqx.backfill.ledger import Ledger
from bqx.backfill.plan import Params, RunSummary, preflight
from bqx.config import Settings
from bqx.db import connect, resolve_url
from bqx.errors import BqxError
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
    executor: str = "threads",
    scheduler: str | None = None,
    reconnect_within_s: float = 30.0,
    source_check: str = "auto",
) -> RunSummary:
    """Plan (pair, month) jobs and run them on workers: local processes or threads, or a Dask
    cluster.

    SIGTERM stops the run as Ctrl-C does (``KeyboardInterrupt``): workers are stopped and
    their jobs handed back, and the run is recorded as interrupted. A database that stays
    unreachable ends the run with one ``BqxError``; see docs/guarantees.md.
    """
    check_run_options(workers, job_timeout, max_attempts, executor, scheduler)
    params = Params.build(layout, windows, mode, max_fill)
    workers = workers or os.cpu_count() or 1
    url = resolve_url(settings)
    with _sigterm_as_interrupt(), connect(url, autocommit=True) as conn:
        jobs = preflight(conn, params, pairs, start, end, url, force=force,
                         source_check=source_check)  # fmt: skip
        ledger = Ledger(layout)
        ledger.mark_orphaned_runs(conn)
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
        watch = _Watch(conn, url, reconnect_within_s)
        status = "interrupted"
        runner = make_executor(executor, min(workers, max(1, len(todo))), scheduler)
        try:
            if todo:
                _drive(watch, ledger, runner, url, params, run_id, keys, job_timeout,
                       max_attempts, reporter)  # fmt: skip
            status = "done"
        except KeyboardInterrupt:
            ids = runner.shutdown()
            with contextlib.suppress(psycopg.Error):
                ledger.end_sessions(watch.conn, ids)
                ledger.release(watch.conn, keys, ids, "pending", "interrupted by the user")
                ledger.end_run(watch.conn, run_id, "interrupted")
            raise
        except _DatabaseLost as lost:
            runner.shutdown()
            reporter(None)
            with contextlib.suppress(psycopg.Error, BqxError, _DatabaseLost):
                ledger.end_run(watch.reconnect(timeout_s=2), run_id, "interrupted")
            raise BqxError(
                f"lost the database during run {run_id} ({lost}): when the server is back, run"
                " the same command again to resume (it takes this run's jobs over)"
            ) from None
        finally:
            runner.shutdown()
            reporter(None)
        try:
            summary = ledger.end_run(watch.conn, run_id, status)
        except psycopg.OperationalError:
            summary = ledger.end_run(watch.reconnect(timeout_s=10), run_id, status)
    return summary


def check_run_options(
    workers: int | None, job_timeout: float, max_attempts: int, executor: str = "threads",
    scheduler: str | None = None,
) -> None:  # fmt: skip
    """Refuse absurd run options before anything is done (NaN, zero or negative values, an
    unknown executor)."""
    check_executor(executor, scheduler)
    if workers is not None and (isinstance(workers, bool) or workers < 1):
        raise BqxError(f"invalid --workers {workers}: must be at least 1 (default: CPU count)")
    if not (isinstance(job_timeout, int | float) and math.isfinite(job_timeout)) or (
        job_timeout <= 0
    ):
        raise BqxError(f"invalid --job-timeout {job_timeout}: must be a number of seconds > 0")
    if max_attempts < 1:
        raise BqxError(f"invalid max_attempts {max_attempts}: must be at least 1")


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """While a run is driven from the main thread, SIGTERM (schedulers, systemd, ``kill``)
    stops it exactly as Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _DatabaseLost(BqxError):
    """The driver's connection is gone and the server stayed unreachable."""


class _Watch:
    """The driver's connection to the ledger, re-established when the server restarts."""

    def __init__(self, conn: psycopg.Connection, url: str, within_s: float) -> None:
        self.conn, self.url, self.within_s = conn, url, within_s

    def reconnect(self, timeout_s: float | None = None) -> psycopg.Connection:
        """A new connection, trying for ``timeout_s`` (a server restart takes seconds)."""
        deadline = time.monotonic() + (self.within_s if timeout_s is None else timeout_s)
        with contextlib.suppress(Exception):
            self.conn.close()
        while True:
            try:
                self.conn = connect(self.url, autocommit=True)
                return self.conn
            except BqxError as exc:
                if time.monotonic() > deadline:
                    raise _DatabaseLost(str(exc).split(": ", 1)[-1]) from None
                time.sleep(0.5)

    def tick(self, body: Callable[[psycopg.Connection], bool]) -> bool:
        """Run one watch step; on a lost connection, reconnect (or give up) and skip it."""
        try:
            return body(self.conn)
        except psycopg.OperationalError:
            self.reconnect()
            return False


def _drive(
    watch: _Watch, ledger: Ledger, executor: Executor, url: str, params: Params,
    run_id: int, keys: list[tuple[str, date]], job_timeout: float, max_attempts: int,
    reporter: ProgressFn,
) -> None:  # fmt: skip
    """Start workers, watch them and the ledger until every planned job is done or failed."""
    for _ in range(executor.workers):
        executor.spawn(url, params, run_id, keys)
    started = time.monotonic()

    def step(conn: psycopg.Connection) -> bool:
        ledger.beat_run(conn, run_id)
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
            return True
        claimable = state["pending"] + state["stale"]
        if claimable and len(executor.live()) < executor.workers:
            executor.spawn(url, params, run_id, keys)  # replace a dead or finished worker
        return False

    while True:
        time.sleep(0.25)
        if watch.tick(step):
            return


def _abandon(
    conn: psycopg.Connection, ledger: Ledger, worker: str, error: str, max_attempts: int
) -> None:
    """The job a dead or killed worker held goes back to pending, or fails once out of tries.

    Its database session is ended first: a session waiting on a lock does not notice that
    its client is gone, and would keep the job's row locked.
    """
    ledger.end_sessions(conn, [worker])
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
