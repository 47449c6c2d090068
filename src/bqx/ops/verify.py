"""``bqx verify``: every stored value recomputed and compared bit for bit, month by month,
plus the structure (partitions, keys), the ledger, and a plain-formula check of the kernel
itself (docs/guarantees.md).

Incremental: each month's verification is recorded in the ledger with what it saw of the
month (its parameters, the versions and write counters of its bars and of its metrics), and a
plain ``verify`` checks again only the months whose state moved since they last passed;
``full`` checks every month.

The sample check deliberately does not use ``bqx.metrics``: it re-reads each sampled row's
history from the source with a plain query and evaluates the formulas with plain Python loops
and a two-pass variance, so a bug in the production kernel cannot hide itself.
"""

from __future__ import annotations

import bisect
import math
import random
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.params import Params
from bqx.core.text import plural
from bqx.db.connect import DatabaseLike, pool
from bqx.destinations import Destination
from bqx.errors import BqxError
from bqx.ops.recompute import Fault, MonthVerdict, check_month, fault
from bqx.pipeline.plan import default_destination
from bqx.sources.parquet import lake_bars
from bqx.store import bars, catalog, checks, versions
from bqx.store.ledger import STALE_AFTER_S, Ledger, MonthSeen, RunRecord, Verified, worker_is_dead

__all__ = ["Check", "Fault", "Verification", "verify"]

DIMENSIONLESS = ("return", "endpoint", "range", "volatility")
MAX_LISTED = 8  # faults named in a detail before "… and N more"
CHECKS = ("partitions", "keys", "values", "recompute_sample", "ledger")

# what a caller sees while the checks run: step(check name, done, total, item)
StepFn = Callable[..., None]


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    failures: list[Fault] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # figures as numbers, for scripts


@dataclass
class Verification:
    """The checks' verdicts: ``bqx verify --json``."""

    ok: bool
    run_id: int | None
    checks: list[Check] = field(default_factory=list)
    scope: str = "ledger"  # "ledger": every job the ledger holds; "run": one run's plan
    jobs: int = 0
    nothing_to_check: str | None = None  # why, when the scope holds no job
    full: bool = False  # every month checked, not only those changed since verified
    months_checked: int = 0
    months_unchanged: int = 0  # verified before, and unchanged since
    repair: str | None = None  # the command that recomputes the months found wrong
    note: str | None = None  # e.g. why the verifications could not be recorded

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "run_id": self.run_id, "scope": self.scope, "jobs": self.jobs,
            "nothing_to_check": self.nothing_to_check, "full": self.full,
            "months_checked": self.months_checked, "months_unchanged": self.months_unchanged,
            "repair": self.repair, "note": self.note,
            "checks": [asdict(c) for c in self.checks],
        }  # fmt: skip

    def lines(self) -> list[tuple[bool, str]]:
        """(passed?, ``PASS name: detail``) per check."""
        return [(c.ok, f"{'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}") for c in self.checks]

    def summary(self) -> str:
        """How much was read: ``checked 12 months; 1,668 verified before and unchanged``."""
        text = f"checked {plural(self.months_checked, 'month')}"
        if self.full:
            return text + " (--full)"
        return text + f"; {self.months_unchanged:,} verified before and unchanged since"


def _listing(faults: list[Fault]) -> str:
    more = f" … and {len(faults) - MAX_LISTED} more" if len(faults) > MAX_LISTED else ""
    return "; ".join(f.problem for f in faults[:MAX_LISTED]) + more


def _check(
    name: str, faults: list[Fault], ok_detail: str, counts: dict[str, int] | None = None
) -> Check:
    detail = ok_detail if not faults else _listing(faults)
    return Check(name, not faults, detail, faults, counts or {})


# -- the independent reference ------------------------------------------------------------------


def _window_values(window: list[float | None] | None, p_t: float, w: int) -> dict:
    if window is None or any(x is None for x in window):
        return dict.fromkeys(("return", "max", "min", "avg", "stdev", "endpoint"))
    prices = [float(x) for x in window if x is not None]
    mean = sum(prices) / w
    var = sum((x - mean) ** 2 for x in prices) / (w - 1)
    return {
        "return": sum((x - p_t) / p_t for x in prices),
        "max": max(prices), "min": min(prices), "avg": mean,
        "stdev": math.sqrt(var), "endpoint": (prices[0] - p_t) / p_t,
    }  # fmt: skip


def plain_metrics(window_prices: list[float | None], p_t: float, windows: list[int]) -> dict:
    """Formulas (docs/metrics.md) from the prices before t, most recent LAST; None = no price."""
    out: dict[str, float | None] = {}
    for w in windows:
        window = window_prices[-w:] if len(window_prices) >= w else None
        for k, v in _window_values(window, p_t, w).items():
            out[f"w{w}_bqx_{k}"] = v
    big = f"w{max(windows)}_bqx_"
    for k in ("return", "max", "min", "avg", "stdev"):
        out[f"agg_bqx_{k}"] = out[big + k]
    mx, mn, sd = out[big + "max"], out[big + "min"], out[big + "stdev"]
    out["agg_bqx_range"] = None if mx is None or mn is None else (mx - mn) / p_t
    out["agg_bqx_volatility"] = None if sd is None else sd / p_t
    return out


def _minute(t: datetime) -> int:
    if t.tzinfo is not None:
        t = t.replace(tzinfo=None) - (t.utcoffset() or timedelta(0))
    return int((t - datetime(1970, 1, 1)).total_seconds() // 60)


def _histories(
    conn: psycopg.Connection, layout: Layout, pair: str, times: list[datetime], params: dict,
    series: _Series | None = None,
) -> dict[datetime, tuple[float, list[float | None]]]:  # fmt: skip
    """For each of ``times``: p_t and the window prices before t (oldest first), read straight
    from the source by a plain query (one per pair), or from ``series`` (a lake source's bars
    read plainly from its files)."""
    wmax = max(params["windows"])
    if params.get("mode", "bars") == "bars":
        if series is not None:
            found = {t: series.up_to(t, wmax + 1) for t in times}
        else:
            found = checks.histories_by_count(conn, layout, pair, times, wmax + 1)
        return {t: (prices[-1], list(prices[:-1])) for t, prices in found.items() if prices}
    max_fill = int(params.get("max_fill", 5))
    if series is not None:
        spans = {t: series.between(t - timedelta(minutes=wmax + max_fill), t) for t in times}
        first = series.first()
    else:
        spans = checks.histories_by_span(conn, layout, pair, times, wmax + max_fill)
        first = bars.bar_bounds(conn, layout, pair)[0]
    out = {}
    for t, rows in spans.items():
        by_minute = {_minute(when): p for when, p in rows}
        now = _minute(t)
        if now not in by_minute:
            continue
        first_minute = _minute(first) if first is not None else now
        window: list[float | None] = []
        for m in range(now - wmax, now):
            price = None
            if m >= first_minute:
                for age in range(max_fill + 1):
                    if m - age in by_minute:
                        price = by_minute[m - age]
                        break
            window.append(price)
        out[t] = (by_minute[now], window)
    return out


@dataclass
class _Series:
    """A pair's bars from a lake source, read once, answered in plain Python."""

    times: list[datetime]
    prices: list[float]

    @classmethod
    def read(cls, lake: Any, pair: str) -> _Series:
        times, prices = lake.read(pair)
        return cls([_aware(t) for t in times.tolist()], [float(p) for p in prices])

    def up_to(self, t: datetime, count: int) -> list[float]:
        end = bisect.bisect_right(self.times, t)
        return self.prices[max(0, end - count) : end]

    def between(self, lo: datetime, hi: datetime) -> list[tuple[datetime, float]]:
        a, b = bisect.bisect_left(self.times, lo), bisect.bisect_right(self.times, hi)
        return list(zip(self.times[a:b], self.prices[a:b], strict=True))

    def first(self) -> datetime | None:
        return self.times[0] if self.times else None


def _aware(t: datetime) -> datetime:
    return t.replace(tzinfo=UTC)


def _close(got: float | None, want: float | None, col: str, p_t: float) -> bool:
    if got is None or want is None:
        return got is None and want is None
    scale = 1.0 if col.endswith(DIMENSIONLESS) else p_t
    return abs(got - want) <= 1e-9 * abs(want) + 1e-12 * scale


# -- what is checked ----------------------------------------------------------------------------


@dataclass
class _Scope:
    """What is checked: the months, and per pair the parameters of its latest run."""

    run_id: int
    jobs: list[tuple[str, date]]  # the ledger's jobs in scope
    params: dict[str, Params]
    months: list[tuple[str, Month]] = field(default_factory=list)  # jobs + stored months

    @property
    def pairs(self) -> list[str]:
        return sorted(self.params)


def _scope(
    conn: psycopg.Connection, layout: Layout, run: RunRecord, whole_ledger: bool,
    partitions: dict[str, tuple[datetime, datetime]],
) -> _Scope:  # fmt: skip
    """The latest run's plan plus (by default) every job the ledger holds, and every month
    of those pairs that holds stored metrics.

    Checking only the latest run's plan would let a `--pairs X --force` redo hide faults in
    every other pair, so verification covers the database state the ledger describes.
    """
    ledger = Ledger(layout)
    jobs = set(run.planned)
    pair_run: dict[str, int] = {}
    if whole_ledger:
        known = ledger.job_runs(conn)
        # a pair without any job left was dropped (`bqx drop`): its planned jobs went with it
        kept = {p for p, _, _ in known}
        jobs = {j for j in jobs if j[0] in kept}
        for pair, month, rid in known:
            jobs.add((pair, month))
            if rid is not None:
                pair_run[pair] = max(pair_run.get(pair, 0), int(rid))
    runs: dict[int, dict[str, Any]] = {run.run_id: run.params}
    default = Params.build(layout, Params().windows, "bars", 5)
    params: dict[str, Params] = {}
    for pair in sorted({p for p, _ in jobs}):
        rid = pair_run.get(pair, run.run_id)
        if rid not in runs:
            other = ledger.latest_run(conn, rid)
            runs[rid] = other.params if other else run.params
        params[pair] = Params.recorded(runs[rid], layout, default)
    months = {(p, Month.of(d)) for p, d in jobs}
    if whole_ledger:  # stored months the ledger does not know (rows written by others)
        for pair in params:
            prefix = layout.target_name(pair) + "_"
            for name in partitions:
                if name.startswith(prefix):
                    try:
                        months.add((pair, Month.parse(name[len(prefix) :])))
                    except BqxError:
                        continue
    return _Scope(run.run_id, sorted(jobs), params, sorted(months))


@dataclass
class _Context:
    conn: psycopg.Connection
    layout: Layout  # the targets' schema
    scope: _Scope
    step: StepFn
    partitions: dict[str, tuple[datetime, datetime]]
    rows: dict[tuple[str, Month], int] = field(default_factory=dict)  # stored rows per month
    # pairs whose metrics are not the database's partitions (a Delta sink): their store
    lakes: dict[str, Destination] = field(default_factory=dict)

    def dest(self, pair: str, default: Destination) -> Destination:
        return self.lakes.get(pair, default)


# -- the checks ---------------------------------------------------------------------------------


def check_partitions(ctx: _Context) -> Check:
    """1. Every planned partition exists, attached with its month's bounds."""
    ctx.step("partitions", 0, len(CHECKS))
    faults = []
    in_lake = _lake_states(ctx)
    for pair, first_day in ctx.scope.jobs:
        month = Month.of(first_day)
        name = ctx.layout.target_partition_name(pair, month)
        bound = ctx.partitions.get(name)
        if pair in ctx.lakes:  # a Delta sink: the month's files, listed and present
            if in_lake.get((pair, month)) == "missing":
                faults.append(fault(
                    f"{pair.upper()} {month}: no files for it in {ctx.lakes[pair]}", pair, month,
                    expected="files", got=None))  # fmt: skip
        elif bound is None:
            faults.append(fault(
                f"{pair.upper()} {month}: partition {ctx.layout.schema}.{name} is missing",
                pair, month, expected=name, got=None))  # fmt: skip
        elif bound != (month.start, month.end):
            faults.append(fault(
                f"{pair.upper()} {month}: partition {name} covers {bound[0]}..{bound[1]}",
                pair, month, column="ts_utc", expected=[month.start, month.end],
                got=list(bound)))  # fmt: skip
    n = len(ctx.scope.jobs)
    return _check("partitions", faults, f"{plural(n, 'partition')} present",
                  {"partitions": n, "missing": len(faults)})  # fmt: skip


def _lake_states(ctx: _Context) -> dict[tuple[str, Month], str]:
    out: dict[tuple[str, Month], str] = {}
    for pair, lake in ctx.lakes.items():
        keys = [(p, Month.of(d)) for p, d in ctx.scope.jobs if p == pair]
        out.update(lake.month_states(ctx.conn, ctx.scope.params[pair], keys))
    return out


def check_keys(ctx: _Context) -> Check:
    """2. Every target table and partition has its primary key."""
    ctx.step("keys", 1, len(CHECKS))
    conn, layout, faults = ctx.conn, ctx.layout, []
    keyed = catalog.tables_with_primary_key(conn, layout.schema)  # one query, not one a month
    for pair in ctx.scope.pairs:
        name = layout.target_name(pair)
        if pair in ctx.lakes:  # no key in a Delta table: a time stored twice fails "values"
            continue
        if catalog.has_target(conn, layout, pair) and name not in keyed:
            faults.append(fault(f"{pair.upper()}: {name} has no primary key", pair,
                                column="ts_utc", expected="primary key", got=None))  # fmt: skip
    for pair, first_day in ctx.scope.jobs:
        month = Month.of(first_day)
        name = layout.target_partition_name(pair, month)
        if name in ctx.partitions and name not in keyed:
            faults.append(
                fault(f"{pair.upper()} {month}: {name} has no primary key", pair, month,
                      column="ts_utc", expected="primary key", got=None)
            )  # fmt: skip
    return _check("keys", faults, "primary keys present")


def _seen(
    conn: psycopg.Connection, params: Params, dest: Destination, pair: str, has_source: bool
) -> dict[Month, MonthSeen]:
    """What each month of the pair looks like now, from versions and counters alone (a few
    queries per pair; a source bqx does not version is hashed bar by bar)."""
    sources: dict[Month, tuple[str | None, str | None]] = {}
    lake = lake_bars(params)
    if has_source:
        jobs = (
            lake.jobs(params, pair, None, None, "auto") if lake is not None
            else versions.source_jobs(conn, params, pair, None, None, "auto")
        )  # fmt: skip
        for job in jobs:
            sources[job.month] = (job.source_ver or job.source_sig, job.source_stats)
    tver = dest.month_versions(conn, params, [pair])
    stamps = dest.month_stamps(conn, params, [pair])
    months = {m for m in sources} | {m for _, m in tver} | {m for _, m in stamps}
    return {
        m: MonthSeen(params.hash, *sources.get(m, ("no bars", None)), tver.get((pair, m)),
                     stamps.get((pair, m)))
        for m in months
    }  # fmt: skip


def _unchanged(seen: MonthSeen | None, last: Verified | None) -> bool:
    return seen is not None and seen.known and last is not None and last.ok and last.seen == seen


@dataclass
class _Work:
    """The months to check now, with what each looked like before it was read."""

    todo: list[tuple[str, Month, MonthSeen]]
    unchanged: dict[tuple[str, Month], Verified]
    sources: dict[str, bool]  # per pair: whether its source table is there


def _plan_values(ctx: _Context, dest: Destination, full: bool) -> _Work:
    conn, scope = ctx.conn, ctx.scope
    last = Ledger(ctx.layout).verified(conn, scope.pairs)
    work = _Work([], {}, {})
    by_pair: dict[str, list[Month]] = {}
    for pair, month in scope.months:
        by_pair.setdefault(pair, []).append(month)
    for pair, months in by_pair.items():
        params = scope.params[pair]
        lake = lake_bars(params)
        work.sources[pair] = (
            pair in lake.listing() if lake is not None
            else catalog.has_source(conn, params.layout, pair)
        )  # fmt: skip
        seen = _seen(conn, params, ctx.dest(pair, dest), pair, work.sources[pair])
        for month in months:
            now = seen.get(month) or MonthSeen(params.hash, "no bars", None, None, None)
            if not full and _unchanged(seen.get(month), last.get((pair, month))):
                work.unchanged[(pair, month)] = last[(pair, month)]
            else:
                work.todo.append((pair, month, now))
    return work


def _run_months(
    ctx: _Context, dest: Destination, work: _Work, url: DatabaseLike | None, workers: int,
    sample: int, seed: int,
) -> list[MonthVerdict]:  # fmt: skip
    """Check the months, ``workers`` at a time on their own connections (one when no URL)."""
    todo, total = work.todo, len(work.todo)
    done = 0

    def one(conn: psycopg.Connection, i: int) -> MonthVerdict:
        pair, month, _ = todo[i]
        rng = random.Random(f"{seed}:{pair}:{month}")
        return check_month(conn, ctx.scope.params[pair], ctx.dest(pair, dest), pair, month,
                           has_source=work.sources[pair], sample=sample, rng=rng)  # fmt: skip

    def tick(v: MonthVerdict) -> MonthVerdict:
        nonlocal done
        done += 1
        ctx.step("values", done, total, f"{v.pair.upper()} {v.month}")
        return v

    if url is None or workers <= 1 or total < 2:
        return [tick(one(ctx.conn, i)) for i in range(total)]
    with pool(url, workers) as conns, ThreadPoolExecutor(max_workers=workers) as threads:

        def pooled(i: int) -> MonthVerdict:
            with conns.connection() as c:
                return one(c, i)

        return [tick(v) for v in threads.map(pooled, range(total))]


def _repair(faulty: Sequence[MonthVerdict]) -> str | None:
    """The one command that recomputes every month found wrong (and nothing far from them)."""
    if not faulty:
        return None
    pairs = sorted({v.pair.upper() for v in faulty})
    lo, hi = min(v.month for v in faulty), max(v.month for v in faulty)
    return f"bqx backfill --pairs {','.join(pairs)} --start {lo} --end {hi} --force"


def _record(
    ctx: _Context, work: _Work, verdicts: list[MonthVerdict]
) -> str | None:  # fmt: skip
    """Record each checked month's verdict with what it saw; why not, when it cannot be."""
    seen = {(p, m): s for p, m, s in work.todo}
    ledger = Ledger(ctx.layout)
    rows = [
        (v.pair, v.month, v.ok, seen[(v.pair, v.month)], v.rows, v.bars,
         [f.problem for f in v.faults[:MAX_LISTED]])
        for v in verdicts
    ]  # fmt: skip
    try:
        ledger.create(ctx.conn)
        ledger.record_verifications(ctx.conn, rows)
    except (pgerrors.InsufficientPrivilege, pgerrors.ReadOnlySqlTransaction) as exc:
        return (
            f"verifications not recorded ({str(exc).strip().splitlines()[0]}): the next"
            " verify checks every month again"
        )
    return None


def check_values(
    ctx: _Context, dest: Destination, work: _Work, url: DatabaseLike | None, workers: int,
    sample: int, seed: int,
) -> tuple[Check, list[MonthVerdict]]:  # fmt: skip
    """3. Every stored value of every month checked is its recompute from the bars, bit for
    bit; no row is missing, none lacks its bar, none lies outside its month."""
    ctx.step("values", 0, len(work.todo))
    verdicts = _run_months(ctx, dest, work, url, workers, sample, seed)
    faults = [f for v in verdicts for f in v.faults]
    for v in verdicts:
        ctx.rows[(v.pair, v.month)] = v.rows
    for key, last in work.unchanged.items():
        ctx.rows[key] = int(last.rows or 0)
    rows = sum(v.rows for v in verdicts)
    values = rows * (1 + max((len(ctx.scope.params[v.pair].columns) for v in verdicts),
                             default=0))  # fmt: skip
    detail = (
        f"{plural(rows, 'row')} of {plural(len(verdicts), 'month')} equal their recompute"
        f" from the bars, bit for bit ({values:,} values)"
    )
    counts = {"months": len(verdicts), "rows": rows, "faulty_months": sum(not v.ok for v in
              verdicts), "unchanged_months": len(work.unchanged)}  # fmt: skip
    return _check("values", faults, detail, counts), verdicts


def _sample_rows(ctx: _Context, pair: str, times: list[datetime]) -> tuple[list[Fault], int]:
    """Recompute a pair's sampled rows from the source by the plain path; (faults, rows)."""
    params = ctx.scope.params[pair]
    layout, windows = params.layout, list(params.windows)
    doc = {"windows": windows, "mode": params.mode, "max_fill": params.max_fill}
    cols = params.columns
    if pair in ctx.lakes:
        rows = ctx.lakes[pair].rows_at(pair, cols, times) if times else []  # type: ignore[attr-defined]
    else:
        rows = checks.rows_at(ctx.conn, layout, pair, cols, times) if times else []
    lake = lake_bars(params)
    series = _Series.read(lake, pair) if lake is not None and rows else None
    # faults grouped per month and column: "EURUSD 2024-07: w60_bqx_avg wrong on 12 of 53
    # sampled rows (first 2024-07-03 04:17: 1.0733694 vs recomputed 1.0733587)"
    seen: dict[Month, int] = {}
    wrong: dict[tuple[Month, str], list[tuple[str, Any, Any]]] = {}
    history = _histories(ctx.conn, layout, pair, [r[0] for r in rows], doc, series)
    for row in rows:
        t, rate = row[0], row[1]
        if t not in history:  # its bar is gone: the values check names that row
            continue
        p_t, window = history[t]
        want = plain_metrics(window, p_t, windows)
        month = Month.of(t)
        seen[month] = seen.get(month, 0) + 1
        at = f"{t:%Y-%m-%d %H:%M}"
        if rate != p_t:
            wrong.setdefault((month, "rate"), []).append((at, p_t, rate))
        for col, got in zip(cols, row[2:], strict=True):
            if not _close(got, want[col], col, p_t):
                wrong.setdefault((month, col), []).append((at, want[col], got))
    faults = []
    for (month, col), examples in sorted(wrong.items()):
        at, want_, got_ = examples[0]
        source = "source" if col == "rate" else "recomputed"
        faults.append(fault(
            f"{pair.upper()} {month}: {col} wrong on {len(examples)} of {seen[month]} sampled"
            f" rows (first {at}: {got_} vs {source} {want_})",
            pair, month, column=col, expected=want_, got=got_, at=at, count=len(examples),
        ))  # fmt: skip
    return faults, len(rows)


def check_sample(ctx: _Context, verdicts: list[MonthVerdict], sample: int, seed: int) -> Check:
    """4. The kernel itself: a random sample of the rows just checked (and each checked
    month's first row, whose window reaches into the month before) recomputed from the source
    by a plain path agrees within the tolerances of docs/metrics.md."""
    faults: list[Fault] = []
    checked = edges = 0
    rng = random.Random(seed)
    by_pair: dict[str, list[MonthVerdict]] = {}
    for v in verdicts:
        by_pair.setdefault(v.pair, []).append(v)
    for i, (pair, months) in enumerate(sorted(by_pair.items())):
        ctx.step("recompute_sample", i, len(by_pair), pair.upper())
        drawn = [t for v in months for t in v.picks]
        firsts = {v.first for v in months if v.first is not None}
        picked = sorted(rng.sample(drawn, min(sample, len(drawn))))
        f, n = _sample_rows(ctx, pair, sorted(set(picked) | firsts))
        faults += f
        checked += n
        edges += len(firsts)
    detail = (
        f"{plural(checked, 'sampled row')} ({edges} of them first bars of a month) agree"
        " within the tolerances of docs/metrics.md"
        if verdicts else "no month to sample: none checked"
    )  # fmt: skip
    return _check("recompute_sample", faults, detail,
                  {"sampled_rows": checked, "month_first_bars": edges})  # fmt: skip


def _ledger_fault(record: Any, rows: int | None, label: str) -> str | None:
    """What is wrong with a job's ledger row, or None."""
    if record.status == "running":
        hb = record.heartbeat_age_s
        age = "no heartbeat" if hb is None else f"heartbeat {hb:.0f} s old"
        if hb is None or hb > STALE_AFTER_S or worker_is_dead(record.worker):
            return f"{label}: job left running by {record.worker} ({age}; worker is gone)"
        return f"{label}: job running on {record.worker} ({age}): a backfill is active"
    if record.status == "failed":
        error = (record.last_error or "").strip().removeprefix(f"{label}:").strip()
        return f"{label}: job failed: {error[:160]}"
    if record.status != "done":
        return f"{label}: job is {record.status}"
    if rows is not None and record.rows_written != rows:
        return f"{label}: ledger says {record.rows_written} rows, table has {rows}"
    return None


def check_ledger(ctx: _Context) -> Check:
    """5. The ledger agrees with the tables: rows recorded = rows present, no job left
    running."""
    ctx.step("ledger", len(CHECKS) - 1, len(CHECKS))
    records = {(r.pair, r.month): r for r in Ledger(ctx.layout).job_records(ctx.conn)}
    faults = []
    for key in ctx.scope.jobs:
        record = records.get(key)
        label = f"{key[0].upper()} {Month.of(key[1])}"
        where: dict[str, Any] = {"pair": key[0], "month": Month.of(key[1])}
        rows = ctx.rows.get((key[0], Month.of(key[1])))
        if record is None:
            faults.append(fault(f"{label}: job is missing", **where, column="status",
                                expected="done", got="missing"))  # fmt: skip
            continue
        problem = _ledger_fault(record, rows, label)
        if problem is None:
            continue
        if record.status == "done":
            faults.append(fault(problem, **where, column="rows_written", expected=rows,
                                got=record.rows_written))  # fmt: skip
        else:
            faults.append(fault(problem, **where, column="status", expected="done",
                                got=record.status))  # fmt: skip
    n = len(ctx.scope.jobs)
    return _check("ledger", faults, f"{plural(n, 'job')} done, rows match",
                  {"jobs": n, "not_matching": len(faults)})  # fmt: skip


def verify(
    conn: psycopg.Connection, layout: Layout, *, sample: int = 50, seed: int = 0,
    run_id: int | None = None, progress: StepFn | None = None, full: bool = False,
    url: DatabaseLike | None = None, workers: int = 1, dest: Destination | None = None,
) -> Verification:  # fmt: skip
    """Run every check (docs/guarantees.md).

    By default over every job in the ledger (and every stored month of its pairs); with
    ``run_id`` over that run's plan only. Months verified before and unchanged since are not
    read again unless ``full``. With ``url``, the months are checked ``workers`` at a time on
    connections of their own. A scope without any job is not a success: ``ok`` is False and
    ``nothing_to_check`` says why. ``progress(check, done, total, item)`` is called as the
    checks go.
    """
    run = Ledger(layout).latest_run(conn, run_id)
    if run is None:
        raise BqxError(no_run_message(conn, layout, run_id))
    partitions = catalog.attached_partitions(conn, layout)
    scope = _scope(conn, layout, run, run_id is None, partitions)
    result = Verification(True, run.run_id, scope="ledger" if run_id is None else "run",
                          jobs=len(scope.jobs), full=full)  # fmt: skip
    if not scope.jobs:
        result.ok = False
        result.nothing_to_check = (
            f"run {run.run_id} planned no job (no source bars in its pairs and months)"
        )
        return result
    ctx = _Context(conn, layout, scope, progress or (lambda *a, **k: None), partitions)
    ctx.lakes = {p: default_destination(q) for p, q in scope.params.items() if q.sink}
    # the database's partitions for the pairs not in a Delta sink
    dest = dest or default_destination(replace(next(iter(scope.params.values())), sink=None))
    work = _plan_values(ctx, dest, full)
    result.checks = [check_partitions(ctx), check_keys(ctx)]
    values, verdicts = check_values(ctx, dest, work, url, workers, sample, seed)
    result.checks += [values, check_sample(ctx, verdicts, sample, seed), check_ledger(ctx)]
    ctx.step("done", len(CHECKS), len(CHECKS))
    result.months_checked, result.months_unchanged = len(verdicts), len(work.unchanged)
    result.repair = _repair([v for v in verdicts if not v.ok])
    result.note = _record(ctx, work, verdicts)
    result.ok = all(c.ok for c in result.checks)
    return result


def no_run_message(conn: psycopg.Connection, layout: Layout, run_id: int | None) -> str:
    """Why there is nothing to verify or report, as one sentence."""
    if run_id is not None:
        return f"run {run_id} is not recorded in schema {layout.schema!r}"
    empty = Ledger(layout).latest_run(conn, include_empty=True)
    if empty is not None:
        return (
            f"no backfill run with jobs is recorded in schema {layout.schema!r} (run"
            f" {empty.run_id} planned no job): load bars, then run `bqx backfill`"
        )
    return f"no backfill run is recorded in schema {layout.schema!r}: run `bqx backfill` first"
