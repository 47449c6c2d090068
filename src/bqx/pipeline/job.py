"""One job: read a month's bars with their lookback, compute, and write the month.

Two kinds share the reading and computing:

- ``JobRunner.run`` (backfill): a claimed job replaces its month. In ONE transaction the job
  locks its ledger row, the destination replaces the month's rows and the ledger marks the job
  done, so a worker killed at any instant leaves the month as it was.
- ``upsert_month`` (update): the month's rows from a time on are upserted, in one
  repeatable-read transaction that first locks the month's ledger row: the same row lock a
  backfill's write takes, so an update never interleaves with another writer of the month.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime

import numpy as np
import psycopg
import tenacity

from bqx import metrics
from bqx.core.months import Month
from bqx.core.params import Job, Params
from bqx.db.connect import DatabaseLike, connect, is_transient, worker_id
from bqx.destinations import Destination
from bqx.errors import BqxError
from bqx.sources.parquet import lake_bars
from bqx.store import bars, versions
from bqx.store.ledger import HEARTBEAT_INTERVAL_S, Ledger, Written, worker_is_dead
from bqx.store.targets import first_difference
from bqx.store.versions import check_exactly

MAX_TRANSIENT_RETRIES = 5


# -- reading and computing ----------------------------------------------------------------


def compute_rows(
    params: Params, since: datetime, times: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Metrics for the rows at or after ``since``: (times, matrix), the matrix column-major,
    (1 + metric columns) × rows: the rate, then the metric columns in table order.

    The kernel writes straight into the matrix, and the COPY encoder reads it as it is.
    """
    first = int(np.searchsorted(times, np.datetime64(since.replace(tzinfo=None), "us")))
    out = np.empty((1 + len(params.columns), len(times)), dtype=np.float64)
    out[0] = prices
    metrics.compute_matrix(
        times, prices, windows=params.windows, mode=params.mode, max_fill=params.max_fill,
        out=out[1:],
    )  # fmt: skip
    return times[first:], out[:, first:]


def bad_bar_message(pair: str, times: np.ndarray, exc: ValueError) -> str:
    """Name the bar the formulas refused: its time, its value and the month it is in.

    The kernel only knows array indices, which count lookback bars from an earlier month.
    """
    if not isinstance(exc, metrics.BadBar) or exc.index >= len(times):
        return f"bad source bars: {exc}"
    t = times[exc.index]
    when = str(t.astype("datetime64[s]")).replace("T", " ")
    owner = str(t.astype("datetime64[M]"))
    return f"bad source bar: {pair.upper()} at {when} UTC (month {owner}) {exc.problem}"


class PermanentError(Exception):
    """A job error that retrying will not fix."""


@dataclass
class Computed:
    """A job's rows, computed from the bars it read, and what it read."""

    times: np.ndarray
    matrix: np.ndarray  # (1 + metric columns) × rows: the rate, then the metric columns
    source_sig: str | None  # the exact signature of every bar read (its lookback included)
    source_stats: str | None  # the source partition's write counters before the read


def read_and_compute(
    cur: psycopg.Cursor, params: Params, pair: str, since: datetime, until: datetime,
    *, signed: bool = True,
) -> Computed:  # fmt: skip
    """Bars of [since, until) with their lookback, computed: the rows at or after ``since``.

    The source month's write counters are read first, so that a write slipping past the
    triggers after this read shows later as moved counters. A bad bar (NULL, non-finite, out
    of order) is a ``PermanentError`` naming it. Bars from a lake (``params.bars``) are read
    from its files, and have no write counters."""
    lake = lake_bars(params)
    stats: str | None = None
    sig: str | None
    if lake is not None:
        try:
            times, prices, sig = lake.read_series(params, pair, since, until)
        except BqxError as exc:
            raise PermanentError(str(exc)) from None
    else:
        stats = versions.partition_stats(cur, params.layout, pair, Month.of(since))
        try:
            times, prices, sig = bars.read_series(cur, params, pair, since, until, signed=signed)
        except BqxError:  # a NULL time or price: name the bar, not the stream
            cur.connection.rollback()
            raise PermanentError(bars.null_bar_message(cur, params, pair, until)) from None
    try:
        out_times, matrix = compute_rows(params, since, times, prices)
    except ValueError as exc:
        raise PermanentError(bad_bar_message(pair, times, exc)) from None
    return Computed(out_times, matrix, sig, stats)


def describe(exc: BaseException | None, pair: str, month: Month) -> str:
    """``EURUSD 2024-07: <what went wrong>``, one line."""
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    if isinstance(exc, PermanentError):  # our own wording needs no class name
        return f"{pair.upper()} {month}: {text}"
    return f"{pair.upper()} {month}: {type(exc).__name__}: {text}"


# -- a backfill job -----------------------------------------------------------------------


class _Heartbeat(threading.Thread):
    """Keeps the current job's heartbeat fresh on a connection of its own."""

    def __init__(self, url: DatabaseLike, ledger: Ledger, worker: str) -> None:
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


class JobRunner:
    """Runs claimed jobs for one worker: read, compute, atomically replace, record."""

    def __init__(
        self, url: DatabaseLike, params: Params, run_id: int, worker: str | None = None,
        dest: Destination | None = None,
    ) -> None:  # fmt: skip
        from bqx.pipeline.plan import default_destination

        self.url, self.params, self.run_id = url, params, run_id
        self.ledger = Ledger(params.layout)
        self.dest = dest or default_destination(params)  # each worker writes the sink itself
        self.worker = worker or worker_id()
        self.conn: psycopg.Connection | None = None
        # set when the driver stops this worker (a thread cannot be killed): no retry, and
        # no failure recorded, since the driver hands the job back itself
        self.stopped = threading.Event()
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

    def loop(self, keys: Sequence[tuple[str, date]]) -> int:
        """Claim and run jobs among ``keys`` until none is claimable; return how many ran."""
        ran = 0
        while not self.stopped.is_set() and (job := self.claim(keys)) is not None:
            self.run(*job)
            ran += 1
        return ran

    def run(self, pair: str, month: Month, attempt: int) -> int:
        """Process one claimed job, retrying transient errors; returns rows written (-1: failed)."""
        self.heart.current = (pair, month)
        started = time.time()
        try:
            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception(
                    lambda exc: is_transient(exc) and not self.stopped.is_set()
                ),
                stop=tenacity.stop_after_attempt(MAX_TRANSIENT_RETRIES),
                wait=tenacity.wait_exponential(multiplier=0.5, max=8),
                before_sleep=lambda rs: self._note_retry(pair, month, attempt, started, rs),
                reraise=True,
            )
            for try_ in retrying:
                with try_:
                    return self._attempt(pair, month, attempt, started)
        except Exception as exc:  # a permanent error fails this job; the others go on
            if not self.stopped.is_set():
                self._fail(pair, month, attempt, started, describe(exc, pair, month))
            return -1
        finally:
            self.heart.current = None
        return -1  # pragma: no cover - tenacity always returns or raises

    def _attempt(self, pair: str, month: Month, attempt: int, started: float) -> int:
        conn = self._connection()
        with conn.cursor() as cur:
            done = read_and_compute(cur, self.params, pair, month.start, month.end)
        conn.commit()
        with conn.transaction(), conn.cursor() as cur:
            if not self.ledger.lock_own(cur, pair, month, self.worker):
                raise PermanentError("job was taken over by another worker")
            rows = self.dest.replace_month(cur, self.params, pair, month, done.times, done.matrix)
            written = Written(
                done.source_sig,
                done.source_stats,
                self.dest.month_version(cur, self.params, pair, month),
            )
            self.ledger.finish(
                cur, self.run_id, pair, month, self.worker, "done", attempt, started,
                len(done.times), rows, None, self.params.hash, written,
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
                    None, None, f"transient, retrying: {describe(exc, pair, month)}",
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


# -- an update job ------------------------------------------------------------------------


class Busy(Exception):
    """The month's job is running in a live backfill worker: leave it to that worker."""


@dataclass
class UpsertCounts:
    inserted: int = 0
    updated: int = 0
    deleted: int = 0

    @property
    def written(self) -> int:
        return self.inserted + self.updated + self.deleted


def upsert_month(
    conn: psycopg.Connection, ledger: Ledger, dest: Destination, params: Params, run_id: int,
    job: Job, since: datetime | None,
) -> UpsertCounts:  # fmt: skip
    """Bring a month to exactly what a forced recompute would write, by upsert: its rows from
    ``since`` on are recomputed and upserted (unchanged rows are not rewritten; rows whose bar
    is gone are deleted), in one repeatable-read transaction that holds the month's ledger row
    (the lock a backfill's write takes). The caller picks ``since``: the month's start, or
    None, the month's first row whose bar differs, when nothing before that row can have
    changed.

    The job is recorded done with what it read, from the same snapshot, so a later resume
    compares with exactly that. Raises ``Busy`` when a live backfill worker holds the month.
    """
    started = time.time()
    pair, month = job.pair, job.month
    with conn.transaction(), conn.cursor() as cur:
        # one snapshot for the first difference, the bars read, the rows written and what is
        # recorded: a difference looked for before it could miss bars loaded in between, and
        # the month would be recorded done with bars it never computed
        cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        status, worker, stale = ledger.lock_month(cur, run_id, pair, month, params.hash)
        if status == "running" and not (stale or worker_is_dead(worker)):
            raise Busy()
        if since is None:
            since = first_difference(conn, params, pair, month.start, month.end) or month.end
        lo = max(since, month.start)
        try:
            done = read_and_compute(cur, params, pair, lo, month.end)
        except PermanentError as exc:
            raise BqxError(f"{pair.upper()} {month}: {exc}") from None
        counts = UpsertCounts(
            *dest.upsert_range(cur, params, pair, month, lo, done.times, done.matrix)
        )
        sig = done.source_sig if lo == month.start else check_exactly(conn, params, job).source_sig
        written = Written(sig, done.source_stats, dest.month_version(cur, params, pair, month))
        ledger.record_month(
            cur, run_id, job, params=params, rows_total=dest.count_month(cur, params, pair, month),
            rows_written=counts.written, started=started, written=written,
        )  # fmt: skip
    return counts
