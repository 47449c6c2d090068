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
from bqx.db.connect import DatabaseLike, connect, pool
from bqx.errors import BqxError, InvalidOption, NeedsOption
from bqx.sources.columns import FIELDS, OFF_MINUTE, US_PER_MIN, Block, RepeatedHours, why
from bqx.sources.formats import (
    FORMATS,
    Mapping,
    TextSpec,
    name_mismatch,
    read_blocks,
    reading_plan,
    sniff,
)
from bqx.sources.spill import Spill, TickSpill
from bqx.store.bars import LoadResult, level_near, load_bars, month_slices
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
    removed_flat: int = 0  # ... of which stored by an earlier ingest, and removed now
    ticks: int = 0  # ticks read and aggregated into the bars (0: the files held bars)
    warnings: list[str] = field(default_factory=list)  # one line each
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
            "dropped_flat": self.dropped_flat, "removed_flat": self.removed_flat,
            "ticks": self.ticks, "warnings": self.warnings,
            "rejects_replaced": self.rejects_replaced,
            "stale_rejects_removed": self.stale_rejects_removed,
            "months": self.months, "seconds": round(self.seconds, 3),
            "files": [vars(f) for f in self.files],
        }  # fmt: skip

    def line(self) -> str:
        """The one-line summary: what happened to the bars read."""
        ticks = f" (from {_n(self.ticks, 'tick')})" if self.ticks else ""
        parts = [
            f"{self.pair.upper()}: {_n(self.accepted, 'bar')} read{ticks}: {self.inserted:,}"
            f" new, {self.updated:,} changed, {self.unchanged:,} unchanged",
            f"{_n(self.rejected, 'line')} rejected",
            _n(self.duplicates, "duplicate"),
        ]
        if self.dropped_flat or self.removed_flat:
            parts.append(
                f"{_n(self.dropped_flat, 'flat zero-volume bar')} dropped"
                + (f", {self.removed_flat:,} of them removed from the stored bars too"
                   if self.removed_flat else "")
            )  # fmt: skip
        return "; ".join(parts) + f" ({self.seconds:.1f}s)"

    def text(self) -> str:
        """The summary line, warnings, and where the rejects went."""
        lines = [self.line(), *(f"warning: {w}" for w in self.warnings)]
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


def _check_level(
    url: DatabaseLike, layout: Layout, pair: str, spill: Spill, paths: Sequence[Path]
) -> None:
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
    url: DatabaseLike, layout: Layout, pair: str, spill: Spill, flat: _Flat, summary: IngestSummary,
    progress: Callable[[str], None] | None,
) -> None:  # fmt: skip
    """Merge each spilled month into its partition, one transaction a month, two at a time."""
    months = spill.months()
    if not months and not flat.months():
        return
    with connect(url, autocommit=True) as conn:  # DDL first: concurrent CREATEs would collide
        if spill.nulls.any():
            nullable = [f for f, null in zip(FIELDS, spill.nulls, strict=False) if null]
            check_nullable(conn, layout, pair, nullable)
        ensure_source(conn, layout, pair, [Month.parse(m) for m in months])

    def store(month: str) -> tuple[int, int, LoadResult]:
        if month in months:
            times, ohlcv, dups = spill.read(month)
        else:  # only flat bars were read for this month
            times, ohlcv, dups = np.empty(0, "datetime64[us]"), np.empty((0, 5)), 0
        with conns.connection() as conn:
            result = load_bars(conn, layout, pair, times, ohlcv, mode="merge",
                               flat=flat.of(month))  # fmt: skip
        return len(times), dups, result

    todo = sorted({*months, *flat.months()})
    with pool(url, 2) as conns, ThreadPoolExecutor(max_workers=2) as threads:
        futures: list[Future[tuple[int, int, LoadResult]]] = [
            threads.submit(store, m) for m in todo
        ]
        try:
            for month, fut in zip(todo, futures, strict=True):
                n, dups, result = fut.result()
                _count(summary, month, n, dups, result)
                if progress and n:
                    progress(
                        f"{pair.upper()} {month}: {_n(n, 'bar')} ({result.inserted:,} new,"
                        f" {result.updated:,} changed, {result.unchanged:,} unchanged)"
                    )
        except BaseException:
            for fut in futures:  # months not started yet are not started at all
                fut.cancel()
            raise


def _count(summary: IngestSummary, month: str, n: int, dups: int, result: LoadResult) -> None:
    summary.duplicates += dups
    summary.inserted += result.inserted
    summary.updated += result.updated
    summary.unchanged += result.unchanged
    summary.removed_flat += result.removed_flat
    summary.accepted += n
    if n:
        summary.months[str(Month.parse(month))] = n


class _Flat:
    """Times (µs) of the flat zero-volume bars left out (``drop_flat``), by month."""

    def __init__(self) -> None:
        self.parts: list[np.ndarray] = []
        self.by_month: dict[str, np.ndarray] | None = None

    def add(self, times: np.ndarray) -> None:
        if len(times):
            self.parts.append(times)
            self.by_month = None

    def _split(self) -> dict[str, np.ndarray]:
        if self.by_month is None:
            times = np.sort(np.concatenate(self.parts)) if self.parts else np.empty(0, np.int64)
            stamps = times.astype("datetime64[us]")
            self.by_month = {str(m): stamps[sl] for m, sl in month_slices(stamps)}
        return self.by_month

    def months(self) -> list[str]:
        return sorted(self._split())

    def of(self, month: str) -> np.ndarray:
        return self._split().get(month, np.empty(0, "datetime64[us]"))


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
        kind = _kind(p)
        if kind is None:
            raise BqxError(f"{p}: no such file")
        # a pipe or a device can be read once only, and bqx reads a file more than once
        # (sniffing the format, then loading): say what it is instead of "no such file"
        raise BqxError(f"{p}: is {kind}, not a regular file: save its contents to a file first")
    try:
        with open(p, "rb") as f:
            f.read(1)
    except OSError as exc:
        raise BqxError(f"{p}: cannot read: {why(exc)}") from None


def _kind(p: Path) -> str | None:
    """What a path that exists but is no regular file is; None when nothing is there."""
    import stat

    try:
        mode = p.stat().st_mode
    except FileNotFoundError:
        return "a broken symbolic link" if p.is_symlink() else None
    except OSError as exc:
        return f"unreadable ({why(exc)})"
    kinds = {
        "a named pipe (FIFO)": stat.S_ISFIFO, "a socket": stat.S_ISSOCK,
        "a character device": stat.S_ISCHR, "a block device": stat.S_ISBLK,
    }  # fmt: skip
    return next((kind for kind, test in kinds.items() if test(mode)), "neither file nor folder")


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
        self.off_minute = 0  # rejected for a time off the minute: a tick file?

    def add(self, src: Path, line: int, reason: str, text: str) -> None:
        if self.writer is None:
            self.file = open(self.scratch, "w", newline="", encoding="utf-8")  # noqa: SIM115
            self.writer = csv.writer(self.file)
            self.writer.writerow(REJECTS_HEADER)
        self.writer.writerow([str(src), line, reason, text])
        self.count += 1
        self.off_minute += reason.startswith(OFF_MINUTE)

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
    url: DatabaseLike,
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
            spill = TickSpill(Path(tmp)) if mapping.ticks else Spill(Path(tmp))
            flat = _Flat()
            for path, (kind, spec) in zip(paths, plans, strict=True):
                fs = FileSummary(str(path), kind)
                summary.files.append(fs)
                if progress:
                    progress(f"{path}: {kind}" + (" (detected)" if fmt == "auto" else ""))
                blocks = read_blocks(path, spec, tz, mapping)
                _read_file(path, blocks, fs, spill, rejects, summary,
                           flat=flat if drop_flat else None)  # fmt: skip
            rejects.close()
            summary.rejected = rejects.count
            summary.ticks = spill.ticks if isinstance(spill, TickSpill) else 0
            if not allow_mismatch:
                _check_level(url, layout, pair, spill, paths)
            rejects.publish(summary)
            _check_some_accepted(summary, spill, rejects.off_minute)
            _store(url, layout, pair, spill, flat, summary, progress)
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
    path: Path, blocks: Generator[Block, None, None], fs: FileSummary, spill: Spill,
    rejects: _Rejects, summary: IngestSummary, *, flat: _Flat | None,
) -> None:  # fmt: skip
    """Spill a file's valid bars and write its rejected rows, counted in ``fs``.

    Lines whose local time falls in the hour that clocks repeat are held until the file's end,
    when their order tells which instant each is (``RepeatedHours``).
    """
    before = rejects.count
    folds = RepeatedHours()
    sample: list[np.ndarray] = []  # the first bars' times, for their spacing

    def keep(times: np.ndarray, ohlcv: np.ndarray) -> None:
        if flat is not None:
            times, ohlcv, dropped = _without_flat(times, ohlcv, flat)
            summary.dropped_flat += dropped
        spill.add(times, ohlcv)
        fs.accepted += len(times)
        if sum(map(len, sample)) < SPACING_SAMPLE:
            sample.append(times[:SPACING_SAMPLE])

    with closing(blocks):  # on an error, parsing threads stop here, not later
        for block in blocks:
            for line, reason, text in block.rejects:
                rejects.add(path, line, reason, text)
            keep(*folds.take(block))
            fs.lines = max(fs.lines, block.last_line)
    times, ohlcv, held_back = folds.finish()
    for line, reason, text in held_back:
        rejects.add(path, line, reason, text)
    keep(times, ohlcv)
    fs.rejected = rejects.count - before
    warning = None if isinstance(spill, TickSpill) else _spacing_warning(path, sample)
    if warning:
        summary.warnings.append(warning)


SPACING_SAMPLE = 100_000  # bars whose spacing tells minute bars from hourly ones


def _spacing_warning(path: Path, sample: list[np.ndarray]) -> str | None:
    """A warning when the bars are further apart than minutes (median spacing): hourly bars
    given as minute bars would be stored, and their metrics computed, as minute bars."""
    minutes = np.unique(np.concatenate(sample) // US_PER_MIN) if sample else np.empty(0)
    if len(minutes) < 3:
        return None
    step = int(np.median(np.diff(minutes)))
    if step < 2:
        return None
    return (
        f"{path}: its bars are {_duration(step)} apart (median spacing), not a minute apart:"
        " bqx stores each as a minute bar, and the metrics' windows count bars"
    )


def _duration(minutes: int) -> str:
    for unit, size in (("day", 1440), ("hour", 60)):
        if minutes % size == 0:
            return _n(minutes // size, unit).replace(",", "")
    return _n(minutes, "minute")


def _without_flat(
    times: np.ndarray, ohlcv: np.ndarray, flat: _Flat
) -> tuple[np.ndarray, np.ndarray, int]:
    """The bars but flat zero-volume ones (open = high = low = close, volume 0), whose times
    go to ``flat``; how many."""
    if not len(times):
        return times, ohlcv, 0
    o, h, lo, c, v = ohlcv.T
    is_flat = (o == h) & (h == lo) & (lo == c) & (v == 0)
    if not is_flat.any():
        return times, ohlcv, 0
    flat.add(times[is_flat])
    return times[~is_flat], ohlcv[~is_flat], int(is_flat.sum())


def _check_some_accepted(summary: IngestSummary, spill: Spill, off_minute: int) -> None:
    """Rows rejected and no bar read (dropped ones aside) is a failure, not an empty ingest.

    Lines rejected for a time off the minute are a tick file's: the message says so.
    """
    if summary.rejected and not spill.seq and not summary.dropped_flat:
        message = (
            f"every bar was rejected ({_n(summary.rejected, 'line')}), nothing stored:"
            f" reasons in {summary.rejects_file}"
        )
        if off_minute:
            raise NeedsOption(
                f"{message}; {_n(off_minute, 'line')} with a time off the minute, as a tick"
                " file's", "ticks", "aggregates ticks into minute bars",
            )  # fmt: skip
        raise BqxError(message)
    if off_minute:
        summary.warnings.append(
            f"{_n(off_minute, 'line')} rejected for a time off the minute, as a tick file's:"
            " ticks are aggregated into minute bars only when asked (bqx ingest --ticks)"
        )
