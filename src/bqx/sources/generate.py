"""Synthetic minute bars that look like the market: the demo's and the tests' data source.

Seven currencies follow correlated random walks in US dollars (USD is the numeraire), so the
28 pairs of AUD CAD CHF EUR GBP JPY NZD USD are their crosses and triangles agree
(EURUSD × USDJPY ≈ EURJPY, up to rounding). Levels are near mid-2024 markets, volatility is
per currency, bars exist only in the forex week (Sunday 22:00 to Friday 22:00 UTC) and a few
percent of minutes are missing per pair, so a month holds about 30,700 bars per pair as in the
report. Prices are rounded to the pair's pip precision with OHLC consistent.

Reproducible: a seed and a month always give the same bars, whatever range is asked. Each
month is a pure function of (seed, month): the currencies' levels at the start of every month
come from a coarse monthly "anchor" walk seeded by the seed alone, and each month's minutes are
a random walk from (seed, month) bridged to reach the next month's anchor, so consecutive
months join exactly (a month's first open is the previous month's last close). Each pair's
missing minutes and intra-minute ranges come from (seed, pair, month), so generating a subset
of pairs gives those pairs' bars exactly as generating all 28 does.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import numpy as np
import psycopg

from bqx.core.layout import Layout
from bqx.core.months import Month, month_range
from bqx.core.symbols import REPORT_PAIRS, validate_pair
from bqx.core.text import plural
from bqx.db.connect import DatabaseLike, connect, pool
from bqx.errors import BqxError, InvalidOption, NeedsOption
from bqx.sources.universe import find as find_instrument
from bqx.sources.universe import instrument_bars
from bqx.sources.universe import stream as _stream
from bqx.store.ddl import create_source_table
from bqx.store.generated import foreign_bars, store_generated_month

CURRENCIES = ("AUD", "CAD", "CHF", "EUR", "GBP", "JPY", "NZD")  # priced in USD
# USD value of one unit, mid-2024
LEVEL_USD = {"AUD": 0.665, "CAD": 1 / 1.37, "CHF": 1 / 0.895, "EUR": 1.075, "GBP": 1.27,
             "JPY": 1 / 160.5, "NZD": 0.61}  # fmt: skip
# per-minute log-return volatility against USD (about 0.35–0.55 % a day)
VOL = {"AUD": 1.30e-4, "CAD": 0.85e-4, "CHF": 1.05e-4, "EUR": 0.95e-4, "GBP": 1.00e-4,
       "JPY": 1.25e-4, "NZD": 1.35e-4}  # fmt: skip
# factor loadings: a common dollar factor and a regional one (Europe, commodity, haven)
DOLLAR = {"AUD": 0.55, "CAD": 0.50, "CHF": 0.60, "EUR": 0.70, "GBP": 0.60, "JPY": 0.45,
          "NZD": 0.55}  # fmt: skip
REGION = {"EUR": ("europe", 0.55), "GBP": ("europe", 0.45), "CHF": ("europe", 0.50),
          "AUD": ("commodity", 0.65), "NZD": ("commodity", 0.65), "CAD": ("commodity", 0.35),
          "JPY": ("haven", 0.30)}  # fmt: skip
MISSING = 0.02  # fraction of open minutes without a bar: ~30,700 bars a month on average
WEEK_MIN = 7 * 1440
# minute of the week with Monday 00:00 = 0 (1970-01-01 was a Thursday: +3 days)
_CLOSE = 4 * 1440 + 22 * 60  # Friday 22:00
_OPEN = 6 * 1440 + 22 * 60  # Sunday 22:00


def open_minutes(start: Month, end: Month) -> np.ndarray:
    """Minutes (datetime64[m]) of the forex week from the start of ``start`` to ``end``'s end."""
    t0 = np.datetime64(start.start.replace(tzinfo=None), "m")
    t1 = np.datetime64(end.end.replace(tzinfo=None), "m")
    minutes = np.arange(t0, t1)
    mow = (minutes.astype(np.int64) + 3 * 1440) % WEEK_MIN
    return minutes[(mow < _CLOSE) | (mow >= _OPEN)]


def _factor_shocks(rng: np.random.Generator, n: int) -> dict[str, np.ndarray]:
    """Unit-variance shocks per currency with the dollar and regional factor structure."""
    factors = {name: rng.standard_normal(n) for name in ("dollar", "europe", "commodity", "haven")}
    out = {}
    for c in CURRENCIES:
        region, b = REGION[c]
        a = DOLLAR[c]
        own = np.sqrt(max(0.0, 1.0 - a * a - b * b))
        out[c] = a * factors["dollar"] + b * factors[region] + own * rng.standard_normal(n)
    return out


_ANCHOR_FIRST = Month(1900, 1)  # the anchor walk covers every month a Month can be
_ANCHOR_MONTHS = (2999 - 1900 + 1) * 12 + 1  # ... and the start of the month after the last
_ANCHOR_ZERO = Month(2024, 7)  # where the levels are LEVEL_USD
_MONTH_OPEN_MINUTES = 31_300  # a month's open minutes, on average: the anchor step's scale


def _month_index(month: Month) -> int:
    return (month.year - _ANCHOR_FIRST.year) * 12 + month.month - 1


@lru_cache(maxsize=8)
def _anchors(seed: int) -> dict[str, np.ndarray]:
    """Log USD value of each currency at the start of every month, from the seed alone."""
    shocks = _factor_shocks(_stream(seed, "anchors"), _ANCHOR_MONTHS)
    zero = _month_index(_ANCHOR_ZERO)
    out = {}
    for c in CURRENCIES:
        walk = np.concatenate(([0.0], np.cumsum(VOL[c] * np.sqrt(_MONTH_OPEN_MINUTES) * shocks[c])))
        walk = walk[:_ANCHOR_MONTHS]
        out[c] = np.log(LEVEL_USD[c]) + walk - walk[zero]
    return out


def month_paths(month: Month, seed: int) -> tuple[np.ndarray, dict[str, np.ndarray], dict]:
    """(open minutes, log USD close per currency, log USD level at the month's start).

    A pure function of (seed, month): a random walk from the month's anchor, bridged so that
    it ends on the next month's anchor (the correction is about 1e-6 a minute, far below a
    minute's volatility of about 1e-4).
    """
    minutes = open_minutes(month, month)
    n = len(minutes)
    anchors = _anchors(seed)
    i = _month_index(month)
    shocks = _factor_shocks(_stream(seed, "month", str(month)), n)
    paths: dict[str, np.ndarray] = {"USD": np.zeros(n)}
    starts: dict[str, float] = {"USD": 0.0}
    ramp = np.arange(1, n + 1) / max(n, 1)
    for c in CURRENCIES:
        a0, a1 = anchors[c][i], anchors[c][i + 1]
        walk = np.cumsum(VOL[c] * shocks[c])
        end = walk[-1] if n else 0.0
        paths[c] = a0 + walk - ramp * (end - (a1 - a0))
        starts[c] = float(a0)
    return minutes, paths, starts


def pip_digits(pair: str) -> int:
    return 3 if pair.lower().endswith("jpy") else 5


def pair_bars(
    pair: str, month: Month, minutes: np.ndarray, paths: dict[str, np.ndarray],
    starts: dict[str, float], seed: int,
) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
    """(times datetime64[us], ohlcv (n, 5)) of one pair's month from ``month_paths``."""
    pair = validate_pair(pair)
    base, quote = pair[:3].upper(), pair[3:].upper()
    digits = pip_digits(pair)
    scale = 10.0**digits
    rng = _stream(seed, "pair", pair, str(month))
    log_close = paths[base] - paths[quote]
    # a bar opens where the previous one closed; the month's first where the last month ended
    log_open = np.concatenate(([starts[base] - starts[quote]], log_close[:-1]))
    close = np.round(np.exp(log_close) * scale) / scale
    opn = np.round(np.exp(log_open) * scale) / scale
    # intra-minute excursions beyond open/close, about half a minute's volatility
    vol = np.hypot(VOL.get(base, 0.0), VOL.get(quote, 0.0))
    up = np.abs(rng.standard_normal(len(close))) * 0.5 * vol
    down = np.abs(rng.standard_normal(len(close))) * 0.5 * vol
    high = np.ceil(np.maximum(opn, close) * (1 + up) * scale) / scale
    low = np.floor(np.minimum(opn, close) * (1 - down) * scale) / scale
    volume = rng.poisson(40, len(close)).astype(np.float64) + 1
    keep = rng.random(len(close)) >= MISSING
    times = minutes[keep].astype("datetime64[us]")
    ohlcv = np.column_stack([opn, high, low, close, volume])[keep]
    return times, ohlcv


def synth_bars(
    pairs: Sequence[str], start: Month, end: Month, *, seed: int = 0
) -> Iterator[tuple[str, np.ndarray, np.ndarray]]:
    """Yield (pair, times, ohlcv) for each pair over the months ``start``..``end``."""
    months = [(m, *month_paths(m, seed)) for m in month_range(start, end)]
    for pair in pairs:
        parts = [pair_bars(pair, m, mins, paths, st, seed) for m, mins, paths, st in months]
        yield (validate_pair(pair), np.concatenate([t for t, _ in parts]),
               np.concatenate([o for _, o in parts]))  # fmt: skip


@dataclass
class GenerateSummary:
    pairs: list[str]
    months: list[str]
    bars: int = 0
    per_pair: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0
    seed: int = 0
    unchanged: int = 0  # pair-months that already held these bars: not rewritten
    replaced: list[str] = field(default_factory=list)  # "AUDUSD 2024-07": other bars overwritten

    @property
    def bars_per_s(self) -> float:
        return self.bars / self.seconds if self.seconds > 0 else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "bars": self.bars, "pairs": [p.upper() for p in self.pairs], "months": self.months,
            "seed": self.seed, "seconds": self.seconds, "bars_per_s": self.bars_per_s,
            "unchanged": self.unchanged, "replaced": self.replaced,
        }  # fmt: skip

    def text(self) -> str:
        span = self.months[0] + (f"..{self.months[-1]}" if len(self.months) > 1 else "")
        lines = [
            f"generated {plural(self.bars, 'bar')} for {plural(len(self.pairs), 'pair')},"
            f" {span} (seed {self.seed}; a month's bars depend only on the seed) in"
            f" {self.seconds:.1f}s ({self.bars_per_s:,.0f} bars/s)"
        ]
        if self.unchanged:
            lines.append(
                f"{plural(self.unchanged, 'pair-month')} already held these bars: left as they"
                " were (no change for backfill to redo)"
            )
        if self.replaced:
            lines.append(f"replaced bars bqx had not generated: {_listed(self.replaced)}")
        return "\n".join(lines)


def _listed(items: Sequence[str], most: int = 6) -> str:
    more = f", and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more


def bars_digest(times: np.ndarray, ohlcv: np.ndarray) -> str:
    """A digest of bars exactly as stored: equal digests, equal bars."""
    h = hashlib.sha256(np.ascontiguousarray(times.astype("datetime64[us]")).tobytes())
    h.update(np.ascontiguousarray(ohlcv, dtype=np.float64).tobytes())
    return h.hexdigest()[:32]


def generate(
    url: DatabaseLike,
    layout: Layout,
    pairs: Sequence[str] | None,
    start: Month,
    end: Month,
    *,
    seed: int = 0,
    workers: int = 1,
    replace: bool = False,
    progress: Callable[[str, int], None] | None = None,
) -> GenerateSummary:
    """Generate and store bars for ``pairs`` (default the report's 28), month by month.

    A month that holds bars generate did not write (an ingest's, or changed since) is refused
    before anything is written, unless ``replace``; a month that already holds exactly the
    bars it would write is left as it is, so a re-run changes nothing. Pairs are loaded by
    ``workers`` threads, each on its own connection (COPY releases the GIL).
    """
    pairs = [validate_pair(p) for p in (pairs or REPORT_PAIRS)]
    for pair in pairs:
        _check_synthetic(pair, seed)
    if end < start:
        raise InvalidOption("end", str(end), f"is before start {start}")
    t0 = time.monotonic()
    months = month_range(start, end)
    summary = GenerateSummary(pairs, [str(m) for m in months], seed=seed)
    with connect(url, autocommit=True) as conn:
        if not replace:
            _refuse_foreign(conn, layout, pairs, months)
        for pair in pairs:  # DDL up front: concurrent CREATEs collide
            create_source_table(conn, layout, pair)

    def load(job: tuple[str, Month, tuple]) -> tuple[str, int, str]:
        pair, month, forex = job
        times, ohlcv = _bars_of(pair, month, forex, seed)
        digest = bars_digest(times, ohlcv)
        with conns.connection() as conn:
            outcome = store_generated_month(conn, layout, pair, month, times, ohlcv, seed=seed,
                                            digest=digest, replace=replace)  # fmt: skip
        if progress is not None:
            progress(pair, len(times))
        return pair, len(times), outcome

    workers = max(1, workers)
    raced: list[str] = []
    with pool(url, workers) as conns, ThreadPoolExecutor(max_workers=workers) as threads:
        for month in months:  # a month's currency paths are shared by its pairs
            paths = month_paths(month, seed)
            for pair, n, outcome in threads.map(load, [(p, month, paths) for p in pairs]):
                _count(summary, pair, month, n, outcome, raced)
    summary.seconds = time.monotonic() - t0
    if raced:
        raise BqxError(
            f"bars bqx did not generate arrived while generating in {_listed(raced)}: those"
            " months were left as they are; the others are stored"
        )
    return summary


def _count(
    summary: GenerateSummary, pair: str, month: Month, n: int, outcome: str, raced: list[str]
) -> None:
    where = f"{pair.upper()} {month}"
    if outcome == "foreign":
        raced.append(where)
        return
    summary.per_pair[pair] = summary.per_pair.get(pair, 0) + n
    summary.bars += n
    summary.unchanged += outcome == "unchanged"
    if outcome == "replaced":
        summary.replaced.append(where)


def _refuse_foreign(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str], months: Sequence[Month]
) -> None:
    """Stop, before anything is written, when a month holds bars generate did not write."""
    found = [
        f"{pair.upper()} {m} ({plural(n, 'bar')})"
        for pair in pairs
        for m, n in foreign_bars(conn, layout, pair, months).items()
    ]
    if found:
        raise NeedsOption(
            f"not generating over bars bqx did not generate (ingested, or changed since):"
            f" {_listed(found)}; nothing was written",
            "replace", "overwrites them",
        )  # fmt: skip


def _is_cross(pair: str) -> bool:
    known = {*CURRENCIES, "USD"}
    base, quote = pair[:3].upper(), pair[3:].upper()
    return len(pair) == 6 and base in known and quote in known and base != quote


def _check_synthetic(pair: str, seed: int) -> None:
    """A cross of the eight currencies, or an instrument of the synthetic universe."""
    if not _is_cross(pair) and find_instrument(pair, seed) is None:
        raise BqxError(
            f"cannot generate {pair.upper()}: synthetic instruments are the crosses of"
            f" {', '.join(sorted({*CURRENCIES, 'USD'}))} and the instruments of"
            " `generate --instruments N` (e.g. XAUUSD, US500, GER40, BTCUSDT, 6E)"
        )


def _bars_of(pair: str, month: Month, forex: tuple, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """One instrument's month: a cross from the month's currency paths, else its own walk."""
    if _is_cross(pair):
        minutes, paths, starts = forex
        return pair_bars(pair, month, minutes, paths, starts, seed)
    inst = find_instrument(pair, seed)
    assert inst is not None  # _check_synthetic let it through
    return instrument_bars(inst, month, seed)
