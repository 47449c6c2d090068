"""Synthetic minute bars that look like the market: the demo's and the tests' data source.

Seven currencies follow correlated random walks in US dollars (USD is the numeraire), so the
28 pairs of AUD CAD CHF EUR GBP JPY NZD USD are their crosses and triangles agree
(EURUSD × USDJPY ≈ EURJPY, up to rounding). Levels are near mid-2024 markets, volatility is
per currency, bars exist only in the forex week (Sunday 22:00 to Friday 22:00 UTC) and a few
percent of minutes are missing per pair, so a month holds about 30,700 bars per pair as in the
report. Prices are rounded to the pair's pip precision with OHLC consistent.

Reproducible: the same seed and month range give the same bars. The currency paths depend on
(seed, start, end) only, and each pair's missing minutes and intra-minute ranges on
(seed, pair), so generating a subset of pairs gives those pairs' bars exactly as generating
all 28 does.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from bqx.config import Settings
from bqx.db import connect, pool, resolve_url
from bqx.errors import BqxError
from bqx.schema import REPORT_PAIRS, Layout, Month, create_source_table, validate_pair
from bqx.sources.load import load_bars

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


def _stream(seed: int, *key: str) -> np.random.Generator:
    """An independent random stream per (seed, key), stable across runs and subsets."""
    digest = hashlib.sha256("/".join(key).encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed, *words]))


def open_minutes(start: Month, end: Month) -> np.ndarray:
    """Minutes (datetime64[m]) of the forex week from the start of ``start`` to ``end``'s end."""
    t0 = np.datetime64(start.start.replace(tzinfo=None), "m")
    t1 = np.datetime64(end.end.replace(tzinfo=None), "m")
    minutes = np.arange(t0, t1)
    mow = (minutes.astype(np.int64) + 3 * 1440) % WEEK_MIN
    return minutes[(mow < _CLOSE) | (mow >= _OPEN)]


def currency_paths(minutes: np.ndarray, seed: int) -> dict[str, np.ndarray]:
    """Log USD value of each currency at the end of each open minute; USD is 0."""
    n = len(minutes)
    rng = _stream(seed, "currencies", str(minutes[0]) if n else "", str(n))
    factors = {name: rng.standard_normal(n) for name in ("dollar", "europe", "commodity", "haven")}
    paths = {"USD": np.zeros(n)}
    for c in CURRENCIES:
        region, b = REGION[c]
        a = DOLLAR[c]
        own = np.sqrt(max(0.0, 1.0 - a * a - b * b))
        shocks = a * factors["dollar"] + b * factors[region] + own * rng.standard_normal(n)
        paths[c] = np.log(LEVEL_USD[c]) + np.cumsum(VOL[c] * shocks)
    return paths


def pip_digits(pair: str) -> int:
    return 3 if pair.lower().endswith("jpy") else 5


def pair_bars(
    pair: str, minutes: np.ndarray, paths: dict[str, np.ndarray], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(times datetime64[us], ohlcv (n, 5)) for one pair from the currency paths."""
    pair = validate_pair(pair)
    base, quote = pair[:3].upper(), pair[3:].upper()
    digits = pip_digits(pair)
    scale = 10.0**digits
    rng = _stream(seed, "pair", pair, str(minutes[0]) if len(minutes) else "", str(len(minutes)))
    log_close = paths[base] - paths[quote]
    log_open = np.concatenate(([log_close[0]], log_close[:-1]))
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
    minutes = open_minutes(start, end)
    paths = currency_paths(minutes, seed)
    for pair in pairs:
        times, ohlcv = pair_bars(pair, minutes, paths, seed)
        yield validate_pair(pair), times, ohlcv


@dataclass
class GenerateSummary:
    pairs: list[str]
    months: list[str]
    bars: int = 0
    per_pair: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def bars_per_s(self) -> float:
        return self.bars / self.seconds if self.seconds > 0 else 0.0


def generate(
    settings: Settings,
    layout: Layout,
    pairs: Sequence[str] | None,
    start: Month,
    end: Month,
    *,
    seed: int = 0,
    workers: int = 1,
    progress: Callable[[str, int], None] | None = None,
) -> GenerateSummary:
    """Generate and store bars for ``pairs`` (default the report's 28), replacing those months.

    Pairs are loaded by ``workers`` threads, each on its own connection (COPY releases the GIL).
    """
    pairs = [validate_pair(p) for p in (pairs or REPORT_PAIRS)]
    if end < start:
        raise BqxError(f"--end {end} is before --start {start}")
    t0 = time.monotonic()
    minutes = open_minutes(start, end)
    paths = currency_paths(minutes, seed)
    summary = GenerateSummary(pairs, [])
    url = resolve_url(settings)  # once: starting the embedded server is not for threads
    with connect(url, autocommit=True) as conn:  # DDL up front: concurrent CREATEs collide
        for pair in pairs:
            create_source_table(conn, layout, pair)

    def load(pair: str) -> tuple[str, int, list[str]]:
        times, ohlcv = pair_bars(pair, minutes, paths, seed)
        with conns.connection() as conn:
            result = load_bars(conn, layout, pair, times, ohlcv, mode="replace")
        if progress is not None:
            progress(pair, len(times))
        return pair, len(times), list(result.months)

    workers = max(1, workers)
    with pool(url, workers) as conns, ThreadPoolExecutor(max_workers=workers) as threads:
        for pair, n, months in threads.map(load, pairs):
            summary.per_pair[pair] = n
            summary.bars += n
            summary.months = sorted(set(summary.months) | set(months))
    summary.seconds = time.monotonic() - t0
    return summary
