"""``bqx report``: the completion report of SPEC 6, written from the ledger and the catalog.

Markdown for reading and diffing, and one self-contained HTML page (charts embedded as PNG
data URIs) with a pair × month coverage heatmap, throughput over time and job durations.
"""

from __future__ import annotations

import base64
import html
import io
import re
import statistics
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
from psycopg import sql

from bqx.errors import BqxError
from bqx.metrics import metric_columns
from bqx.schema import LEDGER_ATTEMPTS, Layout, Month, table_columns
from bqx.status import latest_run, planned_jobs
from bqx.verify import Verification, verify


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


def collect(
    conn: psycopg.Connection, layout: Layout, *, run_id: int | None = None, sample: int = 20,
    verification: Verification | None = None,
) -> ReportData:  # fmt: skip
    """Everything the report states, read from the database."""
    run = latest_run(conn, layout, run_id)
    if run is None:
        which = f"run {run_id}" if run_id else "backfill run"
        raise BqxError(f"no {which} recorded in schema {layout.schema!r}")
    p = run["params"]
    layout = Layout(layout.schema, p.get("source_table", layout.source_table),
                    p.get("time_column", layout.time_column),
                    p.get("price_column", layout.price_column))  # fmt: skip
    jobs = planned_jobs(run)
    pairs = sorted({j[0] for j in jobs})
    months = sorted({str(Month.of(j[1])) for j in jobs})
    rows: dict[tuple[str, str], int] = {}
    sources: dict[tuple[str, str], int] = {}
    count = sql.SQL("SELECT date_trunc('month', {c})::date, count(*) FROM {t} GROUP BY 1")
    for pair in pairs:
        for m, n in conn.execute(count.format(c=layout.time, t=layout.source(pair))):
            sources[(pair, str(Month.of(m)))] = n
        if table_columns(conn, layout.schema, layout.target_name(pair)) is None:
            continue  # a dropped target: every month of the pair reads 0 rows
        for m, n in conn.execute(count.format(c=sql.Identifier("ts_utc"), t=layout.target(pair))):
            rows[(pair, str(Month.of(m)))] = n
    statuses = {
        (p_, str(Month.of(m))): s
        for p_, m, s in conn.execute(
            sql.SQL("SELECT pair, month, status FROM {}").format(layout.table("bqx_jobs"))
        )
    }
    cur = conn.execute(
        sql.SQL(
            "SELECT pair, month, attempt, status, worker, started_at, finished_at, duration_s,"
            " source_bars, rows_written, error FROM {} WHERE run_id = %s ORDER BY finished_at"
        ).format(layout.table(LEDGER_ATTEMPTS)),
        (run["run_id"],),
    )
    names = [d.name for d in cur.description]
    attempts = [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    planned = {(p_, str(Month.of(m))) for p_, m in jobs}
    data = ReportData(
        run, layout, pairs, months,
        {k: v for k, v in rows.items() if k in planned},
        {k: v for k, v in sources.items() if k in planned},
        statuses, attempts,
        verification if verification is not None and verification.run_id == run["run_id"]
        else verify(conn, layout, sample=sample, run_id=run["run_id"]),
    )  # fmt: skip
    data.total_rows = sum(data.rows.values())
    data.partitions = len(planned)
    return data


# -- figures ----------------------------------------------------------------------------------


def _summary(d: ReportData) -> dict[str, Any]:
    run = d.run
    done_here = [a for a in d.attempts if a["status"] == "done"]
    failed = [a for a in d.attempts if a["status"] == "failed"]
    written = sum(a["rows_written"] or 0 for a in done_here)
    duration = float(run["elapsed_s"])
    done_total = sum(1 for k in d.rows if d.statuses.get(k) == "done")
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

    out = {}
    cover = np.array([[d.rows.get((p, m), 0) / d.sources[(p, m)] if d.sources.get((p, m)) else
                       np.nan for m in d.months] for p in d.pairs])  # fmt: skip
    fig, ax = plt.subplots(
        figsize=(max(4, 0.6 * len(d.months) + 2), max(2.5, 0.28 * len(d.pairs) + 1))
    )
    im = ax.imshow(cover, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(d.months)), d.months, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(range(len(d.pairs)), [p.upper() for p in d.pairs], fontsize=8)
    ax.set_title("Coverage: target rows / source bars per pair and month")
    fig.colorbar(im, ax=ax, fraction=0.03)
    out["coverage"] = _png(fig)

    done = [a for a in d.attempts if a["status"] == "done"]
    fig, ax = plt.subplots(figsize=(7, 3))
    if done:
        t0 = d.run["started_at"]
        secs = [(a["finished_at"] - t0).total_seconds() for a in done]
        cum = np.cumsum([a["rows_written"] or 0 for a in done])
        ax.plot(secs, cum / 1e6, drawstyle="steps-post")
        ax.set_xlabel("seconds since start")
        ax.set_ylabel("rows written (millions)")
    ax.set_title("Throughput over time")
    ax.grid(alpha=0.3)
    out["throughput"] = _png(fig)

    fig, ax = plt.subplots(figsize=(7, 3))
    durations = _durations(d)
    if durations:
        ax.hist(durations, bins=min(40, max(5, len(durations) // 4)), color="#4c72b0")
    ax.set_xlabel("job duration (s)")
    ax.set_ylabel("jobs")
    ax.set_title("Job durations")
    out["durations"] = _png(fig)
    return out


# -- rendering --------------------------------------------------------------------------------


def _fmt_time(t: datetime | None) -> str:
    return t.strftime("%Y-%m-%d %H:%M:%S UTC") if t else "—"


def markdown(d: ReportData) -> str:
    s = _summary(d)
    p = d.run["params"]
    windows = sorted(p["windows"])
    ok = d.verification.ok if d.verification else None
    complete = s["jobs_done"] == s["jobs_total"] and ok is not False
    status = "COMPLETE" if complete else "INCOMPLETE"
    lines = [
        "# BQX Backfill Completion Report", "",
        f"**Run:** {d.run['run_id']} · **Status:** {status} · **Schema:** `{d.layout.schema}`", "",
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
        f"- Rows in partitions (exact): {d.total_rows:,}",
        f"- Source bars in the same months (exact): {sum(d.sources.values()):,}", "",
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
        f"- Throughput: {s['rows_per_s']:,.0f} rows/s over the run",
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

    def q(text: str, *idents: sql.Composable) -> str:  # quoted by psycopg, as bqx runs them
        return sql.SQL(text).format(*idents).as_string(None)

    jobs_t, attempts_t = d.layout.table("bqx_jobs"), d.layout.table(LEDGER_ATTEMPTS)
    lines += [
        "", "## Check it yourself", "", "```sql",
        "-- exact rows per pair (not pg_stat estimates)",
        *[q("SELECT count(*) FROM {};", d.layout.target(p_)) for p_ in d.pairs[:3]],
        "-- jobs by status in the ledger",
        q("SELECT status, count(*), sum(rows_written) FROM {} GROUP BY status;", jobs_t),
        "-- attempts of this run",
        q("SELECT status, count(*) FROM {} WHERE run_id = {} GROUP BY status;", attempts_t,
          sql.Literal(d.run["run_id"])),
        "```", "",
        f"*Written by bqx from the ledger and the catalog on {_fmt_time(datetime.now(UTC))}.*",
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#222;line-height:1.45;padding:0 1rem}
table{border-collapse:collapse;margin:.5rem 0 1.2rem}
td,th{border:1px solid #ddd;padding:.3rem .6rem}
th{background:#f4f4f4}td{text-align:left}h1{border-bottom:2px solid #333}h2{margin-top:2rem}
code,pre{background:#f6f8fa;border-radius:4px}pre{padding:.8rem;overflow-x:auto}
img{max-width:100%;border:1px solid #eee;margin:.5rem 0}
.fail{color:#b00020;font-weight:600}.pass{color:#1b7f3b;font-weight:600}
"""


def _md_to_html(md: str) -> str:
    """A small converter for the Markdown this module writes (headings, tables, lists, code)."""
    out, in_table, in_code, in_list = [], False, False, False

    def inline(text: str) -> str:
        text = html.escape(text)
        parts = text.split("`")
        text = "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))
        while "**" in text:
            text = text.replace("**", "<strong>", 1).replace("**", "</strong>", 1)
        for word, css in (("PASS", "pass"), ("FAIL", "fail"), ("INCOMPLETE", "fail"),
                          ("COMPLETE", "pass")):  # fmt: skip
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
            if set(line) <= set("|-: "):
                continue
            tag = "th" if not in_table else "td"
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<{tag}>{inline(c)}</{tag}>" for c in cells) + "</tr>")
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line.lstrip('# '))}</h{level}>")
        elif line.startswith("- "):
            if not in_list:
                out.append("<ul>")
                in_list = True
            out.append(f"<li>{inline(line[2:])}</li>")
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


def write_report(
    conn: psycopg.Connection, layout: Layout, out_dir: Path, *, run_id: int | None = None,
    sample: int = 20, verification: Verification | None = None,
) -> tuple[Path, Path, ReportData]:  # fmt: skip
    """Write ``report.md`` and ``report.html`` into ``out_dir``; return their paths and data.

    ``verification``: a result of ``bqx.verify`` for the same run, to reuse instead of
    verifying again.
    """
    data = collect(conn, layout, run_id=run_id, sample=sample, verification=verification)
    md = markdown(data)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    md_path.write_text(md)
    html_path.write_text(html_page(data, md))
    return md_path, html_path, data
