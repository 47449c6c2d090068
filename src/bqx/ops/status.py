"""``bqx status``: where a backfill stands, read from the ledger (never from log files).

Works at any moment, from any machine that reaches the database: while a run is going on in
another terminal, after it ended, or before any run (all zeros).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from typing import Any

import psycopg

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.params import Params
from bqx.core.text import format_eta, plural
from bqx.pipeline.plan import default_destination, outstanding
from bqx.sources.parquet import lake_bars
from bqx.store import bars, catalog, targets
from bqx.store.ledger import STALE_AFTER_S, JobRecord, Ledger, RunRecord


def run_parameters(run: RunRecord | dict[str, Any]) -> dict[str, Any]:
    """The parameters that shape a run's results: mode, windows (and max_fill in clock mode)."""
    p = run.params if isinstance(run, RunRecord) else run["params"]
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


@dataclass
class PairStatus:
    pair: str  # as shown: upper case
    months_planned: int = 0
    months_done: int = 0
    rows: int = 0
    running: int = 0
    failed: int = 0
    newest_bar: str | None = None
    newest_metric: str | None = None
    lag_s: float | None = None
    # months a plain backfill would do now (None: the source is not versioned by bqx, so
    # only reading every bar could tell); current when none and the metrics reach the bars
    outstanding: int | None = None
    current: bool | None = None
    note: str | None = None


@dataclass
class RunningJob:
    pair: str
    month: str
    worker: str | None
    running_s: float
    heartbeat_age_s: float | None
    attempt: int
    stale: bool


@dataclass
class Status:
    """Progress of the latest run with jobs, and the whole ledger: ``bqx status --json``."""

    jobs: dict[str, int] = field(
        default_factory=lambda: {"total": 0, "done": 0, "running": 0, "failed": 0, "pending": 0}
    )
    rows: int = 0
    rows_per_s: float = 0.0
    eta_s: float | None = None
    pairs: list[PairStatus] = field(default_factory=list)
    running: list[RunningJob] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)
    run: dict[str, Any] | None = None
    ledger: dict[str, int] | None = None
    as_of: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    @property
    def stale(self) -> list[RunningJob]:
        return [j for j in self.running if j.stale]

    def as_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["stale"] = [asdict(j) for j in self.stale]
        return doc

    def line(self, now: str) -> str:
        """One line per refresh for logs (``status --watch`` when not on a terminal)."""
        jobs, run = self.jobs, self.run
        if run is None:
            return f"{now} no backfill run recorded yet"
        eta = "finished" if run["status"] != "running" else f"ETA {format_eta(self.eta_s)}"
        return (
            f"{now} run {run['run_id']} {run['status']} · jobs {jobs['done']}/{jobs['total']}"
            f" done, {jobs['running']} running, {jobs['failed']} failed, {jobs['pending']}"
            f" pending · {plural(self.rows, 'row')} · {self.rows_per_s:,.0f} rows/s · {eta}"
            + (f" · {len(self.stale)} stale" if self.stale else "")
        )

    def ended(self) -> int | None:
        """For ``--until-done``: None while the run goes on; else 0 when all its jobs are
        done, 1 when not (failed, interrupted, or stalled with its driver gone)."""
        run, jobs = self.run, self.jobs
        if run is not None and run.get("stalled"):
            return 1  # marked running, yet its driver is gone: it will not end by itself
        if run is None or run["status"] == "running":
            return None
        ok = run["status"] == "done" and jobs["failed"] == 0 and jobs["done"] == jobs["total"]
        return 0 if ok else 1


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.astimezone(UTC).isoformat()


def pair_params(conn: psycopg.Connection, layout: Layout, pairs: list[str]) -> dict[str, Params]:
    """The parameters each pair's metrics were last computed with (defaults when none)."""
    default = Params.build(layout, Params().windows, "bars", 5)
    recorded = Ledger(layout).pair_params(conn)
    return {
        pair: default if pair not in recorded else Params.recorded(recorded[pair], layout, default)
        for pair in pairs
    }


def freshness(
    conn: psycopg.Connection, layout: Layout, pairs: list[str]
) -> dict[str, tuple[str | None, str | None, float | None]]:
    """Per pair: newest source bar, newest metric row and the lag between them."""
    # which tables exist: one catalog query per source layout, not two per pair
    sources: dict[Layout, set[str]] = {}
    have_target = set(catalog.target_pairs(conn, layout))
    out = {}
    for pair, params in pair_params(conn, layout, pairs).items():
        lake = lake_bars(params)  # bars from Parquet or Delta: their files' statistics
        if lake is not None:
            if pair not in lake.listing():
                continue
            bar = lake.newest(pair)
        else:
            if params.layout not in sources:
                sources[params.layout] = set(catalog.source_pairs(conn, params.layout))
            if pair not in sources[params.layout]:
                continue
            bar = bars.newest_bar(conn, params.layout, pair)
        if params.sink:  # a Delta sink: the newest time its log's statistics give
            metric = default_destination(params).newest(pair)  # type: ignore[attr-defined]
        elif pair in have_target:
            metric = targets.newest(conn, layout, pair)
        else:
            metric = None
        lag = None if bar is None or metric is None else max(0.0, (bar - metric).total_seconds())
        out[pair] = (_iso(bar), _iso(metric), lag)
    return out


def _currency(conn: psycopg.Connection, p: PairStatus, params: Params, has_bars: bool) -> None:
    """Whether the pair's metrics are exactly its bars' now, as a plain backfill would see;
    ``has_bars``: its source exists (as ``freshness`` found it)."""
    todo = (
        outstanding(conn, params, default_destination(params), p.pair.lower())
        if has_bars else None
    )  # fmt: skip
    if todo is None:
        p.note = (
            "source not versioned by bqx: `bqx backfill --dry-run --source-check exact`"
            " compares it bar by bar"
        )
        return
    p.outstanding = len(todo)
    beyond = p.newest_metric is not None and (p.newest_bar or "") < p.newest_metric
    p.current = not todo and not beyond
    bare = [str(d.job.month) for d in todo if not d.job.source_bars and d.target.state == "ok"]
    if beyond:
        p.note = "metrics without bars beyond the newest bar: run `bqx backfill`"
    elif bare:
        p.note = f"metrics without bars in {', '.join(bare)}: run `bqx backfill`"
    elif todo:
        reasons = sorted({d.reason for d in todo})
        p.note = f"{plural(len(todo), 'month')} to do ({', '.join(reasons)}): run `bqx backfill`"


def _pairs(conn: psycopg.Connection, layout: Layout, records: list[JobRecord]) -> list[PairStatus]:
    """Every pair the ledger holds (the whole store, not only the latest run's pairs)."""
    pairs: dict[str, PairStatus] = {}
    for r in records:
        p = pairs.setdefault(r.pair, PairStatus(r.pair.upper()))
        p.months_planned += 1
        p.months_done += r.status == "done"
        p.rows += int(r.rows_written or 0) if r.status == "done" else 0
        p.failed += r.status == "failed"
        p.running += r.status == "running"
    fresh = freshness(conn, layout, list(pairs))  # a pair without a source is left out
    for pair, params in pair_params(conn, layout, list(pairs)).items():
        p = pairs[pair]
        p.newest_bar, p.newest_metric, p.lag_s = fresh.get(pair, (None, None, None))
        _currency(conn, p, params, pair in fresh)
    return list(pairs.values())


def _jobs(doc: Status, records: list[JobRecord]) -> int:
    """Count the latest run's jobs per status; the source bars still to compute."""
    bars_left = 0
    for r in records:
        doc.jobs[r.status] += 1
        if r.status == "done":
            doc.rows += int(r.rows_written or 0)
        elif r.status != "failed":
            bars_left += int(r.source_bars or 0)
        if r.status == "running":
            doc.running.append(
                RunningJob(
                    r.pair.upper(),
                    str(Month.of(r.month)),
                    r.worker,
                    round(float(r.running_s or 0), 1),
                    None if r.heartbeat_age_s is None else round(r.heartbeat_age_s, 1),
                    r.attempts,
                    r.stale,
                )  # fmt: skip
            )
    doc.jobs["total"] = len(records)
    return bars_left


def status(conn: psycopg.Connection, layout: Layout, *, errors: int = 10) -> Status:
    """Progress of the latest run with jobs, read from the ledger."""
    doc = Status()
    ledger = Ledger(layout)
    run = ledger.latest_run(conn, worked=True)  # a no-op resume does not hide the real run
    if run is None:
        return doc
    # every job the ledger holds, whichever run planned it (the latest run may cover a subset)
    doc.ledger = ledger.totals(conn)
    bars_left = _jobs(doc, ledger.job_records(conn, run.planned))
    doc.pairs = _pairs(conn, layout, ledger.job_records(conn))
    # the run's own rate: rows it wrote over the time it has been going
    doc.rows_per_s = round(ledger.rows_written_by(conn, run.run_id) / max(run.elapsed_s, 1e-9), 1)
    unfinished = doc.jobs["pending"] + doc.jobs["running"]
    if unfinished == 0:
        doc.eta_s = 0.0
    elif doc.rows_per_s > 0:
        doc.eta_s = round(bars_left / doc.rows_per_s, 1)
    doc.errors = ledger.recent_errors(conn, errors)
    doc.run = _run_doc(conn, ledger, run, doc, unfinished)
    return doc


def _run_doc(
    conn: psycopg.Connection, ledger: Ledger, run: RunRecord, doc: Status, unfinished: int
) -> dict[str, Any]:
    # seconds since any job of the run last showed life (claim, heartbeat, finish): a run
    # still marked running with no activity for long has lost its driver process
    idle = ledger.last_activity_s(conn, run.run_id, run.started_at)
    idle = idle if idle is not None else run.elapsed_s
    stalled = (
        run.status == "running" and unfinished > 0
        and not any(not j.stale for j in doc.running) and idle > STALE_AFTER_S
    )  # fmt: skip
    return {
        "run_id": run.run_id, "status": run.status, "last_activity_s": round(idle, 1),
        "stalled": stalled, "started_at": run.started_at.isoformat(timespec="seconds"),
        "ended_at": run.ended_at.isoformat(timespec="seconds") if run.ended_at else None,
        "elapsed_s": round(run.elapsed_s, 1), "workers": run.workers,
        "executor": run.executor, "run_by": run.run_by, "host": run.host,
        "skipped": run.jobs_skipped, **run_parameters(run),
    }  # fmt: skip
