"""Progress of a backfill as a person sees it: jobs, rows, rows/s and ETA.

A live rich bar on a terminal; plain periodic lines otherwise (CI logs, ``| tee``), so that a
long run never looks stalled.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

PLAIN_EVERY_S = 5.0


def rate_and_eta(state: dict[str, Any]) -> tuple[float, float | None]:
    """rows/s so far and seconds left (from the source bars the unfinished jobs still hold)."""
    elapsed = max(state.get("elapsed", 0.0), 1e-9)
    rate = state.get("rows", 0) / elapsed
    left = state.get("bars_left", 0)
    if left == 0:
        return rate, 0.0
    return rate, (left / rate if rate > 0 else None)


def format_eta(eta: float | None) -> str:
    if eta is None:
        return "--:--"
    m, s = divmod(int(round(eta)), 60)
    h, m = divmod(m, 60)
    return f"{h}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


class BackfillProgress:
    """Callable with the ledger's progress state; ``None`` closes the display."""

    def __init__(self, total: int, skipped: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.total, self.skipped = total, skipped
        self.live = self.console.is_terminal
        self.last_plain = 0.0
        self.progress: Progress | None = None
        if self.live:
            self.progress = Progress(
                TextColumn("[bold]backfill"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("jobs · {task.fields[rows]:,} rows · {task.fields[rate]:,.0f} rows/s"),
                TextColumn("· ETA {task.fields[eta]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=False,
            )
            self.task = self.progress.add_task(
                "backfill", total=total, completed=skipped, rows=0, rate=0.0, eta="--:--"
            )
            self.progress.start()
        if skipped:
            self.console.print(
                f"{skipped} of {total} jobs already done with these parameters: skipped"
            )

    def __call__(self, state: dict[str, Any] | None) -> None:
        if state is None:
            if self.progress is not None:
                self.progress.stop()
                self.progress = None
            return
        rate, eta = rate_and_eta(state)
        finished = self.skipped + state["done"] + state["failed"]
        if self.progress is not None:
            self.progress.update(
                self.task, completed=finished, rows=state["rows"], rate=rate, eta=format_eta(eta)
            )
        elif time.monotonic() - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = time.monotonic()
            self.console.print(
                f"backfill: {finished}/{self.total} jobs ({state['running']} running,"
                f" {state['failed']} failed) · {state['rows']:,} rows · {rate:,.0f} rows/s"
                f" · ETA {format_eta(eta)}",
                highlight=False,
                soft_wrap=True,  # one line per report in logs, whatever the width
            )
