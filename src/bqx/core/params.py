"""What a job computes and what a run reports: parameters, jobs, run summaries, plans."""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

from bqx import metrics
from bqx.core.layout import TARGET_CORE_COLUMNS, Layout
from bqx.core.months import Month
from bqx.errors import InvalidOption

FORMULA_VERSION = 1  # bump when metric definitions change, so resume recomputes
MODES = metrics.MODES
# how resume tells that a job's source is unchanged: "auto" compares the versions bqx keeps
# where its triggers guard them and hashes the bars elsewhere; "exact" always hashes
SOURCE_CHECKS = ("auto", "exact")
_LAKE_KEYS = ("sink", "bars")
MAX_WINDOW = 7 * 24 * 60  # one week of minute bars
PG_MAX_COLUMNS = 1600  # PostgreSQL's limit on columns per table


def check_windows(windows: Any) -> tuple[int, ...]:
    """Normalised windows, refused when too many (columns) or too large, before any DDL."""
    try:
        wins = metrics.normalize_windows(windows)
    except ValueError as exc:
        raise InvalidOption("windows", windows, str(exc)) from None
    ncols = len(TARGET_CORE_COLUMNS) + len(metrics.metric_columns(wins))
    if ncols > PG_MAX_COLUMNS:
        most = (PG_MAX_COLUMNS - len(TARGET_CORE_COLUMNS) - len(metrics.AGG_STATS)) // len(
            metrics.WINDOW_STATS
        )
        raise InvalidOption(
            "windows", wins,
            f"{len(wins)} windows need {ncols} columns, more than PostgreSQL's"
            f" {PG_MAX_COLUMNS} per table (at most {most} windows)",
            shown=f"({len(wins)} windows)",
        )  # fmt: skip
    if wins[-1] > MAX_WINDOW:
        raise InvalidOption(
            "windows", wins,
            f"window {wins[-1]:,} is larger than the maximum {MAX_WINDOW:,} bars (one week of"
            " minutes, docs/metrics.md)",
        )  # fmt: skip
    return wins


def check_positive(param: str, value: Any, *, integer: bool = False) -> None:
    """Refuse NaN, zero, negative (and, for counts, non-integer or boolean) values."""
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if integer:
        ok = ok and isinstance(value, int)
    if not ok or value <= 0:
        raise InvalidOption(param, value, "must be a number > 0" if not integer else "must be ≥ 1")


@dataclass(frozen=True)
class Params:
    """What a job's output depends on (besides its source bars); hashed into the ledger."""

    windows: tuple[int, ...] = metrics.DEFAULT_WINDOWS
    mode: str = "bars"
    max_fill: int = 5
    schema: str = "bqx"
    source_table: str = "m1_{pair}"
    time_column: str = "time"
    price_column: str = "close"
    # lake locations (docs/lake.md); None, the default, keeps the hash of older ledgers
    sink: str | None = None  # a Delta table for the metrics (None: the database's partitions)
    bars: str | None = None  # a Parquet dataset or Delta table of bars (None: source_table)

    @classmethod
    def build(
        cls, layout: Layout, windows: Any, mode: str, max_fill: int, *, sink: str | None = None,
        bars: str | None = None,
    ) -> Params:  # fmt: skip
        wins = check_windows(windows)
        if mode not in MODES:
            raise InvalidOption("mode", mode, f"expected one of {', '.join(MODES)}")
        if isinstance(max_fill, bool) or not isinstance(max_fill, int) or max_fill < 0:
            raise InvalidOption("max_fill", max_fill, "must be ≥ 0 minutes")
        return cls(
            windows=wins, mode=mode, max_fill=int(max_fill), schema=layout.schema,
            source_table=layout.source_table, time_column=layout.time_column,
            price_column=layout.price_column, sink=sink, bars=bars,
        )  # fmt: skip

    @classmethod
    def recorded(cls, doc: dict[str, Any], layout: Layout, default: Params) -> Params:
        """The Params a run recorded in the ledger (its parameters document)."""
        return cls(
            windows=tuple(doc.get("windows", default.windows)),
            mode=doc.get("mode", default.mode),
            max_fill=int(doc.get("max_fill", default.max_fill)), schema=layout.schema,
            source_table=doc.get("source_table", default.source_table),
            time_column=doc.get("time_column", default.time_column),
            price_column=doc.get("price_column", default.price_column),
            sink=doc.get("sink"), bars=doc.get("bars"),
        )  # fmt: skip

    @property
    def layout(self) -> Layout:
        return Layout(self.schema, self.source_table, self.time_column, self.price_column)

    @property
    def columns(self) -> list[str]:
        return metrics.metric_columns(self.windows)

    @property
    def lookback_bars(self) -> int:
        return metrics.lookback_bars(self.windows)

    @property
    def lookback_minutes(self) -> int:
        return metrics.lookback_minutes(self.windows, self.max_fill)

    @cached_property  # asked once per job while planning
    def hash(self) -> str:
        doc = {**asdict(self), "formula_version": FORMULA_VERSION}
        for key in _LAKE_KEYS:  # absent unless set: a ledger of an older bqx keeps its hashes
            if doc[key] is None:
                del doc[key]
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]

    def describe(self) -> dict[str, Any]:
        """The parameters a person reads: windows, mode, max fill, tables."""
        return {
            "windows": list(self.windows), "mode": self.mode, "max_fill": self.max_fill,
            "schema": self.schema, "source_table": self.source_table,
            "time_column": self.time_column, "price_column": self.price_column,
            **self.lake_doc(),
        }  # fmt: skip

    def lake_doc(self) -> dict[str, str]:
        """The lake locations that are set: ``sink``, ``bars``."""
        return {k: v for k in _LAKE_KEYS if (v := getattr(self, k)) is not None}

    def target_doc(self, pair: str) -> dict[str, Any]:
        """The parameters a target table's rows depend on, as recorded per target."""
        schema, table = self.layout.source_name(pair)
        return {
            "windows": list(self.windows), "mode": self.mode, "max_fill": self.max_fill,
            "source": self.bars or f"{schema}.{table}", "time_column": self.time_column,
            "price_column": self.price_column, "formula_version": FORMULA_VERSION,
            "sink": self.sink,
        }  # fmt: skip


@dataclass(frozen=True)
class Job:
    """One (pair, month) and what its output depends on in the source.

    ``source_sig`` is the exact signature (every bar the job reads, hashed), ``source_ver``
    the signature built from the per-month versions bqx records when it writes bars; either
    may be None when unknown. Both cover the job's lookback as well as its month.
    """

    pair: str
    month: Month
    source_bars: int
    source_sig: str | None
    source_ver: str | None = None
    source_stats: str | None = None  # the source partition's write counters, as planned


JobKey = tuple[str, Month]


@dataclass
class RunSummary:
    """What a backfill run did, as recorded in the ledger."""

    run_id: int
    jobs_total: int = 0
    jobs_done: int = 0
    jobs_failed: int = 0
    jobs_skipped: int = 0
    rows_written: int = 0
    duration_s: float = 0.0
    status: str = "running"
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # pair, month, error

    @property
    def rows_per_s(self) -> float:
        return self.rows_written / self.duration_s if self.duration_s > 0 else 0.0

    @property
    def ok(self) -> bool:
        return self.jobs_failed == 0 and self.status in ("done", "running")

    def as_dict(self) -> dict[str, Any]:
        doc = {**asdict(self), "rows_per_s": self.rows_per_s}
        doc["failures"] = [
            {"pair": p.upper(), "month": str(m), "error": e} for p, m, e in self.failures
        ]
        return doc

    def text(self) -> str:
        from bqx.core.text import plural

        return (
            f"run {self.run_id}: {plural(self.jobs_done, 'job')} done, {self.jobs_skipped}"
            f" skipped, {self.jobs_failed} failed of {self.jobs_total}"
            f" · {plural(self.rows_written, 'row')} in {self.duration_s:.1f}s"
            f" ({self.rows_per_s:,.0f} rows/s)"
        )


@dataclass
class PlannedJob:
    pair: str
    month: Month
    action: str  # "do" or "skip"
    reason: str
    source_bars: int


@dataclass
class BackfillPlan:
    """What ``bqx backfill`` would do, and why, without doing any of it (``--dry-run``)."""

    jobs: list[PlannedJob]
    params: dict[str, Any]
    source_check: str

    @property
    def todo(self) -> list[PlannedJob]:
        return [j for j in self.jobs if j.action == "do"]

    @property
    def skipped(self) -> list[PlannedJob]:
        return [j for j in self.jobs if j.action == "skip"]

    def reasons(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for j in self.jobs:
            out[j.reason] = out.get(j.reason, 0) + 1
        return out

    def as_dict(self) -> dict[str, Any]:
        return {
            "dry_run": True, "jobs_total": len(self.jobs), "jobs_todo": len(self.todo),
            "jobs_skipped": len(self.skipped), "reasons": self.reasons(),
            "source_check": self.source_check, "params": self.params,
            "jobs": [
                {"pair": j.pair.upper(), "month": str(j.month), "action": j.action,
                 "reason": j.reason, "source_bars": j.source_bars}
                for j in self.jobs
            ],
        }  # fmt: skip

    def text(self) -> str:
        lines = [f"{j.action:4} {j.pair.upper()} {j.month}  {j.reason}" for j in self.jobs]
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(self.reasons().items()))
        lines.append(
            f"dry run: {len(self.todo)} of {len(self.jobs)} jobs to do, {len(self.skipped)}"
            f" to skip ({reasons}); nothing was written"
        )
        return "\n".join(lines)
