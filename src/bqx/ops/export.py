"""Metrics out to the tools researchers use: Arrow tables and Hive-partitioned Parquet.

``read_metrics`` streams a pair's target rows by binary COPY straight into numpy columns (no
Python object per row) and wraps them as a ``pyarrow.Table``; ``.to_pandas()`` and
``polars.from_arrow`` take it from there. ``export`` writes Parquet ``pair=…/month=…``, one month
at a time, so memory holds one month of one pair whatever the size of the database, and leaves
the directory equal to the table for the pairs and months it covers.
"""

from __future__ import annotations

import functools
import os
import shutil
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, cast

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from bqx.core.layout import Layout
from bqx.core.months import Month, check_span, in_range, month_range
from bqx.core.symbols import display, validate_pair
from bqx.errors import BqxError, InvalidOption
from bqx.ops.outdir import write_atomic
from bqx.store import catalog, targets

TimeLike = str | date | datetime | np.datetime64 | Any


def to_utc_us(value: TimeLike, what: str) -> np.datetime64:
    """An instant as naive-UTC datetime64[us]: ISO text (``2024-07``, ``2024-07-01T12:00``),
    date, datetime (aware ones converted to UTC, naive ones read as UTC), numpy or pandas."""
    given = value
    value = cast(Any, value)  # a str, date, datetime, numpy or pandas value: checked below
    if isinstance(value, bool | int | float | np.number):
        # numpy would read 5 as 5 µs after 1970 and fail on NaN: a number is not a time
        raise InvalidOption(what, given, "a number is not a time: give ISO text or a datetime")
    try:
        with warnings.catch_warnings():  # a refused value is one error, never also a warning
            warnings.simplefilter("ignore")
            if isinstance(value, datetime) and value.tzinfo is not None:
                value = value.astimezone(UTC).replace(tzinfo=None)
            elif type(value).__module__.startswith("pandas") and getattr(value, "tz", None):
                value = value.tz_convert("UTC").tz_localize(None).to_datetime64()
            elif isinstance(value, str) and value.strip().endswith(("Z", "+00:00")):
                value = value.strip().removesuffix("Z").removesuffix("+00:00")
            out = np.datetime64(value, "us")
    except (TypeError, ValueError) as exc:
        raise InvalidOption(what, given, str(exc)) from None
    if np.isnat(out):
        raise InvalidOption(what, given, "not a time")
    return out


def parse_columns(columns: str | Sequence[str] | None) -> list[str] | None:
    """Metric columns as asked: None (all), a name or comma list (``"rate"``,
    ``"rate,agg_bqx_max"``), or a sequence of names."""
    if columns is None:
        return None
    items = columns.split(",") if isinstance(columns, str) else list(columns)
    if not all(isinstance(c, str) for c in items):
        raise InvalidOption("columns", columns, "expected column names")
    names = [c.strip() for c in items if c.strip()]
    if not names:
        raise InvalidOption("columns", columns, "name at least one column, e.g. rate")
    return names


def metric_table_columns(conn: psycopg.Connection, layout: Layout, pair: str) -> list[str]:
    """The float columns of a pair's target table, in table order (``rate`` then the metrics)."""
    cols = targets.float_columns(conn, layout, pair)
    if cols is None:
        raise BqxError(
            f"{pair.upper()}: no metrics table {layout.schema}.{layout.target_name(pair)}"
            " (run `bqx backfill` first; see docs/ml.md)"
        )
    return cols


def _select_columns(
    available: Sequence[str], columns: str | Sequence[str] | None, pair: str
) -> list[str]:
    asked = parse_columns(columns)
    if asked is None:
        return list(available)
    wanted = [c for c in asked if c != "ts_utc"]
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
    columns: str | Sequence[str] | None = None,
) -> pa.Table:
    """A pair's stored BQX rows as a ``pyarrow.Table`` (see ``bqx.Store.read_metrics``)."""
    pair = validate_pair(pair)
    lo, hi = _bounds(start, end)
    names = _select_columns(metric_table_columns(conn, layout, pair), columns, pair)
    return _read(conn, layout, pair, names, lo, hi)


def _bounds(start: TimeLike | None, end: TimeLike | None) -> tuple[Any, Any]:
    """``read_metrics``' [start, end) as UTC microseconds (None: open), end not before start."""
    lo = None if start is None else to_utc_us(start, "start")
    hi = None if end is None else to_utc_us(end, "end")
    if lo is not None and hi is not None and hi < lo:
        raise InvalidOption("end", end, f"is before start {start!r} (start is inclusive, end"
                            " exclusive)")  # fmt: skip
    return lo, hi


def read_metrics_lake(
    lake: Any, pair: str, start: TimeLike | None = None, end: TimeLike | None = None,
    columns: str | Sequence[str] | None = None,
) -> pa.Table:  # fmt: skip
    """``read_metrics`` from a Delta sink (``bqx.destinations.delta.DeltaLake``): the same
    table as from the database's partitions."""
    pair = validate_pair(pair)
    lo, hi = _bounds(start, end)
    have = lake.columns()
    if have is None:
        raise BqxError(f"{pair.upper()}: no metrics in the Delta table at {lake.uri} (run"
                       " `bqx backfill --sink …` first)")  # fmt: skip
    names = _select_columns(have, columns, pair)
    bounds = [None if t is None else _aware(t) for t in (lo, hi)]
    table = lake.read_table(pair, bounds[0], bounds[1], names)
    return table.cast(pa.schema([pa.field("ts_utc", pa.timestamp("us", tz="UTC")),
                                 *(pa.field(n, pa.float64()) for n in names)]))  # fmt: skip


def _aware(t: np.datetime64) -> datetime:
    """A naive-UTC datetime64 as an aware datetime."""
    return datetime.fromisoformat(str(t.astype("datetime64[us]"))).replace(tzinfo=UTC)


def _read(
    conn: psycopg.Connection, layout: Layout, pair: str, names: list[str], lo: Any, hi: Any
) -> pa.Table:
    lo, hi = (None if t is None else np.datetime64(t, "us").item() for t in (lo, hi))
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
    columns: list[str] | None = None
    removed: list[str] = field(default_factory=list)  # partitions gone from the table

    @property
    def rows_per_s(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out), "pairs": self.pairs, "files": self.files, "rows": self.rows,
            "seconds": round(self.seconds, 3), "rows_per_s": round(self.rows_per_s, 1),
            "columns": self.columns, "removed": len(self.removed),
            "removed_partitions": self.removed,
        }  # fmt: skip

    def text(self) -> str:
        line = (
            f"exported {self.rows:,} rows of {len(self.pairs)} pairs in {self.files} files"
            f" to {self.out} in {self.seconds:.1f}s ({self.rows_per_s:,.0f} rows/s)"
        )
        if self.removed:
            shown = ", ".join(self.removed[:5]) + (", …" if len(self.removed) > 5 else "")
            line += f"; removed {len(self.removed)} partition(s) the table no longer holds: {shown}"
        return line


ProgressFn = Callable[..., None]  # progress(label, done, total, rows=…)


def _target_months(conn: psycopg.Connection, layout: Layout, pair: str) -> list[Month]:
    lo, hi = targets.time_bounds(conn, layout, pair)
    return [] if lo is None or hi is None else month_range(Month.of(lo), Month.of(hi))


def pair_dir(pair: str) -> str:
    """The Hive partition folder of a pair."""
    return f"pair={display(pair)}"


def export(
    conn: psycopg.Connection,
    layout: Layout,
    out: Path,
    *,
    pairs: Sequence[str] | None = None,
    start: Month | None = None,
    end: Month | None = None,
    columns: str | Sequence[str] | None = None,
    compression: str = "zstd",
    progress: ProgressFn | None = None,
) -> ExportSummary:
    """Write the metrics as Parquet, ``out/pair=EURUSD/month=2024-07/data.parquet``.

    One (pair, month) is read and written at a time. Each file is written under a name of its
    own beside its final name and renamed into place, so a reader never sees half a file, a
    rerun replaces it, and two exports into one directory never share a temporary file. The
    partitions of the covered pairs and months that the table no longer holds (bars deleted,
    a pair dropped) are removed, so the directory reads as the table does.
    The symbol is written as everywhere else, upper case (``WHERE pair = 'EURUSD'``).
    """
    check_span(start, end)
    summary = ExportSummary(Path(out))
    t0 = time.monotonic()
    have = catalog.target_pairs(conn, layout)
    todo = _chosen(pairs, have, "no metrics table for {} in schema"
                   f" {layout.schema} (run `bqx backfill` first)")  # fmt: skip
    # every pair's columns are checked before anything is written
    chosen = {p: _select_columns(metric_table_columns(conn, layout, p), columns, p) for p in todo}
    summary.columns = None if columns is None else chosen[todo[0]] if todo else []
    work = [
        (p, m) for p in todo for m in _target_months(conn, layout, p) if in_range(m, start, end)
    ]
    options = {"compression": compression}

    def one(pair: str, month: Month) -> pa.Table:
        return _read(conn, layout, pair, chosen[pair], month.start.replace(tzinfo=None),
                     month.end.replace(tzinfo=None))  # fmt: skip

    _write_months(summary, todo, work, one, options, progress,
                  stale=(start, end, None if pairs else set(have)))  # fmt: skip
    summary.seconds = time.monotonic() - t0
    return summary


def bars_writer_options() -> dict[str, Any]:
    """Parquet for bars that pays: byte-stream-split floats (zstd then finds the repeated
    exponent and high bytes of each price), delta-encoded sorted times, zstd, one row group
    per month."""
    floats = {c: "BYTE_STREAM_SPLIT" for c in ("open", "high", "low", "close", "volume")}
    return {"compression": "zstd", "use_dictionary": False,
            "column_encoding": {"time": "DELTA_BINARY_PACKED", **floats},
            "row_group_size": 1 << 17}  # fmt: skip


def _write_parquet(table: pa.Table, options: dict[str, Any], path: Path) -> None:
    pq.write_table(table, path, **options)


def export_bars(
    conn: psycopg.Connection, layout: Layout, out: Path, *, pairs: Sequence[str] | None = None,
    start: Month | None = None, end: Month | None = None, progress: ProgressFn | None = None,
) -> ExportSummary:  # fmt: skip
    """Today's source bars as Parquet in the shape ``--source`` reads:
    ``out/pair=EURUSD/month=2024-07/data.parquet`` with ``time`` (UTC) and ``open``, ``high``,
    ``low``, ``close``, ``volume``; each file renamed into place whole."""
    from bqx.store import bars

    check_span(start, end)
    summary = ExportSummary(Path(out))
    t0 = time.monotonic()
    have = catalog.source_pairs(conn, layout)
    todo = _chosen(pairs, have, "no source bars for {} in " + repr(layout.source_table))
    work = [(p, m) for p in todo for m in sorted(bars.month_counts(conn, layout, p))
            if in_range(m, start, end)]  # fmt: skip

    def one(pair: str, month: Month) -> pa.Table:
        times, v = bars.read_ohlcv(conn, layout, pair, month.start, month.end)
        return pa.table({
            "time": pa.array(times, pa.timestamp("us", tz="UTC")),
            **{c: pa.array(v[j]) for j, c in enumerate(("open", "high", "low", "close"))},
            "volume": pa.array(v[4], mask=np.isnan(v[4])),
        })  # fmt: skip

    _write_months(summary, todo, work, one, bars_writer_options(), progress, stale=None)
    summary.seconds = time.monotonic() - t0
    return summary


def export_lake(
    lake: Any, out: Path, *, pairs: Sequence[str] | None = None, start: Month | None = None,
    end: Month | None = None, columns: str | Sequence[str] | None = None,
    compression: str = "zstd", progress: ProgressFn | None = None,
) -> ExportSummary:  # fmt: skip
    """``export`` of metrics kept in a Delta sink: the same files as from the database."""
    check_span(start, end)
    summary = ExportSummary(Path(out))
    t0 = time.monotonic()
    have, todo, work = _lake_work(lake, pairs, start, end)
    chosen = {p: _select_columns(lake.columns() or [], columns, p) for p in todo}
    summary.columns = None if columns is None else chosen[todo[0]] if todo else []

    def one(pair: str, month: Month) -> pa.Table:
        return read_metrics_lake(lake, pair, month.start, month.end, chosen[pair])

    _write_months(summary, todo, work, one, {"compression": compression}, progress,
                  stale=(start, end, None if pairs else set(have)))  # fmt: skip
    summary.seconds = time.monotonic() - t0
    return summary


def _lake_work(
    lake: Any, pairs: Sequence[str] | None, start: Month | None, end: Month | None
) -> tuple[list[str], list[str], list[tuple[str, Month]]]:
    """(pairs the sink holds, pairs to export, their (pair, month) in range)."""
    stored = lake.files(pairs)
    have = sorted({p for p, _ in stored})
    todo = _chosen(pairs, have, "no metrics for {} in the Delta table at " + str(lake.uri))
    return have, todo, sorted((p, m) for p, m in stored if p in todo and in_range(m, start, end))


def _chosen(pairs: Sequence[str] | None, have: list[str], missing: str) -> list[str]:
    """The pairs asked for (all of ``have`` when none), each one of ``have``; else one error,
    ``missing`` with the absent ones in its ``{}``."""
    todo = [validate_pair(p) for p in pairs] if pairs else have
    absent = [p for p in todo if p not in have]
    if absent:
        raise BqxError(missing.replace("{}", ", ".join(display(p) for p in absent), 1))
    return todo


def _write_months(
    summary: ExportSummary, todo: list[str], work: list[tuple[str, Month]],
    read: Callable[[str, Month], pa.Table], options: dict[str, Any],
    progress: ProgressFn | None,
    stale: tuple[Month | None, Month | None, set[str] | None] | None,
) -> None:  # fmt: skip
    """Each (pair, month) of ``work``: its rows (``read``) written to ``pair=…/month=…/
    data.parquet`` and renamed into place whole, a month without rows skipped; progress as it
    goes. With ``stale`` (start, end, every pair's name or None), the partitions in that range
    that were not written are removed afterwards (``_remove_stale``)."""
    written: dict[str, set[Month]] = {p: set() for p in todo}
    if stale is not None:
        _adopt_other_case(summary.out, todo)
    for i, (pair, month) in enumerate(work):
        if progress is not None:
            progress("writing", i, len(work), rows=summary.rows)
        table = read(pair, month)
        if not table.num_rows:
            continue
        final = summary.out / pair_dir(pair) / f"month={month}" / "data.parquet"
        write_atomic(final, functools.partial(_write_parquet, table, options))
        summary.files += 1
        summary.rows += table.num_rows
        written[pair].add(month)
    summary.pairs = [display(p) for p in todo]
    if stale is not None:
        _remove_stale(summary, written, *stale)
    if progress is not None:
        progress("writing", len(work), len(work), rows=summary.rows)


def _remove_stale(
    summary: ExportSummary, written: dict[str, set[Month]], start: Month | None,
    end: Month | None, gone_too: set[str] | None,
) -> None:  # fmt: skip
    """Remove the partitions in [start, end] of the exported pairs that this export did not
    write (their rows are gone from the table); with ``gone_too`` (every pair exported), also
    those of pairs that have no metrics table any more."""
    if not summary.out.is_dir():
        return
    folders = {pair_dir(p): p for p in written}
    for folder in sorted(summary.out.glob("pair=*")):
        if folder.name in folders:
            keep = written[folders[folder.name]]
        elif gone_too is not None and _pair_gone(folder.name, gone_too):
            keep = set()
        else:
            continue
        for month_dir in sorted(folder.glob("month=*")):
            month = _month_of(month_dir.name)
            if month is None or month in keep or not in_range(month, start, end):
                continue
            data = month_dir / "data.parquet"
            if data.is_file():
                data.unlink(missing_ok=True)
                summary.removed.append(f"{folder.name}/{month_dir.name}")
            _rmdir(month_dir)
        _rmdir(folder)


def _pair_gone(folder: str, have: set[str]) -> bool:
    try:
        return validate_pair(folder.removeprefix("pair=")) not in have
    except BqxError:
        return False  # not a folder of bqx's naming: not ours to remove


def _month_of(folder: str) -> Month | None:
    try:
        return Month.parse(folder.removeprefix("month="))
    except BqxError:
        return None


def _rmdir(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (another writer's file, a user's file): it stays


def _adopt_other_case(out: Path, pairs: Sequence[str]) -> None:
    """Fold a ``pair=eurusd`` folder (older bqx wrote symbols lower case) into ``pair=EURUSD``,
    so that a dataset never holds one instrument under two names: renamed when the new one is
    not there yet, else its months that the new one lacks moved over and the rest dropped."""
    if not out.is_dir():
        return
    wanted = {pair_dir(p).lower(): pair_dir(p) for p in pairs}
    for old in out.iterdir():
        want = wanted.get(old.name.lower())
        if want is None or old.name == want or not old.is_dir():
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
