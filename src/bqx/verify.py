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
from psycopg import sql

from bqx.backfill import STALE_AFTER_S, worker_is_dead
from bqx.errors import BqxError
from bqx.metrics import metric_columns
from bqx.progress import plural
from bqx.schema import LEDGER_JOBS, Layout, Month, table_columns
from bqx.status import latest_run, planned_jobs

DIMENSIONLESS = ("return", "endpoint", "range", "volatility")
MAX_LISTED = 8  # faults named in a detail before "… and N more"


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


def plain_metrics(window_prices: list[float | None], p_t: float, windows: list[int]) -> dict:
    """Formulas (docs/metrics.md) from the prices before t, most recent LAST; None = no price."""
    out: dict[str, float | None] = {}
    for w in windows:
        window = window_prices[-w:] if len(window_prices) >= w else None
        if window is None or any(x is None for x in window):
            values: dict[str, float | None] = dict.fromkeys(
                ("return", "max", "min", "avg", "stdev", "endpoint")
            )
        else:
            mean = sum(window) / w
            var = sum((x - mean) ** 2 for x in window) / (w - 1)
            values = {
                "return": sum((x - p_t) / p_t for x in window),
                "max": max(window), "min": min(window), "avg": mean,
                "stdev": math.sqrt(var), "endpoint": (window[0] - p_t) / p_t,
            }  # fmt: skip
        for k, v in values.items():
            out[f"w{w}_bqx_{k}"] = v
    big = f"w{max(windows)}_bqx_"
    for k in ("return", "max", "min", "avg", "stdev"):
        out[f"agg_bqx_{k}"] = out[big + k]
    mx, mn, sd = out[big + "max"], out[big + "min"], out[big + "stdev"]
    out["agg_bqx_range"] = None if mx is None else (mx - mn) / p_t
    out["agg_bqx_volatility"] = None if sd is None else sd / p_t
    return out


def _history(
    conn: psycopg.Connection, layout: Layout, pair: str, t: datetime, params: dict
) -> tuple[float, list[float | None]]:
    """p_t and the window prices before t (oldest first), read straight from the source."""
    src, tc, pc = layout.source(pair), layout.time, layout.price
    wmax = max(params["windows"])
    if params.get("mode", "bars") == "bars":
        rows = conn.execute(
            sql.SQL(
                "SELECT {p}::float8 FROM {s} WHERE {t} <= %s ORDER BY {t} DESC LIMIT %s"
            ).format(p=pc, s=src, t=tc),
            (t, wmax + 1),
        ).fetchall()
        prices = [r[0] for r in reversed(rows)]
        return prices[-1], prices[:-1]
    max_fill = int(params.get("max_fill", 5))
    rows = conn.execute(
        sql.SQL("SELECT {t}, {p}::float8 FROM {s} WHERE {t} >= %s AND {t} <= %s ORDER BY {t}")
        .format(p=pc, s=src, t=tc),
        (t - timedelta(minutes=wmax + max_fill), t),
    ).fetchall()  # fmt: skip
    first = conn.execute(sql.SQL("SELECT min({t}) FROM {s}").format(t=tc, s=src)).fetchone()[0]
    by_minute = {_minute(r[0]): r[1] for r in rows}
    now = _minute(t)
    first_minute = _minute(first)
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


def _minute(t: datetime) -> int:
    if t.tzinfo is not None:
        t = t.replace(tzinfo=None) - (t.utcoffset() or timedelta(0))
    return int((t - datetime(1970, 1, 1)).total_seconds() // 60)


def _close(got: float | None, want: float | None, col: str, p_t: float) -> bool:
    if got is None or want is None:
        return got is None and want is None
    scale = 1.0 if col.endswith(DIMENSIONLESS) else p_t
    return abs(got - want) <= 1e-9 * abs(want) + 1e-12 * scale


# -- the checks ---------------------------------------------------------------------------------


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


def _scope(
    conn: psycopg.Connection, layout: Layout, run: dict[str, Any], whole_ledger: bool
) -> _Scope:
    """The latest run's plan plus (by default) every job the ledger holds.

    Checking only the latest run's plan would let a `--pairs X --force` redo hide faults in
    every other pair, so verification covers the database state the ledger describes.
    """
    jobs = set(planned_jobs(run))
    pair_run: dict[str, int] = {}
    if whole_ledger:
        for pair, month, rid in conn.execute(
            sql.SQL("SELECT pair, month, run_id FROM {}").format(layout.table(LEDGER_JOBS))
        ):
            jobs.add((pair, month))
            if rid is not None:
                pair_run[pair] = max(pair_run.get(pair, 0), int(rid))
    runs: dict[int, dict[str, Any]] = {run["run_id"]: run["params"]}
    params: dict[str, dict[str, Any]] = {}
    layouts: dict[str, Layout] = {}
    for pair in sorted({p for p, _ in jobs}):
        rid = pair_run.get(pair, run["run_id"])
        if rid not in runs:
            other = latest_run(conn, layout, rid)
            runs[rid] = other["params"] if other else run["params"]
        p = runs[rid]
        params[pair] = p
        layouts[pair] = Layout(layout.schema, p.get("source_table", layout.source_table),
                               p.get("time_column", layout.time_column),
                               p.get("price_column", layout.price_column))  # fmt: skip
    return _Scope(run["run_id"], sorted(jobs), params, layouts)


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
    run = latest_run(conn, layout, run_id)
    if run is None:
        raise BqxError(no_run_message(conn, layout, run_id))
    scope = _scope(conn, layout, run, whole_ledger=run_id is None)
    jobs, pairs = scope.jobs, scope.pairs
    result = Verification(True, run["run_id"], scope="ledger" if run_id is None else "run",
                          jobs=len(jobs))  # fmt: skip
    if not jobs:
        result.ok = False
        result.nothing_to_check = (
            f"run {run['run_id']} planned no job (no source bars in its pairs and months)"
        )
        return result
    step: StepFn = progress or (lambda *a, **k: None)
    step("partitions", 0, 6)
    existing = attached_partitions(conn, layout)

    # 1. every planned partition exists, attached with its month's bounds
    faults = []
    for pair, first_day in jobs:
        month = Month.of(first_day)
        name = layout.target_partition_name(pair, month)
        bound = existing.get(name)
        if bound is None:
            faults.append(_fault(
                f"{pair.upper()} {month}: partition {layout.schema}.{name} is missing",
                pair, month, expected=name, got=None))  # fmt: skip
        elif bound != (month.start, month.end):
            faults.append(_fault(
                f"{pair.upper()} {month}: partition {name} covers {bound[0]}..{bound[1]}",
                pair, month, column="ts_utc", expected=[month.start, month.end],
                got=list(bound)))  # fmt: skip
    result.checks.append(
        _check(
            "partitions",
            faults,
            f"{plural(len(jobs), 'partition')} present",
            {"partitions": len(jobs), "missing": len(faults)},
        )  # fmt: skip
    )

    # 2. each month's target rows = its source bars, exactly
    target_counts: dict[tuple[str, date], int] = {}
    faults = []
    total = total_src = 0
    for i, pair in enumerate(pairs):
        step("row_counts", 1, 6, f"{pair.upper()} ({i + 1}/{len(pairs)})")
        src_layout = scope.layouts[pair]
        src: dict[date, int] = {}
        if table_columns(conn, *src_layout.source_name(pair)) is None:
            schema, table = src_layout.source_name(pair)
            faults.append(_fault(f"{pair.upper()}: source table {schema}.{table} is missing",
                                 pair, expected=f"{schema}.{table}"))  # fmt: skip
        else:
            src = _month_counts(conn, src_layout.source(pair), src_layout.time)
        has_target = table_columns(conn, layout.schema, layout.target_name(pair)) is not None
        tgt = (
            _month_counts(conn, layout.target(pair), sql.Identifier("ts_utc")) if has_target else {}
        )
        for p, first_day in jobs:
            if p != pair:
                continue
            s, t = src.get(first_day, 0), tgt.get(first_day, 0)
            target_counts[(pair, first_day)] = t
            total += t
            total_src += s
            if s != t:
                month = Month.of(first_day)
                faults.append(_fault(
                    f"{pair.upper()} {month}: {plural(t, 'row')} for {plural(s, 'source bar')}",
                    pair, month, column="rows", expected=s, got=t))  # fmt: skip
    result.checks.append(
        _check(
            "row_counts",
            faults,
            f"{plural(total, 'row')} = source bars",
            {"rows": total, "source_bars": total_src},
        )  # fmt: skip
    )

    # 3. primary keys and rows inside their partition's month
    step("keys_and_bounds", 2, 6)
    faults = []
    for pair in pairs:
        name = layout.target_name(pair)
        exists = table_columns(conn, layout.schema, name) is not None
        if exists and not _has_primary_key(conn, layout.schema, name):
            faults.append(_fault(f"{pair.upper()}: {name} has no primary key", pair,
                                 column="ts_utc", expected="primary key", got=None))  # fmt: skip
    for pair, first_day in jobs:
        month = Month.of(first_day)
        name = layout.target_partition_name(pair, month)
        if name not in existing:
            continue
        if not _has_primary_key(conn, layout.schema, name):
            faults.append(
                _fault(f"{pair.upper()} {month}: {name} has no primary key", pair, month,
                       column="ts_utc", expected="primary key", got=None)
            )  # fmt: skip
        outside = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE ts_utc < %s OR ts_utc >= %s").format(
                layout.target_partition(pair, month)
            ),
            (month.start, month.end),
        ).fetchone()[0]
        if outside:
            faults.append(_fault(f"{pair.upper()} {month}: {plural(outside, 'row')} outside"
                                 f" {month}", pair, month, column="ts_utc", expected=0,
                                 got=outside))  # fmt: skip
    result.checks.append(_check("keys_and_bounds", faults, "primary keys present, rows in month"))

    # 4. NULLs only where history is short
    faults = []
    for i, pair in enumerate(pairs):
        step("nulls", 3, 6, f"{pair.upper()} ({i + 1}/{len(pairs)})")
        if table_columns(conn, layout.schema, layout.target_name(pair)) is None:
            continue  # reported by the checks above
        if table_columns(conn, *scope.layouts[pair].source_name(pair)) is None:
            continue
        faults += _null_faults(conn, scope.layouts[pair], pair, scope.params[pair])
    result.checks.append(_check("nulls", faults, "NULLs only where history is short"))

    # 5. a random sample recomputed from the source by a plain path
    faults, checked, edges = _sample_faults(conn, scope, sample, seed, step)
    result.checks.append(
        _check(
            "recompute_sample",
            faults,
            f"{plural(checked, 'sampled row')} ({edges} of them first bars"
            " of a month) agree within the tolerances of docs/metrics.md",
            {"sampled_rows": checked, "month_first_bars": edges},
        )  # fmt: skip
    )

    # 6. the ledger agrees with the tables
    step("ledger", 5, 6)
    faults = []
    ledger = {
        (p, m): (s, r, w, hb, err)
        for p, m, s, r, w, hb, err in conn.execute(
            sql.SQL(
                "SELECT pair, month, status, rows_written, worker,"
                " extract(epoch FROM now() - heartbeat_at)::float8, last_error FROM {}"
            ).format(layout.table(LEDGER_JOBS))
        )
    }
    for key in jobs:
        status, rows, worker, hb_age, error = ledger.get(key, ("missing", None, None, None, None))
        label = f"{key[0].upper()} {Month.of(key[1])}"
        where = {"pair": key[0], "month": Month.of(key[1])}
        if status == "running":
            age = "no heartbeat" if hb_age is None else f"heartbeat {hb_age:.0f} s old"
            if hb_age is None or hb_age > STALE_AFTER_S or worker_is_dead(worker):
                problem = f"{label}: job left running by {worker} ({age}; worker is gone)"
            else:
                problem = f"{label}: job running on {worker} ({age}): a backfill is active"
            faults.append(_fault(problem, **where, column="status", expected="done", got=status))
        elif status == "failed":
            error = (error or "").strip().removeprefix(f"{label}:").strip()
            faults.append(_fault(f"{label}: job failed: {error[:160]}", **where,
                                 column="status", expected="done", got=status))  # fmt: skip
        elif status != "done":
            faults.append(_fault(f"{label}: job is {status}", **where, column="status",
                                 expected="done", got=status))  # fmt: skip
        elif rows != target_counts.get(key):
            faults.append(_fault(
                f"{label}: ledger says {rows} rows, table has {target_counts.get(key)}", **where,
                column="rows_written", expected=target_counts.get(key), got=rows))  # fmt: skip
    result.checks.append(
        _check(
            "ledger",
            faults,
            f"{plural(len(jobs), 'job')} done, rows match",
            {"jobs": len(jobs), "not_matching": len(faults)},
        )  # fmt: skip
    )
    step("done", 6, 6)

    result.ok = all(c.ok for c in result.checks)
    return result


def no_run_message(conn: psycopg.Connection, layout: Layout, run_id: int | None) -> str:
    """Why there is nothing to verify or report, as one sentence."""
    if run_id is not None:
        return f"run {run_id} is not recorded in schema {layout.schema!r}"
    empty = latest_run(conn, layout, include_empty=True)
    if empty is not None:
        return (
            f"no backfill run with jobs is recorded in schema {layout.schema!r} (run"
            f" {empty['run_id']} planned no job): load bars, then run `bqx backfill`"
        )
    return f"no backfill run is recorded in schema {layout.schema!r}: run `bqx backfill` first"


def attached_partitions(
    conn: psycopg.Connection, layout: Layout
) -> dict[str, tuple[datetime, datetime]]:
    """Attached partitions of bqx targets in the schema: name -> (from, to)."""
    rows = conn.execute(
        "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_class c"
        " JOIN pg_namespace n ON n.oid = c.relnamespace"
        " JOIN pg_inherits i ON i.inhrelid = c.oid"
        " JOIN pg_class parent ON parent.oid = i.inhparent"
        " WHERE n.nspname = %s AND parent.relname LIKE 'bqx\\_%%' AND c.relkind = 'r'",
        (layout.schema,),
    ).fetchall()
    out = {}
    for name, bound in rows:
        # FOR VALUES FROM ('2024-07-01 00:00:00+00') TO ('2024-08-01 00:00:00+00')
        parts = bound.split("'")
        if len(parts) >= 4:
            out[name] = (datetime.fromisoformat(parts[1]), datetime.fromisoformat(parts[3]))
    return out


def _month_counts(
    conn: psycopg.Connection, table: sql.Composable, col: sql.Composable
) -> dict[date, int]:
    q = sql.SQL("SELECT date_trunc('month', {c})::date, count(*) FROM {t} GROUP BY 1").format(
        c=col, t=table
    )
    return {m: n for m, n in conn.execute(q)}


def _has_primary_key(conn: psycopg.Connection, schema: str, table: str) -> bool:
    return bool(
        conn.execute(
            "SELECT 1 FROM pg_index i JOIN pg_class c ON c.oid = i.indrelid"
            " JOIN pg_namespace n ON n.oid = c.relnamespace"
            " WHERE n.nspname = %s AND c.relname = %s AND i.indisprimary",
            (schema, table),
        ).fetchone()
    )


def _null_faults(
    conn: psycopg.Connection, layout: Layout, pair: str, params: dict[str, Any]
) -> list[Fault]:
    """Per month and window: NULL where the window is full, or a value where it is not.

    Where a window is full is derived from the source in SQL, independently of the kernel:
    in ``bars`` mode after the pair's first W bars; in ``clock`` mode when t−W is not before
    the first bar and no minute of t−W … t−1 falls in a hole (a stretch more than
    ``max_fill`` minutes after the last bar).
    """
    windows = sorted(int(w) for w in params["windows"])
    mode = params.get("mode", "bars")
    groups = {w: [f"w{w}_bqx_{s}" for s in ("return", "max", "min", "avg", "stdev", "endpoint")]
              for w in windows}  # fmt: skip
    aggs = ("return", "max", "min", "avg", "stdev", "range", "volatility")
    groups[windows[-1]] += [f"agg_bqx_{s}" for s in aggs]
    src, tc = layout.source(pair), layout.time
    exprs: list[sql.Composable] = []
    args: list[Any] = []
    if mode == "bars":
        firsts = [r[0] for r in conn.execute(
            sql.SQL("SELECT {t} FROM {s} ORDER BY {t} LIMIT %s").format(t=tc, s=src),
            (windows[-1] + 1,),
        )]  # fmt: skip
        source = sql.SQL("")
    else:
        hole = timedelta(minutes=int(params.get("max_fill", 5)) + 1)
        source = sql.SQL(
            " LEFT JOIN (SELECT t, min(t) OVER () AS first, max(CASE WHEN gap > %s"
            " THEN t - interval '1 minute' END) OVER (ORDER BY t) AS last_hole"
            " FROM (SELECT {t}::timestamptz AS t, {t} - lag({t}) OVER (ORDER BY {t}) AS gap"
            " FROM {s}) g) h ON h.t = x.ts_utc"
        ).format(t=tc, s=src)
    for w in windows:
        any_null = sql.SQL(" OR ").join(sql.SQL("{} IS NULL").format(sql.Identifier(c))
                                        for c in groups[w])  # fmt: skip
        all_null = sql.SQL(" AND ").join(sql.SQL("{} IS NULL").format(sql.Identifier(c))
                                         for c in groups[w])  # fmt: skip
        if mode == "bars":
            # full exactly from the pair's (w+1)-th bar of history on
            cut = firsts[w] if len(firsts) > w else None
            full = sql.SQL("x.ts_utc >= %s") if cut is not None else sql.SQL("false")
            args += [cut] * 2 if cut is not None else []
        else:
            full = sql.SQL(
                "(h.t IS NOT NULL AND h.t - %s >= h.first"
                " AND (h.last_hole IS NULL OR h.last_hole < h.t - %s))"
            )
            args += [timedelta(minutes=w)] * 4
        exprs += [
            sql.SQL("count(*) FILTER (WHERE {f} AND ({a}))").format(f=full, a=any_null),
            sql.SQL("count(*) FILTER (WHERE NOT {f} AND NOT ({a}))").format(f=full, a=all_null),
        ]
    if mode != "bars":
        args = [*args, hole]  # the join's parameter comes after the counts'
    query = sql.SQL(
        "SELECT date_trunc('month', x.ts_utc AT TIME ZONE 'UTC')::date, {e}"
        " FROM {target} x{source} GROUP BY 1 ORDER BY 1"
    ).format(e=sql.SQL(", ").join(exprs), target=layout.target(pair), source=source)
    faults = []
    for month, *counts in conn.execute(query, args):
        for i, w in enumerate(windows):
            label = f"{pair.upper()} {Month.of(month)} w{w}"
            unexpected, missing = counts[2 * i], counts[2 * i + 1]
            where = {"pair": pair, "month": Month.of(month), "column": f"w{w}_bqx_*"}
            if unexpected:
                problem = f"{label}: {plural(unexpected, 'unexpected NULL row')}"
                faults.append(_fault(problem, **where, expected=0, got=unexpected))
            if missing:
                problem = f"{label}: {plural(missing, 'row')} without full history not NULL"
                faults.append(_fault(problem, **where, expected=0, got=missing))
    return faults


def _sample_faults(
    conn: psycopg.Connection, scope: _Scope, sample: int, seed: int, step: StepFn
) -> tuple[list[Fault], int, int]:
    """Recompute sampled rows (random ones and each month's first) from the source."""
    faults: list[Fault] = []
    checked = edges = 0
    rng = random.Random(seed)
    select = sql.SQL("SELECT ts_utc, rate, {} FROM {} WHERE ts_utc = ANY(%s)")
    for i, pair in enumerate(scope.pairs):
        step("recompute_sample", 4, 6, f"{pair.upper()} ({i + 1}/{len(scope.pairs)})")
        layout, params = scope.layouts[pair], scope.params[pair]
        windows = sorted(int(w) for w in params["windows"])
        cols = metric_columns(windows)
        if table_columns(conn, layout.schema, layout.target_name(pair)) is None:
            continue
        if table_columns(conn, *layout.source_name(pair)) is None:
            continue
        # a repeatable Bernoulli sample over all partitions, about 3× too large, then cut to
        # size at random (a LIMIT would keep the first partition's rows only)
        n = conn.execute(sql.SQL("SELECT count(*) FROM {}").format(layout.target(pair))).fetchone()[
            0
        ]
        if n == 0:
            continue
        percent = min(100.0, 100.0 * 3 * sample / n)
        drawn = [r[0] for r in conn.execute(
            sql.SQL("SELECT ts_utc FROM {} TABLESAMPLE BERNOULLI (%s) REPEATABLE (%s)").format(
                layout.target(pair)
            ),
            (percent, seed + rng.randrange(1 << 30)),
        )]  # fmt: skip
        picked = rng.sample(drawn, min(sample, len(drawn)))
        # plus each month's first bar: its window reaches into the month before, where a
        # month-by-month computation goes wrong first
        starts = [r[0] for r in conn.execute(
            sql.SQL("SELECT min(ts_utc) FROM {} GROUP BY date_trunc('month', ts_utc"
                    " AT TIME ZONE 'UTC')").format(layout.target(pair))
        )]  # fmt: skip
        extra = sorted(set(starts) - set(picked))
        edges += len(extra)
        rows = conn.execute(
            select.format(sql.SQL(", ").join(map(sql.Identifier, cols)), layout.target(pair)),
            (picked + extra,),
        ).fetchall()
        # faults grouped per month and column: "EURUSD 2024-07: w60_bqx_avg wrong on 12 of 53
        # sampled rows (first 2024-07-03 04:17: 1.0733694 vs recomputed 1.0733587)"
        seen: dict[Month, int] = {}
        wrong: dict[tuple[Month, str], list[tuple[str, Any, Any]]] = {}
        for row in rows:
            t, rate = row[0], row[1]
            p_t, window = _history(conn, layout, pair, t, params)
            want = plain_metrics(window, p_t, windows)
            checked += 1
            month = Month.of(t)
            seen[month] = seen.get(month, 0) + 1
            if rate != p_t:
                wrong.setdefault((month, "rate"), []).append((f"{t:%Y-%m-%d %H:%M}", p_t, rate))
            for col, got in zip(cols, row[2:], strict=True):
                if not _close(got, want[col], col, p_t):
                    wrong.setdefault((month, col), []).append(
                        (f"{t:%Y-%m-%d %H:%M}", want[col], got)
                    )
        for (month, col), examples in sorted(wrong.items()):
            at, want_, got_ = examples[0]
            source = "source" if col == "rate" else "recomputed"
            fault = _fault(
                f"{pair.upper()} {month}: {col} wrong on {len(examples)} of {seen[month]} sampled"
                f" rows (first {at}: {got_} vs {source} {want_})",
                pair, month, column=col, expected=want_, got=got_, at=at, count=len(examples),
            )  # fmt: skip
            faults.append(fault)
    return faults, checked, edges
