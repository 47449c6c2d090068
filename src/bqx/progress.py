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
    TimeRemainingColumn,
)

from bqx.core.text import format_eta, plural

PLAIN_EVERY_S = 5.0
# set once by the CLI's --quiet / --verbose: quiet shows no progress at all, verbose plain
# lines every second instead of every PLAIN_EVERY_S
SETTINGS = {"quiet": False, "verbose": False}


def configure(*, quiet: bool = False, verbose: bool = False) -> None:
    SETTINGS.update(quiet=quiet, verbose=verbose)


def rate_and_eta(state: dict[str, Any]) -> tuple[float, float | None]:
    """rows/s so far and seconds left (from the source bars the unfinished jobs still hold)."""
    elapsed = max(state.get("elapsed", 0.0), 1e-9)
    rate = state.get("rows", 0) / elapsed
    left = state.get("bars_left", 0)
    if left == 0:
        return rate, 0.0
    return rate, (left / rate if rate > 0 else None)


class BackfillProgress:
    """A run's progress for a person: ``start``, then ``update`` with the ledger's counts,
    then ``close``."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.console.quiet = self.console.quiet or SETTINGS["quiet"]
        self.total = self.skipped = 0
        self.live = self.console.is_terminal and not SETTINGS["quiet"]
        self.last_plain = 0.0
        self.progress: Progress | None = None
        self.task: Any = None

    def start(self, total: int, skipped: int) -> None:
        self.total, self.skipped = total, skipped
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
                f"{skipped} of {plural(total, 'job')} already done with these parameters: skipped",
                highlight=False,
            )

    def update(self, state: dict[str, Any]) -> None:
        rate, eta = rate_and_eta(state)
        finished = self.skipped + state["done"] + state["failed"]
        if self.progress is not None:
            self.progress.update(
                self.task, completed=finished, rows=state["rows"], rate=rate, eta=format_eta(eta)
            )
        elif time.monotonic() - self.last_plain >= (1.0 if SETTINGS["verbose"] else PLAIN_EVERY_S):
            self.last_plain = time.monotonic()
            self.console.print(
                f"backfill: {finished}/{plural(self.total, 'job')} ({state['running']} running,"
                f" {state['failed']} failed) · {state['rows']:,} rows · {rate:,.0f} rows/s"
                f" · ETA {format_eta(eta)}",
                highlight=False,
                soft_wrap=True,  # one line per report in logs, whatever the width
            )

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class StepProgress:
    """Progress of a long read-only step (verify, report): ``step(label, done, total)``.

    A rich bar on a terminal (with the ETA of the current stage); otherwise a plain line when
    the label changes, and within a long stage one at most every ``PLAIN_EVERY_S`` seconds
    with done/total and its ETA, so a log shows what is being done without a line per item.
    Call ``close()`` at the end.
    """

    def __init__(self, title: str, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.title = title
        self.quiet = SETTINGS["quiet"]
        self.progress: Progress | None = None
        self.task: Any = None
        self.label: str | None = None
        self.t0 = self.stage_t0 = self.last_plain = time.monotonic()
        if self.console.is_terminal and not self.quiet:
            self.progress = Progress(
                TextColumn(f"[bold]{title}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.description}"),
                TimeElapsedColumn(),
                TextColumn("ETA"),
                TimeRemainingColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task("", total=None)
            self.progress.start()

    def __call__(self, label: str, done: int = 0, total: int | None = None, what: str = "") -> None:
        """``label`` names the stage (a plain line each); ``what`` the item within it."""
        if self.progress is not None:
            text = f"{label} {what}".strip()
            if label != self.label:
                self.label = label
                self.progress.reset(self.task, total=total)
            self.progress.update(self.task, description=text, completed=done, total=total)
            return
        if self.quiet:
            return
        now = time.monotonic()
        if label != self.label:
            self.label, self.stage_t0, self.last_plain = label, now, now
            self.console.print(f"{self.title}: {label} ({now - self.t0:.1f} s)", highlight=False)
        elif total and done and now - self.last_plain >= PLAIN_EVERY_S:
            self.last_plain = now
            eta = (now - self.stage_t0) / done * (total - done)
            self.console.print(
                f"{self.title}: {label} {done:,}/{total:,} {what} ({now - self.t0:.1f} s,"
                f" ETA {format_eta(eta)})", highlight=False,
            )  # fmt: skip

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None


class RateProgress:
    """Progress of work counted in items (export's months, features' pairs, the baseline's
    fits): ``progress(label, done, total, rows=…)``, then ``close()``.

    A rich bar on a terminal (label, done/total, rows/s, ETA); otherwise a plain line at most
    every ``PLAIN_EVERY_S`` seconds (every second with --verbose), so that work that ends
    quickly prints nothing and long work never looks stalled; nothing with --quiet. The ETA
    comes from the current stage's pace (``label`` names the stage).
    """

    def __init__(self, title: str, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True, soft_wrap=True)
        self.title = title
        self.quiet = SETTINGS["quiet"]
        self.every = 1.0 if SETTINGS["verbose"] else PLAIN_EVERY_S
        self.t0 = self.last_plain = self.stage_t0 = time.monotonic()
        self.label: str | None = None
        self.stage_done0 = 0
        self.progress: Progress | None = None
        self.task: Any = None
        if self.console.is_terminal and not self.quiet:
            self.progress = Progress(
                TextColumn(f"[bold]{title}"),
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[pace]} · ETA {task.fields[eta]}"),
                TimeElapsedColumn(),
                console=self.console,
                transient=True,
            )
            self.task = self.progress.add_task("", total=None, pace="", eta="--:--")
            self.progress.start()

    def _pace(self, now: float, done: int, rows: int | None) -> str:
        """Rows and rows/s since the start, or, without rows, the stage's items per second."""
        if rows is not None:
            return f"{rows:,} rows · {rows / max(now - self.t0, 1e-9):,.0f} rows/s"
        return f"{(done - self.stage_done0) / max(now - self.stage_t0, 1e-9):,.1f}/s"

    def __call__(
        self, label: str, done: int, total: int | None = None, rows: int | None = None
    ) -> None:
        now = time.monotonic()
        if label != self.label:
            self.label, self.stage_t0, self.stage_done0 = label, now, done
        pace = self._pace(now, done, rows)
        eta = self.eta(now, done, total)
        if self.progress is not None:
            self.progress.update(self.task, description=label, completed=done, total=total,
                                 pace=pace, eta=format_eta(eta))  # fmt: skip
            return
        if self.quiet or now - self.last_plain < self.every:
            return
        self.last_plain = now
        of = f"/{total:,}" if total is not None else ""
        self.console.print(
            f"{self.title}: {label} {done:,}{of} · {pace} · ETA {format_eta(eta)}"
            f" ({now - self.t0:.0f} s)",
            highlight=False,
            soft_wrap=True,
        )

    def eta(self, now: float, done: int, total: int | None) -> float | None:
        """Seconds left at the current stage's pace; None while it cannot be told."""
        if total is None:
            return None
        if done >= total:
            return 0.0
        step = done - self.stage_done0
        return (total - done) * (now - self.stage_t0) / step if step > 0 else None

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None
