"""``bqx verify``: six checks (docs/guarantees.md), on exact figures (``count(*)``, not estimates).

The recomputation check deliberately does not use ``bqx.metrics``: it re-reads each sampled
row's history from the source with a plain query and evaluates the formulas with plain Python
loops and a two-pass variance, so a bug in the production kernel cannot hide itself.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import psycopg

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.text import plural
from bqx.errors import BqxError
from bqx.metrics import metric_columns
from bqx.store import bars, catalog, checks, targets
from bqx.store.ledger import STALE_AFTER_S, Ledger, RunRecord, worker_is_dead

DIMENSIONLESS = ("return", "endpoint", "range", "volatility")
MAX_LISTED = 8  # faults named in a detail before "… and N more"
CHECKS = 6

# what a caller sees while the checks run: step(check name, checks done, checks, item)
StepFn = Callable[..., None]


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

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok, "run_id": self.run_id, "scope": self.scope, "jobs": self.jobs,
            "nothing_to_check": self.nothing_to_check,
            "checks": [asdict(c) for c in self.checks],
        }  # fmt: skip

    def lines(self) -> list[tuple[bool, str]]:
        """(passed?, ``PASS name: detail``) per check."""
        return [(c.ok, f"{'PASS' if c.ok else 'FAIL'} {c.name}: {c.detail}") for c in self.checks]


def _listing(faults: list[Fault]) -> str:
    more = f" … and {len(faults) - MAX_LISTED} more" if len(faults) > MAX_LISTED else ""
    return "; ".join(f.problem for f in faults[:MAX_LISTED]) + more


def _check(
    name: str, faults: list[Fault], ok_detail: str, counts: dict[str, int] | None = None
) -> Check:
    detail = ok_detail if not faults else _listing(faults)
    return Check(name, not faults, detail, faults, counts or {})


def _fault(problem: str, pair: str | None = None, month: Any = None, **kw: Any) -> Fault:
    return Fault(problem, pair.upper() if pair else None, str(month) if month else None, **kw)


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


def _history(
    conn: psycopg.Connection, layout: Layout, pair: str, t: datetime, params: dict
) -> tuple[float, list[float | None]]:
    """p_t and the window prices before t (oldest first), read straight from the source."""
    wmax = max(params["windows"])
    if params.get("mode", "bars") == "bars":
        prices = checks.bars_up_to(conn, layout, pair, t, wmax + 1)
        return prices[-1], list(prices[:-1])
    max_fill = int(params.get("max_fill", 5))
    rows = checks.bars_between(conn, layout, pair, t - timedelta(minutes=wmax + max_fill), t)
    first = bars.bar_bounds(conn, layout, pair)[0]
    by_minute = {_minute(when): p for when, p in rows}
    now = _minute(t)
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
    return by_minute[now], window


def _close(got: float | None, want: float | None, col: str, p_t: float) -> bool:
    if got is None or want is None:
        return got is None and want is None
    scale = 1.0 if col.endswith(DIMENSIONLESS) else p_t
    return abs(got - want) <= 1e-9 * abs(want) + 1e-12 * scale


# -- what is checked ----------------------------------------------------------------------------


@dataclass
class _Scope:
    """What is checked: the jobs, and per pair the parameters and source of its latest run."""

    run_id: int
    jobs: list[tuple[str, date]]
    params: dict[str, dict[str, Any]]
    layouts: dict[str, Layout]

    @property
    def pairs(self) -> list[str]:
        return sorted(self.params)


def _scope(conn: psycopg.Connection, layout: Layout, run: RunRecord, whole_ledger: bool) -> _Scope:
    """The latest run's plan plus (by default) every job the ledger holds.

    Checking only the latest run's plan would let a `--pairs X --force` redo hide faults in
    every other pair, so verification covers the database state the ledger describes.
    """
    ledger = Ledger(layout)
    jobs = set(run.planned)
    pair_run: dict[str, int] = {}
    if whole_ledger:
        known = ledger.job_runs(conn)
        # a pair without any job left was dropped (`bqx drop`): its planned jobs went with it
        jobs = {j for j in jobs if j[0] in {p for p, _, _ in known}}
        for pair, month, rid in known:
            jobs.add((pair, month))
            if rid is not None:
                pair_run[pair] = max(pair_run.get(pair, 0), int(rid))
    runs: dict[int, dict[str, Any]] = {run.run_id: run.params}
    params: dict[str, dict[str, Any]] = {}
    layouts: dict[str, Layout] = {}
    for pair in sorted({p for p, _ in jobs}):
        rid = pair_run.get(pair, run.run_id)
        if rid not in runs:
            other = ledger.latest_run(conn, rid)
            runs[rid] = other.params if other else run.params
        p = runs[rid]
        params[pair] = p
        layouts[pair] = layout.with_source(
            p.get("source_table"), p.get("time_column"), p.get("price_column")
        )
    return _Scope(run.run_id, sorted(jobs), params, layouts)


@dataclass
class _Context:
    conn: psycopg.Connection
    layout: Layout  # the targets' schema
    scope: _Scope
    step: StepFn
    partitions: dict[str, tuple[datetime, datetime]] = field(default_factory=dict)
    target_counts: dict[tuple[str, date], int] = field(default_factory=dict)

    def months_of(self, pair: str) -> list[Month]:
        return [Month.of(d) for p, d in self.scope.jobs if p == pair]


# -- the checks ---------------------------------------------------------------------------------


def check_partitions(ctx: _Context) -> Check:
    """1. Every planned partition exists, attached with its month's bounds."""
    ctx.step("partitions", 0, CHECKS)
    ctx.partitions = catalog.attached_partitions(ctx.conn, ctx.layout)
    faults = []
    for pair, first_day in ctx.scope.jobs:
        month = Month.of(first_day)
        name = ctx.layout.target_partition_name(pair, month)
        bound = ctx.partitions.get(name)
        if bound is None:
            faults.append(_fault(
                f"{pair.upper()} {month}: partition {ctx.layout.schema}.{name} is missing",
                pair, month, expected=name, got=None))  # fmt: skip
        elif bound != (month.start, month.end):
            faults.append(_fault(
                f"{pair.upper()} {month}: partition {name} covers {bound[0]}..{bound[1]}",
                pair, month, column="ts_utc", expected=[month.start, month.end],
                got=list(bound)))  # fmt: skip
    n = len(ctx.scope.jobs)
    return _check("partitions", faults, f"{plural(n, 'partition')} present",
                  {"partitions": n, "missing": len(faults)})  # fmt: skip


def check_row_counts(ctx: _Context) -> Check:
    """2. Each month's target rows equal its source bars, exactly."""
    faults = []
    total = total_src = 0
    pairs = ctx.scope.pairs
    for i, pair in enumerate(pairs):
        ctx.step("row_counts", 1, CHECKS, f"{pair.upper()} ({i + 1}/{len(pairs)})")
        src_layout = ctx.scope.layouts[pair]
        src: dict[Month, int] = {}
        if not catalog.has_source(ctx.conn, src_layout, pair):
            schema, table = src_layout.source_name(pair)
            faults.append(_fault(f"{pair.upper()}: source table {schema}.{table} is missing",
                                 pair, expected=f"{schema}.{table}"))  # fmt: skip
        else:
            src = bars.month_counts(ctx.conn, src_layout, pair)
        tgt = (targets.month_counts(ctx.conn, ctx.layout, pair)
               if catalog.has_target(ctx.conn, ctx.layout, pair) else {})  # fmt: skip
        for month in ctx.months_of(pair):
            s, t = src.get(month, 0), tgt.get(month, 0)
            ctx.target_counts[(pair, month.first_day)] = t
            total += t
            total_src += s
            if s != t:
                faults.append(_fault(
                    f"{pair.upper()} {month}: {plural(t, 'row')} for {plural(s, 'source bar')}",
                    pair, month, column="rows", expected=s, got=t))  # fmt: skip
    return _check("row_counts", faults, f"{plural(total, 'row')} = source bars",
                  {"rows": total, "source_bars": total_src})  # fmt: skip


def check_keys_and_bounds(ctx: _Context) -> Check:
    """3. Every table and partition has its primary key; no row lies outside its month."""
    ctx.step("keys_and_bounds", 2, CHECKS)
    conn, layout, faults = ctx.conn, ctx.layout, []
    for pair in ctx.scope.pairs:
        name = layout.target_name(pair)
        if catalog.has_target(conn, layout, pair) and not catalog.has_primary_key(
            conn, layout.schema, name
        ):
            faults.append(_fault(f"{pair.upper()}: {name} has no primary key", pair,
                                 column="ts_utc", expected="primary key", got=None))  # fmt: skip
    for pair, first_day in ctx.scope.jobs:
        month = Month.of(first_day)
        name = layout.target_partition_name(pair, month)
        if name not in ctx.partitions:
            continue
        if not catalog.has_primary_key(conn, layout.schema, name):
            faults.append(
                _fault(f"{pair.upper()} {month}: {name} has no primary key", pair, month,
                       column="ts_utc", expected="primary key", got=None)
            )  # fmt: skip
        outside = targets.rows_outside(conn, layout, pair, month)
        if outside:
            faults.append(_fault(f"{pair.upper()} {month}: {plural(outside, 'row')} outside"
                                 f" {month}", pair, month, column="ts_utc", expected=0,
                                 got=outside))  # fmt: skip
    return _check("keys_and_bounds", faults, "primary keys present, rows in month")


def _null_faults(ctx: _Context, pair: str) -> list[Fault]:
    params = ctx.scope.params[pair]
    windows = sorted(int(w) for w in params["windows"])
    faults = []
    for month, counts in checks.null_counts(ctx.conn, ctx.scope.layouts[pair], pair, params):
        for i, w in enumerate(windows):
            label = f"{pair.upper()} {Month.of(month)} w{w}"
            unexpected, missing = counts[2 * i], counts[2 * i + 1]
            where: dict[str, Any] = {
                "pair": pair,
                "month": Month.of(month),
                "column": f"w{w}_bqx_*",
            }
            if unexpected:
                problem = f"{label}: {plural(unexpected, 'unexpected NULL row')}"
                faults.append(_fault(problem, **where, expected=0, got=unexpected))
            if missing:
                problem = f"{label}: {plural(missing, 'row')} without full history not NULL"
                faults.append(_fault(problem, **where, expected=0, got=missing))
    return faults


def check_nulls(ctx: _Context) -> Check:
    """4. NULLs only where history is short (mode-aware)."""
    faults = []
    pairs = ctx.scope.pairs
    for i, pair in enumerate(pairs):
        ctx.step("nulls", 3, CHECKS, f"{pair.upper()} ({i + 1}/{len(pairs)})")
        if not catalog.has_target(ctx.conn, ctx.layout, pair):
            continue  # reported by the checks above
        if not catalog.has_source(ctx.conn, ctx.scope.layouts[pair], pair):
            continue
        faults += _null_faults(ctx, pair)
    return _check("nulls", faults, "NULLs only where history is short")


def _sample_pair(
    ctx: _Context, pair: str, sample: int, seed: int, rng: random.Random
) -> tuple[list[Fault], int, int]:
    """Recompute a pair's sampled rows from the source; (faults, rows checked, first bars)."""
    layout, params = ctx.scope.layouts[pair], ctx.scope.params[pair]
    windows = sorted(int(w) for w in params["windows"])
    cols = metric_columns(windows)
    picked, extra = checks.sample_times(ctx.conn, layout, pair, sample, rng, seed)
    rows = checks.rows_at(ctx.conn, layout, pair, cols, picked + extra) if picked or extra else []
    # faults grouped per month and column: "EURUSD 2024-07: w60_bqx_avg wrong on 12 of 53
    # sampled rows (first 2024-07-03 04:17: 1.0733694 vs recomputed 1.0733587)"
    seen: dict[Month, int] = {}
    wrong: dict[tuple[Month, str], list[tuple[str, Any, Any]]] = {}
    for row in rows:
        t, rate = row[0], row[1]
        p_t, window = _history(ctx.conn, layout, pair, t, params)
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
        faults.append(_fault(
            f"{pair.upper()} {month}: {col} wrong on {len(examples)} of {seen[month]} sampled"
            f" rows (first {at}: {got_} vs {source} {want_})",
            pair, month, column=col, expected=want_, got=got_, at=at, count=len(examples),
        ))  # fmt: skip
    return faults, len(rows), len(extra)


def check_sample(ctx: _Context, sample: int, seed: int) -> Check:
    """5. A random sample of rows per pair (and each month's first) recomputed from the
    source by a plain path agrees within the tolerances of docs/metrics.md."""
    faults: list[Fault] = []
    checked = edges = 0
    rng = random.Random(seed)
    pairs = ctx.scope.pairs
    for i, pair in enumerate(pairs):
        ctx.step("recompute_sample", 4, CHECKS, f"{pair.upper()} ({i + 1}/{len(pairs)})")
        if not catalog.has_target(ctx.conn, ctx.layout, pair):
            continue
        if not catalog.has_source(ctx.conn, ctx.scope.layouts[pair], pair):
            continue
        f, n, e = _sample_pair(ctx, pair, sample, seed, rng)
        faults += f
        checked += n
        edges += e
    return _check(
        "recompute_sample", faults,
        f"{plural(checked, 'sampled row')} ({edges} of them first bars of a month) agree"
        " within the tolerances of docs/metrics.md",
        {"sampled_rows": checked, "month_first_bars": edges},
    )  # fmt: skip


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
    if record.rows_written != rows:
        return f"{label}: ledger says {record.rows_written} rows, table has {rows}"
    return None


def check_ledger(ctx: _Context) -> Check:
    """6. The ledger agrees with the tables: rows recorded = rows present, no job left
    running."""
    ctx.step("ledger", 5, CHECKS)
    records = {(r.pair, r.month): r for r in Ledger(ctx.layout).job_records(ctx.conn)}
    faults = []
    for key in ctx.scope.jobs:
        record = records.get(key)
        label = f"{key[0].upper()} {Month.of(key[1])}"
        where: dict[str, Any] = {"pair": key[0], "month": Month.of(key[1])}
        rows = ctx.target_counts.get(key)
        if record is None:
            faults.append(_fault(f"{label}: job is missing", **where, column="status",
                                 expected="done", got="missing"))  # fmt: skip
            continue
        problem = _ledger_fault(record, rows, label)
        if problem is None:
            continue
        if record.status == "done":
            faults.append(_fault(problem, **where, column="rows_written", expected=rows,
                                 got=record.rows_written))  # fmt: skip
        else:
            faults.append(_fault(problem, **where, column="status", expected="done",
                                 got=record.status))  # fmt: skip
    n = len(ctx.scope.jobs)
    return _check("ledger", faults, f"{plural(n, 'job')} done, rows match",
                  {"jobs": n, "not_matching": len(faults)})  # fmt: skip


def verify(
    conn: psycopg.Connection, layout: Layout, *, sample: int = 50, seed: int = 0,
    run_id: int | None = None, progress: StepFn | None = None,
) -> Verification:  # fmt: skip
    """Run every check (docs/guarantees.md).

    By default over every job in the ledger (and the latest run with jobs); with ``run_id``
    over that run's plan only. A scope without any job is not a success: ``ok`` is False and
    ``nothing_to_check`` says why. ``progress(check, done, total, item)`` is called as the
    checks go.
    """
    run = Ledger(layout).latest_run(conn, run_id)
    if run is None:
        raise BqxError(no_run_message(conn, layout, run_id))
    scope = _scope(conn, layout, run, whole_ledger=run_id is None)
    result = Verification(True, run.run_id, scope="ledger" if run_id is None else "run",
                          jobs=len(scope.jobs))  # fmt: skip
    if not scope.jobs:
        result.ok = False
        result.nothing_to_check = (
            f"run {run.run_id} planned no job (no source bars in its pairs and months)"
        )
        return result
    ctx = _Context(conn, layout, scope, progress or (lambda *a, **k: None))
    result.checks = [
        check_partitions(ctx), check_row_counts(ctx), check_keys_and_bounds(ctx),
        check_nulls(ctx), check_sample(ctx, sample, seed), check_ledger(ctx),
    ]  # fmt: skip
    ctx.step("done", CHECKS, CHECKS)
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
