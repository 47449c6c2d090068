"""``bqx status``: where a backfill stands, read from the ledger (never from log files).

Works at any moment, from any machine that reaches the database: while a run is going on in
another terminal, after it ended, or before any run (all zeros).
"""

from __future__ import annotations

import json
from datetime import UTC, date, datetime
from typing import Any

import psycopg

from bqx.backfill import STALE_AFTER_S, worker_is_dead
from bqx.schema import LEDGER_ATTEMPTS, LEDGER_JOBS, LEDGER_RUNS, Layout, Month, table_columns

STATUSES = ("done", "running", "failed", "pending")


def ledger_exists(conn: psycopg.Connection, layout: Layout) -> bool:
    return table_columns(conn, layout.schema, LEDGER_RUNS) is not None


def latest_run(
    conn: psycopg.Connection, layout: Layout, run_id: int | None = None, *,
    include_empty: bool = False,
) -> dict | None:  # fmt: skip
    """The run row (as a dict, params decoded): ``run_id``'s, else the latest run with jobs.

    A run that planned no job (a range without source bars) has nothing to show, check or
    report, and must not hide the real latest run: it is skipped unless ``include_empty``.
    """
    if not ledger_exists(conn, layout):
        return None
    cur = conn.execute(
        psycopg.sql.SQL(
            "SELECT run_id, command, params, param_hash, started_at, ended_at, status,"
            " jobs_total, jobs_done, jobs_failed, jobs_skipped, rows_written, workers, executor,"
            " run_by, host, extract(epoch FROM coalesce(ended_at, now()) - started_at)"
            " FROM {} WHERE (%s::bigint IS NULL OR run_id = %s) AND (%s::bigint IS NOT NULL"
            "  OR %s OR jobs_total > 0"
            "  OR coalesce(jsonb_array_length(CASE WHEN jsonb_typeof(params->'jobs') = 'array'"
            "   THEN params->'jobs' END), 0) > 0)"
            " ORDER BY run_id DESC LIMIT 1"
        ).format(layout.table(LEDGER_RUNS)),
        (run_id, run_id, run_id, include_empty),
    )
    row = cur.fetchone()
    if row is None:
        return None
    names = [d.name for d in cur.description]
    run = dict(zip(names, row, strict=True))
    run["elapsed_s"] = float(run.pop("extract"))
    if isinstance(run["params"], str):
        run["params"] = json.loads(run["params"])
    return run


def planned_jobs(run: dict) -> list[tuple[str, date]]:
    return [(p, Month.parse(m).first_day) for p, m in run["params"].get("jobs", [])]


def run_parameters(run: dict) -> dict[str, Any]:
    """The parameters that shape a run's results: mode, windows (and max_fill in clock mode)."""
    p = run["params"]
    mode = p.get("mode", "bars")
    return {
        "mode": mode, "windows": sorted(int(w) for w in p.get("windows", [])),
        "max_fill": p.get("max_fill") if mode == "clock" else None,
    }  # fmt: skip


def describe_parameters(params: dict[str, Any]) -> str:
    """``bars mode, windows 15, 30, 45, 60, 75`` (with ``max fill 5 min`` in clock mode)."""
    text = f"{params['mode']} mode, windows {', '.join(map(str, params['windows']))}"
    if params.get("max_fill") is not None:
        text += f", max fill {params['max_fill']} min"
    return text


def status(conn: psycopg.Connection, layout: Layout, *, errors: int = 10) -> dict[str, Any]:
    """Progress of the latest run: the document ``bqx status --json`` prints."""
    doc: dict[str, Any] = {
        "jobs": {"total": 0, "done": 0, "running": 0, "failed": 0, "pending": 0},
        "rows": 0, "rows_per_s": 0.0, "eta_s": None, "pairs": [], "running": [], "stale": [],
        "errors": [], "run": None, "ledger": None,
        "as_of": datetime.now(UTC).isoformat(timespec="seconds"),
    }  # fmt: skip
    run = latest_run(conn, layout)
    if run is None:
        return doc
    # every job the ledger holds, whichever run planned it (the latest run may cover a subset)
    doc["ledger"] = {"total": 0, **dict.fromkeys(STATUSES, 0), "rows": 0}
    for st, n, rows_ in conn.execute(
        psycopg.sql.SQL(
            "SELECT status, count(*), coalesce(sum(rows_written) FILTER (WHERE status = 'done'), 0)"
            " FROM {} GROUP BY status"
        ).format(layout.table(LEDGER_JOBS))
    ):
        doc["ledger"][st] = int(n)
        doc["ledger"]["total"] += int(n)
        doc["ledger"]["rows"] += int(rows_)
    keys = planned_jobs(run)
    q = psycopg.sql.SQL(
        "SELECT k.pair, k.month, coalesce(j.status, 'pending'), j.rows_written, j.source_bars,"
        " j.worker, j.started_at, extract(epoch FROM now() - j.heartbeat_at),"
        " extract(epoch FROM now() - j.started_at), j.attempts, j.last_error"
        " FROM unnest(%s::text[], %s::date[]) AS k(pair, month)"
        " LEFT JOIN {jobs} j ON j.pair = k.pair AND j.month = k.month ORDER BY k.pair, k.month"
    ).format(jobs=layout.table(LEDGER_JOBS))
    rows = conn.execute(q, ([k[0] for k in keys], [k[1] for k in keys])).fetchall()
    pairs: dict[str, dict[str, Any]] = {}
    bars_left = 0
    for pair, month, st, written, bars, worker, _started, hb_age, age, attempts, _err in rows:
        doc["jobs"][st] += 1
        p = pairs.setdefault(pair, {"pair": pair.upper(), "months_planned": 0, "months_done": 0,
                                    "rows": 0, "running": 0, "failed": 0})  # fmt: skip
        p["months_planned"] += 1
        if st == "done":
            p["months_done"] += 1
            p["rows"] += int(written or 0)
            doc["rows"] += int(written or 0)
        elif st == "failed":
            p["failed"] += 1
        else:
            bars_left += int(bars or 0)
        if st == "running":
            p["running"] += 1
            stale = (hb_age is not None and float(hb_age) > STALE_AFTER_S) or worker_is_dead(worker)
            job = {"pair": pair.upper(), "month": str(Month.of(month)), "worker": worker,
                   "running_s": round(float(age or 0), 1),
                   "heartbeat_age_s": None if hb_age is None else round(float(hb_age), 1),
                   "attempt": attempts, "stale": stale}  # fmt: skip
            doc["running"].append(job)
            if stale:
                doc["stale"].append(job)
    doc["jobs"]["total"] = len(keys)
    doc["pairs"] = list(pairs.values())
    # per pair: newest source bar, newest metric row and the lag between them (bqx update)
    from bqx.backfill.update import freshness

    fresh = freshness(conn, layout, pairs)
    for p in doc["pairs"]:
        p.update(
            fresh.get(p["pair"].lower(), {"newest_bar": None, "newest_metric": None, "lag_s": None})
        )
    # the run's own rate: rows it wrote over the time it has been going
    written_by_run = conn.execute(
        psycopg.sql.SQL(
            "SELECT coalesce(sum(rows_written), 0) FROM {} WHERE run_id = %s AND status = 'done'"
        ).format(layout.table(LEDGER_ATTEMPTS)),
        (run["run_id"],),
    ).fetchone()[0]
    elapsed = max(run["elapsed_s"], 1e-9)
    doc["rows_per_s"] = round(int(written_by_run) / elapsed, 1)
    unfinished = doc["jobs"]["pending"] + doc["jobs"]["running"]
    if unfinished == 0:
        doc["eta_s"] = 0.0
    elif doc["rows_per_s"] > 0:
        doc["eta_s"] = round(bars_left / doc["rows_per_s"], 1)
    doc["errors"] = [
        {"pair": p.upper(), "month": str(Month.of(m)), "status": s, "error": e,
         "at": f.isoformat(timespec="seconds")}
        for p, m, s, e, f in conn.execute(
            psycopg.sql.SQL(
                "SELECT pair, month, status, error, finished_at FROM {} WHERE error IS NOT NULL"
                " ORDER BY finished_at DESC, attempt_id DESC LIMIT %s"
            ).format(layout.table(LEDGER_ATTEMPTS)),
            (errors,),
        )
    ]  # fmt: skip
    # seconds since any job of the run last showed life (claim, heartbeat, finish): a run
    # still marked running with no activity for long has lost its driver process
    idle = conn.execute(
        psycopg.sql.SQL(
            "SELECT extract(epoch FROM now() - greatest(max(started_at), max(heartbeat_at),"
            " max(finished_at), %s::timestamptz))::float8 FROM {} WHERE run_id = %s"
        ).format(layout.table(LEDGER_JOBS)),
        (run["started_at"], run["run_id"]),
    ).fetchone()[0]
    idle = float(idle) if idle is not None else run["elapsed_s"]
    doc["run"] = {
        "run_id": run["run_id"], "status": run["status"],
        "last_activity_s": round(idle, 1),
        "stalled": run["status"] == "running" and unfinished > 0 and not any(
            not j["stale"] for j in doc["running"]) and idle > STALE_AFTER_S,
        "started_at": run["started_at"].isoformat(timespec="seconds"),
        "ended_at": run["ended_at"].isoformat(timespec="seconds") if run["ended_at"] else None,
        "elapsed_s": round(run["elapsed_s"], 1), "workers": run["workers"],
        "executor": run["executor"], "run_by": run["run_by"], "host": run["host"],
        "skipped": run["jobs_skipped"], **run_parameters(run),
    }  # fmt: skip
    return doc
