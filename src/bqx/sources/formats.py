"""Minute-bar files read as blocks of validated bars: the formats of ``bqx ingest``, no database.

Formats:

- HistData.com generic ASCII M1: ``YYYYMMDD HHMMSS;o;h;l;c;v``, fixed EST = UTC−5 all year;
- Dukascopy CSV exports: ``Gmt time,Open,High,Low,Close,Volume`` with ``dd.mm.yyyy
  HH:MM:SS.fff`` (also ``Local time`` exports whose times end in ``GMT+0200``);
- MetaTrader history exports: MT4 ``YYYY.MM.DD,HH:MM,o,h,l,c,v`` and MT5 tab-separated
  ``<DATE> <TIME> <OPEN> …`` files, in the broker's server time given by ``--tz``;
- crypto exchanges' kline CSVs (Binance's ``open_time,open,high,low,close,volume,close_time,…``,
  with or without that header): the open time in epoch milliseconds (microseconds in Binance
  spot files since 2025, seconds elsewhere: told apart per row by magnitude), UTC;
- generic CSV or Parquet with a column mapping (ISO 8601 times or ``--time-format``).

``.gz`` and ``.zip`` inputs are read directly. Files are streamed in blocks with pyarrow's CSV
reader (every field read as text, then parsed and validated column-wise by
``bqx.sources.columns``, no Python per row), so memory stays bounded whatever the file's size.
A block holds the valid bars and the rejected rows, each with its physical line number, reason
and text. (A quoted CSV field may not span lines: files are cut at newlines.)
"""

from __future__ import annotations

import gzip
import re
import zipfile
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import IO, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from bqx.errors import BqxError, InvalidOption, NeedsOption
from bqx.sources.columns import (
    _NAT,
    FIELDS,
    TICK_PRICES,
    Block,
    local_timestamps,
    matches,
    parse_floats,
    parse_local_times,
    validated_block,
    validated_ticks,
    why,
)

FORMATS = ("auto", "histdata", "dukascopy", "metatrader", "klines", "csv", "parquet")
BLOCK_BYTES = 2 << 20  # text parsed per block: a block takes ~25x its size while parsed
HISTDATA_SHIFT = timedelta(hours=5)  # HistData times are EST (UTC−5) all year
_READ_ERRORS = (OSError, EOFError, zipfile.BadZipFile, pa.ArrowInvalid)
MAX_LINE = 64 << 10  # a bar is under 200 bytes: a longer line is rejected, not parsed
OPTIONAL = ("open", "high", "low", "volume")  # a csv/parquet source may lack these columns
QUOTES = ("price", "bid", "ask")  # a tick file's price columns (which are needed: the pick)
# ISO 4217 codes (and metals, crypto) that a pair in a file name is built from
CURRENCY_CODES = frozenset(
    "AED ARS AUD BGN BRL BTC CAD CHF CLP CNH CNY COP CZK DKK ETH EUR GBP HKD HUF IDR ILS INR"
    " ISK JPY KRW KWD MXN MYR NOK NZD PHP PLN RON RUB SAR SEK SGD THB TRY TWD USD XAG XAU"
    " XPD XPT ZAR".split()
)
_NAME_PAIR = re.compile(r"(?<![A-Z])([A-Z]{3})[-_/ ]?([A-Z]{3})(?![A-Z])")


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
    explicit: frozenset[str] = frozenset()  # fields the user mapped: they must exist
    # tick files: their price columns, and which price a tick has (None: the file holds bars)
    price: str | None = "price"
    bid: str | None = "bid"
    ask: str | None = "ask"
    ticks: str | None = None

    @classmethod
    def parse(
        cls, text: str | None, time_format: str | None = None, ticks: str | None = None
    ) -> Mapping:
        """``time=Date,close=Last,volume=``; ticks: ``time=ts,price=last`` or ``bid=B,ask=A``.

        Open, high, low and volume are optional: an empty name (``volume=``) says the file
        has no such column, and a default name that the file lacks is taken as absent too.
        ``ticks`` (``auto``, ``mid``, ``bid``, ``ask``, ``last``) reads a file of ticks.
        """
        if ticks is not None and ticks not in TICK_PRICES:
            raise InvalidOption("tick_price", ticks, f"one of {', '.join(TICK_PRICES)}")
        m = cls(time_format=time_format, ticks=ticks)
        keys = ("time", *QUOTES) if ticks else ("time", *FIELDS)
        explicit = set()
        for item in (text or "").split(","):
            if not item.strip():
                continue
            key, _, value = item.partition("=")
            key = key.strip().lower()
            if key not in keys:
                raise InvalidOption("columns", text, f"unknown field {key!r} ({', '.join(keys)})")
            if key not in (*OPTIONAL, *QUOTES) and not value.strip():
                raise InvalidOption("columns", text, f"{key} needs a column name ({key}=NAME)")
            setattr(m, key, value.strip() or None)
            explicit.add(key)
        m.explicit = frozenset(explicit)
        return m

    def column(self, key: str, present: Sequence[str], path: Path) -> str | None:
        """The file's column for ``key`` (matched case-insensitively), None when absent."""
        want = getattr(self, key)
        if want is None:
            return None
        lower = {n.lower(): n for n in present}
        if want.lower() in lower:
            return lower[want.lower()]
        if key in (*OPTIONAL, *QUOTES) and key not in self.explicit:
            return None
        raise BqxError(
            f"{path}: no column {want!r} for {key} (columns: {', '.join(present)};"
            " map them with --columns time=...,close=...)"
        )


# -- opening and sniffing ------------------------------------------------------------------


@contextmanager
def open_input(path: Path) -> Iterator[IO[bytes]]:
    """A binary stream of the file's text, through gzip or the zip's data member.

    HistData zips hold the bars as ``.csv`` next to a ``.txt`` status report: a ``.csv``
    member is preferred.
    """
    name = path.name.lower()
    if name.endswith(".gz"):
        with gzip.open(path, "rb") as gz:
            yield gz  # type: ignore[misc]  # a GzipFile reads bytes like any IO[bytes]
    elif name.endswith(".zip"):
        with zipfile.ZipFile(path) as z:
            with z.open(_zip_member(path, z)) as f:
                yield f
    else:
        with open(path, "rb") as f:
            yield f


def _zip_member(path: Path, z: zipfile.ZipFile) -> str:
    members = [m for m in z.namelist() if m.lower().endswith((".csv", ".txt"))]
    data = [m for m in members if m.lower().endswith(".csv")] or members
    if not data:
        raise BqxError(f"{path}: the zip holds no .csv or .txt file")
    return data[0]


def pairs_in_name(path: Path) -> set[str]:
    """Pairs that a file's name (and a zip's data member's name) spells, e.g. ``USDJPY``."""
    found = set()
    for name in _data_names(path):
        for m in _NAME_PAIR.finditer(name.upper()):
            if (
                m.group(1) in CURRENCY_CODES
                and m.group(2) in CURRENCY_CODES
                and m.group(1) != m.group(2)
            ):
                found.add((m.group(1) + m.group(2)).lower())
    return found


# whole symbols in the names of files that name their instrument exactly: an MT5 "Export bars"
# file (US500_M1_202401020000_202401312359.csv, EURUSD.m_M1_…) and a Binance kline file
# (BTCUSDT-1m-2024-01.csv, daily ones -2024-01-15)
_EXPORT_NAMES = (
    re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*?)_(?:M\d+|H\d+|D1|W1|MN1?)_\d{8,12}_\d{8,12}\."),
    re.compile(r"^([A-Z0-9]{2,20})-(?:\d+(?:s|m|h|d|w|mo))-\d{4}-\d{2}(?:-\d{2})?\."),
)
# a pair of codes followed by a broker's lower-case suffix: EURUSDm_M1…, XAUUSDpro.csv
_SUFFIXED_PAIR = re.compile(r"(?<![A-Za-z])([A-Z]{3})([A-Z]{3})(?=[a-z]{1,4}(?![a-z]))")
# the decoration brokers add to a symbol: .m, _i, -ecn, .cash
_BROKER_SUFFIX = re.compile(r"[._-][a-z0-9]{1,6}$")
# quotes of four letters and more, which are no broker's suffix (BTCUSDT is not BTCUSD + t)
_LONG_QUOTES = frozenset({"usdt", "usdc", "busd", "tusd", "usdp", "fdusd", "eurt", "eurc"})


def _data_names(path: Path) -> list[str]:
    """The file's name, and a zip's data member's name."""
    names = [path.name]
    if path.name.lower().endswith(".zip"):
        try:
            with zipfile.ZipFile(path) as z:
                names.append(Path(_zip_member(path, z)).name)
        except (OSError, zipfile.BadZipFile, BqxError):
            pass  # reading it later says what is wrong
    return names


def symbol_core(symbol: str) -> str:
    """The instrument a broker's symbol decorates, lower case: ``EURUSD.m``, ``EURUSDm``,
    ``EURUSD_i`` and ``EURUSD`` are all ``eurusd``; ``US500.cash`` is ``us500``."""
    core = _BROKER_SUFFIX.sub("", symbol.lower()) or symbol.lower()
    if 6 < len(core) <= 9 and core.isalpha() and core[3:] not in _LONG_QUOTES:
        base, quote = core[:3].upper(), core[3:6].upper()
        if base in CURRENCY_CODES and quote in CURRENCY_CODES and base != quote:
            return core[:6]
    return core


def symbols_in_name(path: Path) -> set[str]:
    """Instruments a file's name says it holds, lower case: currency pairs (``USDJPY``, also
    with a broker's suffix) and whole symbols of exports that name them (``US500``)."""
    found = set(pairs_in_name(path))
    for name in _data_names(path):
        for pattern in _EXPORT_NAMES:
            m = pattern.match(name)
            if m:
                found.add(m.group(1).lower())
        for m in _SUFFIXED_PAIR.finditer(name):
            if m.group(1) in CURRENCY_CODES and m.group(2) in CURRENCY_CODES:
                found.add((m.group(1) + m.group(2)).lower())
    return found


def name_mismatch(path: Path, symbol: str) -> set[str]:
    """The instruments a file's name says it holds when none of them is ``symbol`` (a broker's
    suffix on either side does not count: ``EURUSD.m`` fits ``EURUSD_M1_2024.csv``); empty
    when the name fits or says nothing."""
    said = symbols_in_name(path)
    if not said or symbol in said:
        return set()
    core = symbol_core(symbol)
    return set() if any(symbol_core(s) == core for s in said) else said


def _head(path: Path, lines: int = 5) -> list[str]:
    """The first non-blank lines (BOM and surrounding white space removed)."""
    try:
        with open_input(path) as f:
            text = f.read(64 << 10).decode("utf-8", errors="replace")
    except _READ_ERRORS as exc:
        raise BqxError(f"{path}: cannot read: {why(exc)}") from None
    return [ln.strip().lstrip("\ufeff") for ln in text.splitlines() if ln.strip()][:lines]


def sniff(path: Path) -> str:
    """Which format a file is in, from its name and first line."""
    if _is_parquet(path):
        return "parquet"
    head = _head(path, 2)
    if not head:
        raise BqxError(f"{path}: the file is empty")
    first, second = head[0], (head[1:] or [""])[0]
    for kind, fits in _SNIFFERS:
        if fits(first, second):
            return kind
    raise BqxError(
        f"{path}: unknown format (first line {first[:60]!r}); give --format "
        f"({', '.join(FORMATS[1:])})"
    )


def _is_parquet(path: Path) -> bool:
    if path.name.lower().endswith(".parquet"):
        return True
    with open(path, "rb") as f:
        return f.read(4) == b"PAR1"


_MT4_START = "YYYY.MM.DD,hh:mm"
_DUKASCOPY_HEADERS = ("gmt time", "local time")


def _histdata_like(first: str, second: str) -> bool:
    return matches(first.split(";")[0], "YYYYMMDD hhmmss") and first.count(";") >= 4


def _dukascopy_like(first: str, second: str) -> bool:
    return first.lower().startswith(_DUKASCOPY_HEADERS)


def _metatrader_like(first: str, second: str) -> bool:
    if first.upper().startswith("<DATE>"):
        return True
    if matches(first[:16], _MT4_START) and first.count(",") >= 5:
        return True
    # an MT4 export with a header row (Date,Time,Open,...)
    return first[:1].isalpha() and matches(second[:16], _MT4_START)


_KLINES_HEADER = "open_time,open,high,low,close"


def _klines_like(first: str, second: str) -> bool:
    """An exchange's kline file: epoch open time, then OHLCV (a header row optional)."""
    if first.lower().replace(" ", "").startswith(_KLINES_HEADER):
        return True
    fields = first.split(",")
    return len(fields) >= 6 and fields[0].isdigit() and len(fields[0]) in (10, 13, 16)


def _csv_like(first: str, second: str) -> bool:
    return (first[:1].isalpha() or first[:1] in "\"'_") and any(s in first for s in ",;\t")


# (format, test of the first two lines): the first format whose test passes is the file's
_SNIFFERS: tuple[tuple[str, Callable[[str, str], bool]], ...] = (
    ("histdata", _histdata_like),
    ("dukascopy", _dukascopy_like),
    ("metatrader", _metatrader_like),
    ("klines", _klines_like),
    ("csv", _csv_like),
)


# -- text formats ----------------------------------------------------------------------------


@dataclass
class TextSpec:
    """How to read one text file: separator, header, columns for time and each field."""

    sep: str
    width: int  # fields per line
    header: bool
    time_cols: list[int]  # joined with a space (MetaTrader date + time)
    templates: tuple[str, ...]
    formats: tuple[str, ...]
    shift: timedelta
    field_cols: list[int | None]  # per FIELDS entry; None: the file has no such column
    quoted: bool = False
    ticks: TickColumns | None = None  # a tick file: where its prices are
    epoch: bool = False  # the time is a count since 1970 (s, ms or µs), not text


@dataclass
class TickColumns:
    """Where a tick file's prices are, and which price a tick has."""

    pick: str  # mid, bid, ask or last
    cols: dict[str, int]  # the quotes read (price, bid, ask) -> column


_ISO = tuple(
    f"YYYY-MM-DD?hh:mm{sec}{zone}"
    for sec in ("", ":ss", ":ss.fff", ":ss.ffffff")
    for zone in ("", "Z", "SHH:NN", "SHHNN", "SHH")
)


def _text_spec(path: Path, fmt: str, mapping: Mapping, tz: str | None = None) -> TextSpec:
    """The reading plan of a text file, checked against its first lines before anything runs."""
    if mapping.ticks:
        return _tick_spec(path, fmt, mapping, tz)
    head = _head(path, 2)
    first = head[0] if head else ""
    if fmt == "histdata":
        return TextSpec(";", 6, False, [0], ("YYYYMMDD hhmmss",), (), HISTDATA_SHIFT,
                        [1, 2, 3, 4, 5])  # fmt: skip
    if fmt == "dukascopy":
        return _dukascopy_spec(path, first, head[1] if len(head) > 1 else "", tz)
    if fmt == "metatrader":
        return _metatrader_spec(path, first)
    if fmt == "klines":
        return _klines_spec(first)
    return _csv_spec(path, first, mapping)


def _klines_spec(first: str) -> TextSpec:
    """open time, open, high, low, close, volume first (Binance adds six more columns)."""
    header = first.lower().replace(" ", "").startswith(_KLINES_HEADER)
    width = max(first.count(",") + 1, 6)
    return TextSpec(",", width, header, [0], (), (), timedelta(0), [1, 2, 3, 4, 5], epoch=True)


# an epoch time's unit from its size: seconds until 5138 (1e11), ms until 5138 (1e14), µs
_EPOCH_UNITS = ((1e11, 1_000_000), (1e14, 1_000), (1e17, 1))


def _epoch_times(col: pa.Array) -> np.ndarray:
    """int64 µs UTC of integer epoch times; the unit of each from its magnitude (a file that
    spans Binance's switch from ms to µs in 2025 mixes both). Not a whole number: unparseable.
    (Parsed as float64, exact for integers below 2^53: µs since 1970 stay below it until 2255.)
    """
    values = parse_floats(col)[0]
    ok = np.isfinite(values) & (values >= 0) & (values == np.floor(values))
    us = np.full(len(values), _NAT, np.int64)
    lower = 0.0
    for upper, factor in _EPOCH_UNITS:
        sel = ok & (values >= lower) & (values < upper)
        us[sel] = values[sel].astype(np.int64) * factor
        lower = upper
    return us


_DUKASCOPY_TEMPLATES = (
    "DD.MM.YYYY hh:mm:ss.fff", "DD.MM.YYYY hh:mm:ss", "DD.MM.YYYY hh:mm",
    r"DD.MM.YYYY hh:mm:ss.fff G\MTSHHNN", r"DD.MM.YYYY hh:mm:ss G\MTSHHNN",
)  # fmt: skip


def _dukascopy_spec(path: Path, first: str, second: str, tz: str | None) -> TextSpec:
    header = first.lower().startswith(_DUKASCOPY_HEADERS)
    if header:
        _check_not_ticks(path, [n.strip() for n in first.split(",")], "close")
    _check_dukascopy_zone(path, first, second, tz)
    width = max(first.count(",") + 1, 6) if header else 6
    return TextSpec(
        ",", width, header, [0], _DUKASCOPY_TEMPLATES, (), timedelta(0), [1, 2, 3, 4, 5]
    )


def _check_dukascopy_zone(path: Path, first: str, second: str, tz: str | None) -> None:
    """A 'Local time' export needs GMT offsets in its times or --tz; a 'Gmt time' one is UTC."""
    if (
        first.lower().startswith("local time")
        and second
        and "GMT" not in second.split(",")[0]
        and tz is None
    ):
        raise BqxError(
            f"{path}: a Dukascopy 'Local time' export whose times carry no GMT offset:"
            " give --tz (the zone the export was made in), or export in GMT"
        )
    if first.lower().startswith("gmt time") and tz not in (None, "UTC"):
        raise BqxError(f"{path}: a Dukascopy 'Gmt time' export is in UTC already: drop --tz")


_MT_TEMPLATES = ("YYYY.MM.DD hh:mm", "YYYY.MM.DD hh:mm:ss")
_MT_COLUMNS = ["date", "time", "open", "high", "low", "close"]  # a header must name these


def _metatrader_spec(path: Path, first: str) -> TextSpec:
    if first[:1].isalpha() or first.startswith("<"):
        return _metatrader_header_spec(path, first)
    width = first.count(",") + 1 if first else 7
    return TextSpec(",", max(width, 7), False, [0, 1], _MT_TEMPLATES, (), timedelta(0),
                    [2, 3, 4, 5, 6])  # fmt: skip


def _metatrader_header_spec(path: Path, first: str) -> TextSpec:
    """A header row: MT5's <DATE>\\t<TIME>\\t<OPEN>... or an MT4 CSV's Date,Time,Open,..."""
    sep = "\t" if "\t" in first else ","
    names = [n.strip().strip("\"'<>").lower() for n in first.split(sep)]
    missing = [w for w in _MT_COLUMNS if w not in names]
    if missing:
        raise BqxError(f"{path}: MetaTrader header lacks {', '.join(missing)}")
    vol = next((names.index(v) for v in ("tickvol", "volume", "vol") if v in names), None)
    fields: list[int | None] = [names.index(w) for w in _MT_COLUMNS[2:]]
    return TextSpec(sep, len(names), True, [names.index("date"), names.index("time")],
                    _MT_TEMPLATES, (), timedelta(0), [*fields, vol])  # fmt: skip


def _csv_spec(path: Path, first: str, mapping: Mapping) -> TextSpec:
    """Generic CSV: a header line names the columns; --columns maps them."""
    sep, names = _header(first)
    lower = {n.lower(): i for i, n in enumerate(names)}
    _check_not_ticks(path, names, mapping.close)
    time_col = mapping.column("time", names, path)
    assert time_col is not None  # a time column is never optional: column() raised
    cols = [mapping.column(f, names, path) for f in FIELDS]
    idx = [None if c is None else lower[c.lower()] for c in cols]
    formats = (mapping.time_format,) if mapping.time_format else ()
    templates = () if mapping.time_format else _ISO
    return TextSpec(sep, len(names), True, [lower[time_col.lower()]], templates, formats,
                    timedelta(0), idx, quoted=True)  # fmt: skip


def _header(first: str) -> tuple[str, list[str]]:
    """(separator, column names) of a header line."""
    sep = max(",;\t", key=first.count)
    return sep, [h.strip().strip("\"'") for h in first.split(sep)]


def _check_not_ticks(path: Path, names: Sequence[str], close: str | None) -> None:
    """A file of ticks (bid, ask or price columns, no close) is not read as minute bars."""
    lower = {n.lower() for n in names}
    if (close or "").lower() not in lower and lower & set(QUOTES):
        raise NeedsOption(
            f"{path}: its columns ({', '.join(names)}) are a tick file's, not minute bars'",
            "ticks", "aggregates ticks into minute bars",
        )  # fmt: skip


# -- tick files ----------------------------------------------------------------------------


def _tick_spec(path: Path, fmt: str, mapping: Mapping, tz: str | None) -> TextSpec:
    """A tick file with a header row: Dukascopy's tick export (``Gmt time,Ask,Bid,AskVolume,
    BidVolume``), or a CSV whose columns the mapping names (``time,price[,size]``,
    ``time,bid,ask``)."""
    if fmt in ("histdata", "metatrader"):
        raise BqxError(f"{path}: a {fmt} file holds minute bars, not ticks")
    head = _head(path, 2)
    first = head[0] if head else ""
    sep, names = _header(first)
    templates: tuple[str, ...] = _DUKASCOPY_TEMPLATES
    formats: tuple[str, ...] = ()
    if first.lower().startswith(_DUKASCOPY_HEADERS) and "time" not in mapping.explicit:
        _check_dukascopy_zone(path, first, head[1] if len(head) > 1 else "", tz)
        time_idx = 0
    else:
        time_col = mapping.column("time", names, path)
        assert time_col is not None  # a time column is never optional: column() raised
        time_idx = [n.lower() for n in names].index(time_col.lower())
        formats = (mapping.time_format,) if mapping.time_format else ()
        templates = () if mapping.time_format else _ISO
    return TextSpec(sep, len(names), True, [time_idx], templates, formats, timedelta(0), [],
                    quoted=True, ticks=tick_columns(path, mapping, names))  # fmt: skip


_NEEDS = {"mid": ("bid", "ask"), "bid": ("bid",), "ask": ("ask",), "last": ("price",)}


def tick_columns(path: Path, mapping: Mapping, names: Sequence[str]) -> TickColumns:
    """The price columns of a tick file and the price taken: ``auto`` is the mid price when
    the file has bid and ask, else the last price (``price``). Both bid and ask are read when
    present, so that a crossed quote (bid > ask) is rejected."""
    found = {q: mapping.column(q, names, path) for q in QUOTES}
    pick = mapping.ticks or "auto"
    if pick == "auto":
        pick = "mid" if found["bid"] and found["ask"] else "last"
    missing = [q for q in _NEEDS[pick] if not found[q]]
    if missing:
        raise BqxError(
            f"{path}: no {' or '.join(missing)} column for ticks priced by {pick} (columns:"
            f" {', '.join(names)}; map them: price=NAME, or bid=NAME,ask=NAME)"
        )
    read = set(_NEEDS[pick]) | ({"bid", "ask"} if pick != "last" else set())
    lower = [n.lower() for n in names]
    cols = {q: lower.index(c.lower()) for q in QUOTES if q in read and (c := found[q])}
    return TickColumns(pick, cols)


Reject = tuple[int, str, str]  # (line, reason, text)


def _too_long(line: int, length: int, head: bytes) -> Reject:
    text = head[:80].decode("utf-8", errors="replace") + "…"
    return line, f"line too long ({length:,} bytes; a bar is under {MAX_LINE:,})", text


def _chunks(f: IO[bytes], size: int, path: Path) -> Iterator[tuple[int, bytes, list[Reject]]]:
    """(number of its first line, text, rejected lines) of consecutive pieces of ``size``.

    Pieces end after a newline, so no line is split. The file is read here, in pieces, rather
    than by pyarrow's streaming reader, whose read-ahead would hold dozens of blocks. A line
    longer than ``MAX_LINE`` is not kept in memory: it is skipped to its end and rejected.
    """
    line, rest = 1, b""
    long_len, long_head = 0, b""  # inside a line too long to keep: its length so far
    for data in _reads(f, size, path):
        if long_len:
            nl = data.find(b"\n")
            if nl < 0:
                long_len += len(data)
                continue
            yield line, b"\n", [_too_long(line, long_len + nl, long_head)]
            line += 1
            long_len, data = 0, data[nl + 1 :]
        data = rest + data if rest else data
        cut = data.rfind(b"\n") + 1
        piece, rest = data[:cut], data[cut:]
        if len(rest) > MAX_LINE:  # the last line goes on and on: skip it
            long_len, long_head, rest = len(rest), rest[:80], b""
        if piece:
            yield line, piece, []
            line += piece.count(b"\n")
    if long_len:
        yield line, b"", [_too_long(line, long_len, long_head)]
    elif rest:
        yield line, rest, []


def _reads(f: IO[bytes], size: int, path: Path) -> Iterator[bytes]:
    """The file's bytes, ``size`` at a time, up to its end."""
    while True:
        try:
            data = f.read(size)
        except _READ_ERRORS as exc:
            raise BqxError(f"{path}: cannot read: {why(exc)}") from None
        if not data:
            return
        yield data


def _sanitize(data: bytes, first: int) -> tuple[bytes, list[Reject]]:
    """Blank out (keeping line numbers) lines that are too long or not UTF-8, rejecting them."""
    u8 = np.frombuffer(data, np.uint8)
    ends = np.flatnonzero(u8 == 10)
    starts = np.concatenate(([0], ends + 1))
    ends = np.concatenate((ends, [len(data)]))
    too_long = (ends - starts) > MAX_LINE
    try:
        data.decode("utf-8")
        bad_utf8 = False
    except UnicodeDecodeError:
        bad_utf8 = True
    if not too_long.any() and not bad_utf8:
        return data, []
    lines = data.split(b"\n")  # rare: line by line in Python
    rejects: list[Reject] = []
    for i, text in enumerate(lines):
        if too_long[i]:
            rejects.append(_too_long(first + i, len(text), text))
            lines[i] = b""
        elif bad_utf8:
            try:
                text.decode("utf-8")
            except UnicodeDecodeError as exc:
                reason = f"not UTF-8 (byte 0x{text[exc.start]:02x} at column {exc.start + 1})"
                rejects.append((first + i, reason, text.decode("utf-8", errors="replace")))
                lines[i] = b""
    return b"\n".join(lines), rejects


def _text_block(
    path: Path, spec: TextSpec, tz: str | None, first: int, data: bytes, pre: list[Reject]
) -> Block:
    """Parse and validate one piece of a text file whose first line is number ``first``."""
    data, bad = _sanitize(data, first)
    pre = pre + bad
    # every line counts, blank ones and the last one without a newline too
    total = data.count(b"\n") + (not data.endswith(b"\n"))
    if not data.strip():
        return _no_bars(pre, first + max(total, 1) - 1)
    table, invalid = _read_csv(path, spec, first, data)
    cols = [c.combine_chunks() for c in table.columns]
    lines = _row_lines(first, total, table.num_rows, invalid)
    if spec.header and first == 1 and len(lines):  # the header line is not a bar
        cols, lines = [c.slice(1) for c in cols], lines[1:]
    bad_lines = pre + _wrong_fields(invalid, spec.header)
    if not len(lines):
        return _no_bars(bad_lines, first + total - 1)
    block = _text_rows(cols, lines, spec, tz)
    if bad_lines:
        block.rejects = sorted(block.rejects + bad_lines)
    block.last_line = first + total - 1
    return block


def _text_rows(cols: list[pa.Array], lines: np.ndarray, spec: TextSpec, tz: str | None) -> Block:
    """The rows' bars (or ticks) parsed from the text columns as the spec says, validated."""
    tcol = cols[spec.time_cols[0]]
    if len(spec.time_cols) > 1:
        tcol = pc.binary_join_element_wise(*[cols[i] for i in spec.time_cols], " ")
    if spec.epoch:  # an instant already: no local time, no repeated hour
        times, later = _epoch_times(tcol), np.zeros(len(tcol), np.int64)
    else:
        times, later = parse_local_times(tcol, spec.templates, spec.formats, tz, spec.shift)
    text = _row_text(cols, spec.sep)
    if spec.ticks is not None:
        quotes = {q: parse_floats(cols[i]) for q, i in spec.ticks.cols.items()}
        return validated_ticks(lines, times, quotes, spec.ticks.pick, text, later)
    fields = [parse_floats(cols[i]) if i is not None else None for i in spec.field_cols]
    return validated_block(lines, times, fields, text, later)


def _row_text(cols: list[pa.Array], sep: str) -> Callable[[list[int]], list[str]]:
    """The text of rows by index: their fields joined by the separator again."""

    def text(rows: list[int]) -> list[str]:
        idx = pa.array(rows, pa.int64())
        return pc.binary_join_element_wise(*[pc.take(c, idx) for c in cols], sep).to_pylist()

    return text


def _no_bars(rejects: list[Reject], last_line: int) -> Block:
    return Block(np.empty(0, np.int64), np.empty((0, 5)), rejects, last_line)


def _read_csv(
    path: Path, spec: TextSpec, first: int, data: bytes
) -> tuple[pa.Table, list[tuple[int, str]]]:
    """Every field as text; the (line, text) of lines with the wrong number of fields apart."""
    names = [f"c{i}" for i in range(spec.width)]
    invalid: list[tuple[int, str]] = []

    def handler(row: pacsv.InvalidRow) -> str:
        invalid.append((first - 1 + (row.number or 0), row.text))
        return "skip"

    try:
        table = pacsv.read_csv(
            pa.py_buffer(data),
            read_options=pacsv.ReadOptions(
                column_names=names, use_threads=False, block_size=len(data) + 1
            ),
            parse_options=pacsv.ParseOptions(
                delimiter=spec.sep, quote_char='"' if spec.quoted else False,
                ignore_empty_lines=False, invalid_row_handler=handler,
            ),
            convert_options=pacsv.ConvertOptions(
                column_types={n: pa.string() for n in names}, strings_can_be_null=False,
                quoted_strings_can_be_null=False,
            ),
        )  # fmt: skip
    except pa.ArrowInvalid as exc:
        raise BqxError(f"{path}: cannot read line {first} on: {why(exc)}") from None
    return table, invalid


def _row_lines(first: int, total: int, n: int, invalid: list[tuple[int, str]]) -> np.ndarray:
    """The physical line number of each of the ``n`` rows: every line is a row or invalid."""
    lines = np.arange(first, first + total, dtype=np.int64)
    if invalid:
        lines = lines[~np.isin(lines, [ln for ln, _ in invalid])]
    if len(lines) < n:  # lines ended by a lone CR (old Mac files): count rows instead
        lines = np.arange(first, first + n + len(invalid), dtype=np.int64)
        lines = lines[~np.isin(lines, [ln for ln, _ in invalid])]
    return lines[:n]


def _wrong_fields(invalid: list[tuple[int, str]], header: bool) -> list[Reject]:
    """Invalid rows as rejects, but for blank ones and a header line (not bars either)."""
    return [
        (line, "wrong number of fields", text)
        for line, text in invalid
        if text.strip() and not (header and line == 1)
    ]


def _text_blocks(path: Path, spec: TextSpec, tz: str | None) -> Generator[Block, None, None]:
    """A text file's blocks in order, parsed two at a time (pyarrow and numpy drop the GIL)."""
    with open_input(path) as f:
        yield from _ordered(
            lambda piece: _text_block(path, spec, tz, *piece), _chunks(f, BLOCK_BYTES, path)
        )


def _ordered(fn: Callable[[Any], Block], items: Iterator[Any], workers: int = 2) -> Iterator[Block]:
    """``map(fn, items)`` on threads, in order, with at most ``workers + 1`` items in flight."""
    with ThreadPoolExecutor(max_workers=workers) as ex:
        pending: deque[Future[Block]] = deque()
        try:
            for item in items:
                pending.append(ex.submit(fn, item))
                if len(pending) > workers:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        finally:
            for fut in pending:
                fut.cancel()


# -- parquet -----------------------------------------------------------------------------------


def _parquet_open(path: Path, mapping: Mapping) -> Any:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except _READ_ERRORS as exc:
        raise BqxError(f"{path}: cannot read as parquet: {why(exc)}") from None
    names = pf.schema_arrow.names
    if mapping.ticks:
        tick_columns(path, mapping, names)
        mapping.column("time", names, path)
        return pf
    _check_not_ticks(path, names, mapping.close)
    for key in ("time", *FIELDS):
        mapping.column(key, names, path)  # a mapped column that is missing
    return pf


_Rows = Callable[[pa.RecordBatch, np.ndarray, np.ndarray, np.ndarray], Block]


def _parquet_blocks(path: Path, tz: str | None, mapping: Mapping) -> Generator[Block, None, None]:
    """Row groups in batches; a reject's line is the 1-based row number."""
    pf = _parquet_open(path, mapping)
    names = pf.schema_arrow.names
    time_col = mapping.column("time", names, path)
    rows = (
        _parquet_ticks(path, mapping, names)
        if mapping.ticks
        else _parquet_bars(mapping, names, path)
    )
    row = 1
    for batch in pf.iter_batches(batch_size=250_000):
        n = batch.num_rows
        lines = np.arange(row, row + n, dtype=np.int64)
        row += n
        times, later = _parquet_times(batch.column(time_col), tz, mapping)
        yield rows(batch, lines, times, later)


def _parquet_bars(mapping: Mapping, names: Sequence[str], path: Path) -> _Rows:
    cols = {f: mapping.column(f, names, path) for f in FIELDS}

    def rows(
        batch: pa.RecordBatch, lines: np.ndarray, times: np.ndarray, later: np.ndarray
    ) -> Block:
        fields = [None if cols[f] is None else parse_floats(batch.column(cols[f])) for f in FIELDS]
        return validated_block(lines, times, fields, _batch_text(batch), later)

    return rows


def _parquet_ticks(path: Path, mapping: Mapping, names: Sequence[str]) -> _Rows:
    spec = tick_columns(path, mapping, names)

    def rows(
        batch: pa.RecordBatch, lines: np.ndarray, times: np.ndarray, later: np.ndarray
    ) -> Block:
        quotes = {q: parse_floats(batch.column(i)) for q, i in spec.cols.items()}
        return validated_ticks(lines, times, quotes, spec.pick, _batch_text(batch), later)

    return rows


def _batch_text(batch: pa.RecordBatch) -> Callable[[list[int]], list[str]]:
    def text(rows: list[int]) -> list[str]:
        """The row's values by column name: ``ts=2024-07-01 00:00:00,last=1.1``."""
        sub = batch.take(pa.array(rows, pa.int64())).to_pylist()
        return [",".join(f"{k}={'' if v is None else v}" for k, v in r.items()) for r in sub]

    return text


def _parquet_times(
    raw: pa.Array, tz: str | None, mapping: Mapping
) -> tuple[np.ndarray, np.ndarray]:
    """(int64 µs UTC, later) of a time column: timestamps (naive ones local in ``tz``) or
    text; ``later`` as ``parse_local_times`` gives it."""
    if pa.types.is_timestamp(raw.type):
        return local_timestamps(raw, tz)
    formats = (mapping.time_format,) if mapping.time_format else ()
    return parse_local_times(raw.cast(pa.string()), () if formats else _ISO, formats, tz)


# -- one file -----------------------------------------------------------------------------------


def reading_plan(path: Path, kind: str, mapping: Mapping, tz: str | None) -> TextSpec | None:
    """How to read a file of format ``kind`` (None for Parquet), checked against its start.

    Raises BqxError on a file that cannot be read so, before anything is written.
    """
    if kind == "parquet":
        _parquet_open(path, mapping)
        return None
    _head(path, 1)  # a broken .gz or .zip fails here
    return _text_spec(path, kind, mapping, tz)


def read_blocks(
    path: Path, plan: TextSpec | None, tz: str | None, mapping: Mapping
) -> Generator[Block, None, None]:
    """The file's blocks in order, as its ``reading_plan`` says; close it to stop early."""
    return _parquet_blocks(path, tz, mapping) if plan is None else _text_blocks(path, plan, tz)
