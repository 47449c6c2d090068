"""``bqx report``: the completion report, written from the ledger and the catalog.

Markdown for reading and diffing, and one self-contained HTML page (charts embedded as PNG
data URIs) with a pair × month coverage heatmap, throughput over time and job durations.
"""

from __future__ import annotations

import base64
import html
import io
import os
import re
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.text import plural
from bqx.errors import BqxError
from bqx.metrics import metric_columns
from bqx.ops.status import describe_parameters, run_parameters
from bqx.ops.verify import Verification, no_run_message, verify
from bqx.store import bars, catalog, targets
from bqx.store.ledger import Ledger

StepFn = Callable[..., None]


@dataclass
class ReportData:
    run: dict[str, Any]
    layout: Layout
    pairs: list[str]
    months: list[str]
    rows: dict[tuple[str, str], int]  # (pair, month) -> exact count(*)
    sources: dict[tuple[str, str], int]
    statuses: dict[tuple[str, str], str]
    attempts: list[dict[str, Any]]
    verification: Verification | None
    total_rows: int = 0
    partitions: int = 0
    extras: dict[str, Any] = field(default_factory=dict)
    scope: str = "ledger"  # "ledger": every job in the ledger; "run": the run's plan only
    planned: set[tuple[str, str]] = field(default_factory=set)

    def headline(self) -> dict[str, Any]:
        """The verdict: COMPLETE only when the run ended done and every job of the scope is
        done and verified; else INCOMPLETE (or EMPTY: nothing planned), with the reason."""
        run, v = self.run, self.verification
        counts: dict[str, int] = {}
        for key in self.planned:
            st = self.statuses.get(key, "pending")
            counts[st] = counts.get(st, 0) + 1
        not_done = len(self.planned) - counts.get("done", 0)
        if not self.planned:
            status, why = "EMPTY", f"run {run['run_id']} planned no job: nothing was computed"
        elif run["status"] != "done":
            status = "INCOMPLETE"
            why = (
                f"run {run['run_id']} is still marked running (or its process died)"
                if run["status"] == "running"
                else f"run {run['run_id']} ended {run['status']}"
            )
        elif not_done:
            detail = ", ".join(f"{n} {st}" for st, n in sorted(counts.items()) if st != "done")
            status, why = (
                "INCOMPLETE",
                f"{not_done} of {plural(len(self.planned), 'job')} not done ({detail})",
            )
        elif v is not None and not v.ok:
            failed = [c.name for c in v.checks if not c.ok]
            status, why = (
                "INCOMPLETE",
                "verification failed: " + ", ".join(failed or ["nothing to check"]),
            )
        else:
            status, why = "COMPLETE", f"{plural(len(self.planned), 'job')} done and verified"
        return {
            "status": status, "why": why, "run_id": run["run_id"], "run_status": run["status"],
            "scope": self.scope, "jobs": {"total": len(self.planned), **counts},
            "rows": self.total_rows, **run_parameters(run),
            "verified": None if v is None else v.ok,
        }  # fmt: skip


def collect(
    conn: psycopg.Connection, layout: Layout, *, run_id: int | None = None, sample: int = 20,
    verification: Verification | None = None, progress: StepFn | None = None,
) -> ReportData:  # fmt: skip
    """Everything the report states, read from the database.

    Scope (the same rule as ``bqx verify``): every job in the ledger, with the latest run that
    planned jobs for the run's own figures; with ``run_id``, that run's plan only.
    """
    step: StepFn = progress or (lambda *a, **k: None)
    step("reading the ledger")
    ledger = Ledger(layout)
    record = ledger.latest_run(conn, run_id)
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
    rows: dict[tuple[str, str], int] = {}
    sources: dict[tuple[str, str], int] = {}
    for i, pair in enumerate(pairs):
        step("counting rows", i, len(pairs), pair.upper())
        if catalog.has_source(conn, layout, pair):
            for m, n in bars.month_counts(conn, layout, pair).items():
                sources[(pair, str(m))] = n
        if not catalog.has_target(conn, layout, pair):
            continue  # a dropped target: every month of the pair reads 0 rows
        for m, n in targets.month_counts(conn, layout, pair).items():
            rows[(pair, str(m))] = n
    planned = {(p_, str(Month.of(m))) for p_, m in jobs}
    scope = "ledger" if run_id is None else "run"
    reuse = (
        verification is not None and verification.run_id == record.run_id
        and verification.scope == scope
    )  # fmt: skip
    data = ReportData(
        run, layout, pairs, months,
        {k: v for k, v in rows.items() if k in planned},
        {k: v for k, v in sources.items() if k in planned},
        ledger.statuses(conn), ledger.attempts_of(conn, record.run_id),
        verification if reuse else verify(conn, layout, sample=sample, run_id=run_id,
                                          progress=progress),
        scope=scope, planned=planned,
    )  # fmt: skip
    data.total_rows = sum(data.rows.values())
    data.partitions = len(planned)
    attached = catalog.attached_partitions(conn, layout)
    data.extras["partitions_present"] = sum(
        1 for p_, m in planned if layout.target_partition_name(p_, Month.parse(m)) in attached
    )
    data.extras["check_queries"] = targets.check_queries(layout, pairs) + ledger.check_queries(
        record.run_id
    )
    return data


# -- figures ----------------------------------------------------------------------------------


def _summary(d: ReportData) -> dict[str, Any]:
    run = d.run
    done_here = [a for a in d.attempts if a["status"] == "done"]
    failed = [a for a in d.attempts if a["status"] == "failed"]
    written = sum(a["rows_written"] or 0 for a in done_here)
    duration = float(run["elapsed_s"])
    done_total = sum(1 for k in d.planned if d.statuses.get(k) == "done")
    return {
        "jobs_done": done_total, "jobs_total": d.partitions, "jobs_run": len(done_here),
        "jobs_skipped": run["jobs_skipped"], "jobs_failed": len({(a["pair"], a["month"])
        for a in failed}), "rows": d.total_rows, "rows_written": written,
        "start": run["started_at"], "end": run["ended_at"], "duration_s": duration,
        "rows_per_s": written / duration if duration > 0 else 0.0,
        "error_rate": len(failed) / len(d.attempts) if d.attempts else 0.0,
        "attempts": len(d.attempts),
    }  # fmt: skip


def _durations(d: ReportData) -> list[float]:
    return [float(a["duration_s"]) for a in d.attempts if a["status"] == "done"]


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else 0.0


# -- charts -----------------------------------------------------------------------------------


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def charts(d: ReportData) -> dict[str, str]:
    """The three charts as PNG data URIs: coverage heatmap, throughput, job durations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    out = {}
    out["coverage"] = _coverage_chart(d, plt)

    # throughput: each job's rows spread evenly over its own run time, summed per time bin,
    # so the curve shows rows/s as the workers produced them (not only when jobs committed)
    done = [a for a in d.attempts if a["status"] == "done" and a["finished_at"] is not None]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    if done:
        t0 = min(min(a["started_at"] for a in done), d.run["started_at"])
        spans = [((a["started_at"] - t0).total_seconds(), (a["finished_at"] - t0).total_seconds(),
                  a["rows_written"] or 0) for a in done]  # fmt: skip
        end = max(e for _, e, _ in spans) or 1.0
        edges = np.linspace(0.0, end, min(40, max(8, len(done) // 3)) + 1)
        width = edges[1] - edges[0]
        rate = np.zeros(len(edges) - 1)
        for s, e, n in spans:
            e = max(e, s + 1e-6)
            overlap = np.clip(np.minimum(edges[1:], e) - np.maximum(edges[:-1], s), 0, None)
            rate += n * overlap / (e - s)
        ax.bar(edges[:-1], rate / width, width=width, align="edge", color="#4c72b0", alpha=0.8,
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
    else:
        ax.text(0.5, 0.5, "no job ran in this run", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    ax.set_title("Throughput over time")
    ax.grid(alpha=0.3)
    out["throughput"] = _png(fig)

    fig, ax = plt.subplots(figsize=(8, 3.2))
    durations = _durations(d)
    if durations:
        ax.hist(durations, bins=min(40, max(5, len(durations) // 4)), color="#4c72b0")
        for q, style in ((50, "-"), (90, "--")):
            v = _pct(durations, q)
            ax.axvline(v, color="#c44e52", linestyle=style, label=f"p{q} {v:.2f} s")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no job ran in this run", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
    ax.set_xlabel("job duration (s)")
    ax.set_ylabel("jobs")
    ax.set_title(f"Job durations ({len(durations)} jobs)")
    out["durations"] = _png(fig)
    return out


def _coverage_chart(d: ReportData, plt: Any) -> str:
    """Pair × month: colour = target rows / source bars, text = rows (or the job's state)."""
    if not d.pairs or not d.months:
        fig, ax = plt.subplots(figsize=(6, 1.6))
        ax.text(0.5, 0.5, "no job planned: nothing to show", ha="center", va="center",
                transform=ax.transAxes)  # fmt: skip
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
        size = 7 if len(d.months) <= 12 else 5
        for i, p in enumerate(d.pairs):
            for j, m in enumerate(d.months):
                state = d.statuses.get((p, m), "pending")
                text = f"{d.rows.get((p, m), 0) / 1000:.1f}k" if state == "done" else state
                dark = not np.isnan(cover[i, j]) and not 0.15 <= cover[i, j] <= 0.85
                # white on the dark green and dark red ends of the scale
                ax.text(j, i, text, ha="center", va="center", fontsize=size,
                        color="white" if dark else "black")  # fmt: skip
    ax.set_title("Coverage: target rows / source bars (cells: rows)")
    fig.colorbar(im, ax=ax, fraction=0.04, pad=0.02)
    return _png(fig)


# -- rendering --------------------------------------------------------------------------------


def _fmt_time(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else "—"


def markdown(d: ReportData) -> str:
    s = _summary(d)
    per_part = [d.rows.get(k, 0) for k in d.sources]
    p = d.run["params"]
    windows = sorted(p["windows"])
    head = d.headline()
    scope = (
        f"every job in the ledger ({plural(d.partitions, 'job')}); run figures from run"
        f" {d.run['run_id']}" if d.scope == "ledger"
        else f"the jobs planned by run {d.run['run_id']} ({plural(d.partitions, 'job')})"
    )  # fmt: skip
    lines = [
        "# BQX Backfill Completion Report", "",
        f"**Run:** {d.run['run_id']} ({d.run['status']}) · **Status:** {head['status']}"
        f" · **Schema:** `{d.layout.schema}`", "",
        f"**Status:** {head['status']}: {head['why']}.", "",
        f"**Parameters:** {describe_parameters(run_parameters(d.run))}.", "",
        f"**Scope:** {scope}.", "",
        "## Summary", "",
        "| Figure | Value |", "|---|---|",
        f"| Jobs | {s['jobs_done']}/{s['jobs_total']} done ({s['jobs_run']} in this run,"
        f" {s['jobs_skipped']} already done and skipped, {s['jobs_failed']} failed) |",
        f"| Rows in target partitions (exact `count(*)`) | {s['rows']:,} |",
        f"| Rows written by this run | {s['rows_written']:,} |",
        f"| Start | {_fmt_time(s['start'])} |", f"| End | {_fmt_time(s['end'])} |",
        f"| Duration | {s['duration_s']:.1f} s ({s['duration_s'] / 60:.2f} min) |",
        f"| Throughput | {s['rows_per_s']:,.0f} rows/s |",
        f"| Error rate | {s['error_rate']:.1%} of {s['attempts']} attempts |", "",
        "## Per-pair completion", "",
        "| Pair | Rows | Months | Status |", "|---|---:|---:|---|",
    ]  # fmt: skip
    for pair in d.pairs:
        keys = [(pair, m) for m in d.months if (pair, m) in d.sources or (pair, m) in d.rows]
        done = sum(1 for k in keys if d.statuses.get(k) == "done")
        rows = sum(d.rows.get(k, 0) for k in keys)
        state = "complete" if done == len(keys) else f"INCOMPLETE: {len(keys) - done} not done"
        lines.append(f"| {pair.upper()} | {rows:,} | {done}/{len(keys)} | {state} |")
    lines += [f"| **Total** | **{s['rows']:,}** | | **{len(d.pairs)} pairs** |", ""]
    lines += [
        "## Database verification", "",
        f"- Partitions planned: {d.partitions} ({len(d.pairs)} pairs × months with source bars)",
        f"- Partitions present in the catalog: {d.extras.get('partitions_present', 0)}"
        f" of {d.partitions}; empty: {sum(1 for k in d.sources if not d.rows.get(k))}",
        f"- Rows in partitions (exact): {d.total_rows:,}",
        f"- Source bars in the same months (exact): {sum(d.sources.values()):,}",
        f"- Rows per partition: min {min(per_part, default=0):,}, average"
        f" {sum(per_part) / max(1, len(per_part)):,.0f}, max {max(per_part, default=0):,}", "",
        "## Per-month distribution", "",
        "| Month | Partitions | Rows | Average rows per partition |", "|---|---:|---:|---:|",
    ]  # fmt: skip
    for m in d.months:
        counts = [d.rows.get((p_, m), 0) for p_ in d.pairs if (p_, m) in d.sources]
        avg = sum(counts) / len(counts) if counts else 0
        lines.append(f"| {m} | {len(counts)} | {sum(counts):,} | {avg:,.0f} |")
    lines += ["", "## Verification (`bqx verify`)", ""]
    if d.verification is None:
        lines.append("Not run.")
    elif d.verification.nothing_to_check:
        lines.append(f"Nothing to check: {d.verification.nothing_to_check}.")
    else:
        lines += ["| Check | Result | Detail |", "|---|---|---|"]
        for c in d.verification.checks:
            lines.append(f"| {c.name} | {'PASS' if c.ok else 'FAIL'} | {c.detail} |")
    durations = _durations(d)
    src = p.get("source_table", "m1_{pair}")
    lines += [
        "", "## Technical details", "",
        f"- Workers: {d.run['workers']} ({d.run['executor']} executor), run by"
        f" {d.run['run_by']} on {d.run['host']}",
        f"- Windows: {', '.join(map(str, windows))} ({p.get('mode', 'bars')} mode"
        + (f", max fill {p.get('max_fill')} min" if p.get("mode") == "clock" else "") + ")",
        f"- Metrics per row: {3 + len(metric_columns(windows))} fields (3 core +"
        f" {6 * len(windows)} window + 7 aggregates)",
        f"- Source tables: `{src if '.' in src else d.layout.schema + '.' + src}`"
        f" (time `{p.get('time_column')}`, price `{p.get('price_column')}`)",
        f"- Target tables: `{d.layout.schema}.bqx_{{pair}}`, monthly partitions"
        " `bqx_{pair}_{YYYY}m{MM}`, primary key `ts_utc`",
        "- Writes: one transaction per (pair, month) job: TRUNCATE partition, binary COPY,"
        " ledger update", "",
        "## Performance", "",
        f"- Job durations (s): min {min(durations, default=0):.2f}, median"
        f" {statistics.median(durations) if durations else 0:.2f}, p90 {_pct(durations, 90):.2f},"
        f" max {max(durations, default=0):.2f} over {len(durations)} jobs",
        f"- Throughput: {s['rows_per_s']:,.0f} rows/s over the run"
        + (f", {s['rows_written'] / sum(durations):,.0f} rows/s per busy worker" if durations
           and sum(durations) > 0 else ""),
        f"- Busy time: {sum(durations):.1f} s of job work in {s['duration_s']:.1f} s of wall time"
        f" with {d.run['workers']} workers (average parallelism"
        f" {sum(durations) / s['duration_s'] if s['duration_s'] > 0 else 0:.2f})",
        "", "## Failures and retries", "",
    ]  # fmt: skip
    bad = [a for a in d.attempts if a["status"] != "done"]
    if not bad:
        lines.append("None: every job succeeded at its first attempt.")
    else:
        lines += ["| Pair | Month | Attempt | Outcome | Error |", "|---|---|---:|---|---|"]
        for a in bad:
            err = (a["error"] or "").replace("|", "\\|")
            lines.append(f"| {a['pair'].upper()} | {Month.of(a['month'])} | {a['attempt']} |"
                         f" {a['status']} | {err} |")  # fmt: skip

    lines += ["", "## Check it yourself", "", "```sql"]
    for what, query in d.extras.get("check_queries", []):
        lines += [f"-- {what}", query]
    lines += [
        "```", "",
        f"*Written by bqx from the ledger and the catalog on {_fmt_time(datetime.now(UTC))}.*",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


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


def _md_to_html(md: str) -> str:
    """A small converter for the Markdown this module writes (headings, tables, lists, code)."""
    out, in_table, in_code, in_list = [], False, False, False
    aligns: list[bool] = []

    def inline(text: str) -> str:
        text = html.escape(text)
        parts = text.split("`")
        text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
        while "**" in text:
            text = text.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
        for word, css in (("PASS", "pass"), ("FAIL", "fail"), ("INCOMPLETE", "fail"),
                          ("COMPLETE", "pass"), ("EMPTY", "fail")):  # fmt: skip
            text = re.sub(rf"\b{word}\b", f'<span class="{css}">{word}</span>', text)
        return text

    for line in md.splitlines():
        if line.startswith("```"):
            out.append("<pre>" if not in_code else "</pre>")
            in_code = not in_code
            continue
        if in_code:
            out.append(html.escape(line))
            continue
        if in_table and not line.startswith("|"):
            out.append("</table>")
            in_table = False
        if in_list and not line.startswith("- "):
            out.append("</ul>")
            in_list = False
        if line.startswith("|"):
            inner = line.strip()[1:-1] if line.strip().endswith("|") else line.strip()[1:]
            cells = [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]
            if set(line) <= set("|-: "):  # the alignment row: `---:` right-aligns a column
                aligns = [c.endswith(":") for c in cells]
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table, aligns = True, []
            opens = [
                f'<{tag} class="num">' if tag == "td" and i < len(aligns) and aligns[i]
                else f"<{tag}>" for i in range(len(cells))
            ]  # fmt: skip
            out.append(
                "<tr>"
                + "".join(o + inline(c) + f"</{tag}>" for o, c in zip(opens, cells, strict=True))
                + "</tr>"
            )
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
        elif line.startswith("*") and line.endswith("*") and not line.startswith("**"):
            out.append(f"<p><em>{inline(line[1:-1])}</em></p>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    if in_table:
        out.append("</table>")
    if in_list:
        out.append("</ul>")
    return "\n".join(out)


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


def check_out_dir(out_dir: Path) -> None:
    """Refuse, before any work, an output directory that cannot be one or cannot be written."""
    path = Path(out_dir)
    if path.exists() and not path.is_dir():
        raise BqxError(
            f"--out {str(out_dir)!r} is a file: give a directory for report.md and report.html"
        )
    parent = path
    while not parent.exists():  # the nearest existing ancestor must be a writable directory
        parent = parent.parent
    if not parent.is_dir():
        raise BqxError(f"--out {str(out_dir)!r}: {str(parent)!r} is a file, not a directory")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise BqxError(f"--out {str(out_dir)!r}: {str(parent)!r} is not writable")


def write_report(
    conn: psycopg.Connection, layout: Layout, out_dir: Path, *, run_id: int | None = None,
    sample: int = 20, verification: Verification | None = None,
    progress: StepFn | None = None,
) -> tuple[Path, Path, ReportData]:  # fmt: skip
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return their paths and data.

    ``verification``: a result of ``bqx.verify`` for the same scope, to reuse instead of
    verifying again. ``progress(stage, done, total, item)`` is called as the work goes.
    """
    check_out_dir(out_dir)
    step: StepFn = progress or (lambda *a, **k: None)
    data = collect(conn, layout, run_id=run_id, sample=sample, verification=verification,
                   progress=progress)  # fmt: skip
    step("writing report.md")
    md = markdown(data)
    step("drawing the charts")
    page = html_page(data, md)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(md)
    html_path.write_text(page)
    return md_path, html_path, data
