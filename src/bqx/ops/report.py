"""``bqx report``: the completion report, written from the ledger and the catalog.

Markdown for reading and diffing, and one self-contained HTML page (charts embedded as PNG
data URIs) with a pair × month coverage heatmap, throughput over time and job durations.
"""

from __future__ import annotations

import base64
import functools
import io
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from markdown_it import MarkdownIt
from markdown_it.rules_core import StateCore
from markdown_it.token import Token

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.params import Params
from bqx.core.text import plural
from bqx.db.connect import DatabaseLike
from bqx.errors import BqxError
from bqx.metrics import metric_columns
from bqx.ops.outdir import check_out_dir
from bqx.ops.status import describe_parameters, run_parameters
from bqx.ops.verify import Verification, no_run_message, verify
from bqx.store import catalog, targets
from bqx.store.ledger import Ledger

REPORT_FILES = "report.md and report.html"  # what `out` receives

StepFn = Callable[..., None]


@dataclass
class ReportData:
    run: dict[str, Any]
    layout: Layout
    pairs: list[str]
    months: list[str]
    rows: dict[tuple[str, str], int]  # (pair, month) -> rows its done job recorded
    sources: dict[tuple[str, str], int]
    statuses: dict[tuple[str, str], str]
    attempts: list[dict[str, Any]]
    verification: Verification | None
    total_rows: int = 0
    partitions: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    scope: str = "ledger"  # "ledger": every job in the ledger; "run": the run's plan only
    planned: set[tuple[str, str]] = field(default_factory=set)
    # (pair, month) -> (when it was last verified, whether it passed)
    verified: dict[tuple[str, str], tuple[str, bool]] = field(default_factory=dict)

    def headline(self) -> dict[str, Any]:
        """The verdict: COMPLETE only when the run ended done and every job of the scope is
        done and verified; else INCOMPLETE (or EMPTY: nothing planned), with the reason."""
        run, v = self.run, self.verification
        counts: dict[str, int] = {}
        for key in self.planned:
            st = self.statuses.get(key, "pending")
            counts[st] = counts.get(st, 0) + 1
        status, why = self._verdict(counts)
        return {
            "status": status, "why": why, "run_id": run["run_id"], "run_status": run["status"],
            "scope": self.scope, "jobs": {"total": len(self.planned), **counts},
            "rows": self.total_rows, **run_parameters(run),
            "verified": None if v is None else v.ok,
        }  # fmt: skip

    def _verdict(self, counts: dict[str, int]) -> tuple[str, str]:
        """The status and why, from the jobs of the scope counted by state."""
        run, v, jobs = self.run, self.verification, len(self.planned)
        not_done = jobs - counts.get("done", 0)
        if not jobs:
            return "EMPTY", f"run {run['run_id']} planned no job: nothing was computed"
        if run["status"] != "done":
            return "INCOMPLETE", _unfinished(run)
        if not_done:
            detail = ", ".join(f"{n} {st}" for st, n in sorted(counts.items()) if st != "done")
            return "INCOMPLETE", f"{not_done} of {plural(jobs, 'job')} not done ({detail})"
        if v is not None and not v.ok:
            return "INCOMPLETE", _failed_checks(v)
        return "COMPLETE", f"{plural(jobs, 'job')} done and verified"


def _unfinished(run: dict[str, Any]) -> str:
    if run["status"] == "running":
        return f"run {run['run_id']} is still marked running (or its process died)"
    return f"run {run['run_id']} ended {run['status']}"


def _failed_checks(v: Verification) -> str:
    failed = [c.name for c in v.checks if not c.ok] or ["nothing to check"]
    return "verification failed: " + ", ".join(failed)


def _recorded(
    conn: psycopg.Connection, ledger: Ledger
) -> tuple[dict[tuple[str, str], int], dict[tuple[str, str], int]]:
    """Rows and source bars per (pair, month) as the jobs recorded them: no table is counted
    (``bqx verify`` checks that the tables hold what the ledger says)."""
    rows: dict[tuple[str, str], int] = {}
    sources: dict[tuple[str, str], int] = {}
    for r in ledger.job_records(conn):
        key = (r.pair, str(Month.of(r.month)))
        sources[key] = int(r.source_bars or 0)
        if r.status == "done":
            rows[key] = int(r.rows_written or 0)
    return rows, sources


def collect(
    conn: psycopg.Connection, layout: Layout, *, run_id: int | None = None, sample: int = 20,
    verification: Verification | None = None, progress: StepFn | None = None,
    url: DatabaseLike | None = None, workers: int = 1,
) -> ReportData:  # fmt: skip
    """Everything the report states, read from the database.

    Scope (the same rule as ``bqx verify``): every job in the ledger, with the latest run that
    planned jobs for the run's own figures; with ``run_id``, that run's plan only.
    """
    step: StepFn = progress or (lambda *a, **k: None)
    step("reading the ledger")
    ledger = Ledger(layout)
    record = ledger.latest_run(conn, run_id, worked=True)  # not a no-op resume
    if record is None:
        raise BqxError(no_run_message(conn, layout, run_id))
    run = asdict(record)
    p = record.params
    layout = layout.with_source(p.get("source_table"), p.get("time_column"),
                                p.get("price_column"))  # fmt: skip
    jobs = record.planned
    if run_id is None:  # the whole ledger, as verify checks it
        jobs = sorted(set(jobs) | set(ledger.job_keys(conn)))
    pairs = sorted({j[0] for j in jobs})
    months = sorted({str(Month.of(j[1])) for j in jobs})
    planned = {(p_, str(Month.of(m))) for p_, m in jobs}
    scope = "ledger" if run_id is None else "run"
    reuse = (
        verification is not None and verification.run_id == record.run_id
        and verification.scope == scope
    )  # fmt: skip
    if not reuse:  # incremental: only the months changed since they were last verified
        verification = verify(conn, layout, sample=sample, run_id=run_id, progress=progress,
                              url=url, workers=workers)  # fmt: skip
    rows, sources = _recorded(conn, ledger)
    data = ReportData(
        run, layout, pairs, months,
        {k: v for k, v in rows.items() if k in planned},
        {k: v for k, v in sources.items() if k in planned},
        ledger.statuses(conn), ledger.attempts_of(conn, record.run_id), verification,
        scope=scope, planned=planned, verified=ledger.verification_times(conn),
    )  # fmt: skip
    data.total_rows = sum(data.rows.values())
    data.partitions = len(planned)
    data.extras["earlier_failures"] = ledger.earlier_failures(conn, record.run_id, jobs)
    _where_kept(conn, layout, ledger, record, data)
    return data


def _where_kept(
    conn: psycopg.Connection, layout: Layout, ledger: Ledger, record: Any, data: ReportData
) -> None:
    """The months present and the queries to check them, from the database's partitions or,
    for pairs kept in a Delta sink (recorded per pair), from the table."""
    pairs, planned = data.pairs, data.planned
    sinks = {p: d["sink"] for p, d in ledger.recorded_params(conn, pairs).items() if d.get("sink")}
    attached = catalog.attached_partitions(conn, layout)
    data.extras["partitions_present"] = sum(
        1 for p_, m in planned
        if p_ not in sinks and layout.target_partition_name(p_, Month.parse(m)) in attached
    ) + _lake_months(conn, layout, record, sinks, planned)  # fmt: skip
    queries = targets.check_queries(layout, [p for p in pairs if p not in sinks])
    for sink in sorted(set(sinks.values())):
        queries += targets.lake_check_queries(sink)
    data.extras["check_queries"] = queries + ledger.check_queries(record.run_id)
    data.extras["sinks"] = [(k, sorted(p for p in sinks if sinks[p] == k))
                            for k in sorted(set(sinks.values()))]  # fmt: skip


def _lake_months(
    conn: psycopg.Connection, layout: Layout, record: Any, sinks: dict[str, str],
    planned: set[tuple[str, str]],
) -> int:  # fmt: skip
    """How many planned months of the pairs in Delta sinks have their files, all present."""
    from bqx.pipeline.plan import default_destination

    found = 0
    for sink in set(sinks.values()):
        params = replace(Params.recorded(record.params, layout, Params()), sink=sink)
        keys = [(p, Month.parse(m)) for p, m in sorted(planned) if sinks.get(p) == sink]
        states = default_destination(params).month_states(conn, params, keys)
        found += sum(1 for k in keys if states.get(k) != "missing")
    return found


# -- figures ----------------------------------------------------------------------------------


def _attempts(d: ReportData, status: str) -> list[dict[str, Any]]:
    return [a for a in d.attempts if a["status"] == status]


def _share(part: float, whole: float) -> float:
    """``part / whole``, or 0 when there is nothing to divide by."""
    return part / whole if whole > 0 else 0.0


def _summary(d: ReportData) -> dict[str, Any]:
    run = d.run
    done_here, failed = _attempts(d, "done"), _attempts(d, "failed")
    written = sum(a["rows_written"] or 0 for a in done_here)
    duration = float(run["elapsed_s"])
    done_total = sum(1 for k in d.planned if d.statuses.get(k) == "done")
    return {
        "jobs_done": done_total, "jobs_total": d.partitions, "jobs_run": len(done_here),
        "jobs_skipped": run["jobs_skipped"], "jobs_failed": len({(a["pair"], a["month"])
        for a in failed}), "rows": d.total_rows, "rows_written": written,
        "start": run["started_at"], "end": run["ended_at"], "duration_s": duration,
        "rows_per_s": _share(written, duration),
        "error_rate": _share(len(failed), len(d.attempts)),
        "attempts": len(d.attempts),
    }  # fmt: skip


def _durations(d: ReportData) -> list[float]:
    return [float(a["duration_s"]) for a in _attempts(d, "done")]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


# -- charts -----------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _pyplot() -> Any:
    """matplotlib's pyplot, drawing off screen."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _no_data(ax: Any, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes)


def charts(d: ReportData) -> dict[str, str]:
    """The three charts as PNG data URIs: coverage heatmap, throughput, job durations."""
    plt = _pyplot()
    return {
        "coverage": _coverage_chart(d, plt),
        "throughput": _throughput_chart(d, plt),
        "durations": _durations_chart(d, plt),
    }


def _coverage_chart(d: ReportData, plt: Any) -> str:
    """Pair × month: colour = target rows / source bars, text = rows (or the job's state)."""
    if not d.pairs or not d.months:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        _no_data(ax, "no job planned: nothing to show")
        ax.set_axis_off()
        ax.set_title("Coverage: target rows / source bars")
        return _png(fig)
    cover = np.array([[d.rows.get((p, m), 0) / d.sources[(p, m)] if d.sources.get((p, m)) else
                       np.nan for m in d.months] for p in d.pairs])  # fmt: skip
    fig, ax = plt.subplots(
        figsize=(max(4.5, 0.75 * len(d.months) + 2.5), max(2.5, 0.3 * len(d.pairs) + 1.2))
    )
    cmap = plt.get_cmap("RdYlGn").with_extremes(bad="#dddddd")  # grey: no source bars
    im = ax.imshow(cover, vmin=0, vmax=1, cmap=cmap, aspect="auto")
    ax.set_xticks(range(len(d.months)), d.months, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(d.pairs)), [p.upper() for p in d.pairs], fontsize=8)
    ax.set_xticks(np.arange(len(d.months) + 1) - 0.5, minor=True)
    ax.set_yticks(np.arange(len(d.pairs) + 1) - 0.5, minor=True)
    ax.grid(which="minor", color="white", linewidth=1)
    ax.tick_params(which="minor", length=0)
    if len(d.pairs) * len(d.months) <= 400:
        _label_cells(ax, d, cover)
    ax.set_title("Coverage: target rows / source bars (cells: rows)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return _png(fig)


def _label_cells(ax: Any, d: ReportData, cover: np.ndarray) -> None:
    """Each cell's rows in thousands, or the job's state when it is not done."""
    size = 7 if len(d.months) <= 12 else 5
    for i, p in enumerate(d.pairs):
        for j, m in enumerate(d.months):
            state = d.statuses.get((p, m))
            if state is None:  # no job: the month has no bars for this pair
                state = "pending" if d.sources.get((p, m)) else "no bars"
            text = f"{d.rows.get((p, m), 0) / 1000:.1f}k" if state == "done" else state
            dark = not np.isnan(cover[i, j]) and not 0.15 <= cover[i, j] <= 0.85
            # white on the dark green and dark red ends of the scale
            ax.text(j, i, text, ha="center", va="center", fontsize=size,
                    color="white" if dark else "black")  # fmt: skip


def _throughput_chart(d: ReportData, plt: Any) -> str:
    """Rows/s as the workers produced them, and the rows written so far."""
    done = [a for a in _attempts(d, "done") if a["finished_at"] is not None]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    if done:
        t0 = min(min(a["started_at"] for a in done), d.run["started_at"])
        spans = [((a["started_at"] - t0).total_seconds(), (a["finished_at"] - t0).total_seconds(),
                  a["rows_written"] or 0) for a in done]  # fmt: skip
        _plot_throughput(ax, spans, bins=min(40, max(8, len(done) // 3)))
    else:
        _no_data(ax, "no job ran in this run")
    ax.set_title("Throughput over time")
    ax.grid(alpha=0.3)
    return _png(fig)


def _rates(spans: list[tuple[float, float, int]], bins: int) -> tuple[np.ndarray, np.ndarray]:
    """Bin edges (seconds) and rows per bin: each job's rows spread evenly over its own run
    time, summed per bin, so the curve shows when rows were made, not only when jobs
    committed."""
    end = max(e for _, e, _ in spans) or 1.0
    edges = np.linspace(0.0, end, bins + 1)
    rows = np.zeros(bins)
    for s, e, n in spans:
        e = max(e, s + 1e-6)
        overlap = np.clip(np.minimum(edges[1:], e) - np.maximum(edges[:-1], s), 0, None)
        rows += n * overlap / (e - s)
    return edges, rows


def _plot_throughput(ax: Any, spans: list[tuple[float, float, int]], bins: int) -> None:
    """Bars of rows/s per time bin; on a second axis, the rows written as jobs finished."""
    import matplotlib.ticker

    edges, rows = _rates(spans, bins)
    width = edges[1] - edges[0]
    ax.bar(edges[:-1], rows / width, width=width, align="edge", color="#4c72b0", alpha=0.8,
           label="rows/s")  # fmt: skip
    ax.set_ylabel("rows/s")
    ax.yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    ax.set_xlabel("seconds since the run started")
    ax2 = ax.twinx()
    finish = sorted((e, n) for _, e, n in spans)
    ax2.plot([0.0] + [e for e, _ in finish], np.cumsum([0] + [n for _, n in finish]) / 1e6,
             color="#dd8452", drawstyle="steps-post", label="rows written (M)")  # fmt: skip
    ax2.set_ylabel("rows written (millions)")
    ax2.set_ylim(bottom=0)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, ["rows/s", "rows written (M)"], loc="upper left", fontsize=8)


def _durations_chart(d: ReportData, plt: Any) -> str:
    """A histogram of the done jobs' durations, with p50 and p90 marked."""
    fig, ax = plt.subplots(figsize=(8, 3.2))
    durations = _durations(d)
    if durations:
        ax.hist(durations, bins=min(40, max(5, len(durations) // 4)), color="#4c72b0")
        for q, style in ((50, "-"), (90, "--")):
            v = _pct(durations, q)
            ax.axvline(v, color="#c44e52", linestyle=style, label=f"p{q} {v:.2f} s")
        ax.legend(fontsize=8)
    else:
        _no_data(ax, "no job ran in this run")
    ax.set_xlabel("job duration (s)")
    ax.set_ylabel("jobs")
    ax.set_title(f"Job durations ({len(durations)} jobs)")
    return _png(fig)


# -- Markdown ---------------------------------------------------------------------------------


def _fmt_time(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else "—"


def _section(title: str, body: list[str]) -> list[str]:
    """A ``##`` section: its heading, a blank line, the body and a blank line."""
    return [f"## {title}", "", *body, ""]


def markdown(d: ReportData) -> str:
    """The report as Markdown: a heading block, then one section after the other."""
    s = _summary(d)
    lines = [
        *_md_title(d), *_md_summary(s), *_md_pairs(d, s), *_md_database(d), *_md_months(d),
        *_md_verification(d.verification), *_md_technical(d), *_md_performance(d, s),
        *_md_failures(d), *_md_check_sql(d),
        f"*Written by bqx from the ledger and the catalog on {_fmt_time(datetime.now(UTC))}.*",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def _md_title(d: ReportData) -> list[str]:
    head = d.headline()
    scope = (
        f"every job in the ledger ({plural(d.partitions, 'job')}); run figures from run"
        f" {d.run['run_id']}" if d.scope == "ledger"
        else f"the jobs planned by run {d.run['run_id']} ({plural(d.partitions, 'job')})"
    )  # fmt: skip
    return [
        "# BQX Backfill Completion Report", "",
        f"**Run:** {d.run['run_id']} ({d.run['status']}) · **Status:** {head['status']}"
        f" · **Schema:** `{d.layout.schema}`", "",
        f"**Status:** {head['status']}: {head['why']}.", "",
        f"**Parameters:** {describe_parameters(run_parameters(d.run))}.", "",
        f"**Scope:** {scope}.", "",
    ]  # fmt: skip


def _md_summary(s: dict[str, Any]) -> list[str]:
    return _section("Summary", [
        "| Figure | Value |", "|---|---|",
        f"| Jobs | {s['jobs_done']}/{s['jobs_total']} done ({s['jobs_run']} in this run,"
        f" {s['jobs_skipped']} already done and skipped, {s['jobs_failed']} failed) |",
        f"| Rows in target partitions (exact `count(*)`) | {s['rows']:,} |",
        f"| Rows written by this run | {s['rows_written']:,} |",
        f"| Start | {_fmt_time(s['start'])} |", f"| End | {_fmt_time(s['end'])} |",
        f"| Duration | {s['duration_s']:.1f} s ({s['duration_s'] / 60:.2f} min) |",
        f"| Throughput | {s['rows_per_s']:,.0f} rows/s |",
        f"| Error rate | {s['error_rate']:.1%} of {s['attempts']} attempts |",
    ])  # fmt: skip


def _md_pairs(d: ReportData, s: dict[str, Any]) -> list[str]:
    return _section("Per-pair completion", [
        "| Pair | Rows | Months | Status |", "|---|---:|---:|---|",
        *(_pair_row(d, pair) for pair in d.pairs),
        f"| **Total** | **{s['rows']:,}** | | **{len(d.pairs)} pairs** |",
    ])  # fmt: skip


def _pair_row(d: ReportData, pair: str) -> str:
    keys = [(pair, m) for m in d.months if (pair, m) in d.sources or (pair, m) in d.rows]
    done = sum(1 for k in keys if d.statuses.get(k) == "done")
    rows = sum(d.rows.get(k, 0) for k in keys)
    state = "complete" if done == len(keys) else f"INCOMPLETE: {len(keys) - done} not done"
    return f"| {pair.upper()} | {rows:,} | {done}/{len(keys)} | {state} |"


def _md_database(d: ReportData) -> list[str]:
    per_part = [d.rows.get(k, 0) for k in d.sources]
    return _section("Database verification", [
        f"- Partitions planned: {d.partitions} ({len(d.pairs)} pairs × months with source bars)",
        f"- Partitions present in the catalog: {d.extras.get('partitions_present', 0)}"
        f" of {d.partitions}; empty: {sum(1 for k in d.sources if not d.rows.get(k))}",
        f"- Rows in partitions (as the jobs recorded them; `bqx verify` checks the tables"
        f" hold them): {d.total_rows:,}",
        f"- Source bars in the same months: {sum(d.sources.values()):,}",
        f"- Rows per partition: min {min(per_part, default=0):,}, average"
        f" {_share(sum(per_part), len(per_part)):,.0f}, max {max(per_part, default=0):,}",
    ])  # fmt: skip


def _md_months(d: ReportData) -> list[str]:
    return _section("Per-month distribution", [
        "| Month | Partitions | Rows | Average rows per partition | Last verified |",
        "|---|---:|---:|---:|---|",
        *(_month_row(d, m) for m in d.months),
    ])  # fmt: skip


def _month_row(d: ReportData, month: str) -> str:
    counts = [d.rows.get((p, month), 0) for p in d.pairs if (p, month) in d.sources]
    avg = _share(sum(counts), len(counts))
    return (
        f"| {month} | {len(counts)} | {sum(counts):,} | {avg:,.0f} | {_last_verified(d, month)} |"
    )


def _last_verified(d: ReportData, month: str) -> str:
    """The oldest verification of the month's partitions (all of them must have passed to
    count), or why not."""
    seen = [d.verified.get((p, month)) for p in d.pairs if (p, month) in d.planned]
    if not seen or any(v is None for v in seen):
        return "not verified"
    failed = sum(1 for v in seen if v is not None and not v[1])
    if failed:
        return f"FAILED ({failed} of {len(seen)} partitions)"
    return min(v[0] for v in seen if v is not None).replace("T", " ")[:16] + " UTC"


def _md_verification(v: Verification | None) -> list[str]:
    if v is None:
        body = ["Not run."]
    elif v.nothing_to_check:
        body = [f"Nothing to check: {v.nothing_to_check}."]
    else:
        body = ["| Check | Result | Detail |", "|---|---|---|"] + [
            f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.detail} |" for c in v.checks
        ]
    return _section("Verification (`bqx verify`)", body)


def _md_technical(d: ReportData) -> list[str]:
    p = d.run["params"]
    windows = sorted(p["windows"])
    src = p.get("source_table", "m1_{pair}")
    fill = f", max fill {p.get('max_fill')} min" if p.get("mode") == "clock" else ""
    return _section("Technical details", [
        f"- Workers: {d.run['workers']} ({d.run['executor']} executor), run by"
        f" {d.run['run_by']} on {d.run['host']}",
        f"- Windows: {', '.join(map(str, windows))} ({p.get('mode', 'bars')} mode{fill})",
        f"- Metrics per row: {3 + len(metric_columns(windows))} fields (3 core +"
        f" {6 * len(windows)} window + 7 aggregates)",
        f"- Source tables: `{src if '.' in src else d.layout.schema + '.' + src}`"
        f" (time `{p.get('time_column')}`, price `{p.get('price_column')}`)",
        *_target_lines(d.layout, d.extras.get("sinks", [])),
    ])  # fmt: skip


def _target_lines(layout: Layout, sinks: list[tuple[str, list[str]]]) -> list[str]:
    lines = []
    for sink, pairs in sinks:
        lines += [f"- Target of {', '.join(p.upper() for p in pairs)}: the Delta table"
                  f" `{sink}`, partitioned by `pair` and `month` (docs/lake.md); the ledger in"
                  " PostgreSQL; one Delta commit per (pair, month) job (an overwrite of its"
                  " partition), inside the transaction that marks the job done"]  # fmt: skip
    return lines + [f"- Target tables: `{layout.schema}.bqx_{{pair}}`, monthly partitions"
            " `bqx_{pair}_{YYYY}m{MM}`, primary key `ts_utc`",
            "- Writes: one transaction per (pair, month) job: TRUNCATE partition, binary COPY,"
            " ledger update"]  # fmt: skip


def _md_performance(d: ReportData, s: dict[str, Any]) -> list[str]:
    durations = _durations(d)
    busy = sum(durations)
    per_worker = f", {s['rows_written'] / busy:,.0f} rows/s per busy worker" if busy > 0 else ""
    return _section("Performance", [
        f"- Job durations (s): min {min(durations, default=0):.2f}, median"
        f" {statistics.median(durations) if durations else 0:.2f}, p90 {_pct(durations, 90):.2f},"
        f" max {max(durations, default=0):.2f} over {len(durations)} jobs",
        f"- Throughput: {s['rows_per_s']:,.0f} rows/s over the run{per_worker}",
        f"- Busy time: {busy:.1f} s of job work in {s['duration_s']:.1f} s of wall time"
        f" with {d.run['workers']} workers (average parallelism"
        f" {_share(busy, s['duration_s']):.2f})",
    ])  # fmt: skip


def _md_failures(d: ReportData) -> list[str]:
    bad = [a for a in d.attempts if a["status"] != "done"]
    body = ["None: every job succeeded at its first attempt."] if not bad else [
        "| Pair | Month | Attempt | Outcome | Error |", "|---|---|---:|---|---|",
        *(_failure_row(a) for a in bad),
    ]  # fmt: skip
    earlier = d.extras.get("earlier_failures", [])
    if earlier:
        body += [
            "", f"Before this run, the same jobs failed or were retried ({len(earlier)} attempts,"
            " newest first):", "",
            "| Run | Pair | Month | Attempt | Outcome | Error |", "|---:|---|---|---:|---|---|",
            *(f"| {a['run_id']} {_failure_row(a)}" for a in earlier),
        ]  # fmt: skip
    return _section("Failures and retries", body)


def _failure_row(a: dict[str, Any]) -> str:
    err = (a["error"] or "").replace("|", "\\|")
    return (
        f"| {a['pair'].upper()} | {Month.of(a['month'])} | {a['attempt']} | {a['status']} | {err} |"
    )


def _md_check_sql(d: ReportData) -> list[str]:
    lines = ["```sql"]
    for what, query in d.extras.get("check_queries", []):
        lines += [f"-- {what}", query]
    return _section("Check it yourself", [*lines, "```"])


# -- HTML -------------------------------------------------------------------------------------

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#222;line-height:1.45;padding:0 1rem}
table{border-collapse:collapse;margin:.5rem 0 1.2rem}
td,th{border:1px solid #ddd;padding:.3rem .6rem}
th{background:#f4f4f4}td{text-align:left}td:not(:last-child){white-space:nowrap}td.num{text-align:right;font-variant-numeric:tabular-nums}
h1{border-bottom:2px solid #333}h2{margin-top:2rem}
code,pre{background:#f6f8fa;border-radius:4px}pre{padding:.8rem;overflow-x:auto}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
.fail{color:#b00020;font-weight:600}.pass{color:#1b7f3b;font-weight:600}
"""

# the words of a verdict, coloured on the page
_VERDICTS = {"PASS": "pass", "COMPLETE": "pass", "FAIL": "fail", "INCOMPLETE": "fail",
             "EMPTY": "fail"}  # fmt: skip
_VERDICT_RE = re.compile(r"\b(" + "|".join(_VERDICTS) + r")\b")


def _numeric_cells(state: StateCore) -> None:
    """Cells of a ``---:`` column: class ``num`` on the data cells instead of an inline style
    (the stylesheet right-aligns them with tabular figures); headers keep the default."""
    for token in state.tokens:
        if token.type in ("th_open", "td_open") and token.attrs.get("style") == "text-align:right":
            del token.attrs["style"]
            if token.type == "td_open":
                token.attrs["class"] = "num"


def _verdict_spans(state: StateCore) -> None:
    """PASS / COMPLETE as ``<span class="pass">``, FAIL / INCOMPLETE / EMPTY as ``fail``, in
    the text of every paragraph, heading, list item and table cell (not in code)."""
    for token in state.tokens:
        if token.type == "inline" and token.children:
            token.children = [t for child in token.children for t in _split_verdicts(child)]


def _split_verdicts(token: Token) -> list[Token]:
    if token.type != "text" or not _VERDICT_RE.search(token.content):
        return [token]
    out = []
    for i, part in enumerate(_VERDICT_RE.split(token.content)):
        if i % 2:  # a verdict word (the pattern's group)
            out += [
                Token("span_open", "span", 1, attrs={"class": _VERDICTS[part]}),
                Token("text", "", 0, content=part),
                Token("span_close", "span", -1),
            ]
        elif part:
            out.append(Token("text", "", 0, content=part))
    return out


@functools.cache
def _markdown_it() -> MarkdownIt:
    """CommonMark with GFM tables; HTML in the source is escaped, since error messages in the
    report come from the database and from files."""
    md = MarkdownIt("commonmark", {"html": False}).enable("table")
    md.core.ruler.push("bqx_numeric_cells", _numeric_cells)
    md.core.ruler.push("bqx_verdict_spans", _verdict_spans)
    return md


def _md_to_html(md: str) -> str:
    return _markdown_it().render(md)


def html_page(d: ReportData, md: str) -> str:
    figs = charts(d)
    body = _md_to_html(md)
    figures = (
        "<h2>Charts</h2>\n"
        f'<img id="coverage" alt="pair x month coverage heatmap" src="{figs["coverage"]}">\n'
        f'<img id="throughput" alt="throughput over time" src="{figs["throughput"]}">\n'
        f'<img id="durations" alt="job duration distribution" src="{figs["durations"]}">\n'
    )
    # charts go right after the summary section
    marker = "<h2>Per-pair completion</h2>"
    body = body.replace(marker, figures + marker, 1)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>BQX backfill report, run {d.run['run_id']}</title><style>{_CSS}</style>"
        f"</head><body>\n{body}\n</body></html>\n"
    )


def write_report(
    conn: psycopg.Connection, layout: Layout, out_dir: Path, *, run_id: int | None = None,
    sample: int = 20, verification: Verification | None = None,
    progress: StepFn | None = None, url: DatabaseLike | None = None, workers: int = 1,
) -> tuple[Path, Path, ReportData]:  # fmt: skip
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return their paths and data.

    ``verification``: a result of ``bqx.verify`` for the same scope, to reuse instead of
    verifying again. ``progress(stage, done, total, item)`` is called as the work goes.
    """
    check_out_dir(out_dir, REPORT_FILES)
    step: StepFn = progress or (lambda *a, **k: None)
    data = collect(conn, layout, run_id=run_id, sample=sample, verification=verification,
                   progress=progress, url=url, workers=workers)  # fmt: skip
    step("writing report.md")
    md = markdown(data)
    step("drawing the charts")
    page = html_page(data, md)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(md)
    html_path.write_text(page)
    return md_path, html_path, data
