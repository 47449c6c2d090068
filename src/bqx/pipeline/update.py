"""``bqx update``: keep each pair's metrics current without recomputing history (docs/update.md).

An update is planned per pair and run as upsert jobs of the pipeline (``job.upsert_month``).
Per pair, index look-ups find what to do: the newest source bar, the newest metric row, and the
earliest difference between the source's prices and the target's ``rate`` over a recent
horizon (``recheck``, default one day before the newest metric row), which is where a late or
corrected bar shows. Rows from that point on are recomputed with the lookback their windows
need (the same kernel and the same bars as a backfill, so the values are identical).

A month a backfill is computing right now is left to it and picked up by the next poll.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import tenacity

from bqx import metrics
from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.params import Job, Params
from bqx.core.symbols import validate_pair
from bqx.core.text import format_duration
from bqx.db.connect import DatabaseLike, connect, is_transient
from bqx.destinations import Destination
from bqx.destinations.postgres import PostgresPartitions
from bqx.errors import BqxError, InvalidOption
from bqx.pipeline.job import Busy, upsert_month
from bqx.pipeline.plan import (
    Decision,
    default_destination,
    resolve,
    target_reason,
    with_orphans,
)
from bqx.store import bars, catalog, targets
from bqx.store.ledger import Ledger
from bqx.store.versions import source_jobs, versioned

DEFAULT_RECHECK_S = 86_400.0
MONTH_RETRIES = 8  # serialization failures when another writer held the month: retry at once


# -- results ------------------------------------------------------------------------------


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


@dataclass
class PairUpdate:
    """What one poll did for one pair."""

    pair: str
    new_rows: int = 0  # rows inserted
    changed_rows: int = 0  # existing rows whose values changed (late or corrected bars)
    deleted_rows: int = 0  # rows whose source bar was removed
    newest_bar: datetime | None = None
    newest_metric: datetime | None = None
    months: list[str] = field(default_factory=list)  # months written
    busy: list[str] = field(default_factory=list)  # months left to a running backfill
    error: str | None = None  # why the pair could not be brought up to date (the others were)

    @property
    def written(self) -> int:
        return self.new_rows + self.changed_rows + self.deleted_rows

    @property
    def lag_s(self) -> float | None:
        """Newest source bar's time minus newest metric row's time (0 when current)."""
        if self.newest_bar is None or self.newest_metric is None:
            return None
        return max(0.0, (self.newest_bar - self.newest_metric).total_seconds())

    def as_dict(self) -> dict[str, Any]:
        return {
            "pair": self.pair.upper(), "new_rows": self.new_rows, "changed_rows": self.changed_rows,
            "deleted_rows": self.deleted_rows, "newest_bar": _iso(self.newest_bar),
            "newest_metric": _iso(self.newest_metric), "lag_s": self.lag_s,
            "months": self.months, "busy": self.busy, "error": self.error,
        }  # fmt: skip


@dataclass
class UpdateResult:
    """What one pass of ``bqx update`` did."""

    pairs: list[PairUpdate] = field(default_factory=list)
    run_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(p.written for p in self.pairs)

    @property
    def errors(self) -> list[str]:
        """One line per pair that could not be brought up to date."""
        return [f"{p.pair.upper()}: {p.error}" for p in self.pairs if p.error]

    @property
    def lag_max_s(self) -> float:
        return max((p.lag_s or 0 for p in self.pairs), default=0.0)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "pairs": [p.as_dict() for p in self.pairs],
            "run_ids": self.run_ids, "seconds": round(self.seconds, 3),
        }  # fmt: skip

    def text(self) -> str:
        lines = []
        for p in self.pairs:
            if p.written or p.busy:
                busy = f" ({', '.join(p.busy)} left to a running backfill)" if p.busy else ""
                lines.append(f"{p.pair.upper()}: +{p.new_rows:,} new, {p.changed_rows:,}"
                             f" changed, {p.deleted_rows:,} removed{busy}")  # fmt: skip
        lag = format_duration(self.lag_max_s)
        lines.append(f"{self.rows:,} rows written for {len(self.pairs)} pairs in"
                     f" {self.seconds:.2f} s · lag max {lag}")  # fmt: skip
        return "\n".join(lines)

    def summary(self) -> str:
        """One log line for a poll that wrote rows."""
        wrote = [p for p in self.pairs if p.written]
        pairs = ", ".join(f"{p.pair.upper()} +{p.written}" for p in wrote[:8])
        more = f" and {len(wrote) - 8} more" if len(wrote) > 8 else ""
        busy = sum(len(p.busy) for p in self.pairs)
        tail = f" · {busy} months left to a running backfill" if busy else ""
        return (
            f"updated {len(wrote)} pairs ({pairs}{more}) · {self.rows} rows"
            f" · lag max {format_duration(self.lag_max_s)} · {self.seconds:.2f} s{tail}"
        )


# -- planning -----------------------------------------------------------------------------


def _show(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def parse_duration(text: str | float, param: str = "recheck") -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``6h`` or ``1d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = str(text).strip().lower()
    try:
        if raw and raw[-1] in units:
            value = float(raw[:-1]) * units[raw[-1]]
        else:
            value = float(raw)
    except ValueError:
        raise InvalidOption(param, text, "expected seconds or e.g. 30m, 6h, 1d") from None
    if not 0 <= value <= 3650 * 86400:
        raise InvalidOption(param, text, "must be between 0 and 3650 days")
    return value


class Updater:
    """Keeps targets current, poll after poll, on one connection (reopened when lost)."""

    def __init__(
        self,
        url: DatabaseLike,
        layout: Layout,
        *,
        pairs: Sequence[str] | None = None,
        recheck_s: float = DEFAULT_RECHECK_S,
        windows: Sequence[int] | None = None,
        mode: str | None = None,
        max_fill: int | None = None,
        sink: str | None = None,
    ) -> None:
        if recheck_s < 0:
            raise InvalidOption("recheck", recheck_s, "must be ≥ 0 seconds")
        self.url, self.layout, self.recheck = url, layout, timedelta(seconds=recheck_s)
        self.pairs = [validate_pair(p) for p in pairs] if pairs is not None else None
        self.default = Params.build(
            layout, windows or metrics.DEFAULT_WINDOWS, mode or "bars",
            5 if max_fill is None else max_fill,
        )  # fmt: skip
        # options given explicitly must agree with what each pair was computed with
        self.explicit = {
            k: v for k, v in (("windows", windows and self.default.windows), ("mode", mode),
                              ("max_fill", max_fill)) if v is not None
        }  # fmt: skip
        self.ledger = Ledger(layout)
        self.dest = PostgresPartitions(layout)
        self.sink = sink  # a Delta table asked for (None: where each pair was written)
        self.lakes: dict[str, Destination] = {}  # a Delta sink's destination, per URI
        self.conn: psycopg.Connection | None = None
        self.checked: set[tuple[str, str]] = set()  # (pair, params hash) already checked
        self.unfinished: list[int] = []  # runs the connection was lost in, to close when back
        self.targets: set[str] = set()  # pairs whose target table exists
        self.partitions: set[tuple[str, Month]] = set()  # target partitions known to exist
        self.ledger_ready = False  # the ledger tables exist
        self.failure_run: int | None = None  # the run a pair's failure is recorded in
        self.reported: dict[str, str] = {}  # pair -> the failure last recorded for it

    # connections
    def connection(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.close()
            self.conn = connect(self.url, autocommit=True)
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    # what each pair is
    def _pairs(self, conn: psycopg.Connection, only: Iterable[str] | None, recorded: dict) -> list:
        if only is not None:
            return [validate_pair(p) for p in only]
        if self.pairs is not None:
            return self.pairs
        pairs = sorted(set(catalog.source_pairs(conn, self.layout)) | set(recorded))
        if not pairs:
            raise BqxError(
                f"no source tables matching {self.layout.source_table!r} in schema "
                f"{self.layout.schema!r}: load bars with `bqx generate` or `bqx ingest`"
            )
        return pairs

    def _params_of(self, conn: psycopg.Connection, pair: str, recorded: dict) -> Params:
        """The parameters the pair was computed with, checked against its tables once."""
        doc = recorded.get(pair)
        params = self.default if doc is None else Params.recorded(doc, self.layout, self.default)
        if doc is None and self.sink:
            params = replace(params, sink=self.sink)
        self._check_explicit(pair, params)
        if params.bars:
            raise BqxError(f"{pair.upper()} reads its bars from {params.bars}: `bqx update` reads"
                           " the database's bar tables; run `bqx backfill` (it redoes only the"
                           " months whose files changed)")  # fmt: skip
        if self.sink and params.sink != self.sink:
            raise BqxError(f"{pair.upper()}'s metrics are in {params.sink or 'the database'}, not"
                           f" {self.sink}: run `bqx backfill --pairs {pair.upper()} --sink"
                           f" {self.sink} --force` to move them")  # fmt: skip
        if (pair, params.hash) not in self.checked:
            catalog.check_source(conn, params.layout, pair)
            if params.sink:
                self._dest(params).check(conn, params, pair)
            else:
                catalog.check_target_columns(conn, params.layout, pair, params.windows)
            self.checked.add((pair, params.hash))
        return params

    def _dest(self, params: Params) -> Destination:
        """Where the pair's metrics are: its Delta sink, else the database's partitions."""
        if not params.sink:
            return self.dest
        if params.sink not in self.lakes:
            self.lakes[params.sink] = default_destination(params)
        return self.lakes[params.sink]

    def _check_explicit(self, pair: str, params: Params) -> None:
        for key, want in self.explicit.items():
            have = getattr(params, key)
            if have != want:
                raise BqxError(
                    f"{pair.upper()} was computed with {key.replace('_', ' ')} "
                    f"{_show(have)}, not {_show(want)}: run `bqx backfill --pairs "
                    f"{pair.upper()} --force` with the new value (docs/update.md)"
                )

    def _newest(self, conn: psycopg.Connection, params: Params, pair: str) -> tuple[Any, Any]:
        if params.sink:  # the newest time in the Delta log's statistics
            lake: Any = self._dest(params)
            return bars.bar_bounds(conn, params.layout, pair)[1], lake.newest(pair)
        if pair not in self.targets and catalog.has_target(conn, self.layout, pair):
            self.targets.add(pair)  # a target, once there, stays: no catalog look-up
        bar = bars.bar_bounds(conn, params.layout, pair)[1]
        metric = targets.newest(conn, self.layout, pair) if pair in self.targets else None
        return bar, metric

    def poll(
        self, only: Iterable[str] | None = None, stop: threading.Event | None = None
    ) -> UpdateResult:
        """One pass over the pairs (or ``only`` these): bring every month whose bars changed
        up to date. A pair that fails (its table gone, a bad bar) is reported in its
        ``PairUpdate.error`` and the others go on; a lost database is raised, for a retry."""
        started = time.monotonic()
        conn = self.connection()
        self._close_unfinished(conn)
        if only is not None and self.pairs is not None:
            only = [p for p in only if p in self.pairs]
        result = UpdateResult()
        recorded = self.ledger.pair_params(conn)
        todo: list[_PairPlan] = []
        for pair in self._pairs(conn, only, recorded):
            pu = PairUpdate(pair)
            result.pairs.append(pu)
            plan = self._isolated(conn, pu, lambda c, p=pair: self._plan_pair(c, p, recorded))
            if plan is None:
                continue
            self.reported.pop(pair, None)  # planned again: a later failure is news
            pu.newest_bar, pu.newest_metric = plan.newest_bar, plan.newest_metric
            if plan.changed:
                todo.append(plan)
        if todo:
            self._write(conn, todo, result, stop)
        result.seconds = time.monotonic() - started
        return result

    def _isolated(self, conn: psycopg.Connection, pu: PairUpdate, work: Any) -> Any:
        """``work(conn)`` for one pair; its failure is the pair's, recorded, not the poll's."""
        try:
            return work(conn)
        except Exception as exc:
            if is_transient(exc) or not isinstance(exc, BqxError | psycopg.Error):
                raise
            pu.error = _one_line(exc)
            self._record_failure(conn, pu)
            return None

    def _record_failure(self, conn: psycopg.Connection, pu: PairUpdate) -> None:
        """Record a pair's failure in the ledger (``status`` lists it): in the run being
        written, else in a run of its own, once per new error (a follower polling every
        second must not add a run per poll)."""
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.rollback()
        error = f"{pu.pair.upper()}: {pu.error}"
        if self.failure_run is None and self.reported.get(pu.pair) == error:
            return
        self.reported[pu.pair] = error
        self._ensure_ledger(conn)
        month = Month.of(datetime.now(UTC))
        run_id = self.failure_run
        if run_id is None:
            doc = _run_doc(self.default, [(pu.pair, month)])
            run_id = self.ledger.start_run(conn, "update", self.default, doc, 1, "update", 1)
        self.ledger.record_failure(conn, run_id, pu.pair, month, time.time(), error)
        if self.failure_run is None:
            self.ledger.end_run(conn, run_id, "failed")

    def _plan_pair(self, conn: psycopg.Connection, pair: str, recorded: dict) -> _PairPlan:
        """The pair's months whose bars (or stored metrics) changed, decided by the same rule
        as a backfill's resume."""
        params = self._params_of(conn, pair, recorded)
        bar, metric = self._newest(conn, params, pair)
        plan = _PairPlan(pair, params, bar, metric)
        if bar is None and metric is None:
            return plan
        start = None if versioned(conn, params.layout, pair) else self._horizon(metric)
        jobs = source_jobs(conn, params, pair, start, None, "auto")
        rows = self.ledger.read_jobs(conn, [pair])
        jobs = with_orphans(conn, params, jobs, rows, {pair: (start, None)})
        decisions, seen = resolve(conn, params, self._dest(params), jobs, rows, force=False)
        if seen:
            self.ledger.observe(conn, seen)
        for d in decisions:
            if d.do and d.reason == "parameters changed":
                raise BqxError(
                    f"{pair.upper()} {d.job.month} was computed with other parameters than the"
                    f" pair's latest run: run `bqx backfill --pairs {pair.upper()} --force`"
                )
        plan.changed = [d for d in decisions if d.do]
        plan.rows = rows
        return plan

    def _horizon(self, metric: datetime | None) -> Month | None:
        """For a source bqx does not version: how far back changes are looked for."""
        return None if metric is None else Month.of(metric - self.recheck)

    # writing
    def _ensure_ledger(self, conn: psycopg.Connection) -> None:
        # DDL only when something is missing: even IF NOT EXISTS forms take strong locks
        if not (self.ledger_ready or self.ledger.has_jobs_table(conn)):
            with conn.transaction():
                self.ledger.create(conn)
        self.ledger_ready = True

    def _close_unfinished(self, conn: psycopg.Connection) -> None:
        while self.unfinished:
            self.ledger.end_run(conn, self.unfinished[0], "interrupted")
            self.unfinished.pop(0)
        if self.ledger.exists(conn):  # a follower killed mid-poll left its run running
            self.ledger.mark_orphaned_runs(conn)

    def _write(
        self, conn: psycopg.Connection, todo: list[_PairPlan], result: UpdateResult,
        stop: threading.Event | None,
    ) -> None:  # fmt: skip
        by_pair = {p.pair: p for p in result.pairs}
        groups: dict[str, list[_PairPlan]] = {}
        for item in todo:
            groups.setdefault(item.params.hash, []).append(item)
        self._ensure_ledger(conn)
        for items in groups.values():
            params = items[0].params
            plan = [(t.pair, d.job.month) for t in items for d in t.changed]
            run_id = self.ledger.start_run(conn, "update", params, _run_doc(params, plan), 1,
                                           "update", len(plan))  # fmt: skip
            result.run_ids.append(run_id)
            self.failure_run = run_id
            status = "interrupted"
            try:
                for t in items:
                    pu = by_pair[t.pair]
                    if stop is not None and stop.is_set():
                        return
                    self._isolated(conn, pu, lambda c, t=t, pu=pu, r=run_id: self._write_pair(
                        c, r, t, pu, stop))  # fmt: skip
                status = "failed" if any(by_pair[t.pair].error for t in items) else "done"
            except Exception:
                status = "failed"
                raise
            finally:
                self.failure_run = None
                try:
                    self.ledger.end_run(conn, run_id, status)
                except psycopg.Error:
                    self.unfinished.append(run_id)  # closed once the database is back

    def _write_pair(
        self, conn: psycopg.Connection, run_id: int, plan: _PairPlan, pu: PairUpdate,
        stop: threading.Event | None,
    ) -> None:  # fmt: skip
        for i, d in enumerate(plan.changed):
            if stop is not None and stop.is_set():
                return
            since = self._since(plan, d, first=i == 0)
            self._write_month(conn, run_id, plan.params, d.job, since, pu)
        pu.newest_bar, pu.newest_metric = self._newest(conn, plan.params, plan.pair)

    @staticmethod
    def _since(plan: _PairPlan, d: Decision, first: bool) -> datetime | None:
        """Where a changed month's recompute starts: None (its first row whose bar differs,
        found in the write's snapshot) when it is the pair's earliest changed month, was done,
        and its metrics are as that job left them (so nothing before that row can have
        changed); else the month's start."""
        month, row = d.job.month, plan.rows.get((d.job.pair, d.job.month))
        if not first or d.reason != "source changed" or row is None or row.status != "done":
            return month.start
        if target_reason(d.job, row, d.target) is not None or plan.params.sink:
            return month.start  # a Delta month is rewritten whole anyway
        return None

    def _write_month(
        self, conn: psycopg.Connection, run_id: int, params: Params, job: Job,
        since: datetime | None, pu: PairUpdate,
    ) -> None:  # fmt: skip
        pair, month = job.pair, job.month
        dest = self._dest(params)
        if (pair, month) not in self.partitions:
            if params.sink:
                dest.prepare(conn, params, [job])  # the table, once
            else:
                self.dest.ensure_month(conn, params, pair, month)
            self.targets.add(pair)
        self.partitions.add((pair, month))
        retrying = tenacity.Retrying(
            retry=tenacity.retry_if_exception_type(psycopg.errors.SerializationFailure),
            stop=tenacity.stop_after_attempt(MONTH_RETRIES),
            wait=tenacity.wait_random(0, 0.05),
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    counts = upsert_month(conn, self.ledger, dest, params, run_id, job,
                                          since)  # fmt: skip
        except Busy:
            pu.busy.append(str(month))
            return
        pu.new_rows += counts.inserted
        pu.changed_rows += counts.updated
        pu.deleted_rows += counts.deleted
        pu.months.append(str(month))


@dataclass
class _PairPlan:
    pair: str
    params: Params
    newest_bar: datetime | None
    newest_metric: datetime | None
    changed: list[Decision] = field(default_factory=list)
    rows: dict = field(default_factory=dict)


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _run_doc(params: Params, plan: list[tuple[str, Month]]) -> dict[str, Any]:
    """The run's parameters, with the keys a backfill's run records (status, verify read them)."""
    return {
        "command": "update", **params.describe(), "pairs": sorted({p for p, _ in plan}),
        "months": sorted({str(m) for _, m in plan}), "jobs": [[p, str(m)] for p, m in plan],
        "workers": 1, "executor": "update",
    }  # fmt: skip


class UpdateFailed(BqxError):
    """Some pairs could not be brought up to date (the others were): ``result`` says which."""

    def __init__(self, result: UpdateResult) -> None:
        failed = [p for p in result.pairs if p.error]
        more = f" (and {len(failed) - 1} more pair(s) failed)" if len(failed) > 1 else ""
        super().__init__(f"{failed[0].pair.upper()}: {failed[0].error}{more}")
        self.result = result


def update_once(updater: Updater) -> UpdateResult:
    """One pass; transient database errors are retried with backoff. Raises ``UpdateFailed``
    (holding the result) when a pair failed; the other pairs are brought up to date."""
    result = _retried_poll(updater)
    if any(p.error for p in result.pairs):
        raise UpdateFailed(result)
    return result


def _retried_poll(updater: Updater) -> UpdateResult:
    try:
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception(is_transient),
            stop=tenacity.stop_after_attempt(5),
            wait=tenacity.wait_exponential(multiplier=0.5, max=8),
            before_sleep=lambda rs: updater.close(),
            reraise=True,
        ):
            with attempt:
                return updater.poll()
    finally:
        updater.close()
    raise AssertionError("unreachable")  # pragma: no cover
