"""Bars from Parquet or a Delta table (``--source URI``), local or on S3 (docs/lake.md).

Three shapes are read: a Delta table of bars (a ``_delta_log`` at the root, with a ``pair``
column), a Hive dataset (``pair=EURUSD/…`` folders, any files below them, e.g.
``pair=EURUSD/month=2024-07/data.parquet`` as ``bqx export --bars`` writes), or one file per
pair (``EURUSD.parquet``). The time and price columns are the layout's (``--time-column``,
``--price-column``); naive times are UTC.

What a resume compares (the source seam's ``jobs``):

- ``auto``: a month's signature is the identity of every file of the pair whose first bar is
  before the month's end (path, size and modification time; for a Delta table the file's path,
  which a rewrite changes, and size): a changed file redoes every month from its first bar on,
  since a later month's lookback may reach into it. No bar is read: row counts come from the
  files' footers (or the Delta log's statistics), and only a file spanning several months has
  its time column read to count them.
- ``exact``: every bar a job reads (its month and its lookback) hashed, as a job does while it
  reads.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bqx.core.months import Month, in_range
from bqx.core.params import Job, Params
from bqx.core.symbols import validate_pair
from bqx.core.uris import LakeURI
from bqx.errors import BqxError
from bqx.store.versions import exact_signature

LISTING_TTL_S = 2.0  # a job reuses its worker's listing this long (one LIST per few jobs)
MARGIN = np.timedelta64(31, "D")  # a month's lookback (≤ a week of minutes) lies within this first


@dataclass(frozen=True)
class BarFile:
    """One file of a pair's bars, as listed, with its footer's figures."""

    path: str  # inside the filesystem
    identity: str  # changes when the file does
    rows: int
    first: np.datetime64 | None  # time of its first and last bar (None: no bar)
    last: np.datetime64 | None


def _us(value: Any) -> np.datetime64 | None:
    if value is None:
        return None
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return np.datetime64(value, "us")


def _mix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a well-spread 64-bit hash of each value."""
    x = x.astype(np.uint64)
    with np.errstate(over="ignore"):
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def bar_hashes(times: np.ndarray, prices: np.ndarray) -> tuple[int, str]:
    """(count, sum of per-bar hashes binding each price to its time): order-free and exact
    (the sum is taken modulo 2^64), like the database's signature."""
    if not len(times):
        return 0, "0"
    t = np.asarray(times, "datetime64[us]").astype(np.int64).view(np.uint64)
    p = np.ascontiguousarray(prices, dtype=np.float64).view(np.uint64)
    with np.errstate(over="ignore"):
        h = _mix(t) ^ _mix(p + np.uint64(0x9E3779B97F4A7C15))
        return len(times), str(int(h.sum(dtype=np.uint64)))


def lookback_slice(params: Params, times: np.ndarray, since: np.datetime64) -> slice:
    """The bars before ``since`` a job reads: the W_max last ones in bars mode, those of the
    lookback minutes in clock mode."""
    end = int(np.searchsorted(times, since))
    if params.mode == "bars":
        return slice(max(0, end - params.lookback_bars), end)
    lo = since - np.timedelta64(params.lookback_minutes, "m")
    return slice(int(np.searchsorted(times, lo)), end)


def signature(params: Params, times: np.ndarray, prices: np.ndarray, month: Month) -> str:
    """The exact signature of a month's job over sorted bars (its month and its lookback)."""
    lo = np.datetime64(month.start.replace(tzinfo=None), "us")
    hi = np.datetime64(month.end.replace(tzinfo=None), "us")
    a, b = int(np.searchsorted(times, lo)), int(np.searchsorted(times, hi))
    lb = lookback_slice(params, times, lo)
    return exact_signature(*bar_hashes(times[a:b], prices[a:b]),
                           *bar_hashes(times[lb], prices[lb]))  # fmt: skip


class LakeBars:
    """A pair-keyed store of minute bars at ``uri``: a Delta table, Hive folders or a file per
    pair."""

    def __init__(self, uri: str, time_column: str = "time", price_column: str = "close") -> None:
        self.lake = LakeURI.parse(uri, "source")
        self.time_column, self.price_column = time_column, price_column
        self.fs, self.root = self.lake.filesystem()
        self._listing: tuple[float, dict[str, list[BarFile]]] | None = None
        self._footers: dict[str, BarFile] = {}  # by identity: a file's footer is read once
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"LakeBars({self.lake.uri!r})"

    # -- listing -------------------------------------------------------------------------

    def _is_delta(self) -> bool:
        info = self.fs.get_file_info(f"{self.root}/_delta_log")
        return bool(info.type == pafs.FileType.Directory)

    def listing(self, fresh: bool = False) -> dict[str, list[BarFile]]:
        """pair -> its files (sorted by first bar); refreshed when older than a moment."""
        with self._lock:
            now = time.monotonic()
            if fresh or self._listing is None or now - self._listing[0] > LISTING_TTL_S:
                try:
                    files = self._delta_files() if self._is_delta() else self._parquet_files()
                except OSError as exc:
                    raise BqxError(f"cannot list the bars at {self.lake.uri}: "
                                   f"{' '.join(str(exc).split())[:300]}") from None  # fmt: skip
                self._listing = (now, files)
            return self._listing[1]

    def _parquet_files(self) -> dict[str, list[BarFile]]:
        infos = self.fs.get_file_info(pafs.FileSelector(self.root, recursive=True,
                                                        allow_not_found=True))  # fmt: skip
        if not infos and self.fs.get_file_info(self.root).type == pafs.FileType.NotFound:
            raise BqxError(f"no bars at {self.lake.uri}: nothing there")
        out: dict[str, list[BarFile]] = {}
        start = len(self.root.rstrip("/")) + 1
        for info in infos:
            if info.type != pafs.FileType.File or not info.path.endswith(".parquet"):
                continue
            rel = info.path[start:]
            pair = _pair_of(rel)
            if pair is None:
                continue
            stamp = f"{rel}|{info.size}|{info.mtime_ns}"
            out.setdefault(pair, []).append(self._footer(info.path, stamp))
        return {p: sorted(f, key=_order) for p, f in out.items()}

    def _footer(self, path: str, identity: str) -> BarFile:
        known = self._footers.get(identity)
        if known is not None:
            return known
        meta = pq.ParquetFile(self.fs.open_input_file(path)).metadata
        names = meta.schema.to_arrow_schema().names
        if self.time_column not in names or self.price_column not in names:
            missing = [c for c in (self.time_column, self.price_column) if c not in names]
            raise BqxError(
                f"{self.lake.uri}: {path.rsplit('/', 1)[-1]} has no column"
                f" {', '.join(missing)} (it has {', '.join(names)}): give --time-column and"
                " --price-column"
            )
        i = names.index(self.time_column)
        lo = hi = None
        for g in range(meta.num_row_groups):
            st = meta.row_group(g).column(i).statistics
            if st is None or not st.has_min_max:
                lo = hi = None  # unknown: read the file's times when needed
                break
            a, b = _us(st.min), _us(st.max)
            lo = a if lo is None or (a is not None and a < lo) else lo
            hi = b if hi is None or (b is not None and b > hi) else hi
        found = BarFile(path, identity, meta.num_rows, lo, hi)
        self._footers[identity] = found
        return found

    def _delta_files(self) -> dict[str, list[BarFile]]:
        from bqx.extras import require

        dl = require("lake", "deltalake", "a Delta table of bars")
        dt = dl.DeltaTable(self.lake.uri, storage_options=self.lake.storage_options())
        actions = pa.table(dt.get_add_actions(flatten=True))
        cols = actions.column_names
        pair_col = "partition.pair" if "partition.pair" in cols else None
        if pair_col is None:
            raise BqxError(f"the Delta table of bars at {self.lake.uri} is not partitioned by"
                           " a pair column: partition it by pair")  # fmt: skip
        tmin, tmax = f"min.{self.time_column}", f"max.{self.time_column}"
        out: dict[str, list[BarFile]] = {}
        for row in actions.to_pylist():
            pair = validate_pair(str(row[pair_col]))
            path = f"{self.root}/{row['path']}"
            out.setdefault(pair, []).append(BarFile(
                path, f"{row['path']}|{row['size_bytes']}", int(row["num_records"] or 0),
                _us(row.get(tmin)), _us(row.get(tmax)),
            ))  # fmt: skip
        return {p: sorted(f, key=_order) for p, f in out.items()}

    # -- what the pipeline asks ----------------------------------------------------------

    def pairs(self) -> list[str]:
        return sorted(self.listing())

    def resolve_pairs(self, pairs: Sequence[str] | None) -> list[str]:
        have = self.pairs()
        if pairs is None:
            if not have:
                raise BqxError(
                    f"no bars at {self.lake.uri}: expected pair=EURUSD/… folders,"
                    " EURUSD.parquet files or a Delta table with a pair column"
                )
            return have
        return [validate_pair(p) for p in pairs]

    def check(self, pair: str) -> None:
        if pair not in self.listing():
            raise BqxError(
                f"no bars for {pair.upper()} at {self.lake.uri} (it has"
                f" {', '.join(p.upper() for p in self.pairs()) or 'none'})"
            )

    def read(
        self, pair: str, lo: np.datetime64 | None = None, hi: np.datetime64 | None = None,
        files: Sequence[BarFile] | None = None,
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """(times datetime64[us], prices float64) of a pair's bars with lo <= time < hi,
        sorted by time. A NULL time or price is refused, naming the file."""
        chosen = self.listing().get(pair, []) if files is None else files
        tables = []
        for f in chosen:
            if lo is not None and f.last is not None and f.last < lo:
                continue
            if hi is not None and f.first is not None and f.first >= hi:
                continue
            tables.append(self._read_file(f, lo, hi))
        if not tables:
            return np.empty(0, "datetime64[us]"), np.empty(0)
        table = pa.concat_tables(tables).sort_by("t")
        times = np.asarray(table.column("t").to_numpy(), "datetime64[us]")
        return times, np.asarray(table.column("p").to_numpy(), np.float64)

    def _read_file(self, f: BarFile, lo: Any, hi: Any) -> pa.Table:
        t, p = self.time_column, self.price_column
        try:
            table = pq.read_table(f.path, columns=[t, p], filesystem=self.fs)
        except (OSError, pa.ArrowInvalid) as exc:
            raise BqxError(f"cannot read {f.path}: {' '.join(str(exc).split())[:200]}") from None
        times = table.column(t)
        if pa.types.is_timestamp(times.type) and times.type.tz is not None:
            times = pc.cast(times, pa.timestamp("us", tz="UTC")).cast(pa.timestamp("us"))
        else:
            times = pc.cast(times, pa.timestamp("us"))
        prices = table.column(p)
        if pa.types.is_decimal(prices.type):  # through the decimal text: correctly rounded,
            prices = pc.cast(prices, pa.string())  # as the database's numeric::float8 is
        prices = pc.cast(prices, pa.float64())
        if times.null_count or prices.null_count:
            raise BqxError(f"bad source bar: {f.path.rsplit('/', 1)[-1]} has a NULL"
                           f" {t if times.null_count else p}")  # fmt: skip
        out = pa.table({"t": times, "p": prices})
        mask = None
        if lo is not None:
            mask = pc.greater_equal(out.column("t"), pa.scalar(lo, pa.timestamp("us")))
        if hi is not None:
            m = pc.less(out.column("t"), pa.scalar(hi, pa.timestamp("us")))
            mask = m if mask is None else pc.and_(mask, m)
        return out if mask is None else out.filter(mask)

    def read_series(
        self, params: Params, pair: str, since: datetime, until: datetime
    ) -> tuple[np.ndarray, np.ndarray, str]:
        """Bars in [since, until) plus the lookback the first of them needs, and the exact
        signature of every bar read (as the plan's ``exact`` computes it)."""
        lo = np.datetime64(since.astimezone(UTC).replace(tzinfo=None), "us")
        hi = np.datetime64(until.astimezone(UTC).replace(tzinfo=None), "us")
        times, prices = self.read(pair, lo - MARGIN, hi)
        lb = lookback_slice(params, times, lo)
        if params.mode == "bars" and lb.stop - lb.start < params.lookback_bars and lb.start == 0:
            times, prices = self.read(pair, None, hi)  # a gap longer than the margin
            lb = lookback_slice(params, times, lo)
        first = lb.start
        a = int(np.searchsorted(times, lo))
        sig = exact_signature(*bar_hashes(times[a:], prices[a:]),
                              *bar_hashes(times[lb], prices[lb]))  # fmt: skip
        return times[first:], prices[first:], sig

    def jobs(
        self, params: Params, pair: str, start: Month | None, end: Month | None,
        source_check: str,
    ) -> list[Job]:  # fmt: skip
        """A pair's (pair, month) jobs with their signatures (module docstring)."""
        files = self.listing(fresh=True).get(pair, [])
        counts = self._month_counts(pair, files)
        months = [m for m in sorted(counts) if in_range(m, start, end)]
        if source_check == "exact":
            times, prices = self.read(pair, None, None, files)
            # the files' version too, so a later auto resume skips what this one did
            return [Job(pair, m, counts[m], signature(params, times, prices, m),
                        self._version(files, m)) for m in months]  # fmt: skip
        return [Job(pair, m, counts[m], None, self._version(files, m)) for m in months]

    def empty_job(self, params: Params, pair: str, month: Month) -> Job:
        """The job of a month the ledger holds that has no bar left: its metrics must go."""
        files = self.listing(fresh=True).get(pair, [])
        return Job(pair, month, 0, None, self._version(files, month))

    def _version(self, files: Sequence[BarFile], month: Month) -> str:
        end = np.datetime64(month.end.replace(tzinfo=None), "us")
        ids = sorted(f.identity for f in files if f.first is None or f.first < end)
        text = f"{month}|" + "\n".join(ids)
        return "p" + hashlib.sha256(text.encode()).hexdigest()[:15]

    def _month_counts(self, pair: str, files: Sequence[BarFile]) -> dict[Month, int]:
        """Bars per month: a file within one month counts whole (its footer), others have
        their times read."""
        counts: dict[Month, int] = {}
        for f in files:
            if f.first is not None and f.last is not None and _month(f.first) == _month(f.last):
                counts[_month(f.first)] = counts.get(_month(f.first), 0) + f.rows
                continue
            if f.rows == 0:
                continue
            times, _ = self.read(pair, None, None, [f])
            months = times.astype("datetime64[M]")
            values, n = np.unique(months, return_counts=True)
            for m, k in zip(values, n, strict=True):
                key = _month(m)
                counts[key] = counts.get(key, 0) + int(k)
        return counts

    def newest(self, pair: str) -> datetime | None:
        lasts = [f.last for f in self.listing().get(pair, []) if f.last is not None]
        if not lasts:
            return None
        return datetime.fromisoformat(str(max(lasts))).replace(tzinfo=UTC)


def _month(t: np.datetime64) -> Month:
    y, m = str(t.astype("datetime64[M]")).split("-")
    return Month(int(y), int(m))


def _order(f: BarFile) -> tuple[int, str]:
    return (0 if f.first is None else int(f.first.astype(np.int64)), f.path)


def _pair_of(rel: str) -> str | None:
    """The pair a file belongs to: its ``pair=`` folder, else its name (``EURUSD.parquet``)."""
    parts = rel.split("/")
    for part in parts[:-1]:
        if part.lower().startswith("pair="):
            return _valid(part.split("=", 1)[1])
    if len(parts) == 1:
        return _valid(parts[0].rsplit(".", 1)[0])
    return None


def _valid(text: str) -> str | None:
    try:
        return validate_pair(text)
    except BqxError:
        return None


_SOURCES: dict[tuple[str, str, str], LakeBars] = {}
_SOURCES_LOCK = threading.Lock()


def lake_bars(params: Params) -> LakeBars | None:
    """The parameters' bar source when it is a lake (``params.bars``), shared per process so
    that its listing and footers are read once; None for the database's source tables."""
    if not params.bars:
        return None
    key = (params.bars, params.time_column, params.price_column)
    with _SOURCES_LOCK:
        if key not in _SOURCES:
            _SOURCES[key] = LakeBars(*key)
        return _SOURCES[key]
