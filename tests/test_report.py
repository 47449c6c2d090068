"""bqx report: exact totals from the tables, every section, a self-contained HTML with charts."""

from __future__ import annotations

import base64
import re
from html.parser import HTMLParser

from psycopg import sql

from bqx.ops.report import _md_to_html, write_report
from bqx.store import names
from conftest import store_for

SECTIONS = [
    "## Summary", "## Per-pair completion", "## Database verification",
    "## Per-month distribution", "## Verification (`bqx verify`)", "## Technical details",
    "## Performance", "## Failures and retries", "## Check it yourself",
]  # fmt: skip


class Images(HTMLParser):
    """The page's tags in order, its images by id, the text of each table cell (with its
    class), of each coloured span (with its class) and of each code block."""

    def __init__(self) -> None:
        super().__init__()
        self.images: dict[str, str] = {}
        self.tags: list[str] = []
        self.cells: list[tuple[str | None, str]] = []
        self.spans: list[tuple[str | None, str]] = []
        self.code_blocks: list[str] = []
        self.open: list[tuple[str, str | None, list[str]]] = []  # tag, class, text so far

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        a = dict(attrs)
        if tag == "img":
            self.images[a.get("id", "")] = a.get("src", "")
        if tag in ("td", "th", "span", "pre"):
            self.open.append((tag, a.get("class"), []))

    def handle_data(self, data):
        for _, _, text in self.open:
            text.append(data)

    def handle_endtag(self, tag):
        if self.open and self.open[-1][0] == tag:
            _, css, text = self.open.pop()
            found = {"td": self.cells, "th": self.cells, "span": self.spans}
            found.get(tag, self.code_blocks).append((css, "".join(text)))


def test_report_states_exact_totals_and_renders_charts(settings, layout, conn, make_bars, tmp_path):
    make_bars("eurusd", "2024-07-01", 62 * 1440, seed=1)
    make_bars("gbpusd", "2024-07-01", 62 * 1440, seed=2, level=1.27)
    store_for(settings, layout).backfill(workers=2)
    md_path, html_path, data = write_report(conn, layout, tmp_path / "out", sample=5)
    md = md_path.read_text()

    exact = {
        p: conn.execute(
            sql.SQL("SELECT count(*) FROM {}").format(names.target(layout, p))
        ).fetchone()[0]
        for p in ("eurusd", "gbpusd")
    }
    total = sum(exact.values())
    assert f"| Rows in target partitions (exact `count(*)`) | {total:,} |" in md
    assert f"| EURUSD | {exact['eurusd']:,} | 2/2 | complete |" in md
    assert f"| GBPUSD | {exact['gbpusd']:,} | 2/2 | complete |" in md
    assert "| Jobs | 4/4 done (4 in this run" in md
    assert "Metrics per row: 40 fields (3 core + 30 window + 7 aggregates)" in md
    for section in SECTIONS:
        assert section in md, section
    july = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(
            names.target_partition(layout, "eurusd", data_month("2024-07"))
        )
    ).fetchone()[0]
    gb_july = conn.execute(
        sql.SQL("SELECT count(*) FROM {}").format(
            names.target_partition(layout, "gbpusd", data_month("2024-07"))
        )
    ).fetchone()[0]
    assert f"| 2024-07 | 2 | {july + gb_july:,} |" in md
    assert "| recompute_sample | PASS |" in md and "FAIL" not in md
    assert "- Partitions present in the catalog: 4 of 4; empty: 0" in md
    # the report's own "check it yourself" SQL gives the same exact total
    total_sql = md.split("SELECT sum(n) AS total_rows", 1)[1].split(";", 1)[0]
    assert conn.execute("SELECT sum(n) AS total_rows" + total_sql).fetchone()[0] == total
    assert "None: every job succeeded at its first attempt." in md

    page = html_path.read_text()
    parser = Images()
    parser.feed(page)
    assert set(parser.images) == {"coverage", "throughput", "durations"}
    for src in parser.images.values():
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1])[:8] == b"\x89PNG\r\n\x1a\n"
    assert "http://" not in page and "https://" not in page  # self-contained
    assert parser.tags.count("table") == 4  # summary, per pair, per month, verification
    assert re.search(
        r'<td>EURUSD</td>\s*<td class="num">[\d,]+</td>', page
    )  # numbers right-aligned


def test_report_lists_failures_with_their_errors(settings, layout, conn, make_bars, tmp_path):
    make_bars("eurusd", "2024-07-01", 40 * 1440, seed=1)
    part = names.source_partition(layout, "eurusd", data_month("2024-08"))
    conn.execute(
        sql.SQL("UPDATE {} SET close = 0 WHERE time = (SELECT min(time) FROM {})").format(
            part, part
        )
    )
    store_for(settings, layout).backfill(workers=1)
    md = write_report(conn, layout, tmp_path, sample=3)[0].read_text()
    assert "**Status:** INCOMPLETE" in md
    assert "| EURUSD | 2024-08 | 1 | failed | EURUSD 2024-08:" in md
    assert "must be finite and &gt; 0" in (tmp_path / "report.html").read_text()


def test_report_html_keeps_tables_code_and_verdicts_and_escapes_errors(
    settings, layout, conn, make_bars, tmp_path
):
    make_bars("eurusd", "2024-07-01", 40 * 1440, seed=1)
    part = names.source_partition(layout, "eurusd", data_month("2024-08"))
    conn.execute(
        sql.SQL("UPDATE {} SET close = 0 WHERE time = (SELECT min(time) FROM {})").format(
            part, part
        )
    )
    store_for(settings, layout).backfill(workers=1)
    # an error message as the database or a file could word it: markup and a pipe
    conn.execute(
        sql.SQL("UPDATE {} SET error = error || %s WHERE status = 'failed'").format(
            names.table(layout, "bqx_attempts")
        ),
        (" <script>alert(1)</script> | <b>x</b>",),
    )
    md_path, html_path, _ = write_report(conn, layout, tmp_path, sample=3)
    md, page = md_path.read_text(), html_path.read_text()
    assert " <script>alert(1)</script> \\| <b>x</b> |" in md  # the Markdown keeps it as it is

    parser = Images()
    parser.feed(page)
    # the error is text in its table cell, pipe included: no element came out of it
    assert "<script>" not in page and "<b>" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "script" not in parser.tags and "b" not in parser.tags
    errors = [text for _, text in parser.cells if "<script>" in text]
    assert len(errors) == 1 and errors[0].endswith(" <script>alert(1)</script> | <b>x</b>")
    assert errors[0].startswith("EURUSD 2024-08:")
    # summary, per pair, per month, verification, failures; numeric columns right-aligned
    assert parser.tags.count("table") == 5
    assert ("num", "1") in parser.cells  # the attempt number
    assert (None, "Rows") in parser.cells and (None, "EURUSD") in parser.cells
    assert parser.cells[parser.cells.index((None, "EURUSD")) + 1][0] == "num"
    assert parser.tags.count("li") >= 11  # database verification, technical details, performance
    assert len(parser.code_blocks) == 1
    assert "SELECT sum(n) AS total_rows FROM (" in parser.code_blocks[0][1]
    assert set(parser.images) == {"coverage", "throughput", "durations"}
    assert ("fail", "INCOMPLETE") in parser.spans
    assert ("pass", "PASS") in parser.spans
    assert "<em>Written by bqx from the ledger and the catalog on " in page


def test_only_whole_verdict_words_are_coloured_and_html_is_escaped():
    page = _md_to_html(
        "**Status:** EMPTY, not EMPTYING nor `FAIL`\n\n"
        "| Check | Result | n |\n|---|---|---:|\n| a | PASS | 1 |\n| b | FAIL | 2 |\n\n"
        "- COMPLETE, INCOMPLETE <i>x</i> & <script>y</script>\n"
    )
    assert '<span class="fail">EMPTY</span>, not EMPTYING nor <code>FAIL</code>' in page
    assert '<td><span class="pass">PASS</span></td>' in page
    assert '<td><span class="fail">FAIL</span></td>' in page
    assert '<td class="num">2</td>' in page and "style=" not in page
    assert (
        '<li><span class="pass">COMPLETE</span>, <span class="fail">INCOMPLETE</span>'
        " &lt;i&gt;x&lt;/i&gt; &amp; &lt;script&gt;y&lt;/script&gt;</li>"
    ) in page


def data_month(text: str):
    from bqx.core.months import Month

    return Month.parse(text)


def test_report_describes_the_run_that_did_work_with_earlier_failures(
    settings, layout, conn, make_bars, tmp_path
):
    """A no-op resume does not hide the run that computed; failures of earlier runs on the
    jobs in scope stay in the report; a pair-month without bars is shown as such."""
    import bqx.pipeline.job as job

    make_bars("eurusd", "2024-07-01", 62 * 1440, seed=1)
    make_bars("gbpusd", "2024-08-01", 31 * 1440, seed=2, level=1.27)  # no July bars
    store = store_for(settings, layout)
    real = job.compute_rows

    def fail_once(params, since, times, prices):
        if since.month == 8 and not getattr(fail_once, "failed", False):
            fail_once.failed = True
            raise RuntimeError("a planted fault in August")
        return real(params, since, times, prices)

    job.compute_rows = fail_once
    try:
        first = store.backfill(workers=1, executor="threads", max_attempts=1)
    finally:
        job.compute_rows = real
    assert first.jobs_failed == 1
    worked = store.backfill(workers=1)  # redoes the failed month
    assert worked.jobs_done == 1
    noop = store.backfill(workers=1)
    assert noop.jobs_done == 0 and noop.run_id > worked.run_id
    md_path, _, data = write_report(conn, layout, tmp_path / "out", sample=3)
    md = md_path.read_text()
    assert data.run["run_id"] == worked.run_id, "the report names the run that did the work"
    assert data.headline()["status"] == "COMPLETE"
    assert "same jobs failed or were retried (1 attempts" in md
    (row,) = [line for line in md.splitlines() if "a planted fault in August" in line]
    assert row.startswith(f"| {first.run_id} | ") and "| 2024-08 |" in row
    status = store.status()
    assert status.run["run_id"] == worked.run_id
    # the heatmap's cells: GBPUSD July has no bars and no job
    from bqx.ops import report

    texts: list[str] = []

    class Axes:
        def text(self, x, y, text, **kw):
            texts.append((data.pairs[y], data.months[x], text))

    report._label_cells(Axes(), data, report.np.zeros((len(data.pairs), len(data.months))))
    assert ("gbpusd", "2024-07", "no bars") in texts
    assert all(t != "pending" for *_, t in texts)
