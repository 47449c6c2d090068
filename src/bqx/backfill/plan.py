"""Plan and preflight: what a run's output depends on, which (pair, month) jobs exist, and
every check a run needs before anything is written."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from bqx import metrics
from bqx.db import pool
from bqx.errors import BqxError
from bqx.schema import (
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

FORMULA_VERSION = 1  # bump when metric definitions change, so resume recomputes
MODES = ("bars", "clock")

_TIME_TYPES = ("timestamp with time zone", "timestamp without time zone")
_NUMERIC_PREFIXES = ("double precision", "real", "numeric", "integer", "bigint", "smallint")


# -- parameters and plan ------------------------------------------------------------------


@dataclass(frozen=True)
class Params:
    """What a job's output depends on (besides its source bars); hashed into the ledger."""

    windows: tuple[int, ...] = metrics.DEFAULT_WINDOWS
    mode: str = "bars"
    max_fill: int = 5
    schema: str = "bqx"
    source_table: str = "m1_{pair}"
    time_column: str = "time"
    price_column: str = "close"

    @classmethod
    def build(cls, layout: Layout, windows: Sequence[int], mode: str, max_fill: int) -> Params:
        try:
            wins = metrics.normalize_windows(windows)
        except ValueError as exc:
            raise BqxError(f"invalid --windows: {exc}") from None
        if mode not in MODES:
            raise BqxError(f"invalid --mode {mode!r}: expected one of {', '.join(MODES)}")
        if max_fill < 0:
            raise BqxError(f"invalid --max-fill {max_fill}: must be ≥ 0 minutes")
        return cls(
            windows=wins, mode=mode, max_fill=int(max_fill), schema=layout.schema,
            source_table=layout.source_table, time_column=layout.time_column,
            price_column=layout.price_column,
        )  # fmt: skip

    @property
    def layout(self) -> Layout:
        return Layout(self.schema, self.source_table, self.time_column, self.price_column)

    @property
    def columns(self) -> list[str]:
        return metrics.metric_columns(self.windows)

    @property
    def hash(self) -> str:
        doc = {**asdict(self), "formula_version": FORMULA_VERSION}
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Job:
    pair: str
    month: Month
    source_bars: int
    source_sig: str


@dataclass
class RunSummary:
    run_id: int
    jobs_total: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_skipped: int = 0
    rows_written: int = 0
    duration_s: float = 0.0
    status: str = "running"
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # pair, month, error

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.duration_s if self.duration_s > 0 else 0.0


def _check_source(conn: psycopg.Connection, layout: Layout, pair: str) -> None:
    schema, table = layout.source_name(pair)
    cols = table_columns(conn, schema, table)
    if cols is None:
        raise BqxError(
            f"source table {schema}.{table} does not exist for pair {pair.upper()} "
            "(load bars with `bqx generate` or `bqx ingest`, or set --source-table)"
        )
    for col, ok, kind in (
        (layout.time_column, lambda t: t in _TIME_TYPES, "a timestamp"),
        (layout.price_column, lambda t: t.startswith(_NUMERIC_PREFIXES), "numeric"),
    ):
        if col not in cols:
            raise BqxError(f"source table {schema}.{table} has no column {col!r}")
        if not ok(cols[col]):
            raise BqxError(f"column {col!r} of {schema}.{table} is {cols[col]}, not {kind}")


def _source_months(
    conn: psycopg.Connection, layout: Layout, pair: str, start: Month | None, end: Month | None
) -> list[Job]:
    """Per month with bars: exact count and a signature that changes when the bars change."""
    cond = []
    args: list[Any] = []
    if start is not None:
        cond.append(sql.SQL("{} >= %s").format(layout.time))
        args.append(start.start)
    if end is not None:
        cond.append(sql.SQL("{} < %s").format(layout.time))
        args.append(end.end)
    where = sql.SQL(" WHERE ") + sql.SQL(" AND ").join(cond) if cond else sql.SQL("")
    # an integer sum of per-bar hashes (binding each price to its time) is exact and
    # order-independent, so the signature is deterministic and changes when any bar does
    q = sql.SQL(
        "SELECT date_trunc('month', {t})::date, count(*), min({t})::text, max({t})::text,"
        " sum(hashfloat8(date_part('epoch', {t})) # hashfloat8({p}::float8))::text"
        " FROM {src}{where} GROUP BY 1 ORDER BY 1"
    ).format(t=layout.time, p=layout.price, src=layout.source(pair), where=where)
    jobs = []
    for first_day, count, lo, hi, total in conn.execute(q, args):
        sig = hashlib.sha256(f"{count}|{lo}|{hi}|{total}".encode()).hexdigest()[:16]
        jobs.append(Job(pair, Month.of(first_day), int(count), sig))
    return jobs


def _plan_jobs(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str], start: Month | None,
    end: Month | None, url: str | None,
) -> list[Job]:  # fmt: skip
    """Every (pair, month) with bars; the per-pair scans run two at a time when a URL is given."""
    if url is None or len(pairs) < 2:
        return [job for pair in pairs for job in _source_months(conn, layout, pair, start, end)]
    with pool(url, 2) as conns:

        def scan(pair: str) -> list[Job]:
            with conns.connection() as conn:
                return _source_months(conn, layout, pair, start, end)

        with ThreadPoolExecutor(max_workers=2) as threads:
            return [job for jobs in threads.map(scan, pairs) for job in jobs]


def preflight(
    conn: psycopg.Connection,
    params: Params,
    pairs: Sequence[str] | None,
    start: Month | None,
    end: Month | None,
    url: str | None = None,
) -> list[Job]:
    """Check everything a run needs, then create targets, partitions and the ledger.

    Every check happens before anything is written, so a configuration error leaves the
    database untouched and stops the run in its first second.
    """
    layout = params.layout
    if start is not None and end is not None and end < start:
        raise BqxError(f"--end {end} is before --start {start}")
    if pairs is None:
        pairs = source_pairs(conn, layout)
        if not pairs:
            raise BqxError(
                f"no source tables matching {layout.source_table!r} in schema "
                f"{layout.source_name('xxxxxx')[0]!r}: load bars with `bqx generate` or "
                "`bqx ingest`, or give --pairs/--source-table"
            )
    pairs = [validate_pair(p) for p in pairs]
    for pair in pairs:
        _check_source(conn, layout, pair)
        check_target_columns(conn, layout, pair, params.windows)
    jobs = _plan_jobs(conn, layout, pairs, start, end, url)
    with conn.transaction():
        create_ledger(conn, layout)
        for pair in pairs:
            create_target_table(conn, layout, pair, params.windows)
        for job in jobs:
            ensure_target_partition(conn, layout, job.pair, job.month)
    return jobs


def init(
    conn: psycopg.Connection,
    layout: Layout,
    pairs: Sequence[str],
    months: Sequence[Month],
    windows: Sequence[int] = metrics.DEFAULT_WINDOWS,
) -> int:
    """``bqx init``: schema, ledger, source and target tables with their partitions. Idempotent.

    Returns the number of (pair, month) partitions ensured.
    """
    from bqx.schema import create_source_table, ensure_source_partition

    pairs = [validate_pair(p) for p in pairs]
    for pair in pairs:
        check_target_columns(conn, layout, pair, windows)
    with conn.transaction():
        create_ledger(conn, layout)
        for pair in pairs:
            create_source_table(conn, layout, pair)
            create_target_table(conn, layout, pair, windows)
            for month in months:
                ensure_source_partition(conn, layout, pair, month)
                ensure_target_partition(conn, layout, pair, month)
    return len(pairs) * len(months)
