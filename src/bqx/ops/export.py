"""Metrics out to the tools researchers use: Arrow tables and Hive-partitioned Parquet.

``read_metrics`` streams a pair's target rows by binary COPY straight into numpy columns (no
Python object per row) and wraps them as a ``pyarrow.Table``; ``.to_pandas()`` and
``polars.from_arrow`` take it from there. ``export`` writes Parquet ``pair=…/month=…``, one month
at a time, so memory holds one month of one pair whatever the size of the database.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from bqx.core.layout import Layout
from bqx.core.months import Month, in_range, month_range
from bqx.core.symbols import display, validate_pair
from bqx.errors import BqxError
from bqx.store import catalog, targets

TimeLike = str | date | datetime | np.datetime64 | Any


def to_utc_us(value: TimeLike, what: str) -> np.datetime64:
    """An instant as naive-UTC datetime64[us]: ISO text (``2024-07``, ``2024-07-01T12:00``),
    date, datetime (aware ones converted to UTC, naive ones read as UTC), numpy or pandas."""
    given = value
    value = cast(Any, value)  # a str, date, datetime, numpy or pandas value: checked below
    try:
        if isinstance(value, datetime) and value.tzinfo is not None:
            value = value.astimezone(UTC).replace(tzinfo=None)
        elif type(value).__module__.startswith("pandas") and getattr(value, "tz", None):
            value = value.tz_convert("UTC").tz_localize(None).to_datetime64()
        elif isinstance(value, str) and value.strip().endswith(("Z", "+00:00")):
            value = value.strip().removesuffix("Z").removesuffix("+00:00")
        out = np.datetime64(value, "us")
    except (TypeError, ValueError) as exc:
        raise BqxError(f"invalid {what} {given!r}: {exc}") from None
    if np.isnat(out):
        raise BqxError(f"invalid {what} {value!r}: not a time")
    return out


def metric_table_columns(conn: psycopg.Connection, layout: Layout, pair: str) -> list[str]:
    """The float columns of a pair's target table, in table order (``rate`` then the metrics)."""
    cols = targets.float_columns(conn, layout, pair)
    if cols is None:
        raise BqxError(
            f"{pair.upper()}: no metrics table {layout.schema}.{layout.target_name(pair)}"
            " (run `bqx backfill` first; see docs/ml.md)"
        )
    return cols


def _select_columns(available: Sequence[str], columns: Sequence[str] | None, pair: str) -> list:
    if columns is None:
        return list(available)
    wanted = [c for c in columns if c != "ts_utc"]
    unknown = [c for c in wanted if c not in available]
    if unknown:
        raise BqxError(
            f"{pair.upper()}: unknown metric column(s) {', '.join(map(repr, unknown))};"
            f" available: ts_utc, {', '.join(available)}"
        )
    return list(dict.fromkeys(wanted))


def _arrow_table(times: np.ndarray, names: Sequence[str], values, nulls) -> pa.Table:
    arrays = [pa.array(times, type=pa.timestamp("us", tz="UTC"))]
    for j in range(len(names)):
        mask = nulls[j]
        arrays.append(pa.array(values[j], mask=mask if mask.any() else None))
    return pa.Table.from_arrays(arrays, names=["ts_utc", *names])


def read_metrics_conn(
    conn: psycopg.Connection,
    layout: Layout,
    pair: str,
    start: TimeLike | None = None,
    end: TimeLike | None = None,
    columns: Sequence[str] | None = None,
) -> pa.Table:
    """A pair's stored BQX rows as a ``pyarrow.Table`` (see ``bqx.Store.read_metrics``)."""
    pair = validate_pair(pair)
    names = _select_columns(metric_table_columns(conn, layout, pair), columns, pair)
    lo = None if start is None else to_utc_us(start, "start").item()
    hi = None if end is None else to_utc_us(end, "end").item()
    times, values, nulls = targets.read_columns(conn, layout, pair, names, lo, hi)
    return _arrow_table(times, names, values, nulls)


# -- export -------------------------------------------------------------------------------


@dataclass
class ExportSummary:
    out: Path
    pairs: list[str] = field(default_factory=list)
    files: int = 0
    rows: int = 0
    seconds: float = 0.0

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "pairs": self.pairs, "files": self.files, "rows": self.rows,
            "seconds": round(self.seconds, 3), "rows_per_s": round(self.rows_per_s, 1),
        }  # fmt: skip

    def text(self) -> str:
        return (
            f"exported {self.rows:,} rows of {len(self.pairs)} pairs in {self.files} files"
            f" to {self.out} in {self.seconds:.1f}s ({self.rows_per_s:,.0f} rows/s)"
        )


def _target_months(conn: psycopg.Connection, layout: Layout, pair: str) -> list[Month]:
    lo, hi = targets.time_bounds(conn, layout, pair)
    return [] if lo is None or hi is None else month_range(Month.of(lo), Month.of(hi))


def export(
    conn: psycopg.Connection,
    layout: Layout,
    out: Path,
    *,
    pairs: Sequence[str] | None = None,
    start: Month | None = None,
    end: Month | None = None,
    compression: str = "zstd",
) -> ExportSummary:
    """Write the metrics as Parquet, ``out/pair=EURUSD/month=2024-07/data.parquet``.

    One (pair, month) is read and written at a time. Each file is written beside its final
    name and renamed into place, so a reader never sees half a file and a rerun replaces it.
    The symbol is written as everywhere else, upper case (``WHERE pair = 'EURUSD'``).
    """
    summary = ExportSummary(Path(out))
    t0 = time.monotonic()
    have = catalog.target_pairs(conn, layout)
    todo = [validate_pair(p) for p in pairs] if pairs else have
    missing = [p for p in todo if p not in have]
    if missing:
        raise BqxError(
            f"no metrics table for {', '.join(p.upper() for p in missing)} in schema"
            f" {layout.schema} (run `bqx backfill` first)"
        )
    for pair in todo:
        _adopt_other_case(summary.out, pair)
        for month in _target_months(conn, layout, pair):
            if in_range(month, start, end):
                _export_month(conn, layout, pair, month, summary, compression)
        summary.pairs.append(display(pair))
    summary.seconds = time.monotonic() - t0
    return summary


def _export_month(
    conn: psycopg.Connection, layout: Layout, pair: str, month: Month, summary: ExportSummary,
    compression: str,
) -> None:  # fmt: skip
    table = read_metrics_conn(conn, layout, pair, month.start, month.end)
    if table.num_rows == 0:
        return
    folder = summary.out / f"pair={display(pair)}" / f"month={month}"
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / ".data.parquet.tmp"
    pq.write_table(table, tmp, compression=compression)
    os.replace(tmp, folder / "data.parquet")
    summary.files += 1
    summary.rows += table.num_rows


def _adopt_other_case(out: Path, pair: str) -> None:
    """Fold a ``pair=eurusd`` folder (older bqx wrote symbols lower case) into ``pair=EURUSD``,
    so that a dataset never holds one instrument under two names: renamed when the new one is
    not there yet, else its months that the new one lacks moved over and the rest dropped."""
    if not out.is_dir():
        return
    want = f"pair={display(pair)}"
    for old in out.iterdir():
        if old.name == want or old.name.lower() != want.lower() or not old.is_dir():
            continue
        new = out / want
        if not new.exists() or old.samefile(new):  # samefile: a case-insensitive file system
            tmp = out / f".{old.name}.renaming"
            os.replace(old, tmp)  # via another name: a case-only rename is a no-op on some
            os.replace(tmp, new)
            continue
        for month in old.iterdir():
            if not (new / month.name).exists():
                os.replace(month, new / month.name)
        shutil.rmtree(old)
