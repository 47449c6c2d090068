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
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import tenacity

from bqx import metrics
from bqx.core.layout import Layout
from bqx.core.months import Month, month_range
from bqx.core.params import Params
from bqx.core.symbols import validate_pair
from bqx.db.connect import connect, is_transient
from bqx.destinations.postgres import PostgresPartitions
from bqx.errors import BqxError, InvalidOption
from bqx.pipeline.job import Busy, Unchanged, upsert_month
from bqx.store import bars, catalog, targets
from bqx.store.ledger import Ledger

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
            "months": self.months, "busy": self.busy,
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
        lines.append(f"{self.rows:,} rows written for {len(self.pairs)} pairs in"
                     f" {self.seconds:.2f}s · lag max {self.lag_max_s:.0f} s")  # fmt: skip
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
            f" · lag max {self.lag_max_s:.0f} s · {self.seconds:.2f} s{tail}"
        )


# -- planning -----------------------------------------------------------------------------


@dataclass
class _Todo:
    pair: str
    params: Params
    since: datetime
    last: Month


def _month_of(t: datetime) -> Month:
    return Month.of(t.astimezone(UTC))


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
        self.conn: psycopg.Connection | None = None
        self.checked: set[tuple[str, str]] = set()  # (pair, params hash) already checked
        self.unfinished: list[int] = []  # runs the connection was lost in, to close when back
        self.targets: set[str] = set()  # pairs whose target table exists
        self.partitions: set[tuple[str, Month]] = set()  # target partitions known to exist
        self.ledger_ready = False  # the ledger tables exist

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

    def _pair_params(self, conn: psycopg.Connection, only: Iterable[str] | None) -> dict:
        recorded = self.ledger.pair_params(conn)
        out: dict[str, Params] = {}
        for pair in self._pairs(conn, only, recorded):
            doc = recorded.get(pair)
            params = self.default if doc is None else Params.recorded(doc, self.layout,
                                                                      self.default)  # fmt: skip
            self._check_explicit(pair, params)
            if (pair, params.hash) not in self.checked:
                catalog.check_source(conn, params.layout, pair)
                catalog.check_target_columns(conn, params.layout, pair, params.windows)
                self.checked.add((pair, params.hash))
            out[pair] = params
        return out

    def _check_explicit(self, pair: str, params: Params) -> None:
        for key, want in self.explicit.items():
            have = getattr(params, key)
            if have != want:
                raise BqxError(
                    f"{pair.upper()} was computed with {key.replace('_', '-')} "
                    f"{_show(have)}, not {_show(want)}: run `bqx backfill --pairs "
                    f"{pair.upper()} --force` with the new value (docs/update.md)"
                )

    def _newest(self, conn: psycopg.Connection, params: Params, pair: str) -> tuple[Any, Any]:
        if pair not in self.targets and catalog.has_target(conn, self.layout, pair):
            self.targets.add(pair)  # a target, once there, stays: no catalog look-up
        bar = bars.bar_bounds(conn, params.layout, pair)[1]
        metric = targets.newest(conn, self.layout, pair) if pair in self.targets else None
        return bar, metric

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
        todo: list[_Todo] = []
        for pair, params in self._pair_params(conn, only).items():
            bar, metric = self._newest(conn, params, pair)
            result.pairs.append(PairUpdate(pair, newest_bar=bar, newest_metric=metric))
            if bar is None and metric is None:
                continue
            if metric is None:
                since = bars.bar_bounds(conn, params.layout, pair)[0]
            else:
                since = targets.first_difference(conn, params, pair, metric - self.recheck)
            if since is not None:
                last = max(t for t in (bar, metric) if t is not None)
                todo.append(_Todo(pair, params, since, _month_of(last)))
        if todo:
            self._write(conn, todo, result, stop)
        result.seconds = time.monotonic() - started
        return result

    # writing
    def _ensure_ledger(self, conn: psycopg.Connection) -> None:
        # DDL only when something is missing: even IF NOT EXISTS forms take strong locks
        if not (self.ledger_ready or self.ledger.has_jobs_table(conn)):
            with conn.transaction():
                self.ledger.create(conn)
        self.ledger_ready = True

    def _write(
        self, conn: psycopg.Connection, todo: list[_Todo], result: UpdateResult,
        stop: threading.Event | None,
    ) -> None:  # fmt: skip
        by_pair = {p.pair: p for p in result.pairs}
        groups: dict[str, list[_Todo]] = {}
        for item in todo:
            groups.setdefault(item.params.hash, []).append(item)
        self._ensure_ledger(conn)
        for items in groups.values():
            params = items[0].params
            plan = [(t.pair, m) for t in items for m in month_range(_month_of(t.since), t.last)]
            run_id = self.ledger.start_run(conn, "update", params, _run_doc(params, plan), 1,
                                           "update", len(plan))  # fmt: skip
            result.run_ids.append(run_id)
            status = "interrupted"
            try:
                for t in items:
                    pu = by_pair[t.pair]
                    for month in month_range(_month_of(t.since), t.last):
                        if stop is not None and stop.is_set():
                            return
                        self._write_month(conn, run_id, params, t.pair, month, t.since, pu)
                    pu.newest_bar, pu.newest_metric = self._newest(conn, params, t.pair)
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
        if (pair, month) not in self.partitions:
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
                    counts = upsert_month(conn, self.ledger, self.dest, params, run_id, pair,
                                          month, since)  # fmt: skip
        except Busy:
            pu.busy.append(str(month))
            return
        except Unchanged:
            return
        pu.new_rows += counts.inserted
        pu.changed_rows += counts.updated
        pu.deleted_rows += counts.deleted
        pu.months.append(str(month))


def _run_doc(params: Params, plan: list[tuple[str, Month]]) -> dict[str, Any]:
    """The run's parameters, with the keys a backfill's run records (status, verify read them)."""
    return {
        "command": "update", **params.describe(), "pairs": sorted({p for p, _ in plan}),
        "months": sorted({str(m) for _, m in plan}), "jobs": [[p, str(m)] for p, m in plan],
        "workers": 1, "executor": "update",
    }  # fmt: skip


def update_once(updater: Updater) -> UpdateResult:
    """One pass; transient database errors are retried with backoff."""
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
