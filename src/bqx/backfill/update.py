"""``bqx update``: keep each pair's metrics current without recomputing history (docs/update.md).

Per pair, three index look-ups find what to do: the newest source bar, the newest metric row,
and the earliest difference between the source's prices and the target's ``rate`` over a
recent horizon (``recheck``, default one day before the newest metric row), which is where a
late or corrected bar shows. Rows from that point on are recomputed with the lookback their
windows need (the same kernel and the same bars as a backfill, so the values are identical),
staged through COPY and upserted; rows whose values did not change are not rewritten.

Each (pair, month) is written in ONE repeatable-read transaction that first locks the month's
row in the ledger (``bqx_jobs``), the same row lock a backfill's write transaction takes, so
an update never interleaves with another update or with a backfill of that month: the later
one waits, sees a serialization failure and retries on fresh data. A month a backfill is
computing right now is left to it and picked up by the next poll.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import psycopg
import tenacity
from psycopg import sql

from bqx import metrics
from bqx.backfill.job import _is_transient, bad_bar_message
from bqx.backfill.ledger import STALE_AFTER_S, Ledger, worker_is_dead
from bqx.backfill.plan import Params, _check_source, _pair_jobs
from bqx.config import Settings
from bqx.db import connect, copy_in, copy_out_series, current_user, resolve_url, worker_id
from bqx.errors import BqxError
from bqx.extras import require
from bqx.schema import (
    LEDGER_JOBS,
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

CHANNEL = "bqx_bars"  # bqx's own loads NOTIFY here (payload: the pair) when they commit bars
DEFAULT_RECHECK_S = 86_400.0
MONTH_RETRIES = 8  # serialization failures when another writer held the month: retry at once

log = logging.getLogger("bqx.update")


# -- results ------------------------------------------------------------------------------


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

    @property
    def written(self) -> int:
        return self.new_rows + self.changed_rows + self.deleted_rows

    @property
    def lag_s(self) -> float | None:
        """Newest source bar's time minus newest metric row's time (0 when current)."""
        if self.newest_bar is None:
            return None
        if self.newest_metric is None:
            return None
        return max(0.0, (self.newest_bar - self.newest_metric).total_seconds())

    def as_dict(self) -> dict[str, Any]:
        iso = lambda t: None if t is None else t.astimezone(UTC).isoformat()  # noqa: E731
        return {
            "pair": self.pair, "new_rows": self.new_rows, "changed_rows": self.changed_rows,
            "deleted_rows": self.deleted_rows, "newest_bar": iso(self.newest_bar),
            "newest_metric": iso(self.newest_metric), "lag_s": self.lag_s,
            "months": self.months, "busy": self.busy,
        }  # fmt: skip


@dataclass
class UpdateResult:
    pairs: list[PairUpdate] = field(default_factory=list)
    run_ids: list[int] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def rows(self) -> int:
        return sum(p.written for p in self.pairs)

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows": self.rows, "pairs": [p.as_dict() for p in self.pairs],
            "run_ids": self.run_ids, "seconds": round(self.seconds, 3),
        }  # fmt: skip


class _Busy(Exception):
    """The month's job is running in a live backfill worker: leave it to that worker."""


class _Unchanged(Exception):
    """Recomputing the month changed no row: roll back, record nothing."""


# -- the ledger, for updates --------------------------------------------------------------


class UpdateLedger(Ledger):
    """The ledger SQL an update adds: its runs, and a month's job row kept true after upserts."""

    def start_update_run(self, conn: psycopg.Connection, params: Params, doc: dict) -> int:
        row = conn.execute(
            self._q(
                "INSERT INTO {runs} (command, params, param_hash, workers, executor, run_by, host,"
                " jobs_total) VALUES ('update', %s, %s, 1, 'update', %s, %s, %s) RETURNING run_id"
            ),
            (json.dumps(doc), params.hash, current_user(), worker_id().rsplit(":", 1)[0],
             len(doc["jobs"])),
        ).fetchone()  # fmt: skip
        return int(row[0])

    def lock_month(
        self, cur: psycopg.Cursor, run_id: int, pair: str, month: Month, param_hash: str
    ) -> tuple[str, str | None, str | None, bool, bool]:
        """Lock (creating it if needed) the month's job row: the lock a backfill write takes.

        Returns (status, worker, param_hash, created, stale). The row is always touched, so
        a concurrent repeatable-read writer of the month fails to serialize and retries.
        """
        row = cur.execute(
            self._q(
                "INSERT INTO {jobs} AS j (pair, month, status, run_id, param_hash, attempts,"
                " updated_at) VALUES (%s, %s, 'pending', %s, %s, 0, now())"
                " ON CONFLICT (pair, month) DO UPDATE SET updated_at = now()"
                " RETURNING j.status, j.worker, j.param_hash, j.xmax = 0,"
                " coalesce(j.heartbeat_at < now() - make_interval(secs => %s), true)"
            ),
            (pair, month.first_day, run_id, param_hash, STALE_AFTER_S),
        ).fetchone()
        return row[0], row[1], row[2], bool(row[3]), bool(row[4])

    def record_month(
        self, cur: psycopg.Cursor, run_id: int, pair: str, month: Month, *, done: bool,
        params: Params, source_bars: int, source_sig: str | None, source_ver: str | None,
        rows_total: int, rows_written: int, started: float,
    ) -> None:  # fmt: skip
        """After the upsert: the job row states the month's totals; the attempt, what changed."""
        duration = time.time() - started
        if done:  # a month not done stays as it was: its backfill still has to run
            cur.execute(
                self._q(
                    "UPDATE {jobs} SET status = 'done', run_id = %s, param_hash = %s,"
                    " source_bars = %s, source_sig = %s, source_ver = %s, rows_written = %s,"
                    " attempts = greatest(attempts, 1), started_at = coalesce(started_at,"
                    " to_timestamp(%s)), finished_at = now(), duration_s = %s, worker = NULL,"
                    " backend_pid = NULL, last_error = NULL, updated_at = now()"
                    " WHERE pair = %s AND month = %s"
                ),
                (run_id, params.hash, source_bars, source_sig, source_ver, rows_total, started,
                 duration, pair, month.first_day),
            )  # fmt: skip
        cur.execute(
            self._q(
                "INSERT INTO {attempts} (run_id, pair, month, attempt, status, worker, started_at,"
                " finished_at, duration_s, source_bars, rows_written)"
                " VALUES (%s, %s, %s, 1, 'done', %s, to_timestamp(%s), now(), %s, %s, %s)"
            ),
            (run_id, pair, month.first_day, worker_id(), started, duration, source_bars,
             rows_written),
        )  # fmt: skip

    def pair_params(
        self, conn: psycopg.Connection, schema: str, known: bool = False
    ) -> dict[str, dict]:
        """Per pair, the parameters of the latest run that wrote one of its months."""
        if not known and table_columns(conn, schema, LEDGER_JOBS) is None:
            return {}
        rows = conn.execute(
            self._q(
                "SELECT DISTINCT ON (j.pair) j.pair, r.params FROM {jobs} j"
                " JOIN {runs} r ON r.run_id = j.run_id ORDER BY j.pair, j.run_id DESC"
            )
        ).fetchall()
        return {p: (json.loads(d) if isinstance(d, str) else d) for p, d in rows}


def _params_from(doc: dict, layout: Layout, default: Params) -> Params:
    """The Params a pair was computed with, as recorded in its run's parameters."""
    return Params(
        windows=tuple(doc.get("windows", default.windows)), mode=doc.get("mode", default.mode),
        max_fill=int(doc.get("max_fill", default.max_fill)), schema=layout.schema,
        source_table=doc.get("source_table", default.source_table),
        time_column=doc.get("time_column", default.time_column),
        price_column=doc.get("price_column", default.price_column),
    )  # fmt: skip


# -- reading what is there ----------------------------------------------------------------


def _exists(conn: psycopg.Connection, ident: sql.Identifier) -> bool:
    name = ident.as_string(conn)
    return conn.execute("SELECT to_regclass(%s) IS NOT NULL", (name,)).fetchone()[0]


def newest(
    conn: psycopg.Connection, params: Params, pair: str, has_target: bool | None = None
) -> tuple[datetime | None, datetime | None]:
    """(newest source bar, newest metric row): index look-ups, no scan of history."""
    layout = params.layout
    if has_target is None:
        has_target = _exists(conn, layout.target(pair))
    q = sql.SQL("SELECT (SELECT max({t})::timestamptz FROM {src}), {metric}").format(
        t=layout.time, src=layout.source(pair),
        metric=sql.SQL("(SELECT max(ts_utc) FROM {})").format(layout.target(pair))
        if has_target else sql.SQL("NULL::timestamptz"),
    )  # fmt: skip
    bar, metric = conn.execute(q).fetchone()
    return bar, metric


def first_difference(
    conn: psycopg.Connection, params: Params, pair: str, since: datetime
) -> datetime | None:
    """The earliest time ≥ ``since`` where source and target disagree: a bar without a row
    (new or late), a row without a bar (removed), or a price different from the row's rate."""
    layout = params.layout
    return conn.execute(
        sql.SQL(
            "SELECT min(coalesce(s.t, d.ts_utc)) FROM"
            " (SELECT {t}::timestamptz AS t, {p}::float8 AS p FROM {src} WHERE {t} >= %s) s"
            " FULL JOIN (SELECT ts_utc, rate FROM {tgt} WHERE ts_utc >= %s) d ON d.ts_utc = s.t"
            " WHERE s.t IS NULL OR d.ts_utc IS NULL OR s.p IS DISTINCT FROM d.rate"
        ).format(t=layout.time, p=layout.price, src=layout.source(pair), tgt=layout.target(pair)),
        (since, since),
    ).fetchone()[0]


def read_from(
    cur: psycopg.Cursor, params: Params, pair: str, since: datetime, until: datetime
) -> tuple[np.ndarray, np.ndarray]:
    """Bars in [since, until) plus the lookback the first of them needs (as a backfill reads)."""
    layout = params.layout
    src, t, p = layout.source(pair), layout.time, layout.price
    if params.mode == "bars":
        row = cur.execute(
            sql.SQL(
                "SELECT {t}::timestamptz FROM {src} WHERE {t} < %s ORDER BY {t} DESC"
                " OFFSET %s LIMIT 1"
            ).format(t=t, src=src),
            (since, metrics.lookback_bars(params.windows) - 1),
        ).fetchone()
        lo = row[0] if row is not None else None
    else:
        lo = since - timedelta(minutes=metrics.lookback_minutes(params.windows, params.max_fill))
    if lo is None:  # fewer bars before ``since`` than the largest window: the whole history
        q = sql.SQL("SELECT {t}, {p}::float8 FROM {src} WHERE {t} < %s ORDER BY {t}")
        args: list[Any] = [until]
    else:
        q = sql.SQL("SELECT {t}, {p}::float8 FROM {src} WHERE {t} >= %s AND {t} < %s ORDER BY {t}")
        args = [lo, until]
    return copy_out_series(cur, q.format(t=t, p=p, src=src), args)


def compute_from(
    params: Params, since: datetime, times: np.ndarray, prices: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Rows at or after ``since``: (times, matrix [rate, *metric columns])."""
    cols = metrics.compute_matrix(
        times, prices, windows=params.windows, mode=params.mode, max_fill=params.max_fill
    )
    first = int(np.searchsorted(times, np.datetime64(since.astimezone(UTC).replace(tzinfo=None))))
    out = np.empty((len(times) - first, 1 + cols.shape[0]), dtype=np.float64)
    out[:, 0] = prices[first:]
    out[:, 1:] = cols[:, first:].T
    return times[first:], out


# -- the updater --------------------------------------------------------------------------


def _month_of(t: datetime) -> Month:
    return Month.of(t.astimezone(UTC))


def _months(first: Month, last: Month) -> list[Month]:
    out, m = [], first
    while m <= last:
        out.append(m)
        m = m.next()
    return out


class Updater:
    """Keeps targets current, poll after poll, on one connection (reopened when lost)."""

    def __init__(
        self,
        url: str,
        layout: Layout,
        *,
        pairs: Sequence[str] | None = None,
        recheck_s: float = DEFAULT_RECHECK_S,
        windows: Sequence[int] | None = None,
        mode: str | None = None,
        max_fill: int | None = None,
    ) -> None:
        if recheck_s < 0:
            raise BqxError(f"invalid --recheck {recheck_s:g}: must be ≥ 0 seconds")
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
        self.ledger = UpdateLedger(layout)
        self.conn: psycopg.Connection | None = None
        self.checked: set[tuple[str, str]] = set()  # (pair, params hash) already checked
        self.unfinished: list[int] = []  # runs the connection was lost in, to close when back
        self.targets: set[str] = set()  # pairs whose target table exists
        self.partitions: set[tuple[str, Month]] = set()  # target partitions known to exist
        self.ledger_ready = False  # the ledger tables exist
        self.staged: set[str] = set()  # staging tables created in this session

    # connections
    def connection(self) -> psycopg.Connection:
        if self.conn is None or self.conn.closed or self.conn.broken:
            self.close()
            self.conn = connect(self.url, autocommit=True)
            self.staged = set()  # temp tables went with the old session
        return self.conn

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
        self.conn = None

    # what each pair is
    def _pair_params(self, conn: psycopg.Connection, only: Iterable[str] | None) -> dict:
        recorded = self.ledger.pair_params(conn, self.layout.schema, self.ledger_ready)
        if only is not None:
            pairs = [validate_pair(p) for p in only]
        elif self.pairs is not None:
            pairs = self.pairs
        else:
            pairs = sorted(set(source_pairs(conn, self.layout)) | set(recorded))
            if not pairs:
                raise BqxError(
                    f"no source tables matching {self.layout.source_table!r} in schema "
                    f"{self.layout.schema!r}: load bars with `bqx generate` or `bqx ingest`"
                )
        out: dict[str, Params] = {}
        for pair in pairs:
            doc = recorded.get(pair)
            params = self.default if doc is None else _params_from(doc, self.layout, self.default)
            for key, want in self.explicit.items():
                have = getattr(params, key)
                if have != want:
                    raise BqxError(
                        f"{pair.upper()} was computed with {key.replace('_', '-')} "
                        f"{_show(have)}, not {_show(want)}: run `bqx backfill --pairs "
                        f"{pair.upper()} --force` with the new value (docs/update.md)"
                    )
            if (pair, params.hash) not in self.checked:
                _check_source(conn, params.layout, pair)
                check_target_columns(conn, params.layout, pair, params.windows)
                self.checked.add((pair, params.hash))
            out[pair] = params
        return out

    def poll(
        self, only: Iterable[str] | None = None, stop: threading.Event | None = None
    ) -> UpdateResult:
        """One pass over the pairs (or ``only`` these): find what changed, write it."""
        started = time.monotonic()
        conn = self.connection()
        while self.unfinished:
            self.ledger.end_run(conn, self.unfinished[0], "interrupted")
            self.unfinished.pop(0)
        if only is not None and self.pairs is not None:
            only = [p for p in only if p in self.pairs]
        result = UpdateResult()
        todo: list[tuple[str, Params, datetime, Month]] = []
        for pair, params in self._pair_params(conn, only).items():
            if pair not in self.targets and _exists(conn, self.layout.target(pair)):
                self.targets.add(pair)  # a target, once there, stays: no catalog look-up
            bar, metric = newest(conn, params, pair, pair in self.targets)
            pu = PairUpdate(pair, newest_bar=bar, newest_metric=metric)
            result.pairs.append(pu)
            if bar is None and metric is None:
                continue
            if metric is None:
                since = _first_bar(conn, params, pair)
            else:
                since = first_difference(conn, params, pair, metric - self.recheck)
            if since is not None:
                last = max(t for t in (bar, metric) if t is not None)
                todo.append((pair, params, since, _month_of(last)))
        if todo:
            self._write(conn, todo, result, stop)
        result.seconds = time.monotonic() - started
        return result

    # writing
    def _write(
        self, conn: psycopg.Connection, todo: list[tuple[str, Params, datetime, Month]],
        result: UpdateResult, stop: threading.Event | None,
    ) -> None:  # fmt: skip
        by_pair = {p.pair: p for p in result.pairs}
        groups: dict[str, list[tuple[str, Params, datetime, Month]]] = {}
        for item in todo:
            groups.setdefault(item[1].hash, []).append(item)
        for items in groups.values():
            params = items[0][1]
            plan = [(pair, m) for pair, _, since, last in items
                    for m in _months(_month_of(since), last)]  # fmt: skip
            # DDL only when something is missing: even IF NOT EXISTS forms take strong locks
            missing = [
                p for p, _, _, _ in items
                if p not in self.targets and not _exists(conn, self.layout.target(p))
            ]  # fmt: skip
            if missing or not (self.ledger_ready or _exists(conn, self.ledger.jobs)):
                with conn.transaction():
                    create_ledger(conn, self.layout)
                    for pair in missing:
                        create_target_table(conn, self.layout, pair, params.windows)
            self.ledger_ready = True
            self.targets.update(p for p, _, _, _ in items)
            run_id = self.ledger.start_update_run(conn, params, _run_doc(params, plan))
            result.run_ids.append(run_id)
            status = "interrupted"
            try:
                for pair, _, since, last in items:
                    pu = by_pair[pair]
                    for month in _months(_month_of(since), last):
                        if stop is not None and stop.is_set():
                            return
                        self._write_month(conn, run_id, params, pair, month, since, pu)
                    pu.newest_bar, pu.newest_metric = newest(conn, params, pair, True)
                status = "done"
            except Exception:
                status = "failed"
                raise
            finally:
                try:
                    self.ledger.end_run(conn, run_id, status)
                except psycopg.Error:
                    self.unfinished.append(run_id)  # closed once the database is back

    def _write_month(
        self, conn: psycopg.Connection, run_id: int, params: Params, pair: str, month: Month,
        since: datetime, pu: PairUpdate,
    ) -> None:  # fmt: skip
        part = self.layout.target_partition(pair, month)
        if (pair, month) not in self.partitions and not _exists(conn, part):
            with conn.transaction():  # its own short transaction: it locks the parent table
                ensure_target_partition(conn, self.layout, pair, month)
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
                    counts = self._month_transaction(conn, run_id, params, pair, month, since)
        except _Busy:
            pu.busy.append(str(month))
            return
        except _Unchanged:
            return
        inserted, updated, deleted = counts
        pu.new_rows += inserted
        pu.changed_rows += updated
        pu.deleted_rows += deleted
        pu.months.append(str(month))

    def _month_transaction(
        self, conn: psycopg.Connection, run_id: int, params: Params, pair: str, month: Month,
        since: datetime,
    ) -> tuple[int, int, int]:  # fmt: skip
        started = time.time()
        lo = max(since, month.start)
        stage = _stage(conn, params, self.staged)
        with conn.transaction(), conn.cursor() as cur:
            # one snapshot for the bars read, the rows written and the counts recorded
            cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            status, worker, phash, created, stale = self.ledger.lock_month(
                cur, run_id, pair, month, params.hash
            )
            if status == "running" and not (stale or worker_is_dead(worker)):
                raise _Busy()
            if status == "done" and not created and phash != params.hash:
                raise BqxError(
                    f"{pair.upper()} {month} was computed with other parameters than the pair's"
                    f" latest run: run `bqx backfill --pairs {pair.upper()} --force`"
                )
            times, prices = read_from(cur, params, pair, lo, month.end)
            try:
                out_times, matrix = compute_from(params, lo, times, prices)
            except ValueError as exc:
                raise BqxError(
                    f"{pair.upper()} {month}: {bad_bar_message(pair, times, exc)}"
                ) from None
            inserted, updated, deleted = _upsert(cur, params, self.layout, pair, month, lo,
                                                 out_times, matrix, stage)  # fmt: skip
            if inserted + updated + deleted == 0 and not created:
                raise _Unchanged()
            # the month's source signature as a backfill's resume computes it, so that a later
            # backfill skips this month instead of redoing it
            jobs = _pair_jobs(conn, params, pair, month, month, "auto")
            bars, sig, ver = (
                (jobs[0].source_bars, jobs[0].source_sig, jobs[0].source_ver)
                if jobs else (0, None, None)
            )  # fmt: skip
            total = cur.execute(sql.SQL("SELECT count(*) FROM {}").format(
                self.layout.target_partition(pair, month))).fetchone()[0]  # fmt: skip
            self.ledger.record_month(
                cur, run_id, pair, month, done=created or status == "done", params=params,
                source_bars=bars, source_sig=sig, source_ver=ver, rows_total=int(total),
                rows_written=inserted + updated + deleted, started=started,
            )  # fmt: skip
        return inserted, updated, deleted


def parse_duration(text: str | float, option: str = "--recheck") -> float:
    """Seconds from ``90``, ``90s``, ``30m``, ``6h`` or ``1d``."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    raw = str(text).strip().lower()
    try:
        if raw and raw[-1] in units:
            value = float(raw[:-1]) * units[raw[-1]]
        else:
            value = float(raw)
    except ValueError:
        raise BqxError(f"invalid {option} {text!r}: expected seconds or e.g. 30m, 6h, 1d") from None
    if not 0 <= value <= 3650 * 86400:
        raise BqxError(f"invalid {option} {text!r}: must be between 0 and 3650 days")
    return value


def _show(value: object) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _first_bar(conn: psycopg.Connection, params: Params, pair: str) -> datetime | None:
    layout = params.layout
    return conn.execute(
        sql.SQL("SELECT min({t})::timestamptz FROM {src}").format(
            t=layout.time, src=layout.source(pair)
        )
    ).fetchone()[0]


def _run_doc(params: Params, plan: list[tuple[str, Month]]) -> dict[str, Any]:
    """The run's parameters, with the keys a backfill's run records (status, verify read them)."""
    return {
        "command": "update", "pairs": sorted({p for p, _ in plan}),
        "months": sorted({str(m) for _, m in plan}), "jobs": [[p, str(m)] for p, m in plan],
        "windows": list(params.windows), "mode": params.mode, "max_fill": params.max_fill,
        "schema": params.schema, "source_table": params.source_table,
        "time_column": params.time_column, "price_column": params.price_column,
        "workers": 1, "executor": "update",
    }  # fmt: skip


def _stage(conn: psycopg.Connection, params: Params, staged: set[str]) -> sql.Identifier:
    """A session temp table shaped like the target's written columns, emptied at commit.

    Created outside the month's transaction, so a rolled-back month does not take it along.
    """
    cols = ["rate", *params.columns]
    name = "bqx_stage_" + hashlib.sha256(",".join(cols).encode()).hexdigest()[:12]
    if name not in staged:
        defs = sql.SQL(", ").join(sql.SQL("{} float8").format(sql.Identifier(c)) for c in cols)
        conn.execute(
            sql.SQL(
                "CREATE TEMP TABLE IF NOT EXISTS {} (ts_utc timestamptz NOT NULL, {})"
                " ON COMMIT DELETE ROWS"
            ).format(sql.Identifier(name), defs)
        )
        staged.add(name)
    return sql.Identifier(name)


def _upsert(
    cur: psycopg.Cursor, params: Params, layout: Layout, pair: str, month: Month,
    lo: datetime, times: np.ndarray, matrix: np.ndarray, stage: sql.Identifier,
) -> tuple[int, int, int]:  # fmt: skip
    """COPY into staging, then upsert into the month's partition; unchanged rows are not
    rewritten (their ``created_at`` stays). Rows at or after ``lo`` whose bar is gone are
    deleted. Returns (inserted, updated, deleted)."""
    part = layout.target_partition(pair, month)
    cols = ["ts_utc", "rate", *params.columns]
    keep = (times >= np.datetime64(month.start.replace(tzinfo=None))) & (
        times < np.datetime64(month.end.replace(tzinfo=None))
    )
    copy_in(cur, stage, cols, times[keep], matrix[keep])
    idents = [sql.Identifier(c) for c in cols]
    values = idents[1:]
    cur.execute(
        sql.SQL(
            "WITH up AS (INSERT INTO {part} AS d ({cols}) SELECT {cols} FROM {stage}"
            " ON CONFLICT (ts_utc) DO UPDATE SET {sets}, created_at = now()"
            " WHERE ({dcols}) IS DISTINCT FROM ({ecols}) RETURNING d.xmax = 0 AS inserted)"
            " SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted)"
            " FROM up"
        ).format(
            part=part,
            cols=sql.SQL(", ").join(idents),
            stage=stage,
            sets=sql.SQL(", ").join(sql.SQL("{c} = EXCLUDED.{c}").format(c=c) for c in values),
            dcols=sql.SQL(", ").join(sql.SQL("d.{}").format(c) for c in values),
            ecols=sql.SQL(", ").join(sql.SQL("EXCLUDED.{}").format(c) for c in values),
        )  # fmt: skip
    )
    inserted, updated = cur.fetchone()
    deleted = cur.execute(
        sql.SQL(
            "DELETE FROM {part} d WHERE d.ts_utc >= %s"
            " AND NOT EXISTS (SELECT 1 FROM {stage} s WHERE s.ts_utc = d.ts_utc)"
        ).format(part=part, stage=stage),
        (lo,),
    ).rowcount
    return int(inserted), int(updated), int(deleted)


# -- entry points -------------------------------------------------------------------------


def update(
    settings: Settings,
    layout: Layout,
    *,
    pairs: Sequence[str] | None = None,
    recheck_s: float = DEFAULT_RECHECK_S,
    windows: Sequence[int] | None = None,
    mode: str | None = None,
    max_fill: int | None = None,
) -> UpdateResult:
    """``bqx update``: one pass; transient database errors are retried with backoff."""
    updater = Updater(
        resolve_url(settings), layout, pairs=pairs, recheck_s=recheck_s, windows=windows,
        mode=mode, max_fill=max_fill,
    )  # fmt: skip
    try:
        for attempt in tenacity.Retrying(
            retry=tenacity.retry_if_exception(_is_transient),
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


def freshness(
    conn: psycopg.Connection, layout: Layout, pairs: Iterable[str]
) -> dict[str, dict[str, Any]]:
    """Per pair: newest source bar, newest metric row and the lag between them (``bqx status``)."""
    ledger = UpdateLedger(layout)
    recorded = ledger.pair_params(conn, layout.schema)
    default = Params.build(layout, metrics.DEFAULT_WINDOWS, "bars", 5)
    out = {}
    for pair in pairs:
        doc = recorded.get(pair)
        params = default if doc is None else _params_from(doc, layout, default)
        if table_columns(conn, *params.layout.source_name(pair)) is None:
            continue
        bar, metric = newest(conn, params, pair)
        pu = PairUpdate(pair, newest_bar=bar, newest_metric=metric)
        d = pu.as_dict()
        out[pair] = {k: d[k] for k in ("newest_bar", "newest_metric", "lag_s")}
    return out


# -- follow -------------------------------------------------------------------------------


class _Metrics:
    """Prometheus metrics on http://127.0.0.1:PORT/metrics (prometheus_client)."""

    def __init__(self, port: int) -> None:
        prom = require("service", "prometheus_client", "--metrics-port (Prometheus metrics)")
        CollectorRegistry, Counter, Gauge = prom.CollectorRegistry, prom.Counter, prom.Gauge
        start_http_server = prom.start_http_server

        self.registry = CollectorRegistry()
        self.lag = Gauge("bqx_target_lag_seconds", "Newest source bar time minus newest metric"
                         " row time.", ["pair"], registry=self.registry)  # fmt: skip
        self.rows = Counter("bqx_rows_written", "Target rows written (inserted, changed or"
                            " deleted) by update.", ["pair"], registry=self.registry)  # fmt: skip
        self.errors = Counter("bqx_update_errors", "Polls that failed (then retried).",
                              registry=self.registry)  # fmt: skip
        self.last_poll = Gauge("bqx_last_poll_timestamp_seconds", "Unix time of the last"
                               " completed poll.", registry=self.registry)  # fmt: skip
        try:
            self.server, self.thread = start_http_server(
                port, addr="127.0.0.1", registry=self.registry
            )
        except OSError as exc:
            raise BqxError(f"--metrics-port {port}: cannot listen on 127.0.0.1: {exc}") from None

    def observe(self, result: UpdateResult) -> None:
        for p in result.pairs:
            if p.lag_s is not None:
                self.lag.labels(pair=p.pair).set(p.lag_s)
            self.rows.labels(pair=p.pair).inc(p.written)
        self.last_poll.set(time.time())

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def _describe(exc: BaseException | None) -> str:
    text = str(exc).strip().splitlines()[0] if exc is not None and str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}" if exc is not None else "error"


def _summary(result: UpdateResult) -> str:
    wrote = [p for p in result.pairs if p.written]
    lags = [p.lag_s for p in result.pairs if p.lag_s is not None]
    pairs = ", ".join(f"{p.pair.upper()} +{p.written}" for p in wrote[:8])
    more = f" and {len(wrote) - 8} more" if len(wrote) > 8 else ""
    busy = sum(len(p.busy) for p in result.pairs)
    tail = f" · {busy} months left to a running backfill" if busy else ""
    return (
        f"updated {len(wrote)} pairs ({pairs}{more}) · {result.rows} rows"
        f" · lag max {max(lags, default=0):.0f} s · {result.seconds:.2f} s{tail}"
    )


def follow(
    settings: Settings,
    layout: Layout,
    interval_s: float,
    *,
    pairs: Sequence[str] | None = None,
    recheck_s: float = DEFAULT_RECHECK_S,
    metrics_port: int | None = None,
    listen: bool = True,
    stop: threading.Event | None = None,
    on_poll: Callable[[UpdateResult], None] | None = None,
    windows: Sequence[int] | None = None,
    mode: str | None = None,
    max_fill: int | None = None,
) -> None:
    """``bqx update --follow``: update, then wait ``interval_s`` (or wake on a NOTIFY from
    bqx's own loads), until ``stop`` is set; a lost database is retried with backoff."""
    if not 0 < interval_s < 86400 * 365:
        raise BqxError(f"invalid --follow {interval_s:g}: must be > 0 seconds")
    if metrics_port is not None and not 0 < metrics_port < 65536:
        raise BqxError(f"invalid --metrics-port {metrics_port}: a TCP port is 1 to 65535")
    stop = stop or threading.Event()
    url = resolve_url(settings)
    updater = Updater(url, layout, pairs=pairs, recheck_s=recheck_s, windows=windows, mode=mode,
                      max_fill=max_fill)  # fmt: skip
    updater.connection()  # a configuration error fails here, at once
    warm_up()
    prom = _Metrics(metrics_port) if metrics_port is not None else None
    listener: psycopg.Connection | None = None
    quiet_since = 0.0
    woken: set[str] | None = None  # pairs a NOTIFY named; None: a full poll is due

    def note_error(rs: tenacity.RetryCallState) -> None:
        exc = rs.outcome.exception() if rs.outcome else None
        wait = rs.next_action.sleep if rs.next_action else 0
        log.warning("database error, retrying in %.1f s: %s", wait, _describe(exc))
        if prom is not None:
            prom.errors.inc()
        updater.close()

    def transient(exc: BaseException) -> bool:
        return _is_transient(exc) or (isinstance(exc, BqxError) and "cannot connect" in str(exc))

    try:
        next_full = 0.0
        while not stop.is_set():
            full = woken is None or time.monotonic() >= next_full
            try:
                for attempt in tenacity.Retrying(
                    retry=tenacity.retry_if_exception(transient),
                    wait=tenacity.wait_exponential(multiplier=0.5, max=15),
                    stop=tenacity.stop_when_event_set(stop),
                    sleep=stop.wait,
                    before_sleep=note_error,
                    reraise=True,
                ):
                    with attempt:
                        result = updater.poll(None if full else woken, stop)
                        if listen and (listener is None or listener.closed or listener.broken):
                            listener = _listen(url)
            except Exception as exc:
                if stop.is_set() and transient(exc):
                    break
                raise
            if full:
                next_full = time.monotonic() + interval_s
            if prom is not None:
                prom.observe(result)
            if on_poll is not None:
                on_poll(result)
            if result.rows:
                log.info("%s", _summary(result))
            elif full and time.monotonic() - quiet_since >= 60:
                quiet_since = time.monotonic()
                lags = [p.lag_s for p in result.pairs if p.lag_s is not None]
                log.info("nothing new (%d pairs, lag max %.0f s; next such line in a minute"
                         " at most)", len(result.pairs), max(lags, default=0))  # fmt: skip
            woken = _wait(listener, stop, next_full)
    finally:
        if listener is not None:
            with contextlib.suppress(Exception):
                listener.close()
        updater.close()
        if prom is not None:
            prom.close()


def warm_up() -> None:
    """Load the compiled kernels now, not when the first new bar is waiting for them."""
    times = np.datetime64("2024-07-01T00:00", "us") + np.arange(100) * np.timedelta64(1, "m")
    for mode in metrics.MODES:
        metrics.compute_matrix(times, np.linspace(1.0, 1.1, 100), mode=mode)


def _listen(url: str) -> psycopg.Connection:
    conn = connect(url, autocommit=True)
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(CHANNEL)))
    return conn


def _wait(
    listener: psycopg.Connection | None, stop: threading.Event, until: float
) -> set[str] | None:
    """Sleep until ``until`` (monotonic), a NOTIFY (returns its pairs) or ``stop``.

    Returns None when a full poll is due. Waits in short slices so a signal stops it soon.
    """
    while not stop.is_set():
        left = until - time.monotonic()
        if left <= 0:
            return None
        if listener is None or listener.closed or listener.broken:
            stop.wait(min(left, 0.5))
            continue
        pairs: set[str] = set()
        try:
            for n in listener.notifies(timeout=min(left, 0.5), stop_after=1):
                pairs.add(n.payload)
            if pairs:  # take the rest of a burst of commits along (20 ms)
                for n in listener.notifies(timeout=0.02):
                    pairs.add(n.payload)
        except psycopg.Error:
            with contextlib.suppress(Exception):
                listener.close()
            return None  # the poll finds the server gone and backs off
        valid = set()
        for p in pairs:
            with contextlib.suppress(BqxError):
                valid.add(validate_pair(p))
        if valid:
            return valid
    return None


def stop_on_signals() -> threading.Event:
    """An event set by SIGTERM or SIGINT (Ctrl-C): the loop ends after its current transaction."""
    stop = threading.Event()

    def handler(signum: int, _frame: object) -> None:
        log.info("%s received: stopping after the current transaction",
                 signal.Signals(signum).name)  # fmt: skip
        stop.set()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
    return stop


__all__ = [
    "CHANNEL", "DEFAULT_RECHECK_S", "PairUpdate", "UpdateLedger", "UpdateResult", "Updater",
    "follow", "freshness", "newest", "parse_duration", "stop_on_signals", "update",
]  # fmt: skip
