"""A synthetic universe of instruments of mixed kinds, for tests and benchmarks at scale.

``bqx generate --instruments N`` takes the first N of ``universe()``: the kinds in turn (forex,
metal, index, crypto, future, stock), each kind's instruments in order, so any N is a mix. Each
kind has its trading hours (UTC, no daylight saving), and each instrument its level (near
mid-2024 markets), price grid (decimals and tick), volatility and share of missing minutes
(hours in UTC, no daylight saving):

- forex: Sunday 22:00 to Friday 22:00 UTC: the report's 28 crosses (``bqx.sources.generate``);
- metals, futures, US and Asian index CFDs: Sunday 23:00 to Friday 22:00 with a daily break
  22:00–23:00 (XAUUSD at 2 decimals, 6E at 5 with a tick of 0.00005, US500 with 0.25);
- European index CFDs: Monday to Friday 07:00–21:00 (GER40 at 1 decimal);
- crypto: every minute of the week (BTCUSDT at 2 decimals, ETHBTC at 5, SHIBUSDT at 8);
- stock CFDs: Monday to Friday 13:30–20:00 (S001.US at 2 decimals).

Beyond the named instruments, each kind but forex continues with numbered ones (``IDX001``,
``ALT001USDT``, ``FUT001``, ``S001.US``, ``MET001``), their levels and grids drawn from the seed.

Reproducible as the forex bars are: a month of an instrument is a pure function of (seed,
symbol, month). Its level at the start of every month comes from a monthly anchor walk seeded
by (seed, symbol); the month's minutes are a random walk bridged to the next month's anchor,
so months join exactly. Instruments of a kind share a common factor (seed, kind, month), so
crypto moves together, as do indices.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from bqx.core.months import Month

WEEK_MIN = 7 * 1440
DAY_MIN = 1440
FOREX = "forex"
KINDS = ("forex", "metal", "index", "crypto", "future", "stock")


def stream(seed: int, *key: str) -> np.random.Generator:
    """An independent random stream per (seed, key), stable across runs and subsets."""
    digest = hashlib.sha256("/".join(key).encode()).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([seed, *words]))


@dataclass(frozen=True)
class Instrument:
    """One synthetic instrument: its symbol (stored form), kind, hours and price process."""

    symbol: str
    kind: str
    level: float  # price in 2024-07
    decimals: int  # the price grid: prices are multiples of ``tick``, shown with these decimals
    vol: float  # per-minute standard deviation of log returns
    hours: str = "futures"  # a key of HOURS
    tick: float = 0.0  # 0: 10^-decimals
    missing: float = 0.01  # share of open minutes without a bar
    beta: float = 0.6  # loading on the kind's common factor

    @property
    def step(self) -> float:
        return self.tick or 10.0**-self.decimals


# open minutes, as (first day of the week with Monday = 0, minute of that day) windows of the
# week: [start, end) in minutes from Monday 00:00
def _weekly(*spans: tuple[int, int, int, int]) -> tuple[tuple[int, int], ...]:
    return tuple((d0 * DAY_MIN + m0, d1 * DAY_MIN + m1) for d0, m0, d1, m1 in spans)


def _daily(days: range, start: int, end: int) -> tuple[tuple[int, int], ...]:
    return tuple((d * DAY_MIN + start, d * DAY_MIN + end) for d in days)


HOURS: dict[str, tuple[tuple[int, int], ...]] = {
    # Sunday 23:00 .. Friday 22:00 with a daily break 22:00-23:00 (CME Globex's week)
    "futures": _daily(range(0, 5), 0, 22 * 60) + _daily(range(0, 4), 23 * 60, 24 * 60)
    + _weekly((6, 23 * 60, 7, 0)),
    "europe": _daily(range(0, 5), 7 * 60, 21 * 60),
    "crypto": ((0, WEEK_MIN),),
    "us_stocks": _daily(range(0, 5), 13 * 60 + 30, 20 * 60),
}  # fmt: skip

_NAMED: dict[str, tuple[Instrument, ...]] = {
    "metal": (
        Instrument("xauusd", "metal", 2400.0, 2, 1.3e-4),
        Instrument("xagusd", "metal", 29.5, 3, 2.6e-4),
        Instrument("xptusd", "metal", 1000.0, 2, 2.0e-4),
        Instrument("xpdusd", "metal", 950.0, 2, 2.8e-4),
    ),
    "index": (
        Instrument("us500", "index", 5500.0, 2, 1.1e-4, tick=0.25),
        Instrument("ger40", "index", 18500.0, 1, 1.2e-4, hours="europe"),
        Instrument("nas100", "index", 19500.0, 2, 1.5e-4, tick=0.25),
        Instrument("uk100", "index", 8200.0, 1, 1.0e-4, hours="europe"),
        Instrument("us30", "index", 39000.0, 1, 1.0e-4),
        Instrument("fra40", "index", 7600.0, 1, 1.2e-4, hours="europe"),
        Instrument("jpn225", "index", 39000.0, 0, 1.5e-4, tick=5.0),
        Instrument("eu50", "index", 4900.0, 1, 1.2e-4, hours="europe"),
        Instrument("aus200", "index", 7800.0, 1, 0.9e-4),
        Instrument("hk50", "index", 17500.0, 0, 1.6e-4),
        Instrument("esp35", "index", 11000.0, 1, 1.1e-4, hours="europe"),
        Instrument("us2000", "index", 2050.0, 2, 1.6e-4, tick=0.1),
    ),
    "crypto": (
        Instrument("btcusdt", "crypto", 60000.0, 2, 6e-4, hours="crypto", missing=0.001),
        Instrument("ethusdt", "crypto", 3300.0, 2, 7e-4, hours="crypto", missing=0.001),
        Instrument("ethbtc", "crypto", 0.055, 5, 4e-4, hours="crypto", missing=0.002),
        Instrument("solusdt", "crypto", 145.0, 2, 1e-3, hours="crypto", missing=0.001),
        Instrument("bnbusdt", "crypto", 570.0, 1, 6e-4, hours="crypto", missing=0.002),
        Instrument("xrpusdt", "crypto", 0.48, 4, 8e-4, hours="crypto", missing=0.002),
        Instrument("dogeusdt", "crypto", 0.12, 5, 1e-3, hours="crypto", missing=0.002),
        Instrument("shibusdt", "crypto", 0.000017, 8, 1.1e-3, hours="crypto", missing=0.003),
        Instrument("pepeusdt", "crypto", 0.0000095, 10, 1.5e-3, hours="crypto", missing=0.005),
    ),
    "future": (
        Instrument("6e", "future", 1.085, 5, 0.9e-4, tick=0.00005),
        Instrument("esz4", "future", 5550.0, 2, 1.1e-4, tick=0.25),
        Instrument("6j", "future", 0.0063, 7, 1.2e-4, tick=0.0000005),
        Instrument("clq4", "future", 82.5, 2, 2.5e-4),
        Instrument("gcq4", "future", 2420.0, 1, 1.3e-4),
        Instrument("zn", "future", 110.0, 6, 0.4e-4, tick=1 / 64),
    ),
    "stock": (),
}

# the forex crosses are made by bqx.sources.generate; here they are only named, in market order
_FOREX = ("eurusd", "usdjpy", "gbpusd", "audusd", "usdcad", "usdchf", "nzdusd", "eurjpy",
          "gbpjpy", "eurgbp", "audjpy", "euraud", "eurchf", "audnzd", "nzdjpy", "gbpaud",
          "gbpcad", "eurnzd", "audcad", "gbpchf", "audchf", "cadjpy", "chfjpy", "eurcad",
          "cadchf", "gbpnzd", "nzdcad", "nzdchf")  # fmt: skip


def _numbered(kind: str, i: int, seed: int) -> Instrument:
    """The i-th numbered instrument of a kind (1-based), its level and grid from the seed."""
    rng = stream(seed, "universe", kind, str(i))
    if kind == "crypto":  # altcoins from 10^-7 to 10^3: more decimals the cheaper they are
        level = float(10 ** rng.uniform(-7, 3))
        decimals = int(np.clip(4 - np.floor(np.log10(level)), 1, 12))
        return Instrument(f"alt{i:03d}usdt", kind, level, decimals, float(rng.uniform(6e-4, 2e-3)),
                          hours="crypto", missing=0.003)  # fmt: skip
    if kind == "stock":
        level = float(10 ** rng.uniform(1, 3))
        return Instrument(f"s{i:03d}.us", kind, level, 2, float(rng.uniform(1e-4, 4e-4)),
                          hours="us_stocks", missing=0.05)  # fmt: skip
    if kind == "index":
        level = float(10 ** rng.uniform(3, 4.6))
        hours = "europe" if i % 2 else "futures"
        return Instrument(f"idx{i:03d}", kind, level, int(rng.integers(0, 3)),
                          float(rng.uniform(0.8e-4, 1.8e-4)), hours=hours)  # fmt: skip
    if kind == "metal":
        level = float(10 ** rng.uniform(1, 3.5))
        return Instrument(f"met{i:03d}", kind, level, 3 if level < 100 else 2,
                          float(rng.uniform(1.2e-4, 3e-4)))  # fmt: skip
    level = float(10 ** rng.uniform(-1, 4))  # futures
    decimals = int(np.clip(3 - np.floor(np.log10(level)), 0, 6))
    return Instrument(f"fut{i:03d}", kind, level, decimals, float(rng.uniform(0.5e-4, 2.5e-4)))


def _kind_list(kind: str, count: int, seed: int) -> list[Instrument | str]:
    """The first ``count`` instruments of a kind (forex: names only, at most 28)."""
    if kind == FOREX:
        return list(_FOREX[:count])
    named: list[Instrument | str] = list(_NAMED[kind][:count])
    named += [_numbered(kind, i, seed) for i in range(1, count - len(named) + 1)]
    return named


def universe(n: int, seed: int = 0) -> list[Instrument | str]:
    """N instruments of mixed kinds, the kinds in turn (a forex cross is named by its symbol).
    The same N and seed always give the same instruments; a smaller N a prefix of a larger."""
    per_kind = {k: 0 for k in KINDS}
    order: list[str] = []
    while len(order) < n:
        for kind in KINDS:
            if len(order) == n:
                break
            if kind == FOREX and per_kind[kind] == len(_FOREX):
                continue
            per_kind[kind] += 1
            order.append(kind)
    lists = {k: _kind_list(k, c, seed) for k, c in per_kind.items()}
    taken = dict.fromkeys(KINDS, 0)
    out: list[Instrument | str] = []
    for kind in order:
        out.append(lists[kind][taken[kind]])
        taken[kind] += 1
    return out


def symbol_of(item: Instrument | str) -> str:
    return item if isinstance(item, str) else item.symbol


@lru_cache(maxsize=4096)
def find(symbol: str, seed: int = 0) -> Instrument | None:
    """The named or numbered synthetic instrument of that symbol (stored form), if any."""
    for group in _NAMED.values():
        for inst in group:
            if inst.symbol == symbol:
                return inst
    for kind, fmt in (("crypto", "alt{:03d}usdt"), ("stock", "s{:03d}.us"), ("index", "idx{:03d}"),
                      ("metal", "met{:03d}"), ("future", "fut{:03d}")):  # fmt: skip
        prefix, _, tail = fmt.partition("{:03d}")
        body = symbol.removeprefix(prefix).removesuffix(tail)
        if symbol.startswith(prefix) and symbol.endswith(tail) and body.isdigit():
            if len(body) == 3 and int(body) >= 1:
                return _numbered(kind, int(body), seed)
    return None


# -- bars ----------------------------------------------------------------------------------


def open_minutes(hours: str, month: Month) -> np.ndarray:
    """The month's minutes (datetime64[m]) in which an instrument with these hours trades."""
    t0 = np.datetime64(month.start.replace(tzinfo=None), "m")
    t1 = np.datetime64(month.end.replace(tzinfo=None), "m")
    minutes = np.arange(t0, t1)
    mow = (minutes.astype(np.int64) + 3 * DAY_MIN) % WEEK_MIN  # 1970-01-01 was a Thursday
    keep = np.zeros(len(minutes), bool)
    for a, b in HOURS[hours]:
        keep |= (mow >= a) & (mow < b)
    return minutes[keep]


_ANCHOR_YEARS = (1900, 2999)
_MONTH_STEP_MINUTES = 30_000  # a month's open minutes, about: the scale of an anchor step


@lru_cache(maxsize=1024)
def _anchors(seed: int, symbol: str, vol: float) -> np.ndarray:
    """Log price change from 2024-07 to the start of every month 1900-01 .. 3000-01."""
    months = (_ANCHOR_YEARS[1] - _ANCHOR_YEARS[0] + 1) * 12 + 1
    steps = stream(seed, "anchors", symbol).standard_normal(months - 1)
    walk = np.concatenate(([0.0], np.cumsum(vol * np.sqrt(_MONTH_STEP_MINUTES) * steps)))
    return walk - walk[_month_index(Month(2024, 7))]


def _month_index(month: Month) -> int:
    return (month.year - _ANCHOR_YEARS[0]) * 12 + month.month - 1


def _factor(seed: int, kind: str, month: Month) -> np.ndarray:
    """The kind's common shocks for every minute of the month."""
    minutes = int((month.end - month.start).total_seconds() // 60)
    return stream(seed, "factor", kind, str(month)).standard_normal(minutes)


def instrument_bars(inst: Instrument, month: Month, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(times datetime64[us], ohlcv (n, 5)) of one instrument's month: on its grid, in its
    hours, a month's first open the previous month's last close."""
    minutes = open_minutes(inst.hours, month)
    rng = stream(seed, "instrument", inst.symbol, str(month))
    n = len(minutes)
    t0 = np.datetime64(month.start.replace(tzinfo=None), "m")
    common = _factor(seed, inst.kind, month)[(minutes - t0).astype(np.int64)]
    own = np.sqrt(1.0 - inst.beta**2) * rng.standard_normal(n)
    anchors = _anchors(seed, inst.symbol, inst.vol)
    i = _month_index(month)
    a0, a1 = np.log(inst.level) + anchors[i], np.log(inst.level) + anchors[i + 1]
    walk = np.cumsum(inst.vol * (inst.beta * common + own))
    ramp = np.arange(1, n + 1) / max(n, 1)
    log_close = a0 + walk - ramp * ((walk[-1] if n else 0.0) - (a1 - a0))
    close = _on_grid(np.exp(log_close), inst)
    opn = np.concatenate((_on_grid(np.exp([a0]), inst), close[:-1]))
    up = np.abs(rng.standard_normal(n)) * 0.5 * inst.vol
    down = np.abs(rng.standard_normal(n)) * 0.5 * inst.vol
    high = _on_grid(np.maximum(opn, close) * (1 + up), inst, np.ceil)
    low = _on_grid(np.minimum(opn, close) * (1 - down), inst, np.floor)
    volume = rng.poisson(40, n).astype(np.float64) + 1
    keep = rng.random(n) >= inst.missing
    ohlcv = np.column_stack([opn, high, low, close, volume])[keep]
    return minutes[keep].astype("datetime64[us]"), ohlcv


def _on_grid(prices: np.ndarray, inst: Instrument, rounding=np.round) -> np.ndarray:
    """Prices as multiples of the tick, written with the instrument's decimals (so 1.08545 is
    the float64 nearest to that decimal, as a broker's file has it); never below one tick."""
    ticks = np.maximum(rounding(np.asarray(prices) / inst.step), 1.0)
    return np.round(ticks * inst.step, inst.decimals)
