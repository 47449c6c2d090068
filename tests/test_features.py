"""Features: causal, target aligned h bars ahead, splits separated by the embargo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from psycopg import sql
from typer.testing import CliRunner

from bqx.cli import app
from bqx.errors import BqxError
from bqx.metrics import compute
from bqx.ml.features import build_features, fingerprint, pair_features, split_boundaries
from bqx.store import names
from conftest import store_for

SRC = str(Path(__file__).resolve().parents[1] / "src")

WINDOWS = (3, 5, 8)
LAGS = (1, 2, 6)


def _series(n: int, seed: int):
    rng = np.random.default_rng(seed)
    times = np.datetime64("2024-07-05T20:00", "m") + np.cumsum(rng.choice([1, 1, 2, 90], n))
    times = times.astype("datetime64[us]")
    close = 1.08 * np.exp(np.cumsum(rng.normal(0, 1e-4, n)))
    high, low = close * (1 + rng.random(n) * 1e-4), close * (1 - rng.random(n) * 1e-4)
    volume = rng.integers(0, 50, n).astype(np.float64)
    return times, close, high, low, volume


def _features(times, close, high, low, volume) -> dict[str, np.ndarray]:
    metrics = compute(times, close, windows=WINDOWS)  # what `bqx backfill` stores
    return build_features(times, close, high, low, volume, metrics, lags=LAGS)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(12, 60),
    seed=st.integers(0, 10_000),
    cut=st.floats(0, 1),
    scale=st.floats(0.5, 2.0),
    field=st.sampled_from(["close", "high", "low", "volume", "all"]),
)
def test_a_feature_at_t_never_reads_a_later_bar(n, seed, cut, scale, field) -> None:
    times, close, high, low, volume = _series(n, seed)
    t = min(int(cut * n), n - 1)
    before = _features(times, close, high, low, volume)
    bars = {"close": close, "high": high, "low": low, "volume": volume}
    changed = {k: v.copy() for k, v in bars.items()}
    for k in ["close", "high", "low", "volume"] if field == "all" else [field]:
        changed[k][t + 1 :] *= scale  # every bar after t moves
    after = _features(times, **changed)
    assert list(before) == list(after)
    for name in before:
        np.testing.assert_array_equal(before[name][: t + 1], after[name][: t + 1], err_msg=name)
    if t + 1 < n and scale != 1.0 and field in ("close", "all"):
        assert not np.array_equal(before["logret_1"], after["logret_1"], equal_nan=True)


def _w_return(p: np.ndarray, i: int, w: int) -> float:
    """Straight from docs/metrics.md: Σ_{k=1..W} (p_{i-k} − p_i) / p_i."""
    return sum((p[i - k] - p[i]) / p[i] for k in range(1, w + 1))


def test_target_is_the_column_h_bars_later_and_splits_keep_the_embargo() -> None:
    n, h = 3000, 7
    times, close, high, low, volume = _series(n, 5)
    metrics = compute(times, close, windows=WINDOWS)
    cuts = split_boundaries(times[0], times[-1], (0.6, 0.2, 0.2))
    embargo = h + max(max(WINDOWS), max(LAGS))
    names, pf = pair_features(
        times, close, high, low, volume, metrics, target="w8_bqx_return", horizon=h,
        boundaries=cuts, embargo=embargo, lags=LAGS,
    )  # fmt: skip
    pos = np.searchsorted(times, pf.times)
    assert (times[pos] == pf.times).all()
    # alignment, against an independent evaluation of the formula at bar t + h
    for r in range(0, len(pos), 97):
        assert abs(pf.target[r] - _w_return(close, pos[r] + h, 8)) <= 1e-12
    assert pos.max() == n - 1 - h  # rows without a full target are gone, the rest kept
    # embargo: no bar of one split within h + W_max bars of another split's bars
    by_split = [pos[pf.labels == k] for k in range(3)]
    assert all(len(b) > 100 for b in by_split)
    for a in range(3):
        for b in range(a + 1, 3):
            gap = np.abs(by_split[a][:, None] - by_split[b][None, :]).min()
            assert gap > embargo, (a, b, gap)
    assert by_split[0].max() < by_split[1].min() < by_split[2].min()  # chronological
    # the features at each kept row are the ones built for that bar
    full = build_features(times, close, high, low, volume, metrics, lags=LAGS)
    for j, name in enumerate(names):
        np.testing.assert_array_equal(pf.matrix[:, j], full[name][pos], err_msg=name)
    assert np.isfinite(pf.matrix).all()
    # price-unit columns are also given relative to the rate
    np.testing.assert_allclose(full["w5_bqx_avg_rel"], metrics["w5_bqx_avg"] / close - 1)


def test_features_command_on_stored_bars(settings, layout, make_bars, cli_env, tmp_path) -> None:
    for i, pair in enumerate(["eurusd", "usdjpy"]):
        make_bars(pair, "2024-07-29", 4 * 1440, seed=i, level=1.08 if i == 0 else 160.0)
    store_for(settings, layout).backfill(workers=1)
    out = tmp_path / "feat"
    h = 30
    result = CliRunner().invoke(
        app,
        ["features", "--out", str(out), "--horizon", str(h), "--target", "w15_bqx_return",
         "--split", "0.6,0.2,0.2", "--json"],
        env=cli_env,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    manifest = json.loads((out / "manifest.json").read_text())
    assert json.loads(result.stdout)["splits"] == manifest["splits"]
    assert manifest["target"] == "w15_bqx_return" and manifest["horizon"] == h
    assert manifest["embargo_bars"] == h + 75
    assert set(manifest["splits"]) == {"train", "validation", "test"}
    assert manifest["pairs"] == ["EURUSD", "USDJPY"] == sorted(manifest["rows_per_pair"])
    from bqx import read_metrics

    total = 0
    for pair in ("eurusd", "usdjpy"):
        stored = read_metrics(pair, settings=settings)
        t_all = stored.column("ts_utc").to_numpy()
        col = stored.column("w15_bqx_return").to_numpy(zero_copy_only=False)
        positions = {}
        for split in ("train", "validation", "test"):
            tab = pq.read_table(out / split / f"{pair.upper()}.parquet")
            assert tab.column_names[:2] == ["pair", "ts_utc"]
            assert tab.column_names[2:-1] == manifest["features"]
            assert tab.column_names[-1] == "target"
            assert set(tab.column("pair").to_pylist()) <= {pair.upper()}
            pos = np.searchsorted(t_all, tab.column("ts_utc").to_numpy())
            np.testing.assert_array_equal(tab.column("target").to_numpy(), col[pos + h])
            positions[split] = pos
            total += tab.num_rows
            if tab.num_rows:
                first = str(tab.column("ts_utc").to_numpy()[0].astype("datetime64[s]")) + "Z"
                assert first >= manifest["splits"][split]["start"]
        for a, b in (("train", "validation"), ("validation", "test"), ("train", "test")):
            gap = np.abs(positions[a][:, None] - positions[b][None, :]).min()
            assert gap > h + 75
    assert total == sum(s["rows"] for s in manifest["splits"].values())
    # each file's fingerprint is recorded, for `bqx baseline` to check; no temporary file left
    assert manifest["fingerprints"] == {
        f"{s}/{p}.parquet": fingerprint(out / s / f"{p}.parquet")
        for s in ("train", "validation", "test") for p in ("EURUSD", "USDJPY")
    }  # fmt: skip
    assert not list(out.rglob("*.tmp"))


def test_bad_options_give_one_line(cli_env, tmp_path, make_bars, settings, layout, conn) -> None:
    make_bars("eurusd", "2024-07-29", 600, seed=1)
    store_for(settings, layout).backfill(workers=1)
    for kwargs, culprit in (
        ({"target": "nope"}, "invalid target 'nope'"),
        ({"pairs": ["GBPUSD"]}, "GBPUSD"),
        ({"horizon": 0}, "invalid horizon 0"),
    ):
        with pytest.raises(BqxError, match=culprit):
            store_for(settings).features(tmp_path / "f", **kwargs)
    # a bar stored after the backfill has no metric row yet: refused, naming pair and time
    conn.execute(
        sql.SQL("INSERT INTO {} VALUES ('2024-07-30 00:00+00', 1.1, 1.1, 1.1, 1.1, 1)").format(
            names.source(layout, "eurusd")
        )
    )
    with pytest.raises(BqxError, match=r"EURUSD: .* differ from 2024-07-30T00:00:00Z"):
        store_for(settings).features(tmp_path / "f")
    proc = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "features", "--out", str(tmp_path / "f"),
         "--split", "0.7,0.2"],
        env=cli_env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2  # a bad option value: a usage error
    assert "--split" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_a_horizon_beyond_the_data_is_refused_and_the_last_result_stays(
    cli_env, tmp_path, make_bars, settings, layout
) -> None:
    make_bars("eurusd", "2024-07-29", 3 * 1440, seed=1)
    store_for(settings, layout).backfill(workers=1)
    out = tmp_path / "f"
    store_for(settings).features(out, horizon=30)
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    env = {**cli_env, "PYTHONPATH": SRC}
    for args, code, why in (
        (["--horizon", "100000"], 2, "invalid --horizon 100000: is larger than the data"),
        (["--horizon", "1500"], 1, "the validation and test splits would be empty"),
        (["--start", "2024-08", "--end", "2024-07"], 2, "invalid --end '2024-07': is before"),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "bqx.cli", "features", "--out", str(out), *args], env=env,
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert proc.returncode == code, proc.stderr
        assert proc.stderr.startswith(f"error: {why}"), proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1 and "Traceback" not in proc.stderr
        # nothing written over: the last result stays whole, no temporary file is left
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
