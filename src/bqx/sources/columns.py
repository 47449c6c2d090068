"""Columns of text into bar values: times, prices, and the rules a bar obeys. No files.

The readers of ``bqx.sources.formats`` hand whole columns here (Arrow arrays of a block of
rows); everything is done column-wise with numpy and pyarrow, no Python per row but for rows
that fail. A ``Block`` is the result: the valid bars, and each rejected row with its reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from functools import lru_cache

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bqx.errors import InvalidOption

FIELDS = ("open", "high", "low", "close", "volume")
EARLIEST = datetime(1971, 1, 1, tzinfo=UTC)  # no FX minute bars before this
US_PER_MIN = 60_000_000
_NAT = np.iinfo(np.int64).min  # unparseable time
_GAP = _NAT + 1  # a local time that does not exist (the spring-forward hour)


def why(exc: BaseException) -> str:
    """The one-line reason an error gives (an OS error's text without its file name)."""
    text = (str(exc).strip().splitlines() or [""])[0]
    return getattr(exc, "strerror", None) or text or type(exc).__name__


# -- times ----------------------------------------------------------------------------------
#
# The formats' times are fixed-width digits. They are parsed straight from the Arrow string
# buffer with numpy (about 10x strptime): a template names each character, Y M D h m s for the
# date and time, f for fractions of a second, S H N for a ±HHMM offset, ? for 'T' or ' ', and
# anything else (or a letter after a backslash) must be that character. Rows no template fits
# go to strptime if a format is given, else they are unparseable.


@dataclass(frozen=True)
class _Template:
    text: str
    width: int
    digits: np.ndarray  # positions of digit characters
    literal_pos: np.ndarray
    literal_val: np.ndarray
    either: np.ndarray  # positions of '?': 'T', 't' or ' '
    sign: int | None
    spans: dict[str, np.ndarray]  # letter -> its positions

    @property
    def aware(self) -> bool:
        """An instant, not a local time: an offset, or a literal Z (UTC)."""
        return self.sign is not None or ord("Z") in self.literal_val


@lru_cache(maxsize=64)
def _compile(text: str) -> _Template:
    digit_letters = "YMDhmsfHN"
    spans: dict[str, list[int]] = {}
    digits, lit_pos, lit_val, either, sign = [], [], [], [], None
    chars = _template_chars(text)
    for i, (ch, escaped) in enumerate(chars):
        if not escaped and ch in digit_letters:
            digits.append(i)
            spans.setdefault(ch, []).append(i)
        elif not escaped and ch == "?":
            either.append(i)
        elif not escaped and ch == "S":
            sign = i
        else:
            lit_pos.append(i)
            lit_val.append(ord(ch))
    return _Template(
        text, len(chars), np.array(digits, np.intp), np.array(lit_pos, np.intp),
        np.array(lit_val, np.uint8), np.array(either, np.intp), sign,
        {k: np.array(v, np.intp) for k, v in spans.items()},
    )  # fmt: skip


def _template_chars(text: str) -> list[tuple[str, bool]]:
    """(character, escaped) of a template: a backslash makes the next character a literal."""
    chars: list[tuple[str, bool]] = []
    it = iter(text)
    for ch in it:
        chars.append((next(it), True) if ch == "\\" else (ch, False))
    return chars


def _string_buffers(col: pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(offsets, bytes) of a string array, without copying."""
    if col.type != pa.string():
        col = col.cast(pa.string())
    _, off, data = col.buffers()
    offsets = np.frombuffer(off, dtype=np.int32, count=len(col) + 1, offset=col.offset * 4)
    chars = np.frombuffer(data, dtype=np.uint8) if data is not None else np.empty(0, np.uint8)
    return offsets, chars


def _days_from_civil(y: np.ndarray, m: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Days since 1970-01-01 of a proleptic Gregorian date (H. Hinnant's algorithm)."""
    y = y - (m <= 2)
    era = np.floor_divide(y, 400)
    yoe = y - era * 400
    doy = (153 * ((m + 9) % 12) + 2) // 5 + d - 1
    return era * 146097 + yoe * 365 + yoe // 4 - yoe // 100 + doy - 719468


_MONTH_DAYS = np.array([31, 28, 31, 30, 31, 30, 31, 31, 30, 31, 30, 31], np.int64)


def _fixed_times(col: pa.Array, tpl: _Template) -> tuple[np.ndarray, np.ndarray]:
    """(µs since epoch, matched) of each string that fits the template exactly.

    Times are naive unless the template has an offset, then UTC. Impossible dates (31.06,
    24:00, 29.02 of a common year) do not match.
    """
    n = len(col)
    us = np.full(n, _NAT, np.int64)
    matched = np.zeros(n, bool)
    offsets, data = _string_buffers(col)
    rows = np.flatnonzero(np.diff(offsets) == tpl.width)
    if col.null_count and len(rows):
        rows = rows[col.is_valid().to_numpy(zero_copy_only=False)[rows]]
    if not len(rows):
        return us, matched
    chars = data[offsets[rows][:, None] + np.arange(tpl.width)]
    v = chars.astype(np.int64) - 48
    good = (v[:, tpl.digits] >= 0).all(1) & (v[:, tpl.digits] <= 9).all(1)
    if len(tpl.literal_pos):
        good &= (chars[:, tpl.literal_pos] == tpl.literal_val).all(1)
    for i in tpl.either:
        good &= np.isin(chars[:, i], (ord("T"), ord("t"), ord(" ")))
    if tpl.sign is not None:
        good &= np.isin(chars[:, tpl.sign], (ord("+"), ord("-")))

    def num(letter: str) -> np.ndarray:
        pos = tpl.spans.get(letter)
        if pos is None:
            return np.zeros(len(rows), np.int64)
        return v[:, pos] @ (10 ** np.arange(len(pos) - 1, -1, -1, dtype=np.int64))

    year, month, day = num("Y"), num("M"), num("D")
    hour, minute, sec = num("h"), num("m"), num("s")
    good &= (month >= 1) & (month <= 12) & (day >= 1) & (hour < 24) & (minute < 60) & (sec < 60)
    mi = np.clip(month, 1, 12) - 1
    leap = (year % 4 == 0) & ((year % 100 != 0) | (year % 400 == 0))
    good &= day <= _MONTH_DAYS[mi] + ((mi == 1) & leap)
    days = _days_from_civil(year, np.clip(month, 1, 12), day)
    t = ((days * 24 + hour) * 60 + minute) * 60 + sec
    t = t * 1_000_000
    if "f" in tpl.spans:
        k = len(tpl.spans["f"])
        frac = num("f")
        t += frac * 10 ** (6 - k) if k <= 6 else frac // 10 ** (k - 6)
    if tpl.sign is not None:
        off_h, off_m = num("H"), num("N")
        good &= (off_h < 24) & (off_m < 60)
        sign = np.where(chars[:, tpl.sign] == ord("-"), -1, 1)
        t -= sign * (off_h * 60 + off_m) * US_PER_MIN
    us[rows[good]] = t[good]
    matched[rows[good]] = True
    return us, matched


def matches(text: str, template: str) -> bool:
    """Whether one string fits a time template exactly."""
    tpl = _compile(template)
    col = pa.array([text], pa.string())
    return bool(_fixed_times(col, tpl)[1][0])


def _strptime_us(col: pa.Array, fmt: str) -> np.ndarray:
    """µs since epoch (naive) of text in a strptime format; ``_NAT`` where it does not parse."""
    col = pc.utf8_trim_whitespace(col.cast(pa.string()))
    try:
        ts = pc.strptime(col, format=fmt, unit="us", error_is_null=True)
    except pa.ArrowInvalid as exc:
        raise InvalidOption("time_format", fmt, why(exc)) from None
    if ts.type.tz is not None:  # %z: already an instant
        ts = ts.cast(pa.timestamp("us"))
    # strptime rolls impossible dates over (31.06 -> 01.07, 24:00 -> 00:00): such a time does
    # not print back as read. Only the first days of a month and midnights can be rolled over,
    # so only those are printed back.
    suspect = pc.fill_null(
        pc.or_(pc.less_equal(pc.day(ts), 3), pc.equal(pc.hour(ts), 0)), False
    ).to_numpy(zero_copy_only=False)
    us = pc.fill_null(ts.cast(pa.int64()), _NAT).to_numpy(zero_copy_only=False).copy()
    if suspect.any() and "%z" not in fmt and "%f" not in fmt:
        idx = np.flatnonzero(suspect)
        sub = pc.cast(pc.take(ts, pa.array(idx)), pa.timestamp("s"), safe=False)
        same = pc.fill_null(pc.equal(pc.strftime(sub, format=fmt), pc.take(col, idx)), False)
        us[idx[~same.to_numpy(zero_copy_only=False)]] = _NAT
    return us


def parse_times(
    col: pa.Array,
    templates: Sequence[str],
    formats: Sequence[str],
    tz: str | None,
    shift: timedelta = timedelta(0),
) -> np.ndarray:
    """int64 µs UTC: templates first, then strptime formats; naive times are local in ``tz``.

    Unparseable times become ``_NAT``; local times in a daylight-saving gap ``_GAP``; in the
    repeated autumn hour the earlier instant (``parse_local_times`` gives the later one too).
    """
    return parse_local_times(col, templates, formats, tz, shift)[0]


def parse_local_times(
    col: pa.Array,
    templates: Sequence[str],
    formats: Sequence[str],
    tz: str | None,
    shift: timedelta = timedelta(0),
) -> tuple[np.ndarray, np.ndarray]:
    """(times, later) as ``parse_times``; ``later`` is the later instant of a local time in the
    hour repeated when clocks go back (``times`` holds the earlier one), 0 elsewhere."""
    n = len(col)
    us = np.full(n, _NAT, np.int64)
    aware = np.zeros(n, bool)
    todo = np.ones(n, bool)
    for text in templates:
        tpl = _compile(text)
        got, ok = _fixed_times(col, tpl)
        ok &= todo
        us[ok] = got[ok]
        aware |= ok & tpl.aware
        todo &= ~ok
        if not todo.any():
            break
    for fmt in formats:
        idx = np.flatnonzero(todo)
        if not len(idx):
            break
        got = _strptime_us(pc.take(col, pa.array(idx)), fmt)
        ok = got != _NAT
        us[idx[ok]] = got[ok]
        todo[idx[ok]] = False
    naive = ~todo & ~aware
    if shift:
        us[naive] += int(shift / timedelta(microseconds=1))
    later = np.zeros(n, np.int64)
    if tz not in (None, "UTC") and naive.any():
        idx = np.flatnonzero(naive)
        us[idx], later[idx] = _localize(pa.array(us[idx], pa.timestamp("us")), tz)
    return us, later


def _localize(local: pa.Array, tz: str) -> tuple[np.ndarray, np.ndarray]:
    """(µs UTC, later) of naive local timestamps in ``tz``: ``_GAP`` for a time that does not
    exist (spring forward), ``_NAT`` for a null; a time in the repeated autumn hour gets its
    earlier instant, and its later one in ``later`` (0 elsewhere)."""
    early = pc.assume_timezone(local, tz, ambiguous="earliest", nonexistent="earliest")
    gap_end = pc.assume_timezone(local, tz, ambiguous="earliest", nonexistent="latest")
    late = pc.assume_timezone(local, tz, ambiguous="latest", nonexistent="earliest")

    def ints(ts: pa.Array) -> np.ndarray:
        return pc.fill_null(ts.cast(pa.int64()), _NAT).to_numpy(zero_copy_only=False).copy()

    us, gap_us, late_us = ints(early), ints(gap_end), ints(late)
    gap = us != gap_us
    later = np.where((late_us != us) & ~gap & (us != _NAT), late_us, 0)
    us[gap] = _GAP
    return us, later


def timestamps(col: pa.Array, tz: str | None) -> np.ndarray:
    """int64 µs UTC of a timestamp column, naive ones local in ``tz``.

    Nulls become ``_NAT``; local times in a daylight-saving gap ``_GAP``; in the repeated
    autumn hour the earlier instant (``local_timestamps`` gives the later one too).
    """
    return local_timestamps(col, tz)[0]


def local_timestamps(col: pa.Array, tz: str | None) -> tuple[np.ndarray, np.ndarray]:
    """(times, later) of a timestamp column, as ``parse_local_times`` for text."""
    if col.type.tz is None and tz not in (None, "UTC"):
        return _localize(col.cast(pa.timestamp("us")), tz)
    us = pc.fill_null(col.cast(pa.timestamp("us")).cast(pa.int64()), _NAT)
    return us.to_numpy(zero_copy_only=False).copy(), np.zeros(len(col), np.int64)


# -- numbers and validation -----------------------------------------------------------------

Numbers = tuple[np.ndarray, np.ndarray, np.ndarray]  # see parse_floats


def parse_floats(col: pa.Array) -> Numbers:
    """(values, NaN where not a number; mask of unparseable fields; mask of empty fields)."""
    n = len(col)
    if pa.types.is_floating(col.type) or pa.types.is_integer(col.type):
        vals = pc.cast(col, pa.float64()).to_numpy(zero_copy_only=False).astype(np.float64)
        return vals, np.zeros(n, bool), col.is_null().to_numpy(zero_copy_only=False)
    col = col.cast(pa.string())
    try:  # the common case: every field a number, parsed in one call
        vals = pc.cast(col, pa.float64())
        return (vals.to_numpy(zero_copy_only=False).astype(np.float64), np.zeros(n, bool),
                col.is_null().to_numpy(zero_copy_only=False))  # fmt: skip
    except pa.ArrowInvalid:
        pass
    col = pc.utf8_trim_whitespace(col)
    empty = pc.fill_null(pc.equal(col, ""), True)
    col = pc.if_else(empty, pa.scalar(None, pa.string()), col)
    empty_np = empty.to_numpy(zero_copy_only=False)
    try:  # blanks and padding only
        vals = pc.cast(col, pa.float64())
        return vals.to_numpy(zero_copy_only=False).astype(np.float64), np.zeros(n, bool), empty_np
    except pa.ArrowInvalid:
        pass
    # some field is not a number: this block goes field by field (rare, so Python is fine)
    out = np.full(n, np.nan)
    bad = np.zeros(n, bool)
    for i, s in enumerate(col.to_pylist()):
        if s is None:
            continue
        try:
            if "_" in s:  # float() takes 1_000, a CSV field should not
                raise ValueError(s)
            out[i] = float(s)
        except ValueError:
            bad[i] = True
    return out, bad, empty_np


def _validate(
    times: np.ndarray, fields: Sequence[Numbers | None], *, minutes: bool = False
) -> tuple[np.ndarray, dict[int, str]]:
    """(ok mask, row -> reason). The first reason that applies: time, numbers, OHLC.

    A field that is None is a column the source lacks: no rule involves it. ``minutes``: a
    time must be on a whole minute (a bar's open time).
    """
    found = _Reasons(len(times))
    _check_times(found, times)
    if minutes:
        _check_minutes(found, times)
    with np.errstate(invalid="ignore"):
        for name, f in zip(FIELDS, fields, strict=True):
            if f is not None:
                _check_field(found, name, f)
        _check_ohlc(found, fields)
    return found.pending, found.reasons


class _Reasons:
    """Each row's first reason to reject it: a rule skips rows that an earlier one rejected."""

    def __init__(self, n: int) -> None:
        self.pending = np.ones(n, bool)
        self.reasons: dict[int, str] = {}

    def mark(self, mask: np.ndarray, why: Callable[[int], str]) -> None:
        hit = mask & self.pending
        if hit.any():
            for i in np.flatnonzero(hit):
                self.reasons[int(i)] = why(int(i))
            self.pending[hit] = False


def _check_times(found: _Reasons, times: np.ndarray) -> None:
    latest = (datetime.now(UTC) + timedelta(days=2)).timestamp() * 1e6
    found.mark(times == _NAT, lambda i: "unparseable time")
    found.mark(times == _GAP, lambda i: "local time does not exist (daylight-saving gap)")
    found.mark(
        (times < EARLIEST.timestamp() * 1e6) | (times > latest), lambda i: "time out of range"
    )


OFF_MINUTE = "not a minute bar: the time is"  # how an off-minute reason starts


def _check_minutes(found: _Reasons, times: np.ndarray) -> None:
    """A minute bar opens on a whole minute; a time with seconds is a tick's."""
    past = times % US_PER_MIN
    found.mark(past != 0, lambda i: f"{OFF_MINUTE} {past[i] / 1e6:g} s past the minute (a tick?)")


def _check_field(found: _Reasons, name: str, numbers: Numbers) -> None:
    values, unparseable, empty = numbers
    found.mark(unparseable, lambda i: f"unparseable {name}")
    if name != "volume":
        found.mark(empty, lambda i: f"missing {name}")
        found.mark(
            ~np.isfinite(values) | (values <= 0),
            lambda i: f"{name} is {values[i]}: must be finite and > 0",
        )
    else:  # an empty or NaN volume is NULL; a given one must be a count
        found.mark(
            np.isinf(values) | (values < 0),
            lambda i: f"volume is {values[i]}: must be finite and ≥ 0",
        )


def _check_ohlc(found: _Reasons, fields: Sequence[Numbers | None]) -> None:
    o, h, lo, c = (None if f is None else f[0] for f in fields[:4])
    if h is not None and lo is not None:
        found.mark(h < lo, lambda i: f"high {h[i]} < low {lo[i]}")
    for name, v in (("open", o), ("close", c)):
        if v is not None:
            found.mark(_outside(v, lo, h), _outside_reason(name, v))


def _outside_reason(name: str, v: np.ndarray) -> Callable[[int], str]:
    return lambda i: f"{name} {v[i]} outside [low, high]"


def _outside(v: np.ndarray, lo: np.ndarray | None, h: np.ndarray | None) -> np.ndarray:
    """Where ``v`` is below the low or above the high (a missing bound bounds nothing)."""
    out = np.zeros(len(v), bool)
    if lo is not None:
        out |= v < lo
    if h is not None:
        out |= v > h
    return out


@dataclass
class Block:
    """One block of rows read: the valid bars, and the rejected rows with reasons."""

    times: np.ndarray  # int64 µs UTC of the valid rows
    ohlcv: np.ndarray  # (n, 5) of the valid rows, NaN volume = NULL
    rejects: list[tuple[int, str, str]]  # (line, reason, text)
    last_line: int
    # valid rows whose local time is in the hour repeated when clocks go back: their later
    # instant (``times`` holds the earlier), 0 elsewhere; None when there is none
    later: np.ndarray | None = None
    folds: list[tuple[int, str]] = field(default_factory=list)  # (line, text) of those rows


def validated_block(
    lines: np.ndarray,
    times: np.ndarray,
    fields: list[Numbers | None],
    text: Callable[[list[int]], list[str]],
    later: np.ndarray | None = None,
) -> Block:
    """The valid bars of the rows, and the others as rejects (line, reason, text).

    ``lines`` are the rows' line numbers; ``text`` gives the text of rows by index, asked for
    the rejected rows only (and rows in a repeated local hour, see ``later``). A bar's time
    must be on a whole minute: a time with seconds is a tick (``validated_ticks``).
    """
    ok, reasons = _validate(times, fields, minutes=True)
    n = len(times)
    ohlcv = np.column_stack([np.full(n, np.nan) if f is None else f[0] for f in fields])[ok]
    return _block(lines, times, ok, reasons, ohlcv, text, later)


def _block(
    lines: np.ndarray, times: np.ndarray, ok: np.ndarray, reasons: dict[int, str],
    values: np.ndarray, text: Callable[[list[int]], list[str]], later: np.ndarray | None,
) -> Block:  # fmt: skip
    """The Block of validated rows: ``values`` of the valid ones, the others as rejects."""
    bad = sorted(reasons)
    texts = text(bad) if bad else []
    rejects = [
        (int(lines[i]), reasons[i], t)
        for i, t in zip(bad, texts, strict=True)
        if t.strip(" ,;\t")  # an empty line or one of separators only is not a bar: skipped
    ]
    block = Block(times[ok], values, rejects, int(lines[-1]) if len(lines) else 0)
    if later is not None and (later[ok] != 0).any():
        block.later = later[ok]
        folded = np.flatnonzero(ok & (later != 0))
        block.folds = list(zip(lines[folded].tolist(), text(folded.tolist()), strict=True))
    return block


# -- ticks ----------------------------------------------------------------------------------

TICK_PRICES = ("auto", "mid", "bid", "ask", "last")  # auto: mid with bid and ask, else last


def validated_ticks(
    lines: np.ndarray,
    times: np.ndarray,
    quotes: dict[str, Numbers],
    pick: str,
    text: Callable[[list[int]], list[str]],
    later: np.ndarray | None = None,
) -> Block:
    """Ticks as one-tick bars (open = high = low = close = the price, volume 1).

    ``quotes`` holds the columns read (``price``, ``bid``, ``ask``); ``pick`` the price taken:
    ``mid`` = (bid + ask) / 2, ``bid``, ``ask`` or ``last`` (the ``price`` column). Each column
    read must be a finite price > 0, and a bid above its ask is rejected.
    """
    found = _Reasons(len(times))
    _check_times(found, times)
    with np.errstate(invalid="ignore"):
        for name, numbers in quotes.items():
            _check_field(found, name, numbers)
        if "bid" in quotes and "ask" in quotes:
            bid, ask = quotes["bid"][0], quotes["ask"][0]
            found.mark(bid > ask, lambda i: f"bid {bid[i]} > ask {ask[i]}")
    ok = found.pending
    if pick == "mid":
        price = (quotes["bid"][0] + quotes["ask"][0]) / 2
    else:
        price = quotes["price" if pick == "last" else pick][0]
    p = price[ok]
    values = np.column_stack([p, p, p, p, np.ones(len(p))])
    return _block(lines, times, ok, found.reasons, values, text, later)


# -- the hour repeated when clocks go back ---------------------------------------------------

FOLD_GIVEN_ONCE = (
    "local time in the hour repeated when clocks go back, given once: cannot tell which of"
    " its two instants it is"
)
FOLD_OUT_OF_ORDER = (
    "local time in the hour repeated when clocks go back, and the file is not in time order:"
    " cannot tell which of its two instants it is"
)


class RepeatedHours:
    """Maps the lines of a file whose local times fall in the hour that clocks repeat.

    In a file in time order (its other bars' times never go back) the repeated hour appears
    twice: the first run of such lines gets the earlier instants and, after the times go
    back, the second run the later ones. Where order cannot tell (the hour given once, more
    than two runs, or the file out of order) the lines are rejected with the reason. Feed
    the file's blocks in order to ``take``; ``finish`` gives the lines held back.
    """

    def __init__(self) -> None:
        self.in_order = True
        self.last = np.iinfo(np.int64).min
        self.held: list[tuple[np.ndarray, np.ndarray, np.ndarray, list[tuple[int, str]]]] = []

    def take(self, block: Block) -> tuple[np.ndarray, np.ndarray]:
        """The block's (times, values) but for its lines in a repeated hour, held back."""
        times, values = block.times, block.ohlcv
        if block.later is not None:
            fold = block.later != 0
            self.held.append((times[fold], block.later[fold], values[fold], block.folds))
            times, values = times[~fold], values[~fold]
        if len(times):
            self.in_order &= bool(times[0] >= self.last) and bool((np.diff(times) >= 0).all())
            self.last = int(times[-1])
        return times, values

    def finish(self) -> tuple[np.ndarray, np.ndarray, list[tuple[int, str, str]]]:
        """(times, values) of the held lines mapped to their instants, and those rejected."""
        if not self.held:
            return np.empty(0, np.int64), np.empty((0, 5)), []
        early = np.concatenate([h[0] for h in self.held])
        late = np.concatenate([h[1] for h in self.held])
        values = np.concatenate([h[2] for h in self.held])
        rows = [r for h in self.held for r in h[3]]
        times = early.copy()
        ok = np.zeros(len(early), bool)
        reasons: dict[int, str] = {}
        for group in _fold_groups(early):
            if not self.in_order:
                reasons.update(dict.fromkeys(group.tolist(), FOLD_OUT_OF_ORDER))
                continue
            runs = np.split(group, np.flatnonzero(np.diff(early[group]) < 0) + 1)
            if len(runs) != 2:
                why = FOLD_GIVEN_ONCE if len(runs) == 1 else FOLD_OUT_OF_ORDER
                reasons.update(dict.fromkeys(group.tolist(), why))
                continue
            times[runs[1]] = late[runs[1]]  # the second time round: the later instant
            ok[group] = True
        rejects = [(rows[i][0], why, rows[i][1]) for i, why in sorted(reasons.items())]
        return times[ok], values[ok], rejects


def _fold_groups(early: np.ndarray) -> list[np.ndarray]:
    """Indices (in file order) of the held lines per clock change: a change's repeated hour
    spans an hour or so, and changes are months apart."""
    order = np.argsort(early, kind="stable")
    cuts = np.flatnonzero(np.diff(early[order]) > 86_400_000_000) + 1
    return [np.sort(g) for g in np.split(order, cuts)]
