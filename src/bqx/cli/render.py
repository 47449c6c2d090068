"""How typed results look on a terminal when plain text is not enough: the status tables."""

from __future__ import annotations

from typing import Any

from rich.console import Group
from rich.markup import escape
from rich.table import Table

from bqx.core.text import format_duration, format_eta, plural
from bqx.ops.status import Status, describe_parameters

WORKER_KIND = {"threads": "worker thread", "local": "worker process", "dask": "Dask worker"}


def _head(doc: Status) -> Table:
    jobs, run = doc.jobs, doc.run
    head = Table.grid(padding=(0, 2))
    if run is None:
        head.add_row("no backfill run recorded yet")
        return head
    color = {"done": "green", "running": "cyan"}.get(run["status"], "red")
    start = run["started_at"][:19].replace("T", " ")
    when = f"started {start} UTC"
    if run["ended_at"]:
        end = run["ended_at"][:19].replace("T", " ")
        when += f", ended {end[11:] if end[:10] == start[:10] else end}"
    head.add_row(
        f"run {run['run_id']} [bold {color}]{run['status']}[/] · {when} ({run['elapsed_s']:.1f} s)"
        f" · {plural(run['workers'] or 0, WORKER_KIND.get(run['executor'], 'worker'))}"
        f" on {run['host']}"
    )
    if run.get("mode"):
        head.add_row(escape(describe_parameters(run)))
    head.add_row(
        f"jobs {jobs['done']}/{jobs['total']} done · {jobs['running']} running ·"
        f" [{'red' if jobs['failed'] else 'default'}]{jobs['failed']} failed[/] ·"
        f" {jobs['pending']} pending ({run['skipped']} skipped as already done)"
    )
    eta = "finished" if run["status"] != "running" else f"ETA {format_eta(doc.eta_s)}"
    head.add_row(
        f"rows {doc.rows:,} · {doc.rows_per_s:,.0f} rows/s · {eta}"
        + (f" · [red]{len(doc.stale)} stale[/]" if doc.stale else "")
    )
    ledger = doc.ledger or {}
    if ledger and ledger["total"] != jobs["total"]:  # the run covered part of the ledger
        head.add_row(
            f"whole ledger: {ledger['done']}/{ledger['total']} jobs done · {ledger['running']}"
            f" running · {ledger['failed']} failed · {ledger['pending']} pending ·"
            f" {ledger['rows']:,} rows"
        )
    if run.get("stalled"):
        head.add_row(
            f"[bold red]no activity for {run['last_activity_s']:.0f} s[/]: the backfill driving"
            " this run seems gone; rerun `bqx backfill` to resume"
        )
    return head


def _pairs(doc: Status) -> Table:
    pairs = Table(title="per pair", show_edge=False)
    for col in ("pair", "months", "rows", "running", "failed", "newest bar", "newest metric",
                "lag", "current"):  # fmt: skip
        pairs.add_column(col, justify="left" if col in ("pair", "current") else "right")
    for p in doc.pairs:
        when = [(t or "")[:16].replace("T", " ") for t in (p.newest_bar, p.newest_metric)]
        lag = "" if p.lag_s is None else format_duration(p.lag_s)  # raw seconds in --json
        current = {True: "[green]yes[/]", False: "[yellow]no[/]", None: "?"}[p.current]
        pairs.add_row(p.pair.upper(), f"{p.months_done}/{p.months_planned}", f"{p.rows:,}",
                      str(p.running), str(p.failed), *when, lag, current)  # fmt: skip
    return pairs


def _notes(doc: Status) -> list[str]:
    """One line per pair whose metrics are not its bars' now, saying what to run; one line
    for all the pairs whose sources bqx cannot check cheaply."""
    lines = [f"[yellow]{p.pair}[/]: {p.note}" for p in doc.pairs if p.current is False and p.note]
    unknown = [p for p in doc.pairs if p.current is None and p.note]
    if unknown:
        shown = ", ".join(p.pair for p in unknown[:5]) + (" …" if len(unknown) > 5 else "")
        lines.append(f"{shown}: {unknown[0].note}")
    return lines


def _running(doc: Status) -> Table:
    running = Table(title="running jobs", show_edge=False)
    for col in ("pair", "month", "worker", "running s", "heartbeat age s", "stale"):
        running.add_column(col)
    for j in doc.running:
        running.add_row(j.pair.upper(), j.month, j.worker or "", f"{j.running_s}",
                        f"{j.heartbeat_age_s}", "[red]STALE[/]" if j.stale else "")  # fmt: skip
    return running


def _errors(doc: Status) -> Table:
    errors = Table(title="last errors", show_edge=False)
    for col in ("at", "pair", "month", "outcome"):
        errors.add_column(col, no_wrap=True)
    errors.add_column("error", overflow="fold")
    for e in doc.errors:
        errors.add_row(e["at"].replace("T", " ")[:19], e["pair"].upper(), e["month"],
                       e["status"], e["error"])  # fmt: skip
    return errors


def status_view(doc: Status) -> Any:
    """The whole status: the run, per pair, running jobs, the last errors."""
    if doc.run is None:
        return _head(doc)
    parts: list[Any] = [_head(doc), _pairs(doc), *_notes(doc)]
    if doc.running:
        parts.append(_running(doc))
    if doc.errors:
        parts.append(_errors(doc))
    return Group(*parts)
