"""``bqx verify``: the six checks of SPEC 5, on exact figures (``count(*)``, not estimates).

The recomputation check deliberately does not use ``bqx.metrics``: it re-reads each sampled
row's history from the source with a plain query and evaluates the formulas with plain Python
loops and a two-pass variance, so a bug in the production kernel cannot hide itself.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, timedelta
from typing import Any

import psycopg
from psycopg import sql

from bqx.errors import BqxError
from bqx.metrics import metric_columns
from bqx.schema import LEDGER_JOBS, Layout, Month, table_columns
from bqx.status import latest_run, planned_jobs

DIMENSIONLESS = ("return", "endpoint", "range", "volatility")
MAX_LISTED = 8  # faults named in a detail before "… and N more"


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class Verification:
    ok: bool
    run_id: int | None
    checks: list[Check] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {"ok": self.ok, "run_id": self.run_id, "checks": [asdict(c) for c in self.checks]}


def _listing(faults: list[str]) -> str:
    more = f" … and {len(faults) - MAX_LISTED} more" if len(faults) > MAX_LISTED else ""
    return "; ".join(faults[:MAX_LISTED]) + more


def _check(name: str, faults: list[str], ok_detail: str) -> Check:
    return Check(name, not faults, ok_detail if not faults else _listing(faults))


# -- the independent reference ------------------------------------------------------------------


def plain_metrics(window_prices: list[float | None], p_t: float, windows: list[int]) -> dict:
    """Formulas of SPEC 2 from the prices before t, most recent LAST; None = no price."""
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


def verify(
    conn: psycopg.Connection, layout: Layout, *, sample: int = 50, seed: int = 0,
    run_id: int | None = None,
) -> Verification:  # fmt: skip
    """Run every check against the plan of the latest (or given) run."""
    run = latest_run(conn, layout, run_id)
    if run is None:
        raise BqxError(
            f"no backfill run recorded in schema {layout.schema!r}: run `bqx backfill` first"
        )
    params = run["params"]
    layout = Layout(layout.schema, params.get("source_table", layout.source_table),
                    params.get("time_column", layout.time_column),
                    params.get("price_column", layout.price_column))  # fmt: skip
    windows = sorted(int(w) for w in params["windows"])
    jobs = planned_jobs(run)
    pairs = sorted({p for p, _ in jobs})
    result = Verification(True, run["run_id"])
    existing = _partitions(conn, layout)

    # 1. every planned partition exists, attached with its month's bounds
    faults = []
    for pair, first_day in jobs:
        month = Month.of(first_day)
        name = layout.target_partition_name(pair, month)
        bound = existing.get(name)
        if bound is None:
            faults.append(f"{pair.upper()} {month}: partition {layout.schema}.{name} is missing")
        elif bound != (month.start, month.end):
            faults.append(f"{pair.upper()} {month}: partition {name} covers {bound[0]}..{bound[1]}")
    result.checks.append(_check("partitions", faults, f"{len(jobs)} partitions present"))

    # 2. each month's target rows = its source bars, exactly
    target_counts: dict[tuple[str, date], int] = {}
    faults = []
    total = 0
    for pair in pairs:
        src = _month_counts(conn, layout.source(pair), layout.time)
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
            if s != t:
                faults.append(f"{pair.upper()} {Month.of(first_day)}: {t} rows for {s} source bars")
    result.checks.append(_check("row_counts", faults, f"{total:,} rows = source bars"))

    # 3. primary keys and rows inside their partition's month
    faults = []
    for pair, first_day in jobs:
        month = Month.of(first_day)
        name = layout.target_partition_name(pair, month)
        if name not in existing:
            continue
        if not _has_primary_key(conn, layout.schema, name):
            faults.append(f"{pair.upper()} {month}: {name} has no primary key")
        outside = conn.execute(
            sql.SQL("SELECT count(*) FROM {} WHERE ts_utc < %s OR ts_utc >= %s").format(
                layout.target_partition(pair, month)
            ),
            (month.start, month.end),
        ).fetchone()[0]
        if outside:
            faults.append(f"{pair.upper()} {month}: {outside} rows outside {month}")
    result.checks.append(_check("keys_and_bounds", faults, "primary keys present, rows in month"))

    # 4. NULLs only where history is short
    faults = _null_faults(conn, layout, pairs, windows, params.get("mode", "bars"), existing)
    result.checks.append(_check("nulls", faults, "NULLs only where history is short"))

    # 5. a random sample recomputed from the source by a plain path
    faults, checked = _sample_faults(conn, layout, pairs, windows, params, sample, seed)
    result.checks.append(
        _check("recompute_sample", faults, f"{checked} sampled rows agree within SPEC 2 tolerances")
    )

    # 6. the ledger agrees with the tables
    faults = []
    ledger = {
        (p, m): (s, r)
        for p, m, s, r in conn.execute(
            sql.SQL("SELECT pair, month, status, rows_written FROM {}").format(
                layout.table(LEDGER_JOBS)
            )
        )
    }
    for key in jobs:
        status, rows = ledger.get(key, ("missing", None))
        label = f"{key[0].upper()} {Month.of(key[1])}"
        if status != "done":
            faults.append(f"{label}: job is {status}")
        elif rows != target_counts.get(key):
            faults.append(f"{label}: ledger says {rows} rows, table has {target_counts.get(key)}")
    others = [f"{p.upper()} {Month.of(m)}" for (p, m), (s, _) in ledger.items() if s == "running"
              and (p, m) not in set(jobs)]  # fmt: skip
    faults += [f"{o}: job left running" for o in others]
    result.checks.append(_check("ledger", faults, f"{len(jobs)} jobs done, rows match"))

    result.ok = all(c.ok for c in result.checks)
    return result


def _partitions(conn: psycopg.Connection, layout: Layout) -> dict[str, tuple[datetime, datetime]]:
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
    conn: psycopg.Connection, layout: Layout, pairs: list[str], windows: list[int], mode: str,
    existing: dict,
) -> list[str]:  # fmt: skip
    faults = []
    for pair in pairs:
        target = layout.target(pair)
        firsts = [r[0] for r in conn.execute(
            sql.SQL("SELECT {t} FROM {s} ORDER BY {t} LIMIT %s").format(
                t=layout.time, s=layout.source(pair)
            ),
            (max(windows) + 1,),
        )]  # fmt: skip
        filters, args = [], []
        for w in windows:
            cols = [f"w{w}_bqx_{s}" for s in ("return", "max", "min", "avg", "stdev", "endpoint")]
            any_null = sql.SQL(" OR ").join(
                sql.SQL("{} IS NULL").format(sql.Identifier(c)) for c in cols
            )
            all_null = sql.SQL(" AND ").join(
                sql.SQL("{} IS NULL").format(sql.Identifier(c)) for c in cols
            )
            if mode == "bars":
                # NULL exactly on the pair's first w bars of history: before the (w+1)-th bar
                cut = firsts[w] if len(firsts) > w else None
                filters += [
                    sql.SQL("count(*) FILTER (WHERE ts_utc >= %s AND ({}))").format(any_null),
                    sql.SQL("count(*) FILTER (WHERE ts_utc < %s AND NOT ({}))").format(all_null),
                ]
                args += [cut or datetime.max, cut or datetime.max]
            else:
                # clock mode: a window is NULL as a whole
                filters += [
                    sql.SQL("count(*) FILTER (WHERE ({}) AND NOT ({}))").format(any_null, all_null)
                ]
        counts = conn.execute(
            sql.SQL("SELECT {} FROM {}").format(sql.SQL(", ").join(filters), target), args
        ).fetchone()
        for i, w in enumerate(windows):
            if mode == "bars":
                unexpected, missing = counts[2 * i], counts[2 * i + 1]
                if unexpected:
                    faults.append(f"{pair.upper()} w{w}: {unexpected} unexpected NULL rows")
                if missing:
                    faults.append(f"{pair.upper()} w{w}: {missing} rows without history not NULL")
            elif counts[i]:
                faults.append(f"{pair.upper()} w{w}: {counts[i]} rows partly NULL")
        if mode != "bars":
            for small, large in zip(windows, windows[1:], strict=False):
                bad = conn.execute(
                    sql.SQL(
                        "SELECT count(*) FROM {t} WHERE {s} IS NULL AND {l} IS NOT NULL"
                    ).format(
                        t=target,
                        s=sql.Identifier(f"w{small}_bqx_avg"),
                        l=sql.Identifier(f"w{large}_bqx_avg"),
                    )  # fmt: skip
                ).fetchone()[0]
                if bad:
                    faults.append(f"{pair.upper()}: {bad} rows with w{small} NULL but w{large} not")
    return faults


def _sample_faults(
    conn: psycopg.Connection, layout: Layout, pairs: list[str], windows: list[int],
    params: dict, sample: int, seed: int,
) -> tuple[list[str], int]:  # fmt: skip
    cols = metric_columns(windows)
    faults: list[str] = []
    checked = 0
    rng = random.Random(seed)
    select = sql.SQL("SELECT ts_utc, rate, {} FROM {} WHERE ts_utc = ANY(%s)")
    for pair in pairs:
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
        rows = conn.execute(
            select.format(sql.SQL(", ").join(map(sql.Identifier, cols)), layout.target(pair)),
            (picked,),
        ).fetchall()
        for row in rows:
            t, rate = row[0], row[1]
            p_t, window = _history(conn, layout, pair, t, params)
            want = plain_metrics(window, p_t, windows)
            checked += 1
            if rate != p_t:
                faults.append(f"{pair.upper()} {t:%Y-%m-%d %H:%M}: rate {rate} != source {p_t}")
            for col, got in zip(cols, row[2:], strict=True):
                if not _close(got, want[col], col, p_t):
                    faults.append(
                        f"{pair.upper()} {Month.of(t)} {t:%Y-%m-%d %H:%M}: {col} is {got},"
                        f" recomputed {want[col]}"
                    )
                    break
    return faults, checked
