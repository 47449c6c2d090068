"""One month verified value by value: its bars (with their lookback) recomputed by the kernel
and compared, bit for bit, with every stored row.

The kernel is deterministic and a job writes its output through binary COPY, so a month as bqx
wrote it equals its recompute exactly: any difference (one value in its last digit, a NULL, a
row missing, a row whose bar is gone, a row outside its month) is a fault, named with the
pair, month, time and column.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg

from bqx.core.months import Month
from bqx.core.params import Params
from bqx.core.text import plural
from bqx.destinations import Destination
from bqx.pipeline.job import PermanentError, read_and_compute


@dataclass
class Fault:
    """One failure, for people (``problem``) and for scripts (the other fields)."""

    problem: str
    pair: str | None = None
    month: str | None = None
    column: str | None = None
    expected: Any = None
    got: Any = None
    at: str | None = None  # the time of the (first) wrong row, when a row is wrong
    count: int | None = None  # how many rows are wrong


def fault(problem: str, pair: str | None = None, month: Any = None, **kw: Any) -> Fault:
    return Fault(problem, pair.upper() if pair else None, str(month) if month else None, **kw)


@dataclass
class MonthVerdict:
    """What checking one month found, and what the kernel sample may draw from it."""

    pair: str
    month: Month
    rows: int = 0  # rows stored
    bars: int = 0  # bars of the month
    faults: list[Fault] = field(default_factory=list)
    picks: list[datetime] = field(default_factory=list)  # random stored row times
    first: datetime | None = None  # the month's first stored row time

    @property
    def ok(self) -> bool:
        return not self.faults


def _when(t: np.datetime64) -> str:
    text = np.datetime_as_string(t, unit="s").replace("T", " ")
    return text[:-3] if text.endswith(":00") else text


def _value(v: float, null: bool) -> float | None:
    return None if null or np.isnan(v) else float(v)


def _times_fault(
    pair: str, month: Month, times: np.ndarray, what: str, column: str = "ts_utc"
) -> Fault:
    first = _when(times[0])
    return fault(f"{pair.upper()} {month}: {plural(len(times), 'row')} {what} (first {first})",
                 pair, month, column=column, at=first, count=len(times))  # fmt: skip


def compare(
    pair: str, month: Month, columns: list[str], want_t: np.ndarray, want: np.ndarray,
    got_t: np.ndarray, got: np.ndarray, got_null: np.ndarray,
) -> list[Fault]:  # fmt: skip
    """Faults of the stored rows (``got_t``, ``got`` columns × rows, ``got_null``) against
    the recomputed ones (``want_t``, ``want``, NaN for NULL); ``columns`` name the rows of both
    matrices (the rate first)."""
    if len(want_t) == len(got_t) and np.array_equal(want_t, got_t):  # the usual case
        return _compare_values(pair, month, columns, want_t, want, got, got_null)
    faults = []
    lo = np.datetime64(month.start.replace(tzinfo=None), "us")
    hi = np.datetime64(month.end.replace(tzinfo=None), "us")
    outside = (got_t < lo) | (got_t >= hi)
    if outside.any():
        faults.append(_times_fault(pair, month, got_t[outside], f"outside {month}"))
    dup = got_t[1:][got_t[1:] == got_t[:-1]]
    if len(dup):
        faults.append(_times_fault(pair, month, dup, "stored twice"))
    missing = np.setdiff1d(want_t, got_t)
    if len(missing):
        faults.append(_times_fault(pair, month, missing, "missing (bars without metrics)"))
    extra = np.setdiff1d(got_t[~outside], want_t)
    if len(extra):
        faults.append(_times_fault(pair, month, extra, "with no bar behind them"))
    _, iw, ig = np.intersect1d(want_t, got_t, return_indices=True)
    return faults + _compare_values(
        pair, month, columns, want_t[iw], want[:, iw], got[:, ig], got_null[:, ig]
    )


def _compare_values(
    pair: str, month: Month, columns: list[str], times: np.ndarray, want: np.ndarray,
    got: np.ndarray, got_null: np.ndarray,
) -> list[Fault]:  # fmt: skip
    """Faults of the values of rows at the same times: bit for bit, NULL only for NaN."""
    faults = []
    for c, col in enumerate(columns):
        w, g, gn = want[c], got[c], got_null[c]
        wn = np.isnan(w)
        bad = (wn != gn) | (~wn & (w.view(np.int64) != g.view(np.int64)))
        if not bad.any():
            continue
        k = int(np.argmax(bad))
        at = _when(times[k])
        stored, recomputed = _value(g[k], bool(gn[k])), _value(w[k], bool(wn[k]))
        faults.append(fault(
            f"{pair.upper()} {month}: {col} differs on {plural(int(bad.sum()), 'row')} (first"
            f" {at}: stored {stored!r}, recomputed {recomputed!r})",
            pair, month, column=col, expected=recomputed, got=stored, at=at,
            count=int(bad.sum()),
        ))  # fmt: skip
    return faults


def check_month(
    conn: psycopg.Connection, params: Params, dest: Destination, pair: str, month: Month, *,
    has_source: bool, sample: int, rng: random.Random,
) -> MonthVerdict:  # fmt: skip
    """Recompute the month from its bars and compare every stored value, in one read-only
    snapshot (a writer meanwhile, a follower for instance, cannot make the two disagree):
    on an autocommit ``conn`` the snapshot is a transaction of its own, always ended."""
    verdict = MonthVerdict(pair, month)
    columns = ["rate", *params.columns]
    # a snapshot of our own, unless the caller's connection is already inside a transaction
    own = conn.autocommit and conn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
    if own:
        conn.execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
    try:
        if has_source:
            with conn.cursor() as cur:
                computed = read_and_compute(cur, params, pair, month.start, month.end,
                                            signed=False)  # fmt: skip
            want_t, want = computed.times, computed.matrix
        else:
            want_t, want = np.empty(0, "datetime64[us]"), np.empty((len(columns), 0))
        got_t, got, got_null = dest.read_month(conn, params, pair, month)
    except PermanentError as exc:  # a bad bar: the month cannot be recomputed as it is
        verdict.faults.append(fault(f"{pair.upper()} {month}: {exc}", pair, month))
        return verdict
    finally:
        if own and conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
    verdict.rows, verdict.bars = len(got_t), len(want_t)
    verdict.faults = compare(pair, month, columns, want_t, want, got_t, got, got_null)
    if len(got_t):
        verdict.first = _datetime(got_t[0])
        drawn = rng.sample(range(1, len(got_t)), min(sample, len(got_t) - 1))
        verdict.picks = [_datetime(got_t[i]) for i in sorted(drawn)]
    return verdict


def _datetime(t: np.datetime64) -> datetime:
    return t.astype("datetime64[us]").astype(datetime).replace(tzinfo=UTC)
