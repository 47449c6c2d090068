"""``bqx ingest``: the minute-bar files people actually have, into ``m1_{pair}``.

Formats: HistData.com generic ASCII M1 (``YYYYMMDD HHMMSS;o;h;l;c;v``, fixed EST = UTC−5 all
year), Dukascopy CSV exports (``Gmt time,Open,High,Low,Close,Volume``), MetaTrader history
exports (``YYYY.MM.DD,HH:MM,o,h,l,c,v`` in the server's time zone, ``--tz``), and generic CSV or
Parquet with a column mapping. ``.gz`` and ``.zip`` inputs are read directly.

Files are streamed in blocks with pyarrow's CSV reader (every field read as text, then parsed
and validated column-wise), so memory stays bounded whatever the file's size. Valid bars are
spilled per month to a temporary directory; each month is then merged into its partition in
one transaction (``bqx.sources.load``), so an interrupted ingest leaves earlier months stored
and the interrupted one as it was, and re-ingesting a file changes nothing. Bad rows are not
loaded: they go to a rejects file with file, line number and reason.
"""

from __future__ import annotations

import csv
import gzip
import re
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from bqx.config import Settings
from bqx.db import connect, pool, resolve_url
from bqx.errors import BqxError
from bqx.schema import Layout, Month, create_source_table, ensure_source_partition, validate_pair
from bqx.sources.load import LoadResult, load_bars

FORMATS = ("auto", "histdata", "dukascopy", "metatrader", "csv", "parquet")
FIELDS = ("open", "high", "low", "close", "volume")
BLOCK_BYTES = 4 << 20  # pyarrow reads this much text at a time: bounds memory per block
EARLIEST = datetime(1971, 1, 1, tzinfo=UTC)  # no FX minute bars before this
_NUMBER = r"(?i)^\s*[-+]?((\d+\.?\d*|\.\d+)(e[-+]?\d+)?|inf|infinity|nan)\s*$"
_US_PER_MIN = 60_000_000


@dataclass
class Mapping:
    """Column names of a generic CSV/Parquet file (case-insensitive)."""

    time: str = "time"
    open: str = "open"
    high: str = "high"
    low: str = "low"
    close: str = "close"
    volume: str | None = "volume"
    time_format: str | None = None  # strptime format; default ISO 8601

    @classmethod
    def parse(cls, text: str | None, time_format: str | None = None) -> Mapping:
        """``time=Date,close=Last,volume=`` (an empty volume means the file has none)."""
        m = cls(time_format=time_format)
        for item in (text or "").split(","):
            if not item.strip():
                continue
            key, _, value = item.partition("=")
            key = key.strip().lower()
            if key not in ("time", *FIELDS):
                raise BqxError(f"--columns: unknown field {key!r} (time, {', '.join(FIELDS)})")
            setattr(m, key, value.strip() or None)
        return m


@dataclass
class FileSummary:
    path: str
    format: str
    lines: int = 0
    accepted: int = 0
    rejected: int = 0


@dataclass
class IngestSummary:
    pair: str
    accepted: int = 0
    rejected: int = 0
    duplicates: int = 0
    inserted: int = 0
    updated: int = 0
    unchanged: int = 0
    rejects_file: str | None = None
    files: list[FileSummary] = field(default_factory=list)
    months: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict:
        return {
            "pair": self.pair.upper(), "accepted": self.accepted, "rejected": self.rejected,
            "duplicates": self.duplicates, "rejects_file": self.rejects_file,
            "inserted": self.inserted, "updated": self.updated, "unchanged": self.unchanged,
            "months": self.months, "seconds": round(self.seconds, 3),
            "files": [vars(f) for f in self.files],
        }  # fmt: skip


# -- opening and sniffing ------------------------------------------------------------------


@contextmanager
def open_input(path: Path) -> Iterator[IO[bytes]]:
    """A binary stream of the file's text, through gzip or the zip's data member."""
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as f:
            yield f
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            members = [m for m in z.namelist() if m.lower().endswith((".csv", ".txt"))]
            data = [m for m in members if m.lower().endswith(".csv")] or members
            if not data:
                raise BqxError(f"{path}: the zip holds no .csv or .txt file")
            with z.open(data[0]) as f:
                yield f
    else:
        with open(path, "rb") as f:
            yield f


def _head(path: Path, lines: int = 5) -> list[str]:
    with open_input(path) as f:
        text = f.read(64 << 10).decode("utf-8", errors="replace")
    return [ln.strip().lstrip("\ufeff") for ln in text.splitlines() if ln.strip()][:lines]


def sniff(path: Path) -> str:
    """Which format a file is in, from its name and first lines."""
    if path.name.lower().endswith(".parquet"):
        return "parquet"
    head = _head(path)
    if not head:
        raise BqxError(f"{path}: the file is empty")
    first = head[0]
    if re.match(r"^\d{8} \d{6};", first):
        return "histdata"
    if first.lower().startswith("gmt time"):
        return "dukascopy"
    if re.match(r"^\d{4}\.\d{2}\.\d{2},\d{2}:\d{2}", first):
        return "metatrader"
    if re.match(r"^[A-Za-z_\"' ]", first) and ("," in first or ";" in first):
        return "csv"
    raise BqxError(f"{path}: unknown format (first line {first[:60]!r}); give --format")


# -- parsing --------------------------------------------------------------------------------


@dataclass
class Block:
    """Parsed rows of one block: line numbers, UTC microseconds, prices, and why rejected."""

    lines: np.ndarray
    times: np.ndarray  # int64 µs since epoch, UTC
    ohlcv: np.ndarray  # (n, 5)
    reasons: list[str | None]
    texts: dict[int, str]  # row index -> raw text, for rejected rows


def _floats(col: pa.Array) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(values, NaN where unparseable or empty; mask of unparseable fields; mask of empty)."""
    col = pc.utf8_trim_whitespace(col.cast(pa.string()))
    ok = pc.fill_null(pc.match_substring_regex(col, _NUMBER), False)
    values = pc.cast(pc.if_else(ok, col, pa.scalar(None, pa.string())), pa.float64())
    out = values.to_numpy(zero_copy_only=False).astype(np.float64)
    empty = pc.fill_null(pc.equal(col, ""), True).to_numpy(zero_copy_only=False)
    return out, ~ok.to_numpy(zero_copy_only=False) & ~empty, empty


_NAT = np.iinfo(np.int64).min  # unparseable time
_GAP = _NAT + 1  # a local time that does not exist (the spring-forward hour)


def _times(local: pa.Array, fmt: str, tz: str | None, shift: timedelta) -> np.ndarray:
    """int64 µs UTC from text in ``fmt`` read as local time in ``tz`` (then + ``shift``).

    Unparseable times become ``_NAT``; local times inside a daylight-saving gap ``_GAP``;
    in the repeated autumn hour the earlier instant is taken.
    """
    ts = pc.strptime(local, format=fmt, unit="us", error_is_null=True)
    # strptime rolls impossible dates over (31.06 -> 01.07, 24:00 -> 00:00): such a time does
    # not print back as read. Only the first days of a month and midnights can be rolled over,
    # so only those are printed back (a full round trip would double the parse time).
    suspect = pc.fill_null(
        pc.or_(pc.less_equal(pc.day(ts), 3), pc.equal(pc.hour(ts), 0)), False
    ).to_numpy(zero_copy_only=False)
    if suspect.any():
        idx = pa.array(np.flatnonzero(suspect))
        sub = pc.cast(pc.take(ts, idx), pa.timestamp("s"), safe=False)  # %S without fractions
        same = pc.equal(pc.strftime(sub, format=fmt), pc.utf8_trim_whitespace(pc.take(local, idx)))
        wrong = np.flatnonzero(suspect)[~pc.fill_null(same, False).to_numpy(zero_copy_only=False)]
        if len(wrong):
            mask = np.zeros(len(ts), dtype=bool)
            mask[wrong] = True
            ts = pc.if_else(pa.array(mask), pa.scalar(None, ts.type), ts)
    gap = None
    if tz not in (None, "UTC"):
        early = pc.assume_timezone(ts, tz, ambiguous="earliest", nonexistent="earliest")
        late = pc.assume_timezone(ts, tz, ambiguous="earliest", nonexistent="latest")
        gap = pc.fill_null(pc.not_equal(early, late), False).to_numpy(zero_copy_only=False)
        ts = early
    us = pc.fill_null(ts.cast(pa.int64()), _NAT).to_numpy(zero_copy_only=False)
    bad = us == _NAT
    us = us + int(shift / timedelta(microseconds=1))
    us[bad] = _NAT
    if gap is not None:
        us[gap & ~bad] = _GAP
    return us


def _validate(
    lines: np.ndarray, times: np.ndarray, fields: list[tuple[np.ndarray, np.ndarray, np.ndarray]],
    texts: dict[int, str],
) -> Block:  # fmt: skip
    """Reasons, first that applies: time, numbers, positivity, OHLC consistency."""
    n = len(lines)
    ohlcv = np.column_stack([f[0] for f in fields]) if n else np.empty((0, 5))
    reasons: list[str | None] = [None] * n
    latest = (datetime.now(UTC) + timedelta(days=2)).timestamp() * 1e6

    def mark(mask: np.ndarray, why: Callable[[int], str]) -> None:
        for i in np.flatnonzero(mask):
            if reasons[i] is None:
                reasons[i] = why(int(i))

    nat = (times == _NAT) | (times == _GAP)
    mark(times == _NAT, lambda i: "unparseable time")
    mark(times == _GAP, lambda i: "local time does not exist (daylight-saving gap)")
    mark(~nat & ((times < EARLIEST.timestamp() * 1e6) | (times > latest)),
         lambda i: "time out of range")  # fmt: skip
    for name, (values, unparseable, empty) in zip(FIELDS, fields, strict=True):
        mark(unparseable, lambda i, name=name: f"unparseable {name}")
        if name != "volume":
            mark(empty, lambda i, name=name: f"missing {name}")
            bad = ~np.isfinite(values) | (values <= 0)
            mark(
                bad,
                lambda i, name=name, v=values: f"{name} is {float(v[i])}: must be finite and > 0",
            )
        else:
            mark(values < 0, lambda i, v=values: f"volume is {float(v[i])}: must be ≥ 0")
    o, h, lo, c = (ohlcv[:, j] for j in range(4)) if n else (np.empty(0),) * 4
    with np.errstate(invalid="ignore"):
        mark(h < lo, lambda i: f"high {float(h[i])} < low {float(lo[i])}")
        mark((o < lo) | (o > h), lambda i: f"open {float(o[i])} outside [low, high]")
        mark((c < lo) | (c > h), lambda i: f"close {float(c[i])} outside [low, high]")
    return Block(lines, times, ohlcv, reasons, texts)


def _row_texts(columns: Sequence[pa.Array], sep: str) -> list[str]:
    joined = pc.binary_join_element_wise(
        *[pc.fill_null(c.cast(pa.string()), "") for c in columns], sep
    )
    return joined.to_pylist()


def _csv_blocks(
    path: Path, fmt: str, tz: str | None, mapping: Mapping, on_bad_line: Callable[[int, str], None]
) -> Iterator[Block]:
    """Parse a text format block by block; rows with the wrong field count go to on_bad_line."""
    spec = {
        "histdata": (";", ["dt", *FIELDS], False),
        "dukascopy": (",", ["time", *FIELDS], True),
        "metatrader": (",", ["date", "hm", *FIELDS], False),
    }
    if fmt in spec:
        sep, names, header = spec[fmt]
    else:
        head = _head(path, 1)[0]
        sep = ";" if head.count(";") > head.count(",") else ","
        names = [h.strip().strip("\"'") for h in head.split(sep)]
        header = True
    invalid: list[int] = []

    def handler(row: pacsv.InvalidRow) -> str:
        if row.number is not None and row.text.strip():
            invalid.append(row.number)
            on_bad_line(row.number, row.text)
        elif row.number is not None:
            invalid.append(row.number)  # a blank line with the wrong field count
        return "skip"

    read = pacsv.ReadOptions(
        column_names=names, skip_rows=1 if header else 0, block_size=BLOCK_BYTES,
        use_threads=False,
    )  # fmt: skip
    parse = pacsv.ParseOptions(
        delimiter=sep, quote_char='"' if fmt == "csv" else False, ignore_empty_lines=False,
        invalid_row_handler=handler,
    )  # fmt: skip
    convert = pacsv.ConvertOptions(column_types={n: pa.string() for n in names})
    lower = {n.lower(): n for n in names}
    if fmt == "csv":
        wanted = {"time": mapping.time, **{f: getattr(mapping, f) for f in FIELDS}}
        for key, col in wanted.items():
            if col is not None and col.lower() not in lower:
                raise BqxError(f"{path}: no column {col!r} for {key} (columns: {', '.join(names)};"
                               " map them with --columns time=...,close=...)")  # fmt: skip
    next_line = 2 if header else 1
    with open_input(path) as f:
        try:
            reader = pacsv.open_csv(f, read_options=read, parse_options=parse,
                                    convert_options=convert)  # fmt: skip
        except pa.ArrowInvalid as exc:
            raise BqxError(f"{path}: cannot read as {fmt}: {exc}") from None
        for batch in reader:
            n = batch.num_rows
            # physical line numbers: consecutive, skipping lines the handler took
            skip = np.array(sorted(x for x in invalid if x >= next_line), dtype=np.int64)
            cand = np.arange(next_line, next_line + n + len(skip), dtype=np.int64)
            lines = cand[~np.isin(cand, skip)][:n]
            next_line = int(lines[-1]) + 1 if n else next_line
            invalid[:] = [x for x in invalid if x >= next_line]
            cols = {name: batch.column(name) for name in names}
            # a blank line parses as one empty field and nulls: skip it, it is not a bar
            blank = np.ones(n, dtype=bool)
            for c in cols.values():
                empty = pc.fill_null(pc.equal(pc.utf8_trim_whitespace(c), ""), True)
                blank &= empty.to_numpy(zero_copy_only=False)
            if fmt == "histdata":
                times = _times(cols["dt"], "%Y%m%d %H%M%S", None, timedelta(hours=5))
                fields = [cols[f] for f in FIELDS]
            elif fmt == "dukascopy":
                times = _times(pc.utf8_slice_codeunits(cols["time"], 0, 19), "%d.%m.%Y %H:%M:%S",
                               None, timedelta(0))  # fmt: skip
                fields = [cols[f] for f in FIELDS]
            elif fmt == "metatrader":
                local = pc.binary_join_element_wise(cols["date"], cols["hm"], " ")
                times = _times(local, "%Y.%m.%d %H:%M", tz, timedelta(0))
                fields = [cols[f] for f in FIELDS]
            else:
                raw = cols[lower[mapping.time.lower()]]
                if mapping.time_format:
                    times = _times(raw, mapping.time_format, tz, timedelta(0))
                else:  # ISO 8601: 2024-07-01T00:00:00Z, 2024-07-01 00:00, …
                    iso = pc.replace_substring_regex(pc.utf8_trim_whitespace(raw), r"[Tt]", " ")
                    iso = pc.replace_substring_regex(iso, r"(\.\d+)?(Z|z|\+00:?00)?$", "")
                    iso = pc.if_else(pc.equal(pc.utf8_length(iso), 16),
                                     pc.binary_join_element_wise(iso, ":00", ""), iso)  # fmt: skip
                    times = _times(iso, "%Y-%m-%d %H:%M:%S", tz, timedelta(0))
                fields = [
                    cols[lower[getattr(mapping, f).lower()]] if getattr(mapping, f) else
                    pa.nulls(n, pa.string()) for f in FIELDS
                ]  # fmt: skip
            keep = ~blank
            parsed = [_floats(c) for c in fields]
            block = _validate(lines, times, parsed, [])
            bad = [i for i, r in enumerate(block.reasons) if r is not None]
            if bad:  # the raw fields of rejected rows only, for the rejects file
                idx = pa.array(bad, pa.int64())
                texts = _row_texts([pc.take(cols[nm], idx) for nm in names], sep)
                block.texts = dict(zip(bad, texts, strict=True))
            if not keep.all():
                idx = np.flatnonzero(keep)
                block = Block(
                    block.lines[idx],
                    block.times[idx],
                    block.ohlcv[idx],
                    [block.reasons[i] for i in idx],
                    {k: block.texts[int(i)] for k, i in enumerate(idx) if int(i) in block.texts},
                )
            yield block


def _parquet_blocks(path: Path, tz: str | None, mapping: Mapping) -> Iterator[Block]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BqxError(f"{path}: cannot read as parquet: {exc}") from None
    lower = {n.lower(): n for n in pf.schema_arrow.names}
    for key in ("time", *FIELDS):
        col = getattr(mapping, key)
        if col is not None and col.lower() not in lower:
            names = ", ".join(pf.schema_arrow.names)
            raise BqxError(
                f"{path}: no column {col!r} for {key} (columns: {names}; map them with --columns)"
            )
    row = 1
    for batch in pf.iter_batches(batch_size=500_000):
        n = batch.num_rows
        lines = np.arange(row, row + n, dtype=np.int64)  # rows, 1-based, for parquet
        row += n
        raw = batch.column(lower[mapping.time.lower()])
        if pa.types.is_timestamp(raw.type):
            ts = raw if raw.type.tz else (raw if tz in (None, "UTC") else
                                          pc.assume_timezone(raw, tz))  # fmt: skip
            us = pc.fill_null(ts.cast(pa.timestamp("us")).cast(pa.int64()),
                              _NAT).to_numpy(zero_copy_only=False)  # fmt: skip
        else:
            us = _times(raw.cast(pa.string()), mapping.time_format or "%Y-%m-%d %H:%M:%S", tz,
                        timedelta(0))  # fmt: skip
        parsed = []
        for f in FIELDS:
            name = getattr(mapping, f)
            if name is None:
                parsed.append((np.full(n, np.nan), np.zeros(n, bool), np.ones(n, bool)))
                continue
            col = batch.column(lower[name.lower()])
            if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
                vals = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
                parsed.append(
                    (vals, np.zeros(n, bool), col.is_null().to_numpy(zero_copy_only=False))
                )
            else:
                parsed.append(_floats(col))
        block = _validate(lines, us.astype(np.int64), parsed, {})
        block.texts = {i: f"row {int(lines[i])}" for i, r in enumerate(block.reasons) if r}
        yield block


# -- the ingest -------------------------------------------------------------------------------


class _Spill:
    """Valid rows per month on disk: (time µs, input order, o, h, l, c, v) records."""

    dtype = np.dtype([("t", "<i8"), ("seq", "<i8"), ("v", "<f8", (5,))])

    def __init__(self, directory: Path) -> None:
        self.dir = directory
        self.seq = 0

    def add(self, times: np.ndarray, ohlcv: np.ndarray) -> None:
        rec = np.empty(len(times), dtype=self.dtype)
        rec["t"], rec["v"] = times, ohlcv
        rec["seq"] = np.arange(self.seq, self.seq + len(times))
        self.seq += len(times)
        months = (times // _US_PER_MIN).astype("datetime64[m]").astype("datetime64[M]")
        for m in np.unique(months):
            with open(self.dir / f"{m}.bin", "ab") as f:
                f.write(rec[months == m].tobytes())

    def months(self) -> list[str]:
        return sorted(p.stem for p in self.dir.glob("*.bin"))

    def read(self, month: str) -> np.ndarray:
        return np.fromfile(self.dir / f"{month}.bin", dtype=self.dtype)


def _store(
    url: str, layout: Layout, pair: str, spill: _Spill, summary: IngestSummary,
    progress: Callable[[str], None] | None,
) -> None:  # fmt: skip
    """Merge each spilled month into its partition, one transaction a month, two at a time."""
    with connect(url, autocommit=True) as conn:  # DDL first: concurrent CREATEs collide
        create_source_table(conn, layout, pair)
        for month in spill.months():
            ensure_source_partition(conn, layout, pair, Month.parse(month))

    def store(month: str) -> tuple[str, int, int, LoadResult]:
        rec = spill.read(month)
        rec = rec[np.lexsort((rec["seq"], rec["t"]))]  # by time; among duplicates the later wins
        last = np.ones(len(rec), dtype=bool)
        last[:-1] = rec["t"][1:] != rec["t"][:-1]
        rec = rec[last]
        times = rec["t"].astype("datetime64[us]")
        with conns.connection() as conn:
            result = load_bars(conn, layout, pair, times, rec["v"], mode="merge")
        return month, len(rec), int((~last).sum()), result

    with pool(url, 2) as conns, ThreadPoolExecutor(max_workers=2) as threads:
        for month, n, dups, result in threads.map(store, spill.months()):
            summary.duplicates += dups
            summary.inserted += result.inserted
            summary.updated += result.updated
            summary.unchanged += result.unchanged
            summary.accepted += n
            summary.months[str(Month.parse(month))] = n
            if progress:
                progress(f"{pair.upper()} {month}: {n:,} bars stored")


def ingest_files(
    settings: Settings,
    layout: Layout,
    files: Sequence[str | Path],
    pair: str,
    *,
    fmt: str = "auto",
    tz: str | None = None,
    mapping: Mapping | None = None,
    rejects_path: str | Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> IngestSummary:
    """Load bar files for one pair. Everything is checked before anything is written."""
    pair = validate_pair(pair)
    if fmt not in FORMATS:
        raise BqxError(f"unknown --format {fmt!r}: one of {', '.join(FORMATS)}")
    if not files:
        raise BqxError("no input file given")
    paths = [Path(f) for f in files]
    for p in paths:
        if not p.is_file():
            raise BqxError(f"{p}: no such file")
        try:
            with open(p, "rb") as f:
                f.read(1)
        except OSError as exc:
            raise BqxError(f"{p}: cannot read: {exc.strerror}") from None
    if tz is not None:
        try:
            from zoneinfo import ZoneInfo

            ZoneInfo(tz)
        except Exception:
            raise BqxError(
                f"unknown time zone --tz {tz!r} (e.g. UTC, EET, Europe/Athens)"
            ) from None
    formats = [fmt if fmt != "auto" else sniff(p) for p in paths]
    mapping = mapping or Mapping()
    url = resolve_url(settings)
    t0 = time.monotonic()
    summary = IngestSummary(pair)
    rejects = Path(rejects_path) if rejects_path else paths[0].with_name(
        paths[0].name + ".rejects.csv"
    )  # fmt: skip
    rej_file = None
    rej_writer = None

    def reject(path: Path, line: int, reason: str, text: str) -> None:
        nonlocal rej_file, rej_writer
        if rej_writer is None:
            rej_file = open(rejects, "w", newline="")  # noqa: SIM115 - closed below
            rej_writer = csv.writer(rej_file)
            rej_writer.writerow(["file", "line", "reason", "text"])
        rej_writer.writerow([str(path), line, reason, text])
        summary.rejected += 1

    try:
        with tempfile.TemporaryDirectory(prefix="bqx-ingest-") as tmp:
            spill = _Spill(Path(tmp))
            for path, kind in zip(paths, formats, strict=True):
                fs = FileSummary(str(path), kind)
                summary.files.append(fs)
                if progress:
                    progress(f"{path}: {kind}")
                before = summary.rejected

                def bad_line(line: int, text: str, path: Path = path) -> None:
                    reject(path, line, "wrong number of fields", text)

                blocks = (_parquet_blocks(path, tz, mapping) if kind == "parquet" else
                          _csv_blocks(path, kind, tz, mapping, bad_line))  # fmt: skip
                for block in blocks:
                    ok = np.array([r is None for r in block.reasons], dtype=bool)
                    for i in np.flatnonzero(~ok):
                        reject(path, int(block.lines[i]), block.reasons[i], block.texts[i])
                    spill.add(block.times[ok], block.ohlcv[ok])
                    fs.accepted += int(ok.sum())
                    fs.lines = int(block.lines[-1]) if len(block.lines) else fs.lines
                fs.rejected = summary.rejected - before
            if rej_file is not None:
                rej_file.close()
                rej_file = None
                summary.rejects_file = str(rejects)
            _store(url, layout, pair, spill, summary, progress)
    finally:
        if rej_file is not None:
            rej_file.close()
    summary.seconds = time.monotonic() - t0
    return summary
