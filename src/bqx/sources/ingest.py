"""``bqx ingest``: the minute-bar files people actually have, into ``m1_{pair}``.

The files are read by ``bqx.sources.formats`` (HistData, Dukascopy, MetaTrader, generic CSV or
Parquet, also in ``.gz`` and ``.zip``) in blocks, so memory stays bounded whatever the file's
size. Valid bars are spilled per month to a temporary directory; once every file is read, each
month is merged into its partition in one transaction (``bqx.store.bars``): an interrupted
ingest leaves earlier months stored and the interrupted one as it was, and re-ingesting a file
changes nothing. Bad rows are not loaded: they go to a rejects file with file, physical line
number, reason and the row's text. Among rows with the same time, the last one read (last
file, last line) is kept; the others are counted as duplicates.
"""

from __future__ import annotations

import csv
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Generator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bqx.core.layout import Layout
from bqx.core.months import Month
from bqx.core.symbols import validate_pair
from bqx.db.connect import connect, pool
from bqx.errors import BqxError, InvalidOption
from bqx.sources.columns import FIELDS, US_PER_MIN, Block, why
from bqx.sources.formats import (
    FORMATS,
    Mapping,
    TextSpec,
    name_mismatch,
    read_blocks,
    reading_plan,
    sniff,
)
from bqx.store.bars import LoadResult, level_near, load_bars
from bqx.store.catalog import check_nullable
from bqx.store.ddl import ensure_source

MISMATCH_FACTOR = 1.5  # input median close vs the stored level: beyond this, another pair?
REJECTS_HEADER = ["file", "line", "reason", "text"]


@dataclass
class FileSummary:
    path: str
    format: str
    lines: int = 0
    accepted: int = 0
    rejected: int = 0


@dataclass
class IngestSummary:
    """What an ingest did. ``accepted`` counts distinct bars stored (duplicates excluded)."""

    pair: str
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    dropped_flat: int = 0  # flat zero-volume bars left out (--drop-flat)
    rejects_file: str | None = None
    rejects_replaced: bool = False  # rejects_file overwrote the one of an earlier run
    stale_rejects_removed: str | None = None  # an earlier run's rejects file, now obsolete
    files: list[FileSummary] = field(default_factory=list)
    months: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "pair": self.pair.upper(), "accepted": self.accepted, "rejected": self.rejected,
            "duplicates": self.duplicates, "rejects_file": self.rejects_file,
            "inserted": self.inserted, "updated": self.updated, "unchanged": self.unchanged,
            "dropped_flat": self.dropped_flat, "rejects_replaced": self.rejects_replaced,
            "stale_rejects_removed": self.stale_rejects_removed,
            "months": self.months, "seconds": round(self.seconds, 3),
            "files": [vars(f) for f in self.files],
        }  # fmt: skip

    def line(self) -> str:
        """The one-line summary: what happened to the bars read."""
        parts = [
            f"{self.pair.upper()}: {_n(self.accepted, 'bar')} read: {self.inserted:,} new,"
            f" {self.updated:,} changed, {self.unchanged:,} unchanged",
            f"{_n(self.rejected, 'line')} rejected",
            _n(self.duplicates, "duplicate"),
        ]
        if self.dropped_flat:
            parts.append(f"{_n(self.dropped_flat, 'flat zero-volume bar')} dropped")
        return "; ".join(parts) + f" ({self.seconds:.1f}s)"

    def text(self) -> str:
        """The summary line, and where the rejects went."""
        lines = [self.line()]
        if self.rejects_file:
            again = " (replaces the file of an earlier run)" if self.rejects_replaced else ""
            lines.append(f"rejected rows with line and reason: {self.rejects_file}{again}")
        if self.stale_rejects_removed:
            lines.append(f"removed the rejects file of an earlier run: {self.stale_rejects_removed}"
                         " (nothing rejected now)")  # fmt: skip
        return "\n".join(lines)


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


# -- spill and store ----------------------------------------------------------------------------


class _Spill:
    """Valid rows per month on disk: (time µs, input order, o, h, l, c, v) records."""

    dtype = np.dtype([("t", "<i8"), ("seq", "<i8"), ("v", "<f8", (5,))])

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.seq = 0
        self.nulls = np.zeros(3, bool)  # some open, high, low is NULL

    def add(self, times: np.ndarray, ohlcv: np.ndarray) -> None:
        if not len(times):
            return
        self.nulls |= np.isnan(ohlcv[:, :3]).any(axis=0)
        rec = np.empty(len(times), dtype=self.dtype)
        rec["t"], rec["v"] = times, ohlcv
        rec["seq"] = np.arange(self.seq, self.seq + len(times))
        self.seq += len(times)
        months = (times // US_PER_MIN).astype("datetime64[m]").astype("datetime64[M]")
        if months[0] == months[-1] and (months == months[0]).all():
            groups = [(months[0], rec)]
        else:
            order = np.argsort(months, kind="stable")
            ms, starts = np.unique(months[order], return_index=True)
            groups = list(zip(ms, np.split(rec[order], starts[1:]), strict=True))
        for m, part in groups:
            with open(self.dir / f"{m}.bin", "ab") as f:
                f.write(part.tobytes())

    def months(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.bin"))

    def read(self, month: str) -> tuple[np.ndarray, np.ndarray, int]:
        """(times datetime64[us], ohlcv) sorted and unique, the last row read winning; dups."""
        rec = np.fromfile(self.dir / f"{month}.bin", dtype=self.dtype)
        if len(rec) > 1 and not (np.diff(rec["t"]) > 0).all():
            rec = rec[np.lexsort((rec["seq"], rec["t"]))]
            last = np.ones(len(rec), dtype=bool)
            last[:-1] = rec["t"][1:] != rec["t"][:-1]
            dups = int((~last).sum())
            rec = rec[last]
        else:
            dups = 0
        return rec["t"].astype("datetime64[us]"), rec["v"], dups

    def median_close(self, month: str) -> float:
        rec = np.fromfile(self.dir / f"{month}.bin", dtype=self.dtype)
        return float(np.median(rec["v"][:, 3]))


def _check_level(url: str, layout: Layout, pair: str, spill: _Spill, paths: Sequence[Path]) -> None:
    """Refuse bars whose level is far from the pair's stored bars near those months.

    Catches another pair's file given the wrong ``--pair`` (USDJPY near 150 into EURUSD near
    1.08) before anything is written. A pair without stored bars nearby is not checked.
    """
    with connect(url, autocommit=True) as conn:
        for month in spill.months():
            m = Month.parse(month)
            stored = level_near(conn, layout, pair, m)
            if stored is None:
                continue
            given = spill.median_close(month)
            ratio = max(stored / given, given / stored) if given > 0 else float("inf")
            if ratio > MISMATCH_FACTOR:
                what = str(paths[0]) if len(paths) == 1 else "the input"
                raise BqxError(
                    f"{what}: median close {given:.6g} in {m} is {ratio:.1f}x off the stored"
                    f" {pair.upper()} bars' level {stored:.6g} near that month: is it another"
                    " pair's file? Nothing was stored (--allow-mismatch loads it anyway)"
                )


def _store(
    url: str, layout: Layout, pair: str, spill: _Spill, summary: IngestSummary,
    progress: Callable[[str], None] | None,
) -> None:  # fmt: skip
    """Merge each spilled month into its partition, one transaction a month, two at a time."""
    months = spill.months()
    if not months:
        return
    with connect(url, autocommit=True) as conn:  # DDL first: concurrent CREATEs would collide
        if spill.nulls.any():
            nullable = [f for f, null in zip(FIELDS, spill.nulls, strict=False) if null]
            check_nullable(conn, layout, pair, nullable)
        ensure_source(conn, layout, pair, [Month.parse(m) for m in months])

    def store(month: str) -> tuple[int, int, LoadResult]:
        times, ohlcv, dups = spill.read(month)
        with conns.connection() as conn:
            result = load_bars(conn, layout, pair, times, ohlcv, mode="merge")
        return len(times), dups, result

    with pool(url, 2) as conns, ThreadPoolExecutor(max_workers=2) as threads:
        futures: list[Future[tuple[int, int, LoadResult]]] = [
            threads.submit(store, m) for m in months
        ]
        try:
            for month, fut in zip(months, futures, strict=True):
                n, dups, result = fut.result()
                summary.duplicates += dups
                summary.inserted += result.inserted
                summary.updated += result.updated
                summary.unchanged += result.unchanged
                summary.accepted += n
                summary.months[str(Month.parse(month))] = n
                if progress:
                    progress(
                        f"{pair.upper()} {month}: {_n(n, 'bar')} ({result.inserted:,} new,"
                        f" {result.updated:,} changed, {result.unchanged:,} unchanged)"
                    )
        except BaseException:
            for fut in futures:  # months not started yet are not started at all
                fut.cancel()
            raise


# -- the ingest ---------------------------------------------------------------------------------


def _check_inputs(
    paths: list[Path], fmt: str, tz: str | None, mapping: Mapping, pair: str, allow_mismatch: bool
) -> list[tuple[str, TextSpec | None]]:
    """Every input readable and in a known format, the time zone known: before any write."""
    _check_tz(tz)
    plans: list[tuple[str, TextSpec | None]] = []
    for p in paths:
        _check_readable(p)
        _check_name(p, pair, allow_mismatch)
        kind = sniff(p) if fmt == "auto" else fmt
        _check_zone(p, kind, tz)
        plans.append((kind, reading_plan(p, kind, mapping, tz)))
    return plans


def _check_tz(tz: str | None) -> None:
    """A zone both Python and Arrow know (Arrow converts the times, Python names them)."""
    if tz is not None:
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(tz)
            pc.assume_timezone(pa.array([0], pa.timestamp("us")), tz)
        except Exception:
            raise InvalidOption(
                "tz", tz, "unknown time zone (e.g. UTC, EET, Europe/Athens, Etc/GMT-2)"
            ) from None


def _check_readable(p: Path) -> None:
    if p.is_dir():
        raise BqxError(f"{p}: is a directory, not a file")
    if not p.is_file():
        raise BqxError(f"{p}: no such file")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise BqxError(f"{p}: cannot read: {why(exc)}") from None


def _check_name(p: Path, pair: str, allow_mismatch: bool) -> None:
    """A file whose name spells other pairs only is refused, unless mismatches are allowed."""
    named = name_mismatch(p, pair)
    if named and not allow_mismatch:
        other = "/".join(sorted(n.upper() for n in named))
        raise BqxError(
            f"{p}: the file name says {other}, not {pair.upper()}: give --pair {other}, or"
            " --allow-mismatch if the file really holds"
            f" {pair.upper()} bars"
        )


def _check_zone(p: Path, kind: str, tz: str | None) -> None:
    """--tz is refused where the format fixes the zone, and needed where it does not."""
    if kind == "histdata" and tz not in (None, "UTC"):
        # the times would be shifted twice: from EST, then again from --tz
        raise BqxError(
            f"{p}: HistData.com times are fixed EST (UTC-5) all year and converted to UTC"
            " by bqx: drop --tz"
        )
    if kind == "klines" and tz not in (None, "UTC"):
        raise BqxError(f"{p}: kline open times count from 1970 in UTC: drop --tz")
    if kind == "metatrader" and tz is None:
        raise BqxError(
            f"{p}: MetaTrader times are in the broker's server time: give --tz"
            " (e.g. --tz Etc/GMT-2, or --tz UTC)"
        )


def _is_rejects_file(path: Path) -> bool:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.readline().strip() == ",".join(REJECTS_HEADER)
    except OSError:
        return False


def _writable_dir(directory: Path) -> bool:
    return directory.is_dir() and os.access(directory, os.W_OK | os.X_OK)


def _rejects_target(given: Path | None, paths: Sequence[Path]) -> Path:
    """Where the rejects file goes, checked before anything is read or written.

    Never an input file, nor an existing file that is not a bqx rejects file (an earlier
    run's rejects file of the same name is replaced, or removed when nothing is rejected).
    The default is ``FIRST_FILE.rejects.csv`` next to the first input, in the current
    directory if that one is read-only.
    """
    if given is None:
        target, option = _default_rejects(paths[0]), "the rejects file"
    else:
        target, option = given, "--rejects"
    _check_not_input(target, option, paths)
    _check_rejects_writable(target, option)
    return target


def _default_rejects(first: Path) -> Path:
    default = first.name + ".rejects.csv"
    target = first.with_name(default)
    if not _writable_dir(target.parent):
        target = Path.cwd() / default
    return target


def _check_not_input(target: Path, option: str, paths: Sequence[Path]) -> None:
    for p in paths:
        if target.exists() and p.exists() and os.path.samefile(target, p):
            raise BqxError(f"{option} {target} is an input file: give another --rejects path")


def _check_rejects_writable(target: Path, option: str) -> None:
    """A file path, writable, and not a file of something else (it will be overwritten)."""
    if target.is_dir():
        raise BqxError(f"{option} {target} is a directory: give a file path")
    if target.exists():
        if not _is_rejects_file(target):
            raise BqxError(
                f"{option} {target} exists and is not a bqx rejects file: give another"
                " --rejects path, or remove it"
            )
        if not os.access(target, os.W_OK) or not _writable_dir(target.parent):
            raise BqxError(f"cannot write rejects file {target}: permission denied")
    elif not target.parent.is_dir():
        raise BqxError(f"cannot write rejects file {target}: no such directory {target.parent}")
    elif not _writable_dir(target.parent):
        raise BqxError(f"cannot write rejects file {target}: permission denied")


class _Rejects:
    """The rejects file ``file,line,reason,text``: written aside, put in place at the end."""

    def __init__(self, path: Path, scratch: Path) -> None:
        self.path, self.scratch = path, scratch
        self.file: IO[str] | None = None
        self.writer: Any = None
        self.count = 0

    def add(self, src: Path, line: int, reason: str, text: str) -> None:
        if self.writer is None:
            self.file = open(self.scratch, "w", newline="", encoding="utf-8")  # noqa: SIM115
            self.writer = csv.writer(self.file)
            self.writer.writerow(REJECTS_HEADER)
        self.writer.writerow([str(src), line, reason, text])
        self.count += 1

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None

    def publish(self, summary: IngestSummary) -> None:
        """Put the rejects in place, or remove an earlier run's file when nothing was rejected."""
        self.close()
        existed = self.path.exists()
        try:
            if self.count:
                shutil.move(self.scratch, self.path)
                summary.rejects_file = str(self.path)
                summary.rejects_replaced = existed
            elif existed:
                self.path.unlink()
                summary.stale_rejects_removed = str(self.path)
        except OSError as exc:
            raise BqxError(f"cannot write rejects file {self.path}: {why(exc)}") from None


def ingest_files(
    url: str,
    layout: Layout,
    files: Sequence[str | Path],
    pair: str,
    *,
    fmt: str = "auto",
    tz: str | None = None,
    mapping: Mapping | None = None,
    rejects_path: str | Path | None = None,
    allow_mismatch: bool = False,
    drop_flat: bool = False,
    progress: Callable[[str], None] | None = None,
) -> IngestSummary:
    """Load bar files for one pair into ``m1_{pair}``; bad rows go to a rejects file.

    The pair (against the files' names), the format, every file, the time zone and the
    rejects path are checked before anything is read or written. Every file is then read
    before anything is stored, so a broken file changes nothing, and the input's price level
    is compared with the stored bars' (``allow_mismatch`` skips both pair checks). The rejects
    file (default ``FIRST_FILE.rejects.csv``) is written only when a row is rejected; an
    earlier run's file of the same name is replaced, or removed when nothing is rejected now.
    ``drop_flat`` leaves out flat zero-volume bars (open = high = low = close, volume 0:
    Dukascopy's filler for closed markets). When rows were rejected and none accepted, the
    ingest fails after writing the rejects file.
    """
    pair = validate_pair(pair)
    _check_args(fmt, files)
    paths = [Path(f) for f in files]
    mapping = mapping or Mapping()
    plans = _check_inputs(paths, fmt, tz, mapping, pair, allow_mismatch)
    target = _rejects_target(Path(rejects_path) if rejects_path else None, paths)
    t0 = time.monotonic()
    summary = IngestSummary(pair)
    with tempfile.TemporaryDirectory(prefix="bqx-ingest-") as tmp:
        rejects = _Rejects(target, Path(tmp) / "rejects.csv")
        try:
            spill = _Spill(Path(tmp))
            for path, (kind, spec) in zip(paths, plans, strict=True):
                fs = FileSummary(str(path), kind)
                summary.files.append(fs)
                if progress:
                    progress(f"{path}: {kind}" + (" (detected)" if fmt == "auto" else ""))
                blocks = read_blocks(path, spec, tz, mapping)
                _read_file(path, blocks, fs, spill, rejects, summary, drop_flat=drop_flat)
            rejects.close()
            summary.rejected = rejects.count
            if not allow_mismatch:
                _check_level(url, layout, pair, spill, paths)
            rejects.publish(summary)
            _check_some_accepted(summary, spill)
            _store(url, layout, pair, spill, summary, progress)
        finally:
            rejects.close()
    summary.seconds = time.monotonic() - t0
    return summary


def _check_args(fmt: str, files: Sequence[str | Path]) -> None:
    if fmt not in FORMATS:
        raise InvalidOption("format", fmt, f"unknown format: one of {', '.join(FORMATS)}")
    if not files:
        raise BqxError("no input file given")


def _read_file(
    path: Path, blocks: Generator[Block, None, None], fs: FileSummary, spill: _Spill,
    rejects: _Rejects, summary: IngestSummary, *, drop_flat: bool,
) -> None:  # fmt: skip
    """Spill a file's valid bars and write its rejected rows, counted in ``fs``."""
    before = rejects.count
    with closing(blocks):  # on an error, parsing threads stop here, not later
        for block in blocks:
            for line, reason, text in block.rejects:
                rejects.add(path, line, reason, text)
            times, ohlcv = block.times, block.ohlcv
            if drop_flat:
                times, ohlcv, dropped = _without_flat(times, ohlcv)
                summary.dropped_flat += dropped
            spill.add(times, ohlcv)
            fs.accepted += len(times)
            fs.lines = max(fs.lines, block.last_line)
    fs.rejected = rejects.count - before


def _without_flat(times: np.ndarray, ohlcv: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """The bars but flat zero-volume ones (open = high = low = close, volume 0); how many."""
    if not len(times):
        return times, ohlcv, 0
    o, h, lo, c, v = ohlcv.T
    flat = (o == h) & (h == lo) & (lo == c) & (v == 0)
    if not flat.any():
        return times, ohlcv, 0
    return times[~flat], ohlcv[~flat], int(flat.sum())


def _check_some_accepted(summary: IngestSummary, spill: _Spill) -> None:
    """Rows rejected and no bar read (dropped ones aside) is a failure, not an empty ingest."""
    if summary.rejected and not spill.seq and not summary.dropped_flat:
        raise BqxError(
            f"every bar was rejected ({_n(summary.rejected, 'line')}), nothing stored:"
            f" reasons in {summary.rejects_file}"
        )
