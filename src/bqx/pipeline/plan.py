"""Plan and preflight: which (pair, month) jobs exist, which a run must do, and every check it
needs before anything is written.

The resume rule lives here (``decide``): a job is skipped only when it is done with the same
parameters, from the same source bars (its lookback included), and its month is still there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.params import SOURCE_CHECKS, BackfillPlan, Job, Params, PlannedJob
from bqx.core.symbols import validate_pair
from bqx.db.connect import pool
from bqx.destinations import Destination
from bqx.errors import BqxError, InvalidOption, NothingToDo
from bqx.store import catalog, ddl, names
from bqx.store.ledger import Ledger, LedgerRow
from bqx.store.versions import source_jobs

PLAN_LOCK_TIMEOUT_S = 10.0  # planning waits this long for a lock, then says who holds it

SKIP_REASON = "done, unchanged"
RUNNING_ELSEWHERE = "running elsewhere"
# parameters whose change is refused without --force (a new formula version just recomputes)
_REFUSED_CHANGES = ("windows", "mode", "max_fill", "source", "time_column", "price_column")


def default_destination(params: Params) -> Destination:
    """The database's own monthly partitions, in the parameters' schema."""
    from bqx.destinations.postgres import PostgresPartitions

    return PostgresPartitions(params.layout)


# -- the resume rule ----------------------------------------------------------------------


def _same_source(job: Job, sig: str | None, ver: str | None) -> bool:
    """The exact signature decides when the plan computed one; else the version signature."""
    if job.source_sig is not None:
        return sig == job.source_sig
    return job.source_ver is not None and ver == job.source_ver


def decide(
    job: Job, row: LedgerRow | None, param_hash: str, partition: str = "ok", force: bool = False
) -> tuple[bool, str]:
    """(to do?, why) for a planned job given its ledger row and its target month's state."""
    if row is None:
        return True, "new"
    status, h, sig, ver, stale = row
    if status == "running" and not stale:
        return True, RUNNING_ELSEWHERE
    if force:
        return True, "forced"
    if status == "failed":
        return True, "failed before"
    if status != "done":
        return True, "not finished before"
    if h != param_hash:
        return True, "parameters changed"
    if not _same_source(job, sig, ver):
        return True, "source changed"
    if partition != "ok":
        return True, f"partition {partition}"
    return False, SKIP_REASON


# -- parameters recorded per target -------------------------------------------------------


def _differences(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    return [k for k in _REFUSED_CHANGES if old.get(k) is not None and old.get(k) != new[k]]


def _show(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def changed_params(
    conn: psycopg.Connection, params: Params, pairs: Sequence[str], force: bool
) -> set[str]:
    """Pairs whose stored results were computed with other parameters.

    Without ``force`` the first such pair stops the run with one line naming the difference;
    with ``force`` those pairs are recomputed in full (every month, not just the range).
    """
    layout = params.layout
    changed: dict[str, tuple[dict[str, Any], dict[str, Any], list[str]]] = {}
    for pair, old in Ledger(layout).recorded_params(conn, pairs).items():
        if not catalog.has_target(conn, layout, pair):
            continue  # the table was dropped: no stored results to protect
        new = params.target_doc(pair)
        diff = _differences(old, new)
        if diff:
            changed[pair] = (old, new, diff)
    if changed and not force:
        pair, (old, new, diff) = next(iter(changed.items()))
        more = f" (and {len(changed) - 1} more pair(s))" if len(changed) > 1 else ""
        was = ", ".join(f"{k}={_show(old[k])}" for k in diff)
        now = ", ".join(f"{k}={_show(new[k])}" for k in diff)
        raise BqxError(
            f"{layout.schema}.{layout.target_name(pair)} holds results computed with {was}, not"
            f" {now} as asked{more}: add --force to recompute every month of {pair.upper()} with"
            " the new parameters, or use another --schema (docs/guarantees.md)"
        )
    return set(changed)


# -- jobs ---------------------------------------------------------------------------------


def _locked_message(
    conn: psycopg.Connection, layout: Layout, pair: str, seconds: float, detail: str
) -> str:
    schema, table = layout.source_name(pair)
    pids = catalog.lock_holders(conn, names.source(layout, pair))
    who = f"pid {', '.join(map(str, pids))}" if pids else detail
    return (
        f"source table {schema}.{table} is locked by another session ({who}); waited "
        f"{seconds:g}s (try again when it is released, or end that session)"
    )


def plan_jobs(
    conn: psycopg.Connection, params: Params, pairs: Sequence[str], start: Month | None,
    end: Month | None, url: str | None, source_check: str = "auto",
    lock_timeout: float = PLAN_LOCK_TIMEOUT_S,
) -> list[Job]:  # fmt: skip
    """Every (pair, month) with bars; the per-pair scans run two at a time when a URL is given.

    Every scan waits at most ``lock_timeout`` for a lock, and Ctrl-C cancels the queries in
    flight instead of waiting for them.
    """

    def scan(c: psycopg.Connection, pair: str) -> list[Job]:
        try:
            with catalog.lock_timeout(c, lock_timeout):
                return source_jobs(c, params, pair, start, end, source_check)
        except pgerrors.LockNotAvailable as exc:
            raise BqxError(
                _locked_message(c, params.layout, pair, lock_timeout, str(exc).strip())
            ) from None

    if url is None or len(pairs) < 2:
        return [job for pair in pairs for job in scan(conn, pair)]
    busy: set[psycopg.Connection] = set()
    with pool(url, 2) as conns:

        def pooled(pair: str) -> list[Job]:
            with conns.connection() as c:
                busy.add(c)
                try:
                    return scan(c, pair)
                finally:
                    busy.discard(c)

        with ThreadPoolExecutor(max_workers=2) as threads:
            futures = [threads.submit(pooled, pair) for pair in pairs]
            try:
                return [job for f in futures for job in f.result()]
            except BaseException:  # Ctrl-C or a failed scan: stop the others now
                for f in futures:
                    f.cancel()
                for c in list(busy):
                    with contextlib.suppress(Exception):
                        c.cancel_safe()
                raise


def _nothing_message(pairs: Sequence[str], start: Month | None, end: Month | None) -> str:
    shown = ", ".join(p.upper() for p in pairs[:5]) + (" …" if len(pairs) > 5 else "")
    span = (
        f" from {start} to {end}" if start and end
        else f" from {start} on" if start
        else f" up to {end}" if end
        else ""
    )  # fmt: skip
    return f"nothing to do: no source bars for {shown}{span}; no run was recorded"


def resolve_pairs(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str] | None
) -> list[str]:
    """The pairs asked for, validated; by default every pair with a source table."""
    if pairs is None:
        pairs = catalog.source_pairs(conn, layout)
        if not pairs:
            raise BqxError(
                f"no source tables matching {layout.source_table!r} in schema "
                f"{layout.source_schema()!r}: load bars with `bqx generate` or "
                "`bqx ingest`, or give --pairs/--source-table"
            )
    return [validate_pair(p) for p in pairs]


def check_range(start: Month | None, end: Month | None) -> None:
    if start is not None and end is not None and end < start:
        raise InvalidOption("end", str(end), f"is before start {start}")


def check_source_check(source_check: str) -> None:
    if source_check not in SOURCE_CHECKS:
        raise InvalidOption(
            "source_check", source_check, f"expected one of {', '.join(SOURCE_CHECKS)}"
        )


def checked_plan(
    conn: psycopg.Connection, params: Params, dest: Destination, pairs: Sequence[str] | None,
    start: Month | None, end: Month | None, url: str | None, force: bool, source_check: str,
    lock_timeout: float,
) -> tuple[list[str], list[Job]]:  # fmt: skip
    """Read-only: every check, then the jobs. Raises ``NothingToDo`` when no (pair, month)
    has source bars in the range."""
    check_source_check(source_check)
    check_range(start, end)
    pairs = resolve_pairs(conn, params.layout, pairs)
    for pair in pairs:
        catalog.check_source(conn, params.layout, pair)
        dest.check(conn, params, pair)
    changed = changed_params(conn, params, pairs, force)
    same = [p for p in pairs if p not in changed]
    jobs = plan_jobs(conn, params, same, start, end, url, source_check, lock_timeout)
    # new parameters for a pair (with --force): every month of it, so the table is consistent
    jobs += plan_jobs(conn, params, sorted(changed), None, None, url, source_check, lock_timeout)
    if not jobs:
        raise NothingToDo(_nothing_message(pairs, start, end))
    return pairs, jobs


def preflight(
    conn: psycopg.Connection, params: Params, pairs: Sequence[str] | None, start: Month | None,
    end: Month | None, url: str | None = None, *, dest: Destination | None = None,
    force: bool = False, source_check: str = "auto", lock_timeout: float = PLAN_LOCK_TIMEOUT_S,
) -> list[Job]:  # fmt: skip
    """Check everything a run needs, then create the ledger and what the jobs write into.

    Every check happens before anything is written, so a configuration error leaves the
    database untouched and stops the run in its first second.
    """
    layout = params.layout
    dest = dest or default_destination(params)
    _, jobs = checked_plan(conn, params, dest, pairs, start, end, url, force, source_check,
                           lock_timeout)  # fmt: skip
    try:
        with catalog.lock_timeout(conn, lock_timeout):
            with conn.transaction():
                Ledger(layout).create(conn)
            dest.prepare(conn, params, jobs)  # a transaction per pair: see its docstring
    except pgerrors.LockNotAvailable as exc:
        raise BqxError(
            f"a ledger or target table in schema {layout.schema} is locked by another session;"
            f" waited {lock_timeout:g}s ({str(exc).strip().splitlines()[0]})"
        ) from None
    return jobs


def plan_backfill(
    conn: psycopg.Connection, params: Params, pairs: Sequence[str] | None = None,
    start: Month | None = None, end: Month | None = None, *, dest: Destination | None = None,
    force: bool = False, source_check: str = "auto", lock_timeout: float = PLAN_LOCK_TIMEOUT_S,
) -> BackfillPlan:  # fmt: skip
    """The plan a backfill would follow, job by job with its reason; writes nothing at all
    (no run row, no table, no partition)."""
    dest = dest or default_destination(params)
    with catalog.lock_timeout(conn, lock_timeout):
        pairs, jobs = checked_plan(conn, params, dest, pairs, start, end, None, force,
                                   source_check, lock_timeout)  # fmt: skip
        rows = Ledger(params.layout).read_jobs(conn, pairs)
        parts = dest.month_states(conn, params, [(j.pair, j.month) for j in jobs])
    planned = []
    for job in jobs:
        key = (job.pair, job.month)
        do, reason = decide(job, rows.get(key), params.hash, parts[key], force)
        planned.append(PlannedJob(job.pair, job.month, "do" if do else "skip", reason,
                                  job.source_bars))  # fmt: skip
    doc = {"windows": list(params.windows), "mode": params.mode, "max_fill": params.max_fill,
           "source_table": params.source_table, "schema": params.schema}  # fmt: skip
    return BackfillPlan(planned, doc, source_check)


def mark_jobs(
    conn: psycopg.Connection, ledger: Ledger, dest: Destination, run_id: int, params: Params,
    jobs: Sequence[Job], force: bool,
) -> tuple[list[Job], list[Job], dict[tuple[str, Month], str]]:  # fmt: skip
    """Mark the jobs to do as pending in the ledger; return (to do, skipped, why per job).

    Target months are probed only for jobs the ledger would skip, and outside the ledger's
    transaction (each probe's lock is released at once).
    """
    before = ledger.read_jobs(conn, sorted({j.pair for j in jobs}))
    maybe_skip = [
        (j.pair, j.month) for j in jobs
        if not force and decide(j, before.get((j.pair, j.month)), params.hash)[1] == SKIP_REASON
    ]  # fmt: skip
    parts = dest.month_states(conn, params, maybe_skip)
    return ledger.plan(
        conn, run_id, params, jobs,
        lambda job, row: decide(job, row, params.hash, parts.get((job.pair, job.month), "ok"),
                                force),
    )  # fmt: skip


def init_tables(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str], months: Sequence[Month],
    params: Params,
) -> int:  # fmt: skip
    """Schema, ledger, source and target tables with their partitions; idempotent. Returns the
    number of (pair, month) partitions ensured."""
    pairs = [validate_pair(p) for p in pairs]
    for pair in pairs:
        catalog.check_target_columns(conn, layout, pair, params.windows)
    with conn.transaction():
        Ledger(layout).create(conn)
    for pair in pairs:  # a transaction per pair: the locks of new tables are held to the commit
        with conn.transaction():
            ddl.lock_key(conn, f"bqx init {layout.schema}.{layout.target_name(pair)} ddl")
            ddl.create_source_table(conn, layout, pair)
            ddl.create_target_table(conn, layout, pair, params.windows)
            for month in months:
                ddl.ensure_source_partition(conn, layout, pair, month)
                ddl.ensure_target_partition(conn, layout, pair, month)
    return len(pairs) * len(months)
