"""Per-bar features, a target h bars ahead, and chronological splits with an embargo.

Causality: every feature at bar t is a function of bars ≤ t only (the BQX columns look back
from t by construction; the bar features use t and earlier bars). Only ``target`` looks ahead.

Splits: two instants cut the covered time span by the fractions, the same instants for every
pair (so no pair's test period overlaps another pair's training period). In each pair's bar
series the ``embargo = h + max(W_max, longest lag)`` bars before each cut are dropped: the last
training row's target reads bars up to a + h, the first validation row's features read bars
from b − W_max on, and b − a > embargo keeps the two sets of bars apart.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.parquet as pq

from bqx.core.layout import Layout
from bqx.core.months import Month, check_span
from bqx.core.symbols import display, validate_pair
from bqx.errors import BqxError, InvalidOption
from bqx.ops.export import metric_table_columns, read_metrics_conn, to_utc_us
from bqx.ops.outdir import write_atomic, write_text_atomic
from bqx.store import bars as bar_store
from bqx.store import catalog, targets

LAGS: tuple[int, ...] = (1, 5, 15, 60)
SPLITS: tuple[str, ...] = ("train", "validation", "test")
DEFAULT_TARGET = "w60_bqx_return"
DEFAULT_HORIZON = 60
DEFAULT_SPLIT: tuple[float, float, float] = (0.7, 0.15, 0.15)
BAR_FEATURES: tuple[str, ...] = (
    *(f"logret_{k}" for k in LAGS), "bar_range", "log1p_volume",
    "hour_of_week", "how_sin", "how_cos",
)  # fmt: skip
_PRICE_UNIT = re.compile(r"(w\d+|agg)_bqx_(max|min|avg|stdev)")
_WINDOW = re.compile(r"w(\d+)_bqx_return")


def is_price_unit(column: str) -> bool:
    """max / min / avg / stdev columns are in price units; the others are dimensionless."""
    return _PRICE_UNIT.fullmatch(column) is not None


def windows_of(columns: Sequence[str]) -> tuple[int, ...]:
    """The windows a metric table was built with, from its ``w{W}_bqx_return`` columns."""
    return tuple(sorted(int(m.group(1)) for c in columns if (m := _WINDOW.fullmatch(c))))


def feature_names(metric_cols: Sequence[str], lags: Sequence[int] = LAGS) -> list[str]:
    """BQX columns, the price-unit ones again relative to the rate, then the bar features."""
    rel = [f"{c}_rel" for c in metric_cols if is_price_unit(c)]
    bars = [f"logret_{k}" for k in lags] + list(BAR_FEATURES[len(LAGS) :])
    return [*metric_cols, *rel, *bars]


def build_features(
    times: np.ndarray,
    rate: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    volume: np.ndarray,
    metrics: Mapping[str, np.ndarray],
    *,
    lags: Sequence[int] = LAGS,
) -> dict[str, np.ndarray]:
    """Features for every bar, aligned with the inputs, NaN where not defined (short history).

    ``rate`` is the price the metrics use (p_t); ``metrics`` the stored BQX columns at each
    bar. Nothing here reads a bar after t for row t.
    """
    n = len(rate)
    out: dict[str, np.ndarray] = {}
    for name, col in metrics.items():
        out[name] = np.asarray(col, dtype=np.float64)
    for name, col in metrics.items():
        if is_price_unit(name):
            col = np.asarray(col, dtype=np.float64)
            # stdev/rate is a relative volatility; levels become distances from the rate
            out[f"{name}_rel"] = col / rate if name.endswith("stdev") else col / rate - 1.0
    log_rate = np.log(rate)
    for k in lags:
        r = np.full(n, np.nan)
        r[k:] = log_rate[k:] - log_rate[:-k]
        out[f"logret_{k}"] = r
    out["bar_range"] = (high - low) / rate
    out["log1p_volume"] = np.log1p(np.where(np.isfinite(volume), volume, 0.0))
    minutes = times.astype("datetime64[m]").astype(np.int64)
    how = ((minutes // 60) + 3 * 24) % 168  # 1970-01-01 was a Thursday; Monday 00h = 0
    out["hour_of_week"] = how.astype(np.float64)
    angle = 2 * np.pi * (minutes % (168 * 60) + 3 * 24 * 60) / (168 * 60)
    out["how_sin"], out["how_cos"] = np.sin(angle), np.cos(angle)
    return out


def target_ahead(column: np.ndarray, horizon: int) -> np.ndarray:
    """``column`` at bar t + horizon for each bar t; NaN where that bar does not exist."""
    out = np.full(len(column), np.nan)
    if horizon < len(column):
        out[: len(column) - horizon] = column[horizon:]
    return out


def split_boundaries(
    t_min: np.datetime64, t_max: np.datetime64, fractions: Sequence[float]
) -> tuple[np.datetime64, np.datetime64]:
    """The instants where validation and test start: fractions of the covered time span."""
    span = (t_max - t_min).astype("timedelta64[us]").astype(np.int64)
    f1, f2 = fractions[0], fractions[0] + fractions[1]
    return (
        t_min + np.timedelta64(int(span * f1), "us"),
        t_min + np.timedelta64(int(span * f2), "us"),
    )


def split_labels(
    times: np.ndarray, boundaries: tuple[np.datetime64, np.datetime64], embargo: int
) -> np.ndarray:
    """0 train, 1 validation, 2 test, -1 embargoed, for each bar of one pair's series."""
    i1 = int(np.searchsorted(times, boundaries[0]))
    i2 = int(np.searchsorted(times, boundaries[1]))
    labels = np.full(len(times), -1, dtype=np.int8)
    labels[: max(i1 - embargo, 0)] = 0
    labels[i1 : max(i2 - embargo, i1)] = 1
    labels[i2:] = 2
    return labels


def parse_split(text: str | Sequence[float]) -> tuple[float, float, float]:
    """``0.7,0.15,0.15`` -> three positive fractions that sum to 1."""
    try:
        parts = [float(x) for x in (text.split(",") if isinstance(text, str) else text)]
    except ValueError:
        raise InvalidOption("split", text, "expected three fractions, e.g. 0.7,0.15,0.15") from None
    if len(parts) != 3 or min(parts) <= 0 or not math.isclose(sum(parts), 1.0, abs_tol=1e-6):
        raise InvalidOption(
            "split", text, "three positive fractions summing to 1, e.g. 0.7,0.15,0.15"
        )
    return parts[0], parts[1], parts[2]


# -- one pair ------------------------------------------------------------------------------


@dataclass
class PairFeatures:
    """One pair's kept rows: times, feature matrix (rows × features), target, split labels."""

    times: np.ndarray
    matrix: np.ndarray
    target: np.ndarray
    labels: np.ndarray
    dropped: dict[str, int]


def pair_features(
    times: np.ndarray,
    rate: np.ndarray,
    high: np.ndarray,
    low: np.ndarray,
    volume: np.ndarray,
    metrics: Mapping[str, np.ndarray],
    *,
    target: str,
    horizon: int,
    boundaries: tuple[np.datetime64, np.datetime64],
    embargo: int,
    lags: Sequence[int] = LAGS,
) -> tuple[list[str], PairFeatures]:
    """Features, target and split labels for one pair's bar series; incomplete rows dropped."""
    feats = build_features(times, rate, high, low, volume, metrics, lags=lags)
    if target not in feats or target in BAR_FEATURES or target.startswith("logret_"):
        _refuse_target(target)
    names = list(feats)
    y = target_ahead(feats[target], horizon)
    labels = split_labels(times, boundaries, embargo)
    matrix = np.column_stack([feats[n] for n in names]) if names else np.empty((len(times), 0))
    complete = np.isfinite(matrix).all(axis=1)
    has_target = np.isfinite(y)
    keep = complete & has_target & (labels >= 0)
    dropped = {
        "no_target": int((~has_target).sum()),
        "incomplete_features": int((has_target & ~complete).sum()),
        "embargo": int((has_target & complete & (labels < 0)).sum()),
    }
    return names, PairFeatures(times[keep], matrix[keep], y[keep], labels[keep], dropped)


def _refuse_target(target: str) -> None:
    raise InvalidOption(
        "target", target,
        f"choose a BQX column such as {DEFAULT_TARGET} (or the _rel form of a price-unit"
        " column, e.g. w60_bqx_avg_rel)",
    )  # fmt: skip


# -- the command ---------------------------------------------------------------------------


@dataclass
class FeaturesSummary:
    out: Path
    manifest: dict[str, Any]
    rows: int = 0
    seconds: float = 0.0
    pairs: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return self.manifest

    def text(self) -> str:
        m = self.manifest
        splits = "".join(f" {k} {v['rows']:,}" for k, v in m["splits"].items())
        return (
            f"{self.rows:,} rows of {len(self.pairs)} pairs, {len(m['features'])} features,"
            f" target {m['target']} +{m['horizon']} bars:{splits} (embargo"
            f" {m['embargo_bars']} bars) in {self.seconds:.1f}s -> {self.out}/manifest.json"
        )


def _iso(t: np.datetime64 | None) -> str | None:
    if t is None:
        return None
    return str(np.asarray(t).astype("datetime64[s]")) + "Z"


def _pairs_and_columns(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str] | None
) -> tuple[list[str], list[str]]:
    """The pairs to build (default: every pair with bars and metrics) and their metric
    columns, which must be the same for every pair."""
    have = sorted(set(catalog.target_pairs(conn, layout)) & set(catalog.source_pairs(conn, layout)))
    todo = [validate_pair(p) for p in pairs] if pairs else have
    missing = [p for p in todo if p not in have]
    if missing:
        raise BqxError(
            f"no source bars or no metrics for {', '.join(p.upper() for p in missing)}"
            f" in schema {layout.schema} (run `bqx backfill` first)"
        )
    if not todo:
        raise BqxError(f"no pair has metrics in schema {layout.schema}: run `bqx backfill`")
    metric_cols = [c for c in metric_table_columns(conn, layout, todo[0]) if c != "rate"]
    for pair in todo[1:]:
        if [c for c in metric_table_columns(conn, layout, pair) if c != "rate"] != metric_cols:
            raise BqxError(
                f"{pair.upper()}: its metrics table has other columns than"
                f" {todo[0].upper()}'s (built with other --windows?)"
            )
    return todo, metric_cols


def _cuts(
    conn: psycopg.Connection, layout: Layout, pairs: Sequence[str], lo: Any, hi: Any,
    fractions: tuple[float, float, float],
) -> tuple[np.datetime64, np.datetime64]:  # fmt: skip
    """The same cut instants for every pair: from the span they cover together."""
    spans = [targets.time_bounds(conn, layout, p, lo, hi) for p in pairs]
    spans = [s for s in spans if s[0] is not None]
    if not spans:
        raise BqxError("no metric rows in the chosen months")
    t_min = min(to_utc_us(s[0], "time") for s in spans)
    t_max = max(to_utc_us(s[1], "time") for s in spans)
    return split_boundaries(t_min, t_max, fractions)


@dataclass
class _Build:
    """What every pair's features are built with, and the totals they add up to."""

    out: Path
    metric_cols: list[str]
    target: str
    horizon: int
    cuts: tuple[np.datetime64, np.datetime64]
    embargo: int
    lags: Sequence[int]
    names: list[str] = field(default_factory=list)
    total: int = 0
    per_pair: dict[str, Any] = field(default_factory=dict)
    dropped: dict[str, int] = field(
        default_factory=lambda: {"no_target": 0, "incomplete_features": 0, "embargo": 0}
    )
    stats: dict[str, dict[str, Any]] = field(
        default_factory=lambda: {s: {"start": None, "end": None, "rows": 0} for s in SPLITS}
    )

    longest: int = 0  # bars of the pair with the most
    # split files written under temporary names: (temporary, final), renamed at the end
    pending: list[tuple[Path, Path]] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)

    def add(self, pair: str, pf: PairFeatures, bars: int) -> None:
        self.longest = max(self.longest, bars)
        for k, v in pf.dropped.items():
            self.dropped[k] += v
        name = display(pair)  # the one name a reader sees: file, column, manifest
        self.per_pair[name] = {}
        for code, s in enumerate(SPLITS):
            sel = pf.labels == code
            rows = int(sel.sum())
            final = self.out / s / f"{name}.parquet"
            tmp = final.with_name(f".{final.name}.{os.getpid()}.{uuid.uuid4().hex[:12]}.tmp")
            self.pending.append((tmp, final))
            pq.write_table(split_table(name, pf, sel, self.names), tmp, compression="zstd")
            self.fingerprints[f"{s}/{name}.parquet"] = fingerprint(tmp)
            self.per_pair[name][s] = rows
            self.total += rows
            if rows:
                st = self.stats[s]
                first, last = pf.times[sel][0], pf.times[sel][-1]
                st["start"] = first if st["start"] is None else min(st["start"], first)
                st["end"] = last if st["end"] is None else max(st["end"], last)
                st["rows"] += rows

    def check(self) -> None:
        """Refuse a result with an empty split (nothing is renamed into place then)."""
        empty = [s for s in SPLITS if not self.stats[s]["rows"]]
        if not empty:
            return
        if self.horizon >= self.longest:
            raise InvalidOption(
                "horizon", self.horizon,
                f"is larger than the data: the longest pair has {self.longest:,} bars, and"
                f" the target of bar t is read at bar t + horizon",
            )  # fmt: skip
        raise BqxError(
            f"the {' and '.join(empty)} split{'s' if len(empty) > 1 else ''} would be empty"
            f" (the longest pair has {self.longest:,} bars; {self.embargo} before each cut are"
            " embargoed): choose more months, a smaller horizon or other split fractions"
        )

    def discard(self) -> None:
        for tmp, _ in self.pending:
            tmp.unlink(missing_ok=True)

    def commit(self) -> None:
        for tmp, final in self.pending:
            os.replace(tmp, final)


def _pair(conn: psycopg.Connection, layout: Layout, pair: str, lo: Any, hi: Any, b: _Build) -> None:
    """Read one pair's metrics and bars, build its features and write its split files."""
    table = read_metrics_conn(conn, layout, pair, lo, hi)
    times = table.column("ts_utc").to_numpy().astype("datetime64[us]")
    bar_times, hlv = bar_store.read_hlv(conn, layout, pair, lo, hi)
    if not np.array_equal(times, bar_times):
        where = _first_difference(times, bar_times)
        raise BqxError(
            f"{pair.upper()}: source bars and metric rows differ from {where} on"
            " (run `bqx backfill` for those months)"
        )
    metrics = {c: table.column(c).to_numpy(zero_copy_only=False) for c in b.metric_cols}
    rate = table.column("rate").to_numpy(zero_copy_only=False)
    b.names, pf = pair_features(
        times, rate, hlv[0], hlv[1], hlv[2], metrics, target=b.target, horizon=b.horizon,
        boundaries=b.cuts, embargo=b.embargo, lags=b.lags,
    )  # fmt: skip
    b.add(pair, pf, len(times))


def write_features(
    conn: psycopg.Connection,
    layout: Layout,
    out: Path,
    *,
    pairs: Sequence[str] | None = None,
    start: Month | None = None,
    end: Month | None = None,
    target: str = DEFAULT_TARGET,
    horizon: int = DEFAULT_HORIZON,
    split: str | Sequence[float] = DEFAULT_SPLIT,
    lags: Sequence[int] = LAGS,
    progress: Callable[..., None] | None = None,
) -> FeaturesSummary:
    """Features for each pair into ``out/{split}/{pair}.parquet`` and ``out/manifest.json``.

    Pairs are read, built and written one at a time (memory holds one pair), each file under
    a temporary name; only when every pair is built and no split is empty are they renamed
    into place and the manifest (with each file's fingerprint) written, so a refused run
    leaves an earlier result as it was. Needs the source bars (high, low, volume) and the
    stored metrics of ``bqx backfill``. ``progress(label, done, total, rows=…)`` is called
    pair by pair.
    """
    if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
        raise InvalidOption("horizon", horizon, "at least 1 bar")
    check_span(start, end)
    fractions = parse_split(split)
    out = Path(out)
    t0 = time.monotonic()
    lo = (start.start if start else datetime(1900, 1, 1, tzinfo=UTC)).replace(tzinfo=None)
    hi = (end.end if end else datetime(2999, 12, 1, tzinfo=UTC)).replace(tzinfo=None)
    todo, metric_cols = _pairs_and_columns(conn, layout, pairs)
    windows = windows_of(metric_cols)
    if not windows:
        raise BqxError(f"{todo[0].upper()}: the metrics table has no w{{W}}_bqx_return column")
    bqx_cols = feature_names(metric_cols, lags)[: -len(lags) - len(BAR_FEATURES) + len(LAGS)]
    if target not in bqx_cols:
        _refuse_target(target)
    build = _Build(out, metric_cols, target, horizon, _cuts(conn, layout, todo, lo, hi, fractions),
                   horizon + max(max(windows), max(lags)), lags)  # fmt: skip
    for s in SPLITS:
        (out / s).mkdir(parents=True, exist_ok=True)
    try:
        for i, pair in enumerate(todo):
            if progress is not None:
                progress("pairs", i, len(todo), rows=build.total)
            _pair(conn, layout, pair, lo, hi, build)
        build.check()
    except BaseException:
        build.discard()
        raise
    build.commit()
    if progress is not None:
        progress("pairs", len(todo), len(todo), rows=build.total)
    manifest = _manifest(build, todo, fractions, windows, layout)
    write_text_atomic(out / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return FeaturesSummary(out, manifest, build.total, time.monotonic() - t0, todo)


def _manifest(
    b: _Build, pairs: list[str], fractions: tuple[float, float, float], windows: tuple,
    layout: Layout,
) -> dict[str, Any]:  # fmt: skip
    return {
        "target": b.target,
        "horizon": b.horizon,
        "features": b.names,
        "splits": {
            s: {"start": _iso(v["start"]), "end": _iso(v["end"]), "rows": v["rows"]}
            for s, v in b.stats.items()
        },
        "pairs": [display(p) for p in pairs],
        "rows_per_pair": b.per_pair,
        "split_fractions": list(fractions),
        "cuts": {"validation_from": _iso(b.cuts[0]), "test_from": _iso(b.cuts[1])},
        "embargo_bars": b.embargo,
        "windows": list(windows),
        "lags": list(b.lags),
        "rows_dropped": b.dropped,
        "files": "{split}/{pair}.parquet",
        # what `bqx baseline` checks: a file swapped in from another run is refused
        "fingerprints": b.fingerprints,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "schema": layout.schema,
    }


def _first_difference(a: np.ndarray, b: np.ndarray) -> str:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    i = int(diff[0]) if len(diff) else n
    t = a[i] if i < len(a) else b[i] if i < len(b) else None
    return f"{np.datetime64(t, 's')}Z" if t is not None else "the end"


def fingerprint(path: Path) -> str:
    """``sha256:…`` of a file's bytes, as the manifest records it for each split file."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return f"sha256:{digest.hexdigest()}"


def write_split(path: Path, pair: str, pf: PairFeatures, sel: np.ndarray, names: list[str]) -> None:
    """One pair's rows of one split (``sel``) as Parquet, replaced atomically."""
    table = split_table(pair, pf, sel, names)
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def split_table(pair: str, pf: PairFeatures, sel: np.ndarray, names: list[str]) -> pa.Table:
    """One pair's rows of one split (``sel``): pair, ts_utc, the features, target."""
    n = int(sel.sum())
    cols: dict[str, Any] = {
        "pair": pa.repeat(pa.scalar(pair, pa.string()), n),
        "ts_utc": pa.array(pf.times[sel], type=pa.timestamp("us", tz="UTC")),
    }
    block = pf.matrix[sel]
    for j, name in enumerate(names):
        cols[name] = pa.array(block[:, j])
    cols["target"] = pa.array(pf.target[sel])
    return pa.table(cols)
