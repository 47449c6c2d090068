"""A backfill run: preflight, plan, hand the jobs to an executor, watch them and the ledger.

Ctrl-C (``KeyboardInterrupt``) stops the workers and hands their jobs back, and the run is
recorded as interrupted; a database that stays unreachable ends the run with one
``DatabaseLost``. Signals are the caller's: the CLI turns SIGTERM into ``KeyboardInterrupt``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import date
from typing import Any, Protocol

import psycopg

from bqx.core.months import Month
from bqx.core.params import Params, RunSummary, check_positive
from bqx.db.connect import DatabaseLike, connect
from bqx.destinations import Destination
from bqx.errors import BqxError, DatabaseLost, InvalidOption
from bqx.pipeline.executors import Executor, ExecutorLost, check_executor, make_executor
from bqx.pipeline.plan import mark_jobs, preflight
from bqx.store.ledger import Ledger


class Progress(Protocol):
    """What a run tells whoever watches it (``bqx.progress.BackfillProgress`` draws a bar)."""

    def start(self, total: int, skipped: int) -> None:
        """The plan: ``total`` jobs, ``skipped`` of them already done."""

    def update(self, state: dict[str, Any]) -> None:
        """The ledger's counts: done, running, failed, pending, rows, bars left, elapsed."""

    def close(self) -> None:
        """The run ended (or was stopped)."""


@dataclass(frozen=True)
class RunOptions:
    """How a run goes: where its workers run, how many, and how long a job may take."""

    workers: int | None = None  # default: the CPU count
    executor: str = "threads"
    scheduler: str | None = None
    job_timeout: float = 600.0
    max_attempts: int = 3
    force: bool = False
    source_check: str = "auto"
    reconnect_within_s: float = 30.0

    def check(self) -> None:
        """Refuse absurd values (NaN, zero or negative, an unknown executor) before anything
        is done."""
        check_executor(self.executor, self.scheduler)
        if self.workers is not None:
            check_positive("workers", self.workers, integer=True)
        check_positive("job_timeout", self.job_timeout)
        if self.max_attempts < 1:
            raise InvalidOption("max_attempts", self.max_attempts, "must be at least 1")

    @property
    def worker_count(self) -> int:
        return self.workers or os.cpu_count() or 1


def run_backfill(
    url: DatabaseLike, params: Params, dest: Destination, pairs: Sequence[str] | None,
    start: Month | None, end: Month | None, options: RunOptions, progress: Progress | None,
) -> RunSummary:  # fmt: skip
    """Plan (pair, month) jobs and run them on workers: threads or processes of this machine,
    or a Dask cluster."""
    options.check()
    workers = options.worker_count
    with connect(url, autocommit=True) as conn:
        jobs = preflight(conn, params, pairs, start, end, url, dest=dest, force=options.force,
                         source_check=options.source_check)  # fmt: skip
        ledger = Ledger(params.layout)
        ledger.mark_orphaned_runs(conn)
        doc = {
            **params.describe(),
            "pairs": sorted({j.pair for j in jobs}),
            "months": sorted({str(j.month) for j in jobs}),
            "jobs": [[j.pair, str(j.month)] for j in jobs],
            "workers": workers, "executor": options.executor, "force": options.force,
            "job_timeout": options.job_timeout, "source_check": options.source_check,
        }  # fmt: skip
        # a scheduler named by the user is reached before the ledger is touched: one that
        # cannot be reached must leave no run and no job changed behind
        early = make_executor(options.executor, workers, options.scheduler) \
            if options.scheduler else None  # fmt: skip
        try:
            run_id = ledger.start_run(conn, "backfill", params, doc, workers, options.executor)
            todo, _skipped, _why = mark_jobs(conn, ledger, dest, run_id, params, jobs,
                                             options.force)  # fmt: skip
        except BaseException:
            if early is not None:
                early.shutdown()
            raise
        keys = [(j.pair, j.month.first_day) for j in todo]
        if progress is not None:
            progress.start(len(jobs), len(jobs) - len(todo))
        watch = _Watch(conn, url, options.reconnect_within_s)
        try:
            runner = early or make_executor(options.executor, min(workers, max(1, len(todo))))
        except BaseException:
            with contextlib.suppress(psycopg.Error):
                ledger.end_run(conn, run_id, "interrupted")
            raise
        runner.workers = min(runner.workers, max(1, len(todo)))
        status = _execute(watch, ledger, runner, url, params, run_id, keys, options, progress)
        try:
            return ledger.end_run(watch.conn, run_id, status)
        except psycopg.OperationalError:
            return ledger.end_run(watch.reconnect(timeout_s=10), run_id, status)


def _execute(
    watch: _Watch, ledger: Ledger, runner: Executor, url: DatabaseLike, params: Params, run_id: int,
    keys: list[tuple[str, date]], options: RunOptions, progress: Progress | None,
) -> str:  # fmt: skip
    """Run the jobs; the run's final status. Ctrl-C hands the jobs back and re-raises."""
    try:
        if keys:
            _drive(watch, ledger, runner, url, params, run_id, keys, options, progress)
        return "done"
    except KeyboardInterrupt:
        _hand_back(watch, ledger, run_id, keys, runner.shutdown())
        raise
    except ExecutorLost as lost:
        with contextlib.suppress(Exception):
            runner.shutdown()
        with contextlib.suppress(psycopg.Error, BqxError):
            ledger.end_run(watch.conn, run_id, "interrupted")
        raise ExecutorLost(
            f"{lost} during run {run_id}: {_resume_hint(options)} (jobs already running on the"
            " workers finish by themselves)"
        ) from None
    except _Lost as lost:
        runner.shutdown()
        with contextlib.suppress(psycopg.Error, BqxError):
            ledger.end_run(watch.reconnect(timeout_s=2), run_id, "interrupted")
        raise DatabaseLost(
            f"lost the database during run {run_id} ({lost}): when the server is back,"
            f" {_resume_hint(options)} (it takes this run's jobs over)"
        ) from None
    finally:
        runner.shutdown()
        if progress is not None:
            progress.close()


def _resume_hint(options: RunOptions) -> str:
    """What finishes an interrupted run: the same command, or for a forced run a plain one
    (its plan is recorded; forcing again would redo every job)."""
    if options.force:
        return "run `bqx backfill` without --force to finish exactly the jobs this run had left"
    return "run the same command again to resume"


def _hand_back(
    watch: _Watch, ledger: Ledger, run_id: int, keys: list[tuple[str, date]], ids: list[str]
) -> None:
    """After Ctrl-C: the stopped workers' jobs go back to pending and the run is recorded as
    interrupted. The interrupt may have cut a statement of the driver's connection short, so
    a failure there is tried once more on a new connection."""
    for attempt in range(2):
        try:
            conn = watch.conn if attempt == 0 else watch.reconnect(timeout_s=2)
            ledger.end_sessions(conn, ids)
            ledger.release(conn, keys, ids, "pending", "interrupted by the user")
            ledger.end_run(conn, run_id, "interrupted")
            return
        except (psycopg.Error, BqxError):
            continue


class _Lost(BqxError):
    """The driver's connection is gone and the server stayed unreachable."""


class _Watch:
    """The driver's connection to the ledger, re-established when the server restarts."""

    def __init__(self, conn: psycopg.Connection, url: DatabaseLike, within_s: float) -> None:
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
                    raise _Lost(str(exc).split(": ", 1)[-1]) from None
                time.sleep(0.5)

    def tick(self, body: Callable[[psycopg.Connection], bool]) -> bool:
        """Run one watch step; on a lost connection, reconnect (or give up) and skip it."""
        try:
            return body(self.conn)
        except psycopg.OperationalError:
            self.reconnect()
            return False


def _drive(
    watch: _Watch, ledger: Ledger, executor: Executor, url: DatabaseLike, params: Params,
    run_id: int, keys: list[tuple[str, date]], options: RunOptions, progress: Progress | None,
) -> None:  # fmt: skip
    """Start workers, watch them and the ledger until every planned job is done or failed."""
    for _ in range(executor.workers):
        executor.spawn(url, params, run_id, keys)
    started = time.monotonic()

    def step(conn: psycopg.Connection) -> bool:
        ledger.beat_run(conn, run_id)
        for worker, error in executor.reap():  # a worker died mid-job (killed, crashed)
            ledger.abandon(conn, worker, error, options.max_attempts)
        for pair, month, worker in ledger.late(conn, keys, options.job_timeout):
            if worker in executor.live():
                executor.kill(worker)  # its transaction dies with it: the month stays as it was
                error = f"{pair.upper()} {str(month)[:7]}: timed out after {options.job_timeout:g}s"
                ledger.abandon(conn, worker, error, options.max_attempts)
        state = ledger.progress(conn, keys)
        state["elapsed"] = time.monotonic() - started
        if progress is not None:
            progress.update(state)
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
