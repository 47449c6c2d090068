"""The baseline is honest: it finds a planted relation and finds nothing in a random walk."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from bqx.metrics import compute
from bqx.ml.baseline import block_bootstrap_gain, run_baseline, scores, write_outputs
from bqx.ml.features import SPLITS, pair_features, split_boundaries, write_split

WINDOWS, LAGS, H = (5, 10, 20), (1, 5), 10


def _features_dir(out: Path, log_price: np.ndarray) -> Path:
    """A `bqx features` directory built from one synthetic pair's prices."""
    n = len(log_price)
    times = (np.datetime64("2024-07-01T00:00", "m") + np.arange(n)).astype("datetime64[us]")
    close = np.exp(log_price)
    rng = np.random.default_rng(1)
    high, low = close * (1 + 1e-5 * rng.random(n)), close * (1 - 1e-5 * rng.random(n))
    metrics = compute(times, close, windows=WINDOWS)
    embargo = H + max(WINDOWS)
    names, pf = pair_features(
        times, close, high, low, rng.integers(1, 9, n).astype(float), metrics,
        target="w10_bqx_return", horizon=H, embargo=embargo, lags=LAGS,
        boundaries=split_boundaries(times[0], times[-1], (0.6, 0.2, 0.2)),
    )  # fmt: skip
    splits = {}
    for code, split in enumerate(SPLITS):
        (out / split).mkdir(parents=True)
        sel = pf.labels == code
        write_split(out / split / "eurusd.parquet", "eurusd", pf, sel, names)
        splits[split] = {"rows": int(sel.sum())}
    manifest = {"target": "w10_bqx_return", "horizon": H, "features": names,
                "splits": splits, "embargo_bars": embargo}  # fmt: skip
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def _random_walk(n: int, seed: int) -> np.ndarray:
    return np.log(1.08) + np.cumsum(np.random.default_rng(seed).normal(0, 1e-4, n))


def _mean_reverting(n: int, seed: int) -> np.ndarray:
    """A planted, learnable relation: the log price reverts to a fixed level (OU process),
    so how far it stands from that level now predicts the move over the next H bars."""
    eps = np.random.default_rng(seed).normal(0, 1e-4, n)
    x = np.empty(n)
    x[0] = 0.0
    for i in range(1, n):
        x[i] = 0.95 * x[i - 1] + eps[i]
    return np.log(1.08) + x


def test_a_random_walk_beats_nothing(tmp_path: Path) -> None:
    fdir = _features_dir(tmp_path / "rw", _random_walk(16_000, seed=7))
    doc, arrays = run_baseline(fdir, trees=40, n_jobs=1)
    assert doc["beats_baselines"] is False
    assert doc["statement"].startswith("Nothing beats the baselines")
    assert set(doc["models"]) == {"ridge", "lightgbm"}
    assert set(doc["baselines"]) == {"random", "mean"}
    for s in [*doc["models"].values(), *doc["baselines"].values()]:
        assert set(s) == {"r2", "rmse", "mae", "directional_accuracy"}
    assert doc["models"][doc["best_model"]]["r2"] < 0.02
    # files: JSON equal to the document, Markdown saying it plainly, a plot
    paths = write_outputs(doc, arrays, tmp_path / "out")
    assert json.loads(paths[0].read_text()) == json.loads(json.dumps(doc))
    assert "Nothing beats the baselines" in paths[1].read_text()
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_planted_relation_is_found(tmp_path: Path) -> None:
    fdir = _features_dir(tmp_path / "ou", _mean_reverting(16_000, seed=7))
    doc, _ = run_baseline(fdir, trees=40, n_jobs=1)
    assert doc["beats_baselines"] is True, doc["statement"]
    best = doc["models"][doc["best_model"]]
    assert best["r2"] > 0.05 and best["directional_accuracy"] > 0.55
    assert best["rmse"] < doc["baselines"]["mean"]["rmse"] < doc["baselines"]["random"]["rmse"]
    for c in doc["significance"]["comparisons"][doc["best_model"]].values():
        assert c["ci95_low"] > 0


def test_scores_and_bootstrap_against_plain_formulas() -> None:
    rng = np.random.default_rng(0)
    y = rng.normal(size=500)
    p = y * 0.5 + rng.normal(size=500)
    s = scores(y, p)
    ss_res = sum((a - b) ** 2 for a, b in zip(y, p, strict=True))
    ss_tot = sum((a - y.mean()) ** 2 for a in y)
    assert s["r2"] == pytest.approx(1 - ss_res / ss_tot, rel=1e-12)
    assert s["rmse"] == pytest.approx((ss_res / 500) ** 0.5, rel=1e-12)
    assert s["mae"] == pytest.approx(sum(abs(a - b) for a, b in zip(y, p, strict=True)) / 500)
    hits = sum((a > 0) == (b > 0) for a, b in zip(y, p, strict=True))
    assert s["directional_accuracy"] == pytest.approx(hits / 500)
    minutes = np.arange(500)
    base = np.zeros(500)
    gain = block_bootstrap_gain(y, p, base, minutes, 10)
    assert gain["blocks"] == 50
    assert gain["mse_gain"] == pytest.approx(np.mean(y**2 - (p - y) ** 2))
    assert gain["ci95_low"] <= gain["mse_gain"] <= gain["ci95_high"]
    # the same gain measured on a model that is the truth is significant
    assert block_bootstrap_gain(y, y, base, minutes, 10)["significant"] is True


def test_baseline_command_on_a_bad_directory(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{\n  oops")
    proc = subprocess.run(
        [sys.executable, "-m", "bqx.cli", "baseline", "--features", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "manifest.json: line 2" in proc.stderr
