"""One job: read a month's bars with their lookback, compute, and atomically replace the month.

In ONE transaction the job truncates the month's target partition, COPYs the new rows in and
marks itself done in the ledger, so a worker killed at any instant leaves the month as it was.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Sequence
from datetime import date
from typing import Any

import numpy as np
import psycopg
import tenacity
from psycopg import errors as pgerrors
from psycopg import sql

from bqx import metrics
from bqx.backfill.ledger import HEARTBEAT_INTERVAL_S, Ledger
from bqx.backfill.plan import Params
from bqx.db import connect, copy_in_columns, select_series, worker_id
from bqx.errors import BqxError
from bqx.schema import Month

MAX_TRANSIENT_RETRIES = 5


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
    """The month's bars plus the lookback its first bars need (crossing month boundaries),
    in one statement: in bars mode the first bar read is found by a subquery (the W_max-th
    bar before the month, however long ago; all of them if fewer)."""
    layout = params.layout
    src, t, p = layout.source(pair), layout.time, layout.price
    if params.mode == "bars":
        q = sql.SQL(
            "SELECT {t}::timestamptz, {p}::float8 FROM {src} WHERE {t} < %s AND {t} >= coalesce("
            "(SELECT {t} FROM {src} WHERE {t} < %s ORDER BY {t} DESC OFFSET %s LIMIT 1),"
            " '-infinity')"
        )
        args: list[Any] = [month.end, month.start, metrics.lookback_bars(params.windows) - 1]
    else:
        lo = (
            month.start
            - np.timedelta64(metrics.lookback_minutes(params.windows, params.max_fill), "m").item()
        )
        q = sql.SQL("SELECT {t}::timestamptz, {p}::float8 FROM {src} WHERE {t} >= %s AND {t} < %s")
        args = [lo, month.end]
    return select_series(cur, q.format(t=t, p=p, src=src), args)


def compute_month(
    params: Params, month: Month, times: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Metrics for the rows inside ``month``: (times, matrix), the matrix column-major,
    (1 + metric columns) × rows: the rate, then the metric columns in table order.

    The kernel writes straight into the matrix, and the COPY encoder reads it as it is.
    """
    first = int(np.searchsorted(times, np.datetime64(month.start.replace(tzinfo=None), "us")))
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


def null_bar_message(cur: psycopg.Cursor, params: Params, pair: str, month: Month) -> str:
    """Find a bar with a NULL time or price among those a job reads, and name it."""
    layout = params.layout
    t, p, src = layout.time, layout.price, layout.source(pair)
    row = cur.execute(
        sql.SQL(
            "SELECT {t}::text, {p}::text FROM {src} WHERE ({t} IS NULL OR {p} IS NULL)"
            " AND ({t} IS NULL OR {t} < %s) ORDER BY {t} DESC NULLS FIRST LIMIT 1"
        ).format(t=t, p=p, src=src),
        (month.end,),
    ).fetchone()
    if row is None:
        return f"{pair.upper()}: the source bars could not be read (unexpected COPY stream)"
    if row[0] is None:
        return f"bad source bar: {pair.upper()} has a bar with a NULL time in {src.as_string(cur)}"
    return f"bad source bar: {pair.upper()} at {row[0]} has a NULL price in {src.as_string(cur)}"


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

    def __init__(self, url: str, params: Params, run_id: int, worker: str | None = None) -> None:
        self.url, self.params, self.run_id = url, params, run_id
        self.ledger = Ledger(params.layout)
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

    def run(self, pair: str, month: Month, attempt: int) -> int:
        """Process one claimed job, retrying transient errors; returns rows written (-1: failed)."""
        self.heart.current = (pair, month)
        started = time.time()
        try:
            retrying = tenacity.Retrying(
                retry=tenacity.retry_if_exception(
                    lambda exc: _is_transient(exc) and not self.stopped.is_set()
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
                self._fail(pair, month, attempt, started, _describe(exc, pair, month))
            return -1
        finally:
            self.heart.current = None
        return -1  # pragma: no cover - tenacity always returns or raises

    def _attempt(self, pair: str, month: Month, attempt: int, started: float) -> int:
        conn = self._connection()
        with conn.cursor() as cur:
            try:
                times, prices = read_series(cur, self.params, pair, month)
            except BqxError:  # a NULL time or price: name the bar, not the stream
                conn.rollback()
                raise _Permanent(null_bar_message(cur, self.params, pair, month)) from None
        conn.commit()
        try:
            out_times, matrix = compute_month(self.params, month, times, prices)
        except ValueError as exc:
            raise _Permanent(bad_bar_message(pair, times, exc)) from None
        cols = ["ts_utc", "rate", *self.params.columns]
        part = self.params.layout.target_partition(pair, month)
        with conn.transaction(), conn.cursor() as cur:
            if not self.ledger.lock_own(cur, pair, month, self.worker):
                raise _Permanent("job was taken over by another worker")
            cur.execute(sql.SQL("TRUNCATE {}").format(part))
            # truncated in this transaction: FREEZE is allowed (docs/performance.md)
            rows = copy_in_columns(cur, part, cols, out_times, matrix, freeze=True)
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
