"""Plan and preflight: which (pair, month) jobs exist, which a run must do, and every check it
needs before anything is written.

The resume rule lives here (``decide``): a job is skipped only when it is done with the same
parameters, from the same source bars (its lookback included), and its month is still there.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from bqx.core.layout import Layout
from bqx.core.months import Month, in_range
from bqx.core.params import SOURCE_CHECKS, BackfillPlan, Job, Params, PlannedJob
from bqx.core.symbols import validate_pair
from bqx.db.connect import DatabaseLike, pool
from bqx.destinations import Destination
from bqx.errors import BqxError, InvalidOption, NothingToDo
from bqx.sources.parquet import lake_bars
from bqx.store import catalog, ddl, names
from bqx.store.ledger import Ledger, LedgerRow
from bqx.store.versions import check_exactly, source_jobs, versioned_jobs

PLAN_LOCK_TIMEOUT_S = 10.0  # planning waits this long for a lock, then says who holds it

SKIP_REASON = "done, unchanged"
RUNNING_ELSEWHERE = "running elsewhere"
# parameters whose change is refused without --force (a new formula version just recomputes)
_REFUSED_CHANGES = (
    "windows", "mode", "max_fill", "source", "time_column", "price_column", "sink",
)  # fmt: skip


def empty_month_job(conn: psycopg.Connection, params: Params, pair: str, month: Month) -> Job:
    """The job of a month without bars: its exact signature is its lookback's alone."""
    lake = lake_bars(params)
    if lake is not None:
        return lake.empty_job(params, pair, month)
    return check_exactly(conn, params, Job(pair, month, 0, None))


def default_destination(params: Params) -> Destination:
    """The parameters' sink: a Delta table (``params.sink``), else the database's own monthly
    partitions in the parameters' schema."""
    if params.sink:
        from bqx.destinations.delta import DeltaLake

        return DeltaLake(params.sink)
    from bqx.destinations.postgres import PostgresPartitions

    return PostgresPartitions(params.layout)


def resolve_sink(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str] | None, sink: str | None,
    param: str = "sink",
) -> str | None:  # fmt: skip
    """The sink a run writes: ``sink`` when given (as a normalised URI), else the one the
    pairs' metrics are recorded in (the ledger's parameters per target), so it need not be
    repeated; None, the database's partitions, when none is recorded. Pairs recorded in
    different places are refused: one run writes one place. ``param="source"``: the same for
    a lake of bars (``bars``)."""
    from bqx.core.uris import LakeURI

    if sink is not None:
        return LakeURI.parse(sink, param).uri
    ledger = Ledger(layout)
    if not ledger.exists(conn):
        return None
    known = [validate_pair(p) for p in pairs] if pairs else sorted(ledger.pair_params(conn))
    where = {p: _recorded_lake(doc, param) for p, doc in
             ledger.recorded_params(conn, known).items()}  # fmt: skip
    here = "the database"
    places = sorted({str(v) for v in where.values() if v}) + (
        [here] if any(not v for v in where.values()) else []
    )
    if len(places) > 1:
        shown = "; ".join(
            f"{', '.join(p.upper() for p in sorted(where) if (where[p] or here) == w)} in {w}"
            for w in places
        )  # fmt: skip
        what = "metrics" if param == "sink" else "bars"
        raise InvalidOption(
            param, None, f"the pairs' {what} are in different places ({shown}): name it, or"
            " run the pairs apart", shown="(as recorded)",
        )  # fmt: skip
    return next((v for v in where.values() if v), None)


def _recorded_lake(doc: dict[str, Any], param: str) -> str | None:
    """The lake location a target's recorded parameters name: its sink, or its source when
    that is a lake (an absolute path or a URI, never a table's ``schema.table``)."""
    if param == "sink":
        return doc.get("sink") or None
    source = str(doc.get("source") or "")
    return source if source.startswith("/") or "://" in source else None


# -- the resume rule ----------------------------------------------------------------------

CHECK_BARS = "check bar by bar"  # counters moved without a version: decided by an exact hash


@dataclass(frozen=True)
class MonthState:
    """A target month as the destination holds it: 'ok' (rows), 'missing' or 'empty', and
    the version its triggers gave it (None: unknown)."""

    state: str = "ok"
    version: int | None = None


OK = MonthState()


def _source_reason(job: Job, row: LedgerRow) -> str | None:
    """Why the job's source differs from what its done job read; None when it does not."""
    if job.source_sig is not None:  # the exact signature decides when the plan computed one
        return None if row.source_sig == job.source_sig else "source changed"
    if job.source_ver is None or row.source_ver != job.source_ver:
        return "source changed"
    if row.source_stats is not None and job.source_stats not in (None, row.source_stats):
        return CHECK_BARS  # written past the triggers, or statistics reset: hash it
    return None


def target_reason(job: Job, row: LedgerRow, target: MonthState) -> str | None:
    """Why the month's stored metrics differ from what its done job wrote; None if not."""
    if target.state == "missing" and job.source_bars:
        return "partition missing"
    if target.state == "empty" and job.source_bars:
        return "partition empty"
    if target.state == "ok" and not job.source_bars:
        return "metrics without bars"
    if None not in (row.target_ver, target.version) and row.target_ver != target.version:
        return "metrics written by another writer"
    return None


def decide(
    job: Job, row: LedgerRow | None, param_hash: str, target: MonthState = OK,
    force: bool = False,
) -> tuple[bool, str]:  # fmt: skip
    """(to do?, why) for a planned job given its ledger row and its target month.

    A done job is skipped only when its parameters, the bars it reads (its lookback
    included) and its stored metrics are all as it left them (docs/guarantees.md).
    """
    if row is None:
        return True, "new"
    if row.status == "running" and not row.stale:
        return True, RUNNING_ELSEWHERE
    if force:
        return True, "forced"
    if row.status == "failed":
        return True, "failed before"
    if row.status != "done":
        return True, "not finished before"
    if row.param_hash != param_hash:
        return True, "parameters changed"
    why = _source_reason(job, row) or target_reason(job, row, target)
    return (True, why) if why else (False, SKIP_REASON)


@dataclass
class Decision:
    """A job, as the plan will hand it on (with its exact signature when one was needed), and
    whether and why it is done."""

    job: Job
    do: bool
    reason: str
    target: MonthState = OK


def _decided_by_target(
    jobs: Sequence[Job], rows: dict[tuple[str, Month], LedgerRow], params: Params
) -> list[tuple[str, Month]]:
    """The jobs whose decision rests on their stored metrics: done with these parameters,
    from the same bars (or bars still to hash). Only their target months are probed."""
    out = []
    for j in jobs:
        row = rows.get((j.pair, j.month))
        if row is not None and row.status == "done" and row.param_hash == params.hash and \
                _source_reason(j, row) in (None, CHECK_BARS):  # fmt: skip
            out.append((j.pair, j.month))
    return out


def resolve(
    conn: psycopg.Connection, params: Params, dest: Destination, jobs: Sequence[Job],
    rows: dict[tuple[str, Month], LedgerRow], force: bool,
) -> tuple[list[Decision], list[tuple[str, Month, str | None, int | None]]]:  # fmt: skip
    """Decide every job; a month whose counters moved without a new version is hashed bar by
    bar first. Also returns what to record of the done jobs found unchanged (their current
    counters and metric version), so later resumes compare with them."""
    keys = [(j.pair, j.month) for j in jobs]
    versions = dest.month_versions(conn, params, sorted({j.pair for j in jobs}))
    states = dest.month_states(
        conn, params, [] if force else _decided_by_target(jobs, rows, params)
    )
    out, seen = [], []
    for job, key in zip(jobs, keys, strict=True):
        row, target = rows.get(key), MonthState(states.get(key, "ok"), versions.get(key))
        do, why = decide(job, row, params.hash, target, force)
        if why == CHECK_BARS:
            job = check_exactly(conn, params, job)
            do, why = decide(job, row, params.hash, target, force)
        if (
            not do
            and row is not None
            and (
                row.source_stats != job.source_stats
                or (row.target_ver is None and target.version is not None)
            )
        ):
            seen.append((job.pair, job.month, job.source_stats, target.version))
        out.append(Decision(job, do, why, target))
    return out, seen


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
    end: Month | None, url: DatabaseLike | None, source_check: str = "auto",
    lock_timeout: float = PLAN_LOCK_TIMEOUT_S,
) -> list[Job]:  # fmt: skip
    """Every (pair, month) with bars; the per-pair scans run two at a time when a URL is given.

    Every scan waits at most ``lock_timeout`` for a lock, and Ctrl-C cancels the queries in
    flight instead of waiting for them.
    """

    lake = lake_bars(params)
    if lake is not None:  # a Parquet dataset or Delta table: its files, no database
        return [j for pair in pairs for j in lake.jobs(params, pair, start, end, source_check)]

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


@dataclass
class Plan:
    """The checked plan of a run: its pairs, its jobs, and their ledger rows."""

    pairs: list[str]
    jobs: list[Job]
    rows: dict[tuple[str, Month], LedgerRow]


def with_orphans(
    conn: psycopg.Connection, params: Params, jobs: list[Job],
    rows: dict[tuple[str, Month], LedgerRow], ranges: dict[str, tuple[Month | None, Month | None]],
) -> list[Job]:  # fmt: skip
    """The jobs, and a job for every month the ledger holds that has no bar left (emptied by
    TRUNCATE or DELETE, its partition dropped): its stored metrics must go. A month without
    bars that was never computed is no job."""
    planned = {(j.pair, j.month) for j in jobs}
    kept = [j for j in jobs if j.source_bars or (j.pair, j.month) in rows]
    for (pair, month), _row in sorted(rows.items()):
        if pair in ranges and (pair, month) not in planned and in_range(month, *ranges[pair]):
            kept.append(empty_month_job(conn, params, pair, month))
    return sorted(kept, key=lambda j: (j.pair, j.month))


def checked_plan(
    conn: psycopg.Connection, params: Params, dest: Destination, pairs: Sequence[str] | None,
    start: Month | None, end: Month | None, url: DatabaseLike | None, force: bool,
    source_check: str, lock_timeout: float,
) -> Plan:  # fmt: skip
    """Read-only: every check, then the jobs. Raises ``NothingToDo`` when no (pair, month)
    has source bars (or stored metrics without bars) in the range."""
    check_source_check(source_check)
    check_range(start, end)
    lake = lake_bars(params)
    if lake is not None:  # bars from a Parquet dataset or Delta table
        pairs = lake.resolve_pairs(pairs)
    else:
        pairs = resolve_pairs(conn, params.layout, pairs)
    for pair in pairs:
        lake.check(pair) if lake is not None else catalog.check_source(conn, params.layout, pair)
        dest.check(conn, params, pair)
    changed = changed_params(conn, params, pairs, force)
    same = [p for p in pairs if p not in changed]
    jobs = plan_jobs(conn, params, same, start, end, url, source_check, lock_timeout)
    # new parameters for a pair (with --force): every month of it, so the table is consistent
    jobs += plan_jobs(conn, params, sorted(changed), None, None, url, source_check, lock_timeout)
    rows = Ledger(params.layout).read_jobs(conn, pairs)
    ranges = {p: (None, None) if p in changed else (start, end) for p in pairs}
    jobs = with_orphans(conn, params, jobs, rows, ranges)
    if not jobs:
        raise NothingToDo(_nothing_message(pairs, start, end))
    return Plan(pairs, jobs, rows)


def preflight(
    conn: psycopg.Connection, params: Params, pairs: Sequence[str] | None, start: Month | None,
    end: Month | None, url: DatabaseLike | None = None, *, dest: Destination | None = None,
    force: bool = False, source_check: str = "auto", lock_timeout: float = PLAN_LOCK_TIMEOUT_S,
) -> list[Job]:  # fmt: skip
    """Check everything a run needs, then create the ledger and what the jobs write into.

    Every check happens before anything is written, so a configuration error leaves the
    database untouched and stops the run in its first second.
    """
    layout = params.layout
    dest = dest or default_destination(params)
    plan = checked_plan(conn, params, dest, pairs, start, end, url, force, source_check,
                        lock_timeout)  # fmt: skip
    try:
        with catalog.lock_timeout(conn, lock_timeout):
            with conn.transaction():
                Ledger(layout).create(conn)
            dest.prepare(conn, params, plan.jobs)  # a transaction per pair: see its docstring
    except pgerrors.LockNotAvailable as exc:
        raise BqxError(
            f"a ledger or target table in schema {layout.schema} is locked by another session;"
            f" waited {lock_timeout:g}s ({str(exc).strip().splitlines()[0]})"
        ) from None
    return plan.jobs


def plan_backfill(
    conn: psycopg.Connection, params: Params, pairs: Sequence[str] | None = None,
    start: Month | None = None, end: Month | None = None, *, dest: Destination | None = None,
    force: bool = False, source_check: str = "auto", lock_timeout: float = PLAN_LOCK_TIMEOUT_S,
) -> BackfillPlan:  # fmt: skip
    """The plan a backfill would follow, job by job with its reason; writes nothing at all
    (no run row, no table, no partition)."""
    dest = dest or default_destination(params)
    with catalog.lock_timeout(conn, lock_timeout):
        plan = checked_plan(conn, params, dest, pairs, start, end, None, force, source_check,
                            lock_timeout)  # fmt: skip
        decisions, _seen = resolve(conn, params, dest, plan.jobs, plan.rows, force)
    planned = [
        PlannedJob(d.job.pair, d.job.month, "do" if d.do else "skip", d.reason,
                   d.job.source_bars)
        for d in decisions
    ]  # fmt: skip
    doc = {"windows": list(params.windows), "mode": params.mode, "max_fill": params.max_fill,
           "source_table": params.source_table, "schema": params.schema,
           **params.lake_doc()}  # fmt: skip
    return BackfillPlan(planned, doc, source_check)


def mark_jobs(
    conn: psycopg.Connection, ledger: Ledger, dest: Destination, run_id: int, params: Params,
    jobs: Sequence[Job], force: bool,
) -> tuple[list[Job], list[Job], dict[tuple[str, Month], str]]:  # fmt: skip
    """Mark the jobs to do as pending in the ledger; return (to do, skipped, why per job).

    Decided first outside the ledger's transaction (target months are probed, and months whose
    counters moved are hashed, with each probe's lock released at once); then again inside it
    on the locked rows, in case another run moved on meanwhile.
    """
    before = ledger.read_jobs(conn, sorted({j.pair for j in jobs}))
    decisions, seen = resolve(conn, params, dest, jobs, before, force)
    resolved = {(d.job.pair, d.job.month): d for d in decisions}

    def again(job: Job, row: LedgerRow | None) -> tuple[bool, str]:
        d = resolved[(job.pair, job.month)]
        do, why = decide(d.job, row, params.hash, d.target, force)
        return (True, why) if why == CHECK_BARS else (do, why)

    result = ledger.plan(conn, run_id, params, [d.job for d in decisions], again)
    ledger.observe(conn, seen)
    return result


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


def outstanding(
    conn: psycopg.Connection, params: Params, dest: Destination, pair: str
) -> list[Decision] | None:
    """Read-only and cheap: the pair's months a plain backfill would do now, with the reason,
    from the source's versions (no bar is read in full: a month whose counters moved without a
    version counts as to do, ``check bar by bar``). None when the source is not versioned by
    bqx, so only hashing every bar could tell."""
    lake = lake_bars(params)
    if lake is not None:  # a lake's files say what changed
        jobs = lake.jobs(params, pair, None, None, "auto")
    else:
        found = versioned_jobs(conn, params, pair)
        if found is None:
            return None
        jobs = found
    rows = Ledger(params.layout).read_jobs(conn, [pair])
    jobs = with_orphans(conn, params, jobs, rows, {pair: (None, None)})
    versions = dest.month_versions(conn, params, [pair])
    states = dest.month_states(conn, params, [(j.pair, j.month) for j in jobs])
    out = []
    for job in jobs:
        key = (job.pair, job.month)
        target = MonthState(states.get(key, "ok"), versions.get(key))
        do, why = decide(job, rows.get(key), params.hash, target)
        if do or why == CHECK_BARS:
            out.append(Decision(job, True, why, target))
    return out
